"""The transformers model the way hf_ptq loads, calibrates and exports it, on modelopt's public API.

What has to match hf_ptq for the export to be byte-identical (modelopt-notes in the shared docs):
the model loaded with hf_ptq's device map and per-GPU `max_memory` (sequential on request; never a
bare `from_pretrained` that can pile the experts onto one GPU: the predecessor's run 3); the
tokenizer's pad token and left padding; samples from modelopt's `get_dataset_dataloader` with one
entry per dataset; a deep copy of the preset quantization config updated with the KV-cache entry;
the checkpoint's MTP tensors passed to the export with `_mtp_layer_prefixes`; the tokenizer saved,
then the source's sidecar files copied with hf_ptq's exclusions.

`restore` rebuilds a run's calibrated model from its cheap state (step 03's generic recovery);
`export_model` exports it exactly as the modelopt driver does.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import QuantizeError
from . import patches, state
from .settings import calib_plan, modelopt_settings, normalize

# transformers releases calibration is tested with (constraints.txt pins it; README "Versions":
# 5.14-5.17's DeepseekV4 cannot run a BF16 forward)
TESTED_TRANSFORMERS = ("5.23.0",)


def transformers_v4() -> tuple[str | None, bool]:
    """(installed transformers version, whether it has the deepseek_v4 model), without importing it."""
    import importlib.metadata as md
    import importlib.util

    try:
        version = md.version("transformers")
    except md.PackageNotFoundError:
        return None, False
    spec = importlib.util.find_spec("transformers")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return version, any((Path(r) / "models" / "deepseek_v4" / "modeling_deepseek_v4.py").is_file() for r in roots)


# ---------------------------------------------------------------------------------------------
# model, tokenizer, data, quantization config

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
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # modelopt prints the whole merged quant_cfg dict
                cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, KV_QUANT_CFG_CHOICES[s["kv_cache_qformat"]]["quant_cfg"])
            print(f"[quantbook] quant_cfg: {s['qformat']} with KV cache {s['kv_cache_qformat']} (modelopt's presets)")
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


# ---------------------------------------------------------------------------------------------
# recovery (step 03)

def restore(run_dir_or_state: str | Path, *, model_path: str | None = None, device: str | None = None,
            force: bool = False, ledger: "patches.Ledger | None" = None):
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
    model = state.restore_into(model, state_dir, model_path=s["pyt_ckpt_path"], force=force,
                               ledger=ledger or patches.Ledger())
    tok, default_side, default_pad = load_tokenizer(s["pyt_ckpt_path"], s["trust_remote_code"])
    tok.padding_side = default_side
    if default_pad is not None:
        tok.pad_token = default_pad
    return model, tok, manifest
