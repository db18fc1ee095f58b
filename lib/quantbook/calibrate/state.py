"""What calibration produced, kept so that no failure after it costs a recalibration.

The post-calibration hook (`post_calibration`) runs between calibration and export in both
drivers (hf_ptq: by wrapping its `export_quantized`; modelopt: a direct call). In order:

1. every quantizer's `_amax`, `_global_amax`, `_pre_quant_scale` moved to CPU;
2. the raw values written to `<run_dir>/amax.safetensors` (`amax.save_snapshot`, atomic), and the
   per-expert calibration token counts to `<run_dir>/expert_token_counts.json`;
3. `repair_amax`: every enabled activation quantizer whose amax is missing, 0, NaN, inf or
   negative gets a fallback amax (below), recorded by quantizer name; the export then never
   writes a bad or missing `input_scale` silently;
4. the cheap calibrated state in `<run_dir>/state/`: `modelopt_state.pth` (the quantizer layout,
   no weights, tens of KB) plus `quantizers.safetensors` (every quantizer tensor: megabytes for
   V4 Pro, where the full state dict is 1.5 TB), then `manifest.json` LAST, naming the model
   (path, config hash, weights' identity), versions, params, counts, calibration samples and
   tokens, and each file's sha256; written in `state.partial/` and renamed into place whole. A
   state without its manifest, or whose files do not hash as listed, is refused.
   `save_full_state` (off by default) also writes `mto.save`'s full state dict.

`restore` / `restore_into` rebuild the calibrated model from that state on a freshly loaded model
(the recovery export of step 03 uses them): `mto.restore_from_modelopt_state`, then the
quantizer tensors, then the same CPU placement and names as after calibration; exporting the
restored model gives the same bytes as exporting the original (tests/test_state.py).

Fallback for a bad activation amax (`repair_amax`): the largest valid amax of the quantizers
of the same projection and role in other layers (e.g. `attn.compressor.wkv` input, every layer);
if none, the largest valid activation amax in the model; if the model has none at all,
AmaxError. Weight quantizers are only checked (NaN/inf/negative weight amax is an error: the
weights themselves are broken); max calibration derives every weight amax from the weights.

Layerwise calibration keeps modelopt's per-layer checkpoint in `<run_dir>/layerwise/ckpt`.
modelopt resumes from it after checking only the layer count and two settings; this module
signs the directory (`quantbook-signature.json`: model identity, params, quantization config,
calibration data digest, versions) and `check_layerwise_dir` refuses to resume from a stale or
foreign one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .. import amax as amax_io
from .. import atomic
from ..errors import AmaxError, StaleCheckpoint, StateError
from ..release.convert import MANIFEST as DEQUANT_MANIFEST
from ..release.shards import HASH
from . import patches

STATE_DIR = "state"
MANIFEST = "manifest.json"
MODELOPT_STATE = "modelopt_state.pth"
QUANTIZER_TENSORS = "quantizers.safetensors"
FULL_STATE = "full_state.pth"
LAYERWISE_DIR = "layerwise"
LAYERWISE_CKPT = "ckpt"
LAYERWISE_COUNTS = "token_counts"
SIGNATURE = "quantbook-signature.json"


# ---------------------------------------------------------------------------------------------
# identities

def versions() -> dict:
    """Versions that change calibration or export bytes."""
    import importlib.metadata as md

    out = {}
    for pkg in ("nvidia-modelopt", "transformers", "torch", "accelerate", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def model_identity(model_path: str | Path) -> dict:
    """Path, config hash and weights' identity of a checkpoint directory, without reading weights.

    Weights' identity hashes the index and every shard's name and size, plus the digest that
    step 01 recorded per shard (`quantbook-dequant.json`) when present, else each shard's mtime.
    So two copies of step 01's output from the same release have one identity, wherever they are.
    """
    p = Path(model_path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise StateError(f"{p}: no config.json; not a checkpoint directory")
    dequant = atomic.read_json(p / DEQUANT_MANIFEST, {}) or {}
    recorded = dequant.get("shards", {})
    parts = []
    index = p / "model.safetensors.index.json"
    if index.is_file():
        parts.append(("index", _sha256_bytes(index.read_bytes())))
    for shard in sorted(p.glob("*.safetensors")):
        st = shard.stat()
        rec = recorded.get(shard.name, {})
        ident = rec.get(HASH) if rec.get("size") == st.st_size else None
        parts.append((shard.name, st.st_size, ident or f"mtime:{st.st_mtime_ns}"))
    return {
        "path": str(p.resolve()),
        "config_sha256": _sha256_bytes(cfg.read_bytes()),
        "weights_id": _sha256_bytes(json.dumps(parts).encode()),
        "shards": len([x for x in parts if x[0] != "index"]),
        "weights_from_step01_manifest": bool(recorded),
    }


def quant_cfg_digest(quant_cfg: dict) -> str:
    """sha256 of a quantization config, ignoring where a layerwise checkpoint is kept."""
    import copy

    cfg = copy.deepcopy(quant_cfg)
    alg = cfg.get("algorithm")
    if isinstance(alg, dict) and isinstance(alg.get("layerwise"), dict):
        alg["layerwise"].pop("checkpoint_dir", None)
    return _sha256_bytes(json.dumps(_canonical(cfg), sort_keys=True, default=str).encode())


def _canonical(obj):
    """JSON-ready copy with every mapping key a string (quant configs key block sizes by int)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# quantizers

def iter_quantizers(model):
    """(name, TensorQuantizer) for every quantizer module of the model."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer

    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def amax_to_cpu(model) -> int:
    """Move every quantizer's calibrated tensors to CPU; the number of quantizers."""
    n = 0
    for _, q in iter_quantizers(model):
        patches.move_amax_to_cpu(q)
        n += 1
    return n


def snapshot_tensors(model) -> dict:
    """{`<quantizer>.<attr>`: tensor} for attr in `_amax`, `_pre_quant_scale`, `_global_amax`."""
    out = {}
    for name, q in iter_quantizers(model):
        for attr in amax_io.ATTRS:
            t = q._buffers.get(attr)
            if t is None:
                t = getattr(q, attr, None) if attr in getattr(q, "_parameters", {}) else None
            if t is not None and not t.is_meta:
                out[f"{name}.{attr}"] = t.detach().cpu()
    return out


def quantizer_tensors(model) -> dict:
    """Every tensor in every quantizer's own state dict, keyed like `model.state_dict()`."""
    out = {}
    for name, q in iter_quantizers(model):
        for k, t in q.state_dict().items():
            if not hasattr(t, "is_meta"):
                continue
            if t.is_meta:
                raise StateError(f"quantizer tensor {name}.{k} is on the meta device; nothing to save")
            out[f"{name}.{k}"] = t.detach().cpu().contiguous()
    return out


def _is_weight_quantizer(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    return leaf == "weight_quantizer" or leaf.endswith("_weight_quantizer") or \
        (leaf.isdigit() and parent.endswith("weight_quantizers"))


def needs_amax(q) -> bool:
    """An enabled quantizer whose export reads a calibrated amax (not dynamic, constant or MX)."""
    if not getattr(q, "is_enabled", False):
        return False
    if getattr(q, "_dynamic", False) or getattr(q, "_use_constant_amax", False):
        return False
    if getattr(q, "_constant_amax", None) is not None or getattr(q, "is_mx_format", False):
        return False
    return getattr(q, "_calibrator", None) is not None


def _group(name: str) -> tuple:
    """Quantizers that play the same part in every layer: (native module, role)."""
    p = amax_io.parse_quantizer(name)
    return (p.kind, p.module, p.role, p.projs)


def repair_amax(model, ledger: "patches.Ledger") -> list[dict]:
    """Give every enabled activation quantizer with a bad amax a fallback; the list of repairs.

    Also checks weight quantizers (AmaxError on NaN/inf/negative) and sets the model's largest
    calibrated activation amax as the export-time fallback of patch 3 on `ledger`, which records
    every repair by quantizer name.
    """
    import torch

    ledger.attach(model)
    quantizers = list(iter_quantizers(model))
    weight_problems, bad, valid = [], [], {}
    for name, q in quantizers:
        if not needs_amax(q):
            continue
        raw = q._buffers.get("_amax")
        problem = amax_io.amax_problem(raw)
        if _is_weight_quantizer(name):
            if problem in ("nan", "inf", "negative"):
                weight_problems.append(f"{name}: {problem} {amax_io.sample(raw)}")
            continue
        if problem is None:
            valid.setdefault(_group(name), []).append((name, raw))
        else:
            bad.append((name, q, raw, problem))
    if weight_problems:
        raise AmaxError("weight amax that no fallback can fix (the weights themselves are not finite):\n  "
                        + "\n  ".join(weight_problems[:20]))
    all_valid = [float(t.float().max()) for group in valid.values() for _, t in group]
    global_max = max(all_valid) if all_valid else None
    ledger.set_fallback(global_max, f"largest calibrated activation amax in the model "
                                    f"({len(all_valid)} quantizers)" if all_valid else None)
    repairs = []
    for name, q, raw, problem in bad:
        peers = valid.get(_group(name), [])
        if peers:
            value = max(float(t.float().max()) for _, t in peers)
            p = amax_io.parse_quantizer(name)
            source = f"largest of {len(peers)} calibrated {p.module or p.kind} {p.role} quantizers in other layers"
            shape = peers[0][1].shape
        elif global_max is not None:
            value, source, shape = global_max, f"largest calibrated activation amax in the model ({len(all_valid)} quantizers)", ()
        else:
            raise AmaxError(f"{name}: amax {problem} and no activation quantizer in the model has a calibrated "
                            "amax to fall back on; calibration saw no data")
        if raw is not None and raw.numel() > 1:
            a = raw.detach().float().cpu().clone()
            a[~torch.isfinite(a) | (a <= 0)] = value
            new = a.to(raw.dtype)
        else:
            new = torch.full(tuple(raw.shape) if raw is not None else tuple(shape), value, dtype=torch.float32)
        if "_amax" in q._buffers:
            del q._buffers["_amax"]
        q.register_buffer("_amax", new)
        values = amax_io.sample(raw) if raw is not None else None
        ledger.record(name, problem, values, value, source, "repair_amax (before export)")
        repairs.append({"quantizer": name, "problem": problem, "values": values, "replacement": value,
                        "fallback": source})
    return repairs


def validate_amax(model) -> dict:
    """Counts of quantizers by amax status, without changing anything (for reports and tests)."""
    counts = {"quantizers": 0, "need_amax": 0, "ok": 0}
    problems = {}
    for name, q in iter_quantizers(model):
        counts["quantizers"] += 1
        if not needs_amax(q):
            continue
        counts["need_amax"] += 1
        problem = amax_io.amax_problem(q._buffers.get("_amax"))
        if problem is None:
            counts["ok"] += 1
        else:
            problems[name] = problem
    counts["problems"] = problems
    return counts


# ---------------------------------------------------------------------------------------------
# snapshot, token counts, the hook

def snapshot(model, run_dir: str | Path, metadata: dict | None = None) -> dict:
    """Write every quantizer's amax-like tensors to `<run_dir>/amax.safetensors` (atomic).

    The metadata lists every enabled quantizer that needs a calibrated amax, so a reader can tell
    a quantizer that never got one ("missing") from one that does not exist."""
    enabled = [name for name, q in iter_quantizers(model) if needs_amax(q)]
    return write_snapshot(run_dir, snapshot_tensors(model), enabled, metadata)


def write_snapshot(run_dir: str | Path, tensors: dict, enabled: list[str], metadata: dict | None = None) -> dict:
    """`<run_dir>/amax.safetensors` from tensors gathered elsewhere (a driver that never holds the
    whole model collects them block by block); `enabled` as `snapshot` lists them."""
    path = Path(run_dir) / amax_io.SNAPSHOT
    amax_io.save_snapshot(path, tensors, metadata={**(metadata or {}), "enabled_quantizers": list(enabled)})
    return {"path": str(path), "tensors": len(tensors), "bytes": path.stat().st_size}


def write_token_counts(run_dir: str | Path, counts: dict[str, list[int]]) -> str:
    path = Path(run_dir) / amax_io.TOKEN_COUNTS
    atomic.write_json(path, counts)
    return str(path)


def modelopt_token_counts(model) -> dict[str, list[int]]:
    """modelopt's own `expert_token_count` buffers (set only with moe_calib_experts_ratio)."""
    import re

    out = {}
    for name, module in model.named_modules():
        t = getattr(module, "expert_token_count", None)
        m = re.match(r"^(?:model\.)?(layers|mtp)\.(\d+)\.mlp$", name)
        if m and t is not None and t.numel():
            out[f"{m.group(1)}.{int(m.group(2))}"] = t.detach().cpu().tolist()
    return out


def post_calibration(model, run_dir: str | Path, q: dict, ledger: "patches.Ledger", *, calib: dict | None = None,
                     token_counts: dict[str, list[int]] | None = None, model_path: str | None = None,
                     quant_cfg: dict | None = None, progress: bool = True, phase=None) -> dict:
    """The hook between calibration and export (both drivers). See the module docstring.

    `q` is the `quantize:` params section (stored in the manifest; `save_full_state` read from
    it); `ledger` the run's patch ledger (repairs are recorded there); `calib` is
    `data.describe_dataloader(...)`; `token_counts` comes from
    `data.ExpertTokenCounter.as_dict()` (else modelopt's own counters, else none);
    `quant_cfg` the quantization config used (its digest goes into the manifest); `phase(name)`
    an optional context manager factory marking the `snapshot` and `save_state` phases (e.g. of
    `memory.MemorySampler`). Returns a record of what was written and repaired.
    """
    from contextlib import nullcontext

    phase = phase or (lambda name: nullcontext())
    t0 = time.time()
    run_dir = Path(run_dir)
    model_path = model_path or (q.get("hf_ptq") or {}).get("pyt_ckpt_path")
    with phase("snapshot"):
        n = amax_to_cpu(model)
        ledger.attach(model)
        before = validate_amax(model)
        meta = {"run_dir": str(run_dir), "model_path": model_path, "quantizers": n,
                "amax_problems_before_repair": before["problems"], "versions": versions()}
        snap = snapshot(model, run_dir, metadata=meta)
        counts = token_counts if token_counts else modelopt_token_counts(model)
        counts_path = write_token_counts(run_dir, counts)
        repairs = repair_amax(model, ledger)
    if progress:
        print(f"[quantbook] amax snapshot: {snap['tensors']} tensors of {n} quantizers -> {snap['path']}")
    if progress and repairs:
        print(f"[quantbook] amax repaired for {len(repairs)} quantizers (see quantize.json 'amax_repairs'):")
        for r in repairs[:20]:
            print(f"    {r['quantizer']}: {r['problem']} -> {r['replacement']:g} ({r['fallback']})")
    with phase("save_state"):
        saved = save_cheap_state(model, run_dir / STATE_DIR, q=q, model_path=model_path, calib=calib,
                                 repairs=repairs, quant_cfg=quant_cfg, save_full=bool(q.get("save_full_state")))
    if progress:
        print(f"[quantbook] calibrated state: {saved['bytes'] / 2**20:.2f} MiB -> {saved['dir']}")
    return {"snapshot": snap, "token_counts": counts_path, "token_count_layers": len(counts),
            "quantizers": n, "amax_problems_before_repair": before["problems"], "amax_repairs": repairs,
            "state": saved, "seconds": round(time.time() - t0, 3)}


# ---------------------------------------------------------------------------------------------
# cheap state save / restore

def _file_record(path: Path) -> dict:
    from ..release.shards import file_sha256

    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def save_cheap_state(model, state_dir: str | Path, *, q: dict | None = None, model_path: str | None = None,
                     calib: dict | None = None, repairs: list | None = None, quant_cfg: dict | None = None,
                     save_full: bool = False) -> dict:
    """`modelopt_state` + quantizer tensors (+ optionally the full state) + manifest, atomically.

    Everything is written into `<state_dir>.partial`, the manifest (each file's size and sha256)
    last, and the directory then renamed onto `state_dir`: an interrupted save leaves the
    previous state intact and a partial directory that nothing reads.
    """
    import modelopt.torch.opt as mto
    import torch
    from safetensors.torch import save_file

    final = Path(state_dir)
    with atomic.partial_dir(final) as work:
        tensors = quantizer_tensors(model)
        with atomic.atomic_path(work / QUANTIZER_TENSORS) as tmp:
            save_file(tensors, str(tmp), metadata={"kind": "quantbook.quantizer_tensors"})
            os.chmod(tmp, 0o644)  # safetensors recreates the file with mode 0600
        with atomic.atomic_path(work / MODELOPT_STATE) as tmp:
            torch.save(mto.modelopt_state(model), tmp)
        files = [QUANTIZER_TENSORS, MODELOPT_STATE]
        if save_full:
            with atomic.atomic_path(work / FULL_STATE) as tmp:
                mto.save(model, tmp)
            files.append(FULL_STATE)
        quantizers = sum(1 for _ in iter_quantizers(model))
        manifest = {
            "kind": "quantbook.calibrated_state",
            "format": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model_identity(model_path) if model_path else None,
            "model_class": type(model).__name__,
            "versions": versions(),
            "params": q,
            "quant_cfg_sha256": quant_cfg_digest(quant_cfg) if quant_cfg else None,
            "quantizers": quantizers,
            "quantizer_tensors": len(tensors),
            "calibration": calib,
            "amax_repairs": repairs or [],
            "full_state": save_full,
            "files": {name: _file_record(work / name) for name in files},
        }
        atomic.write_json(work / MANIFEST, manifest)
    total = sum(r["size"] for r in manifest["files"].values())
    return {"dir": str(final), "bytes": total, "quantizers": quantizers, "tensors": len(tensors),
            "full_state": save_full}


def load_manifest(state_dir: str | Path, verify: bool = True) -> dict:
    """The state manifest; with `verify`, every file's size and sha256 checked."""
    state_dir = Path(state_dir)
    manifest = atomic.read_json(state_dir / MANIFEST)
    if manifest is None:
        raise StateError(f"{state_dir}: no {MANIFEST}; the calibrated state is missing or was interrupted "
                         "while being saved")
    if manifest.get("kind") != "quantbook.calibrated_state":
        raise StateError(f"{state_dir / MANIFEST}: not a quantbook calibrated state")
    if verify:
        for name, rec in manifest["files"].items():
            path = state_dir / name
            if not path.is_file():
                raise StateError(f"{path}: missing (listed in the manifest)")
            got = _file_record(path)
            if got != rec:
                raise StateError(f"{path}: size/sha256 {got} differ from the manifest's {rec}")
    return manifest


def check_model(manifest: dict, model_path: str | Path, force: bool = False) -> None:
    """Refuse a state calibrated on another checkpoint (config or weights differ)."""
    import warnings

    want = manifest.get("model")
    if not want:
        return
    have = model_identity(model_path)
    diffs = [k for k in ("config_sha256", "weights_id") if want.get(k) != have.get(k)]
    if diffs:
        msg = (f"calibrated state was made on {want.get('path')} but the model to restore into is "
               f"{have['path']}: {', '.join(diffs)} differ")
        if not force:
            raise StateError(msg + " (force=True restores anyway)")
        warnings.warn("FORCED: " + msg, stacklevel=2)


def restore_into(model, state_dir: str | Path, *, model_path: str | None = None, force: bool = False,
                 ledger: "patches.Ledger | None" = None):
    """Turn a freshly loaded (unquantized) model into the calibrated one saved in `state_dir`.

    `mto.restore_from_modelopt_state` rebuilds the quantizers, then every saved quantizer
    tensor is loaded (every one must land: a missing or unexpected key is an error), amax goes
    to CPU and quantizer names are registered for the patches. Returns the restored model (use
    the return value: modelopt may replace the object).
    """
    import modelopt.torch.opt as mto
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    manifest = load_manifest(state_dir)
    if model_path:
        check_model(manifest, model_path, force=force)
    mstate = mto.load_modelopt_state(state_dir / MODELOPT_STATE, weights_only=False)
    model = mto.restore_from_modelopt_state(model, modelopt_state=mstate)
    tensors = load_file(str(state_dir / QUANTIZER_TENSORS))
    by_q: dict[str, dict] = {}
    for key, t in tensors.items():
        qname, attr = key.rsplit(".", 1)
        by_q.setdefault(qname, {})[attr] = t
    quantizers = dict(iter_quantizers(model))
    unknown = sorted(set(by_q) - set(quantizers))
    if unknown:
        raise StateError(f"{state_dir}: quantizer tensors for modules the restored model lacks: {unknown[:10]}")
    for qname, sub in by_q.items():
        q = quantizers[qname]
        device = next((t.device for t in q._buffers.values() if t is not None and not t.is_meta), None)
        sub = {k: (v.to(device) if device is not None else v) for k, v in sub.items()}
        missing, unexpected = q.load_state_dict(sub, strict=False)
        if unexpected:
            raise StateError(f"{qname}: saved tensors {unexpected} have no slot in the restored quantizer")
        leftover = [k for k in missing if k in q._buffers and q._buffers[k] is not None]
        if leftover:
            raise StateError(f"{qname}: restored quantizer expects {leftover} but the state has none")
    if len(quantizers) != manifest["quantizers"]:
        raise StateError(f"restored model has {len(quantizers)} quantizers, the state recorded "
                         f"{manifest['quantizers']}")
    amax_to_cpu(model)
    if ledger is not None:
        ledger.attach(model)
    return model


# ---------------------------------------------------------------------------------------------
# layerwise checkpoint signature

def layerwise_paths(run_dir: str | Path) -> dict:
    base = Path(run_dir) / LAYERWISE_DIR
    return {"dir": base, "ckpt": base / LAYERWISE_CKPT, "counts": base / LAYERWISE_COUNTS,
            "signature": base / SIGNATURE}


def layerwise_signature(*, model_path: str, settings: dict, quant_cfg: dict, calib: dict,
                        save_every: int) -> dict:
    """What must be equal for a layerwise checkpoint to be resumed."""
    keys = ("qformat", "kv_cache_qformat", "recipe", "dataset", "calib_size", "calib_seq", "batch_size",
            "moe_calib_experts_ratio", "awq_block_size")
    return {
        "kind": "quantbook.layerwise_signature",
        "model": {k: v for k, v in model_identity(model_path).items() if k != "path"},
        "params": {k: settings.get(k) for k in keys},
        "save_every": save_every,
        "quant_cfg_sha256": quant_cfg_digest(quant_cfg),
        "calibration": {k: calib.get(k) for k in ("samples", "tokens", "positions", "sha256")},
        "versions": versions(),
    }


def signature_diff(a, b, prefix="") -> list[str]:
    """Every leaf where two signatures differ: `key.path: checkpoint has X, this run Y`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += signature_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint has {a!r}, this run {b!r}"]


def modelopt_progress(ckpt_dir: str | Path) -> dict | None:
    """modelopt's layerwise manifest (last_completed_layer, num_layers, ...) or None."""
    return atomic.read_json(Path(ckpt_dir) / "manifest.json")


def check_layerwise_dir(run_dir: str | Path, signature: dict) -> dict:
    """Sign a fresh layerwise directory, or verify it before resuming. Returns the plan.

    {"resume": bool, "start_layer": int, "num_layers": int | None}. Raises StaleCheckpoint when
    the directory holds progress from another model, data, settings or versions, or progress
    with no signature (written outside quantbook).
    """
    paths = layerwise_paths(run_dir)
    progress = modelopt_progress(paths["ckpt"])
    have = atomic.read_json(paths["signature"])
    if progress is not None:
        if have is None:
            raise StaleCheckpoint(f"{paths['ckpt']} holds layerwise progress but no {SIGNATURE}: it was not "
                                  "written by this run; move it away or use another run id")
        diffs = signature_diff(have, signature)
        if diffs:
            raise StaleCheckpoint(f"{paths['dir']} was written for a different calibration; refusing to resume "
                                  "from it (use another run id, or delete the directory to recalibrate):\n  "
                                  + "\n  ".join(diffs[:20]))
        last, total = progress.get("last_completed_layer"), progress.get("num_layers")
        if last is not None and total is not None and last + 1 < total:
            return {"resume": True, "start_layer": last + 1, "num_layers": total}
        # finished before: modelopt recalibrates from layer 0
        shutil.rmtree(paths["ckpt"])
        shutil.rmtree(paths["counts"], ignore_errors=True)
        atomic.write_json(paths["signature"], signature)
        return {"resume": False, "start_layer": 0, "num_layers": total, "recalibrating_finished_dir": True}
    # no progress committed: start clean under this signature
    if paths["ckpt"].exists():
        shutil.rmtree(paths["ckpt"])
    shutil.rmtree(paths["counts"], ignore_errors=True)
    atomic.write_json(paths["signature"], signature)
    return {"resume": False, "start_layer": 0, "num_layers": None}
