"""Step 03: export from what step 02 kept, so that no failure after calibration costs a recalibration.

Step 02 leaves in its run directory the raw amax snapshot (`amax.safetensors`), the cheap
calibrated state (`state/`: modelopt_state + quantizer tensors + manifest) and, when asked, the
full state. From those:

- `layout: v4-serving` (the default for DeepSeek V4): the serving layout is written from the
  RELEASE plus the calibrated expert amax (export.layout); no model is loaded at all. The amax
  come from the snapshot, or, when it is missing or unreadable, from the state's quantizer
  tensors, or from the full state. The same amax give the same bytes, whichever file they came
  from (tests/test_recover.py).
- `layout: generic`: modelopt's unified HF export of the transformers model (the `nvfp4`
  research path): the BF16 model is loaded the way the run loaded it, the calibrated state is
  restored into it (the full state dict when that is what was saved) and exported exactly as
  step 02 does; the bytes equal step 02's direct export. `quantbook verify` labels it
  research-only, with the reasons engines cannot serve it for V4.

`validate_state` (`--validate-only`) checks a saved state without loading the model: the
files against their manifest (sizes, hashes), the versions it was made with, the model's config and
weights identity, the quantizer count, and every amax (missing, 0, NaN, inf, negative), and
whether the serving layout can be written from it. Every export ends with `quantbook verify`,
its table and verdict written into the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import atomic
from ..amax import SNAPSHOT, amax_problem, load_snapshot, parse_quantizer, split_key
from ..calibrate import hf_model, patches
from ..calibrate.settings import modelopt_settings, normalize
from ..calibrate.state import (
    FULL_STATE, MANIFEST, QUANTIZER_TENSORS, STATE_DIR, load_manifest, model_identity, versions,
)
from ..errors import LayoutError, ParamsError, RecoverError, StateError
from ..records.step import StepRecord

RECORD = "export.json"
LAYOUTS = ("v4-serving", "generic")
EXPORT_DEFAULTS = {
    "layout": "v4-serving",
    "source": None,  # the release (FP8/FP4) directory: the v4-serving layout is built from it
    "dir": None,  # where the export goes
    "cast_mxfp4_to_nvfp4": True,  # carry the released expert weights without loss (false: re-quantize from amax)
    "mtp_experts": "released",  # released (MXFP4, SGLang drafts correctly) | nvfp4 (vLLM drafts correctly)
    "reference": None,  # the BF16 checkpoint from step 01: the numeric check, and the generic export's model
    "workers": 2,
    "device": "cpu",
    "verify_sample": None,  # numeric check on N expert tensors spread over the model (None: all)
    "fidelity": None,  # the fidelity gate after verify (export.fidelity: FIDELITY_DEFAULTS, GATE_DEFAULTS)
}
OK, WARN, FAIL = "ok", "warn", "fail"


def export_settings(e: dict | None) -> dict:
    """The `export:` section with defaults filled, checked (unknown keys refused)."""
    unknown = sorted(set(e or {}) - set(EXPORT_DEFAULTS))
    if unknown:
        raise ParamsError(f"export: unknown key(s) {unknown}; known: {sorted(EXPORT_DEFAULTS)}")
    e = {**EXPORT_DEFAULTS, **(e or {})}
    if e["layout"] not in LAYOUTS:
        raise ParamsError(f"export.layout: {e['layout']!r}; choose one of {list(LAYOUTS)}")
    if not e["dir"]:
        raise ParamsError("export.dir: required (where the export is written)")
    if e["layout"] == "v4-serving" and not e["source"]:
        raise ParamsError("export.source: required for the v4-serving layout (the released FP8/FP4 checkpoint)")
    if not isinstance(e["cast_mxfp4_to_nvfp4"], bool):
        raise ParamsError(f"export.cast_mxfp4_to_nvfp4: {e['cast_mxfp4_to_nvfp4']!r}; write true or false")
    from .layout import MTP_EXPERTS

    if e["mtp_experts"] not in MTP_EXPERTS:
        raise ParamsError(f"export.mtp_experts: {e['mtp_experts']!r}; choose one of {list(MTP_EXPERTS)}")
    if e["layout"] != "v4-serving" and e["mtp_experts"] != "released":
        raise ParamsError("export.mtp_experts: nvfp4 only with layout v4-serving")
    from .fidelity import fidelity_settings

    e["fidelity"] = fidelity_settings(e["fidelity"])
    if e["layout"] != "v4-serving":
        e["fidelity"]["enabled"] = False  # the gate reads the serving layout; a generic export is research only
    return e


# ----------------------------------------------------------------------------- where the amax are


def state_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATE_DIR


def amax_from_state_files(run_dir: str | Path) -> tuple[dict, str]:
    """The calibrated amax of a run, without a model: (snapshot-like dict, where it came from).

    Order: the raw snapshot; the cheap state's quantizer tensors (verified against its manifest;
    their activation amax are the ones the run repaired); the full state (`mto.save`).
    """
    run_dir = Path(run_dir)
    tried = []
    snap = run_dir / SNAPSHOT
    if snap.is_file():
        try:
            tensors, _ = load_snapshot(snap)
            return tensors, str(snap)
        except Exception as e:  # noqa: BLE001 (a damaged snapshot: fall back to the state)
            tried.append(f"{snap}: unreadable ({e})")
    else:
        tried.append(f"{snap}: missing")
    sd = state_dir(run_dir)
    try:
        manifest = load_manifest(sd)
    except StateError as e:
        tried.append(str(e))
        manifest = None
    if manifest is not None and QUANTIZER_TENSORS in manifest["files"]:
        from safetensors.torch import load_file

        tensors = load_file(str(sd / QUANTIZER_TENSORS))
        return {k: v for k, v in tensors.items() if k.endswith("._amax")}, str(sd / QUANTIZER_TENSORS)
    if manifest is not None and FULL_STATE in manifest["files"]:
        import torch

        full = torch.load(sd / FULL_STATE, map_location="cpu", mmap=True, weights_only=False)
        sdict = full.get("model_state_dict", {})
        return {k: v for k, v in sdict.items() if k.endswith("._amax")}, str(sd / FULL_STATE)
    raise RecoverError(f"run {run_dir}: no calibrated amax to export from (" + "; ".join(tried) + "). "
                       "Calibrate again (step 02).")


# ----------------------------------------------------------------------------- --validate-only


def _row(rows: list, check: str, status: str, detail: str) -> None:
    rows.append({"check": check, "status": status, "detail": detail})


def validate_state(run_dir: str | Path, model_path: str | Path | None = None, source: str | Path | None = None,
                   layout: str = "v4-serving", mtp_experts: str = "released") -> dict:
    """Check a run's saved calibrated state without loading the model; a verdict and a table.

    Verdict `ok` (warnings allowed: e.g. uncalibrated experts the export fills and lists) or
    `refused` (an export from this state would fail or be wrong).
    """
    run_dir = Path(run_dir)
    rows: list[dict] = []
    sd = state_dir(run_dir)
    manifest = None
    try:
        manifest = load_manifest(sd, verify=True)
        _row(rows, "state files", OK, f"{sd}: {', '.join(manifest['files'])} match the manifest's sizes and hashes")
    except StateError as e:
        _row(rows, "state files", FAIL if layout == "generic" else WARN, _no_state_reason(run_dir) or str(e))

    if manifest is not None:
        saved, now = manifest.get("versions") or {}, versions()
        diffs = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
        if not diffs:
            _row(rows, "versions", OK, ", ".join(f"{k} {v}" for k, v in sorted(now.items())))
        else:
            hard = {k: v for k, v in diffs.items() if k == "nvidia-modelopt"}
            detail = "; ".join(f"{k}: saved {a}, installed {b}" for k, (a, b) in sorted(diffs.items()))
            # a modelopt_state is restored by the modelopt that wrote it; other packages change bytes only
            _row(rows, "versions", FAIL if hard and layout == "generic" else WARN, detail)
        want = manifest.get("model") or {}
        path = model_path or want.get("path")
        if not want:
            _row(rows, "model", WARN, "the state does not name its model")
        elif path is None or not (Path(path) / "config.json").is_file():
            _row(rows, "model", WARN if layout != "generic" else FAIL, f"model {path} not found to compare")
        else:
            have = model_identity(path)
            bad = [k for k in ("config_sha256", "weights_id") if want.get(k) != have.get(k)]
            _row(rows, "model", FAIL if bad else OK,
                 f"{path}: {', '.join(bad)} differ from the state's ({want.get('path')})" if bad else
                 f"{path}: config sha256 {have['config_sha256'][:12]}, weights id {have['weights_id'][:12]} match")
        if (sd / QUANTIZER_TENSORS).is_file():
            from safetensors import safe_open

            with safe_open(str(sd / QUANTIZER_TENSORS), "pt") as f:
                n = len(list(f.keys()))
            ok = n == manifest.get("quantizer_tensors")
            _row(rows, "quantizer count", OK if ok else FAIL,
                 f"{manifest.get('quantizers')} quantizers, {n} tensors saved (manifest says "
                 f"{manifest.get('quantizer_tensors')})")

    try:
        amax, origin = amax_from_state_files(run_dir)
    except RecoverError as e:
        _row(rows, "amax", FAIL, str(e))
        amax, origin = None, None
    if amax is not None:
        kinds: dict[str, list[str]] = {}
        keys = [k for k in amax if k.endswith("._amax")]
        for k in keys:
            why = amax_problem(amax[k])
            if why:
                kinds.setdefault(why, []).append(split_key(k)[0])
        if manifest is not None and origin.endswith(SNAPSHOT):
            from safetensors import safe_open

            with safe_open(origin, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("quantbook", "{}"))
            if meta.get("quantizers") not in (None, manifest.get("quantizers")):
                _row(rows, "quantizer count", FAIL, f"snapshot made from {meta.get('quantizers')} quantizers, "
                                                      f"the state has {manifest.get('quantizers')}")
        detail = f"{len(keys)} amax in {origin}"
        if kinds:
            detail += "; " + "; ".join(f"{len(v)} {why} (e.g. {v[0]})" for why, v in sorted(kinds.items()))
        weight_bad = [q for why in ("nan", "inf", "negative") for q in kinds.get(why, [])
                      if parse_quantizer(q).role == "weight"]
        _row(rows, "amax anomalies", WARN if kinds else OK,
             detail + (" (each is filled by the export's rule and listed)" if kinds else ""))
        if weight_bad:
            _row(rows, "weight amax", WARN, f"{len(weight_bad)} weight amax NaN/inf/negative (e.g. {weight_bad[0]}): "
                                            "the v4-serving export recomputes them from the released weights")
        if layout == "v4-serving":
            rows.append(_serving_feasibility(amax, source, model_path or (manifest or {}).get("model", {}).get("path"),
                                             mtp_experts))
    refused = any(r["status"] == FAIL for r in rows)
    return {"run_dir": str(run_dir), "verdict": "refused" if refused else "ok", "layout": layout,
            "amax_origin": origin, "checks": rows}


def _serving_feasibility(amax: dict, source, model_path, mtp_experts: str = "released") -> dict:
    """Can the v4-serving layout be written from these amax (a config is needed to map experts)?"""
    from ..release.format import load_config
    from .layout import expert_amax, resolve_amax

    cfg_dir = source or model_path
    row = {"check": "v4-serving from these amax"}
    if not cfg_dir or not (Path(cfg_dir) / "config.json").is_file():
        return {**row, "status": WARN, "detail": "no release or model config.json to map the experts"}
    cfg = load_config(cfg_dir)
    try:
        ea = expert_amax(amax, cfg, mtp_experts)
        # weight fills need the released weights; here only count them
        res = resolve_amax(ea, cfg, None, use_weight_amax=False, mtp_experts=mtp_experts)
    except LayoutError as e:
        return {**row, "status": FAIL, "detail": str(e)}
    L, E = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    missing_w = sum(f"layers.{i}.ffn.experts.{j}.{p}" not in ea.weight or amax_problem(
        ea.weight[f"layers.{i}.ffn.experts.{j}.{p}"]) is not None
        for i in range(L) for j in range(E) for p in ("w1", "w2", "w3"))
    filled_in = sum(f["amax"] == "input" for f in res.fills)
    status = WARN if (missing_w or filled_in) else OK
    return {**row, "status": status,
            "detail": f"{L * E} experts: {filled_in} input amax and {missing_w} weight amax to fill "
                      f"(filled by the contract's rule and listed)" if status == WARN else
                      f"all {L * E * 3} expert projections have usable weight and input amax"}


def _no_state_reason(run_dir: Path) -> str | None:
    """Why a run has no calibrated state when its driver keeps none by design (its snapshot says so)."""
    try:
        from safetensors import safe_open

        with safe_open(str(run_dir / SNAPSHOT), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("quantbook", "{}"))
    except Exception:  # noqa: BLE001 (no or damaged snapshot: the state's own error says enough)
        return None
    if meta.get("calibrated_state") is not False:
        return None
    return (f"no calibrated state by design: driver {meta.get('driver')} never holds the whole model; layout "
            f"v4-serving exports from {SNAPSHOT}; layout generic needs a whole model's state (calibrate with "
            "driver modelopt on the BF16 copy)")


def require_ok(v: dict) -> None:
    """Raise StateError when `validate_state` refused the run's state (its table says why)."""
    if v["verdict"] != "ok":
        failed = "; ".join(f"{r['check']}: {r['detail']}" for r in v["checks"] if r["status"] == FAIL)
        raise StateError(f"the calibrated state of {v['run_dir']} is refused: {failed}")


def format_validation(v: dict) -> str:
    lines = [f"calibrated state of {v['run_dir']}: {v['verdict'].upper()}"]
    w = max(len(r["check"]) for r in v["checks"]) if v["checks"] else 0
    for r in v["checks"]:
        lines.append(f"  {r['status']:<4}  {r['check']:<{w}}  {r['detail']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the export


def _restore_generic(run_dir: Path, model_path: str | None):
    """The calibrated model rebuilt from the run: cheap state, or the full state dict.

    (model, tokenizer, manifest, what it was restored from); the quantizers are attached to a
    fresh patch ledger, so a bad amax met at export is replaced and named as in step 02."""
    manifest = load_manifest(state_dir(run_dir))
    if QUANTIZER_TENSORS in manifest["files"]:
        model, tok, manifest = hf_model.restore(run_dir, model_path=model_path)
        return model, tok, manifest, "cheap state"
    if FULL_STATE not in manifest["files"]:
        raise RecoverError(f"{state_dir(run_dir) / MANIFEST}: neither {QUANTIZER_TENSORS} nor {FULL_STATE}")
    import modelopt.torch.opt as mto

    patches.apply()
    s = _settings(manifest, model_path)
    model = hf_model.load_model(s)
    model = mto.restore(model, str(state_dir(run_dir) / FULL_STATE))
    patches.Ledger().attach(model)
    tok, side, pad = hf_model.load_tokenizer(s["pyt_ckpt_path"], s["trust_remote_code"])
    tok.padding_side = side
    tok.pad_token = pad
    return model, tok, manifest, "full state"


def _settings(manifest: dict, model_path: str | None) -> dict:
    """The hf_ptq settings the run calibrated with (either driver's), the model path overridden."""
    s = modelopt_settings(normalize(manifest["params"]), strict=False)
    if model_path:
        s["pyt_ckpt_path"] = model_path
    return s


def export_generic(run_dir: str | Path, out: str | Path, model_path: str | None = None) -> dict:
    """modelopt's unified HF export rebuilt from the run's state, into `out` atomically (whole or absent)."""
    run_dir, out = Path(run_dir), Path(out)
    model, tok, manifest, how = _restore_generic(run_dir, model_path)
    s = _settings(manifest, model_path)
    with atomic.partial_dir(out) as work:
        if s["verbose"]:  # as step 02 writes it beside the export
            import modelopt.torch.quantization as mtq

            mtq.print_quant_summary(model, str(work))
        rec = hf_model.export_model(model, tok, s, work)
    return {**rec, "dir": str(out), "restored_from": how}


def export(e: dict, run_dir: str | Path, progress: bool = True, verify_stem: str = "verify") -> dict:
    """Step 03: write the export named by the `export:` settings from the run's saved state, then verify it.

    Returns the record also written to `<run_dir>/export.json` (atomic): what was written, what
    was filled, and the verifier's verdict (its table goes to `<run_dir>/verify.md`); plus, not
    written there, the verifier's table (`verify_table`) and whole result (`verify`).
    """
    from .verify import format_table, verify, write_result

    e = export_settings(e)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with StepRecord(run_dir / RECORD, "quantbook.export", settings=e, run_dir=str(run_dir)) as rec:
        if e["layout"] == "v4-serving":
            from .layout import write_serving_layout

            amax, origin = amax_from_state_files(run_dir)
            report = write_serving_layout(e["source"], amax, e["dir"], cast_mxfp4_to_nvfp4=e["cast_mxfp4_to_nvfp4"],
                                          mtp_experts=e["mtp_experts"],
                                          workers=e["workers"], device=e["device"], progress=progress)
            rec.update(amax_origin=origin, layout_report={k: v for k, v in report.items() if k != "fills"},
                       fills=report["fills"])
        else:
            rec.update(generic=export_generic(run_dir, e["dir"], model_path=e["reference"]))
        result = verify(e["dir"], source=e["source"], reference=e["reference"], sample=e["verify_sample"],
                        workers=e["workers"], progress=progress)
        paths = write_result(result, run_dir, stem=verify_stem)
        rec.update(verdict=result["verdict"], verify_summary=result["summary"], verify_files=[str(p) for p in paths])
        gate = run_fidelity(e, run_dir, result, progress) if e["fidelity"]["enabled"] else None
        out = rec.done(fidelity=gate and gate["record"], seconds=round(time.time() - t0, 2))
    return {**out, "verify_table": format_table(result), "verify": result, "eval": gate and gate["result"]}


def calibration_file(run_dir: Path) -> str | None:
    """The local calibration JSONL step 02 ran on (from its `quantize.json`), or None."""
    q = atomic.read_json(run_dir / "quantize.json") or {}
    return local_calibration(((q.get("params") or {}).get("hf_ptq") or {}).get("dataset"))


def local_calibration(dataset: str | None) -> str | None:
    """The first local JSONL of an hf_ptq `dataset` value (comma-separated names), or None."""
    local = [d for d in str(dataset or "").split(",") if d.endswith(".jsonl") and Path(d).exists()]
    return local[0] if local else None


def run_fidelity(e: dict, run_dir: Path, verified: dict, progress: bool = True) -> dict:
    """The fidelity gate on a verified export: `eval.json` / `eval.md` in the run directory and the
    export's model card. Not run on an export that failed verification (named in the record)."""
    from . import fidelity
    from .fidelity_resume import PROGRESS_DIR

    if verified["verdict"] != "pass":
        return {"record": {"verdict": "not run", "why": f"verify: {verified['verdict']}"}, "result": None}
    result, ran = _gate_of_the_pass(e, run_dir), "in step 02's streaming pass (eval-02.json), judged here"
    if result is None:
        result, ran = fidelity.evaluate(e["dir"], e["source"], e["fidelity"], calibration=calibration_file(run_dir),
                                        progress=progress, resume_dir=run_dir / PROGRESS_DIR), "here"
    files = fidelity.write_result(result, run_dir)
    card = fidelity.write_model_card(e["dir"], result, fidelity.provenance(run_dir, e))
    n = result["numbers"]
    return {"result": result, "record": {
        "verdict": result["verdict"], "summary": result["summary"], "reasons": result["reasons"],
        "worst_blocks": result["worst_blocks"], "ppl_ratio": n["ppl_ratio"], "kld_mean": n["kld"]["mean"],
        "same_top": n["same_top"], "mtp_agreement": (n.get("mtp") or {}).get("top1_agreement"),
        "files": [str(p) for p in files], "model_card": str(card), "ran": ran}}


def _gate_of_the_pass(e: dict, run_dir: Path) -> dict | None:
    """The gate step 02's streaming pass ran on this export, under this step's thresholds; None (and
    why, on the terminal) when it ran none or measured something else: then this step runs it."""
    from ..amax import SNAPSHOT
    from ..release.shards import file_digest
    from . import fidelity_along

    gate = atomic.read_json(run_dir / f"{fidelity_along.RECORD}.json")
    snap = run_dir / SNAPSHOT
    if gate is None or not snap.exists():
        return None
    why = fidelity_along.adoptable(gate, e, file_digest(snap), e["fidelity"])
    if why:
        print(f"[quantbook] fidelity gate: {why}; running it here", flush=True)
        return None
    return fidelity_along.rejudge(gate, e["fidelity"])


def default_run_dir(params: dict, runs_dir: str | Path = "runs") -> Path:
    """`runs/<params name>`, where `quantbook run` keeps a run of that params file (`runs.run_dir_for`)."""
    from ..params import run_dir_for

    return run_dir_for(params, None, runs_dir)


def export_only(params_path: str | Path, run_dir: str | Path | None = None, progress: bool = True) -> tuple[dict, int]:
    """`--export-only`: step 03 from a run's saved state (the CLI judges it first: `runs.judge_run`). (record,
    exit code: 0 pass, 1 fail, 3 research-only, 4 incomplete)."""
    from ..params import load_params
    from .verify import exit_code

    params = load_params(params_path)
    rec = export(params.get("export") or {}, run_dir or default_run_dir(params), progress=progress)
    code = exit_code({"verdict": rec["verdict"]})
    return rec, code or (1 if (rec.get("fidelity") or {}).get("verdict") == "fail" else 0)


def validate_only(params_path: str | Path, run_dir: str | Path | None = None) -> tuple[dict, int]:
    """`--validate-only`: check the run's saved state without loading the model. (result, 0 ok / 1 refused)."""
    from ..params import load_params

    params = load_params(params_path)
    e = {**EXPORT_DEFAULTS, **(params.get("export") or {})}
    v = validate_state(run_dir or default_run_dir(params), model_path=e.get("reference"), source=e.get("source"),
                       layout=e.get("layout") or "v4-serving", mtp_experts=e.get("mtp_experts") or "released")
    return v, 0 if v["verdict"] == "ok" else 1


__all__ = ["export", "export_only", "validate_only", "validate_state", "require_ok", "format_validation",
           "export_generic", "amax_from_state_files", "export_settings", "EXPORT_DEFAULTS"]
