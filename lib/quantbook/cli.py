"""`quantbook` command line: one subcommand per step, each a thin shell over a library call.

A refusal (`errors.QuantbookError`) prints its message and exits 2; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import QuantbookError, StepFailed
from .params import run_dir_for
from .release.convert import DEFAULT_CHUNK_ELEMS
from .release.format import named_config


def cmd_make_tiny(a) -> int:
    from .release.tiny import check_trained_spec, copy_trained, make_tiny

    if a.trained:
        check_trained_spec({"like": a.like, "layers": a.layers, "experts": a.experts})
        print(f"trained tiny V4 checkpoint copied to {copy_trained(a.out)} (files checked against TRAINING.json)")
        return 0
    out = make_tiny(a.out, like=named_config(a.like), seed=a.seed, layers=a.layers, experts=a.experts)
    print(f"tiny V4 checkpoint written to {out}")
    return 0


def cmd_make_sparse(a) -> int:
    from .release.sparse import allocated_bytes, write_sparse_release

    out = write_sparse_release(named_config(a.like), a.out, bf16=a.bf16)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"full-size {'BF16 copy' if a.bf16 else 'release'} as sparse files written to {out}: {size / 2**30:,.1f} GiB apparent, "
          f"{allocated_bytes(out) / 2**20:,.1f} MiB on disk (data reads as zeros)")
    return 0


def cmd_dequant(a) -> int:
    from .preflight import preflight, require_pass
    from .release.convert import accounting_rows, check_destination, format_table, plan, plan_summary, run

    # what step 01 cannot finish (release, destination, disk, memory for the workers, device), before any work
    require_pass(preflight({"name": f"dequant {a.src}", "dequant": dict(source=a.src, destination=a.dst,
                            workers=a.workers, device=a.device)}, steps=["01"], run_dir=Path(a.dst)))
    p = plan(a.src, a.dst)
    check_destination(p)
    print(format_table(plan_summary(p, a.workers, a.chunk_elems)))
    acct = run(p, workers=a.workers, device=a.device, chunk_elems=a.chunk_elems)
    print(format_table(accounting_rows(acct)))
    print(f"scales consumed: {acct['scales_consumed']:,}; FP8 weights: {acct['fp8_weights']:,}; "
          f"FP4 weights: {acct['fp4_weights']:,}; shards written {acct['shards_written']}, "
          f"skipped (already complete) {acct['shards_skipped']}")
    if acct["nonfinite_values"]:
        print(f"WARNING: non-finite values in {len(acct['nonfinite_values'])} tensors: "
              f"{json.dumps(dict(list(acct['nonfinite_values'].items())[:10]))}", file=sys.stderr)
        return 3
    return 0


def cmd_preflight(a) -> int:
    from .preflight import format_verdict, preflight

    run_dir = Path(a.runs_dir) / a.run_id if a.run_id else None
    v = preflight(a.params, steps=a.steps, run_dir=run_dir, runs_dir=a.runs_dir)
    print(json.dumps(v.as_dict(), indent=2, default=str) if a.json else format_verdict(v))
    return 0 if v.ok else 1


def cmd_run(a) -> int:
    import logging

    from .records.runs import rehearse, run_chain

    if not a.quiet:  # cell output streams to the terminal as well as to runs/<id>/run.log
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    if a.rehearse and (a.steps or a.redo or a.no_rehearsal):
        print("quantbook run: --rehearse runs the whole chain afresh; it takes no --steps, --redo or --no-rehearsal",
              file=sys.stderr)
        return 2
    try:
        if a.rehearse:
            m = rehearse(a.params, runs_dir=a.runs_dir, run_id=a.run_id, notebooks_dir=a.notebooks,
                         calib_file=a.calib_file, log_output=not a.quiet)
        else:
            m = run_chain(a.params, steps=a.steps, run_id=a.run_id, runs_dir=a.runs_dir, notebooks_dir=a.notebooks,
                          redo=a.redo, log_output=not a.quiet, no_rehearsal=a.no_rehearsal)
    except StepFailed as e:  # the chain ran and a step's notebook failed: a verdict, like verify's
        print(f"quantbook run: {e}", file=sys.stderr)
        if a.rehearse:
            print(f"the rehearsal failed in minutes, not the real run in hours: fix it and rehearse again "
                  f"(quantbook run {a.params} --rehearse)", file=sys.stderr)
        else:
            print(f"fix it and rerun: quantbook run {a.params} --run-id {Path(e.record['params']['run_dir']).name} "
                  "(completed steps are skipped)", file=sys.stderr)
        return 1
    what = "rehearsal" if a.rehearse else "run"
    print(f"{what} {m['run_id']}: {m['status']}; records in {Path(a.runs_dir) / m['run_id']}")
    if a.rehearse and m["status"] == "complete":
        from .records.runs import after_rehearsal

        print("\n".join(after_rehearsal(a.params, m, runs_dir=a.runs_dir, run_id=a.run_id)[1]))
    return 0


def cmd_runs(a) -> int:
    from .records.runs import format_runs, list_runs

    rows = list_runs(a.runs_dir)
    print(json.dumps(rows, indent=2) if a.json else format_runs(rows))
    return 0


def cmd_lab(a) -> int:
    from .records.lab import open_run

    open_run(a.run_dir, port=a.port, ip=a.ip, browser=a.browser)
    return 0


def cmd_verify(a) -> int:
    from .export.verify import exit_code, format_table, verify, write_result

    result = verify(a.export, source=a.source, reference=a.reference, sample=a.sample, workers=a.workers,
                    reread=a.reread)
    run_dir = Path(a.run_dir) if a.run_dir else Path("runs") / f"verify-{Path(a.export).resolve().name}"
    paths = write_result(result, run_dir)
    print(format_table(result))
    print(f"written: {', '.join(map(str, paths))}")
    return exit_code(result)


def cmd_eval(a) -> int:
    from .export.fidelity import evaluate, exit_code, format_table, write_result

    settings = {k: v for k, v in (("engine", a.engine), ("mode", a.mode), ("device", a.device), ("text", a.text),
                                  ("samples", a.samples), ("seq", a.seq), ("batch_size", a.batch_size))
                if v is not None}
    from .export.fidelity_resume import PROGRESS_DIR

    run_dir = Path(a.run_dir) if a.run_dir else Path("runs") / f"eval-{Path(a.export).resolve().name}"
    result = evaluate(a.export, a.source, settings, calibration=a.calibration, resume_dir=run_dir / PROGRESS_DIR)
    paths = write_result(result, run_dir)
    if a.json:
        from . import atomic

        atomic.write_json(a.json, result)
        paths += (Path(a.json),)
    print(format_table(result))
    print(f"written: {', '.join(map(str, paths))}")
    return exit_code(result)


def cmd_export(a) -> int:
    from .params import load_params

    run_dir = a.run_dir or run_dir_for(load_params(a.params), a.run_id, a.runs_dir)
    return _export_from_run(a.params, run_dir, a.validate_only, "export")


def _export_from_run(params, run_dir, validate_only_: bool, command: str) -> int:
    """Step 03 from a run's saved amax/state, or (validate_only_) only check that state."""
    from .export.recover import export_only, format_validation, validate_only
    from .params import load_params
    from .records.runs import judge_run

    if validate_only_:
        v, code = validate_only(params, run_dir)
        print(format_validation(v))
        return code
    p = load_params(params)
    run_dir = Path(run_dir) if run_dir else run_dir_for(p)
    judge_run(p, ["03"], run_dir)  # what step 03 cannot do (no amax, a qformat the layout cannot export), before work
    rec, code = export_only(params, run_dir)
    print(rec["verify_table"])
    print(f"{rec['verdict'].upper()}: {rec['verify_summary']} (records in {rec['run_dir']})")
    if rec.get("eval"):
        from .export.fidelity import format_table

        print(format_table(rec["eval"]))
    gate = rec.get("fidelity") or {}
    if gate:
        print(f"fidelity gate: {gate['verdict'].upper()}{': ' + gate['summary'] if gate.get('summary') else ''}")
    return code


def cmd_quantize(a) -> int:
    from .calibrate import quantize
    from .calibrate.driver import generic_export_dir
    from .params import load_params
    from .records.runs import judge_run, refuse_finished_calibration

    if a.export_only or a.validate_only:  # step 03 on a calibrated run: no model loaded, nothing recalibrated
        if not a.run_id:
            print("quantbook quantize: --export-only/--validate-only need --run-id of the calibrated run",
                  file=sys.stderr)
            return 2
        return _export_from_run(a.params, Path(a.runs_dir) / a.run_id, a.validate_only, "quantize")
    params = load_params(a.params)
    run_dir = run_dir_for(params, a.run_id, a.runs_dir)
    refuse_finished_calibration(run_dir)
    judge_run(params, ["02"], run_dir)  # what step 02 or the layout of step 03 cannot do, before any work
    run_id = run_dir.name
    print(f"quantize: run {run_id} -> {run_dir} (rerun with --run-id {run_id} to resume a layerwise or streaming "
          "calibration)")
    rec = quantize(params.get("quantize") or {}, run_dir, export=params.get("export"))
    cov = rec.get("expert_coverage") or {}
    generic = generic_export_dir(rec)
    post = rec.get("post_calibration") or {}
    state = f"state {run_dir / 'state'}; " if post.get("state") else ""
    if (rec.get("export") or {}).get("along"):
        print(f"v4-serving export written along the pass: {rec['export']['dir']} (step 03 verifies it and runs the gate)")
    print(f"{rec['status']}: generic export {generic or 'not written'}; {state}"
          f"amax {run_dir / 'amax.safetensors'} (step 03 exports from it); "
          f"amax repaired: {len(post.get('amax_repairs', []))}; "
          f"experts never routed: {cov.get('experts_never_routed')}")
    return 0


def cmd_calib_data(a) -> int:
    from .calibrate.data import write_calib_jsonl

    r = write_calib_jsonl(a.out, source=a.source, chunk_chars=a.chunk_chars, archive=a.archive, force=a.force)
    what = "exists, left as is" if r["skipped"] else f"written from {r['requirement']} ({r['license']})"
    print(f"{r['path']}: {r['samples']} samples, {r['chars']:,} characters, {r['heldout']} held out; {what}")
    return 0


DESCRIPTION = ("Quantize DeepSeek V4 to NVFP4 with NVIDIA Model Optimizer, step by step (01 dequant, 02 quantize, "
               "03 export, 04 inspect) or as one chain (run), rehearsed first on a tiny copy. A refusal prints its "
               "reason and exits 2; a traceback means a bug.")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("quantbook")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantbook", description=DESCRIPTION)
    ap.add_argument("--version", action="version", version=f"quantbook {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny checkpoint in the released V4 format")
    p.add_argument("out", help="the directory to write the tiny release into")
    p.add_argument("--like", default="flash", help="flash, pro, or a config.json path (default: flash)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default %(default)s)")
    p.add_argument("--experts", type=int, default=None, help="routed experts a layer (default: the tiny default)")
    p.add_argument("--trained", action="store_true",
                   help="copy the packaged TRAINED tiny release (flash, 4 layers, 8 experts; --seed does not apply) "
                        "instead of random weights")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("make-sparse", help="a full-size release's exact shards and headers, data as holes (seconds)")
    p.add_argument("out", help="the directory to write the sparse release into")
    p.add_argument("--like", default="pro", help="pro, flash, or a config.json path (default: pro)")
    p.add_argument("--bf16", action="store_true", help="the BF16 copy step 01 would write from it instead")
    p.set_defaults(func=cmd_make_sparse)

    p = sub.add_parser("dequant", help="FP8/FP4 release -> BF16 checkpoint (exact, resumable)")
    p.add_argument("src", help="the released FP8/FP4 checkpoint (a directory with config.json and shards)")
    p.add_argument("dst", help="where the BF16 checkpoint goes (new, empty, or an earlier run of the same source)")
    p.add_argument("--workers", type=int, default=2, help="shards converted in parallel (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--chunk-elems", type=int, default=DEFAULT_CHUNK_ELEMS,
                   help="elements per worker chunk; memory <= workers x (64 B x chunk + 48 MiB) (default %(default)s)")
    p.set_defaults(func=cmd_dequant)
    p = sub.add_parser("run", help="run the notebook chain 01->04 with papermill into runs/<run id>/ (resumable)")
    p.add_argument("params", help="params YAML, e.g. params/tiny.yaml")
    p.add_argument("--steps", nargs="+", default=None, help="steps to run: 01 02, 01-03, quantize, ... (default: all)")
    p.add_argument("--run-id", default=None, help="run directory name (default: the params name); "
                   "rerunning an id skips its completed steps")
    p.add_argument("--redo", nargs="+", default=None, help="steps to run again even if complete")
    p.add_argument("--runs-dir", default="runs", help="the directory of run directories (default %(default)s)")
    p.add_argument("--notebooks", default=None, help="directory of NN_name.ipynb step notebooks (default: the repo's)")
    p.add_argument("--quiet", action="store_true", help="do not stream cell output (it still goes to run.log)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the whole chain on a tiny release built from the source's own config.json, same params "
                        "otherwise, into runs/<id>-rehearsal (minutes; CPU when there is no GPU)")
    p.add_argument("--no-rehearsal", action="store_true",
                   help="start a full-size run without a passed rehearsal of the same params (recorded)")
    p.add_argument("--calib-file", default="work/calib/english.jsonl",
                   help="with --rehearse: the local calibration text that replaces hub datasets (default %(default)s)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("preflight", help="judge a run from headers and configs alone (seconds): release, settings, "
                                         "versions, data, memory, disk, plan with projected times; exit 1 if refused")
    p.add_argument("params", help="params YAML, e.g. params/v4_pro_b200.yaml")
    p.add_argument("--steps", nargs="+", default=None, help="steps to judge: 01 02, 01-03, quantize (default: all)")
    p.add_argument("--run-id", default=None, help="the run's directory name (default: the params name)")
    p.add_argument("--runs-dir", default="runs", help="where runs and rehearsals are (default %(default)s)")
    p.add_argument("--json", action="store_true", help="the verdict as JSON")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("runs", help="list runs and their status")
    p.add_argument("--runs-dir", default="runs", help="the directory of run directories (default %(default)s)")
    p.add_argument("--json", action="store_true", help="the list as JSON")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("lab", help="open a run's notebook 04 in JupyterLab (amax and export explorers); Ctrl-C stops")
    p.add_argument("run_dir", help="the run directory, e.g. runs/tiny")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1: reach it by ssh -L)")
    p.add_argument("--browser", action="store_true", help="also open the address in this machine's browser")
    p.set_defaults(func=cmd_lab)
    p = sub.add_parser("verify", help="check an export: the V4 serving layout's checklist, numbers, verdict; exit 0 "
                                      "pass, 1 fail, 3 research-only (generic), 4 incomplete (a check did not run)")
    p.add_argument("export", help="the export directory (v4-serving layout, or modelopt's generic export)")
    p.add_argument("--source", default=None, help="the release (FP8/FP4) the export was built from: byte checks")
    p.add_argument("--reference", default=None, help="the BF16 checkpoint (step 01): numeric check of every expert")
    p.add_argument("--run-dir", default=None, help="where verify.json/verify.md go (default runs/verify-<export>)")
    p.add_argument("--sample", type=int, default=None, help="numeric check on N expert tensors only (default all)")
    p.add_argument("--workers", type=int, default=2, help="threads for the numeric check (default %(default)s)")
    p.add_argument("--reread", action="store_true", help="read every checked expert tensor again, also those whose "
                   "numbers step 02's pass computed on the bytes it wrote (recorded in the export's manifest)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("eval", help="the fidelity gate: the export as the engine computes it against the release, "
                                    "block by block on held-out text (PPL, KLD, top token, MTP); exit 1 if it fails")
    p.add_argument("export", help="the v4-serving export directory (quantbook's, or any in that layout)")
    p.add_argument("--source", required=True, help="the release (FP8/FP4) it was made from: the reference model")
    p.add_argument("--engine", choices=["auto", "vllm", "sglang"], default=None,
                   help="whose reading of the export's MTP experts (main layers read alike); default auto: the "
                        "engine that reads the export's form (released MXFP4: sglang, nvfp4: vllm)")
    p.add_argument("--mode", choices=["w4a4", "w4a16"], default=None,
                   help="w4a4: activations NVFP4 as on Blackwell (default); w4a16: BF16 activations (Marlin, Hopper)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    p.add_argument("--text", default=None, help="held-out JSONL ({\"text\": ...} per line); default: the held-out "
                   "file beside --calibration")
    p.add_argument("--calibration", default=None, help="the calibration JSONL: its held-out sibling is the default "
                   "text, and the text may share no sample with it")
    p.add_argument("--samples", type=int, default=None, help="sequences of --seq tokens (default 16)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default 4)")
    p.add_argument("--run-dir", default=None, help="where eval.json/eval.md go, and the gate's progress while it runs: "
                   "a rerun after a kill carries on (default runs/eval-<export>)")
    p.add_argument("--json", default=None, help="also write the whole result to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="step 03: export from a run's saved amax/state (no recalibration), then verify")
    p.add_argument("params", help="params YAML (its export: section)")
    p.add_argument("--run-dir", default=None, help="the run directory of step 02 (default --runs-dir/--run-id)")
    p.add_argument("--run-id", default=None, help="the run's id (default: the params name, as quantbook run names it)")
    p.add_argument("--runs-dir", default="runs", help="the directory of run directories (default %(default)s)")
    p.add_argument("--validate-only", action="store_true",
                   help="check the saved state without loading the model or writing anything")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("quantize", help="step 02: calibrate with modelopt and export (driver from params)")
    p.add_argument("params", help="params YAML (its quantize: section)")
    p.add_argument("--run-id", default=None, help="run directory name under --runs-dir (default: the params name, "
                   "as quantbook run names it); the same id resumes a killed layerwise or streaming calibration")
    p.add_argument("--runs-dir", default="runs", help="the directory of run directories (default %(default)s)")
    p.add_argument("--export-only", action="store_true",
                   help="export from the run's saved amax/state (params export: section) and verify; no calibration")
    p.add_argument("--validate-only", action="store_true",
                   help="check the run's saved state (files, versions, model hash, quantizers, amax) without "
                        "loading the model")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("calib-data", help="write calibration text (JSONL) from a PyPI package's test data")
    p.add_argument("out", help="the .jsonl file to write (left alone when it exists)")
    p.add_argument("--source", default="brotli", choices=["brotli", "gensim"],
                   help="brotli: public-domain books (brotli==1.2.1 sdist); gensim: an English Wikipedia "
                        "sample (gensim==4.4.0 wheel)")
    p.add_argument("--chunk-chars", type=int, default=2000, help="characters per sample (paragraphs joined)")
    p.add_argument("--archive", default=None, help="an already downloaded sdist/wheel of the source (offline)")
    p.add_argument("--force", action="store_true", help="rewrite an existing file")
    p.set_defaults(func=cmd_calib_data)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuantbookError as e:
        print(f"quantbook {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
