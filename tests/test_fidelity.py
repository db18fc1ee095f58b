"""The fidelity gate (`quantbook eval`, step 03): the export against the release on held-out tokens.

On the README's chain (the trained tiny): the unbroken export passes and carries its model card;
W4A16 with the lossless carry equals the release exactly (every byte the candidate computes with
comes from the export, so a zero error is the proof that nothing was lost on the way); and copies
of the export broken in ways that keep `quantbook verify`'s header contract fail the gate, naming
the block: one layer's w13 `input_scale` divided by 16, w1 and w3 of one expert exchanged with
their scales, MTP experts in the form the named engine misreads.
"""

from __future__ import annotations

import json
import shutil

import pytest

from quantbook.export import fidelity
from quantbook.export.verify import verify
from quantbook.release.shards import Checkpoint

LAYER = 2  # the layer the corruptions break (a score-routed layer of the tiny)


@pytest.fixture(scope="module")
def chain(trained_chain):
    return trained_chain


def _settings(chain, **over) -> dict:
    from quantbook.params import load_params

    f = dict((load_params(chain["params"])["export"].get("fidelity") or {}))
    return {**f, **over}


def _eval(chain, export, **over) -> dict:
    return fidelity.evaluate(export, chain["src"], _settings(chain, **over), calibration=chain["calib"],
                             progress=False)


def _patch(export, edits: dict) -> None:
    """Overwrite tensors' bytes in place ({name: new bytes of the same size}): headers, sizes and the
    writer's manifest stay as they were, as `quantbook verify`'s header contract needs."""
    ck = Checkpoint(export)
    for name, data in edits.items():
        e = ck.entry(name)
        assert len(data) == e.nbytes, name
        with open(ck.path(name), "r+b") as f:
            f.seek(e.start)
            f.write(data)


@pytest.fixture(scope="module")
def broken(chain, tmp_path_factory):
    """Copies of the chain's export, each with one defect that keeps verify's header contract."""
    base = tmp_path_factory.mktemp("broken")
    out = {}

    def copy(name):
        d = base / name
        shutil.copytree(chain["export"], d)
        (d / fidelity.CARD).unlink(missing_ok=True)
        return d

    # one layer's w13 input_scale / 16: every expert's (the engines take the max over the layer)
    d = copy("input_scale")
    ck = Checkpoint(d)
    small = [n for n in ck.weight_map if n.startswith(f"layers.{LAYER}.ffn.experts.")
             and n.endswith((".w1.input_scale", ".w3.input_scale"))]
    _patch(d, {n: (ck.tensor(n).float() / 16).numpy().tobytes() for n in small})
    out["input_scale"] = d

    # w1 and w3 of the layer's busiest expert exchanged, each with its scales (near zero SwiGLU is almost
    # symmetric in gate and up, so a rarely routed expert's exchange barely moves the layer's output)
    counts = json.loads((chain["run_dir"] / "expert_token_counts.json").read_text())[f"layers.{LAYER}"]
    busiest = max(range(len(counts)), key=counts.__getitem__)
    d = copy("w13_swap")
    ck = Checkpoint(d)
    pre = f"layers.{LAYER}.ffn.experts.{busiest}."
    edits = {}
    for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
        a, b = pre + "w1." + suffix, pre + "w3." + suffix
        edits[a], edits[b] = bytes(ck.raw(b)), bytes(ck.raw(a))
    _patch(d, edits)
    out["w13_swap"] = d
    return out


def test_chain_export_passes_the_gate(chain):
    """Step 03 of the README's chain ran the gate: pass, recorded (eval.json, export.json, manifest,
    `quantbook runs`), and the export carries its model card."""
    run_dir = chain["run_dir"]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["verdict"] == "pass", result["reasons"]
    n = result["numbers"]
    assert n["ppl_release"] < 64, "the trained tiny predicts held-out English far better than chance (vocab 1024)"
    assert 0.99 < n["ppl_ratio"] <= result["settings"]["max_ppl_ratio"]
    assert n["mtp"]["top1_agreement"] >= result["settings"]["min_mtp_agreement"]
    rec = json.loads((run_dir / "export.json").read_text())
    assert rec["fidelity"]["verdict"] == "pass"
    step = chain["manifest"]["steps"]["03_recover_export"]
    assert step["fidelity"]["verdict"] == "pass"
    card = (chain["export"] / fidelity.CARD).read_text()
    assert "## Fidelity" in card and "| PPL |" in card and "sglang.launch_server" in card and "vllm serve" in card
    from quantbook.records.runs import format_runs, list_runs

    assert "PASS ppl x" in format_runs(list_runs(chain["runs"]))


def test_w4a16_with_the_lossless_carry_is_the_release_exactly(chain):
    """Weights decoded from the export's NVFP4 bytes, activations unquantized: every block's own error
    and the logits' KLD are exactly 0 (MTP experts as SGLang reads the released form)."""
    r = _eval(chain, chain["export"], mode="w4a16", engine="sglang", samples=4)
    assert all(b["routed_rel_err"] == b["local_rel_err"] == b["stream_rel_err"] == 0.0 for b in r["blocks"]), r["blocks"]
    assert r["numbers"]["kld"]["max"] == 0.0 and r["numbers"]["ppl_ratio"] == 1.0
    assert r["numbers"]["mtp"]["top1_agreement"] == 1.0


def test_same_non_expert_bytes():
    """Routed experts aside, the same names, dtypes, shapes and bytes; any difference is seen."""
    import torch

    base = {"layers.1.attn.wq_a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "layers.1.attn_norm.weight": torch.ones(4, dtype=torch.bfloat16),
            "layers.1.ffn.gate.bias": torch.tensor(0.5)}
    experts_r = {"layers.1.ffn.experts.0.w1.weight": torch.zeros(2, 2, dtype=torch.int8),
                 "layers.1.ffn.experts.0.w1.scale": torch.zeros(2, 1, dtype=torch.uint8)}
    experts_e = {"layers.1.ffn.experts.0.w1.weight": torch.ones(2, 1, dtype=torch.uint8),
                 "layers.1.ffn.experts.0.w1.input_scale": torch.tensor(1.0)}
    copy = {k: v.clone() for k, v in base.items()}
    assert fidelity.same_non_expert_bytes({**base, **experts_r}, {**copy, **experts_e}, "layers.1")
    flipped = {**copy, "layers.1.attn_norm.weight": torch.tensor([1, 1, 1, 1.0078125], dtype=torch.bfloat16)}
    retyped = {**copy, "layers.1.attn_norm.weight": torch.ones(2, dtype=torch.float32)}  # same 8 bytes
    renamed = {("layers.1.ffn.gate.e_score_correction_bias" if k.endswith("gate.bias") else k): v for k, v in copy.items()}
    for other in (flipped, retyped, renamed, {k: v for k, v in copy.items() if "wq_a" not in k}):
        assert not fidelity.same_non_expert_bytes(base, other, "layers.1")


def test_block_own_error_from_the_experts_alone(chain, monkeypatch):
    """With the block's other bytes identical (quantbook's export), its own error comes from the routed
    experts' outputs without a second run of the block; forced down the general route (the whole
    candidate block on the release's inputs), the same per-block numbers up to the BF16 rounding of
    the block's output, which the general route counts and the direct one does not."""
    fast = _eval(chain, chain["export"], samples=4)
    assert all(b["other_bytes_identical"] for b in fast["blocks"])
    monkeypatch.setattr(fidelity, "same_non_expert_bytes", lambda *a: False)
    slow = _eval(chain, chain["export"], samples=4)
    assert not any(b["other_bytes_identical"] for b in slow["blocks"])
    assert fast["numbers"] == slow["numbers"]
    for f, s in zip(fast["blocks"], slow["blocks"]):
        assert (f["routed_rel_err"], f["stream_rel_err"]) == (s["routed_rel_err"], s["stream_rel_err"])
        assert abs(f["local_rel_err"] - s["local_rel_err"]) <= 0.1 * s["local_rel_err"] + 1e-4, (f, s)


def test_a_stopped_gate_carries_on(chain, tmp_path, monkeypatch, capsys):
    """Stopped at layer 2 (saving after every block), the rerun computes only layers 2, 3 and the MTP
    block from the saved streams, and gives the uninterrupted gate's numbers; progress saved for other
    settings is discarded; the progress directory is gone once the gate ends."""
    d = tmp_path / "eval-progress"
    st = dict(samples=2, seq=32, save_every=1)
    whole = _eval(chain, chain["export"], **st)
    block = fidelity.Evaluation.block

    def stop_at_layer_2(self, b):
        if b == f"layers.{LAYER}":
            raise KeyboardInterrupt("stopped")
        return block(self, b)

    monkeypatch.setattr(fidelity.Evaluation, "block", stop_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        fidelity.evaluate(chain["export"], chain["src"], _settings(chain, **st), calibration=chain["calib"],
                          progress=False, resume_dir=d)
    assert sorted(p.name for p in d.iterdir()) == ["cand.layers.1.safetensors", "manifest.json",
                                                   "ref.layers.1.safetensors"]
    ran = []
    monkeypatch.setattr(fidelity.Evaluation, "block", lambda self, b: ran.append(b) or block(self, b))
    other = fidelity.evaluate(chain["export"], chain["src"], _settings(chain, **{**st, "batch_size": 1}),
                              calibration=chain["calib"], progress=False, resume_dir=d)
    assert ran[0] == "layers.0" and "another export" in capsys.readouterr().out  # not this progress: from the start
    with pytest.raises(KeyboardInterrupt):  # stopped again, then carried on with the same settings
        monkeypatch.setattr(fidelity.Evaluation, "block", stop_at_layer_2)
        fidelity.evaluate(chain["export"], chain["src"], _settings(chain, **st), calibration=chain["calib"],
                          progress=False, resume_dir=d)
    ran.clear()
    monkeypatch.setattr(fidelity.Evaluation, "block", lambda self, b: ran.append(b) or block(self, b))
    resumed = fidelity.evaluate(chain["export"], chain["src"], _settings(chain, **st), calibration=chain["calib"],
                                progress=False, resume_dir=d)
    assert ran == [f"layers.{LAYER}", "layers.3", "mtp.0"] and not d.exists()
    assert resumed["numbers"] == whole["numbers"] and resumed["verdict"] == whole["verdict"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "timing"} for r in rows]  # noqa: E731
    assert strip(resumed["blocks"]) == strip(whole["blocks"])
    assert other["numbers"]["tokens"] == whole["numbers"]["tokens"]


def test_w4a4_error_is_small_and_spread(chain):
    """W4A4 (activations NVFP4): a small nonzero error in every main layer's routed experts, none an
    outlier; the MTP block's released MXFP4 experts, as SGLang reads them (BF16 activations), exact."""
    r = json.loads((chain["run_dir"] / "eval.json").read_text())
    errs = {b["block"]: b["routed_rel_err"] for b in r["blocks"]}
    assert all(0 < e < 0.1 for b, e in errs.items() if b.startswith("layers.")), errs
    assert errs["mtp.0"] == 0.0
    assert r["outliers"] == [] and r["settings"]["engine"] == "sglang" and r["settings"]["mode"] == "w4a4"


@pytest.mark.parametrize("defect", ["input_scale", "w13_swap"])
def test_a_broken_layer_fails_the_gate_by_name(defect, chain, broken):
    r = _eval(chain, broken[defect], samples=4)
    assert r["verdict"] == "fail"
    assert r["outliers"] == [f"layers.{LAYER}"], (r["reasons"], [(b["block"], b["routed_rel_err"]) for b in r["blocks"]])
    assert r["worst_blocks"][0] == f"layers.{LAYER}"
    assert any(f"block layers.{LAYER}" in reason for reason in r["reasons"])


def test_what_verify_alone_sees_of_the_defects(chain, broken):
    """verify with the release: the w1/w3 exchange breaks its numeric check against the release; the
    small input_scale keeps every check green (only the gate sees it)."""
    small = verify(broken["input_scale"], source=chain["src"], progress=False)
    assert small["verdict"] == "pass"
    swapped = verify(broken["w13_swap"], source=chain["src"], progress=False)
    assert swapped["verdict"] == "fail"


def test_mtp_experts_the_engine_misreads_fail_the_gate(chain):
    """The chain keeps the released MXFP4 MTP experts: SGLang reads them exactly (pass, above);
    vLLM 0.33 misreads them (E8M0 bytes as E4M3, unwritten scales): the MTP agreement collapses."""
    r = _eval(chain, chain["export"], engine="vllm", samples=4)
    assert r["mtp_form"] == "released"
    assert r["verdict"] == "fail"
    assert any(reason.startswith("MTP (released experts as vllm reads them)") for reason in r["reasons"])
    assert r["numbers"]["mtp"]["top1_agreement"] < 0.5
    assert "mtp.0" in r["outliers"]


def test_settings_are_checked():
    with pytest.raises(Exception, match="unknown key"):
        fidelity.fidelity_settings({"max_ppl": 1.1})
    with pytest.raises(Exception, match="engine"):
        fidelity.fidelity_settings({"engine": "trtllm"})


def test_held_out_text_must_not_be_calibration_text(chain, tmp_path):
    calib = [json.loads(x)["text"] for x in chain["calib"].read_text().splitlines() if x.strip()]
    with pytest.raises(Exception, match="calibration samples"):
        fidelity.check_held_out(calib[:3], chain["calib"])


def test_cli_exit_codes(chain, broken, tmp_path, capsys):
    """`quantbook eval`: 0 pass (eval.json written), 1 fail (the block named), 2 refused."""
    from quantbook.cli import main

    args = ["--source", str(chain["src"]), "--calibration", str(chain["calib"]), "--samples", "4"]
    assert main(["eval", str(chain["export"]), *args, "--run-dir", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "eval.json").exists() and "**PASS**" in capsys.readouterr().out
    assert main(["eval", str(broken["input_scale"]), *args, "--run-dir", str(tmp_path / "b")]) == 1
    assert f"layers.{LAYER}" in capsys.readouterr().out
    assert main(["eval", str(chain["export"]), *args, "--seq", "2"]) == 2
    assert "seq" in capsys.readouterr().err
