"""What this machine has, for the preflight: CPUs, host memory, GPUs with their free memory, CUDA, disk.

`Machine.here()` reads them in well under a second: psutil for the host, NVML for the GPUs (no
CUDA context is created, unlike torch.cuda.mem_get_info), torch only to tell whether it can run on
them. A test describes another machine (the 8x B200 node) with the same fields.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .release.resume import filesystem, free_disk


def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port free on `ip` now (a JupyterLab server, a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _visible(indices: list[int]) -> list[int]:
    """The NVML indices CUDA_VISIBLE_DEVICES leaves visible (all when unset or not numeric)."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return indices
    try:
        wanted = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        return indices
    return [i for i in wanted if i in indices]


def nvml_gpus() -> list[dict]:
    """Each visible GPU: {"gpu", "name", "free", "total"} (bytes), from NVML; [] without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml, no driver, no GPU
        return []
    try:
        out = []
        for i in _visible(list(range(pynvml.nvmlDeviceGetCount()))):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"gpu": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "free": int(mem.free), "total": int(mem.total)})
        return out
    finally:
        pynvml.nvmlShutdown()


@dataclass
class Machine:
    """A machine as the preflight sees it. `disk_free` / `disk_id` take a path (one that may not
    exist yet: its nearest existing parent counts)."""

    name: str
    cpus: int
    host_available: int
    gpus: list[dict] = field(default_factory=list)
    cuda: bool = False  # torch can run on the GPUs (a CUDA build and a working driver)
    disk_free: Callable[[Path], int] = free_disk
    disk_id: Callable[[Path], int] = filesystem

    @classmethod
    def here(cls) -> "Machine":
        import psutil

        gpus = nvml_gpus()
        cuda = False
        if gpus:
            import torch

            cuda = torch.cuda.is_available()
        return cls(socket.gethostname(), os.cpu_count() or 1, psutil.virtual_memory().available, gpus, cuda)

    def describe(self) -> str:
        gib = 2**30
        gpus = "no GPU"
        if self.gpus:
            free = ", ".join(f"{g['free'] / gib:,.0f}" for g in self.gpus)
            gpus = f"{len(self.gpus)} x {self.gpus[0]['name']} ({free} GiB free)"
            gpus += "" if self.cuda else ", not usable by this torch"
        return f"{self.name}: {self.cpus} CPUs, {self.host_available / gib:,.1f} GiB host memory available, {gpus}"
