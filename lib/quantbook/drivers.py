"""Step 02: calibrate and quantize with NVIDIA Model Optimizer; one call, two drivers.

`quantize(q, run_dir)` takes the `quantize:` section of a params file and a run directory and
dispatches on `q["driver"]`:

- `modelopt` (the default; no checkout needed, offline): the steps of modelopt's
  `examples/hf_ptq/hf_ptq.py` done here on modelopt's public API, so that the export is
  byte-identical to hf_ptq's for the same settings (tests/test_quantize_hfptq.py compares them
  whenever a checkout is available). What has to match, and is done here: the model loaded with
  hf_ptq's device map and per-GPU `max_memory` (sequential on request; never a bare
  `from_pretrained` that can pile the experts onto one GPU: the predecessor's run 3); the
  tokenizer's pad token and left padding; samples from modelopt's `get_dataset_dataloader`
  with one entry per dataset; a deep copy of the preset quantization config updated with the
  KV-cache entry; a forward loop that restores `config.use_cache`; `print_quant_summary`; the
  checkpoint's MTP tensors passed to the export with `_mtp_layer_prefixes`; the tokenizer
  saved, then the source's sidecar files copied with hf_ptq's exclusions.
- `hf_ptq` (the reference): runs hf_ptq.py from a Model-Optimizer checkout
  (`quantbook.hfptq.run`), with the same runtime patches and post-calibration hook.

Both read the settings in hf_ptq's own flag names from `q["hf_ptq"]`. In this driver the
export is written to `<export_path>.partial` and renamed into place when complete.

Everything a run keeps goes to `run_dir`: `quantize.json` (the result record, atomic; status
running / done / failed), `amax.safetensors`, `expert_token_counts.json`, `state/` (cheap
calibrated state), `layerwise/` (modelopt's per-layer checkpoint, signed), `.quant_summary.txt`
and `memory.csv`.

`load_model`, `load_tokenizer`, `export_model` and `restore` are public for step 03's recovery
export: `model, tok, manifest = restore(run_dir)` rebuilds the calibrated model from
`run_dir/state`, and `export_model(model, tok, settings, out_dir)` exports it exactly as this
driver does (settings = `modelopt_settings(normalize(manifest["params"]), strict=False)`).
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import atomic, patches, state
from .params import ParamsError

RESULT = "quantize.json"
SUMMARY = ".quant_summary.txt"

QUANTIZE_DEFAULTS = {
    "driver": "modelopt",
    "hf_ptq_dir": None,
    "force": False,
    "layerwise": False,
    "layerwise_save_every": 1,
    "save_full_state": False,
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


class QuantizeError(RuntimeError):
    """A quantize run that cannot start or cannot finish (the message names the cause)."""


# ---------------------------------------------------------------------------------------------
# settings

def normalize(q: dict) -> dict:
    """The `quantize:` section with defaults filled; unknown top-level keys refused."""
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
    from .checks import calib_samples

    pairs = calib_samples(s)
    return [d for d, _ in pairs], [n for _, n in pairs]


# ---------------------------------------------------------------------------------------------
# model, tokenizer, data

def load_model(s: dict):
    """Load the checkpoint the way hf_ptq's get_model does (device map, per-GPU max_memory).

    device `cpu` -> device_map "cpu"; otherwise "auto", or "sequential" with every GPU capped at
    `gpu_max_mem_percentage` when `use_seq_device_map`; when the model does not fit the GPUs,
    the GPUs are capped at that percentage and the rest goes to host memory (or to
    `offload_folder`). The weights are loaded with their own dtype (`dtype="auto"`).
    """
    import torch
    import transformers
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_max_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    path, device = s["pyt_ckpt_path"], s["device"]
    pct = s["gpu_max_mem_percentage"]
    config_kwargs = {"trust_remote_code": True} if s["trust_remote_code"] else {}
    hf_config = AutoConfig.from_pretrained(path, **config_kwargs)
    if s["attn_implementation"] is not None:
        config_kwargs["attn_implementation"] = s["attn_implementation"]
    model_kwargs = dict(config_kwargs)
    model_kwargs.setdefault("dtype", "auto")
    device_map = "cpu" if device == "cpu" else "auto"
    if s["use_seq_device_map"]:
        device_map = "sequential"
        model_kwargs["max_memory"] = {k: v * pct for k, v in get_max_memory().items()}
    if not hf_config.architectures:
        raise QuantizeError(f"{path}/config.json names no architectures")
    arch = hf_config.architectures[0]
    bundled = s["trust_remote_code"] and "Deepseek" in arch
    if not hasattr(transformers, arch) or bundled:
        if not s["trust_remote_code"]:
            raise QuantizeError(f"transformers {transformers.__version__} has no {arch}; "
                                "set quantize.hf_ptq.trust_remote_code to use the checkpoint's code")
        cls, from_config = AutoModelForCausalLM, AutoModelForCausalLM.from_config
    else:
        cls = getattr(transformers, arch)
        from_config = cls._from_config
    with init_empty_weights(include_buffers=True):
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.bfloat16
        if isinstance(config_dtype, str):
            config_dtype = getattr(torch, config_dtype)
        kw = {k: v for k, v in model_kwargs.items() if k != "max_memory"}
        kw["dtype"] = config_dtype
        if cls is not AutoModelForCausalLM:
            kw.pop("trust_remote_code", None)
        empty = from_config(hf_config, **kw)
    max_memory = get_max_memory()
    if s["offload_folder"]:
        for k in max_memory:
            if isinstance(k, int):
                max_memory[k] = int(s["max_gpu_memory_gb"] * 2**30) if s["max_gpu_memory_gb"] is not None \
                    else int(max_memory[k] * pct)
        if s["max_cpu_memory_gb"] is not None:
            max_memory["cpu"] = int(s["max_cpu_memory_gb"] * 2**30)
        model_kwargs["max_memory"] = max_memory
        model_kwargs["offload_folder"] = s["offload_folder"]
    elif "cpu" in infer_auto_device_map(empty, max_memory=max_memory).values():
        for k in max_memory:
            if isinstance(k, int):
                max_memory[k] *= pct
        model_kwargs["max_memory"] = max_memory
    del empty
    model = cls.from_pretrained(path, device_map=device_map, **model_kwargs)
    model.eval()
    if device == "cuda" and not all(p.device.type == "cuda" for p in model.parameters()):
        print("Warning: some parameters are not on a GPU (offloaded to host memory or disk); "
              "calibration streams them per batch")
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """(tokenizer with hf_ptq's pad token and left padding, default padding side, default pad token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token != "<unk>" or tok.pad_token is None:  # hf_ptq's condition, kept verbatim in meaning
        tok.pad_token = tok.eos_token
    if tok.pad_token is None:
        raise QuantizeError(f"{path}: the tokenizer has no eos token to pad with")
    default_side, default_pad = tok.padding_side, tok.pad_token
    tok.padding_side = "left"
    return tok, default_side, default_pad


def model_device(model):
    return model.model.device if hasattr(model, "model") else model.device


def make_dataloader(s: dict, tokenizer, device):
    """Calibration batches from modelopt's get_dataset_dataloader, one entry per dataset."""
    from modelopt.torch.utils.dataset_utils import get_dataset_dataloader

    datasets, sizes = calib_plan(s)
    return get_dataset_dataloader(dataset_name=datasets, tokenizer=tokenizer, batch_size=s["batch_size"],
                                  num_samples=sizes, max_sample_length=s["calib_seq"], device=device,
                                  include_labels=False)


def build_quant_cfg(s: dict, layerwise_ckpt: Path | None = None, save_every: int = 1) -> dict:
    """The quantization config hf_ptq would build: preset (deep copy) or recipe, plus KV cache.

    With `layerwise_ckpt`, modelopt's layerwise calibration is switched on with its checkpoint
    there (`calib_mutates_weights` false for max calibration: only quantizer buffers are saved).
    """
    import modelopt.torch.quantization as mtq
    from modelopt.recipe.presets import KV_CACHE_NONE, KV_QUANT_CFG_CHOICES, QUANT_CFG_CHOICES

    if s["recipe"]:
        from modelopt.recipe import ModelOptPTQRecipe, load_recipe

        recipe = load_recipe(s["recipe"])
        if not isinstance(recipe, ModelOptPTQRecipe):
            raise QuantizeError(f"recipe {s['recipe']}: the modelopt driver runs PTQ recipes only "
                                f"(got {type(recipe).__name__}); use the hf_ptq driver")
        cfg = recipe.quantize.model_dump()
    else:
        if s["qformat"] not in QUANT_CFG_CHOICES:
            raise QuantizeError(f"qformat {s['qformat']!r} is not a modelopt preset; choices: {sorted(QUANT_CFG_CHOICES)}")
        cfg = copy.deepcopy(QUANT_CFG_CHOICES[s["qformat"]])
        if s["moe_calib_experts_ratio"]:
            alg = cfg["algorithm"]
            cfg["algorithm"] = ({"method": alg, "moe_calib_experts_ratio": s["moe_calib_experts_ratio"]}
                                if isinstance(alg, str) else {**alg, "moe_calib_experts_ratio": s["moe_calib_experts_ratio"]})
        if s["awq_block_size"] and "awq" in str(cfg.get("algorithm")):
            raise QuantizeError("awq_block_size: AWQ formats are not supported by the modelopt driver")
        if s["kv_cache_qformat"] != KV_CACHE_NONE:
            if s["kv_cache_qformat"] not in KV_QUANT_CFG_CHOICES:
                raise QuantizeError(f"kv_cache_qformat {s['kv_cache_qformat']!r}: choices "
                                    f"{[KV_CACHE_NONE, *KV_QUANT_CFG_CHOICES]}")
            cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, KV_QUANT_CFG_CHOICES[s["kv_cache_qformat"]]["quant_cfg"])
    if layerwise_ckpt is not None:
        alg = cfg.get("algorithm") or "max"
        if isinstance(alg, list):
            raise QuantizeError("layerwise calibration with a list of algorithms is not supported")
        alg = {"method": alg} if isinstance(alg, str) else dict(alg)
        lw = dict(alg.get("layerwise") or {})
        lw.update(enable=True, checkpoint_dir=str(Path(layerwise_ckpt).resolve()), save_every=save_every)
        lw.setdefault("calib_mutates_weights", alg.get("method", "max") != "max")
        alg["layerwise"] = lw
        cfg["algorithm"] = alg
    return cfg


@contextmanager
def kv_cache_off_guard(model):
    """Fail a calibration forward that carries a KV cache into a decoder layer.

    V4 layers take the cache as a keyword; modelopt's layerwise replay resets only
    `past_key_values`, so with a cache on each replay sees a doubly filled cache (a shape error,
    or activation amax silently off by up to 30% on sliding-window layers).
    """
    layers = getattr(getattr(model, "model", model), "layers", None) or []
    handles = []

    def pre_hook(module, args, kwargs):
        for key in ("past_key_values", "cache", "past_key_value"):
            if kwargs.get(key) is not None:
                raise QuantizeError(f"calibration forward reached a decoder layer with a KV cache ({key}); "
                                    "calibrate with use_cache off")

    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# export

def load_mtp_weights(model, model_path: str) -> tuple[list[str], dict]:
    """The checkpoint's MTP tensors, which transformers drops on load, for the export.

    Keys of inlined MTP layers (`model.layers.{n}` for n past the decoder layers) and any key
    containing `mtp` are read from the shards; those with a slot in the model are loaded into
    it, the rest returned for `export_hf_checkpoint(extra_state_dict=...)`. The prefixes (the
    inlined layers, the first component of each separate key, and `...layers.{n}` within it) go
    to the export's exclude list.
    """
    import json

    from safetensors import safe_open

    d = Path(model_path)
    cfg = model.config
    n_mtp = int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
    inlined = {f"model.layers.{i}" for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + n_mtp)}
    starts = tuple(p + "." for p in inlined)

    def wanted(key: str) -> bool:
        return key.startswith(starts) or "mtp" in key

    tensors, seen = {}, set()
    index = d / "model.safetensors.index.json"
    if index.exists():
        by_shard: dict[str, list[str]] = {}
        for key, shard in json.loads(index.read_text())["weight_map"].items():
            if wanted(key):
                by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            seen.add(shard)
            with safe_open(str(d / shard), framework="pt", device="cpu") as f:
                for k in keys:
                    tensors[k] = f.get_tensor(k)
    for shard in sorted(d.glob("*.safetensors")):
        if shard.name in seen:
            continue
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for k in f.keys():
                if wanted(k):
                    tensors[k] = f.get_tensor(k)
    if not tensors:
        return [], {}
    prefixes = set(inlined)
    for key in tensors:
        if key.startswith(starts):
            continue
        parts = key.split(".")
        if parts[0] != "model":
            prefixes.add(parts[0])
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit():
                prefixes.add(".".join(parts[: i + 2]))
                break
    slots = model.state_dict()
    inside = {k: v for k, v in tensors.items() if k in slots}
    if inside:
        model.load_state_dict(inside, strict=False)
    return sorted(prefixes), {k: v for k, v in tensors.items() if k not in slots}


# the source files hf_ptq never copies into an export: weights and export-owned metadata
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.ckpt", "*.gguf",
                   "*.h5", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth",
                   "*.tar", "*.tar.bz2", "*.tar.gz", "*.tar.xz", "*.tflite", "*.tgz", "*.zip")
EXPORT_OWNED = {"config.json", "hf_quant_config.json", "quant_config.json", "quantization_config.json",
                "quantize_config.json", "recipe.yaml", "recipe.yml", "generation_config.json"}


def copy_sidecars(src: str, dst: str) -> list[str]:
    """Copy the source's non-weight files into the export (after the tokenizer was saved)."""
    from modelopt.torch.export.plugins.hf_checkpoint_utils import copy_non_safetensor_files_from_ckpt

    exclude = set(EXPORT_OWNED)
    if (Path(dst) / "chat_template.jinja").is_file():
        exclude.add("tokenizer_config.json")
    return copy_non_safetensor_files_from_ckpt(src, dst, exclude_files=exclude, exclude_patterns=WEIGHT_PATTERNS)


def export_model(model, tokenizer, s: dict, export_dir: str | Path, default_padding_side=None,
                 default_pad_token=None) -> dict:
    """Unified HF export of a calibrated model, exactly as hf_ptq writes it. Returns a record."""
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    export_dir = str(export_dir)
    t0 = time.time()
    with torch.no_grad():
        state.amax_to_cpu(model)
        prefixes, extra = load_mtp_weights(model, s["pyt_ckpt_path"])
        if prefixes:
            model._mtp_layer_prefixes = prefixes
        export_hf_checkpoint(model, export_dir=export_dir, extra_state_dict=extra)
        if tokenizer is not None:
            if default_padding_side is not None:
                tokenizer.padding_side = default_padding_side
            if default_pad_token is not None:
                tokenizer.pad_token = default_pad_token
            tokenizer.save_pretrained(export_dir)
        copied = copy_sidecars(s["pyt_ckpt_path"], export_dir)
    return {"dir": export_dir, "mtp_prefixes": prefixes, "mtp_tensors": len(extra), "sidecars": copied,
            "seconds": round(time.time() - t0, 3)}


def swap_into_place(partial: Path, final: Path) -> None:
    """Rename a finished export over `final` (the previous one removed only once the new one is in)."""
    atomic.replace_dir(partial, final)


# ---------------------------------------------------------------------------------------------
# the run

@contextmanager
def step_memory(run_dir: Path):
    """Step 02's memory timeline (memory.csv in the run directory), for either driver."""
    from .memory import MemorySampler

    with MemorySampler(run_dir, step="02_quantize") as mem:
        yield mem


@contextmanager
def timed_phase(mem, name: str, timings: dict):
    """A named phase: printed, timed into `timings`, marked in the memory timeline."""
    t0 = time.time()
    print(f"[quantbook] phase {name} ...", flush=True)
    if mem is None:
        yield
    else:
        with mem.phase(name):
            yield
    timings[name] = round(time.time() - t0, 3)
    print(f"[quantbook] phase {name} done in {timings[name]:.1f} s", flush=True)


class _Record:
    """quantize.json, rewritten atomically as the run goes."""

    def __init__(self, run_dir: Path, base: dict):
        self.path = run_dir / RESULT
        self.data = base
        self.save()

    def update(self, **kw):
        self.data.update(kw)
        self.save()

    def save(self):
        atomic.write_json(self.path, self.data)


def quantize(q: dict, run_dir: str | Path, progress: bool = True) -> dict:
    """Run step 02 with the driver `q["driver"]` names; the result record (also in quantize.json)."""
    q = normalize(q)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if q["driver"] == "modelopt":
        return run_modelopt(q, run_dir, progress=progress)
    if q["driver"] == "hf_ptq":
        from . import hfptq

        return hfptq.run(q, run_dir)
    raise ParamsError(f"quantize.driver: {q['driver']!r}; choose modelopt or hf_ptq")


def preflight(q: dict) -> dict:
    """Cheap checks before anything loads: settings, paths, versions. Raises on a refusal.

    For the hf_ptq driver, `hfptq.preflight` also checks the checkout and parses hf_ptq's own
    command line.
    """
    from .checks import check_quantize_settings

    q = normalize(q)
    facts = {}
    if q["driver"] == "modelopt":
        s = modelopt_settings(q)
    else:
        from . import hfptq

        facts = hfptq.preflight(q)
        s = {**HF_PTQ_DEFAULTS, **q["hf_ptq"]}
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
    return {"settings": s, "model_config": model_config, "modelopt": version, "driver_facts": facts}


def estimate_resources(q: dict, run_dir: str | Path) -> dict:
    """What the run needs against what the machine has: model bytes in memory, export, state and
    layerwise checkpoint on disk. From the shard headers only (seconds, no weights read).

    Export estimate: quantized weights at 4.5 bits (E2M1 + one E4M3 scale per 16) for routed
    experts (`nvfp4_experts_only`) or every linear but embedding, head and routers (`nvfp4`);
    every other tensor as in the source. Layerwise: modelopt keeps the next layer's inputs of
    EVERY layer on disk (samples x seq x hidden x hc_mult in BF16 each).
    """
    import math

    import psutil

    from .resume import free_disk
    from .shards import read_header

    q = normalize(q)
    s = {**HF_PTQ_DEFAULTS, **q["hf_ptq"]}
    src = Path(s["pyt_ckpt_path"])
    cfg = atomic.read_json(src / "config.json") or {}
    every_linear = "experts_only" not in str(s.get("qformat")) and not s.get("recipe")
    model_bytes = export_bytes = 0
    for shard in sorted(src.glob("*.safetensors")):
        for name, e in read_header(shard).tensors.items():
            model_bytes += e.nbytes
            numel = math.prod(e.shape)
            routed = ".ffn.experts." in name and name.endswith(".weight")
            linear = len(e.shape) == 2 and name.endswith(".weight") and not any(
                x in name for x in ("embed", "head", ".gate.", "norm"))
            quantized = not name.startswith("mtp.") and (routed or (every_linear and linear))
            export_bytes += int(numel * 0.5625) + 8 if quantized else e.nbytes
    samples = sum(calib_plan(s)[1])
    layers = cfg.get("num_hidden_layers", 0)
    act = samples * int(s["calib_seq"]) * cfg.get("hidden_size", 0) * cfg.get("hc_mult", 1) * 2
    layerwise_bytes = int(act * layers * 1.25) if q["layerwise"] else 0
    state_bytes = (model_bytes if q["save_full_state"] else 0) + 64 * 2**20
    export_dir = Path(s["export_path"])
    disk = {"export": {"path": str(export_dir), "need": int(export_bytes * 1.05), "free": free_disk(export_dir)},
            "run_dir": {"path": str(run_dir), "need": state_bytes + layerwise_bytes, "free": free_disk(Path(run_dir))}}
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
        by_fs.setdefault(_filesystem(Path(v["path"])), []).append(k)
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


def _filesystem(path: Path) -> int:
    from .resume import existing_parent

    return os.stat(existing_parent(path)).st_dev


def check_resources(q: dict, run_dir: str | Path) -> dict:
    """`estimate_resources`, refusing a run that cannot fit (unless `force`)."""
    r = estimate_resources(q, run_dir)
    if r["problems"]:
        msg = "not enough room for this run:\n  - " + "\n  - ".join(r["problems"])
        if not normalize(q)["force"]:
            raise QuantizeError(msg + "\n(quantize.force: true runs anyway)")
        warnings.warn("FORCED: " + msg, stacklevel=2)
    return r


def run_modelopt(q: dict, run_dir: Path, progress: bool = True) -> dict:
    """The embedded driver. See the module docstring."""
    import numpy as np
    import torch

    q = normalize(q)
    pre = preflight(q)
    s = pre["settings"]
    resources = check_resources(q, run_dir)
    timings: dict = {}
    export_final = Path(s["export_path"])
    export_partial = export_final.with_name(export_final.name + ".partial")
    rec = _Record(run_dir, {
        "kind": "quantbook.quantize", "driver": "modelopt", "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(run_dir), "params": q,
        "versions": state.versions(), "timings": timings,
        "resources": {k: resources[k] for k in ("model_bytes", "export_bytes", "layerwise_bytes", "disk")},
    })
    try:
        applied = patches.apply(force=q["force"])
        patches.reset_report()
        rec.update(patches=applied)
        random.seed(RAND_SEED)
        np.random.seed(RAND_SEED)
        torch.compiler.set_stance("force_eager")
        with step_memory(run_dir) as mem:
            result = _run(q, s, run_dir, export_partial, mem, timings, rec, progress)
            with timed_phase(mem, "finalize", timings):
                swap_into_place(export_partial, export_final)
                if (export_final / SUMMARY).exists():
                    shutil.copy2(export_final / SUMMARY, run_dir / SUMMARY)
        result["export"]["dir"] = str(export_final)
        rec.update(status="done", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   bad_amax=patches.bad_amax_report(), **result)
        return rec.data
    except BaseException as e:
        rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:],
                   bad_amax=patches.bad_amax_report())
        raise


def _run(q, s, run_dir, export_dir, mem, timings, rec, progress) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import save_expert_token_count_table
    from modelopt.torch.quantization.config import need_calibration
    from modelopt.torch.utils.dataset_utils import create_forward_loop

    from .calib import ExpertTokenCounter, coverage, describe_dataloader

    if export_dir.exists():
        shutil.rmtree(export_dir)
    export_dir.mkdir(parents=True)
    with timed_phase(mem, "load", timings):
        model = load_model(s)
        tok, default_side, default_pad = load_tokenizer(s["pyt_ckpt_path"], s["trust_remote_code"])
    if s["batch_size"] == 0:
        if q["layerwise"]:
            s["batch_size"] = 1
        else:
            from modelopt.torch.utils.dataset_utils import get_max_batch_size

            s["batch_size"] = min(get_max_batch_size(model, max_sample_length=s["calib_seq"],
                                                     sample_memory_usage_ratio=1.1), sum(calib_plan(s)[1]))
    with timed_phase(mem, "data", timings):
        dataloader = make_dataloader(s, tok, model_device(model))
        calib = describe_dataloader(dataloader)
    rec.update(calibration=calib)
    if progress:
        print(f"[quantbook] calibration data: {calib['samples']} samples, {calib['tokens']} tokens "
              f"({calib['positions']} positions with padding), batch size {s['batch_size']}")

    lw_plan, lw = None, state.layerwise_paths(run_dir)
    counts_dir, keep_below = None, 0
    quant_cfg = build_quant_cfg(s, lw["ckpt"] if q["layerwise"] else None, q["layerwise_save_every"])
    if q["layerwise"]:
        sig = state.layerwise_signature(model_path=s["pyt_ckpt_path"], settings=s, quant_cfg=quant_cfg,
                                        calib=calib, save_every=q["layerwise_save_every"])
        lw_plan = state.check_layerwise_dir(run_dir, sig)
        counts_dir, keep_below = lw["counts"], lw_plan["start_layer"]
        rec.update(layerwise={**lw_plan, "checkpoint_dir": str(lw["ckpt"])})
        if progress and lw_plan["resume"]:
            print(f"[quantbook] layerwise: resuming from layer {lw_plan['start_layer']} of {lw_plan['num_layers']} "
                  f"(signature verified)")
    counter = ExpertTokenCounter(model, persist_dir=counts_dir, keep_layers_below=keep_below)
    try:
        with timed_phase(mem, "calibrate", timings):
            loop = create_forward_loop(dataloader=dataloader) if need_calibration(quant_cfg) else None
            with kv_cache_off_guard(model):
                model = mtq.quantize(model, quant_cfg, forward_loop=loop)
    finally:
        counter.remove()
    counts = counter.as_dict()
    if s["verbose"]:
        try:
            mtq.print_quant_summary(model, str(export_dir))
            save_expert_token_count_table(model, str(export_dir))
        except Exception as e:  # hf_ptq carries on too
            print(f"quant summary not written: {e}")
    hook = state.post_calibration(model, run_dir, q, calib=calib, token_counts=counts,
                                  model_path=s["pyt_ckpt_path"], quant_cfg=quant_cfg, progress=progress,
                                  phase=lambda name: timed_phase(mem, name, timings))
    rec.update(post_calibration=hook, expert_coverage=coverage(counts))
    with timed_phase(mem, "export", timings):
        exp = export_model(model, tok, s, export_dir, default_side, default_pad)
    return {"post_calibration": hook, "export": exp, "expert_coverage": coverage(counts),
            "batch_size": s["batch_size"]}


# ---------------------------------------------------------------------------------------------
# recovery (step 03)

def restore(run_dir_or_state: str | Path, *, model_path: str | None = None, device: str | None = None,
            force: bool = False):
    """Rebuild the calibrated model of a run from its cheap state: (model, tokenizer, manifest).

    Loads the model the way the run did (its hf_ptq settings from the state manifest; override
    the checkpoint path or device), restores the quantizers and their tensors, and returns the
    tokenizer with hf_ptq's export-time settings already restored (padding side, pad token).
    Export with `export_model(model, tokenizer, settings, out_dir)`; settings =
    `modelopt_settings(normalize(manifest["params"]), strict=False)`.
    """
    p = Path(run_dir_or_state)
    state_dir = p / state.STATE_DIR if (p / state.STATE_DIR).is_dir() else p
    manifest = state.load_manifest(state_dir)
    patches.apply(force=force)
    q = normalize(manifest["params"])
    s = modelopt_settings(q, strict=False)
    if model_path:
        s["pyt_ckpt_path"] = model_path
    if device:
        s["device"] = device
    model = load_model(s)
    model = state.restore_into(model, state_dir, model_path=s["pyt_ckpt_path"], force=force)
    tok, default_side, default_pad = load_tokenizer(s["pyt_ckpt_path"], s["trust_remote_code"])
    tok.padding_side = default_side
    if default_pad is not None:
        tok.pad_token = default_pad
    return model, tok, manifest
