"""One output shard of the v4-serving layout, written at the disk's speed.

A shard is the release's shard with its routed experts replaced: every other tensor's bytes are
copied as they are (`ShardWriter.copy_range`), and each expert projection becomes its four NVFP4
tensors (export.nvfp4): carried from the release (codes copied unchanged, scales through a table;
the lossy blocks re-quantized and named) or re-quantized from the calibrated amax (CPU tables, or
modelopt's calls batched on the GPU). Projections are computed by a small thread pool a few
windows ahead of the writer, which takes them strictly in shard order; torch, numpy, file I/O
and xxhash release the GIL. The shard goes to `<name>.partial`, is hashed as it is written,
fsynced and renamed (`ShardWriter`), so `release.resume` records, verifies and resumes it.
Projections named in `Settings.check` also get `quantbook verify`'s check 7 numbers, computed on
the bytes written while they are in memory (step 02's pass: verify then need not read them again).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FormatError, LayoutError
from ..release.format import FP4_GROUP, expert_name, expert_prefix
from ..release.shards import DTYPE_SIZE, HASH, Checkpoint, ShardWriter
from . import numeric, nvfp4


def read_into(path, start: int, out: np.ndarray) -> np.ndarray:
    """Fill `out` (a contiguous uint8 array) with the file's bytes from `start`."""
    view = memoryview(out.reshape(-1))
    got = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while got < view.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise FormatError(f"shard {path}: short read at offset {start + got}")
            got += n
    return out


def group_of(prefix: str) -> list[str]:
    """The projections sharing `prefix`'s amax and k_max: w1 and w3, or w2 alone."""
    x = expert_name(prefix)
    return [expert_prefix(x.layer, x.expert, q, x.block) for q in (("w1", "w3") if x.proj in ("w1", "w3") else ("w2",))]


class Scalars:
    """modelopt's `weight_scale_2` / `input_scale` per distinct amax, computed once (shared by shards)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict = {}

    def get(self, kind: str, amax: torch.Tensor) -> tuple[torch.Tensor, bytes]:
        a = amax.detach().to("cpu", torch.float32).reshape(())
        key = (kind, int(a.view(torch.int32)))
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            t = (nvfp4.weight_scale_2 if kind == "ws2" else nvfp4.input_scale)(a).reshape(()).to("cpu").contiguous()
            hit = (t, nvfp4.f32_bytes(t))
            with self._lock:
                self._cache[key] = hit
        return hit


@dataclass
class Settings:
    """How a shard's experts are computed. `carry(prefix)`: carried (True) or re-quantized."""

    carry: object  # callable(prefix) -> bool
    amax: object  # callable(prefix) -> (weight amax, input amax), 0-d F32
    device: str = "cpu"
    method: str | None = None  # re-quantize: "table" | "modelopt" (default for the device)
    threads: int | None = None  # compute threads ahead of the writer (default 1 carrying, else 2)
    window: int | None = None  # projections per compute task (the batch of the modelopt method)
    scalars: Scalars = field(default_factory=Scalars)
    check: frozenset = frozenset()  # projections whose numbers (verify's check 7) are taken from the bytes written

    def resolved(self, any_requant: bool) -> "Settings":
        method = self.method or nvfp4.default_method(self.device)
        if method not in nvfp4.METHODS:
            raise LayoutError(f"re-quantize method {method!r}: choose one of {list(nvfp4.METHODS)}")
        threads = self.threads if self.threads is not None else (2 if any_requant else 1)
        window = self.window or (8 if method == "table" or not any_requant else
                                 32 if str(self.device).startswith("cuda") else 4)
        return Settings(self.carry, self.amax, self.device, method, max(1, threads), max(1, window), self.scalars,
                        self.check)


class FileSource:
    """The release's bytes on disk: expert tensors read into memory, every other tensor copied
    from file to file (step 03, and a shard the streaming pass left for the end)."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck

    def entry(self, name: str):
        return self.ck.entry(name)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor's bytes [its shape] in an array the caller may change."""
        e = self.ck.entry(name)
        return read_into(self.ck.path(name), e.start, np.empty(e.shape, np.uint8) if out is None else out)

    def segment(self, name: str) -> tuple:
        """The tensor's bytes unchanged, as the writer takes them (a file range: never enters Python)."""
        e = self.ck.entry(name)
        return ("copy", self.ck.path(name), e.start, e.nbytes)


class BlockSource(FileSource):
    """A block's release bytes already in memory (the streaming pass's read buffer, `raw`: views
    with the release's dtypes and shapes): the pass writes the block's shard without reading the
    release again, and the gate takes the export's tensors from the same computation."""

    def __init__(self, ck: Checkpoint, raw: dict):
        super().__init__(ck)
        self.raw = raw

    def _bytes(self, name: str) -> np.ndarray:
        return self.raw[name].reshape(-1).view(torch.uint8).numpy()

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        data = self._bytes(name)
        if out is None:
            return data.reshape(self.ck.entry(name).shape).copy()  # the buffer stays as read
        out.reshape(-1)[:] = data
        return out

    def segment(self, name: str) -> tuple:
        return ("bytes", self._bytes(name))


def source_of(reader) -> FileSource:
    """A source for `reader`: a Checkpoint (the files) or a source already."""
    return reader if isinstance(reader, FileSource) else FileSource(reader)


class _Experts:
    """Computes a shard's expert projections: a list of byte segments and stats per projection."""

    def __init__(self, source: FileSource, s: Settings):
        self.source, self.s = source, s
        self._tls = threading.local()

    def _read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self.source.read(name, out)

    def _scale(self, prefix: str) -> np.ndarray:
        s = self._read(f"{prefix}.scale")
        if bool((s == 0xFF).any()):
            raise LayoutError(f"{prefix}.scale: E8M0 NaN (0xFF) in the release")
        return s

    def _tail(self, prefix: str, scale: np.ndarray, ws2: bytes) -> bytes:
        """weight_scale bytes, weight_scale_2, input_scale: what follows the codes."""
        _, input_amax = self.s.amax(prefix)
        return np.ascontiguousarray(scale).tobytes() + ws2 + self.s.scalars.get("in", input_amax)[1]

    def carry(self, prefix: str):
        s = self._scale(prefix)
        k_max = int(s.max())
        for g in group_of(prefix):
            if g != prefix:
                k_max = max(k_max, int(self._scale(g).max()))
        scale, ws2, lossy = nvfp4.carry_scales(s, k_max)
        if lossy.size:
            codes = self._read(f"{prefix}.weight")
            nvfp4.requantize_lossy(codes, s, scale, ws2, lossy)
            first = ("bytes", codes)
        else:  # the released codes unchanged
            first = self.source.segment(f"{prefix}.weight")
        return [first, ("bytes", self._tail(prefix, scale, nvfp4.f32_bytes(ws2)))], \
            {"blocks": int(s.size), "lossy": int(lossy.size)}

    def requant_table(self, prefix: str):
        weight_amax, _ = self.s.amax(prefix)
        ws2, ws2_bytes = self.s.scalars.get("ws2", weight_amax)
        codes, s = self._read(f"{prefix}.weight"), self._read(f"{prefix}.scale")
        q, scale, own, self._tls.tables = nvfp4.requant_table(codes, s, ws2, getattr(self._tls, "tables", None))
        return [("bytes", q), ("bytes", self._tail(prefix, scale, ws2_bytes))], {"own": own, "amax": float(weight_amax)}

    def requant_batch(self, prefixes: list[str]) -> dict:
        out, by_shape = {}, {}
        for p in prefixes:
            by_shape.setdefault(tuple(self.source.entry(f"{p}.weight").shape), []).append(p)
        pin = str(self.s.device).startswith("cuda")
        for (rows, half), group in by_shape.items():
            codes = torch.empty(len(group), rows, half, dtype=torch.uint8, pin_memory=pin)
            s = torch.empty(len(group), rows, half // (FP4_GROUP // 2), dtype=torch.uint8, pin_memory=pin)
            ws2, amax = [], []
            for b, p in enumerate(group):
                self._read(f"{p}.weight", codes[b].numpy())
                self._read(f"{p}.scale", s[b].numpy())
                weight_amax, _ = self.s.amax(p)
                ws2.append(self.s.scalars.get("ws2", weight_amax))
                amax.append(float(weight_amax))
            q, scale, own = nvfp4.requant_modelopt(codes, s, torch.stack([t for t, _ in ws2]), self.s.device)
            for b, p in enumerate(group):
                out[p] = ([("bytes", q[b].numpy()), ("bytes", self._tail(p, scale[b].view(torch.uint8).numpy(),
                                                                            ws2[b][1]))],
                          {"own": float(own[b]), "amax": amax[b]})
        return out

    def window(self, prefixes: list[str]) -> dict:
        """The projections of one compute task, by prefix."""
        done = {p: self.carry(p) for p in prefixes if self.s.carry(p)}
        rest = [p for p in prefixes if p not in done]
        if rest and self.s.method == "modelopt":
            done.update(self.requant_batch(rest))
        else:
            done.update({p: self.requant_table(p) for p in rest})
        for p in set(prefixes) & self.s.check:
            t0 = time.perf_counter()
            numbers = self.numbers(p, done[p][0])
            if numbers is not None:
                done[p][1].update(numbers=numbers, numbers_s=time.perf_counter() - t0)
        return done

    def numbers(self, prefix: str, segments: list) -> dict | None:
        """Verify's check 7 on this projection's bytes as they are written (codes, weight_scale,
        weight_scale_2) against the release's MXFP4 in memory: the numbers `quantbook verify` computes
        from the files, bit for bit. None when the codes go file to file (not in memory: verify reads them)."""
        first, (_, tail) = segments
        if first[0] != "bytes":
            return None
        rcodes, rscale = (torch.from_numpy(self.source.read(f"{prefix}.{k}")) for k in ("weight", "scale"))
        codes = torch.from_numpy(np.ascontiguousarray(first[1]).reshape(-1).view(np.uint8)).view(rcodes.shape)
        nb = codes.numel() // (nvfp4.GROUP // 2)
        t = np.frombuffer(tail, np.uint8)
        scale = torch.from_numpy(t[:nb].copy()).view(codes.shape[0], -1)
        ws2 = torch.from_numpy(t[nb:nb + 4].copy()).view(torch.float32)
        return numeric.release_numbers(codes, scale, ws2, rcodes, rscale)


class _Ahead:
    """Compute tasks submitted a few windows ahead of the writer; results taken in order."""

    def __init__(self, work: _Experts, windows: list[list[str]], threads: int):
        self.work, self.windows = work, windows
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 and windows else None
        self.ahead = threads + 1
        self.futures: dict = {}
        self.submitted = 0

    def result(self, w: int) -> dict:
        if self.pool is None:
            return self.work.window(self.windows[w])
        while self.submitted < len(self.windows) and self.submitted <= w + self.ahead:
            self.futures[self.submitted] = self.pool.submit(self.work.window, self.windows[self.submitted])
            self.submitted += 1
        return self.futures.pop(w).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Tally:
    """What a shard's record says about its experts, accumulated in shard order."""

    def __init__(self):
        self.blocks = self.lossless = 0
        self.lossy: dict[str, int] = {}
        self.own: dict = {}
        self.mismatch: list[dict] = []
        self.numbers: dict[str, dict] = {}
        self.numbers_s = 0.0

    def add(self, prefix: str, stats: dict) -> None:
        if "numbers" in stats:
            self.numbers[prefix] = stats["numbers"]
            self.numbers_s += stats["numbers_s"]
        if "blocks" in stats:
            self.blocks += stats["blocks"]
            self.lossless += stats["blocks"] - stats["lossy"]
            if stats["lossy"]:
                self.lossy[f"{prefix}.weight"] = stats["lossy"]
            return
        # max calibration on the exact BF16 copy of this release gives weight amax = max |w| exactly
        # (w1/w3: the max of both); anything else means amax from another model, other weights or method
        x = expert_name(prefix)
        group = ("w1", "w3") if x.proj in ("w1", "w3") else ("w2",)
        seen = self.own.setdefault((x.block, x.layer, x.expert, group), {})
        seen[x.proj] = stats["own"]
        if len(seen) == len(group) and max(seen.values()) != stats["amax"]:
            self.mismatch.append({"projection": f"{x.block}.{x.layer}.ffn.experts.{x.expert}.{'/'.join(group)}",
                                  "amax": stats["amax"], "release_max": max(seen.values())})

    def record(self, carried: bool) -> dict:
        rec: dict = {}
        if self.mismatch:
            rec["weight_amax_not_release_max"] = self.mismatch
        if carried:
            rec["cast_blocks"], rec["cast_lossless"] = self.blocks, self.lossless
            if self.lossy:
                rec["cast_lossy"] = dict(sorted(self.lossy.items()))
        if self.numbers:
            rec["numbers"], rec["numbers_s"] = self.numbers, round(self.numbers_s, 3)
        return rec


def _planned(entries: list, ops: list, source: FileSource, s: Settings, tally: "_Tally"):
    """(the output entries of each op, its byte segments), in shard order: a copied tensor is one
    entry, an expert projection its four (`entries` as planned; `ops` as in `write_shard`)."""
    experts = [what for kind, what in ops if kind == "expert"]
    s = s.resolved(any_requant=any(not s.carry(p) for p in experts))
    windows = [experts[k:k + s.window] for k in range(0, len(experts), s.window)]
    window_of = {p: w for w, ps in enumerate(windows) for p in ps}
    ahead = _Ahead(_Experts(source, s), windows, s.threads)
    ready, at = {}, 0
    try:
        for kind, what in ops:
            if kind == "copy":
                yield entries[at:at + 1], [source.segment(what.name)]
                at += 1
                continue
            if what not in ready:
                ready.update(ahead.result(window_of[what]))
            segments, stats = ready.pop(what)
            tally.add(what, stats)
            yield entries[at:at + 4], segments
            at += 4
    finally:
        ahead.close()


def write_shard(path, entries: list, ops: list, reader, s: Settings, on_bytes=None) -> dict:
    """Write one planned output shard to `path` atomically; returns its manifest record.

    `entries`: the output's (name, dtype, shape) in order; `ops`: ("copy", TensorEntry of the
    release) or ("expert", projection prefix), whose four entries follow in `entries`; `reader`:
    the release (a Checkpoint: its files) or a source (`BlockSource`: a block in memory). The record
    holds size and digest, and: carried blocks (`cast_blocks`, `cast_lossless`, `cast_lossy`
    {tensor: lossy 32-blocks}) when anything was carried; weight amax that are not max |w| of
    the release (`weight_amax_not_release_max`) when re-quantizing; `numbers` {projection: verify's
    check 7 numbers} for the projections of `s.check` whose codes were in memory (`numbers_s`: the
    compute threads' seconds on them).
    """
    carried = any(s.carry(what) for kind, what in ops if kind == "expert")
    tally = _Tally()
    with ShardWriter(path, entries, metadata={"format": "pt"}) as writer, _scratch_freed(bool(s.check)):
        for planned, segments in _planned(entries, ops, source_of(reader), s, tally):
            before = writer.written
            for seg in segments:
                if seg[0] == "copy":
                    writer.copy_range(*seg[1:])
                else:
                    writer.write(seg[1])
            want = sum(_nbytes(dtype, shape) for _, dtype, shape in planned)
            if writer.written - before != want:
                raise AssertionError(f"{planned[0][0]}: wrote {writer.written - before} bytes, planned {want}")
            if on_bytes:
                on_bytes(writer.written - before)
        size, digest = writer.finish()
    return {"size": size, HASH: digest, **tally.record(carried)}


@contextmanager
def _scratch_freed(checked: bool):
    """The numeric check's per-thread buffers (~230 MB at Pro's expert shape) freed after the shard."""
    try:
        yield
    finally:
        if checked:
            numeric.release_scratch()


def _nbytes(dtype: str, shape) -> int:
    return int(np.prod(shape)) * DTYPE_SIZE[dtype]


def shard_tensors(entries: list, ops: list, source: FileSource, s: Settings) -> dict:
    """The tensors `write_shard` would write, in memory ({name: tensor} with the output's dtypes and
    shapes), from the same computation: the fidelity gate's candidate during the streaming pass."""
    from ..release.shards import torch_dtype

    out = {}
    for planned, segments in _planned(entries, ops, source, s, _Tally()):
        parts = [_segment_bytes(seg) for seg in segments]
        for name, dtype, shape in planned:
            data, parts = _take(parts, _nbytes(dtype, shape), name)
            out[name] = torch.from_numpy(data).view(torch_dtype(dtype)).reshape(shape)
        if any(p.size for p in parts):
            raise AssertionError(f"{planned[0][0]}: {sum(p.size for p in parts)} bytes computed beyond the plan")
    return out


def _take(parts: list, n: int, name: str) -> tuple[np.ndarray, list]:
    """The next `n` bytes of `parts` (a view when one part holds them all) and what is left."""
    if parts and parts[0].size >= n:
        return parts[0][:n], [parts[0][n:], *parts[1:]]
    got, left = [], n
    while left:
        if not parts:
            raise AssertionError(f"{name}: {n - left} bytes computed, planned {n}")
        head, parts = parts[0], parts[1:]
        got.append(head[:left])
        if head.size > left:
            parts = [head[left:], *parts]
        left -= got[-1].size
    return np.concatenate(got), parts


def _segment_bytes(seg: tuple) -> np.ndarray:
    """A segment's bytes as a writable uint8 array."""
    if seg[0] == "copy":
        _, path, start, nbytes = seg
        return read_into(path, start, np.empty(nbytes, np.uint8))
    data = seg[1]
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(bytearray(data), np.uint8)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
