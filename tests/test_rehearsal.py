"""`quantbook run PARAMS --rehearse` and the rule that a full-size run needs one.

The done criterion: params/v4_pro_b200.yaml pointed at a sparse full-size V4 Pro release rehearses
on CPU in minutes (the real notebooks, the real driver, the tiny release built from the release's
own config.json). The gate's tests use step notebooks that keep the real ones' parameters cells
(so the real params are accepted) and replace what follows with a line of their own, on a sparse
full-size Flash release (faster to validate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from pro_support import calib_file, pro_params, write_params
from quantbook.errors import RunError, StepFailed
from quantbook.params import load_params
from quantbook.records import rehearsal
from quantbook.records.runs import load_manifest, rehearse, run_chain
from quantbook.release.format import FLASH_CONFIG, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pro_rehearsal(pro_release, tmp_path_factory):
    """The README's rehearsal command on params/v4_pro_b200.yaml pointed at the sparse Pro release
    (outputs under a temporary directory), through the CLI, on this machine's CPU."""
    from types import SimpleNamespace

    from conftest import shared
    from quantize_support import write_calib

    def build(base):
        params = write_params(pro_params(base, pro_release, driver="streaming"), base / "v4_pro_b200.yaml")
        calib = write_calib(base / "calib" / "english.jsonl")
        env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        r = subprocess.run([sys.executable, "-m", "quantbook.cli", "run", str(params), "--rehearse", "--runs-dir",
                            str(base / "runs"), "--calib-file", str(calib), "--quiet"],
                           capture_output=True, text=True, env=env, timeout=1200)
        return {"params": params, "runs": base / "runs", "calib": calib, "run_dir": base / "runs" / "v4_pro_b200-rehearsal",
                "result": {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}}

    v = shared(tmp_path_factory, "pro_rehearsal", build)  # once for the run, whichever xdist worker asks first
    return {**{k: Path(v[k]) for k in ("params", "runs", "calib", "run_dir")}, "result": SimpleNamespace(**v["result"])}


def test_rehearsal_of_v4_pro_b200_on_a_sparse_full_size_release(pro_rehearsal, pro_release):
    r, rd = pro_rehearsal["result"], pro_rehearsal["run_dir"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "running on CPU: this machine has no CUDA GPU" in r.stdout
    # this CPU machine cannot run the real params: the rehearsal says so, with the preflight's reasons (item 6)
    assert "the real run cannot start on this machine" in r.stdout and "may start" not in r.stdout
    assert "quantize.hf_ptq.device: 'cuda', but no GPU is visible" in r.stdout
    m = load_manifest(rd)
    # as the real run: no step 01 (driver streaming reads the release, the verifier compares with it)
    assert m["status"] == "complete" and list(m["steps"]) == ["02_quantize", "03_recover_export", "04_inspect_amax"]
    assert m["invocations"][-1]["not_needed"] == ["01_dequant"]
    of = m["rehearsal_of"]
    assert of["params_name"] == "v4_pro_b200" and of["device"] == "cpu" and of["release"] == str(pro_release)
    changes = {c["key"]: c for c in of["changes"]}
    assert changes["quantize.hf_ptq.device"]["to"] == "cpu" and "no CUDA GPU" in changes["quantize.hf_ptq.device"]["why"]
    assert changes["quantize.hf_ptq.dataset"]["from"] == ["cnn_dailymail", "nemotron-post-training-dataset-v2"]
    assert changes["quantize.hf_ptq.calib_size"]["to"] == 16 and changes["quantize.hf_ptq.calib_seq"]["to"] == 64
    assert "quantize.hf_ptq.batch_size" not in changes  # kept: 16 samples make one batch of 16
    assert all(c["to"] is None or str(c["to"]).startswith(str(rd.resolve())) or c["key"].endswith(
        ("device", "dataset", "calib_size", "calib_seq", "fidelity.gate", "fidelity.samples", "fidelity.seq"))
        for c in of["changes"])
    # the tiny release: the release's own config, every key kept, dimensions shrunk
    tiny = load_config(of["tiny"]["dir"])
    real = load_config(pro_release)
    assert set(tiny) == set(real) and tiny["quantization_config"] == real["quantization_config"]
    assert (tiny["num_hidden_layers"], tiny["n_routed_experts"], tiny["hidden_size"]) == (4, 8, 256)
    # the same params otherwise: what the digest covers is equal, and the run used the real driver and recipe
    rparams = load_params(rd / "params.yaml")
    assert rehearsal.kept(rparams) == rehearsal.kept(load_params(pro_rehearsal["params"]))
    q = json.loads((rd / "quantize.json").read_text())
    assert q["status"] == "done" and q["driver"] == "streaming" and q["patches"] == []  # the file's driver
    assert q["streaming"]["blocks"][-1] == "mtp.0" and q["post_calibration"]["state"] is None
    assert q["params"]["hf_ptq"]["qformat"] == "nvfp4_experts_only" and q["params"]["hf_ptq"]["use_seq_device_map"]
    assert q["calibration"]["samples"] > 0 and q["batch_size"] == 16
    export = json.loads((rd / "export.json").read_text())
    assert export["verdict"] == "pass" and export["settings"]["layout"] == "v4-serving"
    # the real run's gate finds it by the params digest
    gate = rehearsal.gate(load_params(pro_rehearsal["params"]), pro_rehearsal["runs"])
    assert gate["passed"]["run_id"] == "v4_pro_b200-rehearsal" and gate["digest"] == of["digest"]


# ----------------------------------------------------------------------------- the gate, with quick notebooks


def quick_notebooks(d: Path, cells: dict[str, str] | None = None) -> Path:
    """The real step notebooks cut after their parameters cell, each followed by one cell
    (`cells[step]`, default a print)."""
    d.mkdir(parents=True, exist_ok=True)
    for nb_path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(str(nb_path), as_version=4)
        i = next(k for k, c in enumerate(nb.cells) if "parameters" in (c.metadata.get("tags") or []))
        nb.cells = nb.cells[: i + 1] + [nbformat.v4.new_code_cell((cells or {}).get(nb_path.name[:2],
                                                                                      "print('step ran')"))]
        nbformat.write(nb, str(d / nb_path.name))
    return d


@pytest.fixture(scope="module")
def flash_release(tmp_path_factory):
    """V4 Flash's release as sparse files. Read-only: planned once for the module (conftest's
    `read_only_release`), not by each rehearsal and gate of its tests again."""
    from conftest import READ_ONLY, read_only_release
    from quantbook.release.sparse import write_sparse_release

    release = read_only_release(write_sparse_release(FLASH_CONFIG,
                                                     tmp_path_factory.mktemp("flash") / "DeepSeek-V4-Flash-FP8"))
    yield release
    READ_ONLY.pop(release.resolve(), None)


def flash_params(tmp_path: Path, release: Path) -> Path:
    p = pro_params(tmp_path, release)
    p["name"] = "flash_node"
    return write_params(p, tmp_path / "flash_node.yaml")


# modelopt 0.47 has no mtq.KV_QUANT_CFG_CHOICES: the predecessor's runs 4 and 5 died on this import
RUN4 = "import modelopt.torch.quantization as mtq\nchoices = mtq.KV_QUANT_CFG_CHOICES"


def test_run4_5_import_error_stops_the_rehearsal_then_the_real_run(flash_release, tmp_path):
    """Runs 4 and 5 died importing a name that does not exist, once because the fix was not synced to
    the node. A rehearsal runs the same code in minutes and fails there; the real run is refused
    until a rehearsal of THIS code passes; a later change to the code needs a new rehearsal."""
    params, runs = flash_params(tmp_path, flash_release), tmp_path / "runs"
    calib = calib_file(tmp_path / "calib.jsonl")
    broken = quick_notebooks(tmp_path / "nbs-broken", {"02": RUN4})
    with pytest.raises(StepFailed, match="KV_QUANT_CFG_CHOICES"):
        rehearse(params, runs_dir=runs, notebooks_dir=broken, calib_file=calib, progress=False, echo=lambda s: None)
    failed = load_manifest(runs / "flash_node-rehearsal")
    assert failed["status"] == "failed" and "KV_QUANT_CFG_CHOICES" in failed["steps"]["02_quantize"]["error"]["evalue"]
    with pytest.raises(RunError, match=r"(?s)no rehearsal of these params has passed.*--rehearse.*--no-rehearsal"
                                       r".*flash_node-rehearsal \(failed"):
        run_chain(params, runs_dir=runs, notebooks_dir=broken, progress=False, echo=lambda s: None)
    assert not (runs / "flash_node").exists()  # refused before anything was written

    fixed = quick_notebooks(tmp_path / "nbs")  # the fix, synced
    m = rehearse(params, runs_dir=runs, notebooks_dir=fixed, calib_file=calib, progress=False, echo=lambda s: None)
    assert m["status"] == "complete" and m["rehearsal_of"]["digest"] != failed["rehearsal_of"]["digest"]
    real = run_chain(params, runs_dir=runs, notebooks_dir=fixed, progress=False, echo=lambda s: None)
    assert real["status"] == "complete"
    assert real["rehearsal"]["passed"]["run_id"] == "flash_node-rehearsal"
    assert real["rehearsal"]["digest"] == m["rehearsal_of"]["digest"]

    unsynced = quick_notebooks(tmp_path / "nbs", {"02": "print('edited after the rehearsal')"})
    with pytest.raises(RunError, match="since then changed: the quantbook code or notebooks"):
        run_chain(params, runs_dir=runs, notebooks_dir=unsynced, run_id="second", progress=False, echo=lambda s: None)
    lines = []
    forced = run_chain(params, runs_dir=runs, notebooks_dir=unsynced, run_id="second", no_rehearsal=True,
                       progress=False, echo=lines.append)
    assert forced["rehearsal"]["skipped"].startswith("--no-rehearsal") and lines[0].startswith("WARNING: --no-rehearsal")


def test_rehearse_refuses_the_params_own_problems(pro_release, tmp_path):
    """The real params' own checks run first: 256 calibration samples on V4 Pro is refused before any
    tiny release is built (the rehearsal's own 16 samples would not show it)."""
    p = pro_params(tmp_path, pro_release, **{"quantize.hf_ptq": {"calib_size": [128, 128]}})
    params = write_params(p, tmp_path / "p.yaml")
    with pytest.raises(RunError, match="(?s)refused before rehearsing.*256 calibration samples"):
        rehearse(params, runs_dir=tmp_path / "runs", notebooks_dir=quick_notebooks(tmp_path / "nbs"),
                 calib_file=calib_file(tmp_path / "c.jsonl"), progress=False, echo=lambda s: None)
    assert not (tmp_path / "runs").exists()


def test_prepare_changes_only_what_cannot_run_here(flash_release, tmp_path):
    p = load_params(flash_params(tmp_path, flash_release))
    calib = calib_file(tmp_path / "calib.jsonl")
    path, rec = rehearsal.prepare(p, tmp_path / "r", calib_file=calib, cuda=True)
    r = load_params(path)
    assert {c["key"] for c in rec["changes"] if "device" in c["key"]} == set()  # CUDA here: kept
    assert r["quantize"]["hf_ptq"]["device"] == "cuda" and rec["device"] == "cuda"
    assert rehearsal.kept(r) == rehearsal.kept(p)
    assert r["quantize"]["hf_ptq"]["dataset"] == str(calib.resolve()) and r["quantize"]["hf_ptq"]["calib_size"] == 16
    assert r["dequant"]["destination"] == r["quantize"]["hf_ptq"]["pyt_ckpt_path"] == r["export"]["reference"]
    assert r["dequant"]["source"] == r["export"]["source"] == rec["tiny"]["dir"]
    assert (Path(rec["tiny"]["dir"]) / "config.json").is_file() and r["name"] == "flash_node-rehearsal"
    with pytest.raises(RunError, match="not a rehearsal's directory"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "keep.txt").write_text("x")
        rehearsal.clear(tmp_path / "other")
    with pytest.raises(RunError, match="calib-data"):
        rehearsal.prepare(p, tmp_path / "r2", calib_file=tmp_path / "missing.jsonl", cuda=False)


def test_digest_covers_what_the_rehearsal_keeps(flash_release, tmp_path, monkeypatch):
    from quantbook.calibrate import state

    p = load_params(flash_params(tmp_path, flash_release))
    d0 = rehearsal.digest(p)[0]

    def variant(where: str, key: str, value) -> str:
        v = json.loads(json.dumps(p))
        node = v
        for part in where.split("."):
            node = node[part]
        node[key] = value
        return rehearsal.digest(v)[0]

    for where, key, value in (("quantize.hf_ptq", "device", "cpu"), ("quantize.hf_ptq", "dataset", "x.jsonl"),
                              ("quantize.hf_ptq", "calib_size", 8), ("dequant", "destination", "/elsewhere"),
                              ("export", "dir", "/elsewhere"), ("export", "device", "cuda")):
        assert variant(where, key, value) == d0, key  # what a rehearsal changes is not in the digest
    for where, key, value in (("quantize.hf_ptq", "qformat", "nvfp4"), ("quantize", "driver", "hf_ptq"),
                              ("quantize.hf_ptq", "batch_size", 8), ("quantize", "layerwise", True),
                              ("export", "layout", "generic"), ("export", "cast_mxfp4_to_nvfp4", False),
                              ("quantize", "export_generic", True), ("export", "mtp_experts", "nvfp4"),
                              ("dequant", "workers", 4), ("inspect", "fail_on", [])):
        assert variant(where, key, value) != d0, key  # what it keeps is
    other = quick_notebooks(tmp_path / "nbs")
    assert rehearsal.digest(p, notebooks_dir=other)[0] != d0  # other notebooks: other code
    monkeypatch.setattr(state, "versions", lambda: {"nvidia-modelopt": "0.48.0"})
    assert rehearsal.digest(p)[0] != d0


def test_tiny_default_is_its_own_rehearsal(tiny_chain, tmp_path, monkeypatch):
    """params/tiny.yaml builds a few-MiB release from its tiny: section: it runs in the minutes a
    rehearsal takes, on the same code paths, so it needs none (the README's first command and every
    test chain run as before); its manifest says so. Whether the README's first command has built
    work/tiny/ yet or not (its paths are relative to the working directory): item 1 of issue 17, this
    test failed after `quantbook run params/tiny.yaml` had run in the same clone."""
    import yaml

    from quantbook.release.tiny import section_config

    monkeypatch.chdir(tmp_path)  # a clone before the first command: no work/tiny/ here
    params = load_params(REPO / "params" / "tiny.yaml")
    need, why = rehearsal.needed(params)
    assert not need and "MiB of tensors (the tiny: section" in why and "its own rehearsal" in why
    release = Path(params["dequant"]["source"])  # ... and after it: the release built from that section
    release.mkdir(parents=True)
    (release / "config.json").write_text(json.dumps(section_config(yaml.safe_load(
        (REPO / "params" / "tiny.yaml").read_text())["tiny"])))
    need, why = rehearsal.needed(params)
    assert not need and f"MiB of tensors ({release / 'config.json'})" in why and "its own rehearsal" in why
    # the chain's manifest records the rule's own answer for its params (item 19: this compared `why` with itself)
    chain_why = rehearsal.needed(load_params(tiny_chain["params"]))[1]
    assert tiny_chain["manifest"]["rehearsal"] == {"needed": False, "why": chain_why}
    assert "its own rehearsal" in chain_why and str(tiny_chain["src"]) in chain_why
    assert rehearsal.needed({"name": "x", "inspect": {}}) == (False, "the params touch no model (no dequant, "
                                                                     "quantize or export section)")
    assert rehearsal.needed(load_params(REPO / "params" / "v4_pro_b200.yaml"))[0]  # no release here: sized unknown
