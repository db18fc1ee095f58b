"""Issue 18: `quantbook verify`'s numeric check made fast gives the numbers it gave before, bit for bit.

The reference here is the check as it was (`old_nvfp4_error`, copied verbatim from verify.py before
the change, with the release's BF16 from `release_expert_bf16`): every reported number of every
tensor must be the same Python float (NaN for NaN, the sign of a zero included), on the tiny
chain's exports (re-quantized and carried, against the release and against the BF16 reference,
one worker and two), and on random tensors with every odd scale byte (E4M3 NaN, zero and negative
scales, an E8M0 NaN scale, all-zero blocks), cut into many row chunks with a ragged last one."""

import pytest
import torch

from layout_helpers import native_snapshot
from quantbook.export import numeric
from quantbook.export import verify as V
from quantbook.export.engine import decode_nvfp4
from quantbook.export.layout import release_expert_bf16, write_serving_layout
from quantbook.release.dequant import dequant_fp4
from quantbook.release.format import load_config
from quantbook.release.shards import Checkpoint

GROUP = 16


def old_nvfp4_error(codes, scale, ws2, ref: torch.Tensor) -> dict:
    """verify.nvfp4_error before issue 18, verbatim."""
    q = decode_nvfp4(codes, scale, ws2)
    x = ref.to(torch.float32)
    out, inp = x.shape
    ws2 = float(ws2)
    unit = scale.view(torch.float8_e4m3fn).to(torch.float32) * ws2
    a = x.abs().reshape(out, inp // GROUP, GROUP).amax(dim=2)
    err = (q - x).abs().reshape(out, inp // GROUP, GROUP).amax(dim=2)
    step = torch.minimum(unit, a / 6 * (1 + 2**-4) + 2**-10 * ws2)
    bound = torch.maximum(torch.maximum(step, torch.full_like(step, 2**-9 * ws2)), a / 16 + 6 * 2**-10 * ws2)
    bound = bound * (1 + 1e-6)
    ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, torch.inf, 0.0))
    norm = float(x.norm())
    bad_scale = int((~torch.isfinite(unit) | (unit <= 0)).sum())
    return {"max_ratio": float(ratio.max()), "blocks_over": int((ratio > 1).sum()), "blocks": ratio.numel(),
            "blocks_exact": int((err == 0).sum()),
            "rel_rmse": float((q - x).norm()) / norm if norm else float((q - x).norm()),
            "max_abs_err": float(err.max()), "bad_block_scales": bad_scale}


def bits(row: dict) -> dict:
    """Every number as its exact text (repr: NaN is 'nan', -0.0 stays -0.0) and its type."""
    return {k: (type(v).__name__, repr(v)) for k, v in row.items()}


@pytest.fixture(scope="module")
def exports(tiny_src, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-numbers")
    out = {}
    for name, carry in (("requant", False), ("carried", True)):
        out[name] = root / name
        write_serving_layout(tiny_src, native_snapshot(tiny_src), out[name], cast_mxfp4_to_nvfp4=carry, progress=False)
    return out


@pytest.fixture()
def small_chunks(monkeypatch):
    """Rows cut into chunks of a few rows (a ragged last one), blocks into groups of one chunk."""
    monkeypatch.setattr(numeric, "CHUNK_ELEMS", 3 * 2 * 96)
    monkeypatch.setattr(numeric, "GROUP_BLOCKS", 1)
    numeric.release_scratch()
    yield
    numeric.release_scratch()


@pytest.fixture()
def fast_calls(monkeypatch):
    """How many tensors the fast route computed (the tiny shapes must take it too)."""
    calls = []
    compute = numeric.compute

    def counted(w, ws2, release):
        calls.append((w.shape, release))
        return compute(w, ws2, release)

    monkeypatch.setattr(numeric, "compute", counted)
    return calls


@pytest.mark.parametrize("kind", ["requant", "carried"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("chunks", ["default", "small"])
def test_check_numbers_equals_the_old_check(kind, workers, chunks, exports, tiny_src, tiny_bf16, request, fast_calls):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    ck, src, ref = Checkpoint(exports[kind]), Checkpoint(tiny_src), Checkpoint(tiny_bf16)
    cfg = load_config(exports[kind])
    form = V.mtp_form(ck, cfg)
    for against in ("release", "reference"):
        kw = {"src": src, "ref": None} if against == "release" else {"src": None, "ref": ref}
        check, summary = V.check_numbers(ck, cfg, progress=False, workers=workers, form=form, **kw)
        rows = summary["per_tensor"]
        assert check.status == "pass" and len(rows) == len(V.converted_prefixes(cfg, form)) > 0
        assert len(fast_calls) == len(rows) and all(r == (against == "release") for _, r in fast_calls)
        fast_calls.clear()
        for name, row in rows.items():
            r = release_expert_bf16(src, name) if against == "release" else ref.tensor(f"{name}.weight")
            old = old_nvfp4_error(ck.tensor(f"{name}.weight"), ck.tensor(f"{name}.weight_scale"),
                                  ck.tensor(f"{name}.weight_scale_2"), r)
            assert bits(row) == bits(old), (against, name)
        if kind == "carried":  # carried weights: every block equal to the release
            assert summary["blocks_exact"] == summary["blocks"]


def _odd_tensors(out: int, inp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rcodes = torch.randint(0, 256, (out, inp // 2), generator=g, dtype=torch.uint8)
    rscale = torch.randint(110, 130, (out, inp // 32), generator=g, dtype=torch.uint8)
    codes = rcodes.clone()
    codes[::3] = torch.randint(0, 256, codes[::3].shape, generator=g, dtype=torch.uint8)
    scale = torch.randint(0, 256, (out, inp // 16), generator=g, dtype=torch.uint8)  # NaN (0x7F, 0xFF), 0, < 0
    scale[1] = torch.randint(40, 90, scale[1].shape, generator=g, dtype=torch.uint8)
    rcodes[2, :8] = 0  # an all-zero 16-block of the release
    codes[2, :8] = 0
    rscale[3, 0] = 0xFF  # E8M0 NaN
    rscale[4, 0] = 0  # 2^-127
    return codes, scale.view(torch.float8_e4m3fn), rcodes, rscale


@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (37, 96), (64, 256)])
@pytest.mark.parametrize("ws2", [1e-3, 2.0**-20, 0.0, 7.5])
def test_fast_route_equals_the_old_one_on_odd_values(shape, ws2, small_chunks, fast_calls):
    out, inp = shape
    codes, scale, rcodes, rscale = _odd_tensors(max(out, 5), inp, seed=out * inp)
    ws2 = torch.tensor(ws2, dtype=torch.float32)
    plain = dequant_fp4(rcodes, rscale)
    old = old_nvfp4_error(codes, scale, ws2, plain)
    assert bits(numeric.nvfp4_error_fast(codes, scale, ws2, release=(rcodes, rscale))) == bits(old)
    assert bits(numeric.nvfp4_error_fast(codes, scale, ws2, ref=plain)) == bits(old)
    assert bits(V.nvfp4_error(codes, scale, ws2, plain)) == bits(old)
    f32 = plain.float() * 1.001  # a reference that is no release value: no block exact
    assert bits(V.nvfp4_error(codes, scale, ws2, f32)) == bits(old_nvfp4_error(codes, scale, ws2, f32))
    assert len(fast_calls) == 4


def test_unexpected_inputs_take_the_old_route():
    """Shapes that broadcast or do not match: the straightforward computation, errors included."""
    codes, scale, rcodes, rscale = _odd_tensors(8, 64, seed=1)
    ws2 = torch.tensor(0.01)
    plain = dequant_fp4(rcodes, rscale)
    assert not numeric.fast_ok(codes, scale[:, :1], ws2, plain.shape)
    assert bits(V.nvfp4_error(codes, scale[:, :1], ws2, plain)) == bits(old_nvfp4_error(codes, scale[:, :1], ws2, plain))
    with pytest.raises(RuntimeError):
        V.nvfp4_error(codes[:, :16], scale[:, :2], ws2, plain)
