"""Step 03's serving layout for DeepSeek V4 (`export_layout: v4-serving`), built from the release.

The one NVFP4 layout vLLM, SGLang and TensorRT-LLM all load for V4 (../shared/docs/
v4-nvfp4-serving-layout.md): routed experts of the main layers become NVFP4, four tensors per
projection; every other tensor is copied byte for byte from the released shards, `mtp.*`
included; same shard names; index, `config.json` and `hf_quant_config.json` in NVIDIA's form.

Input is (release dir, amax, options), never a model: `amax` is a snapshot (`amax.safetensors`
or its dict) keyed by quantizer names, modelopt's on the fused transformers experts or native
ones (`layers.3.ffn.experts.7.w1.weight_quantizer`), so a streaming driver that calibrates
straight from the release can call the same writer.

The expert weights (export.nvfp4): by default carried from the release without loss (its codes
kept, each E8M0 per-32 scale turned into E4M3 per-16 scales under one per-tensor scale; a block
whose scale lies more than E4M3's range below its projection's largest is re-quantized, counted
and named per tensor); with `cast_mxfp4_to_nvfp4: false` re-quantized from the calibrated weight
amax with modelopt's own NVFP4 calls (a test compares the bytes with modelopt's own export).
Calibration then only sets `input_scale`.

MTP (`mtp_experts`): `released` (default, NVIDIA's form) keeps `mtp.*` byte for byte, MTP experts
MXFP4: SGLang 0.5.23 drafts with them; vLLM 0.33 builds MTP experts NVFP4 whatever the config
says and mis-loads MXFP4 ones silently. `nvfp4` writes the MTP experts in the four-tensor form
(weights carried, `input_scale` from MTP's calibrated input amax; refused without them): vLLM
drafts with them, SGLang mis-loads them (export.engines says why, and what each form serves).

Amax rules (the contract): w1 and w3 share amax (max of the two), so their `weight_scale_2`
and `input_scale` are bit-equal. A missing, zero, NaN, infinite or negative amax is filled and
listed: weight amax from the projection's own weights, input amax from the largest valid input
amax of the same projection in the model (MTP: in the MTP block). No valid input amax: refuse.

Shards are written like step 01 (`.partial`, fsync, rename; export.writer) and recorded with size
and digest in `quantbook-layout.json`; a rerun with the same source, amax and options skips
verified shards; index and configs are written only after every shard is whole.
"""

from __future__ import annotations

import functools
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
from ..release.format import ExpertName, dequant_shape, expert_name, expert_prefix, shard_groups, shard_name
from ..release.resume import Job, run_shards
from ..release.shards import DTYPE_SIZE, HASH, INDEX_NAME, Checkpoint, file_digest
from . import nvfp4, writer
from .engines import MTP_SERVING
from .nvfp4 import GROUP

LAYOUT = "v4-serving"
LAYOUT_VERSION = 1
MANIFEST = "quantbook-layout.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
# NVIDIA's published DeepSeek-V4-Pro-NVFP4 (../shared/reference/deepseek-v4/nvfp4-serving-layout/)
PRODUCER = {"name": "modelopt", "version": "dsv4-nvfp4-experts"}
IGNORE = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
# MTP experts NVFP4: every other quantizable module of mtp.* still excluded (attention and shared
# experts by the patterns above, the MTP router and projections by name), its experts not
IGNORE_MTP_NVFP4 = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*.ffn.gate", "mtp.*.e_proj", "mtp.*.h_proj"]
MTP_EXPERTS = ("released", "nvfp4")
# resolved amax columns per expert
W13, W2, IN13, IN2 = range(4)
COLUMNS = ("w13_weight", "w2_weight", "w13_input", "w2_input")


def mtp_layers(config: dict) -> int:
    """How many MTP blocks (`mtp.k`) the release holds."""
    return config.get("num_nextn_predict_layers", 0)


# ----------------------------------------------------------------------------- reading


def release_expert_bf16(src: Checkpoint, prefix: str) -> torch.Tensor:
    """A released FP4 expert projection (`layers.i.ffn.experts.j.wk`) dequantized exactly to BF16."""
    return dequant_fp4(src.tensor(f"{prefix}.weight").view(torch.uint8), src.tensor(f"{prefix}.scale").view(torch.uint8))


# ----------------------------------------------------------------------------- amax


@dataclass
class ExpertAmax:
    """Calibrated amax per routed-expert projection, keyed `layers.i.ffn.experts.j.wk` (fp32 0-d);
    MTP experts' input amax keyed `mtp.k.ffn.experts.j.wk` when they are written NVFP4."""

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


def expert_amax(amax, config: dict, mtp_experts: str = "released") -> ExpertAmax:
    """Pick the routed-expert amax out of a snapshot (path or dict).

    modelopt's fused experts have one weight quantizer per expert for gate_up (w1 and w3 get the
    same value) and one input quantizer per projection shared by all experts of a layer (every
    expert gets it). MTP experts' input amax are taken with `mtp_experts: nvfp4` (their weights
    are carried, so their weight amax are not used); other quantizers are not part of this
    layout. What is not used is counted under `ignored`. Keys outside the config's layers or
    experts are refused.
    """
    if isinstance(amax, (str, Path)):
        amax, _ = load_snapshot(amax)
    E = config["n_routed_experts"]
    layers = {"layers": config["num_hidden_layers"], "mtp": mtp_layers(config)}
    out = ExpertAmax()

    def ignore(why):
        out.ignored[why] = out.ignored.get(why, 0) + 1

    def put(table, block, layer, expert, proj, value, key):
        if not (0 <= layer < layers[block]):
            what = "MTP layers (num_nextn_predict_layers)" if block == "mtp" else "layers"
            raise LayoutError(f"amax {key}: {block} layer {layer}, but config.json has {layers[block]} {what} "
                              "(another model's snapshot?)")
        experts = range(E) if expert is None else [expert]
        if expert is not None and not (0 <= expert < E):
            raise LayoutError(f"amax {key}: expert {expert}, but config.json has {E} routed experts")
        for j in experts:
            table[expert_prefix(layer, j, proj, block)] = value

    for key, value in amax.items():
        qname, attr = split_key(key)
        q = parse_quantizer(qname)
        if q.kind != "routed_expert":
            ignore(f"not a routed expert ({q.kind})")
            continue
        if q.mtp and mtp_experts != "nvfp4":
            ignore("MTP expert (mtp_experts: released keeps them MXFP4)")
            continue
        if attr == "_pre_quant_scale":
            raise LayoutError(f"amax {key}: a pre-quant scale (AWQ/SmoothQuant) has no place in the v4-serving layout")
        if attr == "_global_amax":
            raise LayoutError(f"amax {key}: a static NVFP4 quantizer (global amax); the v4-serving writer takes "
                              "max-calibrated dynamic NVFP4 amax")
        if q.role not in ("weight", "input"):
            ignore(f"{q.role} quantizer")
            continue
        if q.mtp and q.role == "weight":
            ignore("MTP weight amax (MTP expert weights are carried from the release)")
            continue
        v = _scalar(key, value)
        for proj in q.projs:
            put(out.weight if q.role == "weight" else out.input, "mtp" if q.mtp else "layers", q.layer, q.expert,
                proj, v, key)
    return out


def _json_number(v: torch.Tensor | None):
    """A value for the JSON records: a float when finite, else its name ("nan", "inf", "-inf")."""
    if v is None:
        return None
    x = float(v)
    return x if math.isfinite(x) else str(x)


@dataclass
class Resolved:
    """Per layer x expert, the four amax the layout uses (COLUMNS), plus what was filled.

    Rows: the main layers, then (with `mtp_experts: nvfp4`) the MTP layers, input columns only."""

    table: torch.Tensor  # float32 [layers (+ MTP layers), experts, 4]
    fills: list[dict]
    calibrated: dict[str, int]
    main_layers: int = 0

    def digest(self) -> str:
        return hashlib.sha256(self.table.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    def row(self, x: ExpertName) -> torch.Tensor:
        return self.table[x.layer if not x.mtp else self.main_layers + x.layer, x.expert]

    def amax(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight amax, input amax) of a projection (w1/w3 share theirs)."""
        x = expert_name(prefix)
        r = self.row(x)
        return (r[W13], r[IN13]) if x.proj in ("w1", "w3") else (r[W2], r[IN2])


_GROUPS = (("w13", ("w1", "w3"), W13, IN13), ("w2", ("w2",), W2, IN2))
MTP_AMAX_HINT = ("the modelopt and hf_ptq drivers never run the MTP block (transformers drops mtp.* on load): "
                 "calibrate with a driver that calibrates MTP (mtp.0.mlp.experts.*_input_quantizer in "
                 "amax.safetensors), or keep export.mtp_experts: released")


def _input_fallbacks(ea: ExpertAmax, block: str) -> dict[str, torch.Tensor]:
    """The largest valid input amax of each projection group in `block` (the fill value); refuses none."""
    fallback = {}
    for group, projs, _, _ in _GROUPS:
        keys = [k for k in ea.input if k.startswith(block + ".") and k.rsplit(".", 1)[1] in projs]
        valid = [ea.input[k] for k in keys if amax_problem(ea.input[k]) is None]
        if not valid:
            if block == "mtp":
                raise LayoutError(
                    f"export.mtp_experts: nvfp4 needs the MTP block's calibrated input amax for its experts' "
                    f"{'/'.join(projs)} ({len(keys)} present, none finite and > 0), and these amax have none: "
                    f"{MTP_AMAX_HINT}")
            raise LayoutError(
                f"no usable calibrated input amax for the routed experts' {'/'.join(projs)} in any layer "
                f"({len(keys)} present, none finite and > 0): refusing to export. Did calibration reach the experts?")
        fallback[group] = torch.stack(valid).max()
    return fallback


def resolve_amax(ea: ExpertAmax, config: dict, src: Checkpoint | None, use_weight_amax: bool = True,
                 mtp_experts: str = "released") -> Resolved:
    """Apply the contract's rules: fuse w1/w3, fill what is unusable, list every fill; refuse if nothing usable.

    Weight amax fills need the released weights (`src`); with `use_weight_amax=False` (the lossless
    carry derives `weight_scale_2` from the released scales) weight amax is not needed. MTP
    experts (`mtp_experts: nvfp4`) need only input amax, filled within the MTP block.
    """
    L, E, M = config["num_hidden_layers"], config["n_routed_experts"], mtp_layers(config)
    blocks = [("layers", L)] + ([("mtp", M)] if mtp_experts == "nvfp4" and M else [])
    table = torch.zeros(sum(n for _, n in blocks), E, 4, dtype=torch.float32)
    fills: list[dict] = []
    fallback = {block: _input_fallbacks(ea, block) for block, _ in blocks}
    if use_weight_amax and not any(amax_problem(v) is None for v in ea.weight.values()):
        raise LayoutError(f"no usable calibrated weight amax for any routed expert ({len(ea.weight)} present): "
                          "refusing to export")
    calibrated = {"weight": 0, "input": 0, **({"mtp_input": 0} if len(blocks) > 1 else {})}
    row = 0
    for block, n in blocks:
        where = "the MTP block" if block == "mtp" else "the model"

        def fill(name, group, projs, why, v, block=block, where=where):
            fills.append({"projection": name, "amax": "input", "found": why, "value": _json_number(v),
                          "filled_with": float(fallback[block][group]),
                          "rule": f"largest calibrated {'/'.join(projs)} input amax in {where}"})
            return fallback[block][group]

        for i in range(n):
            table[row + i] = _layer_rows(ea, block, i, E, use_weight_amax and block == "layers", src, fill, fills,
                                         calibrated)
        row += n
    return Resolved(table, fills, calibrated, L)


def _layer_rows(ea: ExpertAmax, block: str, i: int, E: int, weights: bool, src: Checkpoint | None, fill,
                fills: list, calibrated: dict) -> torch.Tensor:
    """The [E, 4] amax of layer `i` of `block` (w1/w3 fused); an unusable input amax is replaced by
    `fill(name, group, projs, why, value)` (None from it: no rows, None returned), weight fills go to
    `fills`; counts what was calibrated."""
    rows = torch.zeros(E, 4, dtype=torch.float32)
    for j in range(E):
        for group, projs, wcol, icol in _GROUPS:
            ins, ws = [], []
            for proj in projs:
                name = expert_prefix(i, j, proj, block)
                v = ea.input.get(name)
                why = amax_problem(v)
                if why is None:
                    ins.append(v)
                    calibrated["mtp_input" if block == "mtp" else "input"] += 1
                else:
                    filled = fill(name, group, projs, why, v)
                    if filled is None:
                        return None
                    ins.append(filled)
                if weights:
                    w, filled = _weight_amax(ea, src, name, fills)
                    ws.append(w)
                    calibrated["weight"] += not filled
            rows[j, icol] = torch.stack(ins).max()
            if weights:
                rows[j, wcol] = torch.stack(ws).max()
    return rows


def layer_rows_alone(ea: ExpertAmax, block: str, i: int, config: dict, src: Checkpoint | None,
                     use_weight_amax: bool) -> torch.Tensor | None:
    """Layer `i`'s rows of `resolve_amax`'s table from that layer's amax alone, or None when an input
    amax must be filled (the fill is the largest in the whole model: known only at the end)."""
    counts = {"weight": 0, "input": 0, "mtp_input": 0}
    return _layer_rows(ea, block, i, config["n_routed_experts"], use_weight_amax and block == "layers", src,
                       lambda *_: None, [], counts)


def _weight_amax(ea: ExpertAmax, src: Checkpoint | None, name: str, fills: list) -> tuple[torch.Tensor, bool]:
    """(The projection's calibrated weight amax, False), or (max |w| of its released weights, True),
    that fill listed in `fills`."""
    v = ea.weight.get(name)
    why = amax_problem(v)
    if why is None:
        return v, False
    if src is None:
        raise LayoutError(f"{name}: weight amax {why} and no release to compute it from")
    own = release_expert_bf16(src, name).abs().amax().float()
    if amax_problem(own) is not None:
        raise LayoutError(f"{name}: weight amax {why}, and the released weights give {float(own)}")
    fills.append({"projection": name, "amax": "weight", "found": why, "value": _json_number(v),
                  "filled_with": float(own), "rule": "max |w| of its own released weights"})
    return own, True


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

    def carried(self, prefix: str) -> bool:
        """Is this projection's weight carried from the release (always, for MTP experts)?"""
        return self.options["cast_mxfp4_to_nvfp4"] or expert_name(prefix).mtp


def converted_expert(name: str, mtp_experts: str = "released") -> ExpertName | None:
    """The parsed name of a released routed-expert `.weight` or `.scale` this layout replaces, else None."""
    x = expert_name(name)
    if x is None or x.tensor not in ("weight", "scale"):
        return None
    return x if not x.mtp or mtp_experts == "nvfp4" else None


def expert_entries(prefix: str, shape: tuple[int, int]) -> list:
    """The four NVFP4 tensors replacing a released expert projection with logical shape [out, in]."""
    out, inp = shape
    return [(f"{prefix}.weight", "U8", (out, inp // 2)),
            (f"{prefix}.weight_scale", "F8_E4M3", (out, inp // GROUP)),
            (f"{prefix}.weight_scale_2", "F32", ()),
            (f"{prefix}.input_scale", "F32", ())]


def shard_bytes(config: dict, mtp_experts: str = "released") -> dict[str, int]:
    """Each output shard's size from the release's config alone (what `plan` plans, without amax
    or headers): the preflight's disk check for step 03."""
    return dict(_shard_bytes(json.dumps(config, sort_keys=True), mtp_experts))


@functools.lru_cache(maxsize=8)
def _shard_bytes(config_json: str, mtp_experts: str) -> tuple[tuple[str, int], ...]:
    """`shard_bytes` of one config, computed once (a pure function of it: ~2 s at V4 Pro's 145,116
    names, which every full-size preflight of step 03 asks for)."""
    groups = shard_groups(json.loads(config_json))
    out = {}
    for i, group in enumerate(groups, start=1):
        n = 0
        for spec in group:
            x = converted_expert(spec.name, mtp_experts)
            if x is None:
                n += spec.nbytes
            elif x.tensor == "weight":
                n += sum(math.prod(shape) * DTYPE_SIZE[d] for _, d, shape in expert_entries(x.prefix, dequant_shape(spec)))
        out[shard_name(i, len(groups))] = n
    return tuple(out.items())


# qformats whose calibration the v4-serving layout is written from: per-tensor NVFP4 input and weight amax of
# every routed expert (what `expert_amax` reads). Others (int4_awq, fp8, mxfp4, the AWQ variants' pre-quant
# scales, ...) calibrate other quantities or shapes; the layout would refuse them only after step 02.
SERVING_QFORMATS = ("nvfp4_experts_only", "nvfp4")


def qformat_problem(layout: str, settings: dict) -> str | None:
    """Why step 03's `layout` cannot export a calibration made with these step-02 settings (hf_ptq flag
    names: `qformat`, `recipe`); None when it can. The preflight asks this of step 02 (the layout its
    params export) and of step 03 (the run's recorded settings), so the refusal comes before any work."""
    if layout != LAYOUT:
        return None  # the generic layout is modelopt's own export of whatever it calibrated
    recipe, qformat = settings.get("recipe"), settings.get("qformat")
    if recipe:
        return None if "nvfp4" in str(recipe) else (
            f"quantize.hf_ptq.recipe {recipe!r}: export.layout {LAYOUT} writes NVFP4 experts from NVFP4 expert amax; "
            "this recipe's name names no NVFP4 format")
    if qformat in SERVING_QFORMATS:
        return None
    return (f"quantize.hf_ptq.qformat {qformat!r}: export.layout {LAYOUT} (step 03) writes the routed experts NVFP4 "
            f"from NVFP4 expert amax and cannot export a {qformat} calibration; use one of {list(SERVING_QFORMATS)} "
            "(nvfp4_experts_only: what engines serve), or export.layout generic (research only)")


def check_options(cast_mxfp4_to_nvfp4, mtp_experts) -> None:
    if not isinstance(cast_mxfp4_to_nvfp4, bool):
        raise LayoutError(f"cast_mxfp4_to_nvfp4: {cast_mxfp4_to_nvfp4!r}; write true (carry the released weights "
                          "without loss) or false (re-quantize them from the calibrated weight amax)")
    if mtp_experts not in MTP_EXPERTS:
        raise LayoutError(f"mtp_experts: {mtp_experts!r}; choose one of {list(MTP_EXPERTS)} "
                          f"(released: {MTP_SERVING['released']['drafts_correctly_on']} drafts correctly; "
                          f"nvfp4: {MTP_SERVING['nvfp4']['drafts_correctly_on']} does)")


def open_release(src: Path, dst: Path, cast_mxfp4_to_nvfp4: bool, mtp_experts: str):
    """The release validated for this layout (every header, name, dtype, shape): (its plan, a reader)."""
    from ..release.convert import plan as release_plan

    check_options(cast_mxfp4_to_nvfp4, mtp_experts)
    rp = release_plan(src, dst)  # refuses anything outside the V4 release format
    config = rp.config
    if config.get("expert_dtype", "fp4") != "fp4":
        raise LayoutError(f"{src}: expert_dtype {config.get('expert_dtype')!r}; the v4-serving writer takes the "
                          "FP4-expert release (base models with FP8 experts are not supported)")
    if mtp_experts == "nvfp4" and not mtp_layers(config):
        raise LayoutError(f"{src}: mtp_experts nvfp4, but config.json has no MTP layer (num_nextn_predict_layers)")
    return rp, Checkpoint(src)


def layout_options(cast_mxfp4_to_nvfp4: bool, mtp_experts: str) -> dict:
    """What, besides the release and the amax, decides the bytes (recorded in the manifest)."""
    return {"layout": LAYOUT, "layout_version": LAYOUT_VERSION, "cast_mxfp4_to_nvfp4": cast_mxfp4_to_nvfp4,
            "mtp_experts": mtp_experts}


def plan(src: str | Path, dst: str | Path, amax, cast_mxfp4_to_nvfp4: bool = True,
         mtp_experts: str = "released") -> LayoutPlan:
    """Validate the release (every header, name, dtype, shape) and the amax, and plan every output shard."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    rp, reader = open_release(src, dst, cast_mxfp4_to_nvfp4, mtp_experts)
    config = rp.config
    amax_info = {"origin": str(amax) if isinstance(amax, (str, Path)) else "in-memory"}
    if isinstance(amax, (str, Path)):
        amax_info[HASH] = file_digest(amax)
    ea = expert_amax(amax, config, mtp_experts)
    amax_info["ignored"] = ea.ignored
    resolved = resolve_amax(ea, config, reader, use_weight_amax=not cast_mxfp4_to_nvfp4, mtp_experts=mtp_experts)

    jobs, weight_map = shard_jobs(reader, mtp_experts)
    options = layout_options(cast_mxfp4_to_nvfp4, mtp_experts)
    p = LayoutPlan(src, dst, config, rp.source_id, jobs, weight_map,
                   {k: v for k, v in (reader.index.get("metadata") or {}).items() if k != "total_size"},
                   rp.extra_files, options, resolved, amax_info)
    h = hashlib.sha256(json.dumps({"source_id": p.source_id, **options}, sort_keys=True).encode())
    h.update(resolved.table.contiguous().view(torch.uint8).numpy().tobytes())
    p.identity = h.hexdigest()
    return p


def shard_jobs(reader: Checkpoint, mtp_experts: str = "released") -> tuple[list[ShardJob], dict]:
    """Every output shard's entries and operations, and the index's weight map, from the release's headers."""
    jobs, weight_map = [], {}
    for shard in reader.shards:
        hd = reader.header(shard)
        entries, ops = [], []
        for e in sorted(hd.tensors.values(), key=lambda e: e.start):
            x = converted_expert(e.name, mtp_experts)
            if x and x.tensor == "scale":
                continue
            if x:
                entries += expert_entries(x.prefix, (e.shape[0], e.shape[1] * 2))
                ops.append(("expert", x.prefix))
            else:
                entries.append((e.name, e.dtype, e.shape))
                ops.append(("copy", e))
        jobs.append(ShardJob(shard, entries, ops))
    for name, shard in reader.weight_map.items():  # keep the release's index order
        x = converted_expert(name, mtp_experts)
        if x and x.tensor == "scale":
            continue
        if x:
            for n, _, _ in expert_entries(x.prefix, (1, 32)):
                weight_map[n] = shard
        else:
            weight_map[name] = shard
    return jobs, weight_map


def shard_layers(job: ShardJob) -> list[tuple[str, int]]:
    """The (block, layer) of the routed experts a shard converts, `("layers", 3)` or `("mtp", 0)`."""
    out = {("mtp" if x.mtp else "layers", x.layer) for kind, what in job.ops if kind == "expert"
           for x in [expert_name(what)]}
    return sorted(out)


def rows_digest(table: torch.Tensor, main_layers: int, layers: list[tuple[str, int]]) -> str:
    """sha256 of the resolved-amax rows of these layers: what a shard's bytes depend on besides the release."""
    h = hashlib.sha256()
    for block, i in layers:
        h.update(table[i if block == "layers" else main_layers + i].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- configs
# Engines read only a few of these keys (export.engines): vLLM's MTP draft builds its experts NVFP4
# from moe_quant_algo alone and SGLang's MXFP4 whatever the files say. With NVFP4 MTP experts,
# quantized_layers lists them (TensorRT-LLM reads it per layer) and ignore / exclude_modules no
# longer cover them but still every other quantizable module of mtp.*, so that the files describe
# what the shards hold.


def quantized_layers(config: dict, mtp_experts: str = "released") -> dict:
    blocks = [f"layers.{i}" for i in range(config["num_hidden_layers"])]
    if mtp_experts == "nvfp4":
        blocks += [f"mtp.{k}" for k in range(mtp_layers(config))]
    return {f"{b}.ffn.experts": {"group_size": GROUP, "quant_algo": "NVFP4"} for b in blocks}


def ignore_patterns(mtp_experts: str = "released") -> list[str]:
    """Module patterns kept out of NVFP4: `ignore` in config.json, `exclude_modules` in hf_quant_config.json."""
    return list(IGNORE_MTP_NVFP4 if mtp_experts == "nvfp4" else IGNORE)


def serving_config(config: dict, mtp_experts: str = "released") -> dict:
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
        "ignore": ignore_patterns(mtp_experts),
        "kv_cache_quant_algo": None,
        "moe_quant_algo": "NVFP4",
        "producer": dict(PRODUCER),
        "quant_algo": "MIXED_PRECISION",
        "quantized_layers": quantized_layers(config, mtp_experts),
    })
    out["quantization_config"] = dict(sorted(qc.items()))
    return out


def hf_quant_config(config: dict, mtp_experts: str = "released") -> dict:
    """`hf_quant_config.json`, mirroring config.json's quantization_config."""
    return {"producer": dict(PRODUCER), "quantization": {
        "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "group_size": GROUP,
        "quantized_layers": quantized_layers(config, mtp_experts), "exclude_modules": ignore_patterns(mtp_experts)}}


# ----------------------------------------------------------------------------- writing


def check_destination(p: LayoutPlan) -> None:
    """Refuse the release itself, a foreign non-empty directory, another run's export, or too little disk."""
    def foreign(manifest):
        if manifest.get("identity") != p.identity:
            why = ("another release" if manifest.get("source_id") != p.source_id else
                   "other options" if manifest.get("options") != p.options else "other amax")
            return (f"an export of {why} ({manifest.get('source')}, "
                    f"amax {manifest.get('amax', {}).get('origin')})")

    resume.check_destination(p.src, p.dst, MANIFEST, p.jobs, foreign, what="export directory")


def adopt_along(p: LayoutPlan) -> None:
    """Take over the shards step 02 wrote along calibration (export.along: its manifest says `along`):
    a shard whose layers' amax rows equal this plan's holds this plan's bytes and is kept (its file
    is verified as any recorded shard), the others are dropped and written again; the manifest then
    names this plan, as if this run had written them."""
    m = atomic.read_json(p.dst / MANIFEST)
    if not m or not m.get("along") or m.get("source_id") != p.source_id or m.get("options") != p.options:
        return
    jobs = {j.name: j for j in p.jobs}
    main = p.config["num_hidden_layers"]
    keep = {}
    for name, rec in m.get("shards", {}).items():
        rows = rec.pop("amax_rows", None)
        if name in jobs and rows == rows_digest(p.resolved.table, main, shard_layers(jobs[name])):
            keep[name] = rec
    m.pop("along")
    m.update(identity=p.identity, amax=p.amax_info, shards=keep, complete=False)
    atomic.write_json(p.dst / MANIFEST, m)


def run(p: LayoutPlan, workers: int = 2, device: str = "cpu", progress: bool = True, method: str | None = None,
        threads: int | None = None, window: int | None = None, trusted: frozenset[str] = frozenset()) -> dict:
    """Write every shard not already done and verified, then side files, index and configs; returns the report.

    `workers` shards at a time; inside each, `threads` compute threads ahead of the writer and
    `window` projections per task (export.writer.Settings); `method` re-quantizes with `table`
    (CPU) or `modelopt` (batched, the default on CUDA). `trusted`: shards the calling process wrote
    along its pass just now (`resume.run_shards`: not read again)."""
    adopt_along(p)
    check_destination(p)
    reader = Checkpoint(p.src)
    if any(not (p.dst / j.name).exists() for j in p.jobs):
        nvfp4.modelopt()  # the ~10 s import, once, before the workers start
    settings = writer.Settings(p.carried, p.resolved.amax, device, method, threads, window)
    jobs = [Job(j.name, j.bytes_out, partial(writer.write_shard, p.dst / j.name, j.entries, j.ops, reader, settings))
            for j in p.jobs]
    fresh = {"kind": "quantbook.layout", "layout": LAYOUT, "source": str(p.src), "source_id": p.source_id,
             "options": p.options, "identity": p.identity, "amax": p.amax_info, "complete": False}
    manifest, skipped = run_shards(p.dst, MANIFEST, fresh, jobs, workers, device, "v4-serving", progress,
                                   stale_finals=("config.json", HF_QUANT_CONFIG, INDEX_NAME), trusted=trusted)
    dst, mtp = p.dst, p.options["mtp_experts"]
    for name in p.extra_files:
        atomic.write_bytes(dst / name, (p.src / name).read_bytes())
    atomic.write_json(dst / INDEX_NAME, {"metadata": {**p.index_metadata, "total_size": p.bytes_out},
                                         "weight_map": p.weight_map})
    atomic.write_json(dst / HF_QUANT_CONFIG, hf_quant_config(p.config, mtp))
    atomic.write_json(dst / "config.json", serving_config(p.config, mtp))
    report = layout_report(p, manifest["shards"], skipped=skipped, written=len(p.jobs) - skipped)
    manifest.update(complete=True, report=report)
    atomic.write_json(dst / MANIFEST, manifest)
    return report


def layout_report(p: LayoutPlan, shards: dict, skipped: int, written: int) -> dict:
    """What the export holds and what had to be filled, for the manifest, CLI and notebook."""
    L, E, M = p.config["num_hidden_layers"], p.config["n_routed_experts"], mtp_layers(p.config)
    fills = p.resolved.fills
    count = lambda what: sum(f["amax"] == what for f in fills)  # noqa: E731
    mtp = p.options["mtp_experts"]
    report = {
        "layout": LAYOUT, "export": str(p.dst), "source": str(p.src),
        "experts": L * E, "projections": L * E * 3, "tensors": len(p.weight_map),
        "bytes": p.bytes_out, "shards": len(p.jobs), "shards_written": written, "shards_skipped": skipped,
        "calibrated": p.resolved.calibrated,
        "filled": {"weight": count("weight"), "input": count("input")},
        "experts_filled": len({f["projection"].rsplit(".", 1)[0] for f in fills}),
        "fills": fills, "ignored_amax": p.amax_info.get("ignored", {}),
        "options": p.options, "amax_sha256": p.resolved.digest(),
        "weight_amax_not_release_max": sorted(
            (m for r in shards.values() for m in r.get("weight_amax_not_release_max", [])),
            key=lambda m: m["projection"]),
        "mtp_experts": {"form": mtp, "projections": M * E * 3 if mtp == "nvfp4" else 0, **MTP_SERVING[mtp]},
    }
    if any("cast_blocks" in r for r in shards.values()):
        blocks = sum(r.get("cast_blocks", 0) for r in shards.values())
        lossless = sum(r.get("cast_lossless", 0) for r in shards.values())
        lossy = dict(sorted((n, c) for r in shards.values() for n, c in r.get("cast_lossy", {}).items()))
        report["cast"] = {"blocks": blocks, "lossless": lossless, "lossy": blocks - lossless, "lossy_tensors": lossy}
    return report


def write_serving_layout(source, amax, dst, cast_mxfp4_to_nvfp4: bool = True, mtp_experts: str = "released",
                         workers: int = 2, device: str = "cpu", progress: bool = True, **tuning) -> dict:
    """plan -> check -> run: the one call behind step 03's v4-serving export (and 02's, after calibration).

    `tuning`: `method`, `threads`, `window`, `trusted` of `run` (same bytes whatever they are)."""
    p = plan(source, dst, amax, cast_mxfp4_to_nvfp4=cast_mxfp4_to_nvfp4, mtp_experts=mtp_experts)
    return run(p, workers=workers, device=device, progress=progress, **tuning)


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
    if report["options"].get("cast_mxfp4_to_nvfp4", True):
        lines.append("  expert weights carried from the release (cast_mxfp4_to_nvfp4: true)")
    else:
        lines.append("  expert weights re-quantized from the calibrated weight amax (cast_mxfp4_to_nvfp4: false)")
    if "cast" in report:
        c = report["cast"]
        lines.append(f"  carried: {c['lossless']:,} of {c['blocks']:,} 32-blocks exactly as released; {c['lossy']:,} "
                     f"re-quantized (scale more than E4M3's range below the projection's largest) in "
                     f"{len(c['lossy_tensors'])} tensors")
        for name, n in list(c["lossy_tensors"].items())[:10]:
            lines.append(f"    {name}: {n} blocks re-quantized")
        if len(c["lossy_tensors"]) > 10:
            lines.append(f"    ... {len(c['lossy_tensors']) - 10} more tensors in {MANIFEST}")
    m = report.get("mtp_experts")
    if m:
        lines.append(f"  MTP experts: {m['form']} ({m['drafts_correctly_on']} drafts correctly). {m['note']}")
    return "\n".join(lines)
