"""The routed experts' sorted calibration loop (calibrate.experts) against modelopt's own: the same
amax, bit for bit, and the same outputs, on experts routed unevenly (some never, some by every
token, rows in ragged batches). The whole chain's check is tests/test_streaming.py, which compares
the streaming driver (sorted by default) with the modelopt driver's whole-model calibration."""

import copy

import pytest
import requires

requires.importorskip("modelopt")


def _experts(seed: int, n: int = 12, hidden: int = 64, inter: int = 32):
    import torch
    from torch import nn
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    cfg = DeepseekV4Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n,
                           num_experts_per_tok=3, swiglu_limit=7.0)
    cfg._experts_implementation = "eager"
    g = torch.Generator().manual_seed(seed)
    host = nn.Module()
    host.mlp = nn.Module()
    host.mlp.experts = DeepseekV4Experts(cfg)
    e = host.mlp.experts
    with torch.no_grad():
        e.gate_up_proj.copy_(torch.randn(e.gate_up_proj.shape, generator=g) * 0.3)
        e.down_proj.copy_(torch.randn(e.down_proj.shape, generator=g) * 0.3)
    return host.to(torch.bfloat16), cfg


def _batches(seed: int, n: int, hidden: int = 64):
    """Inputs and routing: expert 0 never chosen, expert 1 by every token, the rest at random,
    with token counts that differ per batch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for tokens in (7, 33, 1, 20):
        x = (torch.randn(tokens, hidden, generator=g) * 3).to(torch.bfloat16)
        others = torch.stack([torch.randperm(n - 2, generator=g)[:2] + 2 for _ in range(tokens)])
        idx = torch.cat([torch.ones(tokens, 1, dtype=torch.long), others], dim=1)
        w = torch.rand(tokens, 3, generator=g).to(torch.bfloat16)
        out.append((x, idx, w))
    return out


def _calibrate(seed: int, sorted_loop: bool):
    import modelopt.torch.quantization as mtq
    import torch

    from quantbook.calibrate.experts import sorted_experts
    from quantbook.calibrate.state import snapshot_tensors

    host, cfg = _experts(seed)
    batches = _batches(seed, cfg.n_routed_experts)
    outputs = []

    def loop(model):
        outputs.clear()
        with torch.no_grad(), sorted_experts(model, sorted_loop):
            for x, idx, w in batches:
                outputs.append(model.mlp.experts(x, idx, w))

    quant_cfg = copy.deepcopy(mtq.NVFP4_EXPERTS_ONLY_CFG)
    quant_cfg["algorithm"] = {"method": "max", "distributed_sync": False}
    mtq.quantize(host, quant_cfg, forward_loop=loop)
    return snapshot_tensors(host), outputs


@pytest.mark.parametrize("seed", [0, 1])
def test_sorted_loop_gives_modelopts_amax_and_outputs_bit_for_bit(seed):
    got, got_out = _calibrate(seed, sorted_loop=True)
    want, want_out = _calibrate(seed, sorted_loop=False)
    assert sorted(got) == sorted(want)
    assert "mlp.experts.gate_up_proj_input_quantizer._amax" in want
    assert "mlp.experts.down_proj_input_quantizer._amax" in want
    assert len([k for k in want if "weight_quantizers" in k]) == 2 * 12  # every expert, routed or not
    assert [k for k in want if not (got[k].dtype == want[k].dtype and got[k].equal(want[k]))] == []
    assert all(a.equal(b) for a, b in zip(got_out, want_out)) and len(got_out) == 4


def test_outside_the_loop_the_modules_are_modelopts_again():
    """The replacement is an instance attribute, gone on exit (also after an error), and the input
    maxima go to the quantizers only on a clean exit."""
    import modelopt.torch.quantization as mtq
    import torch

    from quantbook.calibrate.experts import fused_experts, sorted_experts

    host, cfg = _experts(0)
    x, idx, w = _batches(0, cfg.n_routed_experts)[0]

    def failing(model):
        with pytest.raises(RuntimeError, match="stop"), torch.no_grad(), sorted_experts(model) as runs:
            assert len(runs) == 1 and "forward" in vars(runs[0].module)
            model.mlp.experts(x, idx, w)
            raise RuntimeError("stop")
        (e,) = fused_experts(model)
        assert "forward" not in vars(e) and e.gate_up_proj_input_quantizer._calibrator._calib_amax is None
        with torch.no_grad():
            model.mlp.experts(x, idx, w)  # modelopt's loop collects the inputs itself

    quant_cfg = copy.deepcopy(mtq.NVFP4_EXPERTS_ONLY_CFG)
    mtq.quantize(host, quant_cfg, forward_loop=failing)
    assert float(host.mlp.experts.gate_up_proj_input_quantizer.amax) == float(x.abs().max())
