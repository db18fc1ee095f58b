"""The fidelity gate run inside step 02's streaming pass (`export.fidelity.along`), one block at a time.

While the pass holds a block's release bytes in memory, its amax just made final, the gate's two
models go through that block (`fidelity.Evaluation.block`, the code `quantbook eval` runs):

    reference   the block's release tensors, the very buffer the pass calibrated from
    candidate   the export's tensors of that block, computed in memory by the writer's own code from
                the same buffer and the block's final amax (`along.Along.block_tensors`): the bytes
                the pass writes (tests/test_gate_along.py: the numbers equal a separate
                `quantbook eval` of the written export)

So the release is read once for calibration, export and gate. After the last main layer both heads
give the numbers; after the MTP block its agreement. The gate's state (both models' streams, the
rows, the numbers) is saved with the pass's own checkpoint (`block_checkpoint`), so a killed pass
resumes the gate with it. The gate is dropped, and step 03 runs it as before, when its candidate
cannot be known at its block (an input amax filled with the whole model's largest), when a resumed
pass has no gate state for these settings, or when the pass does not run every block the gate needs.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from . import fidelity
from .fidelity_resume import SHAPING

RECORD = "eval-02"  # eval-02.json / .md in the run directory: the gate as the pass measured it
IMPLEMENTATION = "grouped_mm"  # `quantbook eval`'s default for both models' routed experts


class GateAlong:
    """The gate of one pass (process 0): `block` after each calibrated block, `result` at the end."""

    def __init__(self, e: dict, device, calibration: str | Path | None, blocks: list[str]):
        self.e = e
        self.s = {**e["fidelity"], "device": str(device)}
        self.text, self.tokens = fidelity.held_out_tokens(e["source"], self.s, calibration)
        self.dropped: str | None = None
        self.rows: list[dict] = []
        self.numbers: dict | None = None
        self.seconds = 0.0
        self.ev = fidelity.Evaluation(e["dir"], e["source"], self.s, self.tokens, IMPLEMENTATION,
                                      fed_mtp_form=e["mtp_experts"])
        if blocks != self.ev.blocks:
            self.drop(f"the pass calibrates {blocks[-1] if blocks else 'nothing'} last, the gate needs "
                      f"{self.ev.blocks[-1]} (quantize.mtp: calibrate runs the MTP block in the pass)")
        self.last_main = f"layers.{self.ev.n - 1}"

    def signature(self) -> dict:
        """What saved gate state must match to be carried on: the tokens, the settings that shape the
        numbers, the export's options, the device type and the experts implementation."""
        return {"tokens_sha256": hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest(),
                "settings": {k: self.e["fidelity"][k] for k in SHAPING},  # as given: engine auto, not resolved
                "export": {k: self.e[k] for k in ("cast_mxfp4_to_nvfp4", "mtp_experts")},
                "device_type": self.ev.device.type, "implementation": IMPLEMENTATION}

    def drop(self, why: str) -> None:
        """Stop gating in this pass (step 03 runs the gate); said once on the terminal."""
        if self.dropped is None:
            self.dropped = why
            print(f"[quantbook] fidelity gate: not in this pass ({why}); step 03 runs it", flush=True)

    def resume(self, saved: dict | None, done: list[str], device) -> None:
        """Carry on from the pass's checkpoint: `saved` is its gate state (None: none was kept)."""
        if not done or self.dropped:
            return
        if saved is None or saved.get("dropped"):
            return self.drop((saved or {}).get("dropped") or "the saved pass kept no gate state")
        if saved.get("signature") != self.signature() or [r["block"] for r in saved["rows"]] != done:
            return self.drop("the saved pass's gate measured other tokens or settings")
        self.rows, self.numbers = saved["rows"], saved.get("numbers")
        if saved["streams"] is not None:
            self.ev.ref.streams, self.ev.cand.streams = [[t.to(device) for t in s] for s in saved["streams"]]

    def block(self, block: str, raw: dict, along) -> dict:
        """Both models through `block` (its release tensors `raw`, the export's from `along`); its timing."""
        if self.dropped:
            return {}
        t0 = time.perf_counter()
        export_raw, why = along.block_tensors(raw)
        if export_raw is None:
            self.drop(why)
            return {}
        row = self.ev.block(block, {"release": raw, "export": export_raw})
        del export_raw
        self.rows.append(row)
        if block == self.last_main:
            self.numbers = self.ev.final()
        secs = time.perf_counter() - t0
        self.seconds += secs
        return {"eval_s": round(secs, 4)}

    def state(self) -> dict:
        """What the pass's checkpoint keeps (`block_checkpoint.Saver`): JSON and both models' streams."""
        if self.dropped:
            return {"json": {"dropped": self.dropped}, "streams": None}
        return {"json": {"signature": self.signature(), "rows": self.rows, "numbers": self.numbers},
                "streams": (self.ev.ref.streams, self.ev.cand.streams)}

    def result(self) -> dict:
        """The gate's result, as `quantbook eval` returns it, with what it was measured on; or why not."""
        if self.dropped:
            return {"dropped": self.dropped}
        if self.numbers is None or len(self.rows) != len(self.ev.blocks):
            return {"dropped": f"{len(self.rows)} of {len(self.ev.blocks)} blocks gated"}
        out = fidelity.conclude(self.rows, self.numbers, self.s, self.text, self.e["dir"], self.e["source"],
                                self.ev.mtp_form, self.seconds)
        out["along"] = {**self.signature(), "in": "step 02's streaming pass"}
        return out


def record(result: dict, run_dir: str | Path) -> dict:
    """`eval-02.json` / `.md` in the run directory (the gate as the pass measured it, with the digest
    of the run's amax it was measured with); the summary for `quantize.json`."""
    from ..amax import SNAPSHOT
    from ..release.shards import file_digest

    run_dir = Path(run_dir)
    if "dropped" in result:
        return {"in_pass": False, "why": result["dropped"]}
    result["along"]["amax_digest"] = file_digest(run_dir / SNAPSHOT)
    paths = fidelity.write_result(result, run_dir, stem=RECORD)
    n = result["numbers"]
    return {"in_pass": True, "verdict": result["verdict"], "summary": result["summary"], "seconds": result["elapsed_s"],
            "ppl_ratio": n["ppl_ratio"], "kld_mean": n["kld"]["mean"], "same_top": n["same_top"],
            "files": [str(x) for x in paths]}


def adoptable(gate: dict | None, e: dict, amax_digest: str, s: dict) -> str | None:
    """Why step 03 cannot adopt the pass's gate (`eval-02.json`) for export settings `e` and the run's
    amax, or None when it can (the same export, options, amax, tokens' settings and text)."""
    if not gate:
        return "step 02 ran no gate"
    if "dropped" in gate:
        return f"step 02's pass dropped it: {gate['dropped']}"
    a = gate.get("along") or {}
    want = {"dir": str(e["dir"]), "source": str(e["source"]), "amax_digest": amax_digest,
            "settings": {k: s[k] for k in SHAPING},
            "export": {k: e[k] for k in ("cast_mxfp4_to_nvfp4", "mtp_experts")}}
    have = {"dir": gate["export"], "source": gate["source"], "amax_digest": a.get("amax_digest"),
            "settings": a.get("settings"), "export": a.get("export")}
    if s["text"] and str(s["text"]) != gate["settings"]["text"]:
        return f"held-out text {s['text']} but step 02 gated on {gate['settings']['text']}"
    diff = [k for k in want if want[k] != have[k]]
    return f"step 02's gate differs in {diff}" if diff else None


def rejudge(gate: dict, s: dict) -> dict:
    """The pass's gate under step 03's thresholds (`s`): the numbers stay, the verdict is re-made."""
    settings = {**gate["settings"], **{k: s[k] for k in fidelity.GATE_DEFAULTS}}
    rows = [dict(r) for r in gate["blocks"]]
    numbers = {k: v for k, v in gate["numbers"].items() if k != "mtp"}
    out = fidelity.conclude(rows, numbers, settings, gate["settings"]["text"], gate["export"], gate["source"],
                            gate["mtp_form"], gate["elapsed_s"])
    out["along"] = gate["along"]
    return out


__all__ = ["GateAlong", "record", "adoptable", "rejudge", "RECORD"]
