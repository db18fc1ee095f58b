"""Rewrite a released-format checkpoint with one thing broken, for validation tests."""

import json
import shutil
from pathlib import Path

from quantbook.release.shards import INDEX_NAME, ShardWriter, read_header, read_range


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(ckpt: Path, shard: str, edit) -> None:
    """edit(list of [name, dtype, shape, bytes]) -> new list; rewrites shard and index."""
    hd = read_header(ckpt / shard)
    items = [[e.name, e.dtype, e.shape, bytes(read_range(hd.path, e.start, e.nbytes))]
             for e in sorted(hd.tensors.values(), key=lambda e: e.start)]
    items = edit(items)
    w = ShardWriter(ckpt / shard, [(n, d, tuple(s)) for n, d, s, _ in items])
    for *_, b in items:
        w.write(b)
    w.finish()
    index = json.loads((ckpt / INDEX_NAME).read_text())
    wm = {k: v for k, v in index["weight_map"].items() if v != shard}
    wm.update({n: shard for n, *_ in items})
    index["weight_map"] = wm
    index["metadata"]["total_size"] = sum(
        e.nbytes for s in set(wm.values()) for e in read_header(ckpt / s).tensors.values())
    (ckpt / INDEX_NAME).write_text(json.dumps(index))


def corrupt_header(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"X" + raw[9:])


def edit_tensor(ckpt: Path, name: str, fn) -> None:
    """fn(uint8 array shaped like the stored bytes of `name`) edits it in place; the shard is rewritten."""
    import numpy as np

    from quantbook.release.shards import Checkpoint

    shard = Checkpoint(ckpt).weight_map[name]

    def edit(items):
        for item in items:
            if item[0] == name:
                shape = tuple(item[2]) if item[1] in ("U8", "I8", "F8_E4M3", "F8_E8M0") else (len(item[3]),)
                a = np.frombuffer(item[3], dtype=np.uint8).copy().reshape(shape)
                fn(a)
                item[3] = a.tobytes()
        return items

    rewrite_shard(ckpt, shard, edit)
