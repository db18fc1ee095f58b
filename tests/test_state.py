"""The cheap calibrated state: restore -> export gives the same bytes; refusals; layerwise signature."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest

import requires
from quantize_support import assert_same_files

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)


@pytest.fixture(scope="module")
def run(tiny_chain):
    """Step 02 of the session's chain run: (quantize section, run directory, its modelopt export)."""
    return tiny_chain["q"], tiny_chain["run_dir"], tiny_chain["generic"]


def test_restore_then_export_is_byte_identical(run, tmp_path):
    """state/ (modelopt_state + quantizer tensors, ~0.1 MB) rebuilds the calibrated model: every
    export file, the quantization summary included, has the same bytes as the direct export."""
    import modelopt.torch.quantization as mtq

    from quantbook.calibrate import hf_model, settings

    q, run_dir, export = run
    model, tok, manifest = hf_model.restore(run_dir)
    out = tmp_path / "restored"
    out.mkdir()
    mtq.print_quant_summary(model, str(out))
    s = settings.modelopt_settings(settings.normalize(manifest["params"]))
    hf_model.export_model(model, tok, s, out)
    names = assert_same_files(export, out)
    assert {"model.safetensors", "config.json", "hf_quant_config.json", ".quant_summary.txt",
            "tokenizer.json"} <= set(names)


def test_snapshot_equals_state_tensors(run):
    from safetensors.torch import load_file

    from quantbook import amax
    from quantbook.calibrate import state

    _, run_dir, _ = run
    snap, _ = amax.load_snapshot(run_dir / amax.SNAPSHOT)
    st = load_file(str(run_dir / state.STATE_DIR / state.QUANTIZER_TENSORS))
    assert snap and set(snap) <= set(st)
    for k, v in snap.items():
        assert v.equal(st[k].float()), k


def test_state_refused_when_incomplete_corrupt_or_foreign(run, tmp_path, tiny_bf16):
    from quantbook.calibrate import state

    _, run_dir, _ = run
    sd = tmp_path / "state"
    shutil.copytree(run_dir / state.STATE_DIR, sd)
    man = state.load_manifest(sd)
    assert set(man["files"]) == {state.QUANTIZER_TENSORS, state.MODELOPT_STATE}

    blob = bytearray((sd / state.QUANTIZER_TENSORS).read_bytes())
    blob[-3] ^= 0xFF
    (sd / state.QUANTIZER_TENSORS).write_bytes(bytes(blob))
    with pytest.raises(state.StateError, match="sha256"):
        state.load_manifest(sd)
    (sd / state.MANIFEST).unlink()
    with pytest.raises(state.StateError, match="interrupted"):
        state.load_manifest(sd)

    other = tmp_path / "other-model"
    shutil.copytree(tiny_bf16, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(state.StateError, match="config_sha256"):
        state.check_model(man, other)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state.check_model(man, other, force=True)
    assert any("FORCED" in str(x.message) for x in w)
    state.check_model(man, tiny_bf16)  # the same model passes


def test_full_state_behind_a_flag(run, tmp_path):
    """save_full: also mto.save's full state dict, listed and hashed in the manifest."""
    import modelopt.torch.opt as mto

    from quantbook.calibrate import hf_model, settings, state

    q, run_dir, _ = run
    model, _, manifest = hf_model.restore(run_dir)
    saved = state.save_cheap_state(model, tmp_path / "s", q=manifest["params"], save_full=True)
    man = state.load_manifest(tmp_path / "s")
    assert saved["full_state"] and state.FULL_STATE in man["files"]
    assert man["files"][state.FULL_STATE]["size"] > 10 * man["files"][state.QUANTIZER_TENSORS]["size"]
    fresh = hf_model.load_model(settings.modelopt_settings(settings.normalize(q)))
    fresh = mto.restore(fresh, tmp_path / "s" / state.FULL_STATE)
    a, b = state.quantizer_tensors(model), state.quantizer_tensors(fresh)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # saving the cheap state again replaces the whole directory: no stale full state left
    state.save_cheap_state(model, tmp_path / "s", q=manifest["params"])
    assert not (tmp_path / "s" / state.FULL_STATE).exists()
    assert state.FULL_STATE not in state.load_manifest(tmp_path / "s")["files"]


# -- layerwise checkpoint signature -------------------------------------------------------------

def _sig(model_path, **over):
    from quantbook.calibrate import state

    settings = {"qformat": "nvfp4_experts_only", "kv_cache_qformat": "fp8_cast", "dataset": "d.jsonl",
                "calib_size": 16, "calib_seq": 48, "batch_size": 4, **over.pop("settings", {})}
    calib = {"samples": 15, "tokens": 700, "positions": 720, "sha256": "ab" * 32, **over.pop("calib", {})}
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": {
        "method": "max", "layerwise": {"enable": True, "checkpoint_dir": over.pop("ckpt", "/a")}}}
    return state.layerwise_signature(model_path=model_path, settings=settings, quant_cfg=cfg, calib=calib,
                                     save_every=over.pop("save_every", 1))


def _progress(run_dir, last, total=4):
    from quantbook import atomic
    from quantbook.calibrate import state

    ckpt = state.layerwise_paths(run_dir)["ckpt"]
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "layer_0000").mkdir(exist_ok=True)
    # modelopt's own progress file (utils/layerwise_calib.py _write_manifest)
    atomic.write_json(ckpt / "manifest.json", {"last_completed_layer": last, "num_layers": total,
                                               "save_every": 1, "calib_mutates_weights": False})


def test_layerwise_signature_refuses_stale_and_foreign(tiny_bf16, tmp_path):
    from quantbook.calibrate import state

    run_dir = tmp_path / "run"
    sig = _sig(tiny_bf16)
    assert state.check_layerwise_dir(run_dir, sig) == {"resume": False, "start_layer": 0, "num_layers": None}
    _progress(run_dir, last=1)
    assert state.check_layerwise_dir(run_dir, sig) == {"resume": True, "start_layer": 2, "num_layers": 4}
    # the checkpoint dir's own path does not matter (the run dir may move)
    assert state.check_layerwise_dir(run_dir, _sig(tiny_bf16, ckpt="/elsewhere"))["resume"]
    for changed, field in ((_sig(tiny_bf16, calib={"sha256": "cd" * 32}), "calibration.sha256"),
                           (_sig(tiny_bf16, settings={"calib_seq": 64}), "params.calib_seq"),
                           (_sig(tiny_bf16, settings={"qformat": "nvfp4"}), "params.qformat"),
                           (_sig(tiny_bf16, save_every=2), "save_every")):
        with pytest.raises(state.StaleCheckpoint, match=field.replace(".", r"\.")):
            state.check_layerwise_dir(run_dir, changed)
    # another model with the same layer count
    other = tmp_path / "other"
    shutil.copytree(tiny_bf16, other)
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    with pytest.raises(state.StaleCheckpoint, match="config_sha256"):
        state.check_layerwise_dir(run_dir, _sig(other))
    # versions are part of it
    bad = _sig(tiny_bf16)
    bad["versions"]["nvidia-modelopt"] = "0.46.0"
    with pytest.raises(state.StaleCheckpoint, match="nvidia-modelopt"):
        state.check_layerwise_dir(run_dir, bad)
    # progress nobody signed (another tool, or a hand-copied directory)
    state.layerwise_paths(run_dir)["signature"].unlink()
    with pytest.raises(state.StaleCheckpoint, match="no quantbook-signature"):
        state.check_layerwise_dir(run_dir, sig)


def test_layerwise_finished_dir_recalibrates(tiny_bf16, tmp_path):
    from quantbook.calibrate import state

    run_dir = tmp_path / "run"
    sig = _sig(tiny_bf16)
    state.check_layerwise_dir(run_dir, sig)
    _progress(run_dir, last=3)
    plan = state.check_layerwise_dir(run_dir, sig)
    assert plan["resume"] is False and plan.get("recalibrating_finished_dir")
    assert not state.layerwise_paths(run_dir)["ckpt"].exists()


def test_model_identity_uses_step01_hashes(tiny_bf16, tmp_path):
    from quantbook.calibrate import state

    a = state.model_identity(tiny_bf16)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bf16, copy)  # same bytes elsewhere: same identity (mtimes do not matter)
    for shard in copy.glob("*.safetensors"):
        os.utime(shard, ns=(1, 1))  # copytree keeps mtimes; a rewrite of the same bytes would not
    b = state.model_identity(copy)
    assert a["weights_id"] == b["weights_id"] and a["config_sha256"] == b["config_sha256"]
    assert a["weights_from_step01_manifest"]
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes() + b"\0")  # a changed shard size no longer matches step 01's record
    assert state.model_identity(copy)["weights_id"] != a["weights_id"]
