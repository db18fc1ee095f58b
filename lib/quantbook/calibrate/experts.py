"""The routed experts' calibration forward, without modelopt's calls per expert.

modelopt wraps transformers' fused experts (`_QuantFusedExperts`) and intercepts every `F.linear`
of the eager loop: per expert and batch, both projections' input quantizers and weight quantizers
collect a max, each collection three host syncs (modelopt's NaN/sign/inf checks) and the weight
quantizer a full read of the expert's weights again. transformers' loop adds two host syncs per
expert (`torch.where`, the sentinel test). On V4 Pro (384 experts) that is most of a block's
calibration time.

`SortedExperts` runs the same computation with one host sync per forward:

    order       the (k, token) positions sorted by expert, stably: each expert's rows in the order
                transformers' `torch.where(mask[e])` gives them (k first, then token); the rows, their
                tokens and routing weights gathered once in that order
    per expert  its slice: the same `F.linear` calls on the same rows, the same gate, the same weighting
                and the same `index_add_`, in ascending expert order: the same output bits
    amax        max |x| of each projection's inputs (the gate_up input over every routed row at once, the
                down input per expert), kept on the device (a max is exact whatever the grouping) and
                handed to the shared input quantizers once, when the forward loop ends

The weight quantizers need nothing from the forward: modelopt's `max_calibrate` calibrates every
expert's weights from the weights themselves before the forward loop, and a weight collected again
gives the same max. So the amax are modelopt's own, bit for bit (tests/test_calib_experts.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

def _amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as modelopt's `reduce_amax` takes it (max and min, then their magnitudes), in x's dtype."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi.abs(), lo.abs())


class SortedExperts:
    """One fused-experts module's calibration forward (`forward`) and the input maxima it saw."""

    def __init__(self, module):
        self.module = module
        self.gate_up_max: torch.Tensor | None = None
        self.down_max: torch.Tensor | None = None

    def _keep(self, name: str, m: torch.Tensor) -> None:
        held = getattr(self, name)
        setattr(self, name, m if held is None else torch.maximum(held, m))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager `DeepseekV4Experts.forward`, computed the same way, syncing once.

        Every routed row, its token and its weight are gathered once, in expert order; each expert
        then takes its slice (rows in torch.where's order: the same matrices, the same GEMMs)."""
        e = self.module
        n, tokens = e.num_experts, top_k_index.shape[0]
        final = torch.zeros_like(hidden_states)
        flat = top_k_index.t().reshape(-1)  # position p = k * tokens + token: torch.where's order
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n + 1).tolist()
        routed = sum(counts[:n])
        order = order[:routed]  # the sentinel expert n (if any) sorts last
        token_idx = order % tokens
        weights = top_k_weights.t().reshape(-1)[order]  # top_k_weights[token, k] of each row
        rows = hidden_states[token_idx]
        if routed:
            self._keep("gate_up_max", _amax(rows))
        lows = torch.zeros(n, dtype=hidden_states.dtype, device=hidden_states.device)  # 0: an expert not hit
        highs = torch.zeros_like(lows)
        start = 0
        for expert, c in enumerate(counts[:n]):
            if not c:
                continue
            end = start + c
            h = e._apply_gate(F.linear(rows[start:end], e.gate_up_proj[expert]))
            torch.aminmax(h, out=(lows[expert], highs[expert]))
            h = F.linear(h, e.down_proj[expert]) * weights[start:end, None]
            final.index_add_(0, token_idx[start:end], h.to(final.dtype))
            start = end
        if routed:
            self._keep("down_max", torch.maximum(highs.abs().max(), lows.abs().max()))
        return final

    def hand_over(self) -> None:
        """Give the maxima to the module's shared input quantizers (modelopt's collection: its checks
        run once here) and forget them."""
        e = self.module
        for quantizer, m in ((e.gate_up_proj_input_quantizer, self.gate_up_max),
                             (e.down_proj_input_quantizer, self.down_max)):
            if m is not None:
                quantizer.collect(m)
        self.gate_up_max = self.down_max = None


def fused_experts(model) -> list:
    """modelopt's wrapped fused-experts modules in `model`."""
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    return [m for m in model.modules() if isinstance(m, _QuantFusedExperts)]


@contextmanager
def sorted_experts(model, enabled: bool = True):
    """Inside: every wrapped fused-experts module of `model` runs `SortedExperts.forward`; on a
    clean exit the maxima go to the quantizers. Use it inside modelopt's forward loop (quantizers in
    calibration mode). Not enabled: modelopt's own loop, unchanged."""
    if not enabled:
        yield []
        return
    runs = [SortedExperts(m) for m in fused_experts(model)]
    for r in runs:
        r.module.forward = r.forward  # an instance attribute: the class's forward comes back on delete
    try:
        yield runs
    finally:
        for r in runs:
            del r.module.forward
    for r in runs:
        r.hand_over()


__all__ = ["SortedExperts", "fused_experts", "sorted_experts"]
