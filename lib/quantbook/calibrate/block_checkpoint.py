"""The streaming driver's resume state: `<run_dir>/streaming/`, one block at a time.

After every `save_every` blocks the driver keeps what a rerun needs to carry on:

- `amax.<block>.safetensors` (rank 0), one per finished block: its amax, already reduced over the
  processes, in the snapshot format (`amax.save_snapshot`), with the block's token counts, quantizer
  listing, enabled quantizers, amax problems and timings in its metadata;
- `acts.<block>.rank<r>.safetensors`, one per process: that process's outputs of the last saved
  block, i.e. the next block's inputs (BF16 [B, T, hc, H] per batch), streamed tensor by tensor
  into a `.partial` file, fsynced and renamed (`release.shards.ShardWriter`);
- `manifest.json`, LAST, by rank 0 once every process's activations are on disk: the signature,
  the blocks finished, whose activations follow, and the per-block timeline. A kill at any moment
  leaves the previous manifest, which names only complete files.

The signature covers what makes the result: the release's identity (config, index, shard
headers and sizes, sampled data: `release.convert.source_identity`), the settings that shape
the data and the quantization config, the calibration data's digest, the quantization config's
digest, the number of processes, whether MTP is calibrated, the device type and the versions. A
directory with progress but another signature (or none) is refused with the differences listed
(`StaleCheckpoint`); one without a manifest held nothing committed and is cleared.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import atomic
from ..amax import load_snapshot, save_snapshot
from ..errors import StaleCheckpoint, StateError
from .state import quant_cfg_digest, signature_diff, versions

CHECKPOINT_DIR = "streaming"
MANIFEST = "manifest.json"
KIND = "quantbook.streaming_checkpoint"
SIGNATURE_PARAMS = ("qformat", "kv_cache_qformat", "recipe", "dataset", "calib_size", "calib_seq", "batch_size",
                    "moe_calib_experts_ratio", "trust_remote_code")
PEER_WAIT_S = 6 * 3600  # how long rank 0 waits for the other processes' activations before giving up


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def signature(*, release_id: str, settings: dict, quant_cfg: dict, calib: dict, world: int, mtp: bool,
              device_type: str) -> dict:
    """What must be equal for a streaming checkpoint to be resumed (see the module docstring)."""
    return {
        "kind": "quantbook.streaming_signature",
        "release_id": release_id,
        "params": {k: settings.get(k) for k in SIGNATURE_PARAMS},
        "quant_cfg_sha256": quant_cfg_digest(quant_cfg),
        "calibration": {k: calib.get(k) for k in ("samples", "tokens", "positions", "batches", "sha256")},
        "world": world,
        "mtp": mtp,
        "device_type": device_type,
        "versions": versions(),
    }


def amax_file(d: Path, block: str) -> Path:
    return d / f"amax.{block}.safetensors"


def acts_file(d: Path, block: str, rank: int) -> Path:
    return d / f"acts.{block}.rank{rank}.safetensors"


def gate_file(d: Path, block: str, side: str) -> Path:
    """The fidelity gate's streams after `block` (`export.fidelity_along`), `side` ref or cand."""
    return d / f"gate-{side}.{block}.safetensors"


def load_gate(run_dir: str | Path) -> dict | None:
    """The gate state the manifest names ({signature, rows, numbers, streams: (ref, cand) on the CPU,
    None after the last block} or {dropped}), or None when none was kept."""
    from safetensors.torch import load_file

    m = read_manifest(run_dir) or {}
    g = m.get("gate")
    if not g or g.get("dropped") or not m.get("acts_after"):  # after the last block: no streams needed
        return g and {**g, "streams": None}
    d = checkpoint_dir(run_dir)
    streams = []
    for side in ("ref", "cand"):
        got = load_file(str(gate_file(d, m["acts_after"], side)))
        streams.append([got[f"b{j}"] for j in range(len(got))])
    return {**g, "streams": tuple(streams)}


def read_manifest(run_dir: str | Path) -> dict | None:
    return atomic.read_json(checkpoint_dir(run_dir) / MANIFEST)


def check_dir(run_dir: str | Path, sig: dict, blocks: list[str]) -> dict:
    """Verify a checkpoint before resuming from it, or start a clean one. Returns the plan:
    {"resume", "done" (blocks finished), "acts_after" (whose outputs are saved), "start_block"}.

    Raises StaleCheckpoint for progress made with another signature or without one. Files that
    the manifest does not name (a killed attempt's uncommitted blocks, temporary files) are removed.
    """
    d = checkpoint_dir(run_dir)
    m = atomic.read_json(d / MANIFEST)
    if m is None:
        if d.exists():
            for f in d.iterdir():  # nothing was committed: whatever is here is half an attempt
                f.unlink()
        d.mkdir(parents=True, exist_ok=True)
        return {"resume": False, "done": [], "acts_after": None, "start_block": blocks[0] if blocks else None}
    if m.get("kind") != KIND or "signature" not in m:
        raise StaleCheckpoint(f"{d / MANIFEST} is not a quantbook streaming checkpoint (no signature): move it away "
                              "or use another run id")
    diffs = signature_diff(m["signature"], sig)
    if m.get("blocks") != blocks:
        diffs.append(f"blocks: checkpoint has {m.get('blocks')}, this run {blocks}")
    if diffs:
        raise StaleCheckpoint(f"{d} was written for a different calibration; refusing to resume from it (use another "
                              "run id, or delete the directory to recalibrate):\n  " + "\n  ".join(diffs[:20]))
    done = list(m["done"])
    keep = {MANIFEST} | {amax_file(d, b).name for b in done}
    if m.get("acts_after"):
        keep |= {acts_file(d, m["acts_after"], r).name for r in range(sig["world"])}
        if (m.get("gate") or {}).get("rows"):
            keep |= {gate_file(d, m["acts_after"], side).name for side in ("ref", "cand")}
    for f in d.iterdir():
        if f.name not in keep:
            f.unlink()
    missing = sorted(k for k in keep if not (d / k).is_file())
    if missing:
        raise StateError(f"{d}: {missing} named by {MANIFEST} are missing; delete the directory to recalibrate")
    start = next((b for b in blocks if b not in done), None)
    return {"resume": bool(done), "done": done, "acts_after": m.get("acts_after"), "start_block": start}


def load_acts(run_dir: str | Path, block: str, rank: int, device) -> list:
    """This process's saved outputs of `block` (the next block's inputs), on `device`, in batch order."""
    from safetensors.torch import load_file

    got = load_file(str(acts_file(checkpoint_dir(run_dir), block, rank)), device=str(device))
    return [got[f"b{j}"] for j in range(len(got))]


def write_acts(path: Path, acts: list, ready=None) -> int:
    """Stream a process's activations into one safetensors file (atomic); its size.

    `ready`: a CUDA event recorded after the tensors were computed; the copies to host memory then
    run on a stream of their own that waits for it, so the next block's kernels are not held up."""
    from contextlib import nullcontext

    import torch

    from ..release.shards import ShardWriter

    entries = [(f"b{j}", "BF16", tuple(t.shape)) for j, t in enumerate(acts)]
    if any(t.dtype != torch.bfloat16 for t in acts):
        raise StateError(f"{path.name}: activations must be BF16, got {sorted({str(t.dtype) for t in acts})}")
    stream = None
    if ready is not None:
        stream = torch.cuda.Stream(device=acts[0].device)
        stream.wait_event(ready)
    with ShardWriter(path, entries, metadata={"format": "pt"}) as writer, \
            torch.cuda.stream(stream) if stream is not None else nullcontext():
        for t in acts:
            writer.write(t.detach().contiguous().to("cpu").view(torch.uint8).numpy())
        size, _ = writer.finish()
    return size


def _ready_event(acts: list | None):
    """A CUDA event marking that `acts` are computed (None on CPU)."""
    import torch

    if not acts or acts[0].device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(acts[0].device))
    return event


class Saver:
    """Writes checkpoints in a background thread so the next block computes meanwhile.

    One save in flight: `save` first waits for the previous one (that wait is timed and
    reported). Every process saves its activations; rank 0 also the finished blocks' results,
    then waits until every process's activations are on disk and writes the manifest last.
    """

    def __init__(self, run_dir: str | Path, sig: dict, blocks: list[str], rank: int, world: int, done: list[str],
                 timeline: dict):
        self.dir = checkpoint_dir(run_dir)
        self.sig, self.blocks, self.rank, self.world = sig, blocks, rank, world
        self.done = list(done)
        self.timeline = dict(timeline)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streaming-checkpoint")
        self.pending = None

    def wait(self) -> float:
        """Wait for the save in flight (raising its error); the seconds waited."""
        t0 = time.perf_counter()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
        return time.perf_counter() - t0

    def save(self, finished: list[dict], acts: list | None, gate: dict | None = None) -> float:
        """Queue the save of `finished` blocks ({"block", "amax", "meta"}) and, unless None, this
        process's outputs of the last of them; `gate` (rank 0): the fidelity gate's state
        (`GateAlong.state`). Returns the seconds spent waiting for the previous save (none when the
        caller waited already)."""
        waited = self.wait()
        self.pending = self.pool.submit(self._write, list(finished), acts, _ready_event(acts), gate)
        return waited

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the save in flight and stop the thread (`raise_errors=False`: while failing)."""
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise
        finally:
            self.pool.shutdown(wait=True)

    def _write(self, finished: list[dict], acts: list | None, ready, gate: dict | None = None) -> None:
        t0 = time.perf_counter()
        last = finished[-1]["block"]
        acts_bytes = write_acts(acts_file(self.dir, last, self.rank), acts, ready) if acts is not None else 0
        if self.rank != 0:
            return
        if gate is not None and gate["streams"] is not None and acts is not None:
            for side, streams in zip(("ref", "cand"), gate["streams"]):
                write_acts(gate_file(self.dir, last, side), streams)
        for f in finished:
            save_snapshot(amax_file(self.dir, f["block"]), f["amax"], metadata=f["meta"])
        if acts is not None:
            self._wait_for_peers(last)
        for f in finished:
            self.done.append(f["block"])
            self.timeline[f["block"]] = dict(f["meta"]["timing"])
        self.timeline[last].update(write_s=round(time.perf_counter() - t0, 4), state_bytes=acts_bytes * self.world)
        earlier = self.blocks[: self.blocks.index(last)]
        previous = {acts_file(self.dir, b, r) for b in earlier for r in range(self.world)}
        previous |= {gate_file(self.dir, b, side) for b in earlier for side in ("ref", "cand")}
        atomic.write_json(self.dir / MANIFEST, {
            "kind": KIND, "format": 1, "signature": self.sig, "blocks": self.blocks, "done": self.done,
            "acts_after": last if acts is not None else None, "timeline": self.timeline,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"gate": gate["json"]} if gate is not None else {}),
        })
        for f in previous:  # older activations are no longer named by the manifest
            f.unlink(missing_ok=True)

    def _wait_for_peers(self, block: str) -> None:
        deadline = time.monotonic() + PEER_WAIT_S
        for r in range(1, self.world):
            while not acts_file(self.dir, block, r).is_file():
                if time.monotonic() > deadline:
                    raise StateError(f"{acts_file(self.dir, block, r)}: process {r} did not save its activations")
                time.sleep(0.02)


def collect(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """Every finished block's amax and metadata, in block order: (amax, [meta per block])."""
    d = checkpoint_dir(run_dir)
    m = read_manifest(run_dir)
    if m is None:
        raise StateError(f"{d / MANIFEST}: missing; no streaming calibration to collect")
    amax, metas = {}, []
    for b in m["done"]:
        tensors, meta = load_snapshot(amax_file(d, b))
        amax.update(tensors)
        metas.append(meta)
    return amax, metas
