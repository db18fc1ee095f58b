"""The DeepSeek V4 released checkpoint format: tensor names, dtypes and shapes.

Everything here is derived from `config.json`. The tensor table is the single place where the
project says what a V4 checkpoint holds; `tiny` builds checkpoints from it, `convert` validates
real ones against it, and the serving-layout writer reuses it. The name grammar below (`component`,
`expert_name`, `expert_prefix`) is the one place that says what a native name means; every other
module asks it. Facts come from the DeepSeek V4 format notes in the shared docs folder beside the
checkout (`deepseek-v4-format.md`, `reference/deepseek-v4/tensor-patterns.md`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError
from .shards import DTYPE_SIZE

CONFIG_DIR = Path(__file__).parent / "configs"
FLASH_CONFIG = CONFIG_DIR / "DeepSeek-V4-Flash.json"
PRO_CONFIG = CONFIG_DIR / "DeepSeek-V4-Pro.json"

FP8_BLOCK = 128  # FP8 weights: one E8M0 scale per 128x128 block
FP4_GROUP = 32  # FP4 experts: one E8M0 scale per 32 input elements of a row

# Tensor kinds. A quantized weight and its `.scale` companion always travel together.
FP8_WEIGHT = "fp8_weight"  # F8_E4M3 [out, in], scale [ceil(out/128), ceil(in/128)]
FP4_WEIGHT = "fp4_weight"  # I8 [out, in/2] (two E2M1 per byte), scale [out, in/32]
SCALE = "scale"
PLAIN = "plain"  # BF16, F32 or I64: copied as it is


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZE[self.dtype]


def named_config(like: str | Path) -> Path:
    """`flash` or `pro` -> the project's copy of that release's config.json; anything else is a path."""
    return {"flash": FLASH_CONFIG, "pro": PRO_CONFIG}.get(str(like).lower(), Path(like))


def load_config(path: str | Path) -> dict:
    """Read a `config.json` (or a checkpoint directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: no config.json (is this a checkpoint directory?)") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: corrupt JSON ({e})") from None


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _linear(specs: list, name: str, out: int, inp: int, fmt: str) -> None:
    """Append a linear layer's weight (and scale) in the released storage format `fmt`."""
    if fmt == "bf16":
        specs.append(TensorSpec(f"{name}.weight", "BF16", (out, inp), PLAIN))
    elif fmt == "fp8":
        specs.append(TensorSpec(f"{name}.weight", "F8_E4M3", (out, inp), FP8_WEIGHT))
        specs.append(TensorSpec(f"{name}.scale", "F8_E8M0", (_ceil(out, FP8_BLOCK), _ceil(inp, FP8_BLOCK)), SCALE))
    elif fmt == "fp4":
        specs.append(TensorSpec(f"{name}.weight", "I8", (out, inp // 2), FP4_WEIGHT))
        specs.append(TensorSpec(f"{name}.scale", "F8_E8M0", (out, inp // FP4_GROUP), SCALE))
    else:
        raise FormatError(f"unknown storage format {fmt!r} for {name}")


def expert_format(config: dict) -> str:
    """Routed experts are packed FP4 (`expert_dtype: fp4`) or, in base models, FP8 blocks."""
    dtype = config.get("expert_dtype", "fp4")
    if dtype not in ("fp4", "fp8"):
        raise FormatError(f"config.json: unknown expert_dtype {dtype!r} (expected fp4 or fp8)")
    return dtype


def _block(prefix: str, c: dict, ratio: int, hash_layer: bool) -> list[TensorSpec]:
    """Tensors of one transformer block (a main layer or an MTP block), in released order."""
    H, hc = c["hidden_size"], c["hc_mult"]
    heads, hd = c["num_attention_heads"], c["head_dim"]
    E, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    mix = (2 + hc) * hc
    s: list[TensorSpec] = []
    for part in ("attn", "ffn"):
        s.append(TensorSpec(f"{prefix}.hc_{part}_fn", "F32", (mix, hc * H), PLAIN))
        s.append(TensorSpec(f"{prefix}.hc_{part}_base", "F32", (mix,), PLAIN))
        s.append(TensorSpec(f"{prefix}.hc_{part}_scale", "F32", (3,), PLAIN))
    s.append(TensorSpec(f"{prefix}.attn_norm.weight", "BF16", (H,), PLAIN))
    s.append(TensorSpec(f"{prefix}.ffn_norm.weight", "BF16", (H,), PLAIN))
    a = f"{prefix}.attn"
    s.append(TensorSpec(f"{a}.attn_sink", "F32", (heads,), PLAIN))
    _linear(s, f"{a}.wq_a", c["q_lora_rank"], H, "fp8")
    s.append(TensorSpec(f"{a}.q_norm.weight", "BF16", (c["q_lora_rank"],), PLAIN))
    _linear(s, f"{a}.wq_b", heads * hd, c["q_lora_rank"], "fp8")
    _linear(s, f"{a}.wkv", hd, H, "fp8")
    s.append(TensorSpec(f"{a}.kv_norm.weight", "BF16", (hd,), PLAIN))
    groups = c["o_groups"]
    _linear(s, f"{a}.wo_a", groups * c["o_lora_rank"], heads * hd // groups, "fp8")
    _linear(s, f"{a}.wo_b", H, groups * c["o_lora_rank"], "fp8")
    if ratio:
        overlap = 2 if ratio == 4 else 1  # CSA compressors overlap two windows
        s.append(TensorSpec(f"{a}.compressor.ape", "F32", (ratio, overlap * hd), PLAIN))
        _linear(s, f"{a}.compressor.wkv", overlap * hd, H, "bf16")
        _linear(s, f"{a}.compressor.wgate", overlap * hd, H, "bf16")
        s.append(TensorSpec(f"{a}.compressor.norm.weight", "BF16", (hd,), PLAIN))
    if ratio == 4:  # the lightning indexer lives only in CSA layers
        ih, ihd = c["index_n_heads"], c["index_head_dim"]
        _linear(s, f"{a}.indexer.wq_b", ih * ihd, c["q_lora_rank"], "fp8")
        _linear(s, f"{a}.indexer.weights_proj", ih, H, "bf16")
        s.append(TensorSpec(f"{a}.indexer.compressor.ape", "F32", (4, 2 * ihd), PLAIN))
        _linear(s, f"{a}.indexer.compressor.wkv", 2 * ihd, H, "bf16")
        _linear(s, f"{a}.indexer.compressor.wgate", 2 * ihd, H, "bf16")
        s.append(TensorSpec(f"{a}.indexer.compressor.norm.weight", "BF16", (ihd,), PLAIN))
    f = f"{prefix}.ffn"
    s.append(TensorSpec(f"{f}.gate.weight", "BF16", (E, H), PLAIN))
    if hash_layer:
        s.append(TensorSpec(f"{f}.gate.tid2eid", "I64", (c["vocab_size"], c["num_experts_per_tok"]), PLAIN))
    else:
        s.append(TensorSpec(f"{f}.gate.bias", "F32", (E,), PLAIN))
    efmt = expert_format(c)
    for j in range(E):
        _linear(s, f"{f}.experts.{j}.w1", inter, H, efmt)
        _linear(s, f"{f}.experts.{j}.w2", H, inter, efmt)
        _linear(s, f"{f}.experts.{j}.w3", inter, H, efmt)
    shared = inter * c.get("n_shared_experts", 1)
    _linear(s, f"{f}.shared_experts.w1", shared, H, "fp8")
    _linear(s, f"{f}.shared_experts.w2", H, shared, "fp8")
    _linear(s, f"{f}.shared_experts.w3", shared, H, "fp8")
    return s


def _head(prefix: str, c: dict) -> list[TensorSpec]:
    H, hc = c["hidden_size"], c["hc_mult"]
    return [
        TensorSpec(f"{prefix}hc_head_fn", "F32", (hc, hc * H), PLAIN),
        TensorSpec(f"{prefix}hc_head_base", "F32", (hc,), PLAIN),
        TensorSpec(f"{prefix}hc_head_scale", "F32", (1,), PLAIN),
    ]


def shard_groups(config: dict) -> list[list[TensorSpec]]:
    """The released shard grouping: embed, one shard per layer, head and norm, then MTP."""
    return [list(g) for g in _shard_groups(json.dumps(config, sort_keys=True))]


@functools.lru_cache(maxsize=8)
def _shard_groups(config_json: str) -> tuple[tuple[TensorSpec, ...], ...]:
    """`shard_groups` of one config, computed once (V4 Pro's table: 145,116 specs, ~0.3 s)."""
    c = json.loads(config_json)
    layers = c["num_hidden_layers"]
    ratios = c["compress_ratios"]
    if len(ratios) != layers + c.get("num_nextn_predict_layers", 0):
        raise FormatError(
            f"config.json: compress_ratios has {len(ratios)} entries, expected num_hidden_layers + "
            f"num_nextn_predict_layers = {layers + c.get('num_nextn_predict_layers', 0)}"
        )
    groups = [[TensorSpec("embed.weight", "BF16", (c["vocab_size"], c["hidden_size"]), PLAIN)]]
    for i in range(layers):
        groups.append(_block(f"layers.{i}", c, ratios[i], i < c["num_hash_layers"]))
    groups.append(
        [TensorSpec("head.weight", "BF16", (c["vocab_size"], c["hidden_size"]), PLAIN),
         TensorSpec("norm.weight", "BF16", (c["hidden_size"],), PLAIN)] + _head("", c)
    )
    for k in range(c.get("num_nextn_predict_layers", 0)):
        p = f"mtp.{k}"
        H = c["hidden_size"]
        mtp = _block(p, c, ratios[layers + k], hash_layer=False)
        for proj in ("e_proj", "h_proj"):
            _linear(mtp, f"{p}.{proj}", H, H, "fp8")
        for norm in ("enorm", "hnorm", "norm"):
            mtp.append(TensorSpec(f"{p}.{norm}.weight", "BF16", (H,), PLAIN))
        groups.append(mtp + _head(f"{p}.", c))
    return tuple(tuple(g) for g in groups)


def bf16_tensor(spec: TensorSpec) -> TensorSpec | None:
    """What step 01 writes for a released tensor: a quantized weight as BF16 at its logical shape, a
    scale nothing (consumed), anything else unchanged."""
    if spec.kind == SCALE:
        return None
    if spec.kind in (FP8_WEIGHT, FP4_WEIGHT):
        return TensorSpec(spec.name, "BF16", dequant_shape(spec), PLAIN)
    return spec


def bf16_groups(config: dict) -> list[list[TensorSpec]]:
    """The BF16 copy's shards (step 01's output), grouped as the release's: sizes from config alone."""
    return [list(g) for g in _bf16_groups(json.dumps(config, sort_keys=True))]


@functools.lru_cache(maxsize=8)
def _bf16_groups(config_json: str) -> tuple[tuple[TensorSpec, ...], ...]:
    """`bf16_groups` of one config, computed once: a full-size preflight asks for it three times
    (model size, generic export, BF16 copy), ~0.5 s each at V4 Pro's 145,116 specs."""
    groups = _shard_groups(config_json)
    return tuple(tuple(t for t in map(bf16_tensor, g) if t is not None) for g in groups)


def expected_tensors(config: dict) -> dict[str, TensorSpec]:
    """Every tensor a released checkpoint with this config holds, by name."""
    return {t.name: t for g in shard_groups(config) for t in g}


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def weight_of_scale(name: str) -> str:
    """`x.scale` -> `x.weight`: the weight a scale belongs to."""
    return name[: -len(".scale")] + ".weight"


def scale_of_weight(name: str) -> str:
    return name[: -len(".weight")] + ".scale"


def dequant_shape(spec: TensorSpec) -> tuple[int, ...]:
    """Logical [out, in] shape of a quantized weight (FP4 stores two values per byte)."""
    if spec.kind == FP4_WEIGHT:
        return (spec.shape[0], spec.shape[1] * 2)
    return spec.shape


# ----------------------------------------------------------------------------- the name grammar

PROJS = ("w1", "w2", "w3")  # gate, down, up: w1 and w3 read the layer input, w2 the gated product
# what follows a routed expert's projection: released (`weight`, `scale`) or NVFP4 serving tensors
EXPERT_TENSORS = ("weight", "scale", "weight_scale", "weight_scale_2", "input_scale")
_BLOCK = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])(?:\.(\w+))?$")


@dataclass(frozen=True)
class ExpertName:
    """A routed expert's projection, or one of its tensors: `layers.3.ffn.experts.7.w1[.weight]`."""

    block: str  # "layers" (a main decoder layer) or "mtp"
    layer: int
    expert: int
    proj: str  # w1 | w2 | w3
    tensor: str | None = None  # one of EXPERT_TENSORS, None for the projection itself

    @property
    def mtp(self) -> bool:
        return self.block == "mtp"

    @property
    def prefix(self) -> str:
        return expert_prefix(self.layer, self.expert, self.proj, self.block)


def expert_prefix(layer: int, expert: int, proj: str, block: str = "layers") -> str:
    """`layers.{layer}.ffn.experts.{expert}.{proj}`: a routed expert projection's native name."""
    return f"{block}.{layer}.ffn.experts.{expert}.{proj}"


@functools.lru_cache(maxsize=1 << 18)
def expert_name(name: str) -> ExpertName | None:
    """Parse a routed expert projection or tensor name; None for anything else.

    Memoized (the answer is immutable and depends on the name alone): step 03's plan asks it three
    times for each of V4 Pro's 145,116 names, the preflight once more; the cache holds a Pro
    release's names with room to spare."""
    m = _BLOCK.match(name)
    e = _EXPERT.match(m.group(3)) if m else None
    if e is None or (e.group(3) is not None and e.group(3) not in EXPERT_TENSORS):
        return None
    return ExpertName(m.group(1), int(m.group(2)), int(e.group(1)), e.group(2), e.group(3))


def split_block(name: str) -> tuple[str | None, int | None, str]:
    """`layers.3.attn.wq_a.weight` -> ("layers", 3, "attn.wq_a.weight"); top-level names -> (None, None, name)."""
    m = _BLOCK.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else (None, None, name)


def component(name: str) -> str:
    """What part of V4 a native name (tensor, module or quantizer) belongs to.

    routed_expert | shared_expert | router | indexer | compressor | attention | mtp_proj | norm |
    hyper_connection | embed | head | other. The indexer's own compressor counts as indexer.
    """
    return component_of_rest(split_block(name)[2])


def component_of_rest(rest: str) -> str:
    """`component` of a name already split by `split_block` (its third part): for loops over a
    whole release that split each name once and need both its block and its component."""
    if rest.startswith("ffn.experts"):
        return "routed_expert"
    if rest.startswith("ffn.shared_experts"):
        return "shared_expert"
    if rest == "ffn.gate" or rest.startswith("ffn.gate."):
        return "router"
    if rest.startswith("attn.indexer"):
        return "indexer"
    if rest.startswith("attn.compressor"):
        return "compressor"
    if rest.startswith("attn.") or rest == "attn":
        return "attention"
    if rest.startswith(("e_proj", "h_proj")):
        return "mtp_proj"
    if rest.startswith("hc_"):
        return "hyper_connection"
    if rest.endswith("norm.weight") or rest in ("norm", "enorm", "hnorm"):
        return "norm"
    if rest.startswith("embed"):
        return "embed"
    if rest.startswith("head"):
        return "head"
    return "other"


def bf16_config(config: dict) -> dict:
    """The config of the dequantized checkpoint: plain BF16, nothing left that asks to quantize."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "expert_dtype")}
    out.pop("torch_dtype", None)
    out["dtype"] = "bfloat16"
    return out
