"""The fidelity gate's resume state: `<run_dir>/eval-progress/`, kept while the gate runs.

Every `save_every` blocks, and after the last main layer (whose logits give the numbers), the gate
keeps what a rerun needs to carry on from the next block: both models' hidden streams after the
block (`ref.<block>.safetensors`, `cand.<block>.safetensors`, BF16 a batch, written by the streaming
driver's `block_checkpoint.write_acts`: streamed into a `.partial`, fsynced, renamed), then
`manifest.json`, LAST (atomic): the signature, the blocks done, their rows and the numbers once
computed. A kill at any moment leaves the previous manifest, which names only complete files. The
directory is removed when the gate ends.

The signature covers what makes the numbers: both checkpoints' identities (config, index, shard
headers and sizes, sampled data: `release.convert.source_identity`), the tokens, the settings that
shape the computation, the experts implementation and the versions. Progress under another
signature is discarded (said on the terminal): it measured something else.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import atomic
from ..calibrate.block_checkpoint import write_acts
from ..calibrate.state import versions

PROGRESS_DIR = "eval-progress"
MANIFEST = "manifest.json"
KIND = "quantbook.eval_progress"
SHAPING = ("samples", "seq", "batch_size", "engine", "mode")  # the settings the numbers depend on


def checkpoint_identity(path: str | Path) -> str:
    """A cheap fingerprint of a checkpoint directory (`release.convert.source_identity`)."""
    from ..release.convert import source_identity
    from ..release.shards import Checkpoint

    ck = Checkpoint(path)
    return source_identity(Path(path), ck.index or {"weight_map": ck.weight_map}, {n: ck.header(n) for n in ck.shards})


def signature(export, source, s: dict, tokens, implementation: str, device_type: str) -> dict:
    """What must be equal for saved progress to be carried on (see the module docstring)."""
    return {"kind": KIND, "export": checkpoint_identity(export), "release": checkpoint_identity(source),
            "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
            "settings": {k: s[k] for k in SHAPING}, "implementation": implementation, "device_type": device_type,
            "versions": versions()}


class Progress:
    """Saves and restores the gate's progress in one directory (None: no resume, nothing written)."""

    def __init__(self, directory: str | Path | None, sig: dict, save_every: int):
        self.dir = Path(directory) if directory is not None else None
        self.sig, self.save_every = sig, save_every
        self.saved: dict | None = None

    def load(self, device) -> dict | None:
        """The saved state when its signature is this run's: {done, rows, numbers, streams: (ref, cand)}."""
        from safetensors.torch import load_file

        if self.dir is None:
            return None
        m = atomic.read_json(self.dir / MANIFEST)
        if not m:
            return None
        if m.get("signature") != self.sig:
            print(f"[quantbook] {self.dir}: saved gate progress of another export, release, text or settings; "
                  "starting over", flush=True)
            return None
        last = m["done"][-1]
        streams = []
        for who in ("ref", "cand"):
            got = load_file(str(self.dir / f"{who}.{last}.safetensors"), device=str(device))
            streams.append([got[f"b{j}"] for j in range(len(got))])
        self.saved = m
        return {"done": m["done"], "rows": m["rows"], "numbers": m.get("numbers"), "streams": tuple(streams)}

    def due(self, index: int, block: str, last_main: str) -> bool:
        """Whether to save after the `index`-th block (0-based)."""
        return self.dir is not None and (block == last_main or (index + 1) % self.save_every == 0)

    def save(self, done: list[str], rows: list[dict], numbers: dict | None, ref: list, cand: list) -> None:
        """Both streams after `done[-1]`, then the manifest naming them; older stream files removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        block = done[-1]
        for who, acts in (("ref", ref), ("cand", cand)):
            write_acts(self.dir / f"{who}.{block}.safetensors", acts)
        atomic.write_json(self.dir / MANIFEST, {"signature": self.sig, "done": done, "rows": rows, "numbers": numbers})
        keep = {MANIFEST, f"ref.{block}.safetensors", f"cand.{block}.safetensors"}
        for f in self.dir.iterdir():
            if f.name not in keep:
                f.unlink()

    def clear(self) -> None:
        """The gate ended: its progress is no longer needed."""
        if self.dir is not None and self.dir.exists():
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()


__all__ = ["PROGRESS_DIR", "Progress", "signature", "checkpoint_identity"]
