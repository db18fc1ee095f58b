"""The fidelity gate (`quantbook eval`): does the export predict tokens as the release does?

Every other check compares bytes. The failures that matter most keep them all green: an
`input_scale` too small for its layer (NVFP4 activations clip), w1 and w3 of an expert exchanged
with their scales, MTP experts in a form the engine misreads. So the same held-out tokens go
through two models, block by block, one block on the device at a time:

    reference   the release's own weights, exactly dequantized (as step 02 calibrates them), BF16
    candidate   the export's bytes as the named engine computes them: routed experts decoded from
                `weight` x `weight_scale` x `weight_scale_2`, their inputs quantized to NVFP4 under
                ONE activation scale per layer and projection, the max of the experts' `input_scale`
                (`export.engine`, mode `w4a4`: Blackwell), or left BF16 (`w4a16`: vLLM's Marlin on
                Hopper); every other tensor from the export's own bytes

For each block (`blocks.ReadAhead` reads the next one of each checkpoint meanwhile; each byte is
read once) the reference layer runs on the reference streams, what its routed experts are given kept
(`Seen`); then the candidate layer on the candidate streams (what serving computes: errors compound),
and the candidate's routed experts alone on what the reference's were given: their own error, in which
a broken layer stands out whatever came before it. The block's own error follows from that when the
block's other tensors are byte-identical to the release's (`same_non_expert_bytes`: quantbook's exports);
otherwise the candidate's whole block runs on the reference's inputs as well. Both models' routed
experts run as transformers' grouped GEMMs (one GEMM a projection, not a loop of 384). After the last layer both
heads give logits, compared in llama.cpp's `perplexity --kl-divergence` convention: PPL of each and
their ratio, KLD mean / median / 99th / 99.9th percentile / max, same top token %, mean and RMS of
the change in the correct token's probability. The MTP block (token t+2 from h_t and the embedding of
t+1) runs on both streams, its experts in the export's form as the named engine reads it: its top-1
agreement with the release's MTP is a proxy for draft acceptance.

The gate (`GATE_DEFAULTS`, params `export.fidelity`) fails on the PPL ratio, the mean KLD, the
same-top-token share, the MTP agreement, and on any block whose own error is far above the others'
(`outlier_factor` x the median of the other blocks): one broken layer in 61 is named.

The streaming pass runs the same `Evaluation.block` on each block it holds, the blocks handed over
instead of read (`fidelity_along`): one read of the release for calibration, export and gate.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

from .. import atomic
from ..calibrate import blocks, mtp
from . import fidelity_resume
from ..errors import FidelityFailed, FormatError, ParamsError
from ..release.format import load_config, split_block
from ..release.shards import Checkpoint

RECORD = "eval"  # eval.json / eval.md in the run directory
CARD = "README.md"  # the export's model card
PASS, FAIL, MEASURED = "pass", "fail", "measured"  # measured: numbers recorded, thresholds not applied
ENGINES = ("auto", "vllm", "sglang")
MTP_READER = {"released": "sglang", "nvfp4": "vllm"}  # the engine that reads each MTP expert form correctly
MODES = ("w4a4", "w4a16")
TOP_LEVEL = ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")

# What a run evaluates, and the gate. Defaults measured on the trained tiny (README, "The fidelity gate").
FIDELITY_DEFAULTS = {
    "enabled": True,
    "text": None,  # held-out JSONL ({"text": ...} a line); None: the held-out file beside the calibration data
    "samples": 16,  # sequences of `seq` tokens cut from the held-out text
    "seq": 128,
    "batch_size": 4,
    "engine": "auto",  # whose reading of the export: vllm (0.33) | sglang (0.5.23) | auto: the one that reads
                       # the export's MTP expert form correctly (released: sglang, nvfp4: vllm)
    "mode": "w4a4",  # w4a4 (Blackwell: activations NVFP4) | w4a16 (Hopper's Marlin: activations BF16)
    "device": "cpu",
    "save_every": 8,  # blocks between saves of both models' streams (`fidelity_resume`; with a run directory)
    "along": True,  # when step 02's streaming pass writes the export (quantize.export_along), run the gate in that
                    # pass, on each block while it is in memory (`fidelity_along`); false: step 03 runs it
}
# Measured on the trained tiny (16 x 128 held-out tokens, W4A4, carry): PPL ratio 1.0002, KLD mean 0.0008,
# same top token 98.3%, MTP agreement 98.4%, routed experts' own error 0.03-0.06 a layer; one layer's
# w13 input_scale / 16 gives that layer 0.91 (25x), w1 <-> w3 of its busiest expert 0.47 (13x).
GATE_DEFAULTS = {
    "gate": True,  # false: run and record the numbers without applying the thresholds (a rehearsal's random tiny)
    "max_ppl_ratio": 1.02,
    "max_kld_mean": 0.01,
    "min_same_top": 0.95,
    "min_mtp_agreement": 0.90,
    "outlier_factor": 4.0,  # a block's routed-expert error above this x the median of the other main layers' ...
    "outlier_floor": 0.15,  # ... and above this relative error: named, and the gate fails
}


def fidelity_settings(f: dict | None) -> dict:
    """The `export.fidelity` section with defaults filled; unknown keys and values refused."""
    f = dict(f or {})
    known = set(FIDELITY_DEFAULTS) | set(GATE_DEFAULTS)
    unknown = sorted(set(f) - known)
    if unknown:
        raise ParamsError(f"export.fidelity: unknown key(s) {unknown}; known: {sorted(known)}")
    s = {**FIDELITY_DEFAULTS, **GATE_DEFAULTS, **f}
    for key, allowed in (("engine", ENGINES), ("mode", MODES)):
        if s[key] not in allowed:
            raise ParamsError(f"export.fidelity.{key}: {s[key]!r}; one of {list(allowed)}")
    if not isinstance(s["along"], bool):
        raise ParamsError(f"export.fidelity.along: {s['along']!r}; write true or false")
    for key in ("samples", "seq", "batch_size", "save_every"):
        if not isinstance(s[key], int) or s[key] < 1 or (key == "seq" and s[key] < 3):
            raise ParamsError(f"export.fidelity.{key}: {s[key]!r}; a positive integer (seq at least 3)")
    return s


# ----------------------------------------------------------------------------- held-out tokens


def read_texts(path: str | Path) -> list[str]:
    """The `text` of every line of a JSONL file."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"held-out text {path} does not exist (`quantbook calib-data` writes it beside the "
                          "calibration file at set-up; or set export.fidelity.text)")
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]


def check_held_out(texts: list[str], calibration: str | Path | None) -> None:
    """Refuse held-out text that shares a sample with the calibration file (a gate on seen text proves less)."""
    if calibration is None or not Path(calibration).exists():
        return
    seen = set(read_texts(calibration))
    shared = [t for t in texts if t in seen]
    if shared:
        raise ParamsError(f"export.fidelity.text: {len(shared)} of its samples are calibration samples of "
                          f"{calibration} (e.g. {shared[0][:60]!r}...); evaluate on held-out text")


def token_windows(texts: list[str], tokenizer, samples: int, seq: int):
    """`samples` windows of `seq` token ids [samples, seq], cut in order from the texts tokenized one
    after another (each with the tokenizer's BOS): the same tokens for both models, no padding."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
        if len(ids) >= samples * seq:
            break
    if len(ids) < samples * seq:
        raise ParamsError(f"export.fidelity: the held-out text gives {len(ids)} tokens; samples x seq = "
                          f"{samples} x {seq} = {samples * seq} needed (fewer samples, or more text)")
    return torch.tensor(ids[: samples * seq], dtype=torch.long).reshape(samples, seq)


# ----------------------------------------------------------------------------- the two checkpoints


def _by_block(ck: Checkpoint) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in ck.weight_map:
        block, index, _ = split_block(name)
        if block is not None:
            out.setdefault(f"{block}.{index}", []).append(name)
    return out


def _rms_norm(weight, eps: float, device):
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    norm = DeepseekV4RMSNorm(weight.shape[0], eps=eps)
    norm.weight.data = weight.to(device, blocks.hf_dtype("norm.weight", weight.dtype))
    return norm.to(device)


class Head:
    """The model's end: `hc_head` collapses the streams, `norm`, then `head` gives the logits."""

    def __init__(self, tensors: dict, cfg, device):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead

        self.hc = DeepseekV4HyperHead(cfg)
        for leaf, native in (("hc_fn", "hc_head_fn"), ("hc_base", "hc_head_base"), ("hc_scale", "hc_head_scale")):
            getattr(self.hc, leaf).data = tensors[native].to(device, blocks.hf_dtype(f"hc_head.{leaf}", tensors[native].dtype))
        self.hc.to(device)
        self.norm = _rms_norm(tensors["norm.weight"], cfg.rms_norm_eps, device)
        self.head = tensors["head.weight"].to(device)

    def logits(self, streams, hc=None, norm=None):
        """Logits [B, T, V] in fp32 from hidden streams [B, T, hc, H] (the MTP block passes its own hc/norm)."""
        import torch

        with torch.no_grad():
            x = (norm or self.norm)((hc or self.hc)(streams))
            return torch.nn.functional.linear(x, self.head).float()


class Side:
    """One of the two models: its checkpoint, block table, reader, embeddings, head and streams.
    `blocks_to_read` None: nothing is read, the blocks are handed to `Evaluation.block` (the
    streaming pass)."""

    def __init__(self, path: str | Path, cfg, device, all_blocks: list[str], blocks_to_read: list[str] | None):
        self.ck = Checkpoint(path)
        self.table = _by_block(self.ck)
        missing = [b for b in all_blocks if b not in self.table]
        if missing:
            raise FormatError(f"{path}: no tensors of block(s) {missing}")
        got = self.ck.tensors(list(TOP_LEVEL))
        absent = [n for n in TOP_LEVEL if n not in got]
        if absent:
            raise FormatError(f"{path}: top-level tensor(s) {absent} missing")
        self.embed = got["embed.weight"].to(device)
        self.head = Head(got, cfg, device)
        self.reader = None if blocks_to_read is None else \
            blocks.ReadAhead(self.ck, self.table, device.type == "cuda", blocks_to_read or all_blocks[-1:])
        self.streams: list = []

    def twin(self) -> "Side":
        """Another model with this one's checkpoint, table and top-level tensors (the same bytes), its own
        streams, reading nothing."""
        other = copy.copy(self)
        other.reader, other.streams = None, []
        return other


# ----------------------------------------------------------------------------- one block, both models


def _relative(a: list, b: list) -> float:
    """||a - b|| / ||b|| over all batches, in fp64."""
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.double().pow(2).sum()) for y in b)
    return _root_ratio(num, den)


def _root_ratio(num: float, den: float) -> float:
    """sqrt(num / den): a relative error from squared norms (the absolute one when the reference is 0)."""
    return math.sqrt(num / den) if den else math.sqrt(num)


def same_non_expert_bytes(release: dict, export: dict, block: str) -> bool:
    """Whether every tensor of `block` but its routed experts is stored alike in both checkpoints:
    the same names, dtypes, shapes and bytes (then the candidate's attention, router and shared
    experts compute what the release's do, bit for bit, and only the routed experts can differ)."""
    import torch

    experts = f"{block}.ffn.experts."
    names = {n for n in release if not n.startswith(experts)}
    if names != {n for n in export if not n.startswith(experts)}:
        return False
    for n in names:
        a, b = release[n], export[n]
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            return False
    return True


class Seen:
    """What a layer's routed experts were given and gave back on each batch, and the weights `post`
    its `ffn_hc` spreads the MoE output over the hidden streams with (forward hooks)."""

    def __init__(self):
        self.args: list = []  # (hidden [N, H], top_k_index [N, k], top_k_weights [N, k]) a batch
        self.routed: list = []  # the experts' output [N, H] a batch
        self.post: list = []  # [B, T, hc] fp32 a batch

    def attach(self, layer) -> list:
        def experts(module, args, out):
            self.args.append(tuple(a.detach() for a in args))
            self.routed.append(out.detach())

        return [layer.mlp.experts.register_forward_hook(experts),
                layer.ffn_hc.register_forward_hook(lambda m, a, out: self.post.append(out[0].detach()))]

    def own_error(self, routed: list, block_out: list) -> float:
        """The block's own relative error on these inputs when only its routed experts differ.

        The layer adds the MoE output to its streams as `post[..., None] * moe[..., None, :]` (in the
        activation dtype) on top of terms the experts do not touch, so the change of its output is
        `post x (routed - routed_seen)`, taken here in fp64 against the block's output: no second
        run of attention, and no BF16 rounding of the output counted as error."""
        num = den = 0.0
        for p, r, r0, y in zip(self.post, routed, self.routed, block_out):
            w = p.to(y.dtype).double().pow(2).sum(-1).reshape(-1)  # [B*T]
            d = (r.double() - r0.double()).pow(2).sum(-1)  # [B*T]
            num += float((w * d).sum())
            den += float(y.double().pow(2).sum())
        return _root_ratio(num, den)


class Evaluation:
    """The block loop of `evaluate` (one instance per evaluation)."""

    def __init__(self, export: str | Path, source: str | Path, s: dict, tokens, implementation: str, skip=(),
                 fed_mtp_form: str | None = None):
        """`fed_mtp_form`: the blocks are handed to `block` by the streaming pass, which writes `export`
        meanwhile (it is not read): the candidate's top-level tensors are the release's (v4-serving
        copies them) and its MTP experts have this form (`export.mtp_experts`)."""
        import torch
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        from .verify import mtp_form

        self.s = s
        self.device = torch.device(s["device"])
        self.raw_cfg = load_config(source)
        fed = fed_mtp_form is not None
        exp_cfg = self.raw_cfg if fed else load_config(export)
        for key in ("num_hidden_layers", "hidden_size", "n_routed_experts", "moe_intermediate_size", "vocab_size"):
            if exp_cfg.get(key) != self.raw_cfg.get(key):
                raise FormatError(f"{export}: config {key} {exp_cfg.get(key)} but the release has "
                                  f"{self.raw_cfg.get(key)}: not an export of this release")
        n = self.raw_cfg["num_hidden_layers"]
        self.implementation = implementation  # transformers' experts implementation, both models
        self.cfg = blocks.hf_config(self.raw_cfg)
        self.mtp_cfg = blocks.hf_config(self.raw_cfg, layers=n + 1)
        for c in (self.cfg, self.mtp_cfg):
            c._experts_implementation = self.implementation
        self.blocks = blocks.block_names(self.raw_cfg, mtp=True)
        self.release_table = blocks.block_table(self.raw_cfg)
        todo = [b for b in self.blocks if b not in set(skip)]  # a resumed gate reads only what is left
        self.ref = Side(source, self.cfg, self.device, self.blocks, None if fed else todo)
        if fed:
            self.cand = self.ref.twin()
            self.mtp_form = fed_mtp_form if mtp.MTP_BLOCK in self.blocks else None
        else:
            self.cand = Side(export, self.cfg, self.device, self.blocks, todo)
            self.mtp_form = mtp_form(self.cand.ck, exp_cfg) if mtp.MTP_BLOCK in self.blocks else None
        if s["engine"] == "auto":  # main layers read alike by both; the MTP form picks the engine
            s["engine"] = MTP_READER.get(self.mtp_form, "vllm")
        self.n = n
        self.rotary = DeepseekV4RotaryEmbedding(self.cfg).to(self.device)
        self.ids = [b.to(self.device) for b in tokens.split(s["batch_size"])]
        ref_embeds = [torch.nn.functional.embedding(x, self.ref.embed) for x in self.ids]
        cand_embeds = [torch.nn.functional.embedding(x, self.cand.embed) for x in self.ids]
        self.kwargs = [blocks.layer_kwargs(self.cfg, self.rotary, x, None, e) for x, e in zip(self.ids, ref_embeds)]
        self.ref.streams = [blocks.first_streams(self.cfg, e) for e in ref_embeds]
        self.cand.streams = [blocks.first_streams(self.cfg, e) for e in cand_embeds]
        self.ref.embeds, self.cand.embeds = ref_embeds, cand_embeds

    # -- building the layers

    def _layer(self, block: str, raw: dict, candidate: bool):
        """The transformers layer of `block` from `raw`; for the candidate, its routed experts as the
        engine computes them (`export.engine`)."""
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

        from . import engine

        is_mtp = block == mtp.MTP_BLOCK
        cfg = self.mtp_cfg if is_mtp else self.cfg
        index = self.n if is_mtp else int(block.split(".")[1])
        extra = mtp.EXTRA_NAMES if is_mtp else None
        experts = None
        if candidate:
            experts = engine.engine_reads(raw, block, self.mtp_form if is_mtp else "nvfp4", self.s["engine"],
                                          self.raw_cfg, mode=self.s["mode"], device=self.device,
                                          implementation=self.implementation)
            fused = {"gate_up_proj": experts.gate_up_proj.data, "down_proj": experts.down_proj.data}
            state = blocks.block_state_dict(raw, block, self.release_table[block], self.raw_cfg, self.device,
                                            extra=extra, experts=fused)
        else:
            state = blocks.block_state_dict(raw, block, self.release_table[block], self.raw_cfg, self.device,
                                            extra=extra)
        cls = mtp.mtp_layer_class() if is_mtp else DeepseekV4DecoderLayer
        layer = blocks.build_layer(cls, cfg, index, state, self.device)
        if experts is not None:
            layer.mlp.experts = experts
        return layer

    # -- the forwards

    def _inputs(self, side: Side, block: str) -> tuple[list, list]:
        """The block's inputs on `side`'s streams: for the MTP block, joined with `side`'s own embeddings
        of the next tokens."""
        if block != mtp.MTP_BLOCK:
            return side.streams, self.kwargs
        inputs, kwargs = [], []
        for x, ids, e in zip(side.streams, self.ids, side.embeds):
            h, next_ids, _ = mtp.mtp_inputs(x, ids, None)
            next_embeds = e[:, 1:]
            inputs.append(h)
            kwargs.append({**blocks.layer_kwargs(self.mtp_cfg, self.rotary, next_ids, None, next_embeds),
                           "next_embeds": next_embeds})
        return inputs, kwargs

    def _run(self, layer, inputs: list, kwargs: list, seen: "Seen | None" = None) -> list:
        """The layer on each batch; with `seen`, what its routed experts were given and gave back."""
        import torch

        hooks = seen.attach(layer) if seen is not None else []
        try:
            with torch.no_grad():
                return [layer(x, **kw) for x, kw in zip(inputs, kwargs)]
        finally:
            for h in hooks:
                h.remove()

    def _top(self, head: Head, layer, outs: list) -> list:
        """The MTP head's top token at each position, a sequence at a time (a batch's logits are GBs)."""
        import torch

        return [torch.cat([head.logits(y[i:i + 1], hc=layer.hc_head, norm=layer.norm).argmax(-1)
                           for i in range(y.shape[0])]) for y in outs]

    def block(self, block: str, raws: dict | None = None) -> dict:
        """Both models through one block: the reference on its streams (what its routed experts see
        kept), the candidate on its own streams, and the candidate's routed experts on what the
        reference's saw. The candidate's whole block runs on the release's inputs only where the
        block's other tensors are not byte-identical to the release's. `raws`: {"release": the
        block's tensors as released, "export": as exported}, handed over (else read here)."""
        import torch

        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        nxt = self.blocks[self.blocks.index(block) + 1] if block != self.blocks[-1] else None
        timing: dict = {}
        if raws is None:
            raws = {}
            for side, name in ((self.ref, "release"), (self.cand, "export")):
                raws[name], rt = side.reader.take(block)
                side.reader.ahead(nxt)
                timing.update({f"{name}_{k}": v for k, v in rt.items()})
        else:
            raws = dict(raws)
        same = same_non_expert_bytes(raws["release"], raws["export"], block)
        is_mtp = block == mtp.MTP_BLOCK
        ref_in, ref_kw = self._inputs(self.ref, block)
        seen = Seen()
        outs: dict = {}
        for side, candidate in ((self.ref, False), (self.cand, True)):
            t1 = time.perf_counter()
            layer = self._layer(block, raws.pop("export" if candidate else "release"), candidate)
            blocks.sync(self.device)
            t2 = time.perf_counter()
            if not candidate:
                outs[False] = self._run(layer, ref_in, ref_kw, seen)
            else:
                outs[True] = self._run(layer, *self._inputs(side, block))
                with torch.no_grad():  # its routed experts on the release's inputs: only they can differ
                    routed = [layer.mlp.experts(*args) for args in seen.args]
                if same:
                    local = seen.own_error(routed, outs[False])
                else:
                    local = _relative(self._run(layer, ref_in, ref_kw), outs[False])
            if is_mtp:
                outs[("top", candidate)] = self._top(side.head, layer, outs[candidate])
            blocks.sync(self.device)
            who = "candidate" if candidate else "reference"
            timing[f"{who}_build_s"] = round(t2 - t1, 4)
            timing[f"{who}_forward_s"] = round(time.perf_counter() - t2, 4)
            blocks.release_layer(layer)
            del layer
            if side.reader is not None:  # after the forward: on CPU the layer's tensors may be views of the buffer
                side.reader.release(block)
        row = {"block": block, "routed_rel_err": _relative(routed, seen.routed), "local_rel_err": local,
               "stream_rel_err": _relative(outs[True], outs[False]), "other_bytes_identical": same}
        if is_mtp:
            row["mtp"] = self._mtp_numbers(outs[("top", False)], outs[("top", True)])
        else:
            self.ref.streams, self.cand.streams = outs[False], outs[True]
        timing["total_s"] = round(time.perf_counter() - t0, 4)
        if self.device.type == "cuda":
            timing["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        row["timing"] = timing
        return row

    def _mtp_numbers(self, ref_top: list, cand_top: list) -> dict:
        """Top-1 agreement of the candidate's MTP with the release's, and each one's t+2 accuracy."""
        agree = total = ref_hit = cand_hit = scored = 0
        for a, b, ids in zip(ref_top, cand_top, self.ids):  # position t predicts token t+2
            agree += int((a == b).sum())
            total += a.numel()
            target = ids[:, 2:]
            ref_hit += int((a[:, :-1] == target).sum())
            cand_hit += int((b[:, :-1] == target).sum())
            scored += target.numel()
        return {"form": self.mtp_form, "engine": self.s["engine"], "top1_agreement": agree / total,
                "top1_accuracy_release": ref_hit / scored, "top1_accuracy_export": cand_hit / scored,
                "positions": total}

    def final(self) -> dict:
        """Logits of both heads on the last main layer's streams -> the numbers (`logit_numbers`)."""
        import torch

        parts = {k: [] for k in ("nll_ref", "nll_cand", "kld", "same", "dp")}
        rows = ((r[i:i + 1], c[i:i + 1], ids[i:i + 1])  # a sequence at a time: a batch's logits are GBs
                for r, c, ids in zip(self.ref.streams, self.cand.streams, self.ids) for i in range(ids.shape[0]))
        for r, c, ids in rows:
            lr = torch.log_softmax(self.ref.head.logits(r)[:, :-1], dim=-1)
            lc = torch.log_softmax(self.cand.head.logits(c)[:, :-1], dim=-1)
            target = ids[:, 1:].unsqueeze(-1)
            tr, tc = lr.gather(-1, target).squeeze(-1), lc.gather(-1, target).squeeze(-1)
            parts["nll_ref"].append(-tr.double().flatten())
            parts["nll_cand"].append(-tc.double().flatten())
            parts["kld"].append((lr.exp() * (lr - lc)).sum(-1).double().flatten())
            parts["same"].append((lr.argmax(-1) == lc.argmax(-1)).flatten())
            parts["dp"].append((tc.exp() - tr.exp()).double().flatten())
            del lr, lc
        return logit_numbers(**{k: torch.cat(v).cpu() for k, v in parts.items()})

    def close(self) -> None:
        for side in (self.ref, self.cand):
            if side.reader is not None:
                side.reader.close()


def logit_numbers(nll_ref, nll_cand, kld, same, dp) -> dict:
    """llama.cpp's numbers from per-token tensors: PPL of each model and their ratio, KLD statistics,
    same top token, Δp of the correct token (mean and RMS)."""
    import torch

    q = torch.quantile(kld.float(), torch.tensor([0.5, 0.99, 0.999])).tolist()
    ppl_ref, ppl_cand = math.exp(float(nll_ref.mean())), math.exp(float(nll_cand.mean()))
    return {"tokens": int(kld.numel()), "ppl_release": ppl_ref, "ppl_export": ppl_cand,
            "ppl_ratio": ppl_cand / ppl_ref,
            "kld": {"mean": float(kld.mean()), "median": q[0], "p99": q[1], "p999": q[2], "max": float(kld.max())},
            "same_top": float(same.double().mean()),
            "dp_mean": float(dp.mean()), "dp_rms": float(dp.pow(2).mean().sqrt())}


# ----------------------------------------------------------------------------- the gate


def judge(numbers: dict, rows: list[dict], s: dict) -> tuple[str, list[str], list[str]]:
    """(verdict, reasons, outlier blocks): the thresholds, and the per-block outlier rule on the
    routed experts' own error (`routed_rel_err`: on the release's inputs, so attention and router
    see the same bytes and only the experts differ) against the median of the other main layers'."""
    import statistics

    reasons = []
    finite = all(math.isfinite(v) for v in (numbers["ppl_export"], numbers["kld"]["mean"]))
    if not finite:
        reasons.append("non-finite logits from the export")
    if numbers["ppl_ratio"] > s["max_ppl_ratio"]:
        reasons.append(f"PPL ratio {numbers['ppl_ratio']:.4f} > {s['max_ppl_ratio']}")
    if numbers["kld"]["mean"] > s["max_kld_mean"]:
        reasons.append(f"mean KLD {numbers['kld']['mean']:.5f} > {s['max_kld_mean']}")
    if numbers["same_top"] < s["min_same_top"]:
        reasons.append(f"same top token {numbers['same_top']:.2%} < {s['min_same_top']:.0%}")
    m = numbers.get("mtp")
    if m and m["top1_agreement"] < s["min_mtp_agreement"]:
        reasons.append(f"MTP ({m['form']} experts as {m['engine']} reads them): top-1 agreement with the release "
                       f"{m['top1_agreement']:.2%} < {s['min_mtp_agreement']:.0%}")
    outliers = []
    main = [r for r in rows if r["block"].startswith("layers.")]
    for r in rows:
        others = [x["routed_rel_err"] for x in main if x is not r]
        median = statistics.median(others) if others else 0.0
        r["outlier_ratio"] = r["routed_rel_err"] / median if median > 0 else math.inf
        if r["routed_rel_err"] > s["outlier_floor"] and r["routed_rel_err"] > s["outlier_factor"] * median:
            outliers.append(r["block"])
            reasons.append(f"block {r['block']}: its routed experts' own error {r['routed_rel_err']:.4f} is "
                           f"{r['outlier_ratio']:.1f}x the median of the other main layers ({median:.4f})")
    return (FAIL if reasons else PASS), reasons, outliers


def worst_blocks(rows: list[dict], k: int = 3) -> list[str]:
    """The `k` blocks whose routed experts have the largest own error, worst first."""
    return [r["block"] for r in sorted(rows, key=lambda r: -r["routed_rel_err"])[:k]]


# ----------------------------------------------------------------------------- entry point


def held_out_tokens(source: str | Path, s: dict, calibration: str | Path | None):
    """(the held-out text file, its token windows [samples, seq]) for settings `s`: `s["text"]`, else
    the held-out file beside the calibration JSONL; refused when it shares a calibration sample."""
    from ..calibrate.data import heldout_path
    from ..calibrate.hf_model import load_tokenizer

    text = s["text"] or (heldout_path(calibration) if calibration else None)
    if text is None:
        raise ParamsError("export.fidelity.text: no held-out text named and no calibration file to find it beside")
    texts = read_texts(text)
    check_held_out(texts, calibration)
    tok, _, _ = load_tokenizer(str(source))
    return text, token_windows(texts, tok, s["samples"], s["seq"])


def evaluate(export: str | Path, source: str | Path, settings: dict | None = None, calibration: str | Path | None = None,
             progress: bool = True, implementation: str | None = None, resume_dir: str | Path | None = None) -> dict:
    """Run the fidelity gate on `export` against the release `source`; the result (also `eval.json`).

    `settings`: the `export.fidelity` section (`fidelity_settings`); `calibration`: the calibration
    JSONL, whose samples the held-out text must not share; its held-out file is the default text.
    `implementation`: transformers' experts implementation for both models (`grouped_mm`, the
    default, or `eager`, its per-expert loop: benchmarks compare the two). `resume_dir`: where the
    gate keeps its progress every `save_every` blocks and carries on from after a kill
    (`fidelity_resume`); removed when the gate ends. None: nothing kept."""
    import torch

    s = fidelity_settings(settings)
    text, tokens = held_out_tokens(source, s, calibration)
    t0 = time.perf_counter()
    torch.compiler.set_stance("force_eager")
    implementation = implementation or "grouped_mm"  # one GEMM a projection, not one per expert
    sig = None if resume_dir is None else fidelity_resume.signature(  # reads samples of every shard: only to resume
        export, source, s, tokens, implementation, torch.device(s["device"]).type)
    keep = fidelity_resume.Progress(resume_dir, sig, s["save_every"])
    saved = keep.load(s["device"])
    ev = Evaluation(export, source, s, tokens, implementation, skip=saved["done"] if saved else ())
    rows, numbers = [], None
    if saved:
        rows, numbers = saved["rows"], saved["numbers"]
        ev.ref.streams, ev.cand.streams = saved["streams"]
        print(f"[quantbook] eval: resuming after {saved['done'][-1]} ({len(saved['done'])} of {len(ev.blocks)} "
              f"blocks saved in {resume_dir})", flush=True)
    last_main = f"layers.{ev.n - 1}"
    bar = None
    if progress:
        from ..progress import tqdm

        bar = tqdm(total=len(ev.blocks), initial=len(rows), desc="eval blocks", unit="block")
    try:
        for i, b in enumerate(ev.blocks):
            if i < len(rows):
                continue
            rows.append(ev.block(b))
            if bar is not None:
                bar.set_postfix_str(f"{b}: routed experts' error {rows[-1]['routed_rel_err']:.4f}")
                bar.update(1)
            if b == last_main:
                numbers = ev.final()
            if b.startswith("layers.") and keep.due(i, b, last_main):
                keep.save(ev.blocks[: i + 1], rows, numbers, ev.ref.streams, ev.cand.streams)
    finally:
        if bar is not None:
            bar.close()
        ev.close()
    keep.clear()
    return conclude(rows, numbers, s, text, export, source, ev.mtp_form, time.perf_counter() - t0)


def conclude(rows: list[dict], numbers: dict, s: dict, text, export, source, form: str | None, elapsed: float) -> dict:
    """The gate's result from every block's row and the final numbers: the verdict under `s`'s
    thresholds (`judge`), the summary and the record `evaluate` returns (also the streaming pass's)."""
    numbers = dict(numbers)
    mtp_row = next((r for r in rows if "mtp" in r), None)
    if mtp_row is not None:
        numbers["mtp"] = mtp_row["mtp"]
    verdict, reasons, outliers = judge(numbers, rows, s)
    worst = worst_blocks(rows)
    summary = (f"{PASS}: the export predicts the held-out tokens as the release does" if verdict == PASS else
               f"{FAIL}: {len(reasons)} reason(s); worst blocks {', '.join(worst)}")
    if not s["gate"]:
        verdict = MEASURED
        summary = (f"{MEASURED}, not gated (export.fidelity.gate: false); the thresholds would say "
                   + summary.split(":", 1)[0])
    return {"export": str(export), "source": str(source), "verdict": verdict, "summary": summary, "reasons": reasons,
            "outliers": outliers, "worst_blocks": worst, "numbers": numbers, "blocks": rows,
            "settings": {**s, "text": str(text)}, "tokens": {"samples": s["samples"], "seq": s["seq"],
                                                             "scored": numbers["tokens"]},
            "mtp_form": form, "elapsed_s": round(elapsed, 2)}


# ----------------------------------------------------------------------------- records


def format_table(result: dict) -> str:
    """The verdict, the numbers and the per-block errors as Markdown."""
    n, s = result["numbers"], result["settings"]
    k = n["kld"]
    lines = [f"# eval: {result['export']}", "",
             f"**{result['verdict'].upper()}**: {result['summary']}", "",
             f"{result['tokens']['samples']} x {result['tokens']['seq']} held-out tokens "
             f"({result['tokens']['scored']} scored); engine {s['engine']}, {s['mode']}, one activation scale per layer "
             f"and projection; device {s['device']}", ""]
    if result["reasons"]:
        lines += ["Why it fails:", ""] + [f"- {r}" for r in result["reasons"]] + [""]
    lines += ["| number | release | export | gate |", "|---|---|---|---|",
              f"| PPL | {n['ppl_release']:.4f} | {n['ppl_export']:.4f} | ratio {n['ppl_ratio']:.4f} "
              f"(<= {s['max_ppl_ratio']}) |",
              f"| KLD mean / median | | {k['mean']:.5f} / {k['median']:.5f} | mean <= {s['max_kld_mean']} |",
              f"| KLD p99 / p99.9 / max | | {k['p99']:.5f} / {k['p999']:.5f} / {k['max']:.5f} | |",
              f"| same top token | | {n['same_top']:.2%} | >= {s['min_same_top']:.0%} |",
              f"| Δp correct token, mean / RMS | | {n['dp_mean']:+.5f} / {n['dp_rms']:.5f} | |"]
    m = n.get("mtp")
    if m:
        lines.append(f"| MTP top-1 (t+2) accuracy; agreement | {m['top1_accuracy_release']:.2%} | "
                     f"{m['top1_accuracy_export']:.2%}; agreement {m['top1_agreement']:.2%} | agreement >= "
                     f"{s['min_mtp_agreement']:.0%} ({m['form']} experts read by {m['engine']}) |")
    lines += ["", "Per block, relative errors: the routed experts' and the whole block's own (the candidate's on "
              "the release's inputs), and the streams' (each model on its own inputs: what serving accumulates).", "",
              "| block | routed experts' own | x median of other layers | block's own | streams' |",
              "|---|---|---|---|---|"]
    for r in result["blocks"]:
        flag = " **outlier**" if r["block"] in result["outliers"] else ""
        lines.append(f"| {r['block']} | {r['routed_rel_err']:.5f} | {r.get('outlier_ratio', float('nan')):.2f}{flag} | "
                     f"{r['local_rel_err']:.5f} | {r['stream_rel_err']:.5f} |")
    return "\n".join(lines) + "\n"


def write_result(result: dict, run_dir: str | Path, stem: str = RECORD) -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.md` in the run directory, each atomically."""
    run_dir = Path(run_dir)
    j, m = run_dir / f"{stem}.json", run_dir / f"{stem}.md"
    atomic.write_json(j, result)
    atomic.write_text(m, format_table(result))
    return j, m


def require_pass(result: dict | None) -> None:
    """Raise FidelityFailed when the gate failed (the notebook's last word; None: the gate did not run;
    `measured`: numbers without the gate, recorded as such)."""
    if result is not None and result["verdict"] == FAIL:
        raise FidelityFailed(f"the export in {result['export']} failed the fidelity gate: {result['summary']}; "
                             + "; ".join(result["reasons"][:5]))


def exit_code(result: dict) -> int:
    """0 pass, 1 fail, 3 measured without the gate."""
    return {PASS: 0, FAIL: 1, MEASURED: 3}[result["verdict"]]


def provenance(run_dir: str | Path, e: dict) -> dict:
    """What the export was made from and with, from the run directory's records: release, params
    digest, versions, calibration data, export settings."""
    run_dir = Path(run_dir)
    q = atomic.read_json(run_dir / "quantize.json") or {}
    m = atomic.read_json(run_dir / "manifest.json") or {}
    step = (m.get("steps") or {}).get("03_recover_export") or {}
    layout = atomic.read_json(Path(e["dir"]) / "quantbook-layout.json") or {}
    hf = (q.get("params") or {}).get("hf_ptq") or {}
    return {"release": e["source"], "run_dir": str(run_dir), "params_file": m.get("params_file"),
            "params_digest": step.get("params_digest"), "git_commit": (m.get("git") or {}).get("commit"),
            "driver": q.get("driver"), "versions": q.get("versions") or m.get("versions") or {},
            "calibration": {"dataset": hf.get("dataset"), "qformat": hf.get("qformat"), **(q.get("calibration") or {})},
            "cast_mxfp4_to_nvfp4": e["cast_mxfp4_to_nvfp4"], "mtp_experts": e["mtp_experts"],
            "layout_report": {k: (layout.get("report") or {}).get(k) for k in ("experts", "projections", "filled")}}


def serving_lines(mtp_form: str | None) -> list[str]:
    """How to serve the export on vLLM and on SGLang, with the MTP setting its form allows."""
    vllm_mtp, sglang_mtp = mtp_form == "nvfp4", mtp_form == "released"
    vllm = "vllm serve EXPORT_DIR --tensor-parallel-size 8 --trust-remote-code"
    sglang = "python -m sglang.launch_server --model-path EXPORT_DIR --tp 8 --trust-remote-code"
    return [
        "```bash",
        "# vLLM (0.33 read): " + ("MTP drafts correctly with this export's NVFP4 MTP experts" if vllm_mtp else
                                  "serve with MTP OFF: vLLM 0.33 misreads the released MXFP4 MTP experts"),
        vllm + (" --speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": 1}'" if vllm_mtp else ""),
        "# SGLang (0.5.23 read): " + ("MTP drafts correctly with the released MXFP4 MTP experts" if sglang_mtp else
                                     "serve with MTP OFF: SGLang 0.5.23 misreads NVFP4 MTP experts"),
        sglang + (" --speculative-algorithm EAGLE --speculative-num-steps 1 --speculative-eagle-topk 1 "
                  "--speculative-num-draft-tokens 2" if sglang_mtp else ""),
        "```"]


def write_model_card(export_dir: str | Path, result: dict, prov: dict) -> Path:
    """`README.md` in the export directory (atomic), as published checkpoints carry: what it was made
    from and with, the fidelity table, and how to serve it."""
    v = prov.get("versions") or {}
    cal = prov.get("calibration") or {}
    lines = ["# DeepSeek V4 NVFP4 (routed experts), made by quantbook", "",
             f"Made from the release `{prov['release']}` by quantbook step 03 (run `{prov['run_dir']}`, params "
             f"`{prov.get('params_file')}`, digest `{prov.get('params_digest')}`, commit `{prov.get('git_commit')}`).", "",
             "- layout: v4-serving (routed experts NVFP4, every other tensor byte-identical to the release; "
             "`quant_method: fp8` + `moe_quant_algo: NVFP4`)",
             f"- expert weights: {'carried losslessly from the release (cast_mxfp4_to_nvfp4)' if prov['cast_mxfp4_to_nvfp4'] else 're-quantized from the calibrated amax'}",
             f"- MTP experts: {result.get('mtp_form') or 'none'}",
             f"- calibration: driver {prov.get('driver')}, {cal.get('qformat')}, {cal.get('samples')} samples / "
             f"{cal.get('tokens')} tokens of `{cal.get('dataset')}`",
             f"- versions: modelopt {v.get('nvidia-modelopt') or v.get('modelopt')}, transformers {v.get('transformers')}, "
             f"torch {v.get('torch')}", "",
             "## Fidelity (quantbook eval)", "",
             "Held-out text, the export as the engine computes it against the release, block by block; numbers in "
             "llama.cpp's `perplexity --kl-divergence` convention.", ""]
    table = format_table(result).splitlines()
    lines += table[2:]  # without the file's own title
    lines += ["", "## Serving", ""] + serving_lines(result.get("mtp_form"))
    path = Path(export_dir) / CARD
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def plot_blocks(result: dict, ax=None):
    """The per-block error growth: each block's own error and the streams' accumulated error (log scale)."""
    import matplotlib.pyplot as plt

    rows = result["blocks"]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 3.5))
    x = list(range(len(rows)))
    ax.semilogy(x, [max(r["stream_rel_err"], 1e-12) for r in rows], "o-", label="streams (candidate vs release)")
    ax.semilogy(x, [max(r["local_rel_err"], 1e-12) for r in rows], "s--", label="block's own error")
    ax.semilogy(x, [max(r["routed_rel_err"], 1e-12) for r in rows], "^:", label="routed experts' own error")
    for i, r in enumerate(rows):
        if r["block"] in result["outliers"]:
            ax.annotate(r["block"], (i, r["routed_rel_err"]), color="red", textcoords="offset points", xytext=(4, 6))
    step = max(1, len(rows) // 16)
    ax.set_xticks(x[::step], [r["block"].replace("layers.", "") for r in rows][::step])
    ax.set_xlabel("block (layer index; mtp.0 last)")
    ax.set_ylabel("relative error")
    ax.set_title(f"export vs release, per block ({result['verdict'].upper()})")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return ax


__all__ = ["evaluate", "held_out_tokens", "conclude", "Evaluation", "fidelity_settings", "format_table", "write_result", "exit_code", "require_pass", "plot_blocks",
           "write_model_card", "provenance", "serving_lines",
           "FIDELITY_DEFAULTS", "GATE_DEFAULTS", "logit_numbers", "judge"]
