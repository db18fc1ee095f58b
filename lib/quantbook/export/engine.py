"""An NVFP4 MoE layer as vLLM 0.33 / SGLang 0.5.23 compute it: plain torch, any device.

What the engines do with an export's routed experts (../shared/docs/v4-nvfp4-serving-layout.md,
"How the engines compute an NVFP4 MoE layer", read in their code), and how this module does it:

- **weights**: each projection decoded, W = E2M1[code] x e4m3(weight_scale) x weight_scale_2
  (`decode_nvfp4`, fp32), then held in BF16 as vLLM's emulation backend holds them
  (`dequantize_to_dtype(..., output_dtype)`). w1 and w3 rows fused as transformers fuses them:
  `gate_up_proj[e] = [w1; w3]`, `down_proj[e] = w2`.
- **one activation scale per layer and projection** (`layer_input_scales`): the max of the
  experts' `input_scale`, once for w13 (w1 and w3 together) and once for w2, as vLLM's
  FlashInfer/CUTLASS/emulation NVFP4 MoE paths and SGLang's FlashInfer paths do.
- **activations** (`quantize_activation`): NVFP4 quant-dequant with vLLM's reference formula
  (`ref_nvfp4_quant`, `nvfp4_emulation_utils.py`) in mode `w4a4` (B200: FlashInfer/CUTLASS
  quantize activations), untouched in mode `w4a16` (H100/H200: Marlin, `nvfp4_w4a16`).
- **where**: on the input of each of the two `F.linear` of an expert, cast back to the activation
  dtype, which is exactly where modelopt's fused-experts input quantizers act
  (`gate_up_proj_input_quantizer`, `down_proj_input_quantizer`). `EngineExperts` is otherwise
  transformers' `DeepseekV4Experts` (same forward signature, loop order and SwiGLU clamp), so it
  drops into a built `DeepseekV4DecoderLayer` at `mlp.experts`.

The emulation is not the engines' kernels: they multiply E2M1 codes in hardware and scale the fp32
accumulator by `input_scale * weight_scale_2`; here BF16 weights and BF16 quant-dequantized
activations meet in a BF16 `F.linear` (the rounding of each decoded value to BF16, 2^-9 relative
at most, is this emulation's own, shared with vLLM's emulation backend and modelopt's fake quant).

**How the engines read the MTP block's routed experts** (`engine_reads`): vLLM 0.33 builds them
NVFP4 (its draft reuses the target's quant config), SGLang 0.5.23 always MXFP4. So:
(a) released MXFP4 read by SGLang: exact; (b) released MXFP4 read by vLLM: garbage, no error;
(c) NVFP4 read by vLLM: exact NVFP4; (d) NVFP4 read by SGLang: garbage, no error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from ..release.dequant import E2M1 as E2M1_VALUES
from ..release.dequant import e8m0_to_f32
from .nvfp4 import FP4_MAX, FP8_MAX, GROUP

MX_GROUP = 32  # MXFP4 block: one E8M0 scale per 32 inputs
E2M1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)  # value of each 4-bit code; code 8 (-0) is +0.0
MODES = ("w4a4", "w4a16")  # activations NVFP4 (Blackwell FlashInfer/CUTLASS) | BF16 (Hopper Marlin)
ENGINES = ("vllm", "sglang")
FORMS = ("nvfp4", "mxfp4")  # four tensors per projection | the release's `.weight` + `.scale`
E8M0_ONE = 127  # the E8M0 byte of 1.0
PROJ_ROWS = {"w1": ("gate_up_proj", 0, "w13"), "w3": ("gate_up_proj", 1, "w13"), "w2": ("down_proj", None, "w2")}


# ----------------------------------------------------------------------------- weights


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 bytes [out, in/2] (low nibble = even column) -> fp32 values [out, in]."""
    c = codes.view(torch.uint8).to(torch.int64)
    table = E2M1.to(c.device)
    return torch.stack([table[c & 0xF], table[c >> 4]], dim=-1).reshape(c.shape[0], -1)


def decode_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """NVFP4 projection -> fp32 [out, in]: E2M1[code] x e4m3(weight_scale) x weight_scale_2.

    weight U8 [out, in/2] (low nibble = even column), weight_scale E4M3 [out, in/16] (linear layout;
    bytes are reinterpreted, never converted), weight_scale_2 F32 0-d. The block's unit
    e4m3 x weight_scale_2 is formed first in fp32, then each code is multiplied by it, as vLLM's
    `dequantize_to_dtype` and modelopt's `NVFP4QTensor.dequantize` do."""
    v = _unpack(weight)
    out, inp = v.shape
    unit = weight_scale.view(torch.float8_e4m3fn).to(torch.float32) * weight_scale_2.to(v.device, torch.float32)
    return (v.reshape(out, inp // GROUP, GROUP) * unit.unsqueeze(-1)).reshape(out, inp)


def decode_mxfp4(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The release's MXFP4 projection -> fp32 [out, in]: E2M1[code] x 2^(e8m0 - 127) per 32 inputs.

    Every product is exact (a power of two times a 2-bit value), so this is the release's value."""
    v = _unpack(weight)
    out, inp = v.shape
    return (v.reshape(out, inp // MX_GROUP, MX_GROUP) * e8m0_to_f32(scale).unsqueeze(-1)).reshape(out, inp)


# ----------------------------------------------------------------------------- activations


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """fp32 values in [-6, 6] -> the nearest E2M1 value {0, .5, 1, 1.5, 2, 3, 4, 6} with the sign kept.

    A value halfway between two goes to the one with the even code (ties to even):
    0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. These are vLLM's
    `cast_to_fp4` thresholds (<= 0.25, < 0.75, <= 1.25, < 1.75, <= 2.5, < 3.5, <= 5), and modelopt's
    `_cast_fp4` and Triton `fp4_round_magnitude` round the same way. Signs as vLLM's
    `sign(x) * |q|`: a negative value rounding to zero gives -0.0, -0.0 gives +0.0; NaN stays NaN."""
    grid = E2M1[:8].to(v.device)
    mid = (grid[1:] + grid[:-1]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5
    m = v.abs()
    down = torch.bucketize(m, mid)  # a tie goes to the lower neighbour ...
    up = torch.bucketize(m, mid, right=True)  # ... or to the upper one; off a tie both agree
    q = grid[torch.where(down % 2 == 0, down, up)]
    return torch.where(v.isnan(), v, torch.where(v < 0, -q, q))


def quantize_activation(x: torch.Tensor, input_scale, mode: str = "w4a4") -> torch.Tensor:
    """NVFP4 quant-dequant of activations as vLLM 0.33's reference computes it; fp32 out.

    Mode `w4a16` returns `x` unchanged (Hopper: Marlin keeps activations BF16). Mode `w4a4`, per 16
    consecutive values of the last dim, in fp32, in vLLM's order of operations (`ref_nvfp4_quant`,
    then `ref_nvfp4_quant_dequant`):

        gs   = 1 / input_scale                                  (vLLM: `1.0 / a13_scale.max()`)
        s    = e4m3(min(gs * (max|x| * fl(1/6)), 448))          (RNE, E4M3 subnormals kept)
        inv  = 1 / (s * (1/gs)),  1/1e8 where s * (1/gs) == 0    (vLLM's `get_reciprocal` guard)
        q    = e2m1_round(clip(x * inv, -6, 6))                  (ties to even, see `e2m1_round`)
        out  = q * (s / gs)

    `input_scale` is the layer's one scale for the projection (`layer_input_scales`), > 0.
    All-zero blocks and blocks whose scale rounds to zero in E4M3 (gs * max|x| / 6 <= 2^-10, E4M3's
    smallest step being 2^-9) come out all zero, as in vLLM: its guard makes their multiplier 1e-8,
    and x * 1e-8 rounds to 0 for every value of such a block (a nonzero code would need
    input_scale > 4e9). Smaller nonzero E4M3 scales (subnormals, down to 2^-9) are used as they
    are. A block whose max exceeds 448 * 6 * input_scale is clipped: its scale saturates at 448 and
    its values at +-6 units of it.

    vLLM's CUDA route (a Triton kernel) computes `inv` as gs / s instead; modelopt's fake quant
    differs more (see tests/test_engine_math.py for what was measured against both)."""
    if mode == "w4a16":
        return x
    if mode != "w4a4":
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    n = x.shape[-1]
    if n % GROUP:
        raise ValueError(f"last dim {n} is not a multiple of {GROUP}")
    gs = torch.reciprocal(torch.as_tensor(input_scale, dtype=torch.float32, device=x.device).reshape(()))
    xb = x.reshape(*x.shape[:-1], n // GROUP, GROUP).to(torch.float32)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    s = (gs * (amax * (1 / FP4_MAX))).clamp(min=-FP8_MAX, max=FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    unit = s * torch.reciprocal(gs)
    inv = torch.reciprocal(torch.where(unit == 0, torch.full_like(unit, 1e8), unit))
    q = e2m1_round((xb * inv).clamp(-FP4_MAX, FP4_MAX))
    return (q * (s / gs)).reshape(x.shape)


def layer_input_scales(per_expert_input_scales) -> torch.Tensor:
    """The ONE activation scale the engines use for a layer's projection: the max over its experts.

    Call it once with the w1 and w3 `input_scale` of every expert (w13, fused) and once with the w2
    ones. vLLM's FlashInfer/CUTLASS NVFP4 MoE paths replace every expert's scale by this max
    ("input scales are shared by all experts"), its emulation backend too; SGLang does for w13 on
    every FlashInfer backend and for w2 on cutlass/trtllm. Returns a 0-d fp32 tensor."""
    if isinstance(per_expert_input_scales, torch.Tensor):
        return per_expert_input_scales.to(torch.float32).max().reshape(())
    return torch.stack([torch.as_tensor(s, dtype=torch.float32).reshape(()).cpu()
                        for s in per_expert_input_scales]).max()


# ----------------------------------------------------------------------------- the experts


def _dims(config) -> tuple[int, int, int, float, str]:
    """(experts, hidden, intermediate, swiglu_limit, act) from the native config.json dict or a
    transformers `DeepseekV4Config`."""
    if isinstance(config, dict):
        return (config["n_routed_experts"], config["hidden_size"], config["moe_intermediate_size"],
                config["swiglu_limit"], config.get("hidden_act", "silu"))
    c = config
    return c.num_local_experts, c.hidden_size, c.intermediate_size, c.swiglu_limit, c.hidden_act


IMPLEMENTATIONS = ("eager", "grouped_mm")  # transformers' experts implementations both models use


class EngineExperts(nn.Module):
    """transformers' `DeepseekV4Experts` as the engines compute it from an export's bytes.

    Holds per-expert decoded weights in BF16, `gate_up_proj [E, 2I, H]` (w1 rows, then w3 rows) and
    `down_proj [E, H, I]`, the layer's w13 and w2 input scales (0-d fp32) and the mode. In mode
    `w4a4` each `F.linear` input is quant-dequantized and cast back to the activation dtype, where
    modelopt's fused-experts input quantizers act: the w13 input once per token (one scale per layer,
    so a token's blocks quantize alike for every expert it goes to), the w2 input in `_apply_gate`.
    The rest is transformers' own forward for `implementation` (`grouped_mm_experts_forward`, or its
    eager loop: experts in ascending order, tokens as its one-hot mask orders them, `index_add_` into
    a zero tensor), with the SwiGLU clamp at `swiglu_limit`; so in mode `w4a16` with the same BF16
    weights it is `DeepseekV4Experts` of that implementation bit for bit."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, input_scale_w13=None,
                 input_scale_w2=None, mode: str = "w4a4", swiglu_limit: float = 10.0, hidden_act: str = "silu",
                 implementation: str = "eager"):
        from transformers.activations import ACT2FN

        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation {implementation!r}: one of {IMPLEMENTATIONS}")
        if mode == "w4a4" and (input_scale_w13 is None or input_scale_w2 is None):
            raise ValueError("mode w4a4 needs the layer's w13 and w2 input scales")
        self.num_experts, _, self.hidden_dim = gate_up_proj.shape
        self.intermediate_dim = down_proj.shape[-1]
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        one = torch.ones((), dtype=torch.float32, device=gate_up_proj.device)  # unused in w4a16
        self.register_buffer("input_scale_w13", one if input_scale_w13 is None else
                             torch.as_tensor(input_scale_w13, dtype=torch.float32).reshape(()).to(one.device))
        self.register_buffer("input_scale_w2", one if input_scale_w2 is None else
                             torch.as_tensor(input_scale_w2, dtype=torch.float32).reshape(()).to(one.device))
        self.mode, self.limit, self.act_fn = mode, swiglu_limit, ACT2FN[hidden_act]
        self.implementation = implementation
        # what transformers' `grouped_mm_experts_forward` reads off the module it runs as
        self.has_gate, self.has_bias, self.is_transposed, self.has_post_expert_norm = True, False, False, False
        self._is_expert_parallel = False

    def _quant(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, input_scale, self.mode).to(x.dtype)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU with transformers' clamp, then the w2 input's quant-dequant."""
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
        return self._quant(h, self.input_scale_w2)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = self._quant(hidden_states, self.input_scale_w13)
        if self.implementation == "grouped_mm":
            from transformers.integrations.moe import grouped_mm_experts_forward

            return grouped_mm_experts_forward(self, x, top_k_index, top_k_weights)
        final = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():  # ascending, as transformers' `hit`
            if not 0 <= e < self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(top_k_index.T == e)  # transformers' mask[e]: [top_k, tokens]
            h = self._apply_gate(F.linear(x[token_idx], self.gate_up_proj[e]))
            y = F.linear(h, self.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final

    @classmethod
    def from_export(cls, tensors: dict, block: str, config, mode: str = "w4a4", device="cpu",
                    implementation: str = "eager") -> "EngineExperts":
        """From a block's export tensors in the four-tensor NVFP4 form (`layers.3.ffn.experts.5.w1.weight`,
        `.weight_scale`, `.weight_scale_2`, `.input_scale`), read as the engines read main layers."""
        return _assemble(tensors, block, config, _read_nvfp4, mode, device, implementation)

    @classmethod
    def from_mxfp4(cls, tensors: dict, block: str, config, device="cpu", implementation: str = "eager") -> "EngineExperts":
        """From a block's experts in the release's MXFP4 form (`.weight` + `.scale`), decoded exactly,
        activations BF16 (SGLang's MXFP4 MoE path)."""
        return _assemble(tensors, block, config, _read_mxfp4, "w4a16", device, implementation)


def _get(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise FormatError(f"{name}: not among the tensors given (an expert projection needs all of its own)")
    return tensors[name]


def _read_nvfp4(tensors: dict, p: str, device):
    w, s, s2 = (_get(tensors, f"{p}.{t}").to(device) for t in ("weight", "weight_scale", "weight_scale_2"))
    return decode_nvfp4(w, s, s2), _get(tensors, f"{p}.input_scale")


def _read_mxfp4(tensors: dict, p: str, device):
    return decode_mxfp4(_get(tensors, f"{p}.weight").to(device), _get(tensors, f"{p}.scale").to(device)), None


def _assemble(tensors: dict, block: str, config, read, mode: str, device, implementation: str = "eager") -> EngineExperts:
    """Decode every expert projection of `block` with `read(tensors, prefix, device) -> (fp32 weight,
    input_scale or None)` into the fused BF16 tensors, and take the layer's input scales."""
    E, H, inter, limit, act = _dims(config)
    fused = {"gate_up_proj": torch.empty(E, 2 * inter, H, dtype=torch.bfloat16, device=device),
             "down_proj": torch.empty(E, H, inter, dtype=torch.bfloat16, device=device)}
    scales: dict[str, list] = {"w13": [], "w2": []}
    for e in range(E):
        for proj, (param, half, key) in PROJ_ROWS.items():
            w, s = read(tensors, f"{block}.ffn.experts.{e}.{proj}", device)
            rows = slice(None) if half is None else slice(half * inter, (half + 1) * inter)
            fused[param][e, rows].copy_(w)
            if s is not None:
                scales[key].append(s)
    ins = [layer_input_scales(scales[k]) if scales[k] else None for k in ("w13", "w2")]
    return EngineExperts(fused["gate_up_proj"], fused["down_proj"], *ins, mode=mode, swiglu_limit=limit, hidden_act=act,
                         implementation=implementation)


# ----------------------------------------------------------------------------- how each engine reads a block


def engine_builds(engine: str, block: str) -> str:
    """The form an engine builds `block`'s routed experts in under this layout's config.json:
    vLLM 0.33 NVFP4 everywhere (its MTP draft reuses the target's quant config, no per-layer
    exception); SGLang 0.5.23 NVFP4 for the main layers, MXFP4 for `mtp.*` (always excluded)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {ENGINES}")
    return "mxfp4" if engine == "sglang" and block.startswith("mtp.") else "nvfp4"


def vllm_scale_from_e8m0(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """What vLLM 0.33 makes of an MXFP4 `.scale` [out, in/32] loaded into its NVFP4 `weight_scale`
    [out, in/16] (E4M3): each E8M0 byte lands in the FIRST in/32 columns, converted by value from the
    integer the byte holds (2^-5, byte 122, becomes 120.0), as measured with vLLM's own loader; the
    other columns are never written (uninitialised memory, emulated here as 0)."""
    b = scale.view(torch.uint8)
    out = torch.zeros(b.shape[0], in_features // GROUP, dtype=torch.float8_e4m3fn, device=b.device)
    out[:, : b.shape[1]] = b.to(torch.float32).to(torch.float8_e4m3fn)
    return out


def _read_mxfp4_as_nvfp4(tensors: dict, p: str, device):
    """(b) vLLM's NVFP4 parameters fed the release's MXFP4 tensors: the I8 codes copied as NVFP4 codes,
    the scales as `vllm_scale_from_e8m0`; `weight_scale_2` and `input_scale` never written
    (uninitialised, emulated as 1.0)."""
    w = _get(tensors, f"{p}.weight").to(device)
    scale = vllm_scale_from_e8m0(_get(tensors, f"{p}.scale").to(device), 2 * w.shape[1])
    one = torch.ones((), dtype=torch.float32)
    return decode_nvfp4(w, scale, one), one


def _read_nvfp4_as_mxfp4(tensors: dict, p: str, device):
    """(d) SGLang's MXFP4 parameters fed the four-tensor NVFP4 form: the U8 codes go into its MXFP4
    weight; `weight_scale`, `weight_scale_2`, `input_scale` have no parameter and are skipped; its
    MXFP4 scales stay at their initial 1.0, taken here as the scale VALUE 1.0 (E8M0 byte 127, 2^0), so
    each weight reads as its bare E2M1 code value. (Had the initial 1.0 been the byte 1, every weight
    would read as E2M1 x 2^-126: zero output, as far from the expert.)"""
    w = _get(tensors, f"{p}.weight").to(device)
    ones = torch.full((w.shape[0], 2 * w.shape[1] // MX_GROUP), E8M0_ONE, dtype=torch.uint8, device=w.device)
    return decode_mxfp4(w, ones), None


def engine_reads(tensors: dict, block: str, form: str, engine: str, config, mode: str = "w4a4",
                 device="cpu", implementation: str = "eager") -> EngineExperts:
    """`block`'s routed experts as `engine` computes them, the tensors stored in `form`.

    `form`: `nvfp4` (four tensors per projection) or `mxfp4` (the release's `.weight` I8 + `.scale`
    E8M0; `released` is accepted for it). `mode` applies where the engine builds NVFP4 (`w4a4`
    Blackwell, `w4a16` Hopper); SGLang's MXFP4 path keeps activations BF16. For the MTP block:

    - (a) MXFP4 read by SGLang (builds MXFP4): exact, E2M1 x 2^(e8m0-127), BF16 activations;
    - (b) MXFP4 read by vLLM (builds NVFP4): misread, see `_read_mxfp4_as_nvfp4` /
      `vllm_scale_from_e8m0` (unwritten scale columns 0, weight_scale_2 and input_scale 1.0);
    - (c) NVFP4 read by vLLM: correct NVFP4, as the main layers (`EngineExperts.from_export`);
    - (d) NVFP4 read by SGLang (builds MXFP4): misread, see `_read_nvfp4_as_mxfp4`.
    Main layers are built NVFP4 by both engines: NVFP4 there is read correctly."""
    form = {"released": "mxfp4"}.get(form, form)
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {FORMS}")
    built = engine_builds(engine, block)
    if form == built == "nvfp4":
        return EngineExperts.from_export(tensors, block, config, mode, device, implementation)
    if form == built == "mxfp4":
        return EngineExperts.from_mxfp4(tensors, block, config, device, implementation)
    if built == "nvfp4":
        return _assemble(tensors, block, config, _read_mxfp4_as_nvfp4, mode, device, implementation)
    return _assemble(tensors, block, config, _read_nvfp4_as_mxfp4, "w4a16", device, implementation)


__all__ = ["IMPLEMENTATIONS", "decode_nvfp4", "decode_mxfp4", "e2m1_round", "quantize_activation", "layer_input_scales",
           "EngineExperts", "engine_builds", "engine_reads", "vllm_scale_from_e8m0", "MODES", "ENGINES", "FORMS"]
