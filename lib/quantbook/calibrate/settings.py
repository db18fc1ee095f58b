"""Step 02's settings: the `quantize:` section of a params file, and hf_ptq's flags inside it.

Both drivers that run hf_ptq's pipeline read the settings in hf_ptq's own flag names (argparse
dests) from `quantize.hf_ptq`; `modelopt_settings` fills hf_ptq's defaults for the flags the
embedded pipeline honours and refuses the ones only hf_ptq.py implements.
"""

from __future__ import annotations

import copy
import os
import warnings

from ..errors import ParamsError
from .checks import STREAMING_DEFAULTS, calib_samples

QUANTIZE_DEFAULTS = {
    "driver": "modelopt",
    "hf_ptq_dir": None,
    "force": False,
    "layerwise": False,
    "layerwise_save_every": 1,
    "save_full_state": False,
    "export_generic": False,  # modelopt's generic export (not servable for V4; step 03 does not read it)
    **STREAMING_DEFAULTS,  # the streaming driver's own keys; the other drivers refuse other values
    "hf_ptq": {},
}

# hf_ptq's argparse defaults (examples/hf_ptq/hf_ptq.py, 0.47) for every flag this driver honours
HF_PTQ_DEFAULTS = {
    "pyt_ckpt_path": None,
    "export_path": "exported_model",
    "recipe": None,
    "device": "cuda",
    "qformat": "fp8",
    "batch_size": 0,
    "calib_size": "1024",
    "calib_seq": 512,
    "dataset": None,
    "inference_tensor_parallel": 1,
    "inference_pipeline_parallel": 1,
    "awq_block_size": 0,
    "sparsity_fmt": "dense",
    "kv_cache_qformat": "fp8_cast",
    "export_fmt": "hf",
    "trust_remote_code": False,
    "gpu_max_mem_percentage": 0.8,
    "use_seq_device_map": False,
    "verbose": True,
    "skip_generate": False,
    "low_memory_mode": False,
    "attn_implementation": None,
    "moe_calib_experts_ratio": None,
    "offload_folder": None,
    "max_cpu_memory_gb": None,
    "max_gpu_memory_gb": None,
}
# hf_ptq flags that only the hf_ptq driver implements (value that means "off")
HF_PTQ_ONLY = {
    "specdec_offline_dataset": None, "calib_with_images": False, "use_fsdp2": False, "cpu_offload": False,
    "auto_quantize_checkpoint": None, "vllm_fakequant_export": False, "cast_mxfp4_to_nvfp4": False,
    "mlflow": None, "mlflow_tracking_uri": None, "mlflow_experiment": None, "mlflow_run_name": None,
}
RAND_SEED = 1234  # hf_ptq seeds python and numpy with this


def normalize(q: dict) -> dict:
    """The `quantize:` section with defaults filled; unknown top-level keys refused.

    The entry points (`quantbook.calibrate.quantize` / `preflight`) call it once; everything
    below them takes the normalized section. Normalizing twice gives the same dict."""
    unknown = sorted(set(q) - set(QUANTIZE_DEFAULTS))
    if unknown:
        raise ParamsError(f"quantize: unknown key(s) {unknown}; known: {sorted(QUANTIZE_DEFAULTS)}")
    out = {**QUANTIZE_DEFAULTS, **copy.deepcopy(q)}
    if not isinstance(out["hf_ptq"], dict):
        raise ParamsError(f"quantize.hf_ptq must be a mapping of hf_ptq flag names, got {out['hf_ptq']!r}")
    if not out["hf_ptq_dir"]:
        out["hf_ptq_dir"] = os.environ.get("QUANTBOOK_HF_PTQ_DIR") or None
    return out


def modelopt_settings(q: dict, strict: bool = True) -> dict:
    """hf_ptq settings for the embedded driver: hf_ptq's defaults + the params, checked.

    `strict=False` (loading a state saved by either driver) ignores flags this driver does not
    implement instead of refusing them.
    """
    s = q.get("hf_ptq") or {}
    only = sorted(k for k, off in HF_PTQ_ONLY.items() if k in s and s[k] not in (off, None, False))
    if only and strict:
        raise ParamsError(f"quantize.hf_ptq: {only} are implemented only by the hf_ptq driver "
                          "(set quantize.driver: hf_ptq)")
    unknown = sorted(set(s) - set(HF_PTQ_DEFAULTS) - set(HF_PTQ_ONLY))
    if unknown and strict:
        raise ParamsError(f"quantize.hf_ptq: unknown hf_ptq flag(s) {unknown}; the modelopt driver knows "
                          f"{sorted(HF_PTQ_DEFAULTS)}")
    out = {**HF_PTQ_DEFAULTS, **{k: v for k, v in s.items() if k in HF_PTQ_DEFAULTS}}
    if not out["pyt_ckpt_path"]:
        raise ParamsError("quantize.hf_ptq.pyt_ckpt_path: required (the BF16 checkpoint from step 01)")
    if not strict:
        return out
    if out["sparsity_fmt"] != "dense":
        raise ParamsError("quantize.hf_ptq.sparsity_fmt: only dense is supported by the modelopt driver")
    if out["export_fmt"] != "hf":
        warnings.warn("quantize.hf_ptq.export_fmt is deprecated in hf_ptq; the unified HF export is written",
                      stacklevel=2)
    if out["low_memory_mode"]:
        raise ParamsError("quantize.hf_ptq.low_memory_mode: not supported by the modelopt driver")
    if out["offload_folder"] and (out["use_seq_device_map"] or out["device"] == "cpu"):
        raise ParamsError("quantize.hf_ptq.offload_folder: incompatible with use_seq_device_map and device cpu "
                          "(as in hf_ptq)")
    return out


def calib_plan(s: dict) -> tuple[list[str], list[int]]:
    """Datasets and samples per dataset exactly as hf_ptq draws them."""
    pairs = calib_samples(s)
    return [d for d, _ in pairs], [n for _, n in pairs]


def writes_generic_export(q: dict) -> bool:
    """Whether step 02 writes modelopt's generic export at `hf_ptq.export_path`: only when asked
    (`quantize.export_generic: true`); no engine serves it for V4 and step 03 does not read it."""
    return bool(q.get("export_generic", QUANTIZE_DEFAULTS["export_generic"]))
