#!/usr/bin/env python
"""Train the tiny DeepSeek V4 (and its MTP block) on the calibration text; write it in the released format.

The project's embedded default checkpoint used to be random weights (`quantbook make-tiny`), so
perplexity or KL divergence against it meant nothing. This script trains that very architecture,
`quantbook.release.tiny.tiny_config(Flash config, layers=4)` (hidden 256, 4 layers, 8 routed experts
top-2, vocab 1024 with a byte-level tokenizer), as transformers 5.23's `DeepseekV4ForCausalLM` with
eager attention and eager experts (`quantbook.calibrate.blocks.hf_config`), together with the MTP
block (`quantbook.calibrate.mtp.mtp_layer_class()` at layer index 4, fed as the streaming driver
feeds it: the last layer's hidden streams at t and the embedding of token t+1; it predicts t+2).

Data: `work/calib/english.jsonl` only (the held-out sibling `english-heldout.jsonl`, every 8th
sample, is never trained on; it gives the numbers). Each sample is BOS + its UTF-8 bytes; batches
are random windows of seq+1 tokens of the concatenated stream (a seeded generator).

Loss: cross entropy of the next token + `--mtp-weight` x that of the MTP's token t+2. Routers of
the score-routed layers are balanced without an auxiliary loss, DeepSeek-V3 style: after each step
the router bias (`gate.bias` in the release) moves by `--bias-rate` towards the mean load. The hash
layers route by a fixed random `tid2eid` table (distinct experts per token), as `make-tiny` does.

Quantization-aware training for the last `--qat-frac` of the steps: the forward sees every weight
as the release stores it (straight-through estimator): routed experts as MXFP4 (E2M1 codes, a
power-of-two scale per 32 inputs, exactly `quantize_fp4_pow2`), the FP8 weights as E4M3 with a
power-of-two scale per 128x128 block (`quantize_fp8_pow2`), and the BF16 tensors rounded to BF16.
The release then holds exactly the weights the last steps trained with.

Output (`--out`): the checkpoint in the released format (`tiny.write_checkpoint` with the trained
tensors), and `--record` (TRAINING.json): command line, seed, steps, shapes, wall time, losses,
held-out perplexity of the release (its exact dequantization loaded by transformers, BF16 forward)
and of a random `make-tiny` release, the MTP's top-1 accuracy, versions, sha256 of every file.

Time: the committed release (the defaults: 800 steps of batch 4 x seq 128, fake quant from step
600, 1 thread) trained in 1,280 s (21 minutes) on 2 CPU cores shared with other jobs (load 4-7),
about 1.5 s a step; evaluating the whole held-out text (1,162 windows) takes ~3.5 minutes per
model, three times (the trained model, the written release, a random tiny): ~39 minutes in all.
One intra-op thread, not two: on shared cores two threads made every step 5-10x slower (OpenMP
threads waiting on each other while the other core is busy).

Determinism: seeded (`--seed`: init, tid2eid, batches), `torch.use_deterministic_algorithms(True)`,
a fixed thread count. Bit-reproducibility holds only on the same machine type and torch build
with the same thread count: `--repro-check 20` first trains 20 steps twice (fake quant from step
10) and requires identical losses bit for bit; it passed in the run that wrote the release.

    .venv/bin/python scripts/train_tiny.py --repro-check 20 --out lib/quantbook/release/trained/DeepSeek-V4-tiny \\
        --record lib/quantbook/release/trained/TRAINING.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", default="work/calib/english.jsonl", help="training text (JSONL, `text` lines)")
    ap.add_argument("--heldout", default=None, help="evaluation text (default: the calib file's -heldout sibling)")
    ap.add_argument("--out", default=None, help="write the trained release here (a new or empty directory)")
    ap.add_argument("--record", default=None, help="write TRAINING.json here (with --out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: see the docstring)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05, help="cosine decay down to this fraction of --lr")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="router bias update per step (aux-loss-free)")
    ap.add_argument("--qat-frac", type=float, default=0.25, help="last fraction of the steps trained with fake quant")
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows, evenly spread (0: all)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--repro-check", type=int, default=0,
                    help="first train this many steps twice and require equal losses (alone: then stop)")
    ap.add_argument("--time-steps", type=int, default=0, help="time this many steps (the QAT ones too) and stop")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------ set-up

def deterministic(seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a second run in the same process)
        pass
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)


def raw_config() -> dict:
    from quantbook.release.format import FLASH_CONFIG, load_config
    from quantbook.release.tiny import tiny_config

    return tiny_config(load_config(FLASH_CONFIG), layers=4)


def byte_tokenizer(vocab_size: int):
    """The release's tokenizer (`tiny.write_tokenizer`), loaded with `tokenizers`."""
    from tokenizers import Tokenizer

    from quantbook.release.tiny import write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d), vocab_size)
        return Tokenizer.from_file(str(Path(d) / "tokenizer.json"))


def read_texts(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def encode(tok, text: str, bos: int) -> list[int]:
    return [bos] + tok.encode(text).ids


def heldout_windows(tok, texts: list[str], seq: int, bos: int, limit: int = 0):
    """[N, seq+1] token windows: each held-out sample (BOS + bytes) cut into consecutive windows
    of seq+1 tokens that overlap by one (every token after a window's first is predicted once)."""
    import torch

    out = []
    for text in texts:
        ids = encode(tok, text, bos)
        for start in range(0, len(ids) - seq, seq):
            out.append(ids[start: start + seq + 1])
    w = torch.tensor(out, dtype=torch.long)
    if limit and limit < w.shape[0]:  # evenly over the whole held-out text, not its first samples
        w = w[torch.linspace(0, w.shape[0] - 1, limit).round().long()]
    return w


# ------------------------------------------------------------------------------------------ model

def hf_config(raw: dict, layers: int | None = None):
    """`blocks.hf_config` of a copy: transformers' config standardization writes into the nested
    `rope_scaling` dict it is given, and `raw` is what the release's config.json is written from."""
    import copy

    from quantbook.calibrate import blocks

    return blocks.hf_config(copy.deepcopy(raw), layers=layers)


class Tiny:
    """The main model (`DeepseekV4ForCausalLM`) and the MTP layer, run block by block as the
    streaming driver runs them (so the MTP sees the last layer's streams before `hc_head`)."""

    def __init__(self, raw: dict, model, mtp_layer):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        from quantbook.calibrate import blocks

        self.raw = raw
        self.n = raw["num_hidden_layers"]
        self.cfg = hf_config(raw)
        self.mcfg = hf_config(raw, layers=self.n + 1)
        self.model, self.mtp = model, mtp_layer
        self.rotary = DeepseekV4RotaryEmbedding(self.cfg)

    @classmethod
    def fresh(cls, raw: dict, seed: int) -> "Tiny":
        import torch
        from transformers import DeepseekV4ForCausalLM

        from quantbook.calibrate import blocks, mtp

        torch.manual_seed(seed)
        cfg = hf_config(raw)
        model = DeepseekV4ForCausalLM(cfg).float()
        n = raw["num_hidden_layers"]
        layer = mtp.mtp_layer_class()(hf_config(raw, layers=n + 1), n).float()
        for m in layer.modules():  # transformers' own initialization rules, applied to the MTP layer
            model._init_weights(m)
        gen = torch.Generator().manual_seed(seed + 1)
        for i in range(raw["num_hash_layers"]):  # distinct experts per token, as make-tiny draws them
            t = model.model.layers[i].mlp.gate.tid2eid
            t.copy_(torch.rand(t.shape[0], raw["n_routed_experts"], generator=gen).argsort(dim=1)[:, : t.shape[1]])
        return cls(raw, model, layer)

    def modules(self):
        return [self.model, self.mtp]

    def train(self, on: bool = True):
        for m in self.modules():
            m.train(on)

    def parameters(self):
        return [p for m in self.modules() for p in m.parameters()]

    def forward(self, ids, mtp_too: bool = True):
        """ids [B, T+1] -> (logits [B, T, V] for tokens 1..T, MTP logits [B, T-1, V] for tokens 2..T)."""
        from quantbook.calibrate import blocks, mtp

        x = ids[:, :-1]
        lm = self.model.model
        embeds = lm.embed_tokens(x)
        h = blocks.first_streams(self.cfg, embeds)
        kwargs = blocks.layer_kwargs(self.cfg, self.rotary, x, None, embeds)
        for layer in lm.layers:
            h = layer(h, **kwargs)
        logits = self.model.lm_head(lm.norm(lm.hc_head(h)))
        if not mtp_too:
            return logits, None
        streams, next_ids, _ = mtp.mtp_inputs(h, x, None)
        next_embeds = embeds[:, 1:]
        mkw = {**blocks.layer_kwargs(self.mcfg, self.rotary, next_ids, None, next_embeds), "next_embeds": next_embeds}
        out = self.mtp(streams, **mkw)
        return logits, self.model.lm_head(self.mtp.norm(self.mtp.hc_head(out)))


# ------------------------------------------------------------------------------------------ names

def native_targets(tiny: Tiny) -> dict:
    """Every native tensor name of the release -> (the trained tensor holding it, row slice or None).

    Block tensors by transformers' own renaming (`blocks.hf_name`, the MTP's own modules by
    `mtp.EXTRA_NAMES`); routed experts are rows of the fused `gate_up_proj[j] = [w1; w3]` and
    `down_proj[j] = w2`; top-level names as transformers' deepseek_v4 conversion renames them."""
    from transformers.core_model_loading import rename_source_key

    from quantbook.calibrate import blocks, mtp
    from quantbook.calibrate.blocks import _transformers_rules
    from quantbook.release.format import expected_tensors, expert_name, split_block

    raw, inter = tiny.raw, tiny.raw["moe_intermediate_size"]
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
           "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
    renamings, converters, _ = _transformers_rules()
    for native, hf in top.items():  # the same as transformers' loader would do
        renamed, _ = rename_source_key(native, renamings, converters)
        assert hf in (renamed, f"model.{renamed}"), (native, renamed, hf)
    state = {**tiny.model.state_dict(keep_vars=True),  # model.* and lm_head.weight
             **{f"mtp.{k}": v for k, v in tiny.mtp.state_dict(keep_vars=True).items()}}
    out = {}
    for native, spec in expected_tensors(raw).items():
        if spec.kind == "scale":
            continue
        block, index, _ = split_block(native)
        x = expert_name(native)
        if block is None:
            key = top[native]
        elif x is not None:
            owner = f"model.layers.{index}" if block == "layers" else "mtp"
            if x.proj == "w2":
                out[native] = (state[f"{owner}.mlp.experts.down_proj"], (x.expert, slice(None)))
            else:
                rows = slice(0, inter) if x.proj == "w1" else slice(inter, 2 * inter)
                out[native] = (state[f"{owner}.mlp.experts.gate_up_proj"], (x.expert, rows))
            continue
        elif block == "layers":
            key = f"model.layers.{index}.{blocks.hf_name(native)}"
        else:
            key = f"mtp.{blocks.hf_name(native, mtp.EXTRA_NAMES)}"
        out[native] = (state[key], None)
    used = {id(t) for t, _ in out.values()}
    left = [k for k, v in state.items() if id(v) not in used and "rotary" not in k and "inv_freq" not in k]
    assert not left, f"trained tensors the release would not hold: {left}"
    return out


def native_tensor(target) -> "torch.Tensor":
    t, rows = target
    t = t.detach()
    return t if rows is None else t[rows]


# ------------------------------------------------------------------------------------------ QAT

def fake_fp8(w):
    """What the release stores for an FP8 weight, back in fp32 (exactly `quantize_fp8_pow2`)."""
    import torch

    from quantbook.release.dequant import dequant_fp8_formula
    from quantbook.release.tiny import quantize_fp8_pow2

    codes, scale = quantize_fp8_pow2(w.detach().float())
    return dequant_fp8_formula(codes, scale).to(torch.float32)


E2M1_MAGS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fake_fp4(w):
    """What the release stores for routed experts, back in fp32: rows of 32-input groups with a
    power-of-two scale `2^ceil(log2(amax/6))`, each value rounded to the nearest E2M1 magnitude,
    ties to the smaller (as `quantize_fp4_pow2`'s argmin picks them; the export checks equality)."""
    import torch

    from quantbook.release.format import FP4_GROUP
    from quantbook.release.tiny import _pow2_exponent

    w = w.detach().float()
    shape = w.shape
    g = w.reshape(-1, shape[-1] // FP4_GROUP, FP4_GROUP)
    scale = torch.exp2(_pow2_exponent(g.abs().amax(dim=2), 6.0)).unsqueeze(2)
    v = g / scale
    mags = torch.tensor(E2M1_MAGS)
    idx = torch.bucketize(v.abs(), (mags[1:] + mags[:-1]) / 2, right=False)
    return (torch.sign(v) * mags[idx] * scale).reshape(shape)


def fake_bf16(w):
    import torch

    return w.detach().to(torch.bfloat16).to(torch.float32)


def straight_through(fake):
    """A parametrization: the forward sees exactly fake(w) (w - w.detach() is +-0), the gradient
    flows to w unchanged."""
    from torch import nn

    class StraightThrough(nn.Module):
        def forward(self, w):
            return fake(w) + (w - w.detach())

    return StraightThrough()


def qat_plan(tiny: Tiny) -> list[tuple[object, str, object]]:
    """(module, parameter name, fake quantizer) for every parameter the release stores quantized or BF16."""
    from quantbook.release.format import FP4_WEIGHT, FP8_WEIGHT, expected_tensors

    targets = native_targets(tiny)
    fake_of = {}
    for native, spec in expected_tensors(tiny.raw).items():
        if native not in targets:
            continue
        t, _ = targets[native]
        fake = (fake_fp8 if spec.kind == FP8_WEIGHT else fake_fp4 if spec.kind == FP4_WEIGHT
                else fake_bf16 if spec.dtype == "BF16" else None)
        if fake is not None:
            prev = fake_of.setdefault(id(t), fake)
            assert prev is fake, f"{native}: one tensor, two storage formats"
    plan = []
    for root in tiny.modules():
        for mname, module in root.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                if id(p) in fake_of:
                    plan.append((module, pname, fake_of[id(p)]))
    return plan


def enable_qat(tiny: Tiny) -> int:
    from torch.nn.utils import parametrize

    plan = qat_plan(tiny)
    for module, pname, fake in plan:
        parametrize.register_parametrization(module, pname, straight_through(fake))
    return len(plan)


def disable_qat(tiny: Tiny) -> None:
    """Back to plain parameters holding the latent (unquantized) trained weights."""
    from torch.nn.utils import parametrize

    for root in tiny.modules():
        for module in list(root.modules()):
            if parametrize.is_parametrized(module):
                for pname in list(module.parametrizations):
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=False)


# ------------------------------------------------------------------------------------------ training

class RouterBalance:
    """Aux-loss-free load balancing: count each score-routed layer's expert choices during a step,
    then move its bias (`e_score_correction_bias`) by `rate` towards the mean load."""

    def __init__(self, tiny: Tiny, rate: float):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

        self.rate = rate
        self.counts = {}
        self.routers = [m for root in tiny.modules() for m in root.modules() if isinstance(m, DeepseekV4TopKRouter)]
        for r in self.routers:
            r.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        import torch

        c = torch.bincount(output[2].detach().reshape(-1), minlength=module.num_experts)
        self.counts[id(module)] = self.counts.get(id(module), 0) + c

    def step(self):
        import torch

        for r in self.routers:
            c = self.counts.pop(id(r), None)
            if c is not None:
                with torch.no_grad():
                    r.e_score_correction_bias += self.rate * torch.sign(c.float().mean() - c.float())

    def reset(self):
        self.counts.clear()


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(tiny: Tiny, a):
    import torch

    decay = [p for p in tiny.parameters() if p.dim() >= 2]
    no_decay = [p for p in tiny.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)


def losses(tiny: Tiny, ids):
    import torch.nn.functional as F

    logits, mlogits = tiny.forward(ids)
    V = logits.shape[-1]
    main = F.cross_entropy(logits.reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    mtp = F.cross_entropy(mlogits.reshape(-1, V).float(), ids[:, 2:].reshape(-1))
    return main, mtp


def train(tiny: Tiny, stream, a, steps: int, log=print, qat_from: int | None = None) -> dict:
    """`steps` optimizer steps from the start; fake quant switched on at step `qat_from`."""
    import torch
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(a.seed + 2)
    opt = make_optimizer(tiny, a)
    balance = RouterBalance(tiny, a.bias_rate)
    tiny.train(True)
    history, t0, qat_params = [], time.perf_counter(), 0
    for step in range(steps):
        if qat_from is not None and step == qat_from:
            qat_params = enable_qat(tiny)
            log(f"step {step}: quantization-aware training from here on ({qat_params} parameters fake-quantized)")
        starts = torch.randint(0, stream.numel() - a.seq - 1, (a.batch,), generator=gen)
        ids = torch.stack([stream[s: s + a.seq + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        with parametrize.cached():
            main, mtp_loss = losses(tiny, ids)
            loss = main + a.mtp_weight * mtp_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        balance.step()
        history.append((main.item(), mtp_loss.item()))
        if (step + 1) % a.log_every == 0 or step == 0 or step + 1 == steps:
            k = min(a.log_every, len(history))
            m = sum(h[0] for h in history[-k:]) / k
            t = sum(h[1] for h in history[-k:]) / k
            log(f"step {step + 1}/{steps}: loss {m:.4f} (ppl {math.exp(m):.2f}), mtp {t:.4f}, lr {lr_at(step, a):.2e}, "
                f"{time.perf_counter() - t0:.0f} s")
    tiny.train(False)
    return {"history": history, "wall_s": time.perf_counter() - t0, "qat_params": qat_params}


def evaluate(tiny: Tiny, windows, batch: int) -> dict:
    """Held-out cross entropy and top-1 accuracy of the next token (t+1) and of the MTP (t+2)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import parametrize

    tiny.train(False)
    nll = n = hit = mtp_nll = mtp_n = mtp_hit = 0.0
    with torch.no_grad(), parametrize.cached():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i: i + batch]
            logits, mlogits = tiny.forward(ids)
            V = logits.shape[-1]
            y, y2 = ids[:, 1:], ids[:, 2:]
            nll += F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), reduction="sum").item()
            hit += (logits.argmax(-1) == y).sum().item()
            n += y.numel()
            mtp_nll += F.cross_entropy(mlogits.reshape(-1, V).float(), y2.reshape(-1), reduction="sum").item()
            mtp_hit += (mlogits.argmax(-1) == y2).sum().item()
            mtp_n += y2.numel()
    return {"tokens": int(n), "nll": nll / n, "ppl": math.exp(nll / n), "top1": hit / n,
            "mtp_tokens": int(mtp_n), "mtp_nll": mtp_nll / mtp_n, "mtp_ppl": math.exp(mtp_nll / mtp_n),
            "mtp_top1": mtp_hit / mtp_n}


# ------------------------------------------------------------------------------------------ release

def release_tensors(tiny: Tiny):
    """A `write_checkpoint(tensors=...)` generator: each native tensor from the trained model,
    quantized weights followed by their scales, as `tiny._tensors` yields random ones."""
    import torch

    from quantbook.release.dequant import dequant_fp4, dequant_fp8
    from quantbook.release.format import FP4_WEIGHT, FP8_WEIGHT, SCALE, scale_of_weight
    from quantbook.release.tiny import quantize_fp4_pow2, quantize_fp8_pow2

    targets = native_targets(tiny)
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}

    def gen(group, _gen, _config):
        specs = {s.name: s for s in group}
        for spec in group:
            if spec.kind == SCALE:
                continue
            w = native_tensor(targets[spec.name]).float() if spec.dtype != "I64" else native_tensor(targets[spec.name])
            if spec.kind in (FP8_WEIGHT, FP4_WEIGHT):
                quant, fake, deq = ((quantize_fp4_pow2, fake_fp4, dequant_fp4) if spec.kind == FP4_WEIGHT
                                    else (quantize_fp8_pow2, fake_fp8, dequant_fp8))
                codes, scale = quant(w)
                # what the QAT forward saw is exactly what the release holds
                assert torch.equal(deq(codes, scale).float(), fake(w)), f"{spec.name}: fake quant != release"
                assert tuple(codes.shape) == spec.shape, (spec.name, codes.shape, spec.shape)
                yield spec, codes
                yield specs[scale_of_weight(spec.name)], scale
            else:
                t = w.to(dtypes[spec.dtype]).contiguous()
                assert tuple(t.shape) == spec.shape, (spec.name, t.shape, spec.shape)
                yield spec, t
    return gen


def load_release(path: str | Path, work: str | Path) -> Tiny:
    """The release at `path` as it is served: exactly dequantized by quantbook (step 01) into
    `work`, the main model loaded by transformers' `from_pretrained` (its own name mapping; no
    key may be missing or unexpected), the MTP block (which transformers drops) built by
    `quantbook.calibrate.blocks` from the release's shards. BF16, eval mode."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    from quantbook.calibrate import blocks, mtp
    from quantbook.release import convert
    from quantbook.release.format import load_config
    from quantbook.release.shards import Checkpoint

    bf16 = Path(work) / "bf16"
    convert.dequantize(path, bf16, workers=1)
    model, info = DeepseekV4ForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16, attn_implementation="eager",
                                                        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "unexpected_keys"}
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("mtp.")]
    assert not bad and not unexpected, f"transformers' loading of the release: {bad} {unexpected}"
    model.config._experts_implementation = "eager"
    raw = load_config(path)
    n = raw["num_hidden_layers"]
    table = blocks.block_table(raw)[mtp.MTP_BLOCK]
    ckpt = Checkpoint(path)
    state = blocks.block_state_dict(ckpt.tensors(list(table)), mtp.MTP_BLOCK, table, raw, "cpu", extra=mtp.EXTRA_NAMES)
    layer = blocks.build_layer(mtp.mtp_layer_class(), hf_config(raw, layers=n + 1), n, state, "cpu")
    tiny = Tiny(raw, model.eval(), layer)
    return tiny


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    from quantbook.release.shards import file_sha256

    a = parse_args(argv)
    import torch
    import transformers

    started = time.perf_counter()
    deterministic(a.seed, a.threads)
    raw = raw_config()
    tok = byte_tokenizer(raw["vocab_size"])
    bos = raw["bos_token_id"]
    calib = Path(a.calib)
    from quantbook.calibrate.data import heldout_path

    held = Path(a.heldout) if a.heldout else heldout_path(calib)
    if held.resolve() == calib.resolve():
        raise SystemExit("the held-out file is the training file")
    train_texts = read_texts(calib)
    overlap = set(train_texts) & set(read_texts(held))
    if overlap:
        raise SystemExit(f"{len(overlap)} held-out samples are also in the training text")
    stream = torch.tensor([t for text in train_texts for t in encode(tok, text, bos)], dtype=torch.long)
    windows = heldout_windows(tok, read_texts(held), a.seq, bos, a.eval_windows)
    print(f"train: {len(train_texts)} samples, {stream.numel():,} tokens; held-out: {windows.shape[0]} windows "
          f"of {a.seq + 1} tokens; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    qat_from = a.steps - int(round(a.steps * a.qat_frac)) if a.qat_frac > 0 else None

    if a.time_steps:
        for label, q in (("plain", None), ("qat", 0)):
            tiny = Tiny.fresh(raw, a.seed)
            r = train(tiny, stream, a, a.time_steps, log=lambda s: None, qat_from=q)
            print(f"{label}: {r['wall_s'] / a.time_steps:.3f} s/step at batch {a.batch} x seq {a.seq}", flush=True)
        t0 = time.perf_counter()
        e = evaluate(tiny, windows[: 4 * a.eval_batch], a.eval_batch)
        print(f"eval: {(time.perf_counter() - t0) / (4 * a.eval_batch):.4f} s/window ({e['ppl']:.1f} ppl)")
        return 0

    repro = None
    if a.repro_check:
        runs = []
        for _ in range(2):
            deterministic(a.seed, a.threads)
            tiny = Tiny.fresh(raw, a.seed)
            runs.append(train(tiny, stream, a, a.repro_check, log=lambda s: None,
                              qat_from=a.repro_check // 2)["history"])
        same = runs[0] == runs[1]
        print(f"repro check: {a.repro_check} steps (fake quant from step {a.repro_check // 2}) twice, losses "
              f"{'identical bit for bit' if same else 'DIFFER'}; last {runs[0][-1]} vs {runs[1][-1]}", flush=True)
        if not same:
            return 1
        repro = {"steps": a.repro_check, "fake_quant_from_step": a.repro_check // 2, "identical_losses": same,
                 "last_losses": list(runs[0][-1])}
        if not a.out:
            return 0

    deterministic(a.seed, a.threads)
    tiny = Tiny.fresh(raw, a.seed)
    print(f"parameters: main {sum(p.numel() for p in tiny.model.parameters()):,}, "
          f"mtp {sum(p.numel() for p in tiny.mtp.parameters()):,}", flush=True)
    r = train(tiny, stream, a, a.steps, log=lambda s: print(s, flush=True), qat_from=qat_from)
    print(f"trained {a.steps} steps in {r['wall_s']:.0f} s", flush=True)
    t0 = time.perf_counter()
    qat_eval = evaluate(tiny, windows, a.eval_batch)
    print(f"held-out (trained model, fp32, fake quant {'on' if qat_from is not None else 'off'}): "
          f"ppl {qat_eval['ppl']:.3f}, top-1 {qat_eval['top1']:.4f}, MTP top-1 {qat_eval['mtp_top1']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if not a.out:
        return 0

    from quantbook import atomic
    from quantbook.release.tiny import make_tiny, write_checkpoint

    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    disable_qat(tiny)  # the latent weights; the export quantizes them as the fake quant did (and checks it)
    gen = release_tensors(tiny)
    with atomic.partial_dir(out) as work:
        write_checkpoint(raw, work, a.seed, tensors=gen)
    from quantbook.release.format import load_config

    assert load_config(out) == raw_config(), "config.json of the release is not the tiny config"
    print(f"release written: {out}", flush=True)

    with tempfile.TemporaryDirectory(prefix="train-tiny-") as tmp:
        rel = evaluate(load_release(out, Path(tmp) / "trained"), windows, a.eval_batch)
        print(f"held-out (release, exact dequant, BF16): ppl {rel['ppl']:.3f}, top-1 {rel['top1']:.4f}, "
              f"MTP top-1 {rel['mtp_top1']:.4f}", flush=True)
        make_tiny(Path(tmp) / "random", seed=a.seed)
        rnd = evaluate(load_release(Path(tmp) / "random", Path(tmp) / "random-work"), windows, a.eval_batch)
        print(f"held-out (random make-tiny seed {a.seed}, BF16): ppl {rnd['ppl']:.1f}, top-1 {rnd['top1']:.4f}",
              flush=True)

    if a.record:
        hist = r["history"]
        k = min(50, len(hist))
        record = {
            "command": " ".join(shlex.quote(x) for x in ["python", os.path.relpath(__file__, REPO),
                                                          *(argv or sys.argv[1:])]),
            "seed": a.seed, "steps": a.steps, "seq": a.seq, "batch": a.batch, "lr": a.lr, "warmup": a.warmup,
            "mtp_weight": a.mtp_weight, "qat_from_step": qat_from, "qat_parameters": r["qat_params"],
            "threads": a.threads, "train_wall_s": round(r["wall_s"], 1),
            "total_wall_s": round(time.perf_counter() - started, 1), "repro_check": repro,
            "train_tokens": stream.numel(), "train_samples": len(train_texts),
            "final_train_loss": round(sum(h[0] for h in hist[-k:]) / k, 4),
            "final_train_mtp_loss": round(sum(h[1] for h in hist[-k:]) / k, 4),
            "final_train_loss_note": f"mean of the last {k} steps' next-token cross entropy (nats per byte token)",
            "heldout_ppl_release": round(rel["ppl"], 4), "heldout_ppl_random_tiny": round(rnd["ppl"], 2),
            "heldout_top1_release": round(rel["top1"], 4), "heldout_mtp_top1_release": round(rel["mtp_top1"], 4),
            "heldout": {"file": str(held), "windows": int(windows.shape[0]), "window_tokens": a.seq + 1,
                        "note": "ppl = exp(mean cross entropy) per byte token; top1 = next token (t+1), "
                                "mtp_top1 = the MTP block's token t+2",
                        "release": _rounded(rel), "trained_qat_fp32": _rounded(qat_eval),
                        f"random_make_tiny_seed{a.seed}": _rounded(rnd)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version(), "machine": platform.machine()},
            "files": {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.is_file()},
        }
        atomic.write_json(a.record, record)
        print(f"record written: {a.record}")
    return 0


def _rounded(d: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
