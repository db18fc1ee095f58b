"""Runtime patches to modelopt, applied before anything loads, idempotent and version-gated.

Each one answers a failure seen (or measured) on the real run:

1. `amax_to_cpu`: `TensorQuantizer.load_calib_amax` moves the calibrated `_amax` to host memory
   the moment it is written. The predecessor's run 2 calibrated for hours, then died in export
   reading quantizer amax that had stayed on a GPU ("illegal memory access"). modelopt 0.47 moves
   a CPU amax to the input's device on the fly (`TensorQuantizer._get_amax`), so a later forward
   still works; NVFP4 export reads scalars and moves them to the weight's device itself.
2. `export_amax_cpu`: `TensorQuantizer.export_amax` reads `_amax` from host memory: a copy on
   another device (a layerwise resume restores amax onto the layers' GPUs) is first replaced by
   its CPU copy, so no export reads calibration results from GPU memory.
3. `nvfp4_input_scale_cpu`: `NVFP4QTensor.get_activation_scaling_factor` (the `input_scale` of
   every NVFP4 linear and expert) is computed on CPU, and a bad amax (0, NaN, inf, negative, in
   any entry) is never exported silently: it is replaced by the fallback below and recorded by
   quantizer name in the run's `Ledger`. modelopt alone swaps 0/NaN for `maxbound` (an input
   scale of 1/448, which clips real activations) with a nameless warning, clamps inf to the
   largest float, and aborts the whole export on a negative amax.

   Fallback at export time: the largest valid activation amax set on the run's `Ledger`
   (`state.repair_amax` sets the model's largest calibrated input amax); without one,
   modelopt's `maxbound`, recorded as such.

A quantizer that saw no calibration data never reaches `load_calib_amax` and keeps no `_amax`;
the exporter then silently writes NO `input_scale` for a plain linear. Patches cannot see that
case: `state.repair_amax` (run by the post-calibration hook, before any export) finds those
quantizers, gives them a fallback amax and records them the same way.

Only modelopt versions in `TESTED_MODELOPT` are patched; another version is refused unless
`force=True` (with a loud warning), because every patch replaces a private function whose
signature and meaning were read from that version's source.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref

from ..amax import amax_problem, sample
from ..errors import PatchError

TESTED_MODELOPT = ("0.47.0",)
_MARK = "__quantbook_patch__"

# name -> one-line description, in the order they are applied (the notebook lists these)
PATCHES = {
    "amax_to_cpu": "TensorQuantizer.load_calib_amax: calibrated _amax moved to CPU as soon as it is written",
    "export_amax_cpu": "TensorQuantizer.export_amax: reads a CPU copy of _amax (moved there first)",
    "nvfp4_input_scale_cpu": "NVFP4QTensor.get_activation_scaling_factor: computed on CPU; a 0, NaN, inf "
                             "or negative amax replaced by the documented fallback, counted and listed by "
                             "quantizer name (missing ones: state.repair_amax, before export)",
}


_lock = threading.Lock()  # applying the patches is once per process, whichever thread asks first
# quantizer -> the Ledger attached to it (weak keys: a quantizer that is gone leaves no entry). Kept
# here, not on the quantizer, because modelopt saves every instance attribute into modelopt_state.
_owners: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Ledger:
    """One run's bookkeeping for the export-time patch: quantizer names, the fallback amax, and
    every bad amax replaced (missing, 0, NaN, inf, negative), by quantizer name.

    `attach(model)` makes the patched exporter find this ledger from any of the model's
    quantizers; `state.repair_amax` sets the fallback and records what it repairs before export.
    """

    def __init__(self):
        self._names: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._bad: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.fallback: float | None = None
        self.fallback_source: str | None = None

    def attach(self, model) -> int:
        """Name every quantizer of `model` and route its export-time findings here; the count."""
        from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer

        n = 0
        for name, module in model.named_modules():
            if isinstance(module, TensorQuantizer):
                self._names[module] = name
                _owners[module] = self
                n += 1
        return n

    def name(self, quantizer) -> str:
        try:
            return self._names.get(quantizer) or f"<unnamed {type(quantizer).__name__} at {id(quantizer):#x}>"
        except TypeError:
            return f"<unnamed {type(quantizer).__name__}>"

    def set_fallback(self, amax: float | None, source: str | None) -> None:
        """The activation amax that replaces a bad one at export time, and where it came from."""
        self.fallback, self.fallback_source = amax, source

    def record(self, name: str, problem: str, values: list | None, replacement: float, source: str,
               where: str) -> None:
        """Count and keep one bad amax (the notebook and `quantize.json` list these)."""
        with self._lock:
            rec = self._bad.setdefault(name, {"quantizer": name, "problem": problem, "values": values,
                                              "replacement": replacement, "fallback": source, "seen_in": []})
            if where not in rec["seen_in"]:
                rec["seen_in"].append(where)

    def report(self) -> list[dict]:
        """Every bad amax replaced so far in this run."""
        with self._lock:
            return [dict(r) for r in self._bad.values()]


def ledger_of(quantizer) -> Ledger | None:
    """The ledger attached to a quantizer (None before any `Ledger.attach`)."""
    try:
        return _owners.get(quantizer)
    except TypeError:
        return None


def modelopt_version() -> str:
    import modelopt

    return getattr(modelopt, "__version__", "unknown")


def check_version(force: bool = False) -> str:
    """The installed modelopt version; PatchError for an untested one unless `force`."""
    v = modelopt_version()
    if v not in TESTED_MODELOPT:
        msg = (f"nvidia-modelopt {v} is not a version quantbook's runtime patches were tested with "
               f"({', '.join(TESTED_MODELOPT)}); they replace private functions whose meaning can change "
               "between releases")
        if not force:
            raise PatchError(msg + ". Install a tested version, or set quantize.force: true to run anyway.")
        warnings.warn("FORCED: " + msg + ". Check the export by hand.", stacklevel=3)
    return v


def _targets():
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    return TensorQuantizer, NVFP4QTensor


def applied() -> list[str]:
    """Names of the patches currently in place."""
    try:
        tq, nv = _targets()
    except ImportError:
        return []
    found = {getattr(tq.load_calib_amax, _MARK, None), getattr(tq.export_amax, _MARK, None),
             getattr(_classmethod_func(nv, "get_activation_scaling_factor"), _MARK, None)}
    return [name for name in PATCHES if name in found]


def apply(force: bool = False) -> list[str]:
    """Install every patch (once; calling again changes nothing). Returns the names in place."""
    check_version(force)
    tq, nv = _targets()
    for owner, attr in ((tq, "load_calib_amax"), (tq, "export_amax"), (nv, "get_activation_scaling_factor")):
        if attr not in owner.__dict__:
            raise PatchError(f"modelopt {modelopt_version()}: {owner.__name__}.{attr} not found; cannot patch")
    with _lock:
        if not getattr(tq.load_calib_amax, _MARK, None):
            tq.load_calib_amax = _patch_load_calib_amax(tq.load_calib_amax)
        if not getattr(tq.export_amax, _MARK, None):
            tq.export_amax = _patch_export_amax(tq.export_amax)
        current = _classmethod_func(nv, "get_activation_scaling_factor")
        if not getattr(current, _MARK, None):
            nv.get_activation_scaling_factor = classmethod(_patch_activation_scale(current))
    return applied()


def _classmethod_func(owner, attr):
    """The function behind a classmethod defined on `owner` (None when it is not one)."""
    raw = owner.__dict__.get(attr)
    return getattr(raw, "__func__", None)


def _marked(name):
    def deco(fn):
        setattr(fn, _MARK, name)
        return fn
    return deco


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def move_amax_to_cpu(quantizer) -> None:
    """Move a quantizer's calibrated tensors (`_amax`, `_global_amax`, `_pre_quant_scale`) to CPU."""
    for attr in ("_amax", "_global_amax", "_pre_quant_scale"):
        t = quantizer._buffers.get(attr) if hasattr(quantizer, "_buffers") else None
        if t is not None and not t.is_meta and t.device.type != "cpu":
            quantizer._buffers[attr] = t.detach().to("cpu")


def _patch_load_calib_amax(original):
    @functools.wraps(original)
    @_marked("amax_to_cpu")
    def load_calib_amax(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not _distributed():  # an NCCL amax all-reduce after calibration needs device tensors
            move_amax_to_cpu(self)
        return out
    return load_calib_amax


def _patch_export_amax(original):
    @functools.wraps(original)
    @_marked("export_amax_cpu")
    def export_amax(self):
        move_amax_to_cpu(self)
        return original(self)
    return export_amax


def _patch_activation_scale(original_func):
    @functools.wraps(original_func)
    @_marked("nvfp4_input_scale_cpu")
    def get_activation_scaling_factor(cls, quantizer):
        import torch

        if not quantizer.is_enabled:
            return None
        move_amax_to_cpu(quantizer)
        raw = getattr(quantizer, "_amax", None)
        problem = amax_problem(raw)
        if raw is None:
            return None  # no amax at all: the exporter writes no input_scale (state.repair_amax fills these first)
        if problem is not None:
            ledger = ledger_of(quantizer) or Ledger()
            fallback, source = ledger.fallback, ledger.fallback_source
            if fallback is None:
                fallback, source = float(quantizer.maxbound), "maxbound (modelopt's substitute; no calibrated fallback registered)"
            name = ledger.name(quantizer)
            ledger.record(name, problem, sample(raw), fallback, source, "export input_scale")
            warnings.warn(f"bad input amax ({problem}) for {name}: exported with amax {fallback:g} from {source}",
                          stacklevel=2)
            quantizer._buffers["_amax"] = torch.full_like(raw.detach().float().cpu(), fallback)
        amax = quantizer.export_amax().detach().float().cpu()
        scale = amax / (quantizer.maxbound * torch.finfo(torch.float8_e4m3fn).max)
        if not bool(torch.all(scale > 0)) or not bool(torch.all(torch.isfinite(scale))):
            raise ValueError(f"{(ledger_of(quantizer) or Ledger()).name(quantizer)}: NVFP4 input scale {scale} is "
                             "not positive and finite")
        return scale
    return get_activation_scaling_factor
