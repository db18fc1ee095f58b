"""`quantbook` command line: one subcommand per step, each a thin shell over a library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .convert import DEFAULT_CHUNK_ELEMS
from .format import FLASH_CONFIG, PRO_CONFIG, FormatError


def _config_path(like: str) -> Path:
    named = {"flash": FLASH_CONFIG, "pro": PRO_CONFIG}
    return named.get(like.lower(), Path(like))


def cmd_make_tiny(a) -> int:
    from .tiny import make_tiny

    out = make_tiny(a.out, like=_config_path(a.like), seed=a.seed, layers=a.layers, experts=a.experts)
    print(f"tiny V4 checkpoint written to {out}")
    return 0


def cmd_dequant(a) -> int:
    from .convert import accounting_rows, check_destination, format_table, plan, run

    p = plan(a.src, a.dst)
    check_destination(p)
    print(f"plan: {len(p.shards)} shards, {p.bytes_in / 2**30:.3f} GiB in -> {p.bytes_out / 2**30:.3f} GiB BF16 out")
    acct = run(p, workers=a.workers, device=a.device, chunk_elems=a.chunk_elems)
    print(format_table(accounting_rows(acct)))
    print(f"scales consumed: {acct['scales_consumed']:,}; FP8 weights: {acct['fp8_weights']:,}; "
          f"FP4 weights: {acct['fp4_weights']:,}; shards written {acct['shards_written']}, "
          f"skipped (already complete) {acct['shards_skipped']}")
    if acct["nan_values"]:
        print(f"WARNING: NaN values in {len(acct['nan_values'])} tensors: "
              f"{json.dumps(dict(list(acct['nan_values'].items())[:10]))}", file=sys.stderr)
        return 3
    return 0


def cmd_run(a) -> int:
    import logging

    from .params import ParamsError
    from .runs import StepFailed, run_chain

    if not a.quiet:  # cell output streams to the terminal as well as to runs/<id>/run.log
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    try:
        m = run_chain(a.params, steps=a.steps, run_id=a.run_id, runs_dir=a.runs_dir, notebooks_dir=a.notebooks,
                      redo=a.redo, log_output=not a.quiet)
    except StepFailed as e:
        print(f"quantbook run: {e}", file=sys.stderr)
        print(f"fix it and rerun the same command with --run-id {a.run_id or '<the same id>'}: "
              "completed steps are skipped", file=sys.stderr)
        return 1
    except (ParamsError, RuntimeError, FileNotFoundError) as e:
        print(f"quantbook run: error: {e}", file=sys.stderr)
        return 2
    print(f"run {m['run_id']}: {m['status']}; records in {Path(a.runs_dir) / m['run_id']}")
    return 0


def cmd_runs(a) -> int:
    from .runs import format_runs, list_runs

    rows = list_runs(a.runs_dir)
    print(json.dumps(rows, indent=2) if a.json else format_runs(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="quantbook", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny checkpoint in the released V4 format")
    p.add_argument("out")
    p.add_argument("--like", default="flash", help="flash, pro, or a config.json path (default: flash)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=None)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("dequant", help="FP8/FP4 release -> BF16 checkpoint (exact, resumable)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--workers", type=int, default=2)
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
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--notebooks", default=None, help="directory of NN_name.ipynb step notebooks (default: the repo's)")
    p.add_argument("--quiet", action="store_true", help="do not stream cell output (it still goes to run.log)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("runs", help="list runs and their status")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FormatError, FileExistsError) as e:
        print(f"quantbook {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
