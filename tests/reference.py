"""An independent reference for V4 dequantization, written from the format's definitions.

Shares nothing with quantbook.dequant: E4M3 and E8M0 are decoded from their bit fields with
Python integers, products taken in numpy float32, and BF16 round-to-nearest-even done on the
fp32 bit pattern. Used only by tests.
"""

import math

import numpy as np


def e4m3_value(code: int) -> float:
    """OCP FP8 E4M3 (fn): 1 sign, 4 exponent (bias 7), 3 mantissa; S.1111.111 is NaN, no inf."""
    sign = -1.0 if code & 0x80 else 1.0
    exp = (code >> 3) & 0xF
    man = code & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * math.ldexp(man / 8.0, -6)
    return sign * math.ldexp(1.0 + man / 8.0, exp - 7)


def e8m0_value(code: int) -> float:
    """UE8M0: 2^(code-127); 0xFF is NaN."""
    return math.nan if code == 0xFF else math.ldexp(1.0, code - 127)


E4M3_TABLE = np.array([e4m3_value(c) for c in range(256)], dtype=np.float32)
E8M0_TABLE = np.array([e8m0_value(c) for c in range(256)], dtype=np.float32)
FP4_TABLE = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16) with round-to-nearest-even; NaN stays NaN."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
    return out


def fp8_reference(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """uint8 E4M3 codes [out, in] and uint8 E8M0 scales [ceil(out/128), ceil(in/128)] -> bf16 bits."""
    vals = E4M3_TABLE[w]
    out, inp = w.shape
    rows = np.arange(out)[:, None] // 128
    cols = np.arange(inp)[None, :] // 128
    scale = E8M0_TABLE[s][rows, cols]
    with np.errstate(over="ignore", invalid="ignore"):
        return bf16_bits(vals * scale)


def fp4_reference(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """uint8 packed E2M1 [out, in/2] (low nibble first) and E8M0 scales [out, in/32] -> bf16 bits."""
    out, half = w.shape
    vals = np.empty((out, half * 2), dtype=np.float32)
    vals[:, 0::2] = FP4_TABLE[w & 0xF]
    vals[:, 1::2] = FP4_TABLE[w >> 4]
    scale = np.repeat(E8M0_TABLE[s], 32, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        return bf16_bits(vals * scale)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of two bf16 bit arrays, treating any two NaNs as equal."""
    a_nan = (a & 0x7FFF) > 0x7F80
    b_nan = (b & 0x7FFF) > 0x7F80
    return bool(np.array_equal(a_nan, b_nan) and np.array_equal(a[~a_nan], b[~b_nan]))
