"""Resumable sharded writes: what step 01's BF16 copy and step 03's serving layout share.

Each output shard is written whole into a temporary file and renamed (shards.ShardWriter), then
recorded with its size and digest in a JSON manifest in the destination. A rerun keeps the
recorded shards whose bytes still match and writes the rest, in parallel, with one progress bar.
The caller writes its index and configs after `run_shards` returns, then marks the manifest
complete: a directory is complete only when its manifest says so.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import atomic
from ..errors import DestinationError
from .shards import HASH, file_digest


def existing_parent(path: Path) -> Path:
    """`path` itself, or its nearest parent that exists (where a directory yet to be made will live)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    import shutil

    return shutil.disk_usage(existing_parent(path)).free


def filesystem(path: Path) -> int:
    """The device id of the filesystem that holds `path` (or its nearest existing parent)."""
    import os

    return os.stat(existing_parent(path)).st_dev


def check_owner(src: Path, dst: Path, manifest_name: str, foreign: Callable[[dict], str | None],
                what: str = "destination") -> dict | None:
    """Refuse a destination that overlaps the source or holds something other than an earlier run of
    this job; returns that run's manifest (None for a new or empty destination).

    A non-empty destination must hold `manifest_name`: `foreign(manifest)` says what else it holds
    (None when it is the same job)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise DestinationError(f"{what} {dst} is the source, inside it or around it; choose a directory apart from {src}")
    manifest = atomic.read_json(dst / manifest_name)
    if dst.exists() and any(dst.iterdir()):
        if manifest is None:
            raise DestinationError(f"{what} {dst} is not empty and holds no {manifest_name}: refusing to write into a "
                        "directory that is not an earlier run of this job")
        why = foreign(manifest)
        if why:
            raise DestinationError(f"{what} {dst} holds {why}; use an empty directory")
    return manifest


def bytes_to_write(manifest: dict | None, jobs: list) -> int:
    """Bytes of the `jobs` (with `name` and `bytes_out`) that the manifest does not record as done."""
    done = (manifest or {}).get("shards", {})
    return sum(j.bytes_out for j in jobs if j.name not in done)


def check_destination(src: Path, dst: Path, manifest_name: str, jobs: list, foreign: Callable[[dict], str | None],
                      what: str = "destination") -> None:
    """Refuse a destination that overlaps the source, holds something else, or lacks disk space.

    `check_owner`, then the disk: `jobs` have `name` and `bytes_out`; shards the manifest records
    are not counted against free disk.
    """
    needed = bytes_to_write(check_owner(src, dst, manifest_name, foreign, what), jobs)
    free = free_disk(dst)
    if free < needed:
        raise DestinationError(f"{what} {dst}: {needed / 2**30:.2f} GiB still to write, {free / 2**30:.2f} GiB free")


@dataclass
class Job:
    """One output shard: its file name, its size, and the call that writes it.

    `write(on_bytes)` writes the shard atomically, calls `on_bytes(n)` as bytes go out, and returns
    the manifest record (at least `size` and the HASH digest)."""

    name: str
    bytes_out: int
    write: Callable[[Callable[[int], None]], dict]


def verified(dst: Path, name: str, rec: dict) -> bool:
    """A recorded shard still on disk with the recorded size and digest."""
    path = dst / name
    return path.exists() and path.stat().st_size == rec["size"] and file_digest(path) == rec[HASH]


def run_shards(dst: Path, manifest_name: str, fresh: dict, jobs: list[Job], workers: int = 2,
               device: str = "cpu", desc: str = "shards", progress: bool = True,
               stale_finals: tuple[str, ...] = (), trusted: frozenset[str] = frozenset()) -> tuple[dict, int]:
    """Write every job not already recorded and verified; returns (manifest, shards skipped).

    `fresh` is the manifest to start from when the destination has none; `stale_finals` are the
    files written after the shards (index, configs), removed first so a directory that holds them
    is never one whose shards are being rewritten. `trusted`: shards this process recorded itself a
    moment ago (digest of the bytes as written, fsynced, renamed): checked by size, not read again.
    """
    from ..progress import tqdm

    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("*.partial"), *dst.glob(atomic.TEMP_GLOB)]:  # left by a killed run
        stale.unlink()
    manifest = atomic.read_json(dst / manifest_name) or {**fresh, "shards": {}}
    manifest["complete"] = False
    done = {n: r for n, r in manifest["shards"].items()
            if (n in trusted and (dst / n).is_file() and (dst / n).stat().st_size == r["size"]) or verified(dst, n, r)}
    manifest["shards"] = dict(done)
    atomic.write_json(dst / manifest_name, manifest)
    for final in stale_finals:
        (dst / final).unlink(missing_ok=True)
    todo = [j for j in jobs if j.name not in done]
    lock = threading.Lock()
    bar = tqdm(total=sum(j.bytes_out for j in jobs), initial=sum(j.bytes_out for j in jobs if j.name in done),
               unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr)

    def on_bytes(n):
        with lock:
            bar.update(n)

    def one(job):
        rec = job.write(on_bytes)
        with lock:
            manifest["shards"][job.name] = rec
            atomic.write_json(dst / manifest_name, manifest)

    threads = torch.get_num_threads()
    if device == "cpu" and workers > 1:
        torch.set_num_threads(1)  # one shard per thread; keep torch from oversubscribing cores
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for fut in as_completed([pool.submit(one, j) for j in todo]):
                fut.result()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return manifest, len(done)
