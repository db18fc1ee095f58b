"""One output shard of the v4-serving layout, written at the disk's speed.

A shard is the release's shard with its routed experts replaced: every other tensor's bytes are
copied as they are (`ShardWriter.copy_range`), and each expert projection becomes its four NVFP4
tensors (export.nvfp4): carried from the release (codes copied unchanged, scales through a table;
the lossy blocks re-quantized and named) or re-quantized from the calibrated amax (CPU tables, or
modelopt's calls batched on the GPU). Projections are computed by a small thread pool a few
windows ahead of the writer, which takes them strictly in shard order; torch, numpy, file I/O
and xxhash release the GIL. The shard goes to `<name>.partial`, is hashed as it is written,
fsynced and renamed (`ShardWriter`), so `release.resume` records, verifies and resumes it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FormatError, LayoutError
from ..release.format import FP4_GROUP, expert_name, expert_prefix
from ..release.shards import DTYPE_SIZE, HASH, Checkpoint, ShardWriter
from . import nvfp4


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

    def resolved(self, any_requant: bool) -> "Settings":
        method = self.method or nvfp4.default_method(self.device)
        if method not in nvfp4.METHODS:
            raise LayoutError(f"re-quantize method {method!r}: choose one of {list(nvfp4.METHODS)}")
        threads = self.threads if self.threads is not None else (2 if any_requant else 1)
        window = self.window or (8 if method == "table" or not any_requant else
                                 32 if str(self.device).startswith("cuda") else 4)
        return Settings(self.carry, self.amax, self.device, method, max(1, threads), max(1, window), self.scalars)


class _Experts:
    """Computes a shard's expert projections: a list of byte segments and stats per projection."""

    def __init__(self, reader: Checkpoint, s: Settings):
        self.reader, self.s = reader, s
        self._tls = threading.local()

    def _read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        e = self.reader.entry(name)
        buf = np.empty(e.shape, np.uint8) if out is None else out
        return read_into(self.reader.path(name), e.start, buf)

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
        else:  # the released codes, copied by the writer without entering Python
            e = self.reader.entry(f"{prefix}.weight")
            first = ("copy", self.reader.path(f"{prefix}.weight"), e.start, e.nbytes)
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
            by_shape.setdefault(tuple(self.reader.entry(f"{p}.weight").shape), []).append(p)
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
        return done


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

    def add(self, prefix: str, stats: dict) -> None:
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
        return rec


def write_shard(path, entries: list, ops: list, reader: Checkpoint, s: Settings, on_bytes=None) -> dict:
    """Write one planned output shard to `path` atomically; returns its manifest record.

    `entries`: the output's (name, dtype, shape) in order; `ops`: ("copy", TensorEntry of the
    release) or ("expert", projection prefix), whose four entries follow in `entries`. The record
    holds size and digest, and: carried blocks (`cast_blocks`, `cast_lossless`, `cast_lossy`
    {tensor: lossy 32-blocks}) when anything was carried; weight amax that are not max |w| of
    the release (`weight_amax_not_release_max`) when re-quantizing.
    """
    experts = [what for kind, what in ops if kind == "expert"]
    carried = any(s.carry(p) for p in experts)
    s = s.resolved(any_requant=any(not s.carry(p) for p in experts))
    windows = [experts[k:k + s.window] for k in range(0, len(experts), s.window)]
    window_of = {p: w for w, ps in enumerate(windows) for p in ps}
    ahead = _Ahead(_Experts(reader, s), windows, s.threads)
    tally, ready, at = _Tally(), {}, 0
    try:
        with ShardWriter(path, entries, metadata={"format": "pt"}) as writer:
            for kind, what in ops:
                before = writer.written
                if kind == "copy":
                    writer.copy_range(reader.path(what.name), what.start, what.nbytes)
                    planned, at = entries[at:at + 1], at + 1
                else:
                    if what not in ready:
                        ready.update(ahead.result(window_of[what]))
                    segments, stats = ready.pop(what)
                    for seg in segments:
                        if seg[0] == "copy":
                            writer.copy_range(*seg[1:])
                        else:
                            writer.write(seg[1])
                    tally.add(what, stats)
                    planned, at = entries[at:at + 4], at + 4
                want = sum(int(np.prod(shape)) * DTYPE_SIZE[dtype] for _, dtype, shape in planned)
                if writer.written - before != want:
                    raise AssertionError(f"{planned[0][0]}: wrote {writer.written - before} bytes, planned {want}")
                if on_bytes:
                    on_bytes(writer.written - before)
            size, digest = writer.finish()
    finally:
        ahead.close()
    return {"size": size, HASH: digest, **tally.record(carried)}
