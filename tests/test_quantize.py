"""Step 02, the embedded modelopt driver end to end on the tiny V4 (CPU), and its refusals."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

import requires
from quantize_support import tiny_q, write_calib

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return write_calib(tmp_path_factory.mktemp("calib") / "text.jsonl")


@pytest.fixture(scope="module")
def experts_only_run(tiny_chain):
    """Step 02 of the session's chain run (params/tiny.yaml: nvfp4_experts_only, the modelopt driver)."""
    return tiny_chain["q"], tiny_chain["run_dir"], tiny_chain["generic"], tiny_chain["record"]


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_end_to_end_records_state_snapshot_and_export(experts_only_run, tiny_chain):
    from quantbook import amax
    from quantbook.calibrate import patches, state

    q, run_dir, export, rec = experts_only_run
    assert rec["status"] == "done"
    on_disk = json.loads((run_dir / "quantize.json").read_text())
    assert on_disk["status"] == "done" and on_disk["driver"] == "modelopt"
    assert on_disk["patches"] == list(patches.PATCHES)
    assert not Path(str(export) + ".partial").exists()

    # export: every routed expert projection has all four NVFP4 tensors with positive finite scalars
    t = _tensors(export / "model.safetensors")
    tiny_bf16 = tiny_chain["bf16"]
    cfg = json.loads((tiny_bf16 / "config.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        for j in range(cfg["n_routed_experts"]):
            for w in ("w1", "w2", "w3"):
                p = f"model.layers.{i}.ffn.experts.{j}.{w}"
                assert t[p + ".weight"].dtype.itemsize == 1
                for s in ("input_scale", "weight_scale_2"):
                    v = float(t[f"{p}.{s}"])
                    assert math.isfinite(v) and v > 0, (p, s, v)
            assert t[f"model.layers.{i}.ffn.experts.{j}.w1.weight_scale_2"].equal(
                t[f"model.layers.{i}.ffn.experts.{j}.w3.weight_scale_2"])
    assert any(k.startswith("mtp.0.") for k in t), "MTP tensors missing from the export"
    hq = json.loads((export / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and "mtp*" in hq["exclude_modules"]
    assert (export / ".quant_summary.txt").read_bytes() == (run_dir / ".quant_summary.txt").read_bytes()
    assert (export / "tokenizer.json").read_bytes() == (tiny_bf16 / "tokenizer.json").read_bytes()
    assert (export / "generation_config.json").is_file()

    # snapshot: raw amax of every calibrated quantizer, on CPU, fp32
    snap, meta = amax.load_snapshot(run_dir / amax.SNAPSHOT)
    names = {amax.split_key(k)[0] for k in snap}
    assert len(snap) == rec["post_calibration"]["snapshot"]["tensors"] > 0
    assert any(n.endswith("gate_up_proj_input_quantizer") for n in names)
    assert sum(n.endswith("down_proj_weight_quantizers.3") for n in names) == cfg["num_hidden_layers"]
    assert meta["quantizers"] == rec["post_calibration"]["quantizers"]

    # expert token counts: every layer routes positions x top_k tokens in all
    counts = json.loads((run_dir / amax.TOKEN_COUNTS).read_text())
    assert sorted(counts) == [f"layers.{i}" for i in range(cfg["num_hidden_layers"])]
    for v in counts.values():
        assert len(v) == cfg["n_routed_experts"]
        assert sum(v) == rec["calibration"]["positions"] * cfg["num_experts_per_tok"]

    # cheap state: megabytes, manifest names the model and the calibration
    man = state.load_manifest(run_dir / state.STATE_DIR)
    assert man["model"]["config_sha256"] == hashlib.sha256((tiny_bf16 / "config.json").read_bytes()).hexdigest()
    assert man["model"]["weights_from_step01_manifest"] is True
    assert man["calibration"]["samples"] == 15 and man["calibration"]["tokens"] > 0
    assert man["quantizers"] == rec["post_calibration"]["quantizers"]
    assert man["versions"]["nvidia-modelopt"] and man["params"]["hf_ptq"]["qformat"] == "nvfp4_experts_only"
    assert rec["post_calibration"]["state"]["bytes"] < 2**20
    assert not (run_dir / state.STATE_DIR / state.FULL_STATE).exists()
    # 16 lines drawn in file order, the empty one dropped (hf_ptq counts it against calib_size)
    assert rec["calibration"]["samples"] == 15

    # memory timeline, phases recorded
    mem = (run_dir / "memory.csv").read_text()
    for phase in ("load", "data", "calibrate", "snapshot", "save_state", "export"):
        assert f",{phase}," in mem


def test_nvfp4_every_linear_replaces_previous_export(tiny_nvfp4):
    """Recipe `nvfp4` quantizes attention too; a rerun into the same export path swaps it in whole."""
    export, marker, rec = tiny_nvfp4["export"], tiny_nvfp4["marker"], tiny_nvfp4["record"]
    assert rec["status"] == "done"
    assert not marker.exists() and not Path(str(export) + ".previous").exists()
    t = _tensors(export / "model.safetensors")
    for proj in ("wq_a", "wq_b", "wkv", "wo_b"):  # attention exported NVFP4 (wo_a stays BF16 in modelopt's export)
        assert f"model.layers.0.attn.{proj}.input_scale" in t
        assert t[f"model.layers.0.attn.{proj}.weight"].dtype.itemsize == 1
    assert json.loads((export / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"


def test_kv_cache_guard_refuses_a_cache_in_calibration(tiny_bf16):
    import torch

    from quantbook import errors
    from quantbook.calibrate import hf_model, settings

    s = settings.modelopt_settings(settings.normalize({"hf_ptq": {"pyt_ckpt_path": str(tiny_bf16), "device": "cpu"}}))
    model = hf_model.load_model(s)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} >= {torch.bfloat16}
    ids = torch.tensor([[0, 5, 6, 7]])
    with hf_model.kv_cache_off_guard(model):
        model(ids, use_cache=False)  # the calibration forward: no cache, passes
        with pytest.raises(errors.QuantizeError, match="KV cache"):
            model(ids, use_cache=True)
    model(ids, use_cache=True)  # guard removed


def test_settings_refused_before_loading(tiny_bf16, calib_file, tmp_path):
    from quantbook import calibrate, errors
    from quantbook.calibrate import settings
    from quantbook.errors import ParamsError

    with pytest.raises(ParamsError, match="unknown key"):
        settings.normalize({"driverr": "modelopt"})
    with pytest.raises(ParamsError, match="only by the hf_ptq driver"):
        settings.modelopt_settings({"hf_ptq": {"pyt_ckpt_path": "x", "use_fsdp2": True}})
    with pytest.raises(ParamsError, match="unknown hf_ptq flag"):
        settings.modelopt_settings({"hf_ptq": {"pyt_ckpt_path": "x", "calib": 128}})
    q = tiny_q(tiny_bf16, tmp_path / "e", tmp_path / "missing.jsonl")
    with pytest.raises(errors.QuantizeError, match="calib-data"):
        calibrate.preflight(q, tmp_path / "run")
    with pytest.raises(ParamsError, match="low_memory_mode"):
        calibrate.preflight(tiny_q(tiny_bf16, tmp_path / "e", calib_file, hf_ptq={"low_memory_mode": True}),
                            tmp_path / "run")
    with pytest.raises(ParamsError, match="batch_size"):
        calibrate.preflight(tiny_q(tiny_bf16, tmp_path / "e", calib_file, hf_ptq={"batch_size": 0}), tmp_path / "run")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(errors.QuantizeError, match="CUDA"):
            calibrate.preflight(tiny_q(tiny_bf16, tmp_path / "e", calib_file, hf_ptq={"device": "cuda"}),
                                tmp_path / "run")
    # a failed run leaves a failed record
    bad = tiny_q(tiny_bf16, tmp_path / "e", calib_file, hf_ptq={"qformat": "no_such_preset"})
    with pytest.raises(errors.QuantizeError, match="no_such_preset"):
        calibrate.quantize(bad, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "quantize.json").read_text())
    assert rec["status"] == "failed" and "no_such_preset" in rec["error"]


def test_params_tiny_quantize_section():
    """params/tiny.yaml's quantize section: anchors resolved, accepted by the driver and the checks."""
    from quantbook.calibrate import settings
    from quantbook.calibrate.checks import check_quantize_settings
    from quantbook.params import load_params

    root = Path(__file__).resolve().parents[1]
    p = load_params(root / "params" / "tiny.yaml")
    q = settings.normalize(p["quantize"])
    assert q["hf_ptq"]["pyt_ckpt_path"] == p["dequant"]["destination"]
    s = settings.modelopt_settings(q)
    assert s["qformat"] == "nvfp4_experts_only" and s["device"] == "cpu" and s["batch_size"] > 0
    check_quantize_settings(q, None)


def test_no_generic_export_by_default(tiny_bf16, calib_file, tmp_path):
    """`export_generic` off (the default): calibration, snapshot and state as always; no export written or
    counted against the disk; the record, the notebook's tables and its verify step say so."""
    from quantbook import amax, calibrate
    from quantbook.calibrate import report

    q = tiny_q(tiny_bf16, tmp_path / "generic", calib_file)
    facts = calibrate.preflight(q, tmp_path / "run")
    assert list(facts["resources"]["disk"]) == ["run_dir"] and facts["resources"]["export_bytes"] == 0
    rec = calibrate.quantize(q, tmp_path / "run", facts=facts)
    assert rec["status"] == "done" and rec["export"]["written"] is False
    assert "export_generic is false" in rec["export"]["why"] and "export" not in rec["timings"]
    assert not (tmp_path / "generic").exists() and not list(tmp_path.glob("generic*"))
    run_dir = tmp_path / "run"
    assert (run_dir / amax.SNAPSHOT).is_file() and (run_dir / ".quant_summary.txt").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith("generic-export")]
    assert report.verify_generic_export(rec, run_dir, reference=tiny_bf16) is None
    assert not (run_dir / "verify-02.json").exists()
    outputs = report.outputs_table(run_dir, rec)
    assert outputs.loc["export (unified HF, NVFP4)", "path"] == "not written (quantize.export_generic: false)"
    summary = report.preflight_summary(facts, calibrate.settings.normalize(q), run_dir)["value"]
    assert summary["generic export (estimate)"] == "not written (quantize.export_generic: false)"

