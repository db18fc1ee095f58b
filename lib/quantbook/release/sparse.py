"""A full-size release without the bytes: every shard with its exact header and size, data as holes.

V4 Pro's 145,116 tensors in 64 shards (805 GiB of data) written this way take seconds and a few
megabytes of disk: each shard is its header followed by a `truncate` to the full length, so the
filesystem stores only the header, and reads of the data return zeros. Everything that reads
headers only (step 01's validation and plan, step 03's layout plan, preflight, the resource
estimates) runs on it at the real scale. `fill` writes real bytes for chosen tensors (one layer's,
say) where a test needs them, leaving the rest as holes. `bf16=True` writes instead the BF16 copy
step 01 would write from that release (3.2 TB apparent for V4 Pro): step 02's estimates read it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

from .. import atomic
from ..errors import DestinationError
from .format import TensorSpec, bf16_config, bf16_groups, load_config, shard_groups, shard_name
from .shards import DTYPE_SIZE, INDEX_NAME, encode_header
from .tiny import write_tokenizer


def write_sparse_shard(path: Path, specs: list[TensorSpec], fill: Callable[[TensorSpec], bytes | None] | None = None,
                       metadata: dict | None = None) -> int:
    """One shard: header, holes, and the bytes `fill(spec)` returns for the tensors it fills; its size."""
    header = encode_header([(s.name, s.dtype, s.shape) for s in specs], metadata)
    size = len(header) + sum(math.prod(s.shape) * DTYPE_SIZE[s.dtype] for s in specs)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        at = len(header)
        for s in specs:
            data = fill(s) if fill else None
            n = math.prod(s.shape) * DTYPE_SIZE[s.dtype]
            if data is not None:
                if len(data) != n:
                    raise ValueError(f"{s.name}: fill gave {len(data)} bytes, the tensor has {n}")
                f.seek(at)
                f.write(data)
            at += n
        f.truncate(size)
        f.flush()
    return size


def write_sparse_release(config: dict | str | Path, out: str | Path,
                         fill: Callable[[TensorSpec], bytes | None] | None = None, bf16: bool = False) -> Path:
    """Write a release with `config`'s exact shard layout, headers, index, config and tokenizer, data
    as holes (or `fill`'s bytes). `config` is a config dict, a config.json, or a release directory.
    `bf16`: the BF16 copy of that release instead (step 01's shards, index and config)."""
    config = config if isinstance(config, dict) else load_config(config)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DestinationError(f"{out} is not empty: a sparse release is written into a new or empty directory")
    groups = bf16_groups(config) if bf16 else shard_groups(config)
    metadata = {"format": "pt"} if bf16 else None  # as step 01 writes its shards
    with atomic.partial_dir(out) as work:
        weight_map, total = {}, 0
        for i, group in enumerate(groups, start=1):
            name = shard_name(i, len(groups))
            write_sparse_shard(work / name, group, fill, metadata)
            for s in group:
                weight_map[s.name] = name
                total += s.nbytes
        atomic.write_json(work / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic.write_json(work / "config.json", bf16_config(config) if bf16 else config)
        atomic.write_json(work / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False})
        write_tokenizer(work, config["vocab_size"])
    return out


def allocated_bytes(directory: str | Path) -> int:
    """Bytes the filesystem actually stores for the files of a directory (holes excluded)."""
    return sum(os.stat(p).st_blocks * 512 for p in Path(directory).rglob("*") if p.is_file())
