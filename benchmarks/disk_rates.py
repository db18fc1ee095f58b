"""The disk's own rates, measured beside a benchmark's step in the same run (machines here are noisy)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def raw_write(dst: Path, sizes: list[int]) -> float:
    """Seconds to write files of these sizes into the new directory `dst` sequentially, fsynced, as a
    converter or writer writes its shards (the files are left for the caller to remove)."""
    dst.mkdir()
    block = os.urandom(16 << 20)
    t = time.perf_counter()
    for i, size in enumerate(sizes):
        with open(dst / f"f{i}", "wb") as f:
            left = size
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t
