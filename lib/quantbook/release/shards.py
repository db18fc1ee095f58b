"""safetensors files read and written as bytes: headers, byte ranges, streaming shard writes.

Reading goes through the header and file offsets only, so a validation pass over a 64-shard
release touches a few kilobytes per shard; `Checkpoint` reads a sharded directory that way, one
tensor at a time. Writing streams tensors in order into a temporary file that is renamed when
complete, so a shard on disk is either whole or absent. The dtype tables (bytes per element,
torch dtype per safetensors name) live here, beside the I/O that needs them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..errors import FormatError

INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype name -> bytes per element
DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_TORCH: dict = {}


def torch_dtype(dtype: str):
    """The torch dtype of a safetensors dtype name (F8_E8M0 -> torch.float8_e8m0fnu, ...)."""
    if not _TORCH:
        import torch

        _TORCH.update({
            "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
            "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu, "I16": torch.int16,
            "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
            "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64,
            "F64": torch.float64,
        })
    return _TORCH[dtype]
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict | None
    file_size: int


@contextmanager
def _gc_paused():
    """No cyclic garbage collection inside: parsing a header allocates thousands of objects that all
    stay alive, and the collector's passes over them cost more than the parse (3x on V4 Pro's 64 headers)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check one shard's header: sizes, offsets and dtypes, without reading data."""
    with _gc_paused():
        return _read_header(Path(path))


def _read_header(path: Path) -> ShardHeader:
    path = Path(path)
    shard = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"shard {shard}: file is missing ({path})") from None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"shard {shard}: truncated header ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"shard {shard}: corrupt header (declares {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"shard {shard}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"shard {shard}: corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    base = 8 + n
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(map(int, h["shape"])), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"shard {shard}: tensor {name}: corrupt header entry {h!r}") from None
        if dtype not in DTYPE_SIZE:
            raise FormatError(f"shard {shard}: tensor {name}: unknown dtype {dtype}")
        if e - b != math.prod(shape) * DTYPE_SIZE[dtype] or b < 0:
            raise FormatError(f"shard {shard}: tensor {name}: byte range {b}..{e} does not match {dtype}{list(shape)}")
        tensors[name] = TensorEntry(name, dtype, shape, base + b, base + e)
        spans.append((b, e, name))
    spans.sort()
    end = 0
    for b, e, name in spans:
        if b != end:
            raise FormatError(f"shard {shard}: tensor {name}: data starts at {b}, expected {end} (gap or overlap)")
        end = e
    if base + end != size:
        what = "truncated" if base + end > size else "has trailing bytes"
        raise FormatError(f"shard {shard}: {what} (header says {base + end} bytes, file has {size})")
    return ShardHeader(path, tensors, metadata, size)


def read_index(directory: str | Path) -> dict:
    path = Path(directory) / INDEX_NAME
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing (a sharded checkpoint needs its index)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: corrupt JSON ({e})") from None
    if "weight_map" not in index:
        raise FormatError(f"{path}: no weight_map")
    return index


def read_range(path: Path, start: int, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(buf) != nbytes:
            raise FormatError(f"shard {path.name}: short read at offset {start}")
    return buf


def read_into(path: Path, start: int, buf) -> None:
    """Fill `buf` (any writable buffer, e.g. a numpy array) with the file's bytes from `start`."""
    view = memoryview(buf).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        got = 0
        while got < view.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise FormatError(f"shard {Path(path).name}: short read at offset {start}")
            got += n


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """safetensors header bytes for tensors stored back to back in the given order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * DTYPE_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


HASH = "xxh3_128"  # integrity of finished shards (not security): 10+ GB/s, never the bottleneck


def new_hash():
    return xxhash.xxh3_128()


class ShardWriter:
    """Write one shard tensor by tensor into `<name>.partial`, hashing as it goes.

    `finish()` checks every declared byte was written, fsyncs and renames into place; anything
    else (an exception, a kill) leaves only the `.partial` file, which no reader takes for a shard.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        header = encode_header(entries, metadata)
        self.expected = len(header) + sum(math.prod(s) * DTYPE_SIZE[d] for _, d, s in entries)
        self.hash = new_hash()
        self.f = open(self.tmp, "wb")
        self.written = 0
        self._buf: bytearray | None = None
        self.write(header)

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.hash.update(mv)
        self.written += mv.nbytes

    def copy_range(self, src: Path, start: int, nbytes: int) -> None:
        """Copy bytes from another file unchanged, in bounded chunks through one reused buffer."""
        if self._buf is None:
            self._buf = bytearray(COPY_CHUNK)
        view = memoryview(self._buf)
        with open(src, "rb", buffering=0) as f:
            f.seek(start)
            left = nbytes
            while left:
                got = f.readinto(view[: min(COPY_CHUNK, left)])
                if not got:
                    raise FormatError(f"shard {Path(src).name}: short read at offset {start + nbytes - left}")
                self.write(view[:got])
                left -= got

    def finish(self) -> tuple[int, str]:
        if self.written != self.expected:
            self.abort()
            raise RuntimeError(f"{self.path.name}: wrote {self.written} bytes, header declares {self.expected}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.written, self.hash.hexdigest()

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # an error or an interrupt: leave nothing that looks like a shard
            self.abort()


def file_digest(path: str | Path) -> str:
    """The HASH digest of a whole file, as ShardWriter.finish() reports it."""
    h = new_hash()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 16 MiB pieces (what records name a file by)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class Checkpoint:
    """A safetensors checkpoint directory read through headers and byte ranges only."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if (self.dir / INDEX_NAME).exists():
            self.index = read_index(self.dir)
            self.weight_map = dict(self.index["weight_map"])
        else:  # a single-file export (modelopt writes `model.safetensors` for small models)
            self.index = None
            self.weight_map = {}
            for p in sorted(self.dir.glob("*.safetensors")):
                for name in read_header(p).tensors:
                    self.weight_map[name] = p.name
        self._headers: dict = {}
        self._lock = threading.Lock()

    def header(self, shard: str) -> ShardHeader:
        with self._lock:
            if shard not in self._headers:
                self._headers[shard] = read_header(self.dir / shard)
            return self._headers[shard]

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def entry(self, name: str) -> TensorEntry:
        shard = self.weight_map.get(name)
        if shard is None:
            raise FormatError(f"{self.dir}: tensor {name} is not in the checkpoint")
        try:
            return self.header(shard).tensors[name]
        except KeyError:
            raise FormatError(f"shard {shard}: tensor {name} is in the index but not in the shard") from None

    def path(self, name: str) -> Path:
        return self.dir / self.weight_map[name]

    def raw(self, name: str) -> bytearray:
        e = self.entry(name)
        return read_range(self.path(name), e.start, e.nbytes)

    def tensor(self, name: str):
        """The tensor as stored (dtype from the header), on the CPU."""
        import torch

        e = self.entry(name)
        raw = self.raw(name)
        t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return t.view(torch_dtype(e.dtype)).reshape(e.shape)

    def tensors(self, names: list[str]) -> dict:
        """Many tensors at once, one open file per shard (small tensors: scalars, scales)."""
        import torch

        by_shard: dict[str, list[str]] = {}
        for n in names:
            if n in self.weight_map:
                by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, ns in by_shard.items():
            hd = self.header(shard)
            with open(self.dir / shard, "rb") as f:
                for n in ns:
                    e = hd.tensors[n]
                    f.seek(e.start)
                    raw = bytearray(f.read(e.nbytes))
                    t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                    out[n] = t.view(torch_dtype(e.dtype)).reshape(e.shape)
        return out

    def block_spans(self, names: list[str]) -> list[tuple[str, list[TensorEntry], int, int]]:
        """(shard, entries, first byte, end) per shard holding `names`: what `read_block` reads."""
        by_shard: dict[str, list[TensorEntry]] = {}
        for n in names:
            by_shard.setdefault(self.weight_map[n], []).append(self.entry(n))
        return [(shard, entries, min(e.start for e in entries), max(e.end for e in entries))
                for shard, entries in by_shard.items()]

    def read_block(self, names: list[str], pin_memory: bool = False, into=None) -> tuple[dict, int]:
        """Many large tensors at once: ({name: tensor}, bytes read).

        Per shard, the byte span covering the named tensors is read front to back in COPY_CHUNK
        reads into one buffer and each tensor is a view of it (a copy where its offset does not suit
        its dtype). The buffer is `into` (a uint8 tensor at least that large, reused by the caller:
        allocating page-locked memory costs about as much as reading it) or a new one, page-locked
        with `pin_memory` for fast copies to a GPU. A V4 release keeps a block's tensors together in
        one shard, so a block is one sequential read; the GIL is released while reading, so another
        thread can compute meanwhile.
        """
        import torch

        spans = self.block_spans(names)
        total = sum(end - start for _, _, start, end in spans)
        pool = into if into is not None and into.numel() >= total else \
            torch.empty(total, dtype=torch.uint8, pin_memory=pin_memory)
        out, at = {}, 0
        for shard, entries, start, end in spans:
            buf = pool[at: at + end - start]
            at += end - start
            view = memoryview(buf.numpy())
            with open(self.dir / shard, "rb", buffering=0) as f:
                f.seek(start)
                pos = 0
                while pos < end - start:
                    got = f.readinto(view[pos: min(pos + COPY_CHUNK, end - start)])
                    if not got:
                        raise FormatError(f"shard {shard}: short read at offset {start + pos}")
                    pos += got
            for e in entries:
                dtype = torch_dtype(e.dtype)
                raw = buf[e.start - start: e.end - start]
                if (e.start - start) % dtype.itemsize:
                    raw = raw.clone()
                out[e.name] = raw.view(dtype).reshape(e.shape)
        return out, total

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map
