"""One block of the release (`layers.{i}` or `mtp.{k}`) as the transformers layer modelopt calibrates.

The streaming driver never builds the whole model (nor does the fidelity gate, `export.fidelity`).
For each block it reads the block's tensors from the release shards (`ReadAhead`: the next block's
in a thread meanwhile), dequantizes them exactly with step 01's code on the chosen device
(`release.dequant`: the table route on CPU, the formula on a GPU), and materializes transformers'
`DeepseekV4DecoderLayer` with them, so that what modelopt quantizes is the very layer the
modelopt driver calibrates inside the whole model:

- names: transformers' own conversion rules for `deepseek_v4` (the ones `from_pretrained` applies),
  so every native name lands where transformers puts it; the fused experts are filled directly:
  `gate_up_proj[j] = [w1; w3]` (gate first), `down_proj[j] = w2`, each expert dequantized straight
  into its slice of the preallocated tensors (no per-layer stack of copies);
- dtypes: BF16, and fp32 where transformers keeps a module in fp32 (`_keep_in_fp32_modules_strict`,
  matched as transformers matches it: a search in the parameter's name);
- the layer is built on the meta device and given these tensors (`assign`, keys checked both
  ways); the rotary tables of its compressors, which no checkpoint holds, are computed again;
- the host: a `DeepseekV4PreTrainedModel` that holds the layer at `model.layers.{i}`. The root of
  `mtq.quantize` decides which modelopt plugins apply (the KV-cache attention quantizers need a
  PreTrainedModel) and every quantizer name, hence every wildcard of the quantization config:
  at that path they are the whole model's.

The config is the release's `config.json` as step 01 writes it for the BF16 copy, with eager
attention and, above all, eager experts: the default `grouped_mm` experts bypass the `F.linear`
calls modelopt intercepts, and the experts' input amax would be silently missing (the driver
checks every block for that).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import FormatError
from ..release.dequant import dequant_fp4, dequant_fp8
from ..release.format import (
    FP4_WEIGHT, FP8_WEIGHT, SCALE, bf16_config, expected_tensors, expert_name, scale_of_weight, split_block,
)

def hf_config(raw_config: dict, layers: int | None = None):
    """transformers' config for the release's `config.json` (as for its BF16 copy), eager attention
    and experts. `layers` counts the MTP block in when it is `num_hidden_layers + 1`: its layer
    type then comes from the MTP entry of `compress_ratios`, by transformers' own rule."""
    from transformers import DeepseekV4Config

    c = bf16_config(raw_config)
    if layers is not None:
        c["num_hidden_layers"] = layers
    cfg = DeepseekV4Config.from_dict(c)
    cfg._attn_implementation = "eager"  # what from_pretrained picks for V4 (nothing else is supported)
    cfg._experts_implementation = "eager"  # the F.linear calls modelopt's fused-experts wrapper intercepts
    return cfg


def block_names(config: dict, mtp: bool) -> list[str]:
    """The blocks in calibration order: `layers.0` ... `layers.{n-1}`, then `mtp.0` when asked."""
    out = [f"layers.{i}" for i in range(config["num_hidden_layers"])]
    if mtp and config.get("num_nextn_predict_layers", 0):
        out.append("mtp.0")
    return out


def block_table(config: dict) -> dict[str, dict]:
    """The format's tensor table by block: {block: {name: TensorSpec}} (`embed`, `head` ... apart)."""
    out: dict[str, dict] = {}
    for name, spec in expected_tensors(config).items():
        block, index, _ = split_block(name)
        out.setdefault(f"{block}.{index}" if block else name, {})[name] = spec
    return out


@functools.cache
def _transformers_rules():
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4PreTrainedModel

    rules = get_checkpoint_conversion_mapping("deepseek_v4")
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    keep_fp32 = re.compile("|".join(DeepseekV4PreTrainedModel._keep_in_fp32_modules_strict))
    return renamings, converters, keep_fp32


def hf_name(native: str, extra: dict[str, str] | None = None) -> str:
    """A native tensor name of a block -> its name inside transformers' layer (block prefix dropped).

    `extra` maps block-relative names transformers does not know (the MTP block's own modules)."""
    from transformers.core_model_loading import rename_source_key

    block, index, rel = split_block(native)
    if extra and rel in extra:
        return extra[rel]
    renamings, converters, _ = _transformers_rules()
    renamed, _ = rename_source_key(native, renamings, converters)
    _, _, hf_rel = split_block(renamed)
    if not renamed.startswith(f"{block}.{index}."):
        raise FormatError(f"tensor {native}: transformers renames it out of its block ({renamed})")
    return hf_rel


def hf_dtype(name: str, dtype):
    """The dtype transformers loads a floating tensor with (dtype auto on a BF16 config): fp32 for
    the modules it keeps in fp32, BF16 otherwise; integer tensors keep theirs."""
    import torch

    if not dtype.is_floating_point:
        return dtype
    return torch.float32 if _transformers_rules()[2].search(name) else torch.bfloat16


def _dequant(kind: str, w, s):
    return dequant_fp8(w, s) if kind == FP8_WEIGHT else dequant_fp4(w, s)


def block_state_dict(raw: dict, block: str, table: dict, config: dict, device,
                     extra: dict[str, str] | None = None, experts: dict | None = None) -> dict:
    """The release tensors of `block` -> the state dict of transformers' layer, on `device`.

    Classified by the block's part of the format's tensor table (`block_table`): a weight, its
    scale, or a plain tensor; every tensor of the table must be there and nothing else. Experts are
    dequantized one projection at a time into their slice of the fused `gate_up_proj` [E, 2I, H] /
    `down_proj` [E, H, I]. `experts` gives those two fused tensors instead (an export's experts, in
    another form than the release's): the routed-expert tensors of `raw` are then the caller's.
    """
    import torch

    if experts is not None:
        table = {n: s for n, s in table.items() if expert_name(n) is None}
        raw = {n: t for n, t in raw.items() if expert_name(n) is None}
    missing, unknown = sorted(set(table) - set(raw)), sorted(set(raw) - set(table))
    if missing or unknown:
        raise FormatError(f"block {block}: tensors missing {missing[:5]} ({len(missing)}), not in the V4 format "
                          f"{unknown[:5]} ({len(unknown)})")
    E, inter, H = config["n_routed_experts"], config["moe_intermediate_size"], config["hidden_size"]
    fused = experts if experts is not None else {
        "gate_up_proj": torch.empty(E, 2 * inter, H, dtype=torch.bfloat16, device=device),
        "down_proj": torch.empty(E, H, inter, dtype=torch.bfloat16, device=device)}
    rows = {"w1": ("gate_up_proj", slice(0, inter)), "w3": ("gate_up_proj", slice(inter, 2 * inter)),
            "w2": ("down_proj", slice(None))}
    out = {}
    for name, spec in table.items():
        if spec.kind == SCALE:
            continue
        t = raw[name].to(device, non_blocking=True)
        if spec.kind in (FP8_WEIGHT, FP4_WEIGHT):
            t = _dequant(spec.kind, t, raw[scale_of_weight(name)].to(device, non_blocking=True))
        x = expert_name(name)
        if x is not None:
            param, rs = rows[x.proj]
            fused[param][x.expert, rs].copy_(t)
            continue
        hf = hf_name(name, extra)
        out[hf] = t.to(hf_dtype(hf, t.dtype))
    for param, t in fused.items():
        out[f"mlp.experts.{param}"] = t
    return out


def build_layer(cls, cfg, layer_idx: int, state: dict, device):
    """`cls(cfg, layer_idx)` built on the meta device, then given `state` (no copies); the rotary
    tables of its compressors (buffers no checkpoint holds) computed again on `device`."""
    import torch
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    with torch.device("meta"):
        layer = cls(cfg, layer_idx)
    want = set(layer.state_dict())
    if set(state) != want:
        raise FormatError(f"layer {layer_idx}: transformers expects {sorted(want - set(state))[:5]} that the release "
                          f"does not give; the release gives {sorted(set(state) - want)[:5]} that it does not take")
    layer.load_state_dict(state, strict=True, assign=True)
    for name, module in list(layer.named_modules()):
        if isinstance(module, DeepseekV4RotaryEmbedding):
            parent, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, DeepseekV4RotaryEmbedding(cfg).to(device))
    left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
    if left:
        raise FormatError(f"layer {layer_idx}: still on the meta device after loading: {left[:5]}")
    return layer.eval().requires_grad_(False)


@functools.cache
def _host_class():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4PreTrainedModel

    class DeepseekV4BlockHost(DeepseekV4PreTrainedModel):
        """A V4 model that holds one block (modelopt's root for that block)."""

    return DeepseekV4BlockHost


def make_host(cfg, path: str, layer):
    """A `DeepseekV4PreTrainedModel` holding `layer` at `path` (`model.layers.3`)."""
    from torch import nn

    host = _host_class()(cfg)
    node = host
    *parents, leaf = path.split(".")
    for p in parents:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, layer)
    return host.eval()


def layer_kwargs(cfg, rotary, input_ids, attention_mask, embeds) -> dict:
    """What `DeepseekV4Model.forward` passes each layer for one batch besides its hidden streams:
    rotary tables of both rope types, positions, the sliding-window mask, the token ids (the
    hash-routed layers look them up), no cache (compressors and indexer run stateless)."""
    import torch
    from transformers.masking_utils import create_sliding_window_causal_mask

    positions = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    mask = create_sliding_window_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=attention_mask,
                                             past_key_values=None, position_ids=positions)
    rope = {kind: rotary(embeds, position_ids=positions, layer_type=kind) for kind in ("main", "compress")}
    return {"position_embeddings": rope, "position_ids": positions, "attention_mask": mask, "input_ids": input_ids,
            "past_key_values": None, "output_router_logits": False}


def first_streams(cfg, embeds):
    """The hidden streams the first layer takes: the embeddings repeated over the hc streams."""
    return embeds.unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()


def sync(device) -> None:
    """Wait for the device's queued work (a CUDA device; nothing on CPU), so timings and frees are real."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_layer(module) -> None:
    """Free a layer's weights now, whatever still refers to the module (modelopt's wrappers keep
    reference cycles that only a full garbage collection, ~0.5 s, would break)."""
    import torch

    for t in module.parameters():
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    for m in module.modules():  # a buffer may be the caller's own tensor (a view of the read buffer on CPU):
        for name, b in m._buffers.items():  # replaced, never emptied in place
            if b is not None:
                m._buffers[name] = torch.empty(0, dtype=b.dtype, device=b.device)


class ReadAhead:
    """Reads blocks' bytes in a thread: the next block is read while this one computes.

    Two buffers, each as large as the largest block, allocated once and reused: a block's tensors
    are views of its buffer until `release(block)`, and the next block is read into the other one
    (page-locked on CUDA: allocating 14 GB of page-locked memory per block took as long as reading
    it, half the disk's rate, on an H200 machine). A read waits for a buffer to be given back; one
    may be held past its block's compute (the export's writer: `Lease`), so the read thread waits,
    not the loop, and how long is reported (`buffer_wait_s`)."""

    def __init__(self, release, table: dict, pin: bool, blocks_to_read: list[str]):
        self.ckpt, self.table, self.pin = release, table, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streaming-read")
        self.pending: dict = {}
        self.size = max((sum(end - start for *_, start, end in release.block_spans(list(table[b])))
                         for b in blocks_to_read), default=0)
        self.buffers: list = [None, None]
        self.free = [1, 0]
        self.owner: dict[str, int] = {}
        self._cond = threading.Condition()

    def _read(self, block: str):
        t0 = time.perf_counter()
        with self._cond:
            while not self.free:
                self._cond.wait()
            i = self.free.pop()
            self.owner[block] = i
        waited = time.perf_counter() - t0
        if self.buffers[i] is None:
            import torch

            self.buffers[i] = torch.empty(self.size, dtype=torch.uint8, pin_memory=self.pin)
        t1 = time.perf_counter()
        raw, nbytes = self.ckpt.read_block(list(self.table[block]), pin_memory=self.pin, into=self.buffers[i])
        return raw, nbytes, time.perf_counter() - t1, waited

    def ahead(self, block: str | None) -> None:
        if block is None or block in self.pending:
            return
        self.pending[block] = self.pool.submit(self._read, block)

    def take(self, block: str) -> tuple[dict, dict]:
        """The block's tensors as stored (views of its buffer until `release`), and
        {read_s, read_wait_s, read_bytes, buffer_wait_s}."""
        self.ahead(block)
        t0 = time.perf_counter()
        raw, nbytes, secs, waited = self.pending.pop(block).result()
        return raw, {"read_s": round(secs, 4), "read_wait_s": round(time.perf_counter() - t0, 4), "read_bytes": nbytes,
                     "buffer_wait_s": round(waited, 4)}

    def release(self, block: str) -> None:
        """The block's bytes are no longer used (its layer is built, calibrated and freed, its shard
        written): its buffer takes the next read. Any thread."""
        with self._cond:
            self.free.append(self.owner.pop(block))
            self._cond.notify_all()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Lease:
    """A block's read buffer, given back (`give_back`) when the last holder is done: the pass, which
    holds it from the start, and each export shard written from it in the background (`hold`)."""

    def __init__(self, give_back):
        self._give_back, self._n, self._lock = give_back, 1, threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._n += 1

    def done(self, *_) -> None:
        """One holder is done (also a future's done-callback: whatever its outcome)."""
        with self._lock:
            self._n -= 1
            last = self._n == 0
        if last:
            self._give_back()
