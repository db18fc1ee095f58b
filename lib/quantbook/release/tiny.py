"""Tiny DeepSeek V4 checkpoints in exactly the released format, for rehearsals and tests.

A real config is shrunk (every key kept, `quantization_config` and `expert_dtype` included),
the tensor table of `format` is filled with deterministic weights for a seed, and quantized
weights are stored with power-of-two scales so every value survives the round trip exactly.
Shards, names, dtypes and the index follow the release: embed, one shard per layer, head,
MTP; no `__metadata__`. A byte-level tokenizer with the release's special tokens rides along.

Random weights make a fine format rehearsal but meaningless quality numbers (perplexity, KL
divergence of a quantized export against it). The package also carries a TRAINED tiny release of
the default shape (Flash config, 4 layers, 8 experts) in `TRAINED_DIR`: trained on the calibration
text by `scripts/train_tiny.py` (MTP block included, quantization-aware), its record in
`TRAINED_RECORD` (command, numbers, the sha256 of every file). `copy_trained` copies it out after
checking every file against the record; a `tiny:` section with `trained: true` asks for it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from .. import atomic
from ..errors import DestinationError, FormatError
from .dequant import E2M1
from .format import (
    FLASH_CONFIG, FP4_GROUP, FP4_WEIGHT, FP8_BLOCK, FP8_WEIGHT, SCALE, TensorSpec, load_config, named_config,
    scale_of_weight, shard_groups, shard_name,
)
from .shards import INDEX_NAME, ShardWriter, file_sha256

# Dimensions that transformers' deepseek_v4 accepts (../shared/docs/deepseek-v4-format.md).
TINY_DIMS = dict(
    hidden_size=256, num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128,
    o_groups=2, o_lora_rank=128, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    index_n_heads=4, index_head_dim=64, index_topk=16, sliding_window=16, vocab_size=1024,
)
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# The trained tiny release shipped with the package, and what it was trained as (`tiny:` keys).
TRAINED_DIR = Path(__file__).parent / "trained" / "DeepSeek-V4-tiny"
TRAINED_RECORD = TRAINED_DIR.parent / "TRAINING.json"
TRAINED_SPEC = {"like": "flash", "layers": 4, "experts": None}


def tiny_config(like: dict, layers: int = 4, experts: int | None = None) -> dict:
    """Shrink a real V4 config, keeping every key and the real layer pattern's first entries."""
    c = json.loads(json.dumps(like))
    c.update(TINY_DIMS)
    if experts:
        c["n_routed_experts"] = experts
    mtp = c.get("num_nextn_predict_layers", 0)
    ratios = like["compress_ratios"]
    c["num_hidden_layers"] = layers
    c["compress_ratios"] = ratios[:layers] + ratios[len(ratios) - mtp:]
    c["num_hash_layers"] = min(like.get("num_hash_layers", 0), max(layers - 2, 0))
    return c


def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest k with amax / 2^k <= qmax (k = 0 for all-zero blocks)."""
    k = torch.ceil(torch.log2(amax / qmax))
    return torch.where(amax > 0, k, torch.zeros_like(k)).clamp(-127, 127)


def quantize_fp8_pow2(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (E4M3 codes as uint8, E8M0 scale bytes [ceil(out/128), ceil(in/128)])."""
    out, inp = w.shape
    bo, bi = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK)
    padded[:out, :inp] = w
    amax = padded.abs().reshape(bo, FP8_BLOCK, bi, FP8_BLOCK).amax(dim=(1, 3))
    k = _pow2_exponent(amax, 448.0)
    scale = torch.exp2(k).repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    codes = (w / scale).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, (k + 127).to(torch.uint8)


def quantize_fp4_pow2(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (packed E2M1 bytes [out, in/2], E8M0 scale bytes [out, in/32])."""
    out, inp = w.shape
    g = w.reshape(out, inp // FP4_GROUP, FP4_GROUP)
    k = _pow2_exponent(g.abs().amax(dim=2), 6.0)
    v = g / torch.exp2(k).unsqueeze(2)
    mags = torch.tensor(E2M1[:8])
    idx = (v.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)
    codes = torch.where((v < 0) & (idx > 0), idx + 8, idx).reshape(out, inp).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, (k + 127).to(torch.uint8)


def _plain(spec: TensorSpec, gen: torch.Generator, config: dict) -> torch.Tensor:
    name, shape = spec.name, spec.shape
    if spec.dtype == "I64":  # tid2eid: distinct expert ids per token
        return torch.rand(shape[0], config["n_routed_experts"], generator=gen).argsort(dim=1)[:, : shape[1]]
    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif name.endswith(("attn_sink", "ape", "gate.bias")) or "hc_" in name:
        t = 0.1 * torch.randn(shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    return t.to(torch.bfloat16 if spec.dtype == "BF16" else torch.float32)


def _tensors(group: list[TensorSpec], gen: torch.Generator, config: dict):
    """Yield (spec, tensor) for a shard; a quantized weight is followed by its scale."""
    specs = {s.name: s for s in group}
    for spec in group:
        if spec.kind == SCALE:
            continue
        if spec.kind in (FP8_WEIGHT, FP4_WEIGHT):
            rows = spec.shape[0]
            cols = spec.shape[1] * (2 if spec.kind == FP4_WEIGHT else 1)
            w = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
            codes, scale = (quantize_fp4_pow2 if spec.kind == FP4_WEIGHT else quantize_fp8_pow2)(w)
            yield spec, codes
            yield specs[scale_of_weight(spec.name)], scale
        else:
            yield spec, _plain(spec, gen, config)


CODE_POOL = 1 << 26  # random bytes drawn once a shard; benchmark tensors are windows of them


def random_code_tensors(group: list[TensorSpec], gen: torch.Generator, config: dict):
    """Like `_tensors`, but quantized weights are random valid codes (no NaN codes) with scales
    near 2^-6: fast enough for multi-GB benchmark checkpoints with real layer shapes. The codes of
    each weight are a window at a random offset of one pool of random bytes (drawing every byte
    afresh ran at ~0.2 GB/s, slower than the disks the benchmarks measure)."""
    pool = None
    for spec in group:
        if spec.kind in (FP8_WEIGHT, FP4_WEIGHT):
            n = math.prod(spec.shape)
            if pool is None or pool.numel() < n:
                pool = torch.randint(0, 256, (max(CODE_POOL, n),), generator=gen, dtype=torch.uint8)
            at = int(torch.randint(0, pool.numel() - n + 1, (), generator=gen))
            codes = pool[at:at + n].reshape(spec.shape)
            if spec.kind == FP8_WEIGHT:  # 0x7F and 0xFF are NaN: one step down
                codes = codes - ((codes & 0x7F) == 0x7F).to(torch.uint8)
            yield spec, codes
        elif spec.kind == SCALE:
            yield spec, torch.randint(118, 124, spec.shape, generator=gen, dtype=torch.uint8)
        else:
            yield spec, _plain(spec, gen, config)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (no merges) with the release's BOS/EOS ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    assert len(vocab) <= vocab_size, "tiny vocab too small for a byte-level tokenizer"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    atomic.write_text(out / "tokenizer.json", tok.to_str())
    atomic.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
    })


def make_tiny(out: str | Path, like: str | Path = FLASH_CONFIG, seed: int = 0, layers: int = 4,
              experts: int | None = None) -> Path:
    """Write a tiny checkpoint in the released format to `out` (which must not exist or be empty)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DestinationError(f"{out} is not empty: make-tiny writes into a new or empty directory")
    config = tiny_config(load_config(like), layers=layers, experts=experts)
    with atomic.partial_dir(out) as work:  # a killed build leaves no half checkpoint under `out`
        write_checkpoint(config, work, seed)
    return out


def section_config(spec: dict) -> dict:
    """The config of the tiny release a params `tiny:` section ({like, seed, layers, experts}) builds."""
    return tiny_config(load_config(named_config(spec.get("like", "flash"))), layers=spec.get("layers", 4),
                       experts=spec.get("experts"))


def build_if_missing(source: str | Path, spec: dict | None) -> bool:
    """Build the tiny release at `source` from a params `tiny:` section ({like, seed, layers,
    experts, trained}) when `source` does not exist; True when it was built. `trained: true`
    copies the packaged trained release instead (`copy_trained`; `seed` does not apply to it)."""
    if Path(source).exists():
        return False
    if not spec:
        raise FormatError(f"source {source} does not exist (and no `tiny:` section asks to build it)")
    if spec.get("trained"):
        check_trained_spec(spec)
        copy_trained(source)
        return True
    make_tiny(source, like=named_config(spec.get("like", "flash")), seed=spec.get("seed", 0),
              layers=spec.get("layers", 4), experts=spec.get("experts"))
    return True


def check_trained_spec(spec: dict) -> None:
    """Refuse a `tiny:` section (or make-tiny options) asking for `trained` together with a shape
    the trained release does not have; the error names the key."""
    trained = load_config(TRAINED_DIR)
    for key, want in TRAINED_SPEC.items():
        got = spec.get(key)
        if got is None:
            continue
        if key == "like":
            same = tiny_config(load_config(named_config(got)), layers=trained["num_hidden_layers"]) == trained
        elif key == "layers":
            same = int(got) == trained["num_hidden_layers"]
        else:
            same = int(got) == trained["n_routed_experts"]
        if not same:
            raise FormatError(f"the trained tiny release asked for with {key}: {got}, but it is like: flash, "
                              f"layers: {trained['num_hidden_layers']}, experts: {trained['n_routed_experts']} "
                              f"(drop `{key}` or `trained`)")


def trained_record() -> dict:
    """TRAINING.json of the packaged trained release (how it was trained, its numbers, its files)."""
    try:
        return json.loads(TRAINED_RECORD.read_text())
    except FileNotFoundError:
        raise FormatError(f"{TRAINED_RECORD}: missing (the trained tiny release is not in this installation)") from None


def verify_trained(directory: str | Path | None = None) -> dict:
    """Check the trained release (or a copy of it) against TRAINING.json: the same files, each with
    its sha256. Returns {file name: sha256}; raises FormatError naming the first difference."""
    directory = Path(directory) if directory is not None else TRAINED_DIR
    want = trained_record()["files"]
    have = sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise FormatError(f"{directory}: files missing {missing}, not in TRAINING.json {extra}")
    for name in sorted(want):
        got = file_sha256(directory / name)
        if got != want[name]:
            raise FormatError(f"{directory / name}: sha256 {got[:16]}... but TRAINING.json says {want[name][:16]}...")
    return dict(want)


def copy_trained(out: str | Path) -> Path:
    """Copy the packaged trained tiny release to `out` (new or empty), every file checked against
    TRAINING.json before and after the copy."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DestinationError(f"{out} is not empty: make-tiny writes into a new or empty directory")
    files = verify_trained()
    with atomic.partial_dir(out) as work:
        for name in sorted(files):
            shutil.copyfile(TRAINED_DIR / name, Path(work) / name)
        verify_trained(work)
    return out


def write_checkpoint(config: dict, out: Path, seed: int = 0, tensors=_tensors) -> Path:
    """Write every shard of `config`'s tensor table, the index, config and side files."""
    gen = torch.Generator().manual_seed(seed)
    groups = shard_groups(config)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = shard_name(i, len(groups))
        items = list(tensors(group, gen, config))
        with ShardWriter(out / name, [(s.name, s.dtype, s.shape) for s, _ in items], metadata=None) as writer:
            for spec, t in items:
                writer.write(t.contiguous().view(torch.uint8).numpy())
                weight_map[spec.name] = name
                total += spec.nbytes
            writer.finish()
    atomic.write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic.write_json(out / "config.json", config)
    atomic.write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False,
    })
    write_tokenizer(out, config["vocab_size"])
    return out
