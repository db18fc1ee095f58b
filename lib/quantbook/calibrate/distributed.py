"""The torch.distributed parts of the streaming driver: processes, and the exact reductions.

`gpus: N` runs N processes, one per GPU (NCCL), or on CPU (gloo, so CI can test it). The driver
starts them all as fresh Python processes (`run_processes`), so that none carries what the
parent process did before (the notebook's kernel may hold modelopt's runtime patches; a patched
rank would skip modelopt's own amax all-reduce while the others enter it), and each dies with the
parent (Linux `PR_SET_PDEATHSIG`): a killed run leaves no process waiting in a collective.

Every process calibrates the same block on its own batches, with modelopt's own cross-process
sync off (`streaming_driver.local_max`: it all-reduces only the quantizers holding an amax on
each process, and swallows a failed all-reduce with a warning); the driver reduces explicitly:
every amax with MAX (in fp32, exact for BF16 and fp32 values) after checking that every process
holds the same quantizers, token counts with SUM. A maximum and a sum of counts do not depend on the order:
the result equals one process's bit for bit.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

from .. import atomic
from ..errors import QuantizeError

TIMEOUT_ENV = "QUANTBOOK_COLLECTIVE_TIMEOUT_S"  # how long a process waits in one collective (default 1 h)
STACKS_ENV = "QUANTBOOK_STACKS_EVERY_S"  # set: each process prints every thread's stack this often


def backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init(rank: int, world: int, device_type: str, init_method: str) -> None:
    """Join the process group (no-op for one process); on CUDA, rank r uses GPU r."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or 3600))
    dist.init_process_group(backend(device_type), init_method=init_method, rank=rank, world_size=world,
                            timeout=timeout)


def finish(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_amax(amax: dict, device) -> tuple[dict, int]:
    """MAX of every tensor over the processes, exact; (reduced tensors on CPU, how many changed here).

    Every process must hold the same names: one without an amax another has would mean it saw
    other data or other quantizers, and the collectives would pair the wrong tensors."""
    import torch
    import torch.distributed as dist

    if not _active():
        return amax, 0
    keys = sorted(amax)
    if odd := _not_everywhere(keys):
        raise QuantizeError(f"the processes disagree on which quantizers have an amax (e.g. {odd[:5]}); "
                            "a process saw no calibration data for them")
    if not keys:
        return {}, 0
    flat = torch.cat([amax[k].to(device=device, dtype=torch.float32).reshape(-1) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)  # one collective for the block: MAX is elementwise
    out, changed = {}, 0
    for k, f in zip(keys, flat.cpu().split([amax[k].numel() for k in keys])):
        t = amax[k]
        back = f.reshape(t.shape).to(t.dtype, copy=True)  # its own storage: safetensors refuses shared ones
        changed += int(not torch.equal(back, t.cpu()))
        out[k] = back
    return out, changed


def reduce_counts(counts: dict[str, list[int]], device) -> dict[str, list[int]]:
    """SUM of the per-expert token counts over the processes."""
    import torch
    import torch.distributed as dist

    if not _active():
        return counts
    keys = sorted(counts)
    if odd := _not_everywhere(keys):
        raise QuantizeError(f"the processes counted tokens for different MoE layers (e.g. {odd[:5]})")
    if not keys:
        return {}
    flat = torch.tensor([c for k in keys for c in counts[k]], dtype=torch.int64, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # one collective for the block: SUM is elementwise
    sums = flat.cpu().split([len(counts[k]) for k in keys])
    return {k: v.tolist() for k, v in zip(keys, sums)}


def _not_everywhere(keys: list[str]) -> list[str]:
    """The names some process holds and another does not (none: the collectives pair up by name)."""
    every = gather(keys)
    return sorted(set().union(*map(set, every)) - set.intersection(*map(set, every)))


def gather(obj) -> list:
    """Every process's `obj`, in rank order ([obj] for one process)."""
    import torch.distributed as dist

    if not _active():
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (elsewhere: nothing)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_processes(target: str, job: dict, world: int, work_dir: str | Path, poll_s: float = 0.2) -> list:
    """`target(job, rank, world)` (`"module:function"`) in `world` fresh Python processes; their
    results (JSON-ready) in rank order.

    Each process is `python -m quantbook.calibrate.distributed` with the job saved in `work_dir`
    (so nothing depends on how the parent was started), its output echoed here line by line. When
    one fails or dies (killed, out of memory) the others are stopped and QuantizeError names the
    rank and its error."""
    import subprocess
    import sys
    import threading

    import torch

    work_dir = Path(work_dir)
    job_path = work_dir / "job.pt"
    with atomic.atomic_path(job_path) as tmp:
        torch.save(job, tmp)
    for r in range(world):
        _result_path(work_dir, r).unlink(missing_ok=True)
        _error_path(work_dir, r).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PYTHONUNBUFFERED": "1"}
    procs, echoes = [], []
    try:
        for r in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "quantbook.calibrate.distributed", target, str(job_path), str(r), str(world)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, errors="replace"))
            echoes.append(threading.Thread(target=_echo, args=(procs[-1].stdout, "" if r == 0 else f"[rank {r}] "),
                                           daemon=True))
            echoes[-1].start()
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise QuantizeError(_failure(procs, work_dir, world))
            if all(c == 0 for c in codes):
                break
            time.sleep(poll_s)
        for t in echoes:
            t.join(timeout=5)
        return [json.loads(_result_path(work_dir, r).read_text()) for r in range(world)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        job_path.unlink(missing_ok=True)


def _failure(procs: list, work_dir: Path, world: int, settle_s: float = 2.0) -> str:
    """What to tell the user when a process failed: the error of the one that failed first (the
    others' are usually its echo: a collective whose peer is gone), then one line for each other."""
    time.sleep(settle_s)  # let the others that are failing because of it write their errors
    codes = [p.poll() for p in procs]
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    err = {r: _error_path(work_dir, r) for r in failed}
    first = sorted(failed, key=lambda r: err[r].stat().st_mtime if err[r].is_file() else float("inf"))
    why = {r: err[r].read_text() if err[r].is_file() else
           f"exit code {codes[r]} without an error (killed? out of memory?)" for r in failed}
    msg = f"calibration process {first[0]} of {world} failed: {why[first[0]]}"
    for r in first[1:]:
        msg += f"\nthen process {r}: {why[r].splitlines()[0]}"
    return msg


def _result_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"result.rank{rank}.json"


def _error_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"error.rank{rank}.txt"


def _echo(stream, prefix: str) -> None:
    for line in stream:
        print(prefix + line, end="", flush=True)


def main(argv: list[str]) -> int:
    """One process of `run_processes`: `TARGET JOB RANK WORLD`."""
    import importlib
    import sys

    import torch

    target, job_path, rank, world = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    die_with_parent()
    every = float(os.environ.get(STACKS_ENV, "0") or 0)
    if every > 0:  # a process that seems stuck (in a collective, say) shows where, every `every` seconds
        import faulthandler

        faulthandler.dump_traceback_later(every, repeat=True, file=sys.stdout)
    try:
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        result = fn(torch.load(job_path, weights_only=False), rank, world)
        atomic.write_json(_result_path(job_path.parent, rank), result)
        return 0
    except BaseException as e:  # the parent reads this and raises it with the rank named
        atomic.write_text(_error_path(job_path.parent, rank),
                          f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        traceback.print_exc()
        sys.stdout.flush()
        # Exit now: an orderly exit tears down the process group, which waits for collectives the
        # other processes are blocked in (NCCL), so the parent would never see this process fail.
        os._exit(1)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
