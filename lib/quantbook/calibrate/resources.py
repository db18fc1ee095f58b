"""What a calibration run needs against what the machine has, from shard headers alone.

Memory for the model (host plus GPUs at `gpu_max_mem_percentage`), disk for the generic export
(only with `export_generic: true`), the calibrated state and a layerwise checkpoint, filesystems
counted once. Both drivers refuse a run
that cannot fit before anything loads (`quantize.force: true` runs it anyway, loudly).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from .. import atomic
from ..errors import QuantizeError
from ..release.format import component
from ..release.resume import filesystem, free_disk
from ..release.shards import read_header
from .settings import HF_PTQ_DEFAULTS, calib_plan


def estimate_resources(q: dict, run_dir: str | Path) -> dict:
    """What the run needs against what the machine has: model bytes in memory, export, state and
    layerwise checkpoint on disk. From the shard headers only (seconds, no weights read).

    Export estimate (0 without `export_generic`): quantized weights at 4.5 bits (E2M1 + one E4M3
    scale per 16) for routed
    experts (`nvfp4_experts_only`) or every linear but embedding, head and routers (`nvfp4`);
    every other tensor as in the source. Layerwise: modelopt keeps the next layer's inputs of
    EVERY layer on disk (samples x seq x hidden x hc_mult in BF16 each).
    """
    import psutil

    s = {**HF_PTQ_DEFAULTS, **q["hf_ptq"]}
    src = Path(s["pyt_ckpt_path"])
    cfg = atomic.read_json(src / "config.json") or {}
    every_linear = "experts_only" not in str(s.get("qformat")) and not s.get("recipe")
    model_bytes = export_bytes = 0
    for shard in sorted(src.glob("*.safetensors")):
        for name, e in read_header(shard).tensors.items():
            model_bytes += e.nbytes
            numel = math.prod(e.shape)
            part = component(name)
            routed = part == "routed_expert" and name.endswith(".weight")
            linear = len(e.shape) == 2 and name.endswith(".weight") and part not in ("embed", "head", "router", "norm")
            quantized = not name.startswith("mtp.") and (routed or (every_linear and linear))
            export_bytes += int(numel * 0.5625) + 8 if quantized else e.nbytes
    samples = sum(calib_plan(s)[1])
    layers = cfg.get("num_hidden_layers", 0)
    act = samples * int(s["calib_seq"]) * cfg.get("hidden_size", 0) * cfg.get("hc_mult", 1) * 2
    layerwise_bytes = int(act * layers * 1.25) if q["layerwise"] else 0
    state_bytes = (model_bytes if q["save_full_state"] else 0) + 64 * 2**20
    disk = {}
    if q.get("export_generic", False):
        export_dir = Path(s["export_path"])
        disk["export"] = {"path": str(export_dir), "need": int(export_bytes * 1.05), "free": free_disk(export_dir)}
    else:
        export_bytes = 0  # not written
    disk["run_dir"] = {"path": str(run_dir), "need": state_bytes + layerwise_bytes, "free": free_disk(Path(run_dir))}
    host = psutil.virtual_memory().available
    gpus = []
    if s["device"] != "cpu":
        import torch

        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"gpu": i, "free": free, "total": total})
    budget = host + sum(g["free"] * s["gpu_max_mem_percentage"] for g in gpus)
    by_fs: dict[int, list[str]] = {}
    for k, v in disk.items():
        by_fs.setdefault(filesystem(Path(v["path"])), []).append(k)
    problems = []
    for keys in by_fs.values():
        need, free = sum(disk[k]["need"] for k in keys), disk[keys[0]]["free"]
        if need > free:
            problems.append(f"disk for {' + '.join(keys)}: needs ~{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
                            f"free at {disk[keys[0]]['path']}")
    if model_bytes > budget and not s.get("offload_folder"):  # accelerate could not place it either
        problems.append(f"memory: the model is {model_bytes / 2**30:.2f} GiB; GPUs (at gpu_max_mem_percentage) "
                        f"plus available host memory give {budget / 2**30:.2f} GiB")
    return {"model_bytes": model_bytes, "export_bytes": export_bytes, "state_bytes": state_bytes,
            "layerwise_bytes": layerwise_bytes, "disk": disk, "host_available": host, "gpus": gpus,
            "problems": problems}


def check_resources(q: dict, run_dir: str | Path) -> dict:
    """`estimate_resources`, refusing a run that cannot fit (unless `force`)."""
    r = estimate_resources(q, run_dir)
    if r["problems"]:
        msg = "not enough room for this run:\n  - " + "\n  - ".join(r["problems"])
        if not q["force"]:
            raise QuantizeError(msg + "\n(quantize.force: true runs anyway)")
        warnings.warn("FORCED: " + msg, stacklevel=2)
    return r
