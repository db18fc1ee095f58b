"""`quantbook` command line: one subcommand per step, each a thin shell over a library call."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    acct = run(p, workers=a.workers, device=a.device)
    print(format_table(accounting_rows(acct)))
    print(f"scales consumed: {acct['scales_consumed']:,}; FP8 weights: {acct['fp8_weights']:,}; "
          f"FP4 weights: {acct['fp4_weights']:,}; shards written {acct['shards_written']}, "
          f"skipped (already complete) {acct['shards_skipped']}")
    if acct["nan_values"]:
        print(f"WARNING: NaN values in {len(acct['nan_values'])} tensors: "
              f"{json.dumps(dict(list(acct['nan_values'].items())[:10]))}", file=sys.stderr)
        return 3
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
    p.set_defaults(func=cmd_dequant)
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
