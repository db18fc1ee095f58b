"""Step 1: the released FP8/FP4 checkpoint -> a plain BF16 checkpoint, exact and resumable.

plan() reads every header and the index and refuses anything outside the V4 format before a
byte is written; check_destination() refuses a destination that would mix runs or not fit;
run() converts shard by shard in parallel, each shard streamed in bounded chunks into a
temporary file that is renamed when whole and then recorded (size, xxh3-128) in the manifest.
A rerun skips recorded shards whose bytes still hash the same, so an interrupted run resumed
gives the same bytes as an uninterrupted one.

Memory bound: each worker holds one chunk of at most `chunk_elems` logical elements (rows of
one tensor) plus a 16 MiB copy buffer: peak RSS above the interpreter stays under
32 MiB + workers x (BYTES_PER_CHUNK_ELEM x chunk_elems + 48 MiB), whatever the tensor and shard
sizes. The 32 MiB are paid once per process: torch's kernels paged in at their first use (about
23 MiB measured). Arithmetically a chunk needs ~10 B per element (input, fp32 values, bf16
output, NaN mask); 64 B covers what the allocator keeps (measured 45 B and ~35 MiB per worker on
CPU, tests/test_convert.py::test_memory_stays_bounded). Default: 4 Mi elements -> <= 304 MiB a
worker.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .. import atomic
from ..errors import FormatError
from . import resume
from .dequant import dequant_fp4, dequant_fp8
from .format import (
    FP4_WEIGHT, FP8_BLOCK, FP8_WEIGHT, SCALE, TensorSpec, bf16_config, dequant_shape, expected_tensors, load_config,
    scale_of_weight, weight_of_scale,
)
from .resume import Job, free_disk, run_shards
from .shards import DTYPE_SIZE, HASH, INDEX_NAME, ShardWriter, TensorEntry, read_header, read_index, read_range

MANIFEST = "quantbook-dequant.json"
DEFAULT_CHUNK_ELEMS = 4 * 1024 * 1024
BYTES_PER_CHUNK_ELEM = 64
WORKER_OVERHEAD = 48 * 2**20
PROCESS_OVERHEAD = 32 * 2**20
SCALE_DTYPES = ("F8_E8M0", "F32")


@dataclass
class Op:
    """One output tensor: a plain copy, or a quantized weight dequantized with its scale."""

    out_name: str
    out_dtype: str
    out_shape: tuple[int, ...]
    kind: str
    src: TensorEntry
    src_shard: Path
    scale: TensorEntry | None = None
    scale_shard: Path | None = None


@dataclass
class ShardPlan:
    name: str
    ops: list[Op]

    @property
    def bytes_out(self) -> int:
        return sum(_nbytes(o.out_dtype, o.out_shape) for o in self.ops)


@dataclass
class Plan:
    src: Path
    dst: Path
    config: dict
    source_id: str
    shards: list[ShardPlan]
    extra_files: list[str]
    accounting: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)  # shard name -> ShardHeader, as validated

    @property
    def bytes_in(self) -> int:
        return sum(r["bytes_in"] for r in self.accounting["by_dtype"].values())

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.shards)


def _nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * DTYPE_SIZE[dtype]


def _check_tensor(name: str, entry: TensorEntry, shard: str, spec: TensorSpec | None) -> None:
    if spec is None:
        raise FormatError(f"shard {shard}: tensor {name} ({entry.dtype}{list(entry.shape)}) is not part of the V4 format")
    ok_dtypes = SCALE_DTYPES if spec.kind == SCALE else (spec.dtype,)
    if entry.dtype not in ok_dtypes:
        raise FormatError(
            f"shard {shard}: tensor {name}: dtype {entry.dtype}, the V4 format has {' or '.join(ok_dtypes)} here"
        )
    if entry.shape != spec.shape:
        what = "scale" if spec.kind == SCALE else "tensor"
        raise FormatError(
            f"shard {shard}: {what} {name}: shape {list(entry.shape)}, config.json implies {list(spec.shape)}"
        )


SAMPLE_BYTES = 1 << 20


def source_identity(src: Path, index: dict, headers: dict) -> str:
    """A cheap fingerprint of a release: config, index, every shard's header and size, and 3 MiB
    of each shard's data (start, middle, end), so two releases with equal shapes still differ."""
    h = hashlib.sha256()
    h.update((src / "config.json").read_bytes())
    h.update(json.dumps(index, sort_keys=True).encode())
    for name in sorted(headers):
        hd = headers[name]
        h.update(name.encode())
        h.update(str(hd.file_size).encode())
        h.update(json.dumps({k: [v.dtype, v.shape, v.start] for k, v in hd.tensors.items()}, sort_keys=True).encode())
        for at in (0, hd.file_size // 2, hd.file_size - SAMPLE_BYTES):
            at = max(0, at)
            h.update(read_range(hd.path, at, min(SAMPLE_BYTES, hd.file_size - at)))
    return h.hexdigest()


def _validate_tensors(headers: dict, weight_map: dict, expected: dict) -> dict[str, str]:
    """Every header tensor against the index and the config's table, and every indexed tensor
    present; returns each tensor's shard (tensor name -> shard)."""
    where: dict[str, str] = {}
    for s, hd in headers.items():
        for name, entry in hd.tensors.items():
            if weight_map.get(name) != s:
                raise FormatError(f"shard {s}: tensor {name} is in the shard but the index maps it to "
                                  f"{weight_map.get(name)}")
            _check_tensor(name, entry, s, expected.get(name))
            where[name] = s
    for name, s in weight_map.items():
        if name not in headers[s].tensors:
            raise FormatError(f"shard {s}: tensor {name} is listed in the index but absent from the shard")
    return where


def _shard_ops(s: str, headers: dict, where: dict, expected: dict, paths: dict, acct: dict) -> list[Op]:
    """The ops of shard `s` in file order, counted into `acct` (scales consumed, not written). One
    dict lookup per count: this loop runs once per tensor of the release (145,116 at V4 Pro's size)."""
    by_dtype = acct["by_dtype"]
    hd = headers[s]
    ops = []
    for name, entry in sorted(hd.tensors.items(), key=lambda kv: kv[1].start):
        spec = expected[name]
        kind, nbytes = spec.kind, entry.nbytes
        row = by_dtype[entry.dtype]
        row["tensors_in"] += 1
        row["bytes_in"] += nbytes
        if kind == SCALE:
            w = weight_of_scale(name)
            if w not in where:
                raise FormatError(f"shard {s}: scale {name} has no weight {w}")
            acct["scales_consumed"] += 1
            acct["scale_bytes_consumed"] += nbytes
            continue
        if kind in (FP8_WEIGHT, FP4_WEIGHT):
            sc = scale_of_weight(name)
            if sc not in where:
                raise FormatError(f"shard {s}: quantized weight {name} has no scale {sc}")
            sshard = paths[where[sc]]
            op = Op(name, "BF16", dequant_shape(spec), kind, entry, paths[s], headers[where[sc]].tensors[sc], sshard)
            acct["fp8_weights" if kind == FP8_WEIGHT else "fp4_weights"] += 1
            out_bytes = _nbytes("BF16", op.out_shape)
        else:
            op = Op(name, entry.dtype, entry.shape, kind, entry, paths[s])
            out_bytes = nbytes  # its own dtype and shape: read_header checked they give these bytes
        row = by_dtype[op.out_dtype]
        row["tensors_out"] += 1
        row["bytes_out"] += out_bytes
        ops.append(op)
    return ops


def plan(src: str | Path, dst: str | Path) -> Plan:
    """Validate the whole source (all headers, index, names, dtypes, shapes, pairs) and plan the output."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not (src / "config.json").exists():
        raise FormatError(f"{src}: no config.json (is this a checkpoint directory?)")
    config = load_config(src)
    index = read_index(src)
    expected = expected_tensors(config)
    shard_names = sorted(set(index["weight_map"].values()))
    headers = {s: read_header(src / s) for s in shard_names}
    on_disk = {p.name for p in src.glob("*.safetensors")}
    stray = sorted(on_disk - set(shard_names))
    if stray:
        raise FormatError(f"shard {stray[0]}: on disk but not in {INDEX_NAME} ({len(stray)} such files)")

    where = _validate_tensors(headers, index["weight_map"], expected)
    total = sum(e.nbytes for hd in headers.values() for e in hd.tensors.values())
    declared = index.get("metadata", {}).get("total_size")
    if declared is not None and declared != total:
        raise FormatError(f"{INDEX_NAME}: total_size {declared} but the shards hold {total} tensor bytes")
    acct = {"by_dtype": defaultdict(lambda: {"tensors_in": 0, "bytes_in": 0, "tensors_out": 0, "bytes_out": 0}),
            "scales_consumed": 0, "scale_bytes_consumed": 0, "fp8_weights": 0, "fp4_weights": 0}
    paths = {s: src / s for s in shard_names}  # one Path a shard, shared by its ops (145,116 joins at V4 Pro's size)
    shards = [ShardPlan(s, _shard_ops(s, headers, where, expected, paths, acct)) for s in shard_names]
    missing = [n for n in expected if n not in where]
    if missing:
        raise FormatError(f"tensor {missing[0]}: config.json implies it but no shard holds it "
                          f"({len(missing)} such tensors)")
    acct["by_dtype"] = dict(acct["by_dtype"])
    extra = sorted(p.name for p in src.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix != ".safetensors"
                   and p.name not in (INDEX_NAME, "config.json"))
    return Plan(src, dst, config, source_identity(src, index, headers), shards, extra, acct, headers)


def _foreign(p: Plan):
    def foreign(manifest):
        if manifest.get("source_id") != p.source_id:
            return f"a run of another source ({manifest.get('source')})"
    return foreign


def check_destination(p: Plan) -> None:
    """Refuse a destination that is the source, inside it, foreign, or too small."""
    resume.check_destination(p.src, p.dst, MANIFEST, p.shards, _foreign(p))


def bytes_to_write(p: Plan) -> int:
    """Bytes of the BF16 copy still to write (shards an earlier run finished not counted), after
    refusing what `check_destination` refuses except a full disk (the preflight sums the disk)."""
    return resume.bytes_to_write(resume.check_owner(p.src, p.dst, MANIFEST, _foreign(p)), p.shards)


def _read_tensor_rows(path: Path, entry: TensorEntry, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    raw = read_range(path, entry.start + r0 * row_bytes, (r1 - r0) * row_bytes)
    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype).reshape(r1 - r0, *entry.shape[1:])


def _scale_dtype(entry: TensorEntry) -> torch.dtype:
    return torch.float32 if entry.dtype == "F32" else torch.uint8


def _nonfinite(kind: str, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> int:
    """Non-finite outputs of a chunk, cheaply: with E8M0 scales below 2^120 (V4 uses ~2^-10),
    only NaN codes (E4M3 S.1111.111) can give NaN or inf, so the 1-byte input is scanned
    instead of the 2-byte output. Anything else is counted on the output itself."""
    if s.dtype == torch.uint8 and int(s.max()) < 247:
        if kind == FP4_WEIGHT:
            return 0
        return int(((w & 0x7F) == 0x7F).sum())
    return int((~torch.isfinite(out)).sum())


def _dequant_op(op: Op, writer: ShardWriter, device: str, chunk_elems: int) -> int:
    """Dequantize one weight in row chunks, writing as it goes; returns the count of non-finite outputs."""
    rows, cols = op.out_shape
    step = max(1, chunk_elems // max(cols, 1))
    if op.kind == FP8_WEIGHT:
        step = max(FP8_BLOCK, step // FP8_BLOCK * FP8_BLOCK)
    nans = 0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w = _read_tensor_rows(op.src_shard, op.src, r0, r1, torch.uint8).to(device)
        if op.kind == FP8_WEIGHT:
            s0, s1 = r0 // FP8_BLOCK, -(-r1 // FP8_BLOCK)
            s = _read_tensor_rows(op.scale_shard, op.scale, s0, s1, _scale_dtype(op.scale)).to(device)
            out = dequant_fp8(w, s)
        else:
            s = _read_tensor_rows(op.scale_shard, op.scale, r0, r1, _scale_dtype(op.scale)).to(device)
            out = dequant_fp4(w, s)
        nans += _nonfinite(op.kind, w, s, out)
        writer.write(out.cpu().view(torch.int16).numpy())
    return nans


def convert_shard(sp: ShardPlan, dst: Path, device: str = "cpu", chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                  on_bytes=None) -> dict:
    """Write one output shard atomically; returns its size, digest and any non-finite counts."""
    entries = [(o.out_name, o.out_dtype, o.out_shape) for o in sp.ops]
    nans = {}
    with ShardWriter(dst / sp.name, entries, metadata={"format": "pt"}) as writer:
        for op in sp.ops:
            before = writer.written
            if op.kind in (FP8_WEIGHT, FP4_WEIGHT):
                n = _dequant_op(op, writer, device, chunk_elems)
                if n:
                    nans[op.out_name] = n
            else:
                writer.copy_range(op.src_shard, op.src.start, op.src.nbytes)
            if on_bytes:
                on_bytes(writer.written - before)
        size, digest = writer.finish()
    return {"size": size, HASH: digest, "nonfinite_values": nans}


def run(p: Plan, workers: int = 2, device: str = "cpu", chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        progress: bool = True) -> dict:
    """Convert every shard not already done and verified, then write index, config and side files."""
    check_destination(p)
    jobs = [Job(sp.name, sp.bytes_out, partial(convert_shard, sp, p.dst, device, chunk_elems)) for sp in p.shards]
    fresh = {"kind": "quantbook.dequant", "source": str(p.src), "source_id": p.source_id, "complete": False}
    manifest, skipped = run_shards(p.dst, MANIFEST, fresh, jobs, workers, device, "dequant", progress,
                                   stale_finals=(INDEX_NAME, "config.json"))
    for name in p.extra_files:
        atomic.write_bytes(p.dst / name, (p.src / name).read_bytes())
    weight_map = {o.out_name: sp.name for sp in p.shards for o in sp.ops}
    atomic.write_json(p.dst / INDEX_NAME, {"metadata": {"total_size": p.bytes_out}, "weight_map": weight_map})
    atomic.write_json(p.dst / "config.json", bf16_config(p.config))
    nonfinite = {k: v for r in manifest["shards"].values() for k, v in r.get("nonfinite_values", {}).items()}
    acct = dict(p.accounting, nonfinite_values=nonfinite, shards_skipped=skipped,
                shards_written=len(p.shards) - skipped)
    reconcile(acct, p.bytes_in, p.bytes_out)
    manifest.update(complete=True, accounting=acct)
    atomic.write_json(p.dst / MANIFEST, manifest)
    return acct


def reconcile(acct: dict, bytes_in: int, bytes_out: int) -> None:
    """Check the accounting adds up: what went in, minus scales and quantized bytes, plus BF16 out."""
    rows = acct["by_dtype"].values()
    if sum(r["bytes_in"] for r in rows) != bytes_in or sum(r["bytes_out"] for r in rows) != bytes_out:
        raise AssertionError("accounting does not match the plan's byte totals")
    t_in = sum(r["tensors_in"] for r in rows)
    t_out = sum(r["tensors_out"] for r in rows)
    if t_in - acct["scales_consumed"] != t_out:
        raise AssertionError(f"tensors in {t_in} - scales {acct['scales_consumed']} != tensors out {t_out}")


def accounting_rows(acct: dict) -> list[dict]:
    """The accounting as table rows (one per dtype plus a total), for the CLI and the notebook."""
    rows = [dict(dtype=d, **r) for d, r in sorted(acct["by_dtype"].items())]
    rows.append({"dtype": "total", **{k: sum(r[k] for r in rows) for k in
                                      ("tensors_in", "bytes_in", "tensors_out", "bytes_out")}})
    return rows


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: ("yes" if v else "NO") if isinstance(v, bool) else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    width = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def plan_summary(p: Plan, workers: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> list[dict]:
    """What the run will do, as rows for the notebook and the CLI: before any byte is written."""
    manifest = atomic.read_json(p.dst / MANIFEST) or {}
    done = [s for s in p.shards if s.name in manifest.get("shards", {})]
    gib = lambda n: f"{n / 2**30:,.3f} GiB"  # noqa: E731
    return [
        {"item": "source", "value": str(p.src)},
        {"item": "destination", "value": str(p.dst)},
        {"item": "shards", "value": f"{len(p.shards)} ({len(done)} recorded complete by an earlier run)"},
        {"item": "tensors in / out", "value": f"{sum(r['tensors_in'] for r in p.accounting['by_dtype'].values()):,}"
                                              f" / {sum(len(s.ops) for s in p.shards):,}"},
        {"item": "FP8 / FP4 weights to dequantize", "value": f"{p.accounting['fp8_weights']:,} / {p.accounting['fp4_weights']:,}"},
        {"item": "bytes in", "value": gib(p.bytes_in)},
        {"item": "bytes out (BF16)", "value": gib(p.bytes_out)},
        {"item": "free disk at destination", "value": gib(free_disk(p.dst))},
        {"item": "memory bound", "value": f"{memory_bound(workers, chunk_elems) / 2**20:,.0f} MiB ({workers} workers)"},
    ]


def memory_bound(workers: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> int:
    """Bytes of RSS the conversion may add above the interpreter (see the module docstring)."""
    return PROCESS_OVERHEAD + workers * (BYTES_PER_CHUNK_ELEM * chunk_elems + WORKER_OVERHEAD)


def verify_sample(p: Plan, n: int = 8, seed: int = 0) -> list[dict]:
    """Re-derive a random sample of output tensors from the source and compare bytes.

    Quantized weights are dequantized again whole (not in chunks) and compared with what the
    output shard holds, read through the safetensors library rather than this module's reader;
    plain tensors must be byte-identical. Catches I/O, ordering and chunking mistakes on the real
    checkpoint in seconds; the math itself is proven against an independent reference in tests.
    """
    import random

    from safetensors import safe_open

    ops = [(sp, op) for sp in p.shards for op in sp.ops]
    quant = [x for x in ops if x[1].kind in (FP8_WEIGHT, FP4_WEIGHT)]
    plain = [x for x in ops if x[1].kind not in (FP8_WEIGHT, FP4_WEIGHT)]
    rng = random.Random(seed)
    sample = rng.sample(quant, min(n, len(quant))) + rng.sample(plain, min(max(1, n // 2), len(plain)))
    rows = []
    for sp, op in sample:
        with safe_open(str(p.dst / sp.name), "pt") as f:
            got = f.get_tensor(op.out_name)
        if op.kind in (FP8_WEIGHT, FP4_WEIGHT):
            w = _read_tensor_rows(op.src_shard, op.src, 0, op.src.shape[0], torch.uint8)
            s = _read_tensor_rows(op.scale_shard, op.scale, 0, op.scale.shape[0], _scale_dtype(op.scale))
            want = (dequant_fp8 if op.kind == FP8_WEIGHT else dequant_fp4)(w, s)
            same = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        else:
            want = read_range(op.src_shard, op.src.start, op.src.nbytes)
            same = got.contiguous().view(torch.uint8).numpy().tobytes() == bytes(want)
        rows.append({"tensor": op.out_name, "shard": sp.name, "kind": op.kind, "dtype": op.out_dtype,
                     "shape": "x".join(map(str, op.out_shape)), "identical": same})
    return rows


def require_identical(rows: list[dict]) -> None:
    """Raise FormatError naming every sampled tensor whose output differs from the source's dequantization."""
    bad = [r["tensor"] for r in rows if not r["identical"]]
    if bad:
        raise FormatError(f"output differs from the source's dequantization: {bad}")


def dequantize(src, dst, workers: int = 2, device: str = "cpu", chunk_elems: int = DEFAULT_CHUNK_ELEMS,
               progress: bool = True) -> dict:
    """plan -> check -> run: the one call behind `quantbook dequant` and notebook 01."""
    p = plan(src, dst)
    return run(p, workers=workers, device=device, chunk_elems=chunk_elems, progress=progress)
