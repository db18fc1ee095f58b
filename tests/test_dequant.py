"""The dequantizer against the independent reference: every code, every scale, every tensor."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from quantbook.release.dequant import dequant_fp4, dequant_fp4_formula, dequant_fp8, dequant_fp8_formula
from quantbook.release.format import FP4_WEIGHT, FP8_WEIGHT, expected_tensors, load_config
from quantbook.release.shards import read_index
from reference import fp4_reference, fp8_reference, same_bits


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


FP8_ROUTES = {"table": dequant_fp8, "formula": dequant_fp8_formula}
FP4_ROUTES = {"table": dequant_fp4, "formula": dequant_fp4_formula}


@pytest.mark.parametrize("route", sorted(FP8_ROUTES))
def test_all_e4m3_codes_times_every_e8m0_scale(route):
    codes = np.arange(256, dtype=np.uint8)
    w = np.tile(codes, (128, 1))  # 128 rows: one scale block tall, 256 columns: two blocks wide
    for lo in range(0, 256, 2):
        s = np.array([[lo, lo + 1]], dtype=np.uint8)  # covers 0..255, 255 = NaN scale
        got = _bits(FP8_ROUTES[route](torch.from_numpy(w), torch.from_numpy(s)))
        want = fp8_reference(w, s)
        assert same_bits(got, want), f"E8M0 scales {lo},{lo + 1}"


def test_nan_codes_are_nan_and_counted():
    from quantbook.release.convert import FP8_WEIGHT, _nonfinite

    w = torch.from_numpy(np.array([[0x7F, 0xFF, 0x00, 0x80]], dtype=np.uint8))
    s = torch.tensor([[127]], dtype=torch.uint8)
    out = dequant_fp8(w, s)
    assert torch.isnan(out).tolist() == [[True, True, False, False]]
    assert _bits(out)[0, 3] == 0x8000  # E4M3 -0 stays -0
    # counted (item 19: the test's name said so, it asserted no count): the two NaN codes, by the input scan
    assert _nonfinite(FP8_WEIGHT, w, s, out) == 2
    # a scale of 2^123 overflows BF16 from E4M3 448 up: counted on the output itself (inf), NaN codes too
    big = torch.tensor([[250]], dtype=torch.uint8)
    w2 = torch.from_numpy(np.array([[0x7E, 0x7F, 0x77, 0x38]], dtype=np.uint8))  # 448, NaN, 240, 1.0
    out2 = dequant_fp8(w2, big)
    assert (~torch.isfinite(out2)).tolist() == [[True, True, True, False]]
    assert _nonfinite(FP8_WEIGHT, w2, big, out2) == 3  # the input scan alone would have said 1


@pytest.mark.parametrize("route", sorted(FP4_ROUTES))
def test_all_fp4_bytes_times_every_scale_and_plus_zero_for_nibble_8(route):
    w = np.arange(256, dtype=np.uint8).reshape(8, 32)  # every byte, 64 values a row
    for k in range(256):
        s = np.full((8, 2), k, dtype=np.uint8)
        got = _bits(FP4_ROUTES[route](torch.from_numpy(w), torch.from_numpy(s)))
        assert same_bits(got, fp4_reference(w, s)), f"scale byte {k}"
    zero8 = FP4_ROUTES[route](torch.tensor([[0x88] * 16], dtype=torch.uint8), torch.tensor([[127]], dtype=torch.uint8))
    assert (_bits(zero8) == 0).all()  # +0.0, not -0.0


@pytest.mark.parametrize("route", sorted(FP8_ROUTES))
def test_ragged_fp8_blocks(route):
    rng = np.random.default_rng(1)
    w = rng.integers(0, 0x7F, size=(200, 300), dtype=np.uint8)
    s = rng.integers(100, 140, size=(2, 3), dtype=np.uint8)
    got = _bits(FP8_ROUTES[route](torch.from_numpy(w), torch.from_numpy(s)))
    assert same_bits(got, fp8_reference(w, s))


def test_fp32_scales_take_the_formula_route():
    """V4 base models store fp32 scales: still exact (value x scale, then one rounding)."""
    w = torch.arange(256, dtype=torch.uint8).reshape(2, 128).repeat(64, 1)
    s = torch.tensor([[0.015625]], dtype=torch.float32)
    got = _bits(dequant_fp8(w, s))
    assert same_bits(got, fp8_reference(w.numpy(), np.array([[121]], dtype=np.uint8)))  # 2^-6 as E8M0


@pytest.mark.parametrize("like", ["flash", "pro"])
def test_every_tensor_of_tiny_checkpoints(tmp_path, like):
    """Dequantize tiny checkpoints of both configs and compare every output tensor."""
    from quantbook.release.convert import dequantize
    from quantbook.release.format import named_config
    from quantbook.release.tiny import make_tiny

    src = make_tiny(tmp_path / "src", like=named_config(like), seed=7)
    dst = tmp_path / "dst"
    dequantize(src, dst, workers=2, progress=False, chunk_elems=5000)  # small chunks: many row slices
    specs = expected_tensors(load_config(src))
    src_map, dst_map = read_index(src)["weight_map"], read_index(dst)["weight_map"]
    checked = {FP8_WEIGHT: 0, FP4_WEIGHT: 0, "plain": 0}
    for name, spec in specs.items():
        if spec.kind == "scale":
            assert name not in dst_map
            continue
        with safe_open(str(dst / dst_map[name]), "pt") as f:
            got = f.get_tensor(name)
        with safe_open(str(src / src_map[name]), "pt") as f:
            raw = f.get_tensor(name)
            scale = f.get_tensor(name[: -len(".weight")] + ".scale") if spec.kind in (FP8_WEIGHT, FP4_WEIGHT) else None
        if spec.kind == FP8_WEIGHT:
            want = fp8_reference(raw.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy())
        elif spec.kind == FP4_WEIGHT:
            want = fp4_reference(raw.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy())
        else:
            assert got.dtype == raw.dtype
            assert got.contiguous().view(torch.uint8).numpy().tobytes() == raw.contiguous().view(torch.uint8).numpy().tobytes()
            checked["plain"] += 1
            continue
        assert got.dtype == torch.bfloat16
        assert same_bits(_bits(got), want), name
        checked[spec.kind] += 1
    assert checked[FP8_WEIGHT] > 0 and checked[FP4_WEIGHT] > 0 and checked["plain"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
def test_cuda_route_is_bit_identical_to_cpu(tiny_src, tiny_bf16, tmp_path):
    """The GPU route (the formula, on the device) writes the same shards as the CPU table route."""
    from quantbook.release.convert import MANIFEST, dequantize

    gpu = tmp_path / "gpu"
    dequantize(tiny_src, gpu, workers=2, device="cuda", progress=False)
    for p in sorted(tiny_bf16.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            assert (gpu / p.name).read_bytes() == p.read_bytes(), p.name
    codes = torch.arange(256, dtype=torch.uint8).repeat(128, 1)
    for k in range(0, 255, 2):
        s = torch.tensor([[k, k + 1]], dtype=torch.uint8)
        assert same_bits(_bits(dequant_fp8_formula(codes.cuda(), s.cuda()).cpu()), fp8_reference(codes.numpy(), s.numpy()))
