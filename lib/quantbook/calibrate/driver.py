"""What every calibration driver shares: the interface, the run record, phases, memory, checks.

A driver is one way to calibrate (modelopt's API, modelopt's hf_ptq.py, ...). It subclasses
`Driver`, is registered by name in `registry`, and runs inside a `DriverRun`: the record
`quantize.json` in the run directory (atomic: running, then done or failed with the error), the
memory timeline of step 02, timed phases, and the run's patch ledger (every bad amax replaced,
by quantizer name). `check_inputs` holds the checks every driver of hf_ptq's pipeline makes
before anything loads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import atomic
from ..errors import QuantizeError
from ..records.memory import MemorySampler
from ..records.step import Phases, StepRecord
from . import patches
from .checks import check_quantize_settings
from .resources import MemoryNeed, model_sizes, size
from .settings import calib_plan, writes_generic_export
from .state import versions

RESULT = "quantize.json"  # the record of step 02, whichever driver ran it
SUMMARY = ".quant_summary.txt"  # modelopt's quantizer list, kept beside the record
# where modelopt's summary lands (inside the run directory, then removed) when no generic export is written
SCRATCH = "generic-export"
NOT_WRITTEN = {"written": False, "why": "quantize.export_generic is false: modelopt's generic export (research only, "
                                        "not servable for V4; step 03 does not read it) was not written"}


class Driver:
    """A way to calibrate. Subclasses set `name` and implement the three classmethods.

    `loads_whole_model`: the driver holds the whole BF16 model (spread over GPUs, then host memory),
    or one decoder layer at a time (a streaming driver); `memory_need` says what that costs, and
    the resource checks (step 02's and the preflight's) place it on the machine. `needs_bf16_copy`:
    the driver calibrates step 01's BF16 copy (False: it reads the release itself, and the plan
    has no step 01). `writes_along`: its `run` takes `export` (settings or None) and writes step
    03's export during calibration.
    """

    name = ""
    loads_whole_model = True
    needs_bf16_copy = True
    writes_along = False

    @classmethod
    def memory_need(cls, model_config: dict, s: dict, q: dict) -> MemoryNeed:
        """What this driver holds at its peak in host and GPU memory for a model config (released
        or BF16) and settings `s` (hf_ptq flag names), from the config alone.

        The default: the whole BF16 model placed layer by layer over the GPUs then host memory
        (modelopt, hf_ptq), or for a driver that does not load it whole, one layer on a GPU and
        one in host memory. A driver with its own peak (activations, prefetch) overrides this."""
        sizes = model_sizes(model_config)
        if cls.loads_whole_model:
            return MemoryNeed(f"the whole BF16 model ({sizes['layers']} layers, {size(sizes['total'])})",
                              model=sizes["total"], unit=sizes["largest"])
        return MemoryNeed(f"one layer at a time ({size(sizes['largest'])})", unit=sizes["largest"], host=sizes["largest"])

    @classmethod
    def settings(cls, q: dict) -> dict:
        """The hf_ptq-named settings this driver will run with (defaults filled, checked)."""
        raise NotImplementedError

    @classmethod
    def preflight(cls, q: dict) -> dict:
        """Everything checked before a model loads, in seconds; raises a QuantbookError.

        Returns at least {"settings", "model_config", "modelopt"} and the driver's own facts
        under "driver_facts"."""
        raise NotImplementedError

    @classmethod
    def run(cls, q: dict, run_dir: Path, progress: bool = True) -> dict:
        """Calibrate, keep amax and state, export; returns the final `quantize.json` record."""
        raise NotImplementedError


def check_inputs(q: dict, s: dict) -> dict:
    """The checks shared by the drivers of hf_ptq's pipeline: refused settings, the checkpoint's
    config, the calibration data, the modelopt version, CUDA. Returns the facts."""
    cfg_path = Path(s["pyt_ckpt_path"]) / "config.json"
    model_config = atomic.read_json(cfg_path)
    check_quantize_settings(q, model_config)
    if model_config is None:
        raise QuantizeError(f"{cfg_path}: missing; run step 01 (dequant) first or fix hf_ptq.pyt_ckpt_path")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    for d in calib_plan(s)[0]:
        if d.endswith(".jsonl") and not Path(d).is_file():
            raise QuantizeError(f"calibration dataset {d} does not exist; create it with "
                                f"`quantbook calib-data {d}`")
        if offline and not Path(d).exists():
            raise QuantizeError(f"calibration dataset {d!r} is a hub name but HF_HUB_OFFLINE is set; "
                                "use a local .jsonl (`quantbook calib-data`)")
    version = patches.check_version(q["force"])
    if s["device"] != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise QuantizeError(f"hf_ptq.device {s['device']!r} but CUDA is not available; use device: cpu")
    return {"settings": s, "model_config": model_config, "modelopt": version}


class DriverRun:
    """The scaffolding a driver runs in (a context manager).

    On entry: `quantize.json` says running (params, versions, the driver's facts), the memory
    sampler starts. `phase(name)` times and marks a span; `update(**kw)` adds to the record;
    `done(**result)` ends it. When the block raises, the record says failed, with the error and
    the bad amax replaced so far, and the exception goes on.
    """

    def __init__(self, run_dir: str | Path, driver: str, q: dict, **facts):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict = {}
        self.ledger = patches.Ledger()
        self.record = StepRecord(self.run_dir / RESULT, "quantbook.quantize", driver=driver,
                                 run_dir=str(self.run_dir), params=q, versions=versions(), timings=self.timings,
                                 **facts)
        self.memory: MemorySampler | None = None
        self.phase = Phases(None, self.timings)

    def __enter__(self) -> "DriverRun":
        self.memory = MemorySampler(self.run_dir, step="02_quantize").__enter__()
        self.phase = Phases(self.memory, self.timings)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.memory.__exit__(exc_type, exc, tb)
        if exc is not None:
            self.record.failed(exc, bad_amax=self.ledger.report())

    def update(self, **kw) -> None:
        self.record.update(**kw)

    def done(self, **result) -> dict:
        return self.record.done(bad_amax=self.ledger.report(), **result)


def export_dirs(q: dict, s: dict, run_dir: str | Path) -> tuple[Path | None, Path]:
    """(where the generic export goes, or None when `export_generic` is off; the directory the driver
    writes it and modelopt's quantizer summary into: `<export_path>.partial`, or a scratch
    directory inside the run directory). Nothing is created: `start_export` does."""
    final = Path(s.get("export_path") or "exported_model") if writes_generic_export(q) else None
    base = final if final is not None else Path(run_dir) / SCRATCH
    return final, base.with_name(base.name + atomic.PARTIAL)


def start_export(work: Path) -> None:
    """A fresh, empty `work` directory (one left by a killed run is removed first)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)


def finish_export(final: Path | None, work: Path, run_dir: str | Path) -> dict:
    """Put the generic export in place (or drop the scratch directory), keep the quantizer summary
    beside the record; returns the record's `export` entry: what was (not) written, and where."""
    if final is None:
        if (work / SUMMARY).exists():
            shutil.copy2(work / SUMMARY, Path(run_dir) / SUMMARY)
        shutil.rmtree(work)
        return dict(NOT_WRITTEN)
    atomic.replace_dir(work, final)
    if (final / SUMMARY).exists():
        shutil.copy2(final / SUMMARY, Path(run_dir) / SUMMARY)
    return {"written": True, "dir": str(final)}


def generic_export_dir(rec: dict) -> Path | None:
    """The generic export a step-02 record says was written, or None (also for the v4-serving export
    a streaming pass writes along: step 03 verifies that one)."""
    export = rec.get("export") or {}
    generic = export.get("layout", "generic") == "generic"
    return Path(export["dir"]) if generic and export.get("dir") and export.get("written", True) else None

