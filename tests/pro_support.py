"""Helpers for the tests at V4 Pro's real size: the production params pointed at a sparse full-size
release, calibration text, and the 8x B200 node described as the preflight sees a machine."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from quantbook.machine import Machine

REPO = Path(__file__).resolve().parents[1]
TIB, GIB = 2**40, 2**30


def pro_params(base: Path, release: Path, calib: Path | None = None, driver: str = "modelopt", **sections) -> dict:
    """params/v4_pro_b200.yaml with the release at `release` and every output under `base` (and the
    hub datasets replaced by a local file with enough samples, when `calib` is given); `sections`
    update keys of a section ("quantize.hf_ptq": {...}).

    The file calibrates with the streaming driver, from the release (`driver="streaming"`: as it is).
    `driver="modelopt"` (the default here) gives its whole-model form, the one these tests check the
    whole-model refusals and placement with: driver modelopt on step 01's BF16 copy, which is also
    the verifier's reference."""
    text = (REPO / "params" / "v4_pro_b200.yaml").read_text()
    text = text.replace("/data/models/DeepSeek-V4-Pro-FP8", str(release)).replace("/data/models/", f"{base}/out/")
    p = yaml.safe_load(text)
    if driver != "streaming":
        p["quantize"]["driver"] = driver
        p["quantize"]["hf_ptq"]["pyt_ckpt_path"] = p["export"]["reference"] = p["dequant"]["destination"]
    if calib is not None:
        p["quantize"]["hf_ptq"].update(dataset=str(calib), calib_size=128)
        p["export"]["fidelity"]["text"] = None  # the held-out file beside it (calib_file writes one)
    for where, values in sections.items():
        node = p
        for part in where.split("."):
            node = node.setdefault(part, {})
        node.update(values)
    p["_path"] = str(base / "v4_pro_b200.yaml")
    return p


def write_params(p: dict, path: Path) -> Path:
    """A params dict (as `pro_params` returns it) as a params file."""
    path.write_text(yaml.safe_dump({k: v for k, v in p.items() if k != "_path"}, sort_keys=False))
    return path


def calib_file(path: Path, rows: int = 130) -> Path:
    """Made-up calibration text, one {"text"} a line, and its held-out sibling (the fidelity gate's)."""
    from quantbook.calibrate.data import heldout_path

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"sample {i}: the router sends tokens to experts."}) + "\n"
                            for i in range(rows)))
    heldout_path(path).write_text("".join(json.dumps({"text": f"held out {i}: the gate reads these, never "
                                                               "the calibration."}) + "\n" for i in range(rows)))
    return path


def b200(free_gpu: float = 178 * GIB, host: int = int(2.6e12), disk: int = 30 * TIB, disk_id=lambda p: 1) -> Machine:
    """The 8x B200 node as the preflight would see it (a described machine, not this one): 8 x 180 GB
    of GPU memory, 2-2.7 TB of host memory and a large RAID (../shared/docs/anchors.md), a many-core
    host (128 CPUs assumed: any count above 16 picks the rates measured on the 16-core H200 node)."""
    gpus = [{"gpu": i, "name": "NVIDIA B200", "free": int(free_gpu), "total": 180 * GIB} for i in range(8)]
    return Machine("b200 (described)", 128, host, gpus, True, lambda p: disk, disk_id)
