"""A full-size v4-serving export as sparse files, with the release it came from, for the export view.

`make_sparse_export(root, like="pro")` writes `root/release` (the release's real shards and headers,
data as holes, `release.sparse`) and `root/export`: the same shard groups with every main-layer
routed expert projection replaced by its four NVFP4 tensors (`export.layout.expert_entries`), an
index, the serving config and a `quantbook-layout.json` naming the release and the cast option.
Filled with plausible values: every `weight_scale_2` and `input_scale` (a few bytes each), and for
the experts in `block_experts` of `layer`, the release's E8M0 `.scale` and the export's E4M3
`weight_scale` as the lossless cast makes them, with `wide` blocks 20 binades below the rest
(re-quantized by construction). Everything else reads as zeros. Anomalies are injected by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from quantbook.export.layout import MANIFEST, expert_entries, serving_config
from quantbook.release.format import PROJS, TensorSpec, expert_name, load_config, named_config, shard_groups, shard_name
from quantbook.release.shards import INDEX_NAME
from quantbook.release.sparse import write_sparse_release, write_sparse_shard


def export_groups(config: dict) -> list[list[TensorSpec]]:
    """The release's shard groups, each main-layer expert projection's weight + scale replaced by its
    four v4-serving tensors."""
    groups = []
    for group in shard_groups(config):
        out = []
        for s in group:
            x = expert_name(s.name)
            if x is None or x.mtp:
                out.append(s)
            elif x.tensor == "weight":
                out += [TensorSpec(n, d, tuple(sh), "plain") for n, d, sh in
                        expert_entries(x.prefix, (s.shape[0], s.shape[1] * 2))]
        groups.append(out)
    return groups


def _exponents(rng, shape, wide: int) -> np.ndarray:
    """E8M0 exponents k of one projection's 32-blocks: within 5 binades of the top, the first `wide`
    blocks of row 0 20 binades below it."""
    top = int(rng.integers(-12, -6))
    k = top - rng.integers(0, 6, size=shape)
    k.flat[0] = top
    k[0, 1:1 + wide] = top - 20
    return k


def make_sparse_export(root: str | Path, like: str = "pro", layer: int = 1, block_experts=(0, 7), wide: int = 3,
                       seed: int = 0, inject: dict | None = None) -> dict:
    """Write the release and the export under `root`; return their paths and what was injected.

    inject: {"outlier": [(layer, expert, proj, scale, factor)], "zero": [tensor], "missing": [tensor],
    "w13": [(layer, expert)]} (w13: w3's weight_scale_2 1.5x w1's)."""
    inject = inject or {}
    root = Path(root)
    config = load_config(named_config(like))
    L, E = config["num_hidden_layers"], config["n_routed_experts"]
    rng = np.random.default_rng(seed)
    k = {}  # (expert, proj) -> exponents of the filled experts' 32-blocks
    for e in block_experts:
        for p in PROJS:
            rows, cols = (config["hidden_size"], config["moe_intermediate_size"]) if p == "w2" else \
                (config["moe_intermediate_size"], config["hidden_size"])
            k[e, p] = _exponents(rng, (rows, cols // 32), wide if p == "w3" else 0)
    release = write_sparse_release(config, root / "release", fill=lambda s: _release_bytes(s, layer, k))

    values = {}
    in_scale = np.exp(rng.normal(-6.0, 0.3, size=(L, 2)))  # one per layer and w1/w3 | w2, as modelopt's shared input
    for i in range(L):
        for e in range(E):
            w13 = 2.0 ** float(rng.integers(-14, -9))
            w2 = 2.0 ** float(rng.integers(-14, -9))
            if i == layer and e in block_experts:  # the cast's 2^(k_max - 8): w1/w3 share k_max
                w13 = 2.0 ** (max(int(k[e, "w1"].max()), int(k[e, "w3"].max())) - 8)
                w2 = 2.0 ** (int(k[e, "w2"].max()) - 8)
            for p in PROJS:
                pre = f"layers.{i}.ffn.experts.{e}.{p}"
                values[f"{pre}.weight_scale_2"] = w2 if p == "w2" else w13
                values[f"{pre}.input_scale"] = float(in_scale[i, int(p == "w2")])
    for i, e, p, s, factor in inject.get("outlier", []):
        values[f"layers.{i}.ffn.experts.{e}.{p}.{s}"] *= factor
    for name in inject.get("zero", []):
        values[name] = 0.0
    for i, e in inject.get("w13", []):
        values[f"layers.{i}.ffn.experts.{e}.w3.weight_scale_2"] *= 1.5
    dropped = set(inject.get("missing", []))

    def fill(s: TensorSpec):
        if s.name in values:
            return np.float32(values[s.name]).tobytes()
        x = expert_name(s.name)
        if x is not None and x.tensor == "weight_scale" and x.layer == layer and (x.expert, x.proj) in k:
            group = ("w1", "w3") if x.proj != "w2" else ("w2",)
            k_max = max(int(k[x.expert, q].max()) for q in group)
            scale = torch.exp2(torch.from_numpy(k[x.expert, x.proj] - (k_max - 8)).float().clamp(min=-9))
            return scale.repeat_interleave(2, dim=1).to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
        return None

    out = root / "export"
    out.mkdir(parents=True)
    groups = [[s for s in g if s.name not in dropped] for g in export_groups(config)]
    weight_map = {}
    for n, group in enumerate(groups, start=1):
        name = shard_name(n, len(groups))
        write_sparse_shard(out / name, group, fill, metadata={"format": "pt"})
        weight_map.update({s.name: name for s in group})
    total = sum(s.nbytes for g in groups for s in g)
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(serving_config(config)))
    (out / MANIFEST).write_text(json.dumps({
        "kind": "quantbook.layout", "layout": "v4-serving", "source": str(release), "complete": True,
        "options": {"layout": "v4-serving", "layout_version": 1, "cast_mxfp4_to_nvfp4": True}, "report": {}}))
    requantized = {f"layers.{layer}.ffn.experts.{e}.{p}": wide if p == "w3" else 0 for e, p in k}
    return {"release": release, "export": out, "layer": layer, "block_experts": tuple(block_experts),
            "requantized": requantized, "values": values, "dropped": dropped}


def _release_bytes(s: TensorSpec, layer: int, k: dict) -> bytes | None:
    x = expert_name(s.name)
    if x is None or x.tensor != "scale" or x.mtp or x.layer != layer or (x.expert, x.proj) not in k:
        return None
    return (k[x.expert, x.proj] + 127).astype(np.uint8).tobytes()
