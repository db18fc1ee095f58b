"""Exact dequantization of V4's FP8 block weights and packed FP4 experts to BF16.

    FP8: W[i,j] = bf16_rne( f32(e4m3(w[i,j])) * f32(e8m0(s[i//128, j//128])) )
    FP4: v[i,2k] = E2M1[w[i,k] & 0xF]; v[i,2k+1] = E2M1[w[i,k] >> 4]
         W[i,j] = bf16_rne( v[i,j] * f32(e8m0(s[i, j//32])) )

Every product is exact in fp32, so the result is the formula's bit for bit. Bytes are
reinterpreted as float8 types, never read as integers. Nibble 8 gives +0.0, as DeepSeek's own
converter does.

Two routes compute the same bits. `*_formula` evaluates the formula in torch on any device (the
GPU route, and the only one for fp32 scales). On CPU with E8M0 scales, `dequant_fp8`/`dequant_fp4`
look the answer up instead: an output depends only on (scale byte, code byte), so a 65,536-entry
table built once from the formula itself turns each chunk into one gather, ~7x faster on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from .format import FP4_GROUP, FP8_BLOCK

# E2M1 value of each 4-bit code (index = nibble); code 8 is -0 in hardware, +0 here.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}
_LUTS: dict[str, np.ndarray] = {}


def e8m0_to_f32(s: torch.Tensor) -> torch.Tensor:
    """UE8M0 scale bytes -> 2^(byte-127) in fp32 (0xFF -> NaN)."""
    return s.view(torch.uint8).view(torch.float8_e8m0fnu).to(torch.float32)


def scale_to_f32(s: torch.Tensor) -> torch.Tensor:
    """A `.scale` tensor as fp32 multipliers: E8M0 bytes, or fp32 already (V4 base models)."""
    if s.dtype == torch.float32:
        return s
    return e8m0_to_f32(s)


def _pair_table(device: torch.device) -> torch.Tensor:
    """byte -> (value of low nibble, value of high nibble), as a [256, 2] fp32 table."""
    if device not in _PAIR_TABLES:
        t = torch.tensor(E2M1, dtype=torch.float32)
        codes = torch.arange(256)
        _PAIR_TABLES[device] = torch.stack([t[codes & 0xF], t[codes >> 4]], dim=1).to(device)
    return _PAIR_TABLES[device]


def dequant_fp8_formula(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 weight [out, in] with one scale per 128x128 block -> BF16 [out, in], by the formula.

    `w` may be a row slice starting at a multiple of 128; `s` then holds that slice's scale rows.
    """
    out, inp = w.shape
    x = w.view(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
    scale = scale_to_f32(s)
    if out % FP8_BLOCK == 0 and inp % FP8_BLOCK == 0:  # every V4 weight: broadcast, no expanded copy
        blocks = x.view(out // FP8_BLOCK, FP8_BLOCK, inp // FP8_BLOCK, FP8_BLOCK)
        blocks.mul_(scale[: out // FP8_BLOCK, None, :, None])
    else:
        x.mul_(scale.repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp])
    return x.to(torch.bfloat16)


def unpack_fp4(w: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 bytes [out, in/2] -> fp32 values [out, in] (low nibble = even column)."""
    out, half = w.shape
    table = _pair_table(w.device)
    return table[w.view(torch.uint8).to(torch.int32)].reshape(out, half * 2)


def dequant_fp4_formula(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed FP4 weight [out, in/2] with one scale per 32 inputs -> BF16 [out, in], by the formula."""
    v = unpack_fp4(w)
    out, inp = v.shape
    v.view(out, inp // FP4_GROUP, FP4_GROUP).mul_(scale_to_f32(s).reshape(out, inp // FP4_GROUP, 1))
    return v.to(torch.bfloat16)


def _lut(kind: str) -> np.ndarray:
    """(scale byte << 8 | code byte) -> output bits, every entry computed by the formula route.

    fp8: uint16 bf16 bits of one element. fp4: uint32 holding the two bf16 values of a byte
    (low half = low nibble = even column, matching little-endian memory order)."""
    if kind not in _LUTS:
        scales = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
        codes = torch.arange(256, dtype=torch.uint8).repeat(256)
        if kind == "fp8":
            vals = codes.view(torch.float8_e4m3fn).to(torch.float32) * e8m0_to_f32(scales)
            _LUTS[kind] = vals.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()
        else:
            pairs = _pair_table(torch.device("cpu"))[codes.to(torch.int32)] * e8m0_to_f32(scales)[:, None]
            _LUTS[kind] = pairs.to(torch.bfloat16).contiguous().view(torch.int32).numpy().view(np.uint32).reshape(-1).copy()
    return _LUTS[kind]


def _lookup_ok(w: torch.Tensor, s: torch.Tensor) -> bool:
    return w.device.type == "cpu" and s.dtype != torch.float32


def dequant_fp8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """FP8 weight [out, in] + 128x128 block scales -> BF16 [out, in] (table route on CPU)."""
    if not _lookup_ok(w, s):
        return dequant_fp8_formula(w, s)
    out, inp = w.shape
    codes = w.view(torch.uint8).numpy()
    hi = s.view(torch.uint8).numpy().astype(np.uint16) << 8
    if out % FP8_BLOCK == 0 and inp % FP8_BLOCK == 0:
        idx = codes.reshape(out // FP8_BLOCK, FP8_BLOCK, inp // FP8_BLOCK, FP8_BLOCK).astype(np.uint16)
        idx |= hi[: out // FP8_BLOCK, None, :, None]
    else:
        idx = codes.astype(np.uint16) | np.repeat(np.repeat(hi, FP8_BLOCK, 0)[:out], FP8_BLOCK, 1)[:, :inp]
    bits = np.take(_lut("fp8"), idx.reshape(out, inp))
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def dequant_fp4(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed FP4 weight [out, in/2] + per-32 scales -> BF16 [out, in] (table route on CPU)."""
    if not _lookup_ok(w, s):
        return dequant_fp4_formula(w, s)
    out, half = w.shape
    codes = w.view(torch.uint8).numpy().reshape(out, half // (FP4_GROUP // 2), FP4_GROUP // 2)
    idx = codes.astype(np.uint16)
    idx |= (s.view(torch.uint8).numpy().astype(np.uint16) << 8)[:, :, None]
    words = np.take(_lut("fp4"), idx.reshape(out, half))
    return torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).reshape(out, half * 2)
