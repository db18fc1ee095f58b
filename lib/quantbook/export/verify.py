"""`quantbook verify`: is an export the V4 serving layout, whole, and numerically right?

For a v4-serving export it applies the contract's checklist (../shared/docs/v4-nvfp4-serving-
layout.md) plus a numeric check, and gives `pass` or `fail`, or `incomplete` when nothing failed but
a check could not run (no release to compare with): not proven, never read as a pass. A generic
modelopt export of the transformers model gets `research-only` with every reason it is not loadable
by vLLM/SGLang for V4, or `fail` when its numbers are wrong.

The numeric check dequantizes every NVFP4 expert weight as the engines decode it
(`export.engine.decode_nvfp4`: E2M1 code x E4M3 `weight_scale` x `weight_scale_2`) and compares
it with the release's own values (its MXFP4 decoded exactly, or step 01's BF16 copy, the same
values, when only that is given): a block carried from the release must equal them exactly (an
export's manifest names the tensors carried and their lossy blocks), every other block must stay
within NVFP4's rounding bound. The bound, per 16-element block b with scale unit
S_b = weight_scale_b * weight_scale_2 and reference block maximum a_b:

    |W - Wq| <= max( min(S_b, a_b/6 * (1 + 2^-4) + 2^-10 * ws2),   # one E2M1 step
                     2^-9 * ws2,                                     # E4M3's smallest scale
                     a_b/16 + 6 * 2^-10 * ws2 )                      # saturation at 6

Why: codes are round-to-nearest on the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, whose widest gap
is 2, so a value inside the grid's range is off by at most one scale unit. The block scale is
a_b/(6 ws2) rounded to E4M3 (3 mantissa bits: at most 2^-4 relative, 2^-10 absolute below
2^-6), so a unit larger than the block's own ideal one cannot be right (that caps a scale
inflated to hide errors), and values above 6 units saturate by at most a_b/16. A lossless
MXFP4 cast has zero error. A swapped nibble, row, projection or scale breaks it by far.

The check's arithmetic lives in `export.numeric`: table lookups by row chunk in per-thread buffers,
the same numbers as the straightforward whole-tensor computation bit for bit (issue 18; `--workers`
threads, each ~230 MB of buffers at V4 Pro's expert shape).

Check 9 reads config.json as vLLM 0.33 does (export.engines): the routed experts of every block
must be built the form they are stored in; MXFP4 MTP experts under `moe_quant_algo: NVFP4` are
a warning ("MTP drafts will be wrong on vLLM"): SGLang drafts correctly with them. Every expert
projection missing any of its four tensors is named (engines load those without an error).

An export step 02's streaming pass wrote (`quantize.export_along`) carries, in its manifest, the
numbers of check 7 the pass computed with this module's code on the bytes it wrote, while they and
the release's were in memory (export.writer): check 7 takes them, when `--source` is the release
they were computed against and for shards whose size is the recorded one, instead of reading those
tensors again (`--reread` reads them); the pass-through
tensors are still compared byte for byte with the release, the headers still parsed.

Results go into the run directory atomically: `verify.json` (everything) and `verify.md`.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import atomic
from ..errors import FormatError, VerifyFailed
from ..release.format import PROJS, expected_tensors, expert_name, expert_prefix, load_config
from ..release.shards import DTYPE_SIZE, INDEX_NAME, Checkpoint, read_into, read_range
from .engine import decode_nvfp4 as dequant_nvfp4  # its old name here (tests and callers use it)
from .engines import MTP_SERVING, vllm_expert_form
from . import numeric
from .layout import GROUP, HF_QUANT_CONFIG, LAYOUT, MANIFEST, mtp_layers, quantized_layers

PASS, FAIL, SKIP, WARN = "pass", "fail", "skip", "warn"
RESEARCH_ONLY = "research-only"
INCOMPLETE = "incomplete"  # nothing failed, but a check did not run: not proven (exit 4, never read as pass)
NOT_SERVABLE = "not loadable by vLLM/SGLang for DeepSeek V4"
TOP_LEVEL = ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")
TRANSFORMERS_NAMES = re.compile(
    r"(^model\.|^lm_head\.|embed_tokens|self_attn|(^|\.)mlp\.|(^|\.)(q_a|q_b|kv|o_a|o_b|gate|up|down)_proj\.|"
    r"hc_head\.hc_|weight_scale_inv)")
FP8_KEYS = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
SHOW = 5  # problems named in a check's detail
NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")


@dataclass
class Check:
    id: str
    check: str
    status: str = PASS
    detail: str = ""
    problems: list = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.status = FAIL
        self.problems.append(problem)

    def warn(self, problem: str) -> None:
        """A finding that does not fail the export (it serves, with a limit the detail names)."""
        if self.status != FAIL:
            self.status = WARN
        self.problems.append(problem)

    def close(self, ok_detail: str) -> "Check":
        more = f" (+{len(self.problems) - SHOW} more)" if len(self.problems) > SHOW else ""
        if self.status == FAIL:
            self.detail = f"{len(self.problems)} problem(s): " + "; ".join(self.problems[:SHOW]) + more
        elif self.status == WARN:
            self.detail = "; ".join(self.problems[:SHOW]) + more + (f" ({ok_detail})" if ok_detail else "")
        elif self.status == PASS:
            self.detail = ok_detail
        return self


# ----------------------------------------------------------------------------- numbers


def nvfp4_error(codes, scale, ws2, ref: torch.Tensor) -> dict:
    """Error of one NVFP4 tensor against its reference, and how it compares with the bound above.

    `blocks_exact`: 16-blocks equal to the reference value for value (carried from the release).
    The numbers of `numeric.nvfp4_error_reference` (whole-tensor torch ops), bit for bit, computed by
    `numeric.nvfp4_error_fast` whenever the inputs are the expected ones."""
    if numeric.fast_ok(codes, scale, ws2, getattr(ref, "shape", None)) and numeric.ref_ok(ref):
        try:
            return numeric.nvfp4_error_fast(codes, scale, ws2, ref=ref)
        finally:
            numeric.release_scratch()  # a one-off call keeps no whole-tensor buffers
    return numeric.nvfp4_error_reference(codes, scale, ws2, ref)


def release_error(ck: Checkpoint, src: Checkpoint, name: str, native: str) -> dict:
    """`nvfp4_error` of export projection `name` against the release's `native` (its MXFP4 decoded
    exactly, `release_expert_bf16`), failing the same way. The expected tensors (1-byte codes and
    scales of matching shapes, one weight_scale_2) are read straight into this thread's buffers and
    checked there (`numeric.compute`); anything else takes the straightforward route."""
    try:
        rw, rs = src.entry(f"{native}.weight"), src.entry(f"{native}.scale")
        cw, cs, c2 = (ck.entry(f"{name}.{k}") for k in ("weight", "weight_scale", "weight_scale_2"))
    except FormatError:  # the straightforward route raises it, in its order
        rw = None
    if rw is not None and all(DTYPE_SIZE[e.dtype] == 1 for e in (rw, rs, cw, cs)) and cw.shape == rw.shape \
            and numeric.shape_ok(cw.shape, cs.shape) and numeric.release_shape_ok(rw.shape, rs.shape):
        try:
            ws2 = ck.tensor(c2.name)
            if numeric.scalar_ok(ws2):
                w = numeric.work(*cw.shape)
                for ckpt, e, buf in ((src, rw, w.rcodes), (src, rs, w.rscale), (ck, cw, w.codes), (ck, cs, w.scale)):
                    read_into(ckpt.path(e.name), e.start, buf)
                return numeric.compute(w, ws2, release=True)
        except (OSError, FormatError):  # unreadable: the straightforward route says how, in its order
            pass
    r = src.tensor(f"{native}.weight"), src.tensor(f"{native}.scale")
    try:
        return numeric.release_numbers(*(ck.tensor(f"{name}.{k}") for k in ("weight", "weight_scale", "weight_scale_2")),
                                       *r)
    finally:
        numeric.release_scratch()


# ----------------------------------------------------------------------------- helpers


def _same_bytes(a: Checkpoint, b: Checkpoint, name: str, chunk: int = 16 << 20) -> bool:
    ea, eb = a.entry(name), b.entry(name)
    if ea.nbytes != eb.nbytes:
        return False
    for off in range(0, ea.nbytes, chunk):
        n = min(chunk, ea.nbytes - off)
        if read_range(a.path(name), ea.start + off, n) != read_range(b.path(name), eb.start + off, n):
            return False
    return True


def _fmt_shape(s) -> str:
    return "[" + ",".join(map(str, s)) + "]"


def _dtype(ck: Checkpoint, name: str) -> str:
    return ck.entry(name).dtype


# ----------------------------------------------------------------------------- generic exports


def generic_reasons(ck: Checkpoint, config: dict) -> list[str]:
    """Every reason found why this (modelopt generic) export does not load as V4 in vLLM/SGLang."""
    names = list(ck.weight_map)
    qc = config.get("quantization_config") or {}
    reasons = []
    if qc.get("quant_method") == "modelopt":
        reasons.append("quantization_config.quant_method is 'modelopt': engines route it to their generic ModelOpt "
                       "path, which bypasses the DeepSeek V4 loader (the layout engines serve keeps 'fp8')")
    tf = [n for n in names if TRANSFORMERS_NAMES.search(n)]
    if tf:
        reasons.append(f"{len(tf)} tensors carry transformers names (e.g. {tf[0]}) mixed with native ones "
                       f"(head.weight: {'head.weight' in ck}); engines load native names only")
    if any(n.endswith("hc_head.hc_fn") for n in names):
        reasons.append("hyper-connection head stored as hc_head.hc_fn; engines expect hc_head_fn")
    scaled2 = {n[: -len(".weight_scale_2")] for n in names if n.endswith(".weight_scale_2")}
    wo_a = [n for n in names if n.endswith("attn.wo_a.weight")]
    wo_a_bf16 = [n for n in wo_a if _dtype(ck, n) == "BF16"]
    if wo_a_bf16:
        reasons.append(f"wo_a is BF16 in {len(wo_a_bf16)} layers (e.g. {wo_a_bf16[0]}); engines load it into an FP8 "
                       "parameter with no scale: garbage output, no error")
    attn_nvfp4 = sorted(n for n in scaled2 if ".attn." in n and ".compressor." not in n and ".indexer." not in n)
    if attn_nvfp4:
        reasons.append(f"attention projections are NVFP4 ({len(attn_nvfp4)}, e.g. {attn_nvfp4[0]}): no engine serves "
                       "V4 attention in NVFP4 today (the predecessor's full-NVFP4 export)")
    comp = sorted(n for n in scaled2 if ".compressor." in n or ".indexer." in n)
    if comp:
        reasons.append(f"compressor/indexer projections are NVFP4 ({len(comp)}, e.g. {comp[0]}); engines build them "
                       "BF16: load error")
    f32_norms = [n for n in names if n.endswith("norm.weight") and _dtype(ck, n) == "F32"]
    if f32_norms:
        reasons.append(f"{len(f32_norms)} norms stored F32 (e.g. {f32_norms[0]}); the release has BF16")
    shared_bf16 = [n for n in names if ".shared_experts." in n and n.endswith(".weight") and _dtype(ck, n) == "BF16"]
    if shared_bf16:
        reasons.append(f"shared experts / attention stored BF16 (e.g. {shared_bf16[0]}) instead of the release's FP8 + "
                       "E8M0 .scale")
    if not any(n.startswith(("mtp.", "model.mtp.")) for n in names):
        reasons.append("no mtp.* tensors (transformers drops the MTP block on load)")
    no_input = sorted(p for p in scaled2 if f"{p}.input_scale" not in ck)
    if no_input:
        reasons.append(f"{len(no_input)} NVFP4 tensors have no input_scale (e.g. {no_input[0]}); vLLM then uses an "
                       "uninitialised value that can corrupt the whole layer")
    return reasons


# ----------------------------------------------------------------------------- the checklist


def _layers_experts(config: dict) -> tuple[int, int]:
    return config["num_hidden_layers"], config["n_routed_experts"]


def mtp_form(ck: Checkpoint, config: dict) -> str | None:
    """How the export stores the MTP block's routed experts: `released` (MXFP4 `.weight` + `.scale`),
    `nvfp4` (the four-tensor form), `mixed`, or None when the model has no MTP layer or none is stored."""
    if not mtp_layers(config):
        return None
    forms = set()
    for n in ck.weight_map:
        x = expert_name(n)
        if x is not None and x.mtp and x.tensor is not None:
            forms.add("released" if x.tensor == "scale" else "nvfp4" if x.tensor != "weight" else None)
    forms.discard(None)
    return None if not forms else forms.pop() if len(forms) == 1 else "mixed"


def converted_prefixes(config: dict, form: str | None) -> list[str]:
    """Every routed-expert projection the layout writes NVFP4: the main layers', and MTP's in the nvfp4 form."""
    L, E = _layers_experts(config)
    out = [expert_prefix(i, j, p) for i in range(L) for j in range(E) for p in PROJS]
    if form == "nvfp4":
        out += [expert_prefix(k, j, p, "mtp") for k in range(mtp_layers(config)) for j in range(E) for p in PROJS]
    return out


def check_config(ck_cfg: dict, src_cfg: dict | None) -> Check:
    c = Check("1", "config.json: DeepSeek V4, identical to the release apart from quantization_config")
    if ck_cfg.get("model_type") != "deepseek_v4" or ck_cfg.get("architectures") != ["DeepseekV4ForCausalLM"]:
        c.fail(f"model_type {ck_cfg.get('model_type')!r}, architectures {ck_cfg.get('architectures')!r}")
    if ck_cfg.get("expert_dtype", "fp4") != "fp4":
        c.fail(f"expert_dtype {ck_cfg.get('expert_dtype')!r} (must stay 'fp4' or be absent)")
    if src_cfg is None:
        if c.status == PASS:
            c.status, c.detail = SKIP, "V4 architecture; not compared with the release's config (no --source)"
            return c
        return c.close("")
    for k in sorted(set(ck_cfg) | set(src_cfg)):
        if k != "quantization_config" and ck_cfg.get(k) != src_cfg.get(k):
            c.fail(f"{k}: {str(ck_cfg.get(k))[:60]} (release: {str(src_cfg.get(k))[:60]})")
    return c.close("identical to the release's config.json apart from quantization_config")


def check_quant_config(ck: Checkpoint, cfg: dict, form: str | None = None) -> Check:
    c = Check("2", "quantization_config: FP8 keys + NVFP4 routed experts; hf_quant_config.json consistent")
    qc = cfg.get("quantization_config") or {}
    for k, v in {**FP8_KEYS, "moe_quant_algo": "NVFP4", "quant_algo": "MIXED_PRECISION", "group_size": GROUP}.items():
        if qc.get(k) != v:
            c.fail(f"{k} = {qc.get(k)!r}, expected {v!r}")
    for k in ("activation_scheme", "config_groups", "producer"):
        if k not in qc:
            c.fail(f"{k} missing")
    if qc.get("kv_cache_quant_algo", "absent") is not None:
        c.fail(f"kv_cache_quant_algo = {qc.get('kv_cache_quant_algo', 'absent')!r}, expected null")
    for k in ("ignored_layers", "modules_to_not_convert"):
        if k in qc:
            c.fail(f"{k} present (engines read it as a second exclusion list)")
    mtp = "nvfp4" if form == "nvfp4" else "released"
    want = quantized_layers(cfg, mtp)
    got = qc.get("quantized_layers") or {}
    if got != want:
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        c.fail(f"quantized_layers differs from the NVFP4 experts stored (main layers{', MTP' if mtp == 'nvfp4' else ''}"
               f"; extra {extra[:3]}, missing {missing[:3]}, or other settings)")
    ignore = qc.get("ignore") or []
    experts = {expert_prefix(x.layer, 0, x.proj, x.block) for x in map(expert_name, converted_prefixes(cfg, form))}
    hit = sorted({p for p in ignore for e in experts if fnmatch.fnmatchcase(e, p)})
    if hit:
        c.fail(f"ignore pattern {hit[0]!r} matches NVFP4 routed experts")
    if mtp == "nvfp4":  # the rest of mtp.* stays out of NVFP4
        others = [f"mtp.{k}.{m}" for k in range(mtp_layers(cfg)) for m in ("e_proj", "h_proj", "ffn.gate",
                                                                            "attn.wq_a", "ffn.shared_experts.w1")]
        loose = [m for m in others if not any(fnmatch.fnmatchcase(m, p) for p in ignore)]
        if loose:
            c.fail(f"ignore covers no pattern for {loose[0]} (MTP experts NVFP4: every other MTP module stays out)")
    hq = atomic.read_json(ck.dir / HF_QUANT_CONFIG)
    if hq is None:
        c.fail(f"{HF_QUANT_CONFIG} missing")
    else:
        q = hq.get("quantization") or {}
        for k, v in (("quant_algo", qc.get("quant_algo")), ("group_size", qc.get("group_size")),
                     ("kv_cache_quant_algo", None), ("quantized_layers", got), ("exclude_modules", ignore)):
            if q.get(k, "absent") != v:
                c.fail(f"{HF_QUANT_CONFIG}: {k} = {str(q.get(k, 'absent'))[:60]} != config.json's {str(v)[:60]}")
        if hq.get("producer") != qc.get("producer"):
            c.fail(f"{HF_QUANT_CONFIG}: producer {hq.get('producer')} != config.json's {qc.get('producer')}")
    return c.close(f"quant_method fp8 + FP8 keys, MIXED_PRECISION with NVFP4 experts in {len(want)} layers, "
                   f"ignore {ignore}, {HF_QUANT_CONFIG} consistent")


def check_names(ck: Checkpoint) -> Check:
    c = Check("3", "names: native only; the six top-level tensors present")
    for n in ck.weight_map:
        if TRANSFORMERS_NAMES.search(n):
            c.fail(f"transformers-style name {n}")
    for n in TOP_LEVEL:
        if n not in ck:
            c.fail(f"{n} missing")
    return c.close(f"{len(ck.weight_map):,} native names, {', '.join(TOP_LEVEL)} present")


def check_experts(ck: Checkpoint, cfg: dict, form: str | None = None) -> tuple[Check, dict[str, list[str]]]:
    """Check 4, and every NVFP4 expert projection missing any of its four tensors (engines load those
    without an error: vLLM leaves the scale uninitialised, SGLang takes 1.0), all of them named."""
    c = Check("4", "routed experts: 4 NVFP4 tensors each (U8/E4M3/F32/F32), shapes, scalars finite > 0, "
                   "w1/w3 weight_scale_2 and input_scale bit-equal")
    H, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    shapes = {"w1": (inter, H), "w3": (inter, H), "w2": (H, inter)}
    scalar_names, missing = [], {}
    prefixes = converted_prefixes(cfg, form)
    for p in prefixes:
        out, inp = shapes[p.rsplit(".", 1)[1]]
        if f"{p}.scale" in ck:
            c.fail(f"{p}.scale still present (the released E8M0 scale is dropped)")
        for suffix, dtype, shape in zip(NVFP4_SUFFIXES, ("U8", "F8_E4M3", "F32", "F32"),
                                        ((out, inp // 2), (out, inp // GROUP), (), ())):
            n = f"{p}.{suffix}"
            if n not in ck:
                missing.setdefault(p, []).append(suffix)
                continue
            e = ck.entry(n)
            if e.dtype != dtype or tuple(e.shape) != shape:
                c.fail(f"{n}: {e.dtype}{_fmt_shape(e.shape)}, expected {dtype}{_fmt_shape(shape)}")
            elif not shape:
                scalar_names.append(n)
    for p, suffixes in missing.items():
        c.fail(f"{p}: {', '.join(suffixes)} missing")
    vals = ck.tensors(scalar_names)
    for n, v in vals.items():
        x = float(v)
        if not (math.isfinite(x) and x > 0):
            c.fail(f"{n} = {x}")
    for p in prefixes:
        if p.endswith(".w1"):
            for s in ("weight_scale_2", "input_scale"):
                a, b = vals.get(f"{p}.{s}"), vals.get(f"{p[:-1]}3.{s}")
                if a is not None and b is not None and a.view(torch.int32) != b.view(torch.int32):
                    c.fail(f"{p[:-3]}: w1.{s} {float(a):.6g} != w3.{s} {float(b):.6g}")
    mtp = " (MTP's included)" if form == "nvfp4" else ""
    return c.close(f"{len(prefixes) // 3:,} experts{mtp} x 3 projections x 4 tensors; {len(vals):,} scalars finite "
                   "and > 0; w1/w3 scalars bit-equal"), missing


def check_passthrough(ck: Checkpoint, cfg: dict, src: Checkpoint | None, form: str | None = None) -> Check:
    c = Check("5", "every other tensor as released (name, dtype, shape, bytes); mtp.* present")
    expected = {n: s for n, s in expected_tensors(cfg).items() if not converted(n, form, ("weight", "scale"))}
    expert_names = {n for n in ck.weight_map if converted(n, form, NVFP4_SUFFIXES)}
    for n, spec in expected.items():
        if n not in ck:
            c.fail(f"{n} missing")
            continue
        e = ck.entry(n)
        if e.dtype != spec.dtype or tuple(e.shape) != tuple(spec.shape):
            c.fail(f"{n}: {e.dtype}{_fmt_shape(e.shape)}, the release format has {spec.dtype}{_fmt_shape(spec.shape)}")
    extra = sorted(set(ck.weight_map) - set(expected) - expert_names)
    for n in extra:
        c.fail(f"{n} is not part of the V4 format or the layout")
    mtp = sum(n.startswith("mtp.") for n in ck.weight_map)
    if cfg.get("num_nextn_predict_layers", 0) and not mtp:
        c.fail("no mtp.* tensors")
    compared = nbytes = 0
    if src is not None:
        for n in expected:
            if n not in ck:
                continue
            if n not in src:
                c.fail(f"{n} not in the release")
                continue
            if not _same_bytes(ck, src, n):
                c.fail(f"{n}: bytes differ from the release")
            compared += 1
            nbytes += ck.entry(n).nbytes
    if c.status == PASS and src is None:
        c.status = SKIP
        c.detail = (f"{len(expected):,} tensors with the release format's names, dtypes and shapes, {mtp} mtp.*; "
                    "bytes not compared (no --source)")
        return c
    return c.close(f"{compared:,} tensors ({nbytes / 2**20:,.1f} MiB) byte-equal to the release, {mtp} of them mtp.*")


def converted(name: str, form: str | None, tensors: tuple[str, ...]) -> bool:
    """One of `tensors` of a routed expert the layout converts (main layers; MTP in the nvfp4 form)."""
    x = expert_name(name)
    return x is not None and (not x.mtp or form == "nvfp4") and x.tensor in tensors


def passthrough_bytes(config: dict, form: str | None) -> int:
    """Bytes of the tensors an export in this MTP `form` holds as released: what check 5 reads from each
    checkpoint (the only tensors read twice once check 7's numbers come from step 02's pass)."""
    return sum(math.prod(s.shape) * DTYPE_SIZE[s.dtype] for n, s in expected_tensors(config).items()
               if not converted(n, form, ("weight", "scale")))


def check_index(ck: Checkpoint) -> Check:
    c = Check("6", "index: weight_map = union of shard headers; total_size; no stray shards")
    if ck.index is None:
        c.fail(f"{INDEX_NAME} missing")
        return c.close("")
    union, total = {}, 0
    for shard in ck.shards:
        try:
            hd = ck.header(shard)
        except Exception as e:  # noqa: BLE001 (a broken shard is a finding, not a crash)
            c.fail(str(e))
            continue
        for n, e in hd.tensors.items():
            union[n] = shard
            total += e.nbytes
    if union != ck.weight_map:
        diff = sorted(set(union.items()) ^ set(ck.weight_map.items()))
        c.fail(f"weight_map and shard headers disagree on {len(diff)} entries, e.g. {diff[0]}")
    declared = (ck.index.get("metadata") or {}).get("total_size")
    if declared != total:
        c.fail(f"total_size {declared}, shards hold {total}")
    stray = sorted(p.name for p in ck.dir.glob("*.safetensors") if p.name not in set(ck.shards))
    if stray:
        c.fail(f"shard {stray[0]} on disk but not in the index")
    partial = sorted(p.name for p in ck.dir.glob("*.partial"))
    if partial:
        c.fail(f"unfinished shard {partial[0]}")
    return c.close(f"{len(union):,} tensors in {len(ck.shards)} shards, total_size {total:,}")


def check_manifest(ck: Checkpoint) -> Check:
    c = Check("8", f"export complete ({MANIFEST})")
    m = atomic.read_json(ck.dir / MANIFEST)
    if m is None:
        c.status, c.detail = SKIP, f"no {MANIFEST} (not written by quantbook)"
        return c
    if not m.get("complete"):
        c.fail("the writer did not finish (rerun the export: it resumes)")
    for shard, rec in (m.get("shards") or {}).items():
        p = ck.dir / shard
        if not p.exists() or p.stat().st_size != rec["size"]:
            c.fail(f"{shard}: size differs from the manifest")
    report = m.get("report") or {}
    filled = report.get("filled", {})
    odd = report.get("weight_amax_not_release_max") or []
    note = (f"; WARNING: {len(odd)} expert weight amax are not max |w| of the release (e.g. {odd[0]['projection']})"
            if odd else "")
    return c.close(f"complete; amax filled: {filled.get('weight', 0)} weight, {filled.get('input', 0)} input{note}")


def carried_tensors(ck: Checkpoint) -> dict[str, int] | None:
    """From the export's manifest: {NVFP4 weight carried from the release: its lossy 32-blocks}, or
    None when the manifest does not say (another writer). Carried blocks must equal the release."""
    m = atomic.read_json(ck.dir / MANIFEST)
    if not m or "options" not in m:
        return None
    opts, report = m["options"], m.get("report") or {}
    lossy = (report.get("cast") or {}).get("lossy_tensors", {})
    out = {}
    for n in ck.weight_map:
        x = expert_name(n)
        if x is not None and x.tensor == "weight" and (x.mtp or opts.get("cast_mxfp4_to_nvfp4")) \
                and f"{x.prefix}.weight_scale" in ck:
            out[n] = lossy.get(n, 0)
    return out


def sampled(names: list[str], sample: int | None) -> list[str]:
    """The `sample` of `names` check 7 computes (all when None): spread evenly over the list, so over
    the layers. Step 02's pass computes the same ones on the bytes it writes."""
    if sample and sample < len(names):
        step = len(names) / sample
        return [names[int(k * step)] for k in range(sample)]
    return list(names)


def recorded_numbers(ck: Checkpoint, src: Checkpoint) -> dict[str, dict]:
    """{projection: check 7's numbers} that step 02's pass computed on the bytes it wrote, in memory
    (export.writer), from the export's manifest: only from shards whose file has the size recorded
    with them, in a manifest that says the export is complete and was made from `src` (the release's
    fingerprint, `release.convert.source_identity`)."""
    from ..release.convert import source_identity

    m = atomic.read_json(ck.dir / MANIFEST)
    if not m or not m.get("complete") or src.index is None:
        return {}
    if m.get("source_id") != source_identity(src.dir, src.index, {s: src.header(s) for s in src.shards}):
        return {}
    out = {}
    for shard, rec in (m.get("shards") or {}).items():
        p = ck.dir / shard
        if rec.get("numbers") and p.is_file() and p.stat().st_size == rec.get("size"):
            out.update(rec["numbers"])
    return out


def check_numbers(ck: Checkpoint, cfg: dict, ref: Checkpoint | None, src: Checkpoint | None,
                  names: list[str] | None = None, sample: int | None = None, workers: int = 2,
                  progress: bool = True, form: str | None = None,
                  recorded: dict[str, dict] | None = None) -> tuple[Check, dict]:
    """Check 7: every NVFP4 expert weight decoded by this module against the release's own values
    (its MXFP4 decoded exactly; the BF16 reference, equal to them, when only that is given):
    carried blocks exactly, re-quantized ones within the bound. A tensor the manifest says was
    carried must equal the release in every block but its lossy ones. `recorded`: numbers step 02's
    pass computed by the same code on the bytes it wrote (`recorded_numbers`), taken instead of
    reading those tensors again (compared with the release only)."""
    c = Check("7", "numbers: NVFP4 expert weights (e2m1 x weight_scale x weight_scale_2) vs the release's own values: "
                   "carried blocks exact, re-quantized blocks within the NVFP4 rounding bound")
    if names is None:
        names = converted_prefixes(cfg, form)
    if ref is None and src is None:
        c.status, c.detail = SKIP, "no --source or --reference to compare with"
        return c, {}
    total = len(names)
    order = sampled(names, sample)
    against = "release" if src is not None else "BF16 reference"
    recorded = (recorded or {}) if src is not None else {}
    from_record = {n: dict(recorded[n]) for n in order if n in recorded}
    names = [n for n in order if n not in from_record]

    def one(name: str):
        native = name[len("model."):] if name.startswith("model.") else name
        try:
            if src is not None:
                if f"{native}.scale" not in src:
                    return name, {"error": f"no {against} tensor for {native}"}
                return name, release_error(ck, src, name, native)
            if f"{native}.weight" not in ref:
                return name, {"error": f"no {against} tensor for {native}"}
            r = ref.tensor(f"{native}.weight")
            codes, scale, ws2 = (ck.tensor(f"{name}.{k}") for k in ("weight", "weight_scale", "weight_scale_2"))
            if numeric.fast_ok(codes, scale, ws2, r.shape) and numeric.ref_ok(r):
                return name, numeric.nvfp4_error_fast(codes, scale, ws2, ref=r)
            return name, numeric.nvfp4_error_reference(codes, scale, ws2, r)
        except Exception as e:  # noqa: BLE001 (an unreadable tensor is a finding of this check)
            return name, {"error": f"{type(e).__name__}: {e}"}

    from ..progress import tqdm

    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            rows = dict(tqdm(pool.map(one, names), total=len(names), desc="verify numbers", disable=not progress))
    finally:
        torch.set_num_threads(threads)
    rows = {n: from_record[n] if n in from_record else rows[n] for n in order}
    carried = carried_tensors(ck) or {}
    for name, r in rows.items():
        if "error" in r:
            c.fail(f"{name}: {r['error']}")
            continue
        if r["blocks_over"] or r["bad_block_scales"] or not math.isfinite(r["max_ratio"]):
            c.fail(f"{name}: {r['blocks_over']} blocks over the bound (worst {r['max_ratio']:.3g}x), "
                   f"{r['bad_block_scales']} non-positive/NaN block scales")
        lossy = carried.get(f"{name}.weight")
        if lossy is not None and r["blocks_exact"] < r["blocks"] - 2 * lossy:
            c.fail(f"{name}: carried from the release with {lossy} lossy 32-blocks, but "
                   f"{r['blocks'] - r['blocks_exact']} of its {r['blocks']} 16-blocks differ from the {against}")
    ok = [r for r in rows.values() if "error" not in r]
    summary = {"tensors": len(rows), "of": total, "sampled": len(rows) < total, "against": against,
               "from_record": len(from_record)}
    if ok:
        worst = max(((n, r) for n, r in rows.items() if "error" not in r), key=lambda kv: kv[1]["max_ratio"])
        summary.update(max_ratio=max(r["max_ratio"] for r in ok), rel_rmse_mean=sum(r["rel_rmse"] for r in ok) / len(ok),
                       rel_rmse_max=max(r["rel_rmse"] for r in ok), worst=worst[0],
                       blocks=sum(r["blocks"] for r in ok), blocks_exact=sum(r["blocks_exact"] for r in ok),
                       carried_tensors=sum(f"{n}.weight" in carried for n in rows))
        rest = summary["blocks"] - summary["blocks_exact"]
        of = f" (a sample of {len(rows):,} of the {total:,}, spread over the layers)" if len(rows) < total else ""
        c.close(f"{len(ok):,} tensors{of} ({summary['carried_tensors']:,} carried) vs the {against}: "
                f"{summary['blocks_exact']:,} of {summary['blocks']:,} 16-blocks equal to it exactly, the other "
                f"{rest:,} within NVFP4's bound (worst {summary['max_ratio']:.3f} of it, {worst[0]}); relative RMS "
                f"error mean {summary['rel_rmse_mean']:.4f}, max {summary['rel_rmse_max']:.4f}"
                + (f"; {len(from_record):,} of the tensors computed by step 02's pass on the bytes it wrote, in "
                   "memory (their shards' sizes as recorded; not read again)" if from_record else ""))
    else:
        c.close("")
    summary["per_tensor"] = rows
    return c, summary


def check_engines(ck: Checkpoint, cfg: dict, form: str | None) -> Check:
    """Check 9: what vLLM 0.33 builds each block's routed experts as (export.engines), against what is stored."""
    c = Check("9", "engines: vLLM 0.33 builds the routed experts as stored (NVFP4), MTP's included")
    for i in range(cfg["num_hidden_layers"]):
        build, why = vllm_expert_form(cfg, f"layers.{i}.ffn.experts")
        if build != "nvfp4":
            c.fail(f"layers.{i}.ffn.experts are stored NVFP4, but vLLM 0.33 builds them {build}: {why}")
    for k in range(mtp_layers(cfg) if form else 0):
        module = f"mtp.{k}.ffn.experts"
        build, why = vllm_expert_form(cfg, module)
        stored = {"released": "mxfp4"}.get(form, form)
        if build == stored:
            continue
        if stored == "mxfp4" and build == "nvfp4":
            c.warn(f"MTP drafts will be wrong on vLLM: {module} holds MXFP4 tensors under moe_quant_algo NVFP4, "
                   "which vLLM 0.33's MTP draft loads as NVFP4 without an error (serve with MTP off there; "
                   f"{MTP_SERVING['released']['drafts_correctly_on']} drafts correctly)")
        else:
            c.fail(f"{module} holds {stored} experts, but vLLM 0.33 builds them {build}: {why}")
    mtp = {"nvfp4": "; MTP experts NVFP4 too", "released": ""}.get(form, "")
    return c.close(f"quant_method fp8, expert_dtype fp4, moe_quant_algo NVFP4, no ignored_layers / "
                   f"modules_to_not_convert: every main layer's experts built NVFP4{mtp}")


# ----------------------------------------------------------------------------- entry point


def verify(export: str | Path, source: str | Path | None = None, reference: str | Path | None = None,
           sample: int | None = None, workers: int = 2, progress: bool = True, reread: bool = False) -> dict:
    """Check an export and return the verdict: `pass`, `fail` or `research-only` (generic export).

    Check 7 takes the numbers step 02's pass computed on the bytes it wrote (`recorded_numbers`)
    instead of reading those expert tensors again, unless `reread`."""
    t0 = time.time()
    export = Path(export)
    ck = Checkpoint(export)
    cfg = load_config(export)
    src = Checkpoint(source) if source else None
    ref = Checkpoint(reference) if reference else None
    src_cfg = load_config(source) if source else None
    qc = cfg.get("quantization_config") or {}
    generic = qc.get("quant_method") == "modelopt" or any(n.startswith("model.") for n in ck.weight_map)
    result = {"export": str(export), "source": str(source) if source else None,
              "reference": str(reference) if reference else None}
    if generic:
        reasons = generic_reasons(ck, cfg)
        nv = sorted({n[: -len(".weight_scale_2")] for n in ck.weight_map if n.endswith(".weight_scale_2")})
        num, numbers = check_numbers(ck, cfg, ref, src, names=nv, sample=sample, workers=workers, progress=progress)
        checks = [num]
        if num.status == FAIL:  # research-only is for a right export engines cannot serve, not a wrong one
            result.update(layout="generic-modelopt", verdict=FAIL, reasons=[f"check {num.id}: {num.detail}"] + reasons,
                          summary=f"{FAIL}: check {num.id} (numbers) failed; and {NOT_SERVABLE} ({len(reasons)} reasons)")
        else:
            result.update(layout="generic-modelopt", verdict=RESEARCH_ONLY, reasons=reasons,
                          summary=f"{RESEARCH_ONLY}: {NOT_SERVABLE} ({len(reasons)} reasons)"
                          + ("; check 7 (numbers) did not run: pass --reference" if num.status == SKIP else ""))
    else:
        form = mtp_form(ck, cfg)
        experts, missing = check_experts(ck, cfg, form)
        checks = [check_config(cfg, src_cfg), check_quant_config(ck, cfg, form), check_names(ck), experts,
                  check_passthrough(ck, src_cfg or cfg, src, form), check_index(ck)]
        num, numbers = check_numbers(ck, cfg, ref, src, sample=sample, workers=workers, progress=progress, form=form,
                                     recorded=None if reread or src is None else recorded_numbers(ck, src))
        checks += [num, check_manifest(ck), check_engines(ck, cfg, form)]
        failed = [c for c in checks if c.status == FAIL]
        skipped = [c.id for c in checks if c.status == SKIP]
        warned = [c.id for c in checks if c.status == WARN]
        ran = [c.id for c in checks if c.status != SKIP]
        verdict = FAIL if failed else INCOMPLETE if skipped else PASS
        summary = {PASS: f"{PASS}: the v4-serving layout, whole and within NVFP4's error bound (all {len(checks)} checks ran)",
                   FAIL: f"{FAIL}: {len(failed)} check(s) failed ({', '.join(c.id for c in failed)})",
                   INCOMPLETE: f"{INCOMPLETE}, not proven: check(s) {', '.join(ran)} ran and passed, check(s) "
                               f"{', '.join(skipped)} did not run (pass --source, the release, to run them all)"}[verdict]
        if warned:
            summary += f"; warning in check(s) {', '.join(warned)}"
        if skipped and failed:
            summary += f"; check(s) {', '.join(skipped)} did not run (pass --source, the release, to run them all)"
        if numbers.get("sampled"):
            summary += f"; numbers on a sample of {numbers['tensors']:,} of {numbers['of']:,} expert tensors"
        if numbers.get("from_record"):
            summary += (f"; {numbers['from_record']:,} expert tensors' numbers computed by step 02's pass on the "
                        "bytes it wrote (--reread reads them again)")
        result.update(layout=LAYOUT, verdict=verdict, reasons=[f"check {c.id}: {c.detail}" for c in failed],
                      summary=summary, missing_expert_tensors=missing,
                      mtp_experts={"stored": form, **MTP_SERVING.get(form or "", {})})
    result["checks"] = [{k: v for k, v in asdict(c).items() if k != "problems"} | {"problems": c.problems[:50]}
                        for c in checks]
    result["numbers"] = {k: v for k, v in numbers.items() if k != "per_tensor"}
    result["numbers_per_tensor"] = numbers.get("per_tensor", {})
    result["elapsed_s"] = round(time.time() - t0, 2)
    return result


def format_table(result: dict) -> str:
    """The verdict and checks as a Markdown table (for verify.md, the CLI and the notebooks)."""
    lines = [f"# verify: {result['export']}", "",
             f"**{result['verdict'].upper()}** ({result['layout']}): {result['summary']}", ""]
    if result.get("reasons") and result["verdict"] == RESEARCH_ONLY:
        lines += [f"Why it is {NOT_SERVABLE}:", ""] + [f"- {r}" for r in result["reasons"]] + [""]
    lines += ["| # | check | status | detail |", "|---|---|---|---|"]
    for c in result["checks"]:
        detail = c["detail"].replace("|", "/").replace("*", "\\*")  # Markdown read globs like *.attn.* as italics
        lines.append(f"| {c['id']} | {c['check']} | {c['status']} | {detail} |")
    missing = result.get("missing_expert_tensors") or {}
    if missing:
        lines += ["", f"Expert projections missing NVFP4 tensors ({len(missing)}; engines load them without an error, "
                      "with an uninitialised or 1.0 scale):", ""]
        lines += [f"- {p}: {', '.join(suffixes)}" for p, suffixes in missing.items()]
    mtp = result.get("mtp_experts") or {}
    if result["layout"] == LAYOUT and result["verdict"] == PASS and mtp.get("note"):
        lines += ["", f"Serving note (MTP speculative decoding drafts correctly on {mtp['drafts_correctly_on']}): "
                      f"{mtp['note']}"]
    return "\n".join(lines) + "\n"


def write_result(result: dict, run_dir: str | Path, stem: str = "verify") -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` into the run directory, each atomically."""
    run_dir = Path(run_dir)
    j, m = run_dir / f"{stem}.json", run_dir / f"{stem}.md"
    atomic.write_json(j, result)
    atomic.write_text(m, format_table(result))
    return j, m


def require_pass(result: dict, what: str = "the export") -> None:
    """Raise VerifyFailed when the verdict is `fail` or `incomplete` (research-only and pass go on)."""
    if result["verdict"] == FAIL:
        raise VerifyFailed(f"{what} in {result['export']} failed verification: {result['summary']}")
    if result["verdict"] == INCOMPLETE:
        raise VerifyFailed(f"{what} in {result['export']} is not proven: {result['summary']}")


def exit_code(result: dict) -> int:
    """0 pass, 1 fail, 3 research-only (a generic export: kept, not servable), 4 incomplete (a check did not run)."""
    return {PASS: 0, FAIL: 1, RESEARCH_ONLY: 3, INCOMPLETE: 4}[result["verdict"]]


__all__ = ["verify", "write_result", "format_table", "exit_code", "require_pass", "generic_reasons",
           "nvfp4_error", "dequant_nvfp4"]
