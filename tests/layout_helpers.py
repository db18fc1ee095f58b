"""Shared pieces of the serving-layout, verifier and recovery tests: calibrating the tiny V4 with
modelopt, amax snapshots in both naming schemes, and byte comparisons of checkpoint directories."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from quantbook.release.shards import Checkpoint
from quantbook.export.layout import release_expert_bf16


def calib_batches(seed: int = 0, n: int = 2, batch: int = 2, seq: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 1024, (batch, seq), generator=gen) for _ in range(n)]


def calibrate_tiny(bf16: Path, cfg_name: str = "NVFP4_EXPERTS_ONLY_CFG", seed: int = 0):
    """The tiny BF16 model max-calibrated by modelopt (CPU, no KV cache)."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    model.eval()
    batches = calib_batches(seed)

    def loop(m):
        with torch.no_grad():
            for b in batches:
                m(b, use_cache=False)

    return mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), loop)


def model_snapshot(model) -> dict:
    """The amax snapshot step 02 writes (quantbook.state.snapshot_tensors), as a dict."""
    from quantbook.calibrate.state import snapshot_tensors

    return snapshot_tensors(model)


def native_snapshot(src: Path, input_base: float = 3.0) -> dict:
    """A calibration-free snapshot with native quantizer names, as a streaming driver would write:
    per-expert weight amax = max |w| of the released w1/w3 (fused) and w2, one input amax per
    layer and projection (different per layer)."""
    from quantbook.release.format import load_config

    cfg = load_config(src)
    ck = Checkpoint(src)
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        for proj, k in (("w1", 1.0), ("w2", 2.0), ("w3", 1.0)):
            out[f"layers.{i}.ffn.experts.{proj}.input_quantizer._amax"] = torch.tensor(input_base * k * (1 + i / 8))
        for j in range(cfg["n_routed_experts"]):
            p = f"layers.{i}.ffn.experts.{j}"
            w13 = torch.maximum(release_expert_bf16(ck, f"{p}.w1").abs().amax(),
                                release_expert_bf16(ck, f"{p}.w3").abs().amax()).float()
            out[f"{p}.w1.weight_quantizer._amax"] = w13
            out[f"{p}.w3.weight_quantizer._amax"] = w13
            out[f"{p}.w2.weight_quantizer._amax"] = release_expert_bf16(ck, f"{p}.w2").abs().amax().float()
    return out


def to_native_names(snapshot: dict) -> dict:
    """modelopt's fused-expert quantizer names -> native ones (same values)."""
    from quantbook.amax import parse_quantizer, split_key

    out = {}
    for key, v in snapshot.items():
        qname, attr = split_key(key)
        q = parse_quantizer(qname)
        if q.kind != "routed_expert" or attr != "_amax":
            continue
        for proj in q.projs:
            if q.role == "weight":
                out[f"layers.{q.layer}.ffn.experts.{q.expert}.{proj}.weight_quantizer._amax"] = v
            elif q.role == "input":
                out[f"layers.{q.layer}.ffn.experts.{proj}.input_quantizer._amax"] = v
    return out


def raw_bytes(ck: Checkpoint, name: str) -> bytes:
    return bytes(ck.raw(name))


def files(d: Path, exclude: tuple = ()) -> dict[str, bytes]:
    """Every file under `d` (relative path -> bytes), minus `exclude` names."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*"))
            if p.is_file() and p.name not in exclude}


def gate_numbers(path: Path) -> dict:
    """A fidelity gate record's measurements (`eval.json`, `eval-02.json`): the numbers and every
    block's row without its timing: what must be equal between two routes to the same gate."""
    import json

    r = json.loads(Path(path).read_text())
    return {"numbers": r["numbers"], "mtp_form": r["mtp_form"], "tokens": r["tokens"],
            "blocks": [{k: v for k, v in row.items() if k != "timing"} for row in r["blocks"]]}
