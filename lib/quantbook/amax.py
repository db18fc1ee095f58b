"""Amax bookkeeping: the snapshot file, and modelopt quantizer names mapped to V4 native names.

modelopt names quantizers after transformers' modules (`model.layers.3.mlp.experts.
gate_up_proj_weight_quantizers.7`, `model.layers.3.self_attn.q_a_proj.input_quantizer`). The
serving layout, the inspection notebook and the streaming driver all speak the release's native
names (`layers.3.ffn.experts.7.w1`, `layers.3.attn.wq_a`); `parse_quantizer` is the one bridge.

Snapshot format (`amax.safetensors` in the run directory): one fp32 CPU tensor per quantizer
attribute, keyed `<quantizer name>.<attr>` with attr in `_amax`, `_pre_quant_scale`,
`_global_amax`; header metadata holds the JSON-encoded run facts. Expert token counts go beside
it in `expert_token_counts.json` as {"layers.<i>": [count per expert]}.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .release.format import component, expert_name, expert_prefix, split_block

SNAPSHOT = "amax.safetensors"
TOKEN_COUNTS = "expert_token_counts.json"
ATTRS = ("_amax", "_pre_quant_scale", "_global_amax")

# transformers module path inside a decoder layer -> native module name (reverse of the
# conversion mapping transformers applies on load)
LINEAR_NATIVE = {
    "self_attn.q_a_proj": "attn.wq_a",
    "self_attn.q_b_proj": "attn.wq_b",
    "self_attn.kv_proj": "attn.wkv",
    "self_attn.o_a_proj": "attn.wo_a",
    "self_attn.o_b_proj": "attn.wo_b",
    "self_attn.compressor.kv_proj": "attn.compressor.wkv",
    "self_attn.compressor.gate_proj": "attn.compressor.wgate",
    "self_attn.compressor.indexer.kv_proj": "attn.indexer.compressor.wkv",
    "self_attn.compressor.indexer.gate_proj": "attn.indexer.compressor.wgate",
    "self_attn.compressor.indexer.q_b_proj": "attn.indexer.wq_b",
    "self_attn.compressor.indexer.scorer.weights_proj": "attn.indexer.weights_proj",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
    "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
    "mlp.gate": "ffn.gate",
}
# quantizer kinds: the native components that carry quantizers (format.component's names)
KINDS = ("attention", "indexer", "compressor", "shared_expert", "routed_expert", "router", "head")
# fused routed-expert parameters -> the native projections they hold
EXPERT_NATIVE = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}

_LAYER = re.compile(r"^(?:model\.)?((?:layers|mtp)\.\d+\..+)$")
_EXPERT_W = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)_weight_quantizers\.(\d+)$")
_EXPERT_IN = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)_(input|output)_quantizer$")
_LINEAR = re.compile(r"^(.+)\.(input|weight|output)_quantizer$")
_BMM = re.compile(r"^self_attn\.([qkvp])_bmm_quantizer$")
# native names (a streaming driver working on the release's own modules, or NVIDIA's dumps):
# `layers.3.ffn.experts.7.w1.weight_quantizer`, and one input quantizer per projection
# shared by the layer's experts, `layers.3.ffn.experts.w1.input_quantizer`
_NATIVE_SHARED_INPUT = re.compile(r"^ffn\.experts\.(w[123])\.(input|output)_quantizer$")
_NATIVE_ROLE = re.compile(r"^(.+)\.(input|weight|output)_quantizer$")


@dataclass(frozen=True)
class Quantizer:
    """A quantizer located in V4 terms. `projs` lists the native projections it covers."""

    name: str  # modelopt's module name
    role: str  # input | weight | output | bmm
    kind: str  # attention | indexer | compressor | shared_expert | routed_expert | router | head | other
    layer: int | None = None
    mtp: bool = False
    expert: int | None = None  # None for the shared input quantizer of all routed experts
    module: str = ""  # native module, e.g. "attn.wq_a", "ffn.experts", "head"
    projs: tuple[str, ...] = ()

    @property
    def native(self) -> str:
        """Native tensor prefix(es), e.g. `layers.3.ffn.experts.7.w1` (first of projs)."""
        prefix = f"{'mtp' if self.mtp else 'layers'}.{self.layer}." if self.layer is not None else ""
        if self.kind == "routed_expert" and self.expert is not None:
            return expert_prefix(self.layer, self.expert, self.projs[0], "mtp" if self.mtp else "layers")
        return prefix + self.module


def parse_quantizer(name: str) -> Quantizer:
    """Locate a modelopt quantizer name in the V4 model (layer, expert, native projection, role)."""
    if name.startswith("lm_head."):
        role = name.split(".")[-1].replace("_quantizer", "")
        return Quantizer(name, role, "head", module="head", projs=("head",))
    m = _LAYER.match(name)
    if not m:
        return Quantizer(name, "other", "other", module=name)
    block, layer, rest = split_block(m.group(1))
    mtp = block == "mtp"
    if e := _EXPERT_W.match(rest):
        return Quantizer(name, "weight", "routed_expert", layer, mtp, int(e.group(2)), "ffn.experts",
                         EXPERT_NATIVE[e.group(1)])
    if e := _EXPERT_IN.match(rest):
        return Quantizer(name, e.group(2), "routed_expert", layer, mtp, None, "ffn.experts", EXPERT_NATIVE[e.group(1)])
    if e := _NATIVE_SHARED_INPUT.match(rest):
        return Quantizer(name, e.group(2), "routed_expert", layer, mtp, None, "ffn.experts", (e.group(1),))
    if (r := _NATIVE_ROLE.match(rest)) and (x := expert_name(f"{block}.{layer}.{r.group(1)}")):
        return Quantizer(name, r.group(2), "routed_expert", layer, mtp, x.expert, "ffn.experts", (x.proj,))
    if b := _BMM.match(rest):
        return Quantizer(name, "bmm", "attention", layer, mtp, None, f"attn.{b.group(1)}_bmm", ())
    if li := _LINEAR.match(rest):
        module = LINEAR_NATIVE.get(li.group(1), li.group(1))
        kind = component(module)
        return Quantizer(name, li.group(2), kind if kind in KINDS else "other", layer, mtp, None, module,
                         (module.split(".")[-1],))
    return Quantizer(name, "other", "other", layer, mtp, module=rest)


def save_snapshot(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write `{<quantizer>.<attr>: tensor}` atomically as safetensors (fp32, CPU, contiguous)."""
    import torch
    from safetensors.torch import save_file

    from .atomic import atomic_path

    clean = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={"quantbook": json.dumps(metadata or {}, default=str)})


def load_snapshot(path: str | Path) -> tuple[dict, dict]:
    """Read a snapshot: ({<quantizer>.<attr>: tensor}, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("quantbook", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def split_key(key: str) -> tuple[str, str]:
    """`<quantizer>.<attr>` -> (quantizer, attr)."""
    for attr in ATTRS:
        if key.endswith("." + attr):
            return key[: -len(attr) - 1], attr
    raise ValueError(f"snapshot key {key!r} does not end in one of {ATTRS}")


def amax_problem(amax) -> str | None:
    """Why an amax cannot become a scale (missing, nan, inf, negative, zero: any element), or None.

    The one rule shared by the patches, the state repair, the serving layout and recovery."""
    import torch

    if amax is None:
        return "missing"
    if amax.is_meta:
        return None
    if amax.numel() == 1:  # the usual per-tensor amax: one Python float, not five tensor reductions
        v = float(amax.detach().reshape(()))
        return "nan" if math.isnan(v) else "inf" if math.isinf(v) else "negative" if v < 0 else "zero" if v == 0 \
            else None
    a = amax.detach().float().cpu()
    if a.numel() == 0:
        return "missing"
    if torch.isnan(a).any():
        return "nan"
    if torch.isinf(a).any():
        return "inf"
    if (a < 0).any():
        return "negative"
    if (a == 0).any():
        return "zero"
    return None


def sample(a, n: int = 8) -> list:
    """The first `n` values of an amax tensor as JSON-ready numbers ("nan", "inf" for the others)."""
    import math

    flat = a.detach().float().cpu().reshape(-1)
    return [v if math.isfinite(v) else str(v) for v in flat[:n].tolist()]
