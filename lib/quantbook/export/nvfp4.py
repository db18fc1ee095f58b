"""The NVFP4 numbers of a routed expert projection, from the release's MXFP4 bytes, modelopt's own.

Two ways from a released projection (E2M1 codes, one E8M0 scale per 32 inputs) to NVFP4 (the
same codes' format, one E4M3 scale per 16 inputs, one F32 `weight_scale_2`):

- **carry** (`cast_mxfp4_to_nvfp4: true`, the default; NVIDIA's `--cast_mxfp4_to_nvfp4`): with
  `k_max` the largest E8M0 exponent of the projection's group (w1 and w3 together, w2 alone),
  `weight_scale_2 = 2^(k_max-8)` and each 16-block's scale `2^(k-k_max+8)`, exact in E4M3 while
  `k_max - k <= 17` (2^-9 is E4M3's smallest value). Those blocks keep the released code bytes:
  no arithmetic touches the weights, the scales go through a 256-entry table of the gap
  `k_max - k`. A block further below (`lossy`) is decoded exactly and quantized by modelopt's
  `NVFP4QTensor.quantize` under the clamped scale, then counted and named by the writer.
- **re-quantize** (`false`): the exact BF16 of the release quantized from the calibrated weight
  amax, as modelopt's `_export_quantized_weight` does (`get_weights_scaling_factor`, then
  `quantize`). Two methods give modelopt's bytes:
  - `table` (CPU): the BF16 input is the exact decode `E2M1[n] * 2^k`, so a 16-block's scale
    depends only on (k, m), m its largest code magnitude, and each output code only on (k, m,
    input code). Per `weight_scale_2`, modelopt's own two calls run on one synthetic block per
    (k, m) holding exactly those values; the projection is then mapped through the resulting
    tables (two gathers). Every value modelopt would see is one modelopt saw.
  - `modelopt` (CUDA; also runs on CPU): modelopt's two calls on a batch of same-shaped
    projections at once, `weight_scale_2` shaped [B, 1, 1] on the device. Every op in them is
    elementwise or a per-16-block reduction, so each slice equals its projection's own result.

Tested byte for byte against modelopt's export of the calibrated tiny model, and against the
per-projection modelopt calls for every E8M0 byte, largest magnitude and code
(tests/test_layout_writer.py).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..release.dequant import dequant_fp4, dequant_fp4_formula
from ..release.format import FP4_GROUP

GROUP = 16  # NVFP4 block: one E4M3 scale per 16 inputs
FP4_MAX, FP8_MAX = 6.0, 448.0
LOSSLESS_GAP = 17  # k_max - k up to this: the 16-block scale 2^(8-gap) is exact in E4M3 (smallest 2^-9)
METHODS = ("table", "modelopt")

# ----------------------------------------------------------------------------- modelopt's pieces

_MODELOPT: dict = {}


def modelopt():
    """modelopt's NVFP4 pieces, imported once (the import takes ~10 s)."""
    if not _MODELOPT:
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        _MODELOPT.update(NVFP4QTensor=NVFP4QTensor, TensorQuantizer=TensorQuantizer,
                         QuantizerAttributeConfig=QuantizerAttributeConfig)
    return _MODELOPT


def _nv():
    return modelopt()["NVFP4QTensor"]


def nvfp4_quantizer(amax: torch.Tensor):
    """A modelopt TensorQuantizer as NVFP4_EXPERTS_ONLY_CFG builds it for experts, holding `amax`."""
    m = modelopt()
    q = m["TensorQuantizer"](m["QuantizerAttributeConfig"](
        num_bits=(2, 1), block_sizes={-1: GROUP, "type": "dynamic", "scale_bits": (4, 3)}))
    q.amax = amax.reshape(()).to(torch.float32)
    return q


def weight_scale_2(weight_amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale, modelopt's `get_weights_scaling_factor_2_from_quantizer` (amax / (6*448))."""
    return _nv().get_weights_scaling_factor_2_from_quantizer(nvfp4_quantizer(weight_amax)).reshape(())


def input_scale(input_amax: torch.Tensor) -> torch.Tensor:
    """Activation scale, modelopt's `get_activation_scaling_factor` (amax / (6*448))."""
    return _nv().get_activation_scaling_factor(nvfp4_quantizer(input_amax)).reshape(())


def quantize_nvfp4(w: torch.Tensor, ws2: torch.Tensor, block_scale: torch.Tensor | None = None):
    """BF16 [out, in] -> (packed codes U8 [out, in/2], E4M3 scales [out, in/16]) with modelopt's calls.

    As `_export_quantized_weight` does: block scales from `get_weights_scaling_factor(weight, 16,
    weight_scale_2)`, codes from `NVFP4QTensor.quantize(weight, 16, scales, weight_scale_2)`.
    `block_scale` overrides the scales. The per-projection reference the fast routes are tested
    against; `weight_scale_2` stays a tensor on `w`'s device (CUDA turns a division by a CPU
    scalar into a multiplication by its reciprocal: other bits).
    """
    nv = _nv()
    ws2 = ws2.to(w.device)
    if block_scale is None:
        block_scale = nv.get_weights_scaling_factor(w, GROUP, ws2)[0]
    codes = nv.quantize(w, GROUP, block_scale.to(w.device), ws2)[0]._quantized_data
    return codes, block_scale


def f32_bytes(t: torch.Tensor) -> bytes:
    """A 0-d float32 tensor's four bytes (as a safetensors F32 scalar)."""
    return t.detach().to("cpu", torch.float32).reshape(1).contiguous().view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------- carry (lossless cast)


def _carry_table() -> np.ndarray:
    """gap d = k_max - k (0..255) -> the E4M3 byte of 2^max(8-d, -9), twice (both 16-halves of a 32-block)."""
    d = torch.arange(256, dtype=torch.float32)
    b = torch.exp2((8 - d).clamp(min=-9)).to(torch.float8_e4m3fn).view(torch.uint8).numpy().astype(np.uint16)
    return (b | (b << 8)).astype(np.uint16)


CARRY_SCALES = _carry_table()


def carry_scales(s: np.ndarray, k_max_byte: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """One projection's NVFP4 scales carried from its E8M0 bytes `s` [out, in/32].

    Returns (E4M3 scale bytes [out, in/16], `weight_scale_2` = 2^(k_max-8) as a 0-d F32 tensor,
    flat indices of the lossy 32-blocks, k_max - k > 17). `k_max_byte`: the group's largest byte."""
    d = np.subtract(np.uint8(k_max_byte), s, dtype=np.uint8)  # >= 0: k_max is the group's max
    scale = np.take(CARRY_SCALES, d).view(np.uint8)  # uint16 per 32-block -> two bytes per 16-block
    lossy = np.flatnonzero(d > LOSSLESS_GAP)
    return scale, torch.tensor(2.0 ** (int(k_max_byte) - 127 - 8), dtype=torch.float32), lossy


def requantize_lossy(codes: np.ndarray, s: np.ndarray, scale: np.ndarray, ws2: torch.Tensor,
                     lossy: np.ndarray) -> None:
    """Overwrite, in place, the code bytes of the lossy 32-blocks with modelopt's NVFP4 codes for them.

    The blocks' exact BF16 values under their clamped E4M3 scales and `ws2`, through
    `NVFP4QTensor.quantize`: the bytes a whole-projection call gives for those blocks."""
    blocks = codes.reshape(-1, FP4_GROUP // 2)
    w = dequant_fp4(torch.from_numpy(blocks[lossy]), torch.from_numpy(s.reshape(-1)[lossy].reshape(-1, 1)))
    sc = torch.from_numpy(np.ascontiguousarray(scale.reshape(-1, 2)[lossy])).view(torch.float8_e4m3fn)
    blocks[lossy] = _nv().quantize(w, GROUP, sc, ws2)[0]._quantized_data.numpy()


# ----------------------------------------------------------------------------- re-quantize: tables

# the 16 codes 0..15 as packed bytes (low nibble = even element), twice: one 32-block
_CODES_IN_ORDER = torch.tensor([(2 * i) | ((2 * i + 1) << 4) for i in range(8)] * 2, dtype=torch.uint8)


class RequantTables:
    """modelopt's outputs for one `weight_scale_2` and E8M0 bytes kmin..kmax, for every (k, m, code).

    key = (k - kmin) * 8 + m, m = the largest E2M1 magnitude (0..7) in a 16-block.
    `scale[key]`: the block's E4M3 scale byte; `codes[key * 256 + byte]`: the output byte for an
    input byte; `amax[key]`: |w| of the block's largest element as modelopt sees it."""

    def __init__(self, kmin: int, kmax: int, ws2: torch.Tensor):
        nv = _nv()
        nk = kmax - kmin + 1
        kb = torch.arange(kmin, kmax + 1, dtype=torch.int32).to(torch.uint8).reshape(nk, 1)
        vals = dequant_fp4(_CODES_IN_ORDER.repeat(nk, 1), kb)[:, :GROUP]  # [nk, 16] BF16: code n at 2^(k-127)
        blocks = torch.zeros(nk, 8, GROUP, dtype=vals.dtype)
        blocks[:, :, 0] = vals[:, :8]  # one block per (k, m) whose largest magnitude is E2M1[m]
        scale = nv.get_weights_scaling_factor(blocks.reshape(nk * 8, GROUP), GROUP, ws2)[0]
        x = vals[:, None, :].expand(nk, 8, GROUP).reshape(nk * 8, GROUP).contiguous()
        q = nv.quantize(x, GROUP, scale, ws2)[0]._quantized_data  # every code under every (k, m) scale
        out = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(nk * 8, GROUP)  # output code per input code
        b = torch.arange(256)
        self.codes = (out[:, b & 0xF] | (out[:, b >> 4] << 4)).to(torch.uint8).reshape(-1).contiguous()
        self.scale = scale.reshape(-1).view(torch.uint8).contiguous()
        self.amax = vals[:, :8].abs().float().reshape(-1).contiguous()
        self.kmin, self.kmax, self.ws2 = kmin, kmax, ws2

    def covers(self, kmin: int, kmax: int, ws2: torch.Tensor) -> bool:
        return self.kmin <= kmin and kmax <= self.kmax and torch.equal(self.ws2, ws2)


_SCRATCH = threading.local()


def _scratch(name: str, n: int, dtype) -> torch.Tensor:
    """A per-thread reusable buffer (a fresh large allocation costs a page fault per 4 KiB)."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    t = bufs.get(name)
    if t is None or t.numel() < n or t.dtype != dtype:
        t = bufs[name] = torch.empty(n, dtype=dtype)
    return t[:n]


def requant_table(codes: np.ndarray, s: np.ndarray, ws2: torch.Tensor, tables: RequantTables | None = None):
    """Re-quantize one projection on the CPU through tables of modelopt's outputs.

    codes U8 [out, in/2], s E8M0 bytes [out, in/32] -> (codes [out, in/2], E4M3 bytes [out, in/16],
    max |w| of the released weights, the tables, reusable for the next projection)."""
    c = torch.from_numpy(codes)
    k8 = torch.from_numpy(s)
    out, half = c.shape
    nb16, n = half // (GROUP // 2), out * half
    kmin, kmax = int(k8.min()), int(k8.max())
    if tables is None or not tables.covers(kmin, kmax, ws2):
        tables = RequantTables(kmin, kmax, ws2)
    lo = torch.bitwise_and(c, 7, out=_scratch("lo", n, torch.uint8).view(out, half))
    hi = torch.bitwise_right_shift(c, 4, out=_scratch("hi", n, torch.uint8).view(out, half))
    hi &= 7
    torch.maximum(lo, hi, out=lo)
    m = lo.view(out, nb16, 8).amax(dim=2)  # largest code magnitude per 16-block
    key = ((k8.to(torch.int32) - tables.kmin) << 3).repeat_interleave(2, dim=1)
    key += m
    scale = tables.scale.index_select(0, key.view(-1)).view(out, nb16)
    idx = _scratch("idx", n, torch.int32).view(out, nb16, 8)
    idx.copy_(c.view(out, nb16, 8))  # widen first: a mixed-dtype broadcast op is ~5x slower
    idx.bitwise_or_((key << 8).unsqueeze(-1))
    q = tables.codes.index_select(0, idx.view(-1)).view(out, half)
    own = float(tables.amax.index_select(0, key.view(-1)).max())
    return q.numpy(), scale.numpy(), own, tables


# ----------------------------------------------------------------------------- re-quantize: batched


def requant_modelopt(codes: torch.Tensor, s: torch.Tensor, ws2: torch.Tensor, device: str = "cpu"):
    """Re-quantize a batch of same-shaped projections with modelopt's own calls, on `device`.

    codes U8 [B, out, in/2], s E8M0 bytes [B, out, in/32], ws2 F32 [B] -> (codes U8 [B, out, in/2],
    E4M3 [B, out, in/16], max |w| F32 [B]), all on the CPU. The decode is exact either way (the
    table route on CPU, the formula on CUDA: the same bits)."""
    nv = _nv()
    B, out, half = codes.shape
    c = codes.to(device, non_blocking=True).reshape(B * out, half)
    sc = s.to(device, non_blocking=True).reshape(B * out, -1)
    w = (dequant_fp4(c, sc) if c.device.type == "cpu" else dequant_fp4_formula(c, sc)).reshape(B, out, half * 2)
    own = torch.maximum(w.amax(dim=(1, 2)).abs(), w.amin(dim=(1, 2)).abs()).float()
    ws = ws2.to(device=w.device, dtype=torch.float32).reshape(B, 1, 1)
    bscale = nv.get_weights_scaling_factor(w, GROUP, ws)[0]
    q = nv.quantize(w, GROUP, bscale, ws)[0]._quantized_data
    return q.cpu(), bscale.cpu(), own.cpu()


def default_method(device: str) -> str:
    """`modelopt` (batched) on a GPU, `table` on the CPU."""
    return "modelopt" if str(device).startswith("cuda") else "table"
