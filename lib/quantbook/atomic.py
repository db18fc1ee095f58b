"""Atomic writes: a temporary name in the same directory, fsync, then rename.

A crash leaves either the old file or the new one, never half of either. Every JSON record the
project keeps (manifests, run records, snapshots' indexes) goes through here, and every directory
written whole (an export, a calibrated state) goes through `partial_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_GLOB = ".*.tmp"  # what atomic_path's temporary files look like; a killed writer may leave one


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 (or a writer's own) would hide records from others
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def replace_dir(work: str | Path, final: str | Path) -> None:
    """Put a finished directory in place of `final`; the old one is removed only once the new one
    is in, so a crash leaves the old directory, the new one, or both (old as `<final>.previous`)."""
    work, final = Path(work), Path(final)
    previous = final.with_name(final.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(work, final)
    shutil.rmtree(previous, ignore_errors=True)


PARTIAL = ".partial"  # the suffix of a directory (or shard) being written; nothing reads one


def fresh_partial(final: str | Path) -> Path:
    """`<final>.partial`, new and empty: where a directory is written before `replace_dir` puts it
    in place of `final`. One left by an earlier, killed writer is removed first."""
    final = Path(final)
    work = final.with_name(final.name + PARTIAL)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


@contextmanager
def partial_dir(final: str | Path):
    """Yield a fresh `<final>.partial` directory; when the block succeeds it replaces `final`.

    When the block raises, the partial directory stays for inspection (the next writer removes
    it) and `final`, if it exists, is untouched.
    """
    work = fresh_partial(final)
    yield work
    replace_dir(work, final)
