"""Layerwise calibration: SIGKILL mid-calibration, refuse a stale resume, resume to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import requires
from quantize_support import assert_same_files, tiny_q, write_calib

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)


def _params_file(path: Path, q: dict) -> Path:
    path.write_text(yaml.safe_dump({"name": "lw", "quantize": q}))
    return path


def _kill_after_first_layer(params: Path, runs: Path, run_id: str, timeout: float = 240.0) -> dict:
    """Run `quantbook quantize` in a subprocess; SIGKILL it once a layer is committed."""
    ckpt_manifest = runs / run_id / "layerwise" / "ckpt" / "manifest.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "quantbook.cli", "quantize", str(params), "--run-id", run_id,
                             "--runs-dir", str(runs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if ckpt_manifest.exists():
                try:
                    progress = json.loads(ckpt_manifest.read_text())
                except json.JSONDecodeError:
                    progress = None
                if progress is not None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return json.loads(ckpt_manifest.read_text())
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace")
                raise AssertionError(f"quantize ended (rc {proc.returncode}) before a layer was committed:\n{out[-3000:]}")
            time.sleep(0.02)
        raise AssertionError("no layer committed in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_refuse_stale_resume_identical(tiny_bf16, tmp_path):
    from quantbook import amax, calibrate
    from quantbook.calibrate import state

    calib = write_calib(tmp_path / "calib.jsonl")

    # the reference: an uninterrupted layerwise run
    ref_q = tiny_q(tiny_bf16, tmp_path / "export-ref", calib, layerwise=True, export_generic=True)
    ref = calibrate.quantize(ref_q, tmp_path / "runs" / "ref")
    assert ref["status"] == "done" and ref["layerwise"]["resume"] is False

    # the same settings, killed with SIGKILL after the first committed layer
    q = tiny_q(tiny_bf16, tmp_path / "export", calib, layerwise=True, export_generic=True)
    params = _params_file(tmp_path / "lw.yaml", q)
    progress = _kill_after_first_layer(params, tmp_path / "runs", "killed")
    last, total = progress["last_completed_layer"], progress["num_layers"]
    assert 0 <= last < total - 1, f"killed too late to test a resume: {progress}"
    run_dir = tmp_path / "runs" / "killed"
    assert json.loads((run_dir / "quantize.json").read_text())["status"] == "running"  # the kill left it so
    assert not (tmp_path / "export").exists()

    # other calibration data with the same layer count: refused, the checkpoint left intact
    stale = tiny_q(tiny_bf16, tmp_path / "export", calib, layerwise=True, export_generic=True,
                   hf_ptq={"calib_size": 12})
    with pytest.raises(state.StaleCheckpoint, match="calibration"):
        calibrate.quantize(stale, run_dir)
    assert json.loads((run_dir / "layerwise" / "ckpt" / "manifest.json").read_text()) == progress

    # the same settings: resumes after the last committed layer and ends with the same bytes
    rec = calibrate.quantize(q, run_dir)
    assert rec["status"] == "done"
    assert rec["layerwise"]["resume"] is True and rec["layerwise"]["start_layer"] == last + 1
    assert_same_files(tmp_path / "export-ref", tmp_path / "export")
    # the per-expert token counts of the layers done before the kill survived it
    assert (run_dir / amax.TOKEN_COUNTS).read_bytes() == (tmp_path / "runs" / "ref" / amax.TOKEN_COUNTS).read_bytes()
    a, _ = amax.load_snapshot(run_dir / amax.SNAPSHOT)
    b, _ = amax.load_snapshot(tmp_path / "runs" / "ref" / amax.SNAPSHOT)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    st = state.QUANTIZER_TENSORS
    assert (run_dir / "state" / st).read_bytes() == (tmp_path / "runs" / "ref" / "state" / st).read_bytes()
