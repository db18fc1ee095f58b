"""Step 03: exporting again from what step 02 kept gives the bytes of the direct export; the saved
state is validated without a model; the CLI modes and the notebook run on the tiny V4."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from layout_helpers import files, model_snapshot
from quantbook.calibrate import state
from quantbook.export import recover
from quantbook.export.layout import MANIFEST as LAYOUT_MANIFEST
from quantbook.export.layout import write_serving_layout



@pytest.fixture(scope="module")
def run(tiny_chain, tmp_path_factory):
    """A copy of the chain's calibrated run as step 02 left it (snapshot + cheap state), its direct
    (modelopt) export, the snapshot as an in-memory dict, and the same state saved with the full
    state dict (mto.save) from the model the cheap state restores."""
    from quantbook.amax import load_snapshot
    from quantbook.calibrate import hf_model

    root = tmp_path_factory.mktemp("run")
    run_dir = root / "runs" / "tiny"
    shutil.copytree(tiny_chain["run_dir"], run_dir)
    for step_record in ("export.json", "verify.json", "verify.md"):  # what step 03 left: written again here
        (run_dir / step_record).unlink()
    model, _, manifest = hf_model.restore(run_dir)
    full_state = root / "full_state"
    state.save_cheap_state(model, full_state, q=manifest["params"], model_path=str(tiny_chain["bf16"]), save_full=True)
    live, _ = load_snapshot(run_dir / "amax.safetensors")
    return {"dir": run_dir, "direct": tiny_chain["generic"], "q": tiny_chain["q"], "live": live,
            "full_state": full_state}


def _full_state_only(run, dst: Path) -> Path:
    """A copy of the run whose state holds only the full state dict (mto.save), as older runs kept."""
    shutil.copytree(run["dir"], dst)
    sd = dst / state.STATE_DIR
    shutil.rmtree(sd)
    shutil.copytree(run["full_state"], sd)
    (sd / state.QUANTIZER_TENSORS).unlink()
    m = json.loads((sd / state.MANIFEST).read_text())
    del m["files"][state.QUANTIZER_TENSORS]
    (sd / state.MANIFEST).write_text(json.dumps(m))
    (dst / "amax.safetensors").unlink()
    return dst


def test_generic_recovery_is_bit_identical_to_the_direct_export(run, tiny_chain, tmp_path):
    tiny_bf16 = tiny_chain["bf16"]  # the model of the direct export: its sidecar files are copied too
    out = tmp_path / "generic"
    rec = recover.export({"layout": "generic", "dir": str(out), "reference": str(tiny_bf16)}, run["dir"],
                         progress=False)
    assert files(out) == files(run["direct"])
    assert rec["generic"]["restored_from"] == "cheap state"
    assert rec["verdict"] == "research-only"
    saved = json.loads((run["dir"] / recover.RECORD).read_text())
    assert saved["status"] == "done" and saved["verdict"] == "research-only"
    assert json.loads((run["dir"] / "verify.json").read_text())["verdict"] == "research-only"
    # and from the full state dict, when that is what the run saved
    full = _full_state_only(run, tmp_path / "full-run")
    out2 = tmp_path / "generic-full"
    rec = recover.export({"layout": "generic", "dir": str(out2), "reference": str(tiny_bf16)}, full, progress=False)
    assert rec["generic"]["restored_from"] == "full state"
    assert files(out2) == files(run["direct"])


def test_v4_serving_gives_the_same_bytes_from_every_saved_form(run, tiny_src, tiny_bf16, tmp_path):
    """Snapshot, cheap state, full state, a restored model's amax and the live model's amax: one export.
    Re-quantizing (cast_mxfp4_to_nvfp4 false), where every expert's bytes depend on its weight amax as
    well as its input amax: carrying, the default, keeps the released weights whatever the weight amax
    say, so a saved form that lost or changed them would still match (item 19 of issue 17)."""
    from quantbook.calibrate import hf_model

    e = {"layout": "v4-serving", "source": str(tiny_src), "reference": str(tiny_bf16), "cast_mxfp4_to_nvfp4": False,
         "fidelity": {"enabled": False}}  # bytes compared here; the gate has its own tests (test_fidelity.py)
    outs = {}
    rec = recover.export({**e, "dir": str(tmp_path / "snapshot")}, run["dir"], progress=False)
    assert rec["verdict"] == "pass", rec["verify_summary"]
    assert rec["amax_origin"].endswith("amax.safetensors")
    outs["snapshot"] = tmp_path / "snapshot"

    no_snap = tmp_path / "no-snapshot-run"
    shutil.copytree(run["dir"], no_snap)
    (no_snap / "amax.safetensors").unlink()
    rec = recover.export({**e, "dir": str(tmp_path / "state")}, no_snap, progress=False)
    assert rec["amax_origin"].endswith(state.QUANTIZER_TENSORS) and rec["verdict"] == "pass"
    outs["state"] = tmp_path / "state"

    full = _full_state_only(run, tmp_path / "full-run")
    rec = recover.export({**e, "dir": str(tmp_path / "full")}, full, progress=False)
    assert rec["amax_origin"].endswith(state.FULL_STATE) and rec["verdict"] == "pass"
    outs["full"] = tmp_path / "full"

    model, _, _ = hf_model.restore(run["dir"])
    write_serving_layout(tiny_src, model_snapshot(model), tmp_path / "restored", cast_mxfp4_to_nvfp4=False,
                         progress=False)
    outs["restored"] = tmp_path / "restored"
    write_serving_layout(tiny_src, run["live"], tmp_path / "live", cast_mxfp4_to_nvfp4=False, progress=False)
    outs["live"] = tmp_path / "live"

    want = files(outs["live"], exclude=(LAYOUT_MANIFEST,))
    for name, d in outs.items():
        assert files(d, exclude=(LAYOUT_MANIFEST,)) == want, name
    # the comparison sees weight amax: one of them halved gives other bytes
    key = next(k for k in sorted(run["live"]) if "experts" in k and "weight_quantizer" in k and k.endswith("._amax"))
    changed = {**run["live"], key: run["live"][key] / 2}
    write_serving_layout(tiny_src, changed, tmp_path / "changed", cast_mxfp4_to_nvfp4=False, progress=False)
    assert files(tmp_path / "changed", exclude=(LAYOUT_MANIFEST,)) != want


def test_validate_only_checks_the_state_without_a_model(run, tiny_src, tiny_bf16, tmp_path):
    from quantbook.amax import load_snapshot, save_snapshot

    v = recover.validate_state(run["dir"], model_path=tiny_bf16, source=tiny_src)
    assert v["verdict"] == "ok", recover.format_validation(v)
    assert {r["check"] for r in v["checks"]} >= {"state files", "versions", "model", "quantizer count",
                                                 "amax anomalies", "v4-serving from these amax"}
    # a damaged state file: the generic export (which restores it) is refused
    bad = tmp_path / "damaged"
    shutil.copytree(run["dir"], bad)
    qt = bad / state.STATE_DIR / state.QUANTIZER_TENSORS
    raw = bytearray(qt.read_bytes())
    raw[-1] ^= 0xFF
    qt.write_bytes(bytes(raw))
    v = recover.validate_state(bad, model_path=tiny_bf16, layout="generic")
    assert v["verdict"] == "refused" and any(r["check"] == "state files" and r["status"] == "fail"
                                             for r in v["checks"])
    # another model: config differs
    other = tmp_path / "other-bf16"
    shutil.copytree(tiny_bf16, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    v = recover.validate_state(run["dir"], model_path=other, source=tiny_src)
    assert v["verdict"] == "refused"
    assert "config_sha256" in next(r["detail"] for r in v["checks"] if r["check"] == "model")
    # amax anomalies are counted and named, and the export's fill is announced
    anomalous = tmp_path / "anomalous"
    shutil.copytree(run["dir"], anomalous)
    snap, meta = load_snapshot(anomalous / "amax.safetensors")
    snap["model.layers.1.mlp.experts.down_proj_input_quantizer._amax"] *= float("nan")
    snap["model.layers.2.mlp.experts.gate_up_proj_weight_quantizers.3._amax"] *= 0
    save_snapshot(anomalous / "amax.safetensors", snap, meta)
    v = recover.validate_state(anomalous, model_path=tiny_bf16, source=tiny_src)
    rows = {r["check"]: r for r in v["checks"]}
    assert v["verdict"] == "ok" and rows["amax anomalies"]["status"] == "warn"
    assert "1 nan (e.g. model.layers.1.mlp.experts.down_proj_input_quantizer)" in rows["amax anomalies"]["detail"]
    assert "1 zero" in rows["amax anomalies"]["detail"]
    assert rows["v4-serving from these amax"]["status"] == "warn"
    assert "8 input amax and 2 weight amax to fill" in rows["v4-serving from these amax"]["detail"]
    # nothing saved at all
    empty = tmp_path / "empty"
    empty.mkdir()
    v = recover.validate_state(empty, model_path=tiny_bf16, source=tiny_src)
    assert v["verdict"] == "refused"


def _params(tmp_path: Path, run, tiny_src, tiny_bf16, out: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({
        "name": "tiny-recover", "quantize": run["q"],
        "export": {"layout": "v4-serving", "source": str(tiny_src), "dir": str(out), "reference": str(tiny_bf16),
                   "cast_mxfp4_to_nvfp4": False,
                   # random weights: the gate's numbers are recorded, not gated (4 held-out samples: read by no check)
                   "fidelity": {"gate": False, "samples": 4}}}))
    return p


def test_cli_export_only_and_validate_only(run, tiny_src, tiny_bf16, tmp_path, capsys):
    from quantbook.cli import main

    out = tmp_path / "export"
    params = _params(tmp_path, run, tiny_src, tiny_bf16, out)
    run_dir = tmp_path / "runs" / "calibrated"
    shutil.copytree(run["dir"], run_dir)
    assert main(["export", str(params), "--run-dir", str(run_dir), "--validate-only"]) == 0
    assert "OK" in capsys.readouterr().out
    assert not out.exists()  # validate-only writes nothing
    # the predecessor's modes, on the quantize subcommand: the run named by --run-id
    q = ["quantize", str(params), "--runs-dir", str(tmp_path / "runs"), "--run-id", "calibrated"]
    assert main(q + ["--validate-only"]) == 0
    assert "calibrated state of" in capsys.readouterr().out and not out.exists()
    assert main(q + ["--export-only"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads((run_dir / "verify.json").read_text())["verdict"] == "pass"
    assert (run_dir / "verify.md").read_text().startswith("# verify")
    assert main(["export", str(params), "--run-dir", str(run_dir)]) == 0  # rerun: every shard skipped
    capsys.readouterr()
    rec = json.loads((run_dir / recover.RECORD).read_text())
    assert rec["layout_report"]["shards_skipped"] == 7 and rec["layout_report"]["shards_written"] == 0
    assert main(["export", str(params), "--run-dir", str(tmp_path / "nothing"), "--validate-only"]) == 1
    assert main(["export", str(params), "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "no amax.safetensors or state/ in the run directory" in capsys.readouterr().err
    assert not (tmp_path / "nothing" / recover.RECORD).exists()  # refused before any work: no stray record


def test_notebook_03_in_the_chain(tiny_chain):
    """Step 03 of the session's chain run: the executed notebook, its records and its verdict."""
    import nbformat

    run_dir = tiny_chain["run_dir"]
    nb = nbformat.read(run_dir / "03_recover_export.ipynb", as_version=4)
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert "verdict: pass" in text and "**PASS** (v4-serving)" in text
    assert "calibrated state of" in text and "OK" in text
    rec = json.loads((run_dir / recover.RECORD).read_text())
    assert rec["status"] == "done" and rec["verdict"] == "pass"
    assert json.loads((run_dir / "verify.json").read_text())["verdict"] == "pass"
