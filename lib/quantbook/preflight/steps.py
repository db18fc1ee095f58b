"""The preflight's checks, step by step, from configs and headers only (see the package docstring).

Each check calls the library function its step calls (step 01's `convert.plan`, step 02's
`check_quantize_settings`, the driver's `memory_need`, step 03's `export_settings`, ...) and turns a
refusal (`QuantbookError`) into a row of the verdict, so every problem of a run is listed at once.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic
from ..amax import SNAPSHOT
from ..calibrate.resources import size
from ..calibrate.state import STATE_DIR
from ..errors import ParamsError, QuantbookError
from ..machine import Machine
from ..release import convert, resume
from ..release.census import census, mismatches
from ..release.format import bf16_config, bf16_groups, load_config
from . import rates as rates_mod

STEPS = {"01": "dequant", "02": "quantize", "03": "export", "04": "inspect"}
OK, WARN, REFUSE, SKIP = "ok", "warn", "refuse", "skip"


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _nested(a: Path, b: Path) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


@dataclass
class Context:
    """What the checks share: the params, the machine, and what has been found so far."""

    params: dict
    steps: list[str]
    run_dir: Path
    runs_dir: Path | None
    machine: Machine
    rates: list[dict]
    checks: list[dict] = field(default_factory=list)
    census: list[dict] = field(default_factory=list)
    plan: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    disk: list[dict] = field(default_factory=list)
    release: dict | None = None  # {"src", "config", "plan" (convert.Plan or None), "built"}
    now: bool = False  # the steps run now (judge_run): an input no judged step writes must exist already
    in_pass: dict = field(default_factory=dict)  # step 02's streaming pass: seconds of calibrate, write, gate

    def add(self, step: str, area: str, item: str, status: str, detail: str) -> None:
        self.checks.append({"step": step, "area": area, "item": item, "status": status, "detail": detail})

    def attempt(self, step: str, area: str, item: str, fn, *args, **kwargs):
        """fn(*args): its result, or None after recording its refusal as a row."""
        try:
            return fn(*args, **kwargs)
        except QuantbookError as e:
            self.add(step, area, item, REFUSE, str(e))
            return None

    def output(self, step: str, what: str, path, nbytes: int) -> None:
        self.outputs.append({"step": step, "output": what, "path": str(path), "needs": int(nbytes)})

    def step_of_release(self) -> str:
        return "01" if "01" in self.steps else "03"

    def disk_rows(self) -> list[dict]:
        return self.disk


def run_checks(ctx: Context) -> None:
    """Every check of the chosen steps, in order; the rows land in `ctx`."""
    if any(k in ctx.steps for k in ("01", "02", "03")):
        _release(ctx)
    for key, check in (("01", _dequant), ("02", _quantize), ("03", _export), ("04", _inspect)):
        if key in ctx.steps:
            if STEPS[key] not in ctx.params and key != "04":
                ctx.add(key, "params", STEPS[key], SKIP, "no such section in the params")
                continue
            check(ctx)
    _overlaps(ctx)
    _disk(ctx)
    if ctx.runs_dir is not None and any(k in ctx.steps for k in ("01", "02", "03")):
        _rehearsal(ctx)


# ----------------------------------------------------------------------------- the release


def _release(ctx: Context) -> None:
    p = ctx.params
    if "dequant" in p:
        src, who = (p["dequant"] or {}).get("source"), "dequant.source"
    elif (p.get("export") or {}).get("source") and "03" in ctx.steps:
        src, who = p["export"]["source"], "export.source"
    else:
        return
    step = ctx.step_of_release()
    if not src:
        ctx.add(step, "release", who, REFUSE, "required: the released FP8/FP4 checkpoint")
        return
    src = Path(src)
    if (src / "config.json").is_file() and not ("01" in ctx.steps or "03" in ctx.steps):
        cfg = ctx.attempt("02", "release", str(src), load_config, src)  # step 02 alone: its config suffices
        if cfg is not None:
            ctx.release = {"src": src.resolve(), "config": cfg, "plan": None, "built": False}
        return
    if (src / "config.json").is_file():
        dst = (p.get("dequant") or {}).get("destination") or src.with_name(src.name + "-BF16")
        t0 = time.perf_counter()
        plan = ctx.attempt(step, "release", str(src), convert.plan, src, dst)
        if plan is None:
            return
        ctx.census = census(plan.config, plan.headers)
        bad = mismatches(ctx.census)
        if bad:
            ctx.add(step, "release", "census", REFUSE, f"tensor counts differ from config.json: {bad[:3]}")
        ctx.release = {"src": plan.src, "config": plan.config, "plan": plan, "built": False}
        n = sum(r["tensors"] for r in ctx.census)
        ctx.add(step, "release", str(src), OK,
                f"{n:,} tensors in {len(plan.shards)} shards ({size(plan.bytes_in)}) validated against config.json "
                f"and classified: {plan.accounting['fp8_weights']:,} FP8 and {plan.accounting['fp4_weights']:,} FP4 "
                f"weights, {plan.accounting['scales_consumed']:,} scales ({time.perf_counter() - t0:.1f} s)")
    elif p.get("tiny") and "dequant" in p:
        from ..release.tiny import section_config

        spec = p["tiny"]
        cfg = section_config(spec)
        ctx.census = census(cfg)
        ctx.release = {"src": src.resolve(), "config": cfg, "plan": None, "built": True}
        ctx.add(step, "release", str(src), OK, f"built by step 01 from the tiny: section ({spec}); "
                f"{sum(r['expected'] for r in ctx.census):,} tensors implied by its config")
    elif not src.exists():
        ctx.add(step, "release", who, REFUSE, f"{src} does not exist (the released FP8/FP4 checkpoint's directory)"
                + ("" if p.get("tiny") or not p.get("_path") else "; a tiny: section builds a missing source, "
                   "these params have none"))
    else:
        ctx.add(step, "release", who, REFUSE, f"{src} has no config.json (not a release directory?)")


def _bf16_bytes(config: dict) -> int:
    return sum(t.nbytes for g in bf16_groups(config) for t in g)


# ----------------------------------------------------------------------------- step 01


def _device(ctx: Context, step: str, key: str, device: str) -> None:
    if str(device).startswith("cuda") and not ctx.machine.cuda:
        why = "no GPU is visible" if not ctx.machine.gpus else "this torch cannot use the GPUs (a CPU build?)"
        ctx.add(step, "device", key, REFUSE, f"{device!r}, but {why}; use cpu or run on the GPU node")


def _dequant(ctx: Context) -> None:
    from ..calibrate import registry

    d = ctx.params.get("dequant") or {}
    unneeded = registry.bf16_copy_unneeded(ctx.params)
    if unneeded:
        ctx.add("01", "plan", "BF16 copy", SKIP, unneeded)
        ctx.plan.append({"step": "01", "what": "dequantize to BF16", "runs": "no"})
        return
    dst, workers, device = d.get("destination"), int(d.get("workers", 2)), d.get("device", "cpu")
    if not dst:
        ctx.add("01", "destination", "dequant.destination", REFUSE, "required: where the BF16 copy goes")
        return
    _device(ctx, "01", "dequant.device", device)
    bound = convert.memory_bound(workers)
    ctx.add("01", "memory", f"{workers} workers", OK if bound <= ctx.machine.host_available else REFUSE,
            f"at most {size(bound)} of host memory for the conversion; {size(ctx.machine.host_available)} available")
    rel = ctx.release
    if rel is None:
        return
    if rel["plan"] is not None:
        todo = ctx.attempt("01", "destination", str(dst), convert.bytes_to_write, rel["plan"])
        total = rel["plan"].bytes_out
    else:
        todo = total = _bf16_bytes(rel["config"])
    if todo is None:
        return
    ctx.add("01", "destination", str(dst), OK, f"{size(todo)} of {size(total)} BF16 still to write"
            + (" (resumes an earlier run)" if todo < total else ""))
    ctx.output("01", "BF16 copy", dst, todo)
    rate = rates_mod.pick(ctx.rates, "dequant", device=device, workers=workers, cpus=ctx.machine.cpus)
    ctx.plan.append({"step": "01", "what": "dequantize to BF16", "runs": "yes", "bytes": todo,
                     "seconds": rates_mod.seconds(rate, nbytes=todo) if rate else None,
                     "rate": rates_mod.describe(rate) if rate else None})


# ----------------------------------------------------------------------------- step 02


def _model_config(ctx: Context, ckpt: Path | None) -> tuple[dict | None, str]:
    if ckpt is None:
        return None, ""
    if (ckpt / "config.json").is_file():
        return atomic.read_json(ckpt / "config.json"), f"{ckpt / 'config.json'}"
    rel, d = ctx.release, ctx.params.get("dequant") or {}
    if rel is not None and _same(ckpt, d.get("destination")):
        if "01" not in ctx.steps:  # step 02 judged without step 01: the copy must be there when step 02 starts
            ctx.add("02", "model", "quantize.hf_ptq.pyt_ckpt_path", REFUSE if ctx.now else WARN,
                    f"{ckpt} does not exist yet: step 01 writes the BF16 copy there; step 02 cannot start before it "
                    "(quantbook run PARAMS --steps 01, or quantbook dequant)")
            if ctx.now:
                return None, ""
        return bf16_config(rel["config"]), "the BF16 copy step 01 writes (its config from the release's)"
    if rel is not None and _same(ckpt, rel["src"]):
        return rel["config"], "the release itself"
    ctx.add("02", "model", "quantize.hf_ptq.pyt_ckpt_path", REFUSE,
            f"{ckpt} has no config.json and is not where step 01 writes the BF16 copy (dequant.destination)")
    return None, ""


def _versions(ctx: Context, q: dict, s: dict, drv) -> None:
    from ..calibrate import patches
    from ..calibrate.hf_model import TESTED_TRANSFORMERS, transformers_v4

    try:
        mo = md.version("nvidia-modelopt")
    except md.PackageNotFoundError:
        mo = None
    if mo in patches.TESTED_MODELOPT:
        ctx.add("02", "versions", "nvidia-modelopt", OK, f"{mo}, as the runtime patches were tested")
    else:
        ctx.add("02", "versions", "nvidia-modelopt", WARN if q["force"] and mo else REFUSE,
                f"{mo or 'not installed'}; the runtime patches were tested with {', '.join(patches.TESTED_MODELOPT)}"
                + (" (quantize.force: true runs it anyway)" if q["force"] and mo else ""))
    tv, has_v4 = transformers_v4()
    if not has_v4:
        ctx.add("02", "versions", "transformers", REFUSE, f"{tv or 'not installed'} has no deepseek_v4 model; install "
                f"{TESTED_TRANSFORMERS[0]} (constraints.txt)")
    else:
        ctx.add("02", "versions", "transformers", OK if tv in TESTED_TRANSFORMERS else WARN,
                f"{tv} has deepseek_v4" + (" (the tested release; modelopt 0.47 declares < 5.15, whose V4 cannot run "
                                           "a BF16 forward, and its import warning about it is not shown)"
                                           if tv in TESTED_TRANSFORMERS else
                                           f"; calibration is tested with {', '.join(TESTED_TRANSFORMERS)}"))
    if drv.name == "hf_ptq":
        from ..calibrate.hf_ptq_driver import check_checkout, resolve_checkout

        folder = ctx.attempt("02", "versions", "hf_ptq checkout", resolve_checkout, q)
        if folder is not None:
            with warnings.catch_warnings(record=True):
                facts = ctx.attempt("02", "versions", "hf_ptq checkout", check_checkout, folder, q["force"])
            if facts is not None:
                ctx.add("02", "versions", "hf_ptq checkout", WARN if facts["forced"] else OK,
                        f"{facts['checkout_version']} at {folder}; installed nvidia-modelopt {facts['installed_modelopt']}"
                        + (" (mismatch FORCED)" if facts["forced"] else ""))
    _device(ctx, "02", "quantize.hf_ptq.device", s.get("device", "cuda"))


def _calib_data(ctx: Context, s: dict) -> None:
    from ..calibrate.checks import calib_samples
    from ..calibrate.data import count_samples, hub_cache_dirs

    pairs = ctx.attempt("02", "data", "quantize.hf_ptq.calib_size", calib_samples, s)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    for name, n in pairs or []:
        path = Path(name)
        if name.endswith(".jsonl") or path.exists():
            if not path.exists():
                ctx.add("02", "data", name, REFUSE, f"does not exist; write it with `quantbook calib-data {name}`")
            elif path.is_file():
                have = count_samples(path)
                ctx.add("02", "data", name, OK if have >= n else REFUSE,
                        f"{have} samples, {n} asked" + ("" if have >= n else ": too few (add text or lower calib_size)"))
            else:
                ctx.add("02", "data", name, OK, f"a local dataset directory; {n} samples asked")
            continue
        try:
            dirs = hub_cache_dirs(name)
        except ImportError:
            dirs = []
        cached = bool(dirs) and all(d.is_dir() for _, d in dirs)
        repos = ", ".join(r for r, _ in dirs) or name
        if offline:
            ctx.add("02", "data", name, REFUSE, f"a hub dataset ({repos}; {'in' if cached else 'not in'} the local "
                    "cache) but HF_HUB_OFFLINE is set, which step 02 refuses; use a local .jsonl (`quantbook calib-data`)")
        else:
            ctx.add("02", "data", name, OK if cached else WARN,
                    f"{n} samples from the hub ({repos}): " + ("in the local Hugging Face cache" if cached else
                                                                "not in the local cache, downloaded when step 02 starts"))


def _memory(ctx: Context, step: str, need, device: str, pct: float, offload, force: bool) -> None:
    from ..calibrate.resources import check_memory

    gpus = ctx.machine.gpus if not str(device).startswith("cpu") and ctx.machine.cuda else []
    m = check_memory(need, "cpu" if str(device).startswith("cpu") else "cuda", pct, ctx.machine.host_available,
                     gpus, offload)
    where = "host memory only (device cpu)" if not gpus else \
        f"{sum(p['units'] for p in m['placed'])} layer(s) on {len(gpus)} GPU(s) at {pct} of free memory, " \
        f"{size(m['host_need'])} in host memory"
    if not m["problems"]:
        ctx.add(step, "memory", need.what, OK, f"fits: {where}; {size(ctx.machine.host_available)} host memory "
                "available")
        return
    problems = "; ".join(p.removeprefix("memory: ").removeprefix(f"{need.what}: ") for p in m["problems"])
    ctx.add(step, "memory", need.what, WARN if force else REFUSE,
            problems + (" (quantize.force: true runs anyway)" if force else ""))


def _generic_dir(ctx: Context, path: Path) -> bool:
    """A directory step 02 may replace whole: new, empty, or an earlier modelopt export."""
    if path.is_dir() and any(path.iterdir()):
        if not (path / "hf_quant_config.json").is_file():
            ctx.add("02", "destination", str(path), REFUSE, "not empty and not a modelopt export (no "
                    "hf_quant_config.json); step 02 replaces the export directory whole: choose a new one")
            return False
        ctx.add("02", "destination", str(path), WARN, "holds an earlier export, replaced whole when step 02 finishes")
        return True
    return True


def _quantize(ctx: Context) -> None:
    from ..calibrate import registry
    from ..calibrate.checks import check_quantize_settings
    from ..calibrate.resources import export_bytes, model_sizes, run_dir_bytes
    from ..calibrate.settings import HF_PTQ_DEFAULTS, normalize, writes_generic_export

    q = ctx.attempt("02", "settings", "quantize", normalize, ctx.params.get("quantize") or {})
    if q is None:
        return
    drv = ctx.attempt("02", "settings", "quantize.driver", registry.get, q["driver"])
    if drv is None:
        return
    s = ctx.attempt("02", "settings", f"driver {drv.name}", drv.settings, q) or {**HF_PTQ_DEFAULTS, **q["hf_ptq"]}
    ckpt = Path(s["pyt_ckpt_path"]) if s.get("pyt_ckpt_path") else None
    cfg, where = _model_config(ctx, ckpt)
    before = len(ctx.checks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx.attempt("02", "settings", "quantize.hf_ptq", check_quantize_settings, q, cfg)
    for w in caught:
        ctx.add("02", "settings", "warning", WARN, str(w.message))
    if "export" in ctx.params:  # what step 03 of these params can export from this calibration
        from ..export.layout import qformat_problem

        layout = (ctx.params.get("export") or {}).get("layout") or "v4-serving"
        why = qformat_problem(layout, s)
        if why:
            ctx.add("02", "settings", "quantize.hf_ptq.qformat", REFUSE, why)
    if not any(c["status"] == REFUSE for c in ctx.checks[before:]):
        ctx.add("02", "settings", "quantize.hf_ptq", OK, f"driver {drv.name}, qformat {s.get('qformat')}, "
                f"kv_cache_qformat {s.get('kv_cache_qformat')}, batch_size {s.get('batch_size')}, model from {where}")
    _versions(ctx, q, s, drv)
    _calib_data(ctx, s)
    if cfg is None:
        return
    sizes = model_sizes(cfg)
    _memory(ctx, "02", drv.memory_need(cfg, s, q), s.get("device", "cuda"), float(s["gpu_max_mem_percentage"]),
            s.get("offload_folder"), q["force"])
    if writes_generic_export(q):
        exp = Path(s["export_path"])
        if _generic_dir(ctx, exp):
            tensors = [(t.name, t.shape, t.nbytes) for g in bf16_groups(cfg) for t in g]
            ctx.output("02", "generic export", exp, int(export_bytes(tensors, s) * 1.05))
    try:
        state, layerwise = run_dir_bytes(cfg, s, q, sizes["total"])
    except ParamsError:  # a calib_size the data check refused: no layerwise estimate
        state, layerwise = run_dir_bytes(cfg, s, {**q, "layerwise": False}, sizes["total"])
    what = ("calibrated state" + (" + layerwise checkpoint" if layerwise else "") if drv.loads_whole_model else
            "amax + block checkpoint (resume)")
    ctx.output("02", what, ctx.run_dir, state + layerwise)
    rate = rates_mod.pick(ctx.rates, "calibrate", device=s.get("device"), driver=drv.name, cpus=ctx.machine.cpus)
    # a driver that calibrates block by block also runs the MTP block(s) (streaming, mtp: calibrate): each a block
    mtp = int(cfg.get("num_nextn_predict_layers") or 0) if not drv.loads_whole_model and q.get("mtp") == "calibrate" \
        else 0
    blocks = sizes["layers"] + mtp
    what = f"{sizes['layers']} layers" + (f" + {mtp} MTP block{'s' * (mtp > 1)} = {blocks} blocks" if mtp else "")
    ctx.plan.append({"step": "02", "what": f"calibrate ({drv.name}, {what})"
                     + (", generic export" if writes_generic_export(q) else ""), "runs": "yes",
                     "seconds": rates_mod.seconds(rate, layers=blocks) if rate else None,
                     "rate": rates_mod.describe(rate) if rate else None})


# ----------------------------------------------------------------------------- step 03


def _export(ctx: Context) -> None:
    from ..export import layout
    from ..export.recover import export_settings

    e = ctx.attempt("03", "settings", "export", export_settings, ctx.params.get("export"))
    if e is None:
        return
    ctx.add("03", "settings", "export", OK, f"layout {e['layout']}, cast_mxfp4_to_nvfp4 {e['cast_mxfp4_to_nvfp4']}, "
            f"{e['workers']} workers on {e['device']}")
    _device(ctx, "03", "export.device", e["device"])
    _fidelity(ctx, e)
    dst = Path(e["dir"])
    planned_bf16 = (ctx.params.get("dequant") or {}).get("destination") if "01" in ctx.steps else None
    amax_ready = "02" in ctx.steps or (ctx.run_dir / SNAPSHOT).is_file() or (ctx.run_dir / STATE_DIR).is_dir()
    if not amax_ready:
        ctx.add("03", "amax", str(ctx.run_dir), REFUSE, f"no {SNAPSHOT} or state/ in the run directory: step 02 "
                "writes them (run it first, or name the calibrated run's directory)")
    if "02" not in ctx.steps:  # the calibration this export reads: what step 02 recorded it was made with
        from ..calibrate.driver import RESULT
        from ..calibrate.settings import HF_PTQ_DEFAULTS
        from ..export.layout import qformat_problem

        rec = atomic.read_json(ctx.run_dir / RESULT) or {}
        hf = ((rec.get("params") or {}).get("hf_ptq")) if isinstance(rec.get("params"), dict) else None
        why = qformat_problem(e["layout"], {**HF_PTQ_DEFAULTS, **hf}) if isinstance(hf, dict) else None
        if why:
            ctx.add("03", "amax", "qformat", REFUSE, f"{ctx.run_dir / RESULT}: calibrated with {why}")
    ref = e["reference"]
    if ref and not Path(ref).exists() and not _same(ref, planned_bf16):
        ctx.add("03", "reference", "export.reference", REFUSE, f"{ref} does not exist and no step of this run writes it "
                "(the verifier's numeric check reads the BF16 copy)")
    if e["layout"] == "v4-serving":
        rel = ctx.release
        if rel is None or not _same(rel["src"], e["source"]):
            if rel is not None:
                ctx.add("03", "release", "export.source", WARN, f"{e['source']} is not dequant.source {rel['src']}")
            if not (Path(e["source"]) / "config.json").is_file():
                ctx.add("03", "release", "export.source", REFUSE, f"{e['source']} has no config.json")
                return
            plan = ctx.attempt("03", "release", str(e["source"]), convert.plan, e["source"], dst)
            if plan is None:
                return
            rel = {"src": plan.src, "config": plan.config, "plan": plan, "built": False}
        if rel["config"].get("expert_dtype", "fp4") != "fp4":
            ctx.add("03", "release", "expert_dtype", REFUSE, f"{rel['config'].get('expert_dtype')!r}: the v4-serving "
                    "writer takes the FP4-expert release")
            return
        source_id = rel["plan"].source_id if rel["plan"] is not None else None

        def foreign(manifest):
            if source_id is not None and manifest.get("source_id") != source_id:
                return f"an export of another release ({manifest.get('source')})"

        manifest = ctx.attempt("03", "destination", str(dst), resume.check_owner, rel["src"], dst, layout.MANIFEST,
                               foreign, "export directory")
        along = _writes_along(ctx)
        if manifest is not None and "02" in ctx.steps and along and manifest.get("along"):
            ctx.add("03", "destination", str(dst), OK, "a killed pass's export written along step 02: its shards that "
                    "verify and match the new amax are kept, the others written again")
        elif manifest is not None and "02" in ctx.steps:
            ctx.add("03", "destination", str(dst), REFUSE, "holds an export made with other amax; this run calibrates "
                    "anew, so step 03 would refuse it: empty it or choose another export.dir")
        shards = layout.shard_bytes(rel["config"], e["mtp_experts"])
        done = (manifest or {}).get("shards", {})
        todo = sum(n for name, n in shards.items() if name not in done)
        if manifest is None or "02" not in ctx.steps:
            ctx.add("03", "destination", str(dst), OK, f"{size(todo)} of {size(sum(shards.values()))} to write"
                    + (" (an earlier export of this release: resumed if made from the same amax and options, "
                       "refused by step 03 otherwise)" if manifest is not None else ""))
        ctx.output("03", "v4-serving export", dst, todo)
        rate = rates_mod.pick(ctx.rates, "v4-serving", device=e["device"], workers=e["workers"], cpus=ctx.machine.cpus,
                              route="carry" if e.get("cast_mxfp4_to_nvfp4", True) else "requant")
        what = f"write the v4-serving layout ({rel['config']['num_hidden_layers']} layers x " \
               f"{rel['config']['n_routed_experts']} experts NVFP4)"
        if along:
            write_s = rates_mod.seconds(rate, nbytes=todo) if rate else None
            check_s = _numbers_in_pass(ctx, e, rel["config"])
            _overlap_with_calibration(ctx, None if write_s is None or check_s is None else write_s + check_s)
            ctx.plan.append({"step": "03", "what": what + ": along step 02's pass (quantize.export_along)",
                             "runs": "in 02", "bytes": todo, "seconds": write_s,
                             "rate": rates_mod.describe(rate) if rate else None})
            what, rate = None, None
    else:
        from ..calibrate import registry
        from ..calibrate.resources import export_bytes
        from ..calibrate.settings import HF_PTQ_DEFAULTS

        cfg = atomic.read_json(Path(ref) / "config.json") if ref else None
        if cfg is None and ctx.release is not None and _same(ref, planned_bf16):
            cfg = bf16_config(ctx.release["config"])
        if cfg is None:
            ctx.add("03", "model", "export.reference", REFUSE, "the generic layout restores the calibrated state onto "
                    "the BF16 model: export.reference must be the BF16 copy")
            return
        need = registry.get("modelopt").memory_need(cfg, HF_PTQ_DEFAULTS, {})
        _memory(ctx, "03", need, e["device"], HF_PTQ_DEFAULTS["gpu_max_mem_percentage"], None, False)
        tensors = [(t.name, t.shape, t.nbytes) for g in bf16_groups(cfg) for t in g]
        todo = export_bytes(tensors, {"qformat": "nvfp4_experts_only"})
        ctx.output("03", "generic export", dst, todo)
        rate, what = None, "restore the state and write modelopt's generic export"
    if what is not None:
        ctx.plan.append({"step": "03", "what": what, "runs": "yes", "bytes": todo,
                         "seconds": rates_mod.seconds(rate, nbytes=todo) if rate else None,
                         "rate": rates_mod.describe(rate) if rate else None})
    checked = f" ({e['verify_sample']} expert tensors)" if e["verify_sample"] else " (every expert tensor)"
    if e["layout"] == "v4-serving" and _writes_along(ctx):  # the numbers from the pass: reads the pass-through
        from ..export.verify import passthrough_bytes

        through = 2 * passthrough_bytes(rel["config"], e["mtp_experts"])
        rate = rates_mod.pick(ctx.rates, "verify", route="record", cpus=ctx.machine.cpus)
        ctx.plan.append({"step": "03", "what": f"verify the export{checked}: the numbers step 02's pass computed, "
                                               f"the pass-through tensors ({size(through)} in both) compared",
                         "runs": "yes", "bytes": through,
                         "seconds": rates_mod.seconds(rate, nbytes=through) if rate else None,
                         "rate": rates_mod.describe(rate) if rate else None})
    else:
        rate = rates_mod.pick(ctx.rates, "verify", device=e["device"], workers=e["workers"], cpus=ctx.machine.cpus,
                              route="reread")
        ctx.plan.append({"step": "03", "what": "verify the export" + checked,
                         "runs": "yes", "seconds": rates_mod.seconds(rate, nbytes=todo) if rate else None,
                         "rate": rates_mod.describe(rate) if rate else None})
    f = e["fidelity"]
    if f["enabled"] and e["layout"] == "v4-serving":
        cfg = rel["config"]
        blocks_n = cfg["num_hidden_layers"] + (1 if cfg.get("num_nextn_predict_layers") else 0)
        q = ctx.params.get("quantize") or {}
        in_pass = _writes_along(ctx) and f["along"] and (q.get("mtp", "calibrate") == "calibrate"
                                                         or not cfg.get("num_nextn_predict_layers"))
        device = ((q.get("hf_ptq") or {}).get("device") or "cuda") if in_pass else f["device"]
        rate = rates_mod.pick(ctx.rates, "eval", device=device, cpus=ctx.machine.cpus)
        secs = rates_mod.seconds(rate, layers=blocks_n) if rate else None
        ctx.plan.append({"step": "03", "what": f"fidelity gate: {blocks_n} blocks x 2 models on {f['samples']} x "
                                               f"{f['seq']} held-out tokens ({f['engine']}, {f['mode']})"
                                               + (": in step 02's pass, block by block (export.fidelity.along)"
                                                  if in_pass else ""),
                         "runs": "in 02" if in_pass else "yes", "seconds": secs,
                         "rate": rates_mod.describe(rate) if rate else None})
        if in_pass:
            _in_pass(ctx, gate=secs)


def _writes_along(ctx: Context) -> bool:
    """Does step 02 of this run write the export along its pass (driver streaming, quantize.export_along)?"""
    q = ctx.params.get("quantize") or {}
    return "02" in ctx.steps and q.get("driver") == "streaming" and q.get("export_along", True) is True


def _numbers_in_pass(ctx: Context, e: dict, config: dict) -> float | None:
    """Plans verify's numbers computed in the pass on the bytes written (export.writer), in each shard's
    compute threads beside its writes: their seconds, None when not measured."""
    from ..export.along import check_threads, checked_in_pass

    n = len(checked_in_pass(config, e))
    rate = rates_mod.pick(ctx.rates, "verify", route="in-pass", cpus=ctx.machine.cpus)
    threads = check_threads(ctx.machine.cpus)
    secs = rates_mod.seconds(rate, tensors=n) / threads if rate else None
    ctx.plan.append({"step": "03", "what": f"verify's numbers of {n:,} expert tensors on the bytes written "
                                           f"({threads} threads a shard)", "runs": "in 02", "seconds": secs,
                     "rate": rates_mod.describe(rate) if rate else None})
    return secs


def _overlap_with_calibration(ctx: Context, write_s: float | None) -> None:
    """Step 02's planned time when it also writes the export: the longer of its calibration and the
    writer (they run side by side, block by block); unknown when either is."""
    row = next((r for r in ctx.plan if r["step"] == "02" and r["what"].startswith("calibrate")), None)
    if row is None:
        return
    row["what"] += " + the v4-serving export written along"
    _in_pass(ctx, calibrate=row.get("seconds"), write=write_s)


def _in_pass(ctx: Context, **seconds) -> None:
    """Step 02's planned time from the parts of its pass: the GPU's work (calibration, then the gate on the
    same block) beside the writer's, whichever is longer; unknown when a part is."""
    row = next((r for r in ctx.plan if r["step"] == "02" and r["what"].startswith("calibrate")), None)
    if row is None:
        return
    ctx.in_pass.update(seconds)
    if "gate" in seconds:
        row["what"] += " + the fidelity gate"
    parts = ctx.in_pass
    compute = [parts.get("calibrate"), parts.get("gate", 0.0)]
    row["seconds"] = None if None in compute or parts.get("write", 0.0) is None else \
        max(sum(compute), parts.get("write", 0.0))


def _fidelity(ctx: Context, e: dict) -> None:
    """The fidelity gate's device and held-out text (named, or the one beside the calibration file)."""
    from ..calibrate.data import heldout_path

    f = e["fidelity"]
    if not f["enabled"]:
        ctx.add("03", "fidelity", "export.fidelity.enabled", WARN, "false: the export is not evaluated against the "
                "release before anyone serves it")
        return
    _device(ctx, "03", "export.fidelity.device", f["device"])
    from ..export.recover import calibration_file

    datasets = str(((ctx.params.get("quantize") or {}).get("hf_ptq") or {}).get("dataset") or "").split(",")
    local = [d for d in datasets if d.endswith(".jsonl")] or [calibration_file(ctx.run_dir)]  # step 03 alone
    text = f["text"] or (str(heldout_path(local[0])) if local[0] else None)
    if text is None:
        ctx.add("03", "fidelity", "export.fidelity.text", REFUSE, "no held-out text named, and the calibration data "
                "is no local JSONL to find one beside: set export.fidelity.text")
    elif not Path(text).is_file():
        ctx.add("03", "fidelity", "export.fidelity.text", REFUSE, f"{text} does not exist (`quantbook calib-data` "
                "writes the held-out file beside the calibration file)")
    else:
        ctx.add("03", "fidelity", "export.fidelity.text", OK, f"{text}: {f['samples']} x {f['seq']} tokens, engine "
                f"{f['engine']}, {f['mode']}")


# ----------------------------------------------------------------------------- step 04


def _inspect(ctx: Context) -> None:
    i = ctx.params.get("inspect") or {}
    snapshot = Path(i.get("snapshot") or ctx.run_dir / SNAPSHOT)
    if "02" in ctx.steps:
        ctx.add("04", "amax", SNAPSHOT, OK, "reads the snapshot step 02 writes, never the model")
    elif snapshot.is_file() or (snapshot / SNAPSHOT).is_file():
        ctx.add("04", "amax", str(snapshot), OK, "present; read alone, never the model")
    else:
        ctx.add("04", "amax", str(snapshot), REFUSE, "missing: step 02 writes it (or name a snapshot)")
    rate = rates_mod.pick(ctx.rates, "inspect", cpus=ctx.machine.cpus)
    ctx.plan.append({"step": "04", "what": "inspect the amax", "runs": "yes",
                     "seconds": rates_mod.seconds(rate) if rate else None,
                     "rate": rates_mod.describe(rate) if rate else None})


# ----------------------------------------------------------------------------- run-wide


def _overlaps(ctx: Context) -> None:
    """No output directory is the release or inside or around it, nor another output's. The run
    directory itself is not one of them (any driver's: "calibrated state", "amax + block checkpoint"):
    step 02 writes files into it, never replaces it whole, and a rehearsal keeps its tiny release and
    outputs inside its own run directory."""
    dirs = [(o["output"], Path(o["path"])) for o in ctx.outputs if not _same(o["path"], ctx.run_dir)]
    src = ctx.release["src"] if ctx.release is not None else None
    if src is not None and any(_same(o["path"], ctx.run_dir) for o in ctx.outputs) and \
            (_same(ctx.run_dir, src) or Path(src).resolve() in Path(ctx.run_dir).resolve().parents):
        ctx.add("run", "destination", "run directory", REFUSE, f"{ctx.run_dir} is the release {src} or inside it")
    if ctx.release is not None:
        for what, d in dirs:
            if _nested(d, ctx.release["src"]):
                ctx.add("run", "destination", what, REFUSE, f"{d} is the release {ctx.release['src']}, inside it or "
                        "around it")
    for i, (a, da) in enumerate(dirs):
        for b, db in dirs[i + 1:]:
            if _nested(da, db):
                ctx.add("run", "destination", f"{a} / {b}", REFUSE, f"{da} and {db} are the same directory or one "
                        "holds the other")


def _disk(ctx: Context) -> None:
    """Free disk for every output, outputs on one filesystem summed."""
    groups: dict[int, list[dict]] = {}
    for o in ctx.outputs:
        groups.setdefault(ctx.machine.disk_id(Path(o["path"])), []).append(o)
    for outs in groups.values():
        free = ctx.machine.disk_free(Path(outs[0]["path"]))
        need = sum(o["needs"] for o in outs)
        status = OK if need <= free else REFUSE
        for o in outs:
            ctx.disk.append({**o, "free": free, "status": status})
        names = " + ".join(f"{o['output']} ({o['step']})" for o in outs)
        ctx.add(outs[0]["step"] if len(outs) == 1 else "run", "disk", names, status,
                f"needs {size(need)}, {size(free)} free on the filesystem of {outs[0]['path']}")


def _rehearsal(ctx: Context) -> None:
    from ..records import rehearsal

    st = rehearsal.status(ctx.params, ctx.runs_dir)
    if not st["needed"]:
        ctx.add("run", "rehearsal", "not needed", OK, st["why"])
    elif st["found"]:
        ctx.add("run", "rehearsal", st["found"]["run_id"], OK, f"passed with the same params digest {st['digest']} "
                f"({st['found']['completed']})")
    else:
        ctx.add("run", "rehearsal", "none yet", WARN, f"no passed rehearsal with params digest {st['digest']} in "
                f"{ctx.runs_dir}: `quantbook run {ctx.params.get('_path', 'PARAMS')} --rehearse` (minutes); the real run "
                "refuses to start without one (or --no-rehearsal)")
