"""Shared fixtures: tiny V4 checkpoints in the released format, and one real chain run on them,
each built once per test run and read (never changed) by the tests that use them.

The suite runs on pytest-xdist workers (`-n 2`, pyproject). A session fixture is per worker there, so
the expensive ones are built once for the whole run by whichever worker asks first, under a file lock,
into the run's shared temporary directory (`shared`); the other workers wait and read the result.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP/MKL thread per process (this one, the chain's notebook kernels, the CLI subprocesses, the
# streaming driver's gloo processes: all inherit it). Two xdist workers, each with a kernel or a
# subprocess beside it, already keep both cores of the 2-core machine busy; with two threads each, torch's
# spinning OpenMP threads fight over them and ops on the tiny model run up to 100x slower (bf16
# index_add_ in the fidelity gate's experts: 140 ms with 2 threads against 1.4 ms with one, under load).
# Set before torch is imported anywhere in the run; an explicit setting in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def shared(tmp_path_factory, name: str, build):
    """`build(directory)` run once for the whole test run, whatever the number of xdist workers; its
    result (JSON: paths as strings) returned to every caller. A failed build leaves nothing: the
    next caller tries again (and fails with its own traceback)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <basetemp>/popen-gwN: the parent is the run's, shared by its workers
    d, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if done.is_file():
            return json.loads(done.read_text())
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        value = json.loads(json.dumps(build(d), default=str))
        done.write_text(json.dumps(value))
        return value


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """A 4-layer tiny V4 (Flash-shaped config) in the released FP8/FP4 format. Read-only."""
    from quantbook.release.tiny import make_tiny

    return Path(shared(tmp_path_factory, "tiny", lambda d: make_tiny(d / "DeepSeek-V4-tiny-FP8", seed=0)))


# Read-only releases (resolved path -> their step-01 plan once made, None before): `convert.plan` of one of
# these is made once per worker and handed to each later caller with the caller's destination.
READ_ONLY: dict = {}


def read_only_release(release: Path) -> Path:
    """Register `release` as read-only: no test changes it, so its `convert.plan` (every header parsed
    and validated, the release fingerprinted: 4-5 s at V4 Pro's size on this machine, asked by each
    full-size preflight and rehearsal) is the same at every call and is made once (`plan_once`)."""
    READ_ONLY.setdefault(release.resolve(), None)
    return release


def plan_once(plan):
    """`plan` (convert.plan) that plans a `READ_ONLY` release on its first call only and answers later
    calls for it with that plan, its destination replaced; any other source is planned as always. A
    failed plan is not kept (the next call plans again and raises its own error)."""
    import dataclasses

    def planned(src, dst):
        key = Path(src).resolve()
        if key not in READ_ONLY:
            return plan(src, dst)
        if READ_ONLY[key] is None:
            READ_ONLY[key] = plan(src, dst)
        return dataclasses.replace(READ_ONLY[key], dst=Path(dst).resolve())

    return planned


@pytest.fixture(scope="session", autouse=True)
def _read_only_plans():
    """`convert.plan` through `plan_once` for the whole run (a no-op for releases not `READ_ONLY`)."""
    from quantbook.release import convert

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "plan", plan_once(convert.plan))
        yield


@pytest.fixture(scope="session")
def pro_release(tmp_path_factory):
    """V4 Pro's release as sparse files: the real shard layout, headers, index and config, data as
    holes (805 GiB apparent, a few MiB on disk). Read-only (`read_only_release`: planned once a worker)."""
    from quantbook.release.format import PRO_CONFIG
    from quantbook.release.sparse import write_sparse_release

    return read_only_release(Path(shared(tmp_path_factory, "sparse",
                                         lambda d: write_sparse_release(PRO_CONFIG, d / "DeepSeek-V4-Pro-FP8"))))


@pytest.fixture(scope="session")
def tiny_bf16(tiny_src, tmp_path_factory):
    """`tiny_src` dequantized to BF16 by step 01. Read-only."""
    from quantbook.release.convert import dequantize

    def build(d):
        dequantize(tiny_src, d / "DeepSeek-V4-tiny-BF16", workers=2, progress=False)
        return d / "DeepSeek-V4-tiny-BF16"

    return Path(shared(tmp_path_factory, "tiny_bf16", build))


def _chain(tmp_path_factory, name: str, tiny_src: Path | None):
    """`params/tiny.yaml`'s chain with its paths under a temporary directory, built once per test run:
    on the packaged trained tiny its `tiny:` section builds (`tiny_src` None: the README's command,
    the fidelity gate on), or on `tiny_src` (random weights, step 02's generic export too, the gate's
    numbers recorded without its thresholds)."""
    import yaml

    from quantbook.params import load_params
    from quantbook.records.runs import run_chain
    from quantbook.release.tiny import build_if_missing
    from quantize_support import write_calib

    trained = tiny_src is None

    def build(base):
        text = (REPO / "params" / "tiny.yaml").read_text()
        assert "work/tiny/" in text and "work/calib/english.jsonl" in text
        raw = yaml.safe_load(text.replace("work/tiny/", f"{base}/tiny/").replace("work/calib/", f"{base}/calib/"))
        src = Path(raw["dequant"]["source"])
        src.parent.mkdir(parents=True)
        if trained:
            assert raw["tiny"].get("trained"), "the embedded default is the trained tiny"
            build_if_missing(src, raw["tiny"])
        else:  # random weights: the gate's numbers mean nothing, it runs and records them ungated
            shutil.copytree(tiny_src, src)
            raw["quantize"]["export_generic"] = True  # the tests compare modelopt's generic export with step 03's
            raw["export"]["fidelity"]["gate"] = False
            # ... on 4 held-out samples, not 16: no test reads this chain's numbers, only that step 03 ran the
            # gate's whole path (every block, the MTP block) and recorded them; the trained chain keeps 16
            raw["export"]["fidelity"]["samples"] = 4
        params = base / "tiny.yaml"
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        calib = write_calib(base / "calib" / "english.jsonl")
        runs = base / "runs"
        manifest = run_chain(params, runs_dir=runs, progress=False, echo=lambda s: None)
        assert manifest["status"] == "complete", {k: v.get("error") for k, v in manifest["steps"].items()}
        p = load_params(params)
        run_dir = runs / p["name"]
        return {"params": params, "runs": runs, "run_dir": run_dir, "src": src, "bf16": p["dequant"]["destination"],
                "generic": p["quantize"]["hf_ptq"]["export_path"], "export": p["export"]["dir"],
                "calib": calib, "q": p["quantize"], "manifest": manifest,
                "record": json.loads((run_dir / "quantize.json").read_text())}

    value = shared(tmp_path_factory, name, build)
    paths = ("params", "runs", "run_dir", "src", "bf16", "generic", "export", "calib")
    return {k: Path(v) if k in paths else v for k, v in value.items()}


@pytest.fixture(scope="session")
def tiny_chain(tiny_src, tmp_path_factory):
    """The README's main command, on the random tiny `tiny_src` (the tests that compare the chain's
    files with `tiny_src` / `tiny_bf16` share it), with modelopt's generic export asked for too
    (`export_generic: true`, off by default) and the fidelity gate not applied (random weights: its
    numbers are recorded, they mean nothing, on 4 held-out samples); notebooks 01 -> 04 through papermill.
    Read-only.

    Returns the paths: params, runs, run_dir, src, bf16, generic (step 02's modelopt export),
    export (step 03's v4-serving layout), calib, and the chain's manifest and quantize record."""
    return _chain(tmp_path_factory, "chain", tiny_src)


@pytest.fixture(scope="session")
def trained_chain(tmp_path_factory):
    """The README's main command exactly: the packaged trained tiny, the fidelity gate on. Read-only."""
    return _chain(tmp_path_factory, "trained_chain", None)


@pytest.fixture(scope="session")
def pro_snapshot(tmp_path_factory):
    """A synthetic amax snapshot in V4 Pro's shape (61 layers x 384 experts, ~48,000 quantizers,
    modelopt's names) with token counts, one expert never routed (layer 1, expert 100)."""
    from amax_synth import make_snapshot

    value = shared(tmp_path_factory, "pro_snapshot",
                   lambda d: [d / "a", make_snapshot(d / "a", like="pro", seed=7, inject={"never_routed": [(1, 100)]})])
    return Path(value[0]), value[1]


@pytest.fixture(scope="session")
def tiny_nvfp4(tiny_chain, tmp_path_factory):
    """The modelopt driver with qformat `nvfp4` (every linear) on the chain's BF16, exporting into a
    copy of the chain's step-02 export that holds a stale file: the rerun must replace it whole."""
    import copy

    from quantbook.calibrate import quantize

    def build(base):
        export = base / "export"
        shutil.copytree(tiny_chain["generic"], export)
        marker = export / "stale-file-from-the-first-run"
        marker.write_text("x")
        q = copy.deepcopy(tiny_chain["q"])
        q["hf_ptq"].update(qformat="nvfp4", export_path=str(export))
        rec = quantize(q, base / "run", progress=False)
        return {"export": export, "marker": marker, "record": rec, "run_dir": base / "run"}

    value = shared(tmp_path_factory, "nvfp4", build)
    return {k: v if k == "record" else Path(v) for k, v in value.items()}
