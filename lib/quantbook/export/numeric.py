"""`quantbook verify`'s numeric check, fast: the same numbers as the straightforward computation.

`nvfp4_error_reference` is the check as written first (whole-tensor torch ops: the NVFP4 decode of
`export.engine`, the release's BF16, then |W - Wq| and the bound per 16-block; see verify.py for the
bound). It ran at ~5 s per V4 Pro expert projection (3072 x 7168) on one core: ~15 full-size fp32
temporaries, an int64 unpack, the difference computed twice. `nvfp4_error_fast` computes the same
numbers at a fraction of that, bit for bit:

- both decodes are table lookups: an output pair depends only on (scale byte, code byte), so one
  65,536-entry table of fp32 pairs per tensor (export: E2M1 x (e4m3 x weight_scale_2), each entry
  computed by the reference's own fp32 ops) or per process (release: its MXFP4 decoded to BF16
  then fp32, from `release.dequant`'s table) turns a row chunk into one `np.take`;
- the per-element work goes by row chunks that stay in the CPU caches, every op writing into
  per-thread scratch buffers (no allocation, no page faults, the GIL released by each op);
- only what must be whole is whole: the reference values and the difference, because the two
  norms (`x.norm()` and `(q - x).norm()`) are torch's sequential fp32 reductions over the whole
  tensor, whose rounding depends on the order; they are taken by the same call on a contiguous
  tensor of the same shape, hence the same bits. Maxima and counts are exact in any order; the
  bound's formulas run on the per-block maxima exactly as the reference writes them.

Anything the fast route does not expect (other dtypes, shapes that do not match, a scale that
would broadcast) goes to the reference, which then raises or answers as it always did.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..release.dequant import E2M1, _lut
from .engine import decode_nvfp4
from .nvfp4 import GROUP

CHUNK_ELEMS = 1 << 19  # output elements per row chunk (2 MiB of fp32): in the caches, and few calls (the GIL)
GROUP_BLOCKS = 1 << 17  # blocks whose bound is computed at once (a few groups of chunks)
MX_GROUP = 32  # the release's MXFP4 block

_X_TABLE: list[np.ndarray] = []
_PAIRS: list[torch.Tensor] = []
_local = threading.local()
_lock = threading.Lock()


def nvfp4_error_reference(codes, scale, ws2, ref: torch.Tensor) -> dict:
    """The straightforward computation (whole-tensor torch ops): what `nvfp4_error_fast` must equal."""
    q = decode_nvfp4(codes, scale, ws2)
    x = ref.to(torch.float32)
    out, inp = x.shape
    ws2 = float(ws2)
    unit = scale.view(torch.float8_e4m3fn).to(torch.float32) * ws2
    a = x.abs().reshape(out, inp // GROUP, GROUP).amax(dim=2)
    err = (q - x).abs().reshape(out, inp // GROUP, GROUP).amax(dim=2)
    return _summary(unit, a, err, ws2, x.norm(), (q - x).norm())


def _summary(unit: torch.Tensor, a: torch.Tensor, err: torch.Tensor, ws2: float, x_norm, d_norm) -> dict:
    """The bound per 16-block and the reported numbers, from the per-block maxima and the two norms."""
    max_ratio, over, exact, bad_scale, max_err = _block_numbers(unit, a, err, ws2)
    return {"max_ratio": float(max_ratio), "blocks_over": int(over), "blocks": err.numel(),
            "blocks_exact": int(exact), **_rel_rmse(x_norm, d_norm),
            "max_abs_err": float(max_err), "bad_block_scales": int(bad_scale)}


# ----------------------------------------------------------------------------- tables


def _pairs() -> torch.Tensor:
    """code byte -> (E2M1 of the low nibble, of the high nibble), fp32 [256, 2]."""
    with _lock:
        if not _PAIRS:
            t = torch.tensor(E2M1, dtype=torch.float32)
            b = torch.arange(256)
            _PAIRS.append(torch.stack([t[b & 0xF], t[b >> 4]], dim=1).contiguous())
    return _PAIRS[0]


def q_table(ws2: torch.Tensor) -> np.ndarray:
    """(e4m3 scale byte << 8 | code byte) -> the two decoded fp32 values, as uint64 (low nibble first).

    Each entry is `decode_nvfp4`'s: unit = f32(e4m3) * f32(weight_scale_2), then E2M1 * unit."""
    unit = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) * ws2.to(torch.float32)
    vals = _pairs()[None, :, :] * unit.reshape(256, 1, 1)  # [scale byte, code byte, nibble]
    return vals.contiguous().view(torch.int64).numpy().view(np.uint64).reshape(-1)


def x_table() -> np.ndarray:
    """(e8m0 scale byte << 8 | code byte) -> the release's two values as fp32 (its exact BF16,
    `release.dequant.dequant_fp4`'s table widened), as uint64 (low nibble first)."""
    with _lock:
        if not _X_TABLE:
            bf = torch.from_numpy(_lut("fp4").view(np.int16).copy()).view(torch.bfloat16)  # [65536 * 2]
            _X_TABLE.append(bf.to(torch.float32).view(torch.int64).numpy().view(np.uint64).copy())
    return _X_TABLE[0]


# ----------------------------------------------------------------------------- the fast route


def _u8(t) -> np.ndarray | None:
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.element_size() != 1 or t.dim() != 2:
        return None
    return t.view(torch.uint8).contiguous().numpy()


def fast_ok(codes, scale, ws2, ref_shape=None) -> bool:
    """Inputs the fast route computes exactly as the reference; anything else goes to the reference."""
    c, s = _u8(codes), _u8(scale)
    if c is None or s is None or not scalar_ok(ws2):
        return False
    return shape_ok(c.shape, s.shape) and (ref_shape is None or tuple(ref_shape) == (c.shape[0], c.shape[1] * 2))


def scalar_ok(ws2) -> bool:
    """weight_scale_2 as the fast route takes it: one floating value on the CPU."""
    return isinstance(ws2, torch.Tensor) and ws2.numel() == 1 and ws2.dtype.is_floating_point \
        and ws2.device.type == "cpu"


def shape_ok(codes_shape, scale_shape) -> bool:
    """Codes [out, in/2] with E4M3 scales [out, in/16] (what `decode_nvfp4` decodes without broadcasting)."""
    if len(codes_shape) != 2:
        return False
    out, half = codes_shape
    return out > 0 and half > 0 and half % (GROUP // 2) == 0 and tuple(scale_shape) == (out, half // (GROUP // 2))


def ref_ok(ref) -> bool:
    """A reference tensor the fast route widens to fp32 as `ref.to(torch.float32)` does."""
    return isinstance(ref, torch.Tensor) and ref.device.type == "cpu" and ref.dim() == 2 \
        and ref.dtype.is_floating_point


def release_ok(rcodes, rscale) -> bool:
    """The release's MXFP4 tensors decode through the table as `release.dequant.dequant_fp4` does:
    1-byte codes [out, in/2] with E8M0 scales [out, in/32]."""
    rc, rs = _u8(rcodes), _u8(rscale)
    return rc is not None and rs is not None and release_shape_ok(rc.shape, rs.shape)


def release_shape_ok(codes_shape, scale_shape) -> bool:
    if len(codes_shape) != 2:
        return False
    out, half = codes_shape
    return out > 0 and half > 0 and half % (MX_GROUP // 2) == 0 and tuple(scale_shape) == (out, half // (MX_GROUP // 2))


def _buf(name: str, n: int, dtype) -> np.ndarray:
    """This thread's flat buffer `name` of n elements (a prefix of one kept for the thread's life; the
    thread's `Work`s are dropped when one must grow, so none keeps a view of a replaced buffer)."""
    bufs = _local.__dict__.setdefault("bufs", {})
    b = bufs.get(name)
    if b is None or b.size < n:
        _local.__dict__.setdefault("work", {}).clear()
        b = bufs[name] = np.empty(n, dtype=dtype)
    return b[:n]


class Work:
    """One thread's buffers for tensors of one shape [out, in/2], and the views of each row chunk.

    The inputs are read (or copied) into `codes`, `scale`, `rcodes`, `rscale`; every chunk's
    views are built once, so a chunk costs a dozen calls that each release the GIL. `x` and `d`
    (the reference values and the difference) are whole tensors for the two norms. The buffers are
    the thread's (`_buf`): w2's shape, the transpose of w1's, reuses w1's."""

    def __init__(self, out: int, half: int, chunk_elems: int | None = None):
        inp, nb = half * 2, half // (GROUP // 2)
        chunk_elems = chunk_elems or CHUNK_ELEMS
        mx = half % (MX_GROUP // 2) == 0
        rows = max(1, min(out, chunk_elems // inp))
        n = out * inp
        bufs = {k: _buf(k, m, t) for k, m, t in (
            ("codes", n // 2, np.uint8), ("scale", n // 16, np.uint8), ("rcodes", n // 2, np.uint8),
            ("rscale", n // 32, np.uint8), ("x", n, np.float32), ("d", n, np.float32), ("ab", n // 8, np.float32),
            ("unit", n // 16, np.float32), ("idx", rows * half, np.uint16), ("hi", rows * nb, np.uint16),
            ("q", rows * half, np.uint64), ("tmp", 2 * rows * inp, np.float32))}
        self.shape = (out, half)
        self.codes = bufs["codes"].reshape(out, half)
        self.scale = bufs["scale"].reshape(out, nb)
        self.rcodes = bufs["rcodes"].reshape(out, half) if mx else None
        self.rscale = bufs["rscale"].reshape(out, nb // 2) if mx else None
        self.x = torch.from_numpy(bufs["x"]).view(out, inp)
        self.d = torch.from_numpy(bufs["d"]).view(out, inp)
        self.ab = torch.from_numpy(bufs["ab"]).view(2, out, nb)  # per block: max |q - x|, max |x|
        self.unit = bufs["unit"].reshape(out, nb)
        idx, hi, q = bufs["idx"], bufs["hi"], bufs["q"]
        tmp = torch.from_numpy(bufs["tmp"])
        x64 = bufs["x"].view(np.uint64).reshape(out, half)
        self.chunks = []
        for r0 in range(0, out, rows):
            r1 = min(out, r0 + rows)
            k = r1 - r0
            qk = q[: k * half]
            tk = tmp[: 2 * k * inp].view(2, k, inp)
            self.chunks.append(dict(
                s=self.scale[r0:r1].reshape(-1), hi=hi[: k * nb], c=self.codes[r0:r1].reshape(k * nb, GROUP // 2),
                idx=idx[: k * half], idx8=idx[: k * half].reshape(k * nb, GROUP // 2), q64=qk,
                q=torch.from_numpy(qk.view(np.float32)).view(k, inp),
                rs=self.rscale[r0:r1].reshape(-1) if mx else None, hx=hi[: k * (nb // 2)],
                hi2=hi[: k * nb, None], hx2=hi[: k * (nb // 2), None],
                rc=self.rcodes[r0:r1].reshape(k * (nb // 2), MX_GROUP // 2) if mx else None,
                idx16=idx[: k * half].reshape(k * (nb // 2), MX_GROUP // 2) if mx else None,
                x64=x64[r0:r1].reshape(-1), x=self.x[r0:r1], d=self.d[r0:r1], t0=tk[0], t1=tk[1],
                t=tk.view(1, 2 * k, inp), ab=self.ab[:, r0:r1], k=k))
        # the bound per group of chunks: about GROUP_BLOCKS blocks at a time
        gr = max(rows, GROUP_BLOCKS // nb // rows * rows)
        self.groups = [(g0, min(out, g0 + gr)) for g0 in range(0, out, gr)]


def work(out: int, half: int) -> Work:
    """This thread's `Work` for the shape (at most two kept: experts come in two shapes)."""
    cache = _local.__dict__.setdefault("work", {})
    w = cache.get((out, half))
    if w is None:
        if len(cache) >= 2:
            cache.clear()
        w = Work(out, half)
        _local.work[(out, half)] = w  # after Work(): a buffer grown there cleared the cache
    return w


def release_scratch() -> None:
    """Drop this thread's buffers (~200 MB at V4 Pro's expert shape)."""
    _local.__dict__.pop("work", None)
    _local.__dict__.pop("bufs", None)


def compute(w: Work, ws2, release: bool) -> dict:
    """The numbers of `nvfp4_error_reference` for the tensors in `w`'s buffers (the reference values
    already in `w.x` unless `release`: then decoded from `w.rcodes`/`w.rscale`)."""
    lut_q = q_table(ws2)
    lut_x = x_table() if release else None
    shl, bor, sub, absf, pool = np.left_shift, np.bitwise_or, torch.sub, torch.abs, torch.max_pool1d
    take_q, take_x = lut_q.take, (lut_x.take if release else None)
    u16 = np.uint16
    for c in w.chunks:
        shl(c["s"], 8, out=c["hi"], dtype=u16)
        bor(c["c"], c["hi2"], out=c["idx8"])
        take_q(c["idx"], out=c["q64"], mode="clip")
        if release:
            shl(c["rs"], 8, out=c["hx"], dtype=u16)
            bor(c["rc"], c["hx2"], out=c["idx16"])
            take_x(c["idx"], out=c["x64"], mode="clip")
        sub(c["q"], c["x"], out=c["d"])
        absf(c["d"], out=c["t0"])
        absf(c["x"], out=c["t1"])
        c["ab"].copy_(pool(c["t"], GROUP, GROUP).view(2, c["k"], -1))
    ws2f = float(ws2)
    unit256 = (torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32) * ws2f).numpy()
    parts = []
    for g0, g1 in w.groups:
        unit256.take(w.scale[g0:g1], out=w.unit[g0:g1], mode="clip")
        parts.append(_block_numbers(torch.from_numpy(w.unit[g0:g1]), w.ab[1, g0:g1], w.ab[0, g0:g1], ws2f))
    max_ratio = torch.stack([p[0] for p in parts]).max()
    max_err = torch.stack([p[4] for p in parts]).max()
    return {"max_ratio": float(max_ratio), "blocks_over": sum(int(p[1]) for p in parts), "blocks": w.ab[0].numel(),
            "blocks_exact": sum(int(p[2]) for p in parts),
            **_rel_rmse(w.x.norm(), w.d.norm()),
            "max_abs_err": float(max_err), "bad_block_scales": sum(int(p[3]) for p in parts)}


def _rel_rmse(x_norm, d_norm) -> dict:
    norm = float(x_norm)
    return {"rel_rmse": float(d_norm) / norm if norm else float(d_norm)}


def _block_numbers(unit, a, err, ws2: float):
    """`_summary`'s per-block formulas on some of the blocks: (max ratio, blocks over, blocks exact,
    bad scales, max error), each exact whatever the split."""
    step = torch.minimum(unit, a / 6 * (1 + 2**-4) + 2**-10 * ws2)
    bound = torch.maximum(torch.maximum(step, torch.full_like(step, 2**-9 * ws2)), a / 16 + 6 * 2**-10 * ws2)
    bound = bound * (1 + 1e-6)
    ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, torch.inf, 0.0))
    bad_scale = (~torch.isfinite(unit) | (unit <= 0)).sum()
    return ratio.max(), (ratio > 1).sum(), (err == 0).sum(), bad_scale, err.max()


def release_numbers(codes, scale, ws2, rcodes, rscale) -> dict:
    """`nvfp4_error_reference`'s numbers of NVFP4 (codes, scale, ws2) against the release's MXFP4
    (rcodes, rscale) decoded exactly: fast where the inputs are the expected ones, else the reference
    route (which raises or answers as it always did). Verify's check 7 on bytes read from the shards,
    and step 02's pass on the bytes it writes, in memory."""
    if fast_ok(codes, scale, ws2) and release_ok(rcodes, rscale) \
            and tuple(_u8(codes).shape) == tuple(_u8(rcodes).shape):
        return nvfp4_error_fast(codes, scale, ws2, release=(rcodes, rscale))  # the caller's release_scratch()
    from ..release.dequant import dequant_fp4

    plain = dequant_fp4(rcodes.view(torch.uint8), rscale.view(torch.uint8))
    return nvfp4_error_reference(codes, scale, ws2, plain)


def nvfp4_error_fast(codes, scale, ws2, ref: torch.Tensor | None = None, release=None) -> dict:
    """`nvfp4_error_reference`'s numbers, fast; the reference values either as a tensor (`ref`, any
    floating dtype, [out, in]) or as the release's MXFP4 `release=(codes, e8m0 scale)`. For inputs
    that pass `fast_ok` (and `ref_ok` or `release_ok`)."""
    c = _u8(codes)
    w = work(*c.shape)
    np.copyto(w.codes, c)
    np.copyto(w.scale, _u8(scale))
    if release is not None:
        np.copyto(w.rcodes, _u8(release[0]))
        np.copyto(w.rscale, _u8(release[1]))
    else:
        w.x.copy_(ref)
    return compute(w, ws2, release is not None)
