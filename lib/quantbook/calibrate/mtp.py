"""DeepSeek V4's MTP block (`mtp.0.*`), calibrated the way V4 runs it.

transformers drops `mtp.*` on load, so no whole-model calibration ever reaches the MTP experts.
The MTP block is a full V4 decoder block (attention, hyper-connections, a score-routed MoE) plus
a step in front of it that joins what it predicts from: the main model's last hidden streams at
position t and the embedding of token t+1. As DeepSeek's reference runs it (and vLLM and SGLang
after it), for the hidden streams `h` [B, T, hc, H] of the last main layer (before the model's
`hc_head`) and the next tokens' embeddings `e` [B, T, H]:

    x = e_proj(enorm(e)) broadcast over the hc streams + h_proj(hnorm(h))
    x = the decoder block(x)                            (then hc_head and norm feed the shared head)

`mtp_layer_class()` is transformers' decoder layer with those modules added (named as in the
release, so its tensors map one to one). It is calibrated at layer index `num_hidden_layers`
under `model.layers.{n}`: the preset's `mtp.*` entry would disable every quantizer under a root
named `mtp`, and the name is what vLLM and transformers call an inlined MTP layer. Its quantizers
are then reported as `mtp.0.*` (`report_name`).

Calibration inputs (`MtpBatch`): position t pairs h_t with token t+1 for t < T-1; the last
position has no next token in a calibration sample (serving feeds the sampled one) and is dropped.
A position is real when both of its tokens are; mask, positions and rotary tables are built for
the T-1 positions as the model builds them for its layers.
"""

from __future__ import annotations

import functools

MTP_BLOCK = "mtp.0"
# the MTP block's own tensors (block-relative native name -> name in the MTP layer)
EXTRA_NAMES = {
    "e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale",
}


@functools.cache
def mtp_layer_class():
    """transformers' `DeepseekV4DecoderLayer` with the MTP block's join in front of it."""
    from torch import nn
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4DecoderLayer, DeepseekV4HyperHead, DeepseekV4RMSNorm,
    )

    class DeepseekV4MTPLayer(DeepseekV4DecoderLayer):
        """One MTP depth: join the main model's streams with the next tokens' embeddings, then the block."""

        def __init__(self, config, layer_idx: int):
            super().__init__(config, layer_idx)
            hidden = config.hidden_size
            self.enorm = DeepseekV4RMSNorm(hidden, eps=config.rms_norm_eps)
            self.hnorm = DeepseekV4RMSNorm(hidden, eps=config.rms_norm_eps)
            self.e_proj = nn.Linear(hidden, hidden, bias=False)
            self.h_proj = nn.Linear(hidden, hidden, bias=False)
            self.hc_head = DeepseekV4HyperHead(config)  # feeds the shared head; not used to calibrate
            self.norm = DeepseekV4RMSNorm(hidden, eps=config.rms_norm_eps)

        def forward(self, hidden_states, next_embeds=None, input_ids=None, **kwargs):
            if next_embeds is None:
                raise TypeError("the MTP layer needs next_embeds, the embeddings of the next tokens")
            joined = self.e_proj(self.enorm(next_embeds)).unsqueeze(2) + self.h_proj(self.hnorm(hidden_states))
            return super().forward(joined, input_ids=input_ids, **kwargs)

    return DeepseekV4MTPLayer


def host_path(num_hidden_layers: int) -> str:
    """Where the MTP layer sits in its host (see the module docstring)."""
    return f"model.layers.{num_hidden_layers}"


def report_name(name: str, num_hidden_layers: int) -> str:
    """A name under the host path -> the same under `mtp.0` (quantizers, token counts)."""
    for prefix in (host_path(num_hidden_layers), f"layers.{num_hidden_layers}"):
        if name == prefix or name.startswith(prefix + "."):
            return MTP_BLOCK + name[len(prefix):]
    return name


def mtp_inputs(last_streams, input_ids, attention_mask):
    """(streams [B, T-1, hc, H], next token ids [B, T-1], 2-D mask [B, T-1] or None) for one batch."""
    mask = None if attention_mask is None else attention_mask[:, :-1] * attention_mask[:, 1:]
    return last_streams[:, :-1].contiguous(), input_ids[:, 1:].contiguous(), mask
