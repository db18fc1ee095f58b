"""The runtime patches and the amax repair: bad amax never exported silently (tiny V4, CPU)."""

from __future__ import annotations

import warnings

import pytest

import requires
from quantize_support import tiny_q, write_calib

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)

STARVED = "model.layers.1.mlp.experts.down_proj_input_quantizer"  # sees no calibration data at all
INJECT = {  # quantizer -> (value written into its _amax after calibration, expected problem)
    "model.layers.0.mlp.experts.gate_up_proj_input_quantizer": (0.0, "zero"),
    "model.layers.1.mlp.experts.gate_up_proj_input_quantizer": (float("nan"), "nan"),
    "model.layers.2.mlp.experts.down_proj_input_quantizer": (float("inf"), "inf"),
    "model.layers.3.mlp.experts.down_proj_input_quantizer": (-1.0, "negative"),
}
NATIVE = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}


def test_version_gate(monkeypatch):
    from quantbook import errors
    from quantbook.calibrate import patches

    monkeypatch.setattr(patches, "modelopt_version", lambda: "0.46.1")
    with pytest.raises(errors.PatchError, match="0.46.1"):
        patches.apply()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert patches.apply(force=True) == list(patches.PATCHES)
    assert any("FORCED" in str(x.message) for x in w)


def test_apply_is_idempotent():
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from quantbook.calibrate import patches

    assert patches.apply() == list(patches.PATCHES)
    before = (TensorQuantizer.load_calib_amax, TensorQuantizer.export_amax,
              NVFP4QTensor.__dict__["get_activation_scaling_factor"])
    assert patches.apply() == list(patches.PATCHES)
    after = (TensorQuantizer.load_calib_amax, TensorQuantizer.export_amax,
             NVFP4QTensor.__dict__["get_activation_scaling_factor"])
    assert before == after
    # one layer of wrapping only
    assert not hasattr(TensorQuantizer.load_calib_amax.__wrapped__, patches._MARK)


def test_amax_problem():
    import torch

    from quantbook.amax import amax_problem as classify_amax

    assert classify_amax(None) == "missing"
    assert classify_amax(torch.tensor(3.0)) is None
    assert classify_amax(torch.tensor([1.0, 0.0])) == "zero"
    assert classify_amax(torch.tensor([1.0, float("nan")])) == "nan"
    assert classify_amax(torch.tensor(float("-inf"))) == "inf"
    assert classify_amax(torch.tensor(-2.0)) == "negative"
    # one element (the per-tensor amax) takes a shorter road to the same answers, whatever its dtype or shape
    for x in (torch.tensor(float("nan")), torch.tensor([[float("inf")]]), torch.tensor([-1.0]), torch.tensor(-0.0),
              torch.tensor(0.0, dtype=torch.bfloat16), torch.tensor([[2.5]], dtype=torch.float16), torch.empty(0)):
        many = x.reshape(-1).repeat(2)  # the same value twice: the general road
        assert classify_amax(x) == (classify_amax(many) if x.numel() else "missing"), x
    assert [classify_amax(torch.tensor(v)) for v in (float("nan"), float("inf"), -1.0, 0.0, 1e-30)] == \
        ["nan", "inf", "negative", "zero", None]


@pytest.fixture(scope="module")
def raw(tiny_bf16, tmp_path_factory):
    """A real calibration in which one quantizer sees no data, saved WITHOUT repair."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.utils.dataset_utils import create_forward_loop

    from quantbook.calibrate import hf_model, patches, settings, state

    patches.apply()
    base = tmp_path_factory.mktemp("patches")
    q = tiny_q(tiny_bf16, base / "unused", write_calib(base / "calib.jsonl"))
    s = settings.modelopt_settings(settings.normalize(q))
    model = hf_model.load_model(s)
    tok, _, _ = hf_model.load_tokenizer(s["pyt_ckpt_path"])
    inner = create_forward_loop(dataloader=hf_model.make_dataloader(s, tok, "cpu"))
    calls = []

    def loop(m):
        starved = m.get_submodule(STARVED)
        starved._calibrator.collect = lambda x: None  # like a module calibration never reaches
        original = starved.load_calib_amax
        starved.load_calib_amax = lambda *a, **k: (calls.append(a), original(*a, **k))[1]
        inner(m)

    moved = []  # every quantizer the patched load_calib_amax handed to move_amax_to_cpu (patch 1)
    spy = patches.move_amax_to_cpu
    patches.move_amax_to_cpu = lambda quantizer: (moved.append(quantizer), spy(quantizer))[1]
    try:
        model = mtq.quantize(model, hf_model.build_quant_cfg(s), forward_loop=loop)
    finally:
        patches.move_amax_to_cpu = spy
    starved = model.get_submodule(STARVED)
    assert starved.is_enabled and "_amax" not in starved._buffers and calls == []  # never loaded
    del starved._calibrator.collect, starved.load_calib_amax  # the test's instrumentation, not state
    amax = {n: qq._buffers["_amax"] for n, qq in state.iter_quantizers(model) if "_amax" in qq._buffers}
    assert {t.device.type for t in amax.values()} == {"cpu"}
    seen = {id(m) for m in moved}
    calibrated = {n for n, qq in state.iter_quantizers(model) if "_amax" in qq._buffers and id(qq) in seen}
    state.save_cheap_state(model, base / "raw-state", q=q, model_path=s["pyt_ckpt_path"])
    clean = {n: float(t) for n, t in amax.items() if n.endswith("input_quantizer")}
    return q, s, base / "raw-state", clean, {"with_amax": set(amax), "moved": calibrated}


def _restore_injected(s, raw_state):
    import torch

    from quantbook.calibrate import hf_model, state

    model = state.restore_into(hf_model.load_model(s), raw_state)
    for name, (value, _) in INJECT.items():
        qq = model.get_submodule(name)
        qq._buffers["_amax"] = torch.full_like(qq._buffers["_amax"], value)
    assert "_amax" not in model.get_submodule(STARVED)._buffers
    tok, side, pad = hf_model.load_tokenizer(s["pyt_ckpt_path"])
    return model, tok, side, pad


def _scales(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.endswith("input_scale")}


def _keys(quantizer: str, experts: int = 8) -> list[str]:
    layer = quantizer.split(".")[2]
    proj = "gate_up_proj" if "gate_up_proj" in quantizer else "down_proj"
    return [f"model.layers.{layer}.ffn.experts.{j}.{w}.input_scale" for j in range(experts) for w in NATIVE[proj]]


def test_hook_repairs_every_bad_amax_and_lists_it(raw, tmp_path):
    """missing (no data), 0, NaN, inf, negative: each replaced by the largest calibrated amax of
    the same projection in other layers, listed by quantizer name, and exported finite."""
    import torch

    from quantbook import amax
    from quantbook.calibrate import hf_model, patches, state

    q, s, raw_state, clean, _ = raw
    ledger = patches.Ledger()
    model, tok, side, pad = _restore_injected(s, raw_state)
    rec = state.post_calibration(model, tmp_path / "run", q, ledger, model_path=s["pyt_ckpt_path"], progress=False)
    out = tmp_path / "export"
    hf_model.export_model(model, tok, s, out, side, pad)

    gate_up = max(clean[f"model.layers.{i}.mlp.experts.gate_up_proj_input_quantizer"] for i in (2, 3))
    down = clean["model.layers.0.mlp.experts.down_proj_input_quantizer"]
    want = {n: (p, gate_up if "gate_up" in n else down) for n, (_, p) in INJECT.items()}
    want[STARVED] = ("missing", down)
    got = {r["quantizer"]: (r["problem"], r["replacement"]) for r in rec["amax_repairs"]}
    assert got == want
    assert {r["quantizer"] for r in ledger.report()} == set(want)
    assert set(rec["amax_problems_before_repair"]) == set(want)

    scales = _scales(out)
    for name, (_, value) in want.items():
        expect = torch.tensor(value, dtype=torch.float32) / (6.0 * 448.0)
        for k in _keys(name):
            assert scales[k].equal(expect), (k, scales[k], expect)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in scales.values())

    # the snapshot keeps the raw values (NaN stays NaN, the starved quantizer has none) ...
    snap, _ = amax.load_snapshot(tmp_path / "run" / amax.SNAPSHOT)
    assert torch.isnan(snap["model.layers.1.mlp.experts.gate_up_proj_input_quantizer._amax"]).all()
    assert STARVED + "._amax" not in snap
    # ... and the saved state the repaired ones, so a recovery export writes the same scales
    restored = state.restore_into(hf_model.load_model(s), tmp_path / "run" / state.STATE_DIR)
    assert float(restored.get_submodule(STARVED)._amax) == down
    assert state.validate_amax(restored)["problems"] == {}


def test_export_guard_without_repair(raw, tmp_path):
    """Without the hook, patch 3 still replaces 0/NaN/inf/negative at export time and lists
    them; a quantizer with NO amax gets no input_scale at all (why the hook must run)."""
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from quantbook.calibrate import hf_model, patches

    q, s, raw_state, clean, _ = raw
    model, tok, side, pad = _restore_injected(s, raw_state)
    ledger = patches.Ledger()  # names only, no fallback set: modelopt's maxbound, recorded as such
    ledger.attach(model)

    neg = model.get_submodule("model.layers.3.mlp.experts.down_proj_input_quantizer")
    with pytest.raises(AssertionError, match="not positive"):  # unpatched modelopt aborts the export
        NVFP4QTensor.get_activation_scaling_factor.__func__.__wrapped__(NVFP4QTensor, neg)

    out = tmp_path / "export"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hf_model.export_model(model, tok, s, out, side, pad)
    report = {r["quantizer"]: r for r in ledger.report()}
    assert set(report) == set(INJECT)
    for name, (_, problem) in INJECT.items():
        assert report[name]["problem"] == problem and report[name]["seen_in"] == ["export input_scale"]
        assert report[name]["replacement"] == 6.0 and "maxbound" in report[name]["fallback"]
        assert any(name in str(x.message) for x in w)
    scales = _scales(out)
    for name in INJECT:
        for k in _keys(name):
            assert scales[k].equal(torch.tensor(6.0) / (6.0 * 448.0)), k
    assert not any(k in scales for k in _keys(STARVED))  # modelopt writes no input_scale: silently


def test_patch_1_moves_every_calibrated_amax_to_cpu_as_it_is_written(raw):
    """Item 15, on CPU where it can fail: the predecessor's run 2 died exporting amax left on a GPU. Every
    quantizer that got an amax in a real calibration went through the patched load_calib_amax into
    move_amax_to_cpu (the spy in the fixture), and that function moves a tensor off any device but
    the CPU (a stand-in for a CUDA tensor: this machine has none). The CUDA run itself is
    test_cuda_calibration_leaves_amax_on_cpu."""
    import torch

    from quantbook.calibrate import patches

    *_, seen = raw
    assert seen["with_amax"] and seen["moved"] == seen["with_amax"]

    class OnGpu:  # what move_amax_to_cpu reads of a tensor: device, is_meta, detach().to()
        is_meta = False
        device = torch.device("cuda", 0)

        def __init__(self, value):
            self.value = value

        def detach(self):
            return self

        def to(self, device):
            return self.value.to(device)

    class Quantizer:
        def __init__(self):
            self._buffers = {"_amax": OnGpu(torch.tensor(3.0)), "_global_amax": OnGpu(torch.tensor([2.0])),
                             "_pre_quant_scale": None}

    qq = Quantizer()
    patches.move_amax_to_cpu(qq)
    assert isinstance(qq._buffers["_amax"], torch.Tensor) and qq._buffers["_amax"].device.type == "cpu"
    assert float(qq._buffers["_amax"]) == 3.0 and qq._buffers["_global_amax"].device.type == "cpu"
    assert qq._buffers["_pre_quant_scale"] is None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs CUDA: calibrated amax moved off the GPU as soon as written")
def test_cuda_calibration_leaves_amax_on_cpu(tiny_bf16, tmp_path):
    """On a GPU: every calibrated amax is on CPU when mtq.quantize returns (patch 1), a quantized
    forward still runs, and the export from CPU amax + GPU weights has finite positive scales."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.utils.dataset_utils import create_forward_loop

    from quantbook.calibrate import hf_model, patches, settings, state

    patches.apply()
    q = tiny_q(tiny_bf16, tmp_path / "export", write_calib(tmp_path / "calib.jsonl"), hf_ptq={"device": "cuda"})
    s = settings.modelopt_settings(settings.normalize(q))
    model = hf_model.load_model(s)
    assert next(model.parameters()).is_cuda
    tok, side, pad = hf_model.load_tokenizer(s["pyt_ckpt_path"])
    dl = hf_model.make_dataloader(s, tok, hf_model.model_device(model))
    model = mtq.quantize(model, hf_model.build_quant_cfg(s), forward_loop=create_forward_loop(dataloader=dl))
    devices = {qq._buffers["_amax"].device.type for _, qq in state.iter_quantizers(model) if "_amax" in qq._buffers}
    assert devices == {"cpu"}
    with torch.no_grad():
        model(next(iter(dl))["input_ids"], use_cache=False)
    hf_model.export_model(model, tok, s, tmp_path / "export", side, pad)
    from safetensors.torch import load_file

    scales = {k: v for k, v in load_file(str(tmp_path / "export" / "model.safetensors")).items()
              if k.endswith(("input_scale", "weight_scale_2"))}
    assert scales and all(torch.isfinite(v).all() and (v > 0).all() for v in scales.values())
