"""What notebook 02 shows, as tables: the preflight, the patches, the phases, the quantizers, the
repairs, the expert coverage, where every output went. Each function reads records the step wrote
(or the preflight facts) and returns a pandas DataFrame, so the notebook only displays them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from .. import amax
from . import patches, state
from .data import coverage
from .driver import RESULT, SUMMARY, generic_export_dir
from .resources import size
from .settings import calib_plan, writes_generic_export

FLAGS = ("qformat", "kv_cache_qformat", "recipe", "use_seq_device_map", "gpu_max_mem_percentage",
         "inference_tensor_parallel", "skip_generate")
RUN_FLAGS = ("layerwise", "layerwise_save_every", "save_full_state", "force")


def _table(rows: list[tuple], columns: list[str], index: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    return df.set_index(index) if index else df


def preflight_summary(facts: dict, q: dict, run_dir: str | Path) -> pd.DataFrame:
    """The run at a glance: driver, versions, model, calibration data, sizes, memory."""
    s, cfg, res = facts["settings"], facts["model_config"], facts["resources"]
    v = state.versions()
    datasets, sizes = calib_plan(s)
    rows = [
        ("driver", q["driver"]),
        ("nvidia-modelopt", f"{facts['modelopt']} (patches tested with {', '.join(patches.TESTED_MODELOPT)})"),
        ("transformers / torch", f"{v['transformers']} / {v['torch']}"),
        ("model", f"{s['pyt_ckpt_path']}: {cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers, "
                  f"{cfg.get('n_routed_experts')} routed experts, {size(res['model_bytes'])} of weights"),
        ("calibration", ", ".join(f"{n} samples from {d}" for d, n in zip(datasets, sizes))
         + f"; calib_seq {s['calib_seq']}; batch_size {s['batch_size']}; device {s['device']}"),
        ("generic export (estimate)", size(res["export_bytes"]) if writes_generic_export(q) else
         "not written (quantize.export_generic: false)"),
        ("calibrated state", "< 64 MiB" + (f" + full state {size(res['model_bytes'])}" if q["save_full_state"] else "")),
        ("host memory available", size(res["host_available"])),
    ]
    if q["layerwise"]:
        paths = state.layerwise_paths(run_dir)
        progress = state.modelopt_progress(paths["ckpt"])
        rows.append(("layerwise checkpoint", f"~{size(res['layerwise_bytes'])} in {paths['dir']}; " + (
            f"last completed layer {progress['last_completed_layer']} of {progress['num_layers']} "
            "(verified, then resumed)" if progress else "none yet")))
    for problem in res["problems"]:
        rows.append(("FORCED despite", problem))
    return _table(rows, ["item", "value"], "item")


def flags_table(facts: dict, q: dict) -> pd.DataFrame:
    """The hf_ptq flags that shape the export, and the run's own switches."""
    s = facts["settings"]
    return _table([(k, s.get(k)) for k in FLAGS] + [(k, q[k]) for k in RUN_FLAGS], ["flag", "value"], "flag")


def disk_table(facts: dict) -> pd.DataFrame:
    disk = facts["resources"]["disk"]
    return _table([(k, d["path"], size(d["need"]), size(d["free"])) for k, d in disk.items()],
                  ["for", "path", "needs (estimate)", "free"], "for")


def gpu_table(facts: dict) -> pd.DataFrame:
    gpus = facts["resources"]["gpus"]
    return _table([(g["gpu"], size(g["free"]), size(g["total"])) for g in gpus], ["GPU", "free", "total"], "GPU")


def patches_table(applied: list[str]) -> pd.DataFrame:
    return _table([(n, n in applied, d) for n, d in patches.PATCHES.items()], ["patch", "in place", "what"], "patch")


def timings_table(rec: dict) -> pd.DataFrame:
    return _table([(k, round(v, 1)) for k, v in rec["timings"].items()], ["phase", "seconds"], "phase")


def quantizer_table(run_dir: str | Path) -> pd.DataFrame:
    """Quantizers by kind and role, enabled and disabled, from modelopt's `.quant_summary.txt`."""
    lines = [ln for ln in (Path(run_dir) / SUMMARY).read_text().splitlines()
             if ln.split() and "quantizer" in ln.split()[0]]
    groups: Counter = Counter()
    for line in lines:
        p = amax.parse_quantizer(line.split()[0])
        groups[(p.kind, p.role, "disabled" if "disabled" in line else "enabled")] += 1
    keys = sorted({(k, r) for k, r, _ in groups})
    return _table([(k, r, groups[(k, r, "enabled")], groups[(k, r, "disabled")]) for k, r in keys],
                  ["kind", "role", "enabled", "disabled"])


def calibration_facts(rec: dict) -> pd.DataFrame:
    """What the run calibrated on, and where a layerwise run started."""
    c = rec.get("calibration") or {}
    rows = [("samples", c.get("samples")), ("tokens", c.get("tokens")),
            ("positions (with padding)", c.get("positions")), ("data sha256", str(c.get("sha256"))[:16])]
    lw = rec.get("layerwise")
    if lw:
        rows.append(("layerwise", (f"resumed from layer {lw['start_layer']}" if lw["resume"]
                                   else "calibrated from layer 0") + f"; checkpoint {lw['checkpoint_dir']}"))
    return _table(rows, ["item", "value"], "item")


def repairs_table(rec: dict) -> pd.DataFrame:
    """Activation amax the post-calibration hook replaced before the export (raw, replacement, source)."""
    repairs = rec["post_calibration"]["amax_repairs"]
    return _table([(r["quantizer"], r["problem"], r["values"], r["replacement"], r["fallback"]) for r in repairs],
                  ["quantizer", "problem", "raw", "replacement", "from"])


def export_time_bad_amax(rec: dict) -> pd.DataFrame:
    """Bad amax the export-time patch caught (none when the hook repaired everything first)."""
    late = [r for r in rec.get("bad_amax", []) if "export input_scale" in r["seen_in"]]
    return _table([(r["quantizer"], r["problem"], r["replacement"], r["fallback"]) for r in late],
                  ["quantizer", "problem", "replacement", "from"])


def coverage_table(counts: dict[str, list[int]]) -> pd.DataFrame:
    """Per MoE layer: tokens routed in all, the least and most an expert got, experts never routed."""
    cov = coverage(counts)
    return _table([(k, v["total"], v["min"], v["max"], len(cov["never_routed"].get(k, [])))
                   for k, v in cov["per_layer"].items()],
                  ["layer", "tokens", "min per expert", "max per expert", "never routed"], "layer")


def outputs_table(run_dir: str | Path, rec: dict) -> pd.DataFrame:
    """Where everything went, with sizes: export, state, snapshot, token counts, checkpoint, record."""
    run_dir = Path(run_dir)

    def tree(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    man = state.load_manifest(run_dir / state.STATE_DIR)
    rows = []
    export_dir = generic_export_dir(rec)
    if export_dir is not None and export_dir.exists():
        rows.append(("export (unified HF, NVFP4)", str(export_dir), size(tree(export_dir))))
    elif export_dir is None:
        rows.append(("export (unified HF, NVFP4)", "not written (quantize.export_generic: false)", ""))
    rows.append(("calibrated state", str(run_dir / state.STATE_DIR), size(sum(v["size"] for v in man["files"].values()))))
    for what, name in (("amax snapshot", amax.SNAPSHOT), ("expert token counts", amax.TOKEN_COUNTS)):
        rows.append((what, str(run_dir / name), size(tree(run_dir / name))))
    if (run_dir / state.LAYERWISE_DIR).exists():
        rows.append(("layerwise checkpoint", str(run_dir / state.LAYERWISE_DIR), size(tree(run_dir / state.LAYERWISE_DIR))))
    rows.append(("run record", str(run_dir / RESULT), size(tree(run_dir / RESULT))))
    return _table(rows, ["what", "path", "size"], "what")


def token_counts(run_dir: str | Path) -> dict[str, list[int]]:
    return json.loads((Path(run_dir) / amax.TOKEN_COUNTS).read_text())


def verify_generic_export(rec: dict, run_dir: str | Path, reference: str | Path | None) -> dict | None:
    """`quantbook verify` on step 02's generic export, written to `verify-02.json` / `.md` in the run
    directory; None when the run wrote none (`quantize.export_generic: false`): nothing to verify."""
    from ..export import verify

    export_dir = generic_export_dir(rec)
    if export_dir is None:
        return None
    checked = verify.verify(export_dir, reference=reference, progress=False)
    verify.write_result(checked, run_dir, stem="verify-02")
    return checked

