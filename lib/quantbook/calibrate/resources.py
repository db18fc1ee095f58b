"""What a calibration run needs against what the machine has, from configs and shard headers alone.

Memory for the model, as the driver says it holds it (`Driver.memory_need`: the whole BF16 model
spread over the GPUs at `gpu_max_mem_percentage` then host memory, or one layer at a time), disk
for the generic export (only with `export_generic: true`), the calibrated state and a layerwise
checkpoint, filesystems counted once. Every driver refuses a run that cannot fit before anything
loads (`quantize.force: true` runs it anyway, loudly); the preflight (`quantbook preflight`) makes the same memory check from the configs alone,
before the BF16 copy exists.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import atomic
from ..errors import ParamsError, QuantizeError
from ..release.format import bf16_groups, component
from ..release.resume import filesystem, free_disk
from ..release.shards import read_header
from . import registry
from .settings import HF_PTQ_DEFAULTS, calib_plan, writes_generic_export


def size(n: int | float | None) -> str:
    """Bytes as the largest binary unit that keeps a number >= 1 (`1.50 GiB`)."""
    if n is None:
        return ""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryNeed:
    """What a driver holds at its peak, in bytes, from the model's config and the settings.

    `model` is placed over the GPUs in use, whole `unit`s at a time (accelerate never splits a
    decoder layer across devices), each GPU filled up to `gpu_max_mem_percentage` of its free
    memory less `gpu`, the rest in host memory (or `offload_folder`); `host` comes on top in host
    memory, `gpu` on each GPU in use (activations, calibration batches). A whole-model driver:
    `model` is the BF16 model. A streaming one: `model` 0, a GPU must hold `unit` (one layer) plus
    `gpu`, and the host `host`; with `gpus` N > 0, each of the first N GPUs must (one process each).
    """

    what: str
    model: int = 0
    unit: int = 0
    host: int = 0
    gpu: int = 0
    gpus: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def model_sizes(config: dict) -> dict:
    """The BF16 model a config implies, from the tensor table alone: total bytes, the largest shard
    group (a decoder layer: what one device must hold whole) and the number of decoder layers."""
    groups = _bf16_group_bytes(json.dumps(config, sort_keys=True))
    return {"total": sum(groups), "largest": max(groups), "layers": config["num_hidden_layers"]}


@functools.lru_cache(maxsize=8)
def _bf16_group_bytes(config_json: str) -> tuple[int, ...]:
    """Bytes of each BF16 shard group of one config, summed once (a pure function of the config;
    the preflight and the drivers' memory needs ask for it several times a run)."""
    return tuple(sum(t.nbytes for t in g) for g in bf16_groups(json.loads(config_json)))


def check_memory(need: MemoryNeed, device: str, pct: float, host_available: int, gpus: list[dict],
                 offload_folder: str | None = None) -> dict:
    """Place `need` on this machine: how many units each GPU takes, what is left for host memory,
    and what does not fit ("problems", each naming the memory and the sizes)."""
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    problems, placed = [], []
    if device == "cpu":
        host_need = need.model + need.host
    else:
        if not gpus:
            problems.append(f"memory: device {device!r} but no GPU is visible")
        for g in gpus:
            room = g["free"] * pct - need.gpu
            units = int(room // need.unit) if need.unit and room > 0 else 0
            placed.append({"gpu": g["gpu"], "room": int(max(room, 0)), "units": units})
        capacity = sum(p["units"] for p in placed) * need.unit
        for g, p in list(zip(gpus, placed))[: need.gpus]:
            if not p["units"]:  # memory another process holds (a notebook kernel, an earlier run) counts
                problems.append(f"memory: GPU {g['gpu']} has {gib(g['free'])} free of {gib(g['total'])}; its "
                                f"process needs one {gib(need.unit)} layer plus {gib(need.gpu)} of activations at "
                                f"gpu_max_mem_percentage {pct} (free it, or use fewer quantize.gpus)")
        if need.gpus > len(gpus) and gpus:
            problems.append(f"memory: {need.gpus} processes, one per GPU, but {len(gpus)} GPUs are visible")
        if gpus and need.unit and not any(p["units"] for p in placed) and not need.gpus:
            best = max(g["free"] for g in gpus)
            problems.append(f"memory: no GPU holds one {gib(need.unit)} layer plus {gib(need.gpu)} of activations "
                            f"at gpu_max_mem_percentage {pct} (the most free on one GPU: {gib(best)})")
        host_need = max(need.model - capacity, 0) + need.host
    if host_need > host_available:
        if offload_folder and device != "cpu":
            pass  # what the GPUs cannot hold goes to the offload folder
        else:
            problems.append(f"memory: {need.what}: {gib(host_need)} for host memory after the GPUs take their "
                            f"share; {gib(host_available)} available")
    return {"need": need.as_dict(), "host_need": host_need, "host_available": host_available, "placed": placed,
            "problems": problems}


def export_bytes(tensors, s: dict) -> int:
    """modelopt's generic export of the BF16 `tensors` ((name, shape, nbytes) each) with settings `s`.

    Quantized weights at 4.5 bits (E2M1 + one E4M3 scale per 16) for routed experts
    (`nvfp4_experts_only`) or every linear but embedding, head and routers (`nvfp4`); every other
    tensor as in the source."""
    every_linear = "experts_only" not in str(s.get("qformat")) and not s.get("recipe")
    total = 0
    for name, shape, nbytes in tensors:
        part = component(name)
        routed = part == "routed_expert" and name.endswith(".weight")
        linear = len(shape) == 2 and name.endswith(".weight") and part not in ("embed", "head", "router", "norm")
        quantized = not name.startswith("mtp.") and (routed or (every_linear and linear))
        total += int(math.prod(shape) * 0.5625) + 8 if quantized else nbytes
    return total


def activation_bytes(cfg: dict, s: dict) -> int:
    """One set of a layer's inputs for every calibration sample: samples x seq x hidden x hc_mult, BF16."""
    return sum(calib_plan(s)[1]) * int(s["calib_seq"]) * cfg.get("hidden_size", 0) * cfg.get("hc_mult", 1) * 2


def run_dir_bytes(cfg: dict, s: dict, q: dict, model_bytes: int) -> tuple[int, int]:
    """(calibrated state, per-layer checkpoint) bytes in the run directory. Layerwise: modelopt keeps
    the next layer's inputs of EVERY layer on disk; a driver that does not load the whole model (the
    streaming driver) keeps the inputs of the next layer only, twice while it saves them."""
    checkpoint = 0
    if q["layerwise"]:
        checkpoint = int(activation_bytes(cfg, s) * cfg.get("num_hidden_layers", 0) * 1.25)
    elif not registry.get(q["driver"]).loads_whole_model:
        try:
            checkpoint = 2 * activation_bytes(cfg, s)
        except ParamsError:  # a calib_size the data check refuses (with the reason): no estimate
            checkpoint = 0
    return (model_bytes if q["save_full_state"] else 0) + 64 * 2**20, checkpoint


def estimate_resources(q: dict, run_dir: str | Path) -> dict:
    """What the run needs against what the machine has: memory as the driver holds the model
    (`Driver.memory_need`), export, state and layerwise checkpoint on disk. From the config and the
    shard headers only (seconds, no weights read)."""
    import psutil

    s = {**HF_PTQ_DEFAULTS, **q["hf_ptq"]}
    src = Path(s["pyt_ckpt_path"])
    cfg = atomic.read_json(src / "config.json") or {}
    tensors = [(name, e.shape, e.nbytes) for shard in sorted(src.glob("*.safetensors"))
               for name, e in read_header(shard).tensors.items()]
    model_bytes = sum(n for _, _, n in tensors)
    export = export_bytes(tensors, s) if writes_generic_export(q) else 0  # 0: not written
    state_bytes, layerwise_bytes = run_dir_bytes(cfg, s, q, model_bytes)
    disk = {}
    if export:
        export_dir = Path(s["export_path"])
        disk["export"] = {"path": str(export_dir), "need": int(export * 1.05), "free": free_disk(export_dir)}
    disk["run_dir"] = {"path": str(run_dir), "need": state_bytes + layerwise_bytes, "free": free_disk(Path(run_dir))}
    host = psutil.virtual_memory().available
    gpus = []
    if s["device"] != "cpu":
        import torch

        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"gpu": i, "free": free, "total": total})
    need = registry.get(q["driver"]).memory_need(cfg, s, q)
    memory = check_memory(need, s["device"], s["gpu_max_mem_percentage"], host, gpus, s.get("offload_folder"))
    by_fs: dict[int, list[str]] = {}
    for k, v in disk.items():
        by_fs.setdefault(filesystem(Path(v["path"])), []).append(k)
    problems = []
    for keys in by_fs.values():
        wanted, free = sum(disk[k]["need"] for k in keys), disk[keys[0]]["free"]
        if wanted > free:
            problems.append(f"disk for {' + '.join(keys)}: needs ~{wanted / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
                            f"free at {disk[keys[0]]['path']}")
    problems += memory["problems"]
    return {"model_bytes": model_bytes, "export_bytes": export, "state_bytes": state_bytes,
            "layerwise_bytes": layerwise_bytes, "disk": disk, "host_available": host, "gpus": gpus,
            "memory": memory, "problems": problems}


def check_resources(q: dict, run_dir: str | Path) -> dict:
    """`estimate_resources`, refusing a run that cannot fit (unless `force`)."""
    r = estimate_resources(q, run_dir)
    if r["problems"]:
        msg = "not enough room for this run:\n  - " + "\n  - ".join(r["problems"])
        if not q["force"]:
            raise QuantizeError(msg + "\n(quantize.force: true runs anyway)")
        warnings.warn("FORCED: " + msg, stacklevel=2)
    return r
