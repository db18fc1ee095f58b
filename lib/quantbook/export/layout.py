"""Step 03's serving layout for DeepSeek V4 (`export_layout: v4-serving`), built from the release.

The one NVFP4 layout vLLM, SGLang and TensorRT-LLM all load for V4 (../shared/docs/
v4-nvfp4-serving-layout.md): routed experts of the main layers become NVFP4, four tensors per
projection; every other tensor is copied byte for byte from the released shards, `mtp.*`
included; same shard names; index, `config.json` and `hf_quant_config.json` in NVIDIA's form.

Input is (release dir, amax, options), never a model: `amax` is a snapshot (`amax.safetensors`
or its dict) keyed by quantizer names, modelopt's on the fused transformers experts or native
ones (`layers.3.ffn.experts.7.w1.weight_quantizer`), so a streaming driver that calibrates
straight from the release can call the same writer.

The NVFP4 numbers are modelopt's own: each released FP4 expert weight is dequantized exactly
(quantbook.dequant), then modelopt's NVFP4QTensor computes block scales and codes from a
TensorQuantizer carrying the calibrated amax, the calls and dtypes modelopt's
`_export_quantized_weight` makes. A test compares the bytes with modelopt's own export.

Amax rules (the contract): w1 and w3 share amax (max of the two), so their `weight_scale_2`
and `input_scale` are bit-equal. A missing, zero, NaN, infinite or negative amax is filled and
listed: weight amax from the projection's own weights, input amax from the largest valid input
amax of the same projection in the model. No valid input amax at all: refuse.

Shards are written like step 01 (ShardWriter: `.partial`, fsync, rename) and recorded with size
and digest in `quantbook-layout.json`; a rerun with the same source, amax and options skips
verified shards; index and configs are written only after every shard is whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .. import atomic
from ..amax import amax_problem, load_snapshot, parse_quantizer, split_key
from ..errors import LayoutError
from ..release import resume
from ..release.dequant import dequant_fp4
from ..release.format import FP4_GROUP, dequant_shape, expert_name, expert_prefix, shard_groups, shard_name
from ..release.resume import Job, run_shards
from ..release.shards import DTYPE_SIZE, HASH, INDEX_NAME, Checkpoint, ShardWriter, file_digest, torch_dtype

LAYOUT = "v4-serving"
LAYOUT_VERSION = 1
MANIFEST = "quantbook-layout.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
GROUP = 16  # NVFP4 block: one E4M3 scale per 16 inputs
FP4_MAX, FP8_MAX = 6.0, 448.0
# NVIDIA's published DeepSeek-V4-Pro-NVFP4 (../shared/reference/deepseek-v4/nvfp4-serving-layout/)
PRODUCER = {"name": "modelopt", "version": "dsv4-nvfp4-experts"}
IGNORE = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
# resolved amax columns per expert
W13, W2, IN13, IN2 = range(4)
COLUMNS = ("w13_weight", "w2_weight", "w13_input", "w2_input")


# ----------------------------------------------------------------------------- reading


def release_expert_bf16(src: Checkpoint, prefix: str) -> torch.Tensor:
    """A released FP4 expert projection (`layers.i.ffn.experts.j.wk`) dequantized exactly to BF16."""
    return dequant_fp4(src.tensor(f"{prefix}.weight").view(torch.uint8), src.tensor(f"{prefix}.scale").view(torch.uint8))


# ----------------------------------------------------------------------------- amax


@dataclass
class ExpertAmax:
    """Calibrated amax per routed-expert projection, keyed `layers.i.ffn.experts.j.wk` (fp32 0-d)."""

    weight: dict[str, torch.Tensor] = field(default_factory=dict)
    input: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)  # why -> count of snapshot keys not used


def _scalar(key: str, v: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v).detach().to("cpu")
    if v.numel() != 1:
        raise LayoutError(
            f"amax {key}: {v.numel()} values (shape {list(v.shape)}); the v4-serving writer takes one amax per "
            "expert projection (max calibration). Per-block or per-channel amax (static NVFP4, MSE) is not supported.")
    return v.reshape(()).to(torch.float32)


def expert_amax(amax, config: dict) -> ExpertAmax:
    """Pick the routed-expert amax of the main layers out of a snapshot (path or dict).

    modelopt's fused experts have one weight quantizer per expert for gate_up (w1 and w3 get the
    same value) and one input quantizer per projection shared by all experts of a layer (every
    expert gets it). MTP experts stay MXFP4 and other quantizers are not part of this layout:
    both are counted under `ignored`. Keys outside the config's layers or experts are refused.
    """
    if isinstance(amax, (str, Path)):
        amax, _ = load_snapshot(amax)
    L, E = config["num_hidden_layers"], config["n_routed_experts"]
    out = ExpertAmax()

    def ignore(why):
        out.ignored[why] = out.ignored.get(why, 0) + 1

    def put(table, layer, expert, proj, value, key):
        if not (0 <= layer < L):
            raise LayoutError(f"amax {key}: layer {layer}, but config.json has {L} layers (another model's snapshot?)")
        experts = range(E) if expert is None else [expert]
        if expert is not None and not (0 <= expert < E):
            raise LayoutError(f"amax {key}: expert {expert}, but config.json has {E} routed experts")
        for j in experts:
            table[expert_prefix(layer, j, proj)] = value

    for key, value in amax.items():
        qname, attr = split_key(key)
        q = parse_quantizer(qname)
        if q.kind != "routed_expert":
            ignore(f"not a routed expert ({q.kind})")
            continue
        if q.mtp:
            ignore("MTP expert (stays MXFP4)")
            continue
        if attr == "_pre_quant_scale":
            raise LayoutError(f"amax {key}: a pre-quant scale (AWQ/SmoothQuant) has no place in the v4-serving layout")
        if attr == "_global_amax":
            raise LayoutError(f"amax {key}: a static NVFP4 quantizer (global amax); the v4-serving writer takes "
                              "max-calibrated dynamic NVFP4 amax")
        if q.role not in ("weight", "input"):
            ignore(f"{q.role} quantizer")
            continue
        v = _scalar(key, value)
        for proj in q.projs:
            put(out.weight if q.role == "weight" else out.input, q.layer, q.expert, proj, v, key)
    return out


def _json_number(v: torch.Tensor | None):
    """A value for the JSON records: a float when finite, else its name ("nan", "inf", "-inf")."""
    if v is None:
        return None
    x = float(v)
    return x if math.isfinite(x) else str(x)


@dataclass
class Resolved:
    """Per main layer x expert, the four amax the layout uses (COLUMNS), plus what was filled."""

    table: torch.Tensor  # float32 [layers, experts, 4]
    fills: list[dict]
    calibrated: dict[str, int]

    def digest(self) -> str:
        return hashlib.sha256(self.table.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def resolve_amax(ea: ExpertAmax, config: dict, src: Checkpoint | None, use_weight_amax: bool = True) -> Resolved:
    """Apply the contract's rules: fuse w1/w3, fill what is unusable, list every fill; refuse if nothing usable.

    Weight amax fills need the released weights (`src`); with `use_weight_amax=False` (the lossless
    MXFP4 cast derives `weight_scale_2` from the released scales) weight amax is not needed.
    """
    L, E = config["num_hidden_layers"], config["n_routed_experts"]
    table = torch.zeros(L, E, 4, dtype=torch.float32)
    fills: list[dict] = []
    # input fill values: the largest valid input amax of the same projection in the model
    fallback: dict[str, torch.Tensor] = {}
    for group, projs in (("w13", ("w1", "w3")), ("w2", ("w2",))):
        valid = [v for k, v in ea.input.items() if k.rsplit(".", 1)[1] in projs and amax_problem(v) is None]
        if not valid:
            raise LayoutError(
                f"no usable calibrated input amax for the routed experts' {'/'.join(projs)} in any layer "
                f"({sum(k.rsplit('.', 1)[1] in projs for k in ea.input)} present, none finite and > 0): refusing "
                "to export. Did calibration reach the experts?")
        fallback[group] = torch.stack(valid).max()
    if use_weight_amax and not any(amax_problem(v) is None for v in ea.weight.values()):
        raise LayoutError(f"no usable calibrated weight amax for any routed expert ({len(ea.weight)} present): "
                          "refusing to export")
    calibrated = {"weight": 0, "input": 0}
    for i in range(L):
        for j in range(E):
            prefix = f"layers.{i}.ffn.experts.{j}"
            for group, projs, wcol, icol in (("w13", ("w1", "w3"), W13, IN13), ("w2", ("w2",), W2, IN2)):
                ins, ws = [], []
                for p in projs:
                    name = f"{prefix}.{p}"
                    v = ea.input.get(name)
                    why = amax_problem(v)
                    if why is None:
                        ins.append(v)
                        calibrated["input"] += 1
                    else:
                        fills.append({"projection": name, "amax": "input", "found": why,
                                      "value": _json_number(v),
                                      "filled_with": float(fallback[group]),
                                      "rule": f"largest calibrated {'/'.join(projs)} input amax in the model"})
                        ins.append(fallback[group])
                    if not use_weight_amax:
                        continue
                    v = ea.weight.get(name)
                    why = amax_problem(v)
                    if why is None:
                        ws.append(v)
                        calibrated["weight"] += 1
                    else:
                        if src is None:
                            raise LayoutError(f"{name}: weight amax {why} and no release to compute it from")
                        own = release_expert_bf16(src, name).abs().amax().float()
                        if amax_problem(own) is not None:
                            raise LayoutError(f"{name}: weight amax {why}, and the released weights give {float(own)}")
                        fills.append({"projection": name, "amax": "weight", "found": why,
                                      "value": _json_number(v), "filled_with": float(own),
                                      "rule": "max |w| of its own released weights"})
                        ws.append(own)
                table[i, j, icol] = torch.stack(ins).max()
                if use_weight_amax:
                    table[i, j, wcol] = torch.stack(ws).max()
    return Resolved(table, fills, calibrated)


# ----------------------------------------------------------------------------- NVFP4 math (modelopt's)

_MODELOPT: dict = {}


def _modelopt():
    """modelopt's NVFP4 pieces, imported once (the import takes ~10 s)."""
    if not _MODELOPT:
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        _MODELOPT.update(NVFP4QTensor=NVFP4QTensor, TensorQuantizer=TensorQuantizer,
                         QuantizerAttributeConfig=QuantizerAttributeConfig)
    return _MODELOPT


def nvfp4_quantizer(amax: torch.Tensor):
    """A modelopt TensorQuantizer as NVFP4_EXPERTS_ONLY_CFG builds it for experts, holding `amax`."""
    m = _modelopt()
    q = m["TensorQuantizer"](m["QuantizerAttributeConfig"](
        num_bits=(2, 1), block_sizes={-1: GROUP, "type": "dynamic", "scale_bits": (4, 3)}))
    q.amax = amax.reshape(()).to(torch.float32)
    return q


def weight_scale_2(weight_amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale, modelopt's `get_weights_scaling_factor_2_from_quantizer` (amax / (6*448))."""
    nv = _modelopt()["NVFP4QTensor"]
    return nv.get_weights_scaling_factor_2_from_quantizer(nvfp4_quantizer(weight_amax)).reshape(())


def input_scale(input_amax: torch.Tensor) -> torch.Tensor:
    """Activation scale, modelopt's `get_activation_scaling_factor` (amax / (6*448))."""
    nv = _modelopt()["NVFP4QTensor"]
    return nv.get_activation_scaling_factor(nvfp4_quantizer(input_amax)).reshape(())


def quantize_nvfp4(w: torch.Tensor, ws2: torch.Tensor, block_scale: torch.Tensor | None = None):
    """BF16 [out, in] -> (packed codes U8 [out, in/2], E4M3 scales [out, in/16]) with modelopt's calls.

    As `_export_quantized_weight` does: block scales from `get_weights_scaling_factor(weight, 16,
    weight_scale_2)`, codes from `NVFP4QTensor.quantize(weight, 16, scales, weight_scale_2)`.
    `block_scale` overrides the scales (the lossless MXFP4 cast).
    """
    nv = _modelopt()["NVFP4QTensor"]
    ws2 = ws2.to(w.device)
    if block_scale is None:
        block_scale = nv.get_weights_scaling_factor(w, GROUP, ws2)[0]
    codes = nv.quantize(w, GROUP, block_scale.to(w.device), ws2)[0]._quantized_data
    return codes, block_scale


def cast_scales(k: torch.Tensor, k_max: int):
    """Lossless MXFP4 -> NVFP4 scales for one projection: (E4M3 [out, in/16], ws2, lossless mask per 32-block).

    k = E8M0 exponent per 32-block; `weight_scale_2 = 2^(k_max-8)`, each 16-block's scale
    `2^(k_j-(k_max-8))`, exact in E4M3 while k_max - k_j <= 17 (2^-9 is E4M3's smallest value).
    """
    rel = (k - (k_max - 8)).to(torch.float32)  # exponent of the 16-block scale, <= 8
    lossless = (k_max - k) <= 17
    scale = torch.exp2(rel.clamp(min=-9)).repeat_interleave(2, dim=1).to(torch.float8_e4m3fn)
    return scale, torch.tensor(2.0 ** (k_max - 8), dtype=torch.float32), lossless


# ----------------------------------------------------------------------------- plan


@dataclass
class ShardJob:
    name: str
    entries: list  # (name, dtype, shape) of the output, in order
    ops: list  # ("copy", TensorEntry) | ("expert", prefix)

    @property
    def bytes_out(self) -> int:
        return sum(math.prod(s) * DTYPE_SIZE[d] for _, d, s in self.entries)


@dataclass
class LayoutPlan:
    src: Path
    dst: Path
    config: dict
    source_id: str
    jobs: list[ShardJob]
    weight_map: dict
    index_metadata: dict
    extra_files: list[str]
    options: dict
    resolved: Resolved
    amax_info: dict
    identity: str = ""

    @property
    def bytes_out(self) -> int:
        return sum(j.bytes_out for j in self.jobs)


def _released_main_expert(name: str):
    """The parsed name of a main layer's released routed-expert `.weight` or `.scale`, else None."""
    x = expert_name(name)
    return x if x is not None and not x.mtp and x.tensor in ("weight", "scale") else None


def expert_entries(prefix: str, shape: tuple[int, int]) -> list:
    """The four NVFP4 tensors replacing a released expert projection with logical shape [out, in]."""
    out, inp = shape
    return [(f"{prefix}.weight", "U8", (out, inp // 2)),
            (f"{prefix}.weight_scale", "F8_E4M3", (out, inp // GROUP)),
            (f"{prefix}.weight_scale_2", "F32", ()),
            (f"{prefix}.input_scale", "F32", ())]


def shard_bytes(config: dict) -> dict[str, int]:
    """Each output shard's size from the release's config alone (what `plan` plans, without amax
    or headers): the preflight's disk check for step 03."""
    groups = shard_groups(config)
    out = {}
    for i, group in enumerate(groups, start=1):
        n = 0
        for spec in group:
            x = _released_main_expert(spec.name)
            if x is None:
                n += spec.nbytes
            elif x.tensor == "weight":
                n += sum(math.prod(shape) * DTYPE_SIZE[d] for _, d, shape in expert_entries(x.prefix, dequant_shape(spec)))
        out[shard_name(i, len(groups))] = n
    return out


def plan(src: str | Path, dst: str | Path, amax, cast_mxfp4_to_nvfp4: bool = False) -> LayoutPlan:
    """Validate the release (every header, name, dtype, shape) and the amax, and plan every output shard."""
    from ..release.convert import plan as release_plan

    src, dst = Path(src).resolve(), Path(dst).resolve()
    rp = release_plan(src, dst)  # refuses anything outside the V4 release format
    config = rp.config
    if config.get("expert_dtype", "fp4") != "fp4":
        raise LayoutError(f"{src}: expert_dtype {config.get('expert_dtype')!r}; the v4-serving writer takes the "
                          "FP4-expert release (base models with FP8 experts are not supported)")
    reader = Checkpoint(src)
    amax_info = {"origin": str(amax) if isinstance(amax, (str, Path)) else "in-memory"}
    if isinstance(amax, (str, Path)):
        amax_info[HASH] = file_digest(amax)
    ea = expert_amax(amax, config)
    amax_info["ignored"] = ea.ignored
    resolved = resolve_amax(ea, config, reader, use_weight_amax=not cast_mxfp4_to_nvfp4)

    jobs, weight_map = [], {}
    for shard in reader.shards:
        hd = reader.header(shard)
        entries, ops = [], []
        for e in sorted(hd.tensors.values(), key=lambda e: e.start):
            x = _released_main_expert(e.name)
            if x and x.tensor == "scale":
                continue
            if x:
                new = expert_entries(x.prefix, (e.shape[0], e.shape[1] * 2))
                entries += new
                ops.append(("expert", x.prefix))
            else:
                entries.append((e.name, e.dtype, e.shape))
                ops.append(("copy", e))
        jobs.append(ShardJob(shard, entries, ops))
    for name, shard in reader.weight_map.items():  # keep the release's index order
        x = _released_main_expert(name)
        if x and x.tensor == "scale":
            continue
        if x:
            for n, _, _ in expert_entries(x.prefix, (1, 32)):
                weight_map[n] = shard
        else:
            weight_map[name] = shard
    options = {"layout": LAYOUT, "layout_version": LAYOUT_VERSION, "cast_mxfp4_to_nvfp4": bool(cast_mxfp4_to_nvfp4)}
    p = LayoutPlan(src, dst, config, rp.source_id, jobs, weight_map,
                   {k: v for k, v in (reader.index.get("metadata") or {}).items() if k != "total_size"},
                   rp.extra_files, options, resolved, amax_info)
    h = hashlib.sha256(json.dumps({"source_id": p.source_id, **options}, sort_keys=True).encode())
    h.update(resolved.table.contiguous().view(torch.uint8).numpy().tobytes())
    p.identity = h.hexdigest()
    return p


# ----------------------------------------------------------------------------- configs


def quantized_layers(config: dict) -> dict:
    return {f"layers.{i}.ffn.experts": {"group_size": GROUP, "quant_algo": "NVFP4"}
            for i in range(config["num_hidden_layers"])}


def serving_config(config: dict) -> dict:
    """The release's config.json with the contract's `quantization_config` (FP8 keys kept)."""
    out = dict(config)
    qc = dict(config.get("quantization_config") or {})
    if qc.get("quant_method") != "fp8":
        raise LayoutError(f"config.json: quantization_config.quant_method {qc.get('quant_method')!r}; the release "
                          "has 'fp8' (is the source a released V4 checkpoint?)")
    for k in ("ignored_layers", "modules_to_not_convert"):
        qc.pop(k, None)
    qc.update({
        "config_groups": {"group_0": {
            "input_activations": {"dynamic": False, "group_size": GROUP, "num_bits": 4, "type": "float"},
            "targets": ["Linear"],
            "weights": {"dynamic": False, "group_size": GROUP, "num_bits": 4, "type": "float"},
        }},
        "group_size": GROUP,
        "ignore": list(IGNORE),
        "kv_cache_quant_algo": None,
        "moe_quant_algo": "NVFP4",
        "producer": dict(PRODUCER),
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": quantized_layers(config),
    })
    out["quantization_config"] = dict(sorted(qc.items()))
    return out


def hf_quant_config(config: dict) -> dict:
    """`hf_quant_config.json`, mirroring config.json's quantization_config."""
    return {"producer": dict(PRODUCER), "quantization": {
        "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "group_size": GROUP,
        "quantized_layers": quantized_layers(config), "exclude_modules": list(IGNORE)}}


# ----------------------------------------------------------------------------- writing


def _device_tensor(t: torch.Tensor, device: str) -> torch.Tensor:
    return t if device == "cpu" else t.to(device)


class _Expert:
    """Builds the four tensors of one expert projection (and, when casting, reads w1/w3 scales)."""

    def __init__(self, p: LayoutPlan, reader: Checkpoint, device: str):
        self.p, self.reader, self.device = p, reader, device
        self.cast = p.options["cast_mxfp4_to_nvfp4"]
        self.blocks = 0
        self.lossless = 0
        self.own: dict = {}  # (layer, expert, group) -> {proj: max |w| of the released weights}
        self.mismatch: list[dict] = []

    def _k(self, prefix: str) -> torch.Tensor:
        s = self.reader.tensor(f"{prefix}.scale").view(torch.uint8)
        if bool((s == 0xFF).any()):
            raise LayoutError(f"{prefix}.scale: E8M0 NaN (0xFF) in the release")
        return s.to(torch.int32) - 127

    def tensors(self, prefix: str) -> list[torch.Tensor]:
        x = expert_name(prefix)
        i, j, proj = x.layer, x.expert, x.proj
        row = self.p.resolved.table[i, j]
        fused = proj in ("w1", "w3")
        isc = input_scale(row[IN13 if fused else IN2])
        w = _device_tensor(release_expert_bf16(self.reader, prefix), self.device)
        if not self.cast:
            ws2 = weight_scale_2(row[W13 if fused else W2])
            codes, scale = quantize_nvfp4(w, ws2)
            self._compare_with_release(i, j, proj, float(w.abs().amax()), float(row[W13 if fused else W2]))
        else:
            k = self._k(prefix)
            group = [expert_prefix(i, j, q) for q in (("w1", "w3") if fused else ("w2",))]
            k_max = max(int(self._k(g).max()) if g != prefix else int(k.max()) for g in group)
            scale, ws2, lossless = cast_scales(k, k_max)
            codes, scale = quantize_nvfp4(w, ws2, _device_tensor(scale, self.device))
            # lossless 32-blocks keep the released codes exactly (even the -0 code 8)
            released = self.reader.tensor(f"{prefix}.weight").view(torch.uint8)
            keep = lossless.repeat_interleave(FP4_GROUP // 2, dim=1)
            codes = torch.where(_device_tensor(keep, self.device), _device_tensor(released, self.device), codes)
            self.blocks += lossless.numel()
            self.lossless += int(lossless.sum())
        return [codes.cpu().contiguous(), scale.cpu().contiguous(), ws2.cpu().reshape(()).contiguous(),
                isc.cpu().reshape(()).contiguous()]


    def _compare_with_release(self, i: int, j: int, proj: str, own: float, amax: float) -> None:
        """Max calibration on the BF16 copy of this release gives weight amax = max |w| exactly (w1/w3:
        the max of both); anything else means amax from another model, other weights or another method."""
        group = ("w1", "w3") if proj in ("w1", "w3") else ("w2",)
        seen = self.own.setdefault((i, j, group), {})
        seen[proj] = own
        if len(seen) == len(group) and max(seen.values()) != amax:
            self.mismatch.append({"projection": f"layers.{i}.ffn.experts.{j}.{'/'.join(group)}", "amax": amax,
                                  "release_max": max(seen.values())})


def write_shard(job: ShardJob, p: LayoutPlan, reader: Checkpoint, device: str = "cpu", on_bytes=None) -> dict:
    """Write one output shard atomically; returns its size and digest (and cast counts)."""
    ex = _Expert(p, reader, device)
    at = 0
    with ShardWriter(p.dst / job.name, job.entries, metadata={"format": "pt"}) as writer:
        for kind, what in job.ops:
            before = writer.written
            if kind == "copy":
                writer.copy_range(reader.dir / job.name, what.start, what.nbytes)
                at += 1
            else:
                for t, (name, dtype, shape) in zip(ex.tensors(what), job.entries[at: at + 4]):
                    if t.dtype != torch_dtype(dtype) or tuple(t.shape) != tuple(shape):
                        raise AssertionError(f"{name}: built {t.dtype}{list(t.shape)}, planned {dtype}{list(shape)}")
                    writer.write(t.view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy())
                at += 4
            if on_bytes:
                on_bytes(writer.written - before)
        size, digest = writer.finish()
    rec = {"size": size, HASH: digest}
    if ex.mismatch:
        rec["weight_amax_not_release_max"] = ex.mismatch
    if ex.cast:
        rec["cast_blocks"], rec["cast_lossless"] = ex.blocks, ex.lossless
    return rec


def check_destination(p: LayoutPlan) -> None:
    """Refuse the release itself, a foreign non-empty directory, another run's export, or too little disk."""
    def foreign(manifest):
        if manifest.get("identity") != p.identity:
            why = ("another release" if manifest.get("source_id") != p.source_id else
                   "other options" if manifest.get("options") != p.options else "other amax")
            return (f"an export of {why} ({manifest.get('source')}, "
                    f"amax {manifest.get('amax', {}).get('origin')})")

    resume.check_destination(p.src, p.dst, MANIFEST, p.jobs, foreign, what="export directory")


def run(p: LayoutPlan, workers: int = 2, device: str = "cpu", progress: bool = True) -> dict:
    """Write every shard not already done and verified, then side files, index and configs; returns the report."""
    check_destination(p)
    reader = Checkpoint(p.src)
    if any(not (p.dst / j.name).exists() for j in p.jobs):
        _modelopt()
    jobs = [Job(j.name, j.bytes_out, partial(write_shard, j, p, reader, device)) for j in p.jobs]
    fresh = {"kind": "quantbook.layout", "layout": LAYOUT, "source": str(p.src), "source_id": p.source_id,
             "options": p.options, "identity": p.identity, "amax": p.amax_info, "complete": False}
    manifest, skipped = run_shards(p.dst, MANIFEST, fresh, jobs, workers, device, "v4-serving", progress,
                                   stale_finals=("config.json", HF_QUANT_CONFIG, INDEX_NAME))
    dst = p.dst
    for name in p.extra_files:
        atomic.write_bytes(dst / name, (p.src / name).read_bytes())
    atomic.write_json(dst / INDEX_NAME, {"metadata": {**p.index_metadata, "total_size": p.bytes_out},
                                         "weight_map": p.weight_map})
    atomic.write_json(dst / HF_QUANT_CONFIG, hf_quant_config(p.config))
    atomic.write_json(dst / "config.json", serving_config(p.config))
    report = layout_report(p, manifest["shards"], skipped=skipped, written=len(p.jobs) - skipped)
    manifest.update(complete=True, report=report)
    atomic.write_json(dst / MANIFEST, manifest)
    return report


def layout_report(p: LayoutPlan, shards: dict, skipped: int, written: int) -> dict:
    """What the export holds and what had to be filled, for the manifest, CLI and notebook."""
    L, E = p.config["num_hidden_layers"], p.config["n_routed_experts"]
    fills = p.resolved.fills
    count = lambda what: sum(f["amax"] == what for f in fills)  # noqa: E731
    report = {
        "layout": LAYOUT, "export": str(p.dst), "source": str(p.src),
        "experts": L * E, "projections": L * E * 3, "tensors": len(p.weight_map),
        "bytes": p.bytes_out, "shards": len(p.jobs), "shards_written": written, "shards_skipped": skipped,
        "calibrated": p.resolved.calibrated,
        "filled": {"weight": count("weight"), "input": count("input")},
        "experts_filled": len({f["projection"].rsplit(".", 1)[0] for f in fills}),
        "fills": fills, "ignored_amax": p.amax_info.get("ignored", {}),
        "options": p.options, "amax_sha256": p.resolved.digest(),
        "weight_amax_not_release_max": [m for r in shards.values() for m in r.get("weight_amax_not_release_max", [])],
    }
    if p.options["cast_mxfp4_to_nvfp4"]:
        blocks = sum(r.get("cast_blocks", 0) for r in shards.values())
        lossless = sum(r.get("cast_lossless", 0) for r in shards.values())
        report["cast"] = {"blocks": blocks, "lossless": lossless, "lossy": blocks - lossless}
    return report


def write_serving_layout(source, amax, dst, cast_mxfp4_to_nvfp4: bool = False, workers: int = 2,
                         device: str = "cpu", progress: bool = True) -> dict:
    """plan -> check -> run: the one call behind step 03's v4-serving export (and 02's, after calibration)."""
    p = plan(source, dst, amax, cast_mxfp4_to_nvfp4=cast_mxfp4_to_nvfp4)
    return run(p, workers=workers, device=device, progress=progress)


def report_summary(report: dict) -> str:
    """A few lines for the CLI and the notebook."""
    lines = [f"v4-serving export: {report['export']}",
             f"  {report['experts']:,} routed experts ({report['projections']:,} projections) NVFP4, "
             f"{report['tensors']:,} tensors in {report['shards']} shards "
             f"({report['shards_written']} written, {report['shards_skipped']} already complete)",
             f"  amax filled: {report['filled']['weight']} weight, {report['filled']['input']} input "
             f"({report['experts_filled']} experts)"]
    for f in report["fills"][:10]:
        lines.append(f"    {f['projection']} {f['amax']} amax {f['found']} -> {f['filled_with']:.6g} ({f['rule']})")
    if len(report["fills"]) > 10:
        lines.append(f"    ... {len(report['fills']) - 10} more in {MANIFEST}")
    odd = report.get("weight_amax_not_release_max") or []
    if odd:
        lines.append(f"  WARNING: {len(odd)} expert weight amax differ from max |w| of the release's weights "
                     f"(e.g. {odd[0]['projection']}: {odd[0]['amax']:.6g} vs {odd[0]['release_max']:.6g}): amax "
                     "from another model, other weights or not max calibration")
    if "cast" in report:
        c = report["cast"]
        lines.append(f"  MXFP4 -> NVFP4 cast: {c['lossless']:,} of {c['blocks']:,} 32-blocks lossless")
    return "\n".join(lines)
