"""Settings step 02 refuses before anything loads, each with the reason it is refused.

Every refusal here is a mistake that cost the predecessor a run on the 8x B200 node (about
$160 and up to 7 hours each, ../shared/docs/anchors.md): it failed only after the model had been
loading for most of an hour. Every driver and the notebook's preflight call
`check_quantize_settings`, so a refused setting fails in well under a second, on any machine;
what the streaming driver cannot run is refused there too (`streaming_problems`).

The settings are the `quantize:` section of a params file; `quantize.hf_ptq` holds them in
hf_ptq's own flag names (argparse dests), which every driver reads.
"""

from __future__ import annotations

import warnings

from ..errors import ParamsError
from . import registry

# The predecessor's shell script spelled these flags its own way; hf_ptq's argparse has none of
# them (run 8 died in argparse after the node had been set up).
SHELL_SCRIPT_NAMES = {
    "quant": "qformat",
    "calib": "calib_size",
    "kv_cache_quant": "kv_cache_qformat",
    "tp": "inference_tensor_parallel",
}

# hf_ptq's defaults for the settings checked here (examples/hf_ptq/hf_ptq.py, 0.44-0.47).
HF_PTQ_DEFAULT_CALIB_SIZE = "1024"
HF_PTQ_DEFAULT_DATASETS = ("cnn_nemotron_v2_mix",)

# The `quantize:` keys only the streaming driver reads, with the defaults every other driver keeps.
STREAMING_DEFAULTS = {
    "gpus": 1,  # processes, one per GPU, through torch.distributed
    "save_every": 1,  # blocks between resume checkpoints
    "mtp": "calibrate",  # calibrate | skip: the MTP block's routed experts
    "experts_calibration": "sorted",  # sorted (one host sync a forward) | modelopt (its own loop): the same amax
    "export_along": True,  # write step 03's v4-serving export during the pass (given the export: section)
}
MTP_CHOICES = ("calibrate", "skip")
EXPERTS_CALIBRATION_CHOICES = ("sorted", "modelopt")  # calibrate.experts: the same amax either way

# On the 8x B200 node (2-2.7 TB host RAM) with V4 Pro's 3.2 TB BF16 copy offloaded, 256
# calibration samples ran the host out of memory; 128 is the proven setting.
PRO_MAX_CALIB_SAMPLES = 255


def is_v4(model_config: dict | None) -> bool:
    """True for a DeepSeek V4 config (released or dequantized)."""
    if not model_config:
        return False
    archs = model_config.get("architectures") or []
    return model_config.get("model_type") == "deepseek_v4" or any("DeepseekV4" in a for a in archs)


def is_v4_pro(model_config: dict | None) -> bool:
    """True for V4 Pro's dimensions (the model that fills the B200 node's memory)."""
    return is_v4(model_config) and model_config.get("hidden_size") == 7168 and \
        model_config.get("n_routed_experts") == 384


def _as_list(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    raise ParamsError(f"quantize.hf_ptq.{what}: expected a comma string or a list, got {value!r}")


def calib_samples(settings: dict) -> list[tuple[str, int]]:
    """(dataset, samples) pairs exactly as hf_ptq draws them.

    hf_ptq turns `calib_size` into a list of ints, then pads it with its last value (or cuts
    it) to one entry per dataset: a single `calib_size` is taken from EACH dataset, not split.
    A combo name such as `cnn_nemotron_v2_mix` splits its entry among its members, which keeps
    the total. Without `dataset`, hf_ptq uses `cnn_nemotron_v2_mix`; without `calib_size`, 1024.
    """
    datasets = _as_list(settings.get("dataset"), "dataset") or list(HF_PTQ_DEFAULT_DATASETS)
    raw = settings.get("calib_size")
    sizes_s = _as_list(HF_PTQ_DEFAULT_CALIB_SIZE if raw is None else raw, "calib_size")
    try:
        sizes = [int(s) for s in sizes_s]
    except ValueError:
        raise ParamsError(f"quantize.hf_ptq.calib_size: {raw!r} is not an int or a list of ints") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise ParamsError(f"quantize.hf_ptq.calib_size: {raw!r} must be positive sample counts")
    sizes = (sizes + [sizes[-1]] * len(datasets))[: len(datasets)]
    return list(zip(datasets, sizes))


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def streaming_problems(q: dict, settings: dict, model_config: dict | None) -> list[str]:
    """Why the streaming driver cannot run these settings (each with its reason); [] when it can.

    It calibrates max amax of the routed experts block by block from the release, so it refuses
    what needs a whole model or other data than one block's inputs: recipes (their algorithm and
    layerwise settings are modelopt's), layerwise, other formats; and more processes than batches
    (a process without a batch would skip modelopt's amax all-reduce while the others wait in it).
    """
    problems = []
    if model_config is not None and not model_config.get("quantization_config"):
        problems.append(
            "quantize.hf_ptq.pyt_ckpt_path: driver streaming reads the released FP8/FP4 checkpoint "
            "(dequant.source) block by block and dequantizes it itself; this checkpoint has no "
            "quantization_config (a BF16 copy?): point pyt_ckpt_path at the release")
    if settings.get("recipe"):
        problems.append(f"quantize.hf_ptq.recipe: {settings['recipe']!r}; driver streaming runs the "
                        "nvfp4_experts_only preset (max calibration of the routed experts) only; a recipe may "
                        "carry another algorithm or modelopt's layerwise mode, which need the whole model")
    if settings.get("qformat") != "nvfp4_experts_only":
        problems.append(f"quantize.hf_ptq.qformat: {settings.get('qformat')!r}; driver streaming calibrates "
                        "nvfp4_experts_only only (the routed experts, the layout engines serve); use driver "
                        "modelopt on the BF16 copy for other formats")
    if q.get("export_generic"):
        problems.append("quantize.export_generic: driver streaming never holds the whole model, so it cannot write "
                        "modelopt's generic export (step 03 writes the v4-serving layout): set it false")
    if q.get("layerwise"):
        problems.append("quantize.layerwise: driver streaming is already per block and resumable "
                        "(quantize.save_every); modelopt's layerwise mode needs the whole model: set it false")
    if not isinstance(q.get("export_along", True), bool):
        problems.append(f"quantize.export_along: {q.get('export_along')!r}; write true or false")
    for key in ("gpus", "save_every"):
        if not _positive_int(q.get(key, 1)):
            problems.append(f"quantize.{key}: expected a positive int, got {q.get(key)!r}")
    if q.get("mtp", "calibrate") not in MTP_CHOICES:
        problems.append(f"quantize.mtp: {q.get('mtp')!r}; choose one of {list(MTP_CHOICES)}")
    if q.get("experts_calibration", "sorted") not in EXPERTS_CALIBRATION_CHOICES:
        problems.append(f"quantize.experts_calibration: {q.get('experts_calibration')!r}; choose one of "
                        f"{list(EXPERTS_CALIBRATION_CHOICES)}")
    bs = settings.get("batch_size")
    gpus = q.get("gpus", 1)
    if _positive_int(gpus) and _positive_int(bs):
        try:
            batches = -(-sum(n for _, n in calib_samples(settings)) // bs)
        except ParamsError:
            batches = None
        if batches is not None and gpus > batches:
            problems.append(f"quantize.gpus: {gpus} processes for {batches} calibration batches (batch_size {bs}); "
                            "each process needs a batch (one without would skip modelopt's amax all-reduce "
                            f"while the others wait in it): use at most {batches} or a smaller batch_size")
    return problems


def check_quantize_settings(q: dict, model_config: dict | None) -> None:
    """Raise ParamsError naming every refused setting of a `quantize:` section, with reasons.

    `model_config` is the config.json of the checkpoint to calibrate (`hf_ptq.pyt_ckpt_path`),
    or None when it does not exist yet; then the V4-specific refusals assume V4 (this project
    quantizes nothing else). Settings that are allowed but unwise only warn.
    """
    problems: list[str] = []
    settings = q.get("hf_ptq")
    if not isinstance(settings, dict):
        raise ParamsError(f"quantize.hf_ptq must be a mapping of hf_ptq flag names to values, got {settings!r}")

    driver = q.get("driver", "modelopt")
    if driver not in registry.names():
        problems.append(f"quantize.driver: {driver!r} is not one of {registry.names()}")

    for where, keys in (("quantize", q), ("quantize.hf_ptq", settings)):
        for key in keys:
            bare = key.lstrip("-") if isinstance(key, str) else key
            if bare in SHELL_SCRIPT_NAMES:
                right = SHELL_SCRIPT_NAMES[bare]
                problems.append(
                    f"{where}.{key}: `--{bare}` is the predecessor's shell-script name, not an hf_ptq flag "
                    f"(run 8 died in argparse on it); write `{right}` (hf_ptq's --{right}). The right names: "
                    + ", ".join(f"--{k} -> --{v}" for k, v in SHELL_SCRIPT_NAMES.items()))
            elif where == "quantize.hf_ptq" and isinstance(key, str) and key.startswith("-"):
                problems.append(f"quantize.hf_ptq.{key}: write hf_ptq flag names without dashes ({bare!r})")

    v4_or_unknown = model_config is None or is_v4(model_config)
    if settings.get("low_memory_mode") and v4_or_unknown:
        problems.append(
            "quantize.hf_ptq.low_memory_mode: refused for DeepSeek V4: it builds the model on the meta "
            "device and quantizes while loading, which failed with meta-device errors on V4 in the "
            "predecessor's runs (and has an open upstream issue with broken NVFP4 scales); load normally "
            "with use_seq_device_map + gpu_max_mem_percentage instead")

    streaming = driver in registry.names() and not registry.get(driver).needs_bf16_copy
    quantized = model_config is not None and model_config.get("quantization_config")
    if quantized and not streaming:
        qc = model_config["quantization_config"]
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        problems.append(
            f"quantize.hf_ptq.pyt_ckpt_path: the source checkpoint is quantized (quant_method {method!r}, "
            f"expert_dtype {model_config.get('expert_dtype')!r}); calibrate the BF16 copy that step 01 "
            "writes (dequant.destination), or use driver streaming, which reads the release itself. The "
            "predecessor's run 1 on the FP8 source failed in transformers' fine-grained FP8 path (attention "
            "projections wrapped with the wrong shapes on Blackwell), and FP8 experts load as a class "
            "modelopt does not hook, so they would go uncalibrated")
    if streaming:
        problems += streaming_problems(q, settings, model_config)
    else:
        problems += [f"quantize.{k}: {q[k]!r} is read by driver streaming only (driver {driver!r} takes the "
                     f"default {STREAMING_DEFAULTS[k]!r})"
                     for k in STREAMING_DEFAULTS if k in q and q[k] != STREAMING_DEFAULTS[k]]

    try:
        pairs = calib_samples(settings)
    except ParamsError as e:
        problems.append(str(e))
        pairs = []
    total = sum(n for _, n in pairs)
    # the limit is the whole model's offload; the streaming driver holds one block and the activations
    if pairs and total > PRO_MAX_CALIB_SAMPLES and not streaming and (model_config is None or is_v4_pro(model_config)):
        per = ", ".join(f"{n} from {d}" for d, n in pairs)
        problems.append(
            f"quantize.hf_ptq.calib_size: {settings.get('calib_size', HF_PTQ_DEFAULT_CALIB_SIZE)!r} gives "
            f"{total} calibration samples ({per}; hf_ptq takes calib_size from EACH dataset). On the 8x "
            f"B200 node, V4 Pro with 256 samples ran out of host memory (3.2 TB BF16 offloaded); "
            f"use at most {PRO_MAX_CALIB_SAMPLES} in all (128 is the proven setting)")

    bs = settings.get("batch_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
        problems.append(
            f"quantize.hf_ptq.batch_size: {bs!r}; set a positive batch size. hf_ptq's default 0 probes "
            "the largest batch by running the whole model (needs CUDA, slow on a model that spills "
            "to host memory, and it was where the predecessor's run 1 failed)")

    for key in ("force", "layerwise", "save_full_state"):
        if key in q and not isinstance(q[key], bool):
            problems.append(f"quantize.{key}: expected true or false, got {q[key]!r}")
    if driver == "hf_ptq" and q.get("layerwise") and not settings.get("recipe"):
        problems.append(
            "quantize.layerwise with driver hf_ptq: hf_ptq turns layerwise calibration on only through a "
            "recipe; set quantize.hf_ptq.recipe (e.g. general/ptq/nvfp4_experts_only-kv_fp8_layerwise, whose "
            "save_every then applies) or use driver modelopt")
    every = q.get("layerwise_save_every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        problems.append(f"quantize.layerwise_save_every: expected a positive int, got {every!r}")

    if problems:
        raise ParamsError("quantize settings refused:\n  - " + "\n  - ".join(problems))

    qformat = settings.get("qformat")
    if qformat == "nvfp4" and v4_or_unknown:
        warnings.warn(
            "quantize.hf_ptq.qformat nvfp4 quantizes V4's attention too; no serving engine loads that "
            "export today (the predecessor's served garbled text). Step 03 builds the servable layout "
            "from nvfp4_experts_only.", stacklevel=2)
