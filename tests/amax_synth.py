"""Synthetic amax snapshots with the quantizer names modelopt gives a transformers V4 model.

`make_snapshot(run_dir, like="pro")` writes `amax.safetensors` + `expert_token_counts.json` in
V4 Pro's shape (61 layers x 384 experts: ~48,000 quantizers) with plausible log-normal values,
and injects anomalies by name so tests can check each is reported. The per-layer module list
follows what modelopt 0.47 inserted on the tiny model (attention projections by compress ratio,
fused routed experts, shared experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from quantbook.amax import SNAPSHOT, TOKEN_COUNTS, save_snapshot
from quantbook.release.format import FLASH_CONFIG, PRO_CONFIG

ATTN = ["self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_proj", "self_attn.o_b_proj"]
COMPRESSOR = ["self_attn.compressor.kv_proj", "self_attn.compressor.gate_proj"]
INDEXER = ["self_attn.compressor.indexer.kv_proj", "self_attn.compressor.indexer.gate_proj",
           "self_attn.compressor.indexer.q_b_proj", "self_attn.compressor.indexer.scorer.weights_proj"]
SHARED = ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"]


def quantizer_names(layers: int, experts: int, ratios: list[int], native_w13: bool = False) -> list[str]:
    """Every enabled quantizer of a V4 model as modelopt names it (fused experts), or with
    separate native-named w1/w2/w3 expert quantizers when `native_w13`."""
    names = []
    for i in range(layers):
        p = f"model.layers.{i}."
        mods = ATTN + (COMPRESSOR if ratios[i] else []) + (INDEXER if ratios[i] == 4 else []) + SHARED
        for m in mods:
            names += [p + m + ".input_quantizer", p + m + ".weight_quantizer"]
        if native_w13:
            q = f"layers.{i}.ffn.experts."
            names += [q + f"{w}.input_quantizer" for w in ("w1", "w2", "w3")]
            names += [q + f"{e}.{w}.weight_quantizer" for e in range(experts) for w in ("w1", "w2", "w3")]
        else:
            q = p + "mlp.experts."
            names += [q + "gate_up_proj_input_quantizer", q + "down_proj_input_quantizer"]
            names += [q + f"gate_up_proj_weight_quantizers.{e}" for e in range(experts)]
            names += [q + f"down_proj_weight_quantizers.{e}" for e in range(experts)]
    return names


def make_snapshot(run_dir, like: str = "pro", layers: int | None = None, experts: int | None = None,
                  seed: int = 0, inject: dict | None = None, scale: float = 1.0, native_w13: bool = False,
                  list_quantizers: bool = True, hash_in_meta: bool = True,
                  meta_extra: dict | None = None) -> dict:
    """Write a snapshot and token counts into `run_dir`; returns facts for assertions.

    `inject` maps a category to quantizer names (or (layer, expert) pairs for 'never_routed',
    (layer, expert, factor) for 'w13'): missing, zero, nan, inf, negative, outlier (x50).
    `scale` multiplies every amax (a second run that 'moved').
    """
    cfg = json.loads(Path(PRO_CONFIG if like == "pro" else FLASH_CONFIG).read_text())
    layers = layers or cfg["num_hidden_layers"]
    experts = experts or cfg["n_routed_experts"]
    ratios = cfg["compress_ratios"][:layers]
    rng = np.random.default_rng(seed)
    names = quantizer_names(layers, experts, ratios, native_w13)
    inject = {k: list(v) for k, v in (inject or {}).items()}
    values = np.where([n.endswith("input_quantizer") for n in names],
                      rng.lognormal(np.log(4.0), 0.3, len(names)),
                      rng.lognormal(np.log(0.3), 0.15, len(names))) * scale
    amax = dict(zip(names, values))
    for n in inject.get("zero", []):
        amax[n] = 0.0
    for n in inject.get("nan", []):
        amax[n] = float("nan")
    for n in inject.get("inf", []):
        amax[n] = float("inf")
    for n in inject.get("negative", []):
        amax[n] = -abs(amax[n])
    for n in inject.get("outlier", []):
        amax[n] = amax[n] * 50
    for layer, expert, factor in inject.get("w13", []):
        amax[f"layers.{layer}.ffn.experts.{expert}.w3.weight_quantizer"] = \
            amax[f"layers.{layer}.ffn.experts.{expert}.w1.weight_quantizer"] * factor
    tensors = {f"{n}._amax": torch.tensor(v, dtype=torch.float32) for n, v in amax.items()
               if n not in set(inject.get("missing", []))}
    meta = {"model_type": "deepseek_v4", "n_routed_experts": experts}
    if hash_in_meta:
        meta["num_hash_layers"] = cfg["num_hash_layers"]
    if list_quantizers:
        meta["enabled_quantizers"] = names
    meta.update(meta_extra or {})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_snapshot(run_dir / SNAPSHOT, tensors, meta)
    counts = rng.integers(1, 4000, size=(layers, experts))
    for layer, expert in inject.get("never_routed", []):
        counts[layer, expert] = 0
    (run_dir / TOKEN_COUNTS).write_text(json.dumps({f"layers.{i}": counts[i].tolist() for i in range(layers)}))
    return {"names": names, "layers": layers, "experts": experts, "num_hash_layers": cfg["num_hash_layers"]}
