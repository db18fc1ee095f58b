"""Rehearsals: a real params file run whole on a tiny copy of its own release, in minutes.

`quantbook run PARAMS --rehearse` builds a tiny release from the SOURCE's own `config.json` (every
key kept, dimensions shrunk: `release.tiny.tiny_config`) inside `runs/<id>-rehearsal/work/`, and
runs the whole chain with the same params otherwise: driver, recipe, flags, runtime patches, the
post-calibration hook, export layout, workers. What cannot run here changes, and the run record
says what and why (`prepare`): every path moves into the rehearsal's directory, a device `cuda`
becomes `cpu` on a machine without CUDA, hub datasets (not fetchable offline) become the local
calibration text set-up writes, with a calibration small enough for minutes (at least one batch:
`batch_size` is kept).

The rule (`gate`): a real run starts only when a rehearsal with the same params digest has passed
(its manifest is named in the real run's), or with `--no-rehearsal` (recorded). The digest
(`digest`) covers what a rehearsal keeps: the params less the keys it changes, the release's
config.json, the quantbook code and notebooks, the versions of the packages that calibrate and
export, the hf_ptq checkout's release. A rehearsal on other code (a node not synced: the
predecessor's runs 4 and 5) or other settings does not count.

A run whose release is itself rehearsal-sized (under `REHEARSAL_SIZE` of tensors, such as
params/tiny.yaml's: a few MiB built by step 01 from its `tiny:` section) needs none: it takes the
minutes a rehearsal would, on the same code paths, so it IS its own rehearsal. Params without a
dequant, quantize or export section touch no model and need none either (step 04 alone reads amax).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import yaml

from .. import atomic
from ..errors import RunError
from ..params import SECTIONS

REHEARSAL_SIZE = 2**30  # tensor bytes under which a run is its own rehearsal
REHEARSAL_SAMPLES = 16  # calibration samples of a rehearsal (at least one batch: batch_size is kept)
REHEARSAL_SEQ = 64  # tokens per calibration sample, at most
DEFAULT_CALIB = "work/calib/english.jsonl"  # what `scripts/setup.sh` writes (`quantbook calib-data`)
SUFFIX = "-rehearsal"
# keys a rehearsal changes: (section, key) of paths, devices and calibration data
PATH_KEYS = (("dequant", "source"), ("dequant", "destination"), ("quantize.hf_ptq", "pyt_ckpt_path"),
             ("quantize.hf_ptq", "export_path"), ("quantize.hf_ptq", "offload_folder"), ("export", "source"),
             ("export", "dir"), ("export", "reference"))
DEVICE_KEYS = (("dequant", "device"), ("quantize.hf_ptq", "device"), ("export", "device"), ("export.fidelity", "device"))
DATA_KEYS = (("quantize.hf_ptq", "dataset"), ("quantize.hf_ptq", "calib_size"), ("quantize.hf_ptq", "calib_seq"))
DROPPED_KEYS = (("inspect", "compare_run_dir"), ("quantize", "hf_ptq_dir"))  # another run's amax; a checkout's path
GATE_KEYS = (("export.fidelity", "gate"), ("export.fidelity", "text"),  # random weights: measured, not gated
             ("export.fidelity", "samples"), ("export.fidelity", "seq"))


def default_notebooks_dir() -> Path:
    """The repository's notebooks/ (the package lives in <repo>/lib/quantbook)."""
    here = Path(__file__).resolve().parents[3] / "notebooks"
    return here if here.is_dir() else Path.cwd() / "notebooks"


def _section(params: dict, where: str) -> dict | None:
    node = params
    for part in where.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


# ----------------------------------------------------------------------------- the release and its size


def release_dir(params: dict) -> Path | None:
    """The release a params file runs on: `dequant.source`, else `export.source`."""
    for where in ("dequant", "export"):
        src = (params.get(where) or {}).get("source")
        if src:
            return Path(src)
    return None


def release_config(params: dict) -> tuple[dict | None, str]:
    """(the release's config, where it came from): the source's config.json, or for a source still to
    be built, the `tiny:` section's config; else the checkpoint step 02 calibrates."""
    from ..release.format import load_config
    from ..release.tiny import section_config

    src = release_dir(params)
    if src is not None and (src / "config.json").is_file():
        return load_config(src), str(src / "config.json")
    if params.get("tiny"):
        return section_config(params["tiny"]), f"the tiny: section ({params['tiny']})"
    ckpt = (_section(params, "quantize.hf_ptq") or {}).get("pyt_ckpt_path")
    if ckpt and (Path(ckpt) / "config.json").is_file():
        return load_config(ckpt), str(Path(ckpt) / "config.json")
    return None, ""


def needed(params: dict) -> tuple[bool, str]:
    """Whether a run of these params needs a rehearsal first, and why (see the module docstring)."""
    from ..release.format import expected_tensors

    if not any(params.get(s) for s in ("dequant", "quantize", "export")):
        return False, "the params touch no model (no dequant, quantize or export section)"
    cfg, where = release_config(params)
    if cfg is None:
        return True, "no release config.json to size the run from"
    size = sum(t.nbytes for t in expected_tensors(cfg).values())
    if size < REHEARSAL_SIZE:
        return False, (f"the release is {size / 2**20:,.1f} MiB of tensors ({where}): a rehearsal-sized run, "
                       "its own rehearsal")
    return True, f"the release is {size / 2**30:,.1f} GiB of tensors ({where})"


# ----------------------------------------------------------------------------- the digest


def kept(params: dict) -> dict:
    """The params as a rehearsal keeps them: without name, tiny:, and the keys it changes."""
    out = copy.deepcopy({k: v for k, v in params.items() if k in SECTIONS and k not in ("name", "tiny")})
    for where, key in PATH_KEYS + DEVICE_KEYS + DATA_KEYS + DROPPED_KEYS + GATE_KEYS:
        sec = _section(out, where)
        if sec is not None:
            sec.pop(key, None)
    if (out.get("export") or {}).get("fidelity") == {}:
        out["export"].pop("fidelity")
    return out


def code_digest(notebooks_dir: str | Path | None = None) -> str:
    """sha256 of the quantbook package's code and data files and of the step notebooks."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1]
    nbs = Path(notebooks_dir) if notebooks_dir else default_notebooks_dir()
    files = [(f"quantbook/{p.relative_to(pkg)}", p) for p in sorted(pkg.rglob("*"))
             if p.is_file() and p.suffix in (".py", ".json", ".yaml") and "__pycache__" not in p.parts]
    files += [(f"notebooks/{p.name}", p) for p in sorted(nbs.glob("*.ipynb"))]
    for name, p in files:
        h.update(name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _checkout(params: dict) -> str | None:
    q = params.get("quantize") or {}
    if q.get("driver") != "hf_ptq":
        return None
    from ..calibrate.hf_ptq_driver import checkout_version, resolve_checkout
    from ..errors import QuantbookError

    try:
        return checkout_version(resolve_checkout(q)).text
    except QuantbookError as e:
        return f"unknown ({e})"


def digest(params: dict, notebooks_dir: str | Path | None = None) -> tuple[str, dict]:
    """(hex digest, what it covers) of a run's params as a rehearsal keeps them (module docstring)."""
    from ..calibrate.state import versions

    cfg, where = release_config(params)
    inputs = {
        "params": kept(params),
        "release_config": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest() if cfg else None,
        "code": code_digest(notebooks_dir),
        "versions": versions(),
        "hf_ptq_checkout": _checkout(params),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16], inputs


def _differences(a: dict, b: dict) -> list[str]:
    """What differs between two digests' inputs, by key (params keys spelled out)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        if k == "params":
            pa, pb = a.get(k) or {}, b.get(k) or {}
            out += [f"params {s}" for s in sorted(set(pa) | set(pb)) if pa.get(s) != pb.get(s)]
        elif k == "versions":
            va, vb = a.get(k) or {}, b.get(k) or {}
            out += [f"{p} {va.get(p)} -> {vb.get(p)}" for p in sorted(set(va) | set(vb)) if va.get(p) != vb.get(p)]
        else:
            out.append({"code": "the quantbook code or notebooks", "release_config": "the release's config.json"}
                       .get(k, k))
    return out


# ----------------------------------------------------------------------------- finding and gating


def rehearsals(runs_dir: str | Path) -> list[dict]:
    """Every rehearsal run in `runs_dir`: its run id, status, when it ended and what it rehearsed."""
    out = []
    root = Path(runs_dir)
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        m = atomic.read_json(d / "manifest.json")
        if m and m.get("rehearsal_of"):
            out.append({"run_id": m.get("run_id", d.name), "path": str(d), "status": m.get("status"),
                        "completed": m.get("updated"), **{k: m["rehearsal_of"].get(k) for k in
                                                          ("digest", "digest_inputs", "params_name", "params_file")}})
    return sorted(out, key=lambda r: r["completed"] or "")


def status(params: dict, runs_dir: str | Path, notebooks_dir: str | Path | None = None) -> dict:
    """{needed, why, digest, found (the newest passed rehearsal with this digest, or None), latest
    (the newest rehearsal of these params by name, passed or not)}."""
    need, why = needed(params)
    out = {"needed": need, "why": why, "digest": None, "found": None, "latest": None}
    if not need:
        return out
    d, inputs = digest(params, notebooks_dir)
    found = rehearsals(runs_dir)
    out["digest"], out["digest_inputs"] = d, inputs
    passed = [r for r in found if r["digest"] == d and r["status"] == "complete"]
    same_name = [r for r in found if r["params_name"] == params.get("name")]
    out["found"] = passed[-1] if passed else None
    out["latest"] = same_name[-1] if same_name else None
    return out


def gate(params: dict, runs_dir: str | Path, no_rehearsal: bool = False,
         notebooks_dir: str | Path | None = None) -> dict:
    """What the real run's manifest records under "rehearsal": not needed (and why), the rehearsal that
    passed with the same digest, or the explicit `--no-rehearsal`. RunError when none of these."""
    st = status(params, runs_dir, notebooks_dir)
    if not st["needed"]:
        return {"needed": False, "why": st["why"]}
    rec = {"needed": True, "why": st["why"], "digest": st["digest"]}
    if st["found"]:
        f = st["found"]
        return {**rec, "passed": {"run_id": f["run_id"], "path": f["path"], "completed": f["completed"]}}
    if no_rehearsal:
        return {**rec, "skipped": "--no-rehearsal: started without a passed rehearsal of these params"}
    hint = ""
    if st["latest"]:
        r = st["latest"]
        diff = _differences(r.get("digest_inputs") or {}, st["digest_inputs"]) if r["digest"] != st["digest"] else []
        hint = (f"\nthe latest rehearsal of {params.get('name')}: {r['path']} ({r['status']}, digest {r['digest']}"
                + (f"; since then changed: {', '.join(diff)}" if diff else "") + ")")
    raise RunError(f"no rehearsal of these params has passed (params digest {st['digest']}; {st['why']}). Rehearse "
                   f"first, in minutes: quantbook run {params.get('_path', 'PARAMS')} --rehearse; or start without "
                   f"one: --no-rehearsal (recorded in the run's manifest){hint}")


# ----------------------------------------------------------------------------- building a rehearsal


def _rename(paths: dict[str, Path], original: str, work: Path) -> Path:
    """The rehearsal's path for an original one: the same original always maps to the same place."""
    key = str(Path(original).resolve())
    if key not in paths:
        name, n = Path(original).name or "out", 1
        while work / name in paths.values():
            n += 1
            name = f"{Path(original).name}-{n}"
        paths[key] = work / name
    return paths[key]


def prepare(params: dict, run_dir: str | Path, calib_file: str | Path = DEFAULT_CALIB, cuda: bool | None = None,
            layers: int = 4, notebooks_dir: str | Path | None = None) -> tuple[Path, dict]:
    """Write a rehearsal of `params` into `run_dir`: the tiny release in `run_dir/work/`, the rehearsal's
    params file `run_dir/params.yaml`. Returns (that file, the record for its manifest: what it
    rehearses, the digest, every change with its reason). `cuda`: whether CUDA runs here (default:
    ask torch)."""
    from ..calibrate.checks import calib_samples
    from ..calibrate.settings import HF_PTQ_DEFAULTS
    from ..release.convert import plan as release_plan
    from ..release.tiny import make_tiny

    src = release_dir(params)
    if src is None or not (src / "config.json").is_file():
        raise RunError(f"a rehearsal is built from the release's own config.json: {src or 'no dequant.source'} has "
                       "none (set dequant.source to the released checkpoint)")
    release_plan(src, Path(run_dir) / "work" / "release-check")  # the real headers match their config
    d, inputs = digest(params, notebooks_dir)
    run_dir = Path(run_dir).resolve()
    work = run_dir / "work"
    r = copy.deepcopy({k: v for k, v in params.items() if k in SECTIONS and k != "tiny"})
    r["name"] = f"{params.get('name', 'run')}{SUFFIX}"
    changes, paths = [], {}
    tiny_src = _rename(paths, str(src), work)
    for where, key in PATH_KEYS:
        sec = _section(r, where)
        if sec is None or not sec.get(key):
            continue
        new = _rename(paths, sec[key], work)
        why = (f"a tiny release built from {src / 'config.json'} ({layers} layers, every key kept)" if new == tiny_src
               else "outputs go into the rehearsal's own directory")
        changes.append({"key": f"{where}.{key}", "from": sec[key], "to": str(new), "why": why})
        sec[key] = str(new)
    inspect = _section(r, "inspect")
    if inspect is not None and inspect.get("compare_run_dir"):
        changes.append({"key": "inspect.compare_run_dir", "from": inspect["compare_run_dir"], "to": None,
                        "why": "another run's amax are of the full-size model"})
        inspect["compare_run_dir"] = None
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    for where, key in DEVICE_KEYS:
        sec = _section(r, where)
        if sec is not None and str(sec.get(key, "")).startswith("cuda") and not cuda:
            changes.append({"key": f"{where}.{key}", "from": sec[key], "to": "cpu",
                            "why": "no CUDA GPU on this machine: the rehearsal runs on CPU"})
            sec[key] = "cpu"
    hf = _section(r, "quantize.hf_ptq")
    if hf is not None:
        _rehearsal_data(hf, calib_file, changes, calib_samples, HF_PTQ_DEFAULTS)
    export = _section(r, "export")
    if export is not None and (export.get("fidelity") or {}).get("gate", True):
        fid = export["fidelity"] = dict(export.get("fidelity") or {})
        changes.append({"key": "export.fidelity.gate", "from": fid.get("gate", True), "to": False,
                        "why": "the rehearsal's tiny has random weights: the gate runs and records its numbers, "
                               "which mean nothing there, without applying its thresholds"})
        fid["gate"] = False
        for key, most in (("samples", 16), ("seq", 64)):  # as the calibration: minutes on the tiny model
            if fid.get(key, 10**9) > most:
                changes.append({"key": f"export.fidelity.{key}", "from": fid.get(key), "to": most,
                                "why": f"at most {most} on the tiny model, as the calibration"})
                fid[key] = most
        if fid.get("text"):
            changes.append({"key": "export.fidelity.text", "from": fid["text"], "to": None,
                            "why": "the held-out text beside the rehearsal's calibration file"})
            fid["text"] = None
    make_tiny(tiny_src, like=src, seed=0, layers=layers)
    params_file = run_dir / "params.yaml"
    atomic.write_text(params_file, f"# rehearsal of {params.get('_path')} (digest {d}); written by quantbook\n"
                      + yaml.safe_dump(r, sort_keys=False))
    record = {"params_file": str(Path(params.get("_path", "")).resolve()) if params.get("_path") else None,
              "params_name": params.get("name"), "digest": d, "digest_inputs": inputs, "release": str(src),
              "tiny": {"layers": layers, "dir": str(tiny_src)}, "device": "cuda" if cuda else "cpu",
              "changes": changes}
    return params_file, record


def _rehearsal_data(hf: dict, calib_file, changes: list, calib_samples, defaults: dict) -> None:
    """Hub datasets -> the local calibration text; a calibration of minutes, at least one batch."""
    pairs = calib_samples({**defaults, **hf})
    local = []
    for name, _ in pairs:
        if name.endswith(".jsonl") or Path(name).exists():
            local.append(name)
        else:
            if not Path(calib_file).is_file():
                raise RunError(f"the rehearsal calibrates on {calib_file} instead of the hub dataset {name!r}, but it "
                               f"does not exist: write it with `quantbook calib-data {calib_file}` (set-up does)")
            local.append(str(Path(calib_file).resolve()))
    local = list(dict.fromkeys(local))
    batch = hf.get("batch_size") or 1
    total = max(REHEARSAL_SAMPLES, int(batch))
    new = {"dataset": local if len(local) > 1 else local[0],
           "calib_size": math.ceil(total / len(local)),
           "calib_seq": min(int(hf.get("calib_seq") or defaults["calib_seq"]), REHEARSAL_SEQ)}
    why = {"dataset": "hub datasets cannot be fetched here: the local calibration text set-up writes",
           "calib_size": f"{total} samples in all: minutes on the tiny model, at least one batch of {batch}",
           "calib_seq": f"at most {REHEARSAL_SEQ} tokens a sample on the tiny model"}
    for key, value in new.items():
        if hf.get(key) != value:
            changes.append({"key": f"quantize.hf_ptq.{key}", "from": hf.get(key), "to": value, "why": why[key]})
            hf[key] = value


def clear(run_dir: str | Path) -> None:
    """Remove an earlier rehearsal's directory (a rehearsal starts fresh); refuse anything else there."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    m = atomic.read_json(run_dir / "manifest.json")
    if any(run_dir.iterdir()) and not (m and m.get("rehearsal_of")) and not (run_dir / "params.yaml").is_file():
        raise RunError(f"{run_dir} exists and is not a rehearsal's directory; move it away or pass another --run-id")
    shutil.rmtree(run_dir)
