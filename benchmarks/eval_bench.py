"""The fidelity gate (`quantbook eval`) at real V4 Pro layer dimensions, against the disk.

One run, on one GPU: a synthetic release with V4 Pro's real dimensions (`streaming_bench.bench_config`:
384 experts of 3072 x 7168 per layer, the real layer kinds, plus the MTP block; random valid codes),
calibrated by the streaming driver, exported to the v4-serving layout (carry), then:

  raw read   the release's and the export's shards read front to back after dropping the page cache:
             the disk's sequential read rate on these files
  eval       `export.fidelity.evaluate` on `--samples` x `--seq` held-out tokens (random printable text,
             the byte tokenizer: only routing depends on it), page cache dropped first: per block the
             read of each checkpoint, the reference and candidate builds and forwards, peak GPU memory
  projection V4 Pro (61 layers + MTP) on this machine and on one GPU of the 8x B200 node

Writes `eval_bench.json` and `eval_bench.md` under `--out`.

    python benchmarks/eval_bench.py --out OUT --dir SCRATCH [--layers 1]                 # GPU machine
    python benchmarks/eval_bench.py --out OUT --device cpu --experts 4 --vocab 4096 \\
        --samples 4 --seq 64 --batch 2                                                   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_bench import (  # noqa: E402
    GIB, bench_config, build_release, drop_cache, machine, raw_read, run_streaming, shards, write_text,
)


def eval_rows(result: dict, read_gbs: float) -> list[dict]:
    rows = []
    for b in result["blocks"]:
        t = b["timing"]
        gb = (t.get("release_read_bytes", 0) + t.get("export_read_bytes", 0)) / 1e9
        disk_s = gb / read_gbs if read_gbs else None
        rows.append({"block": b["block"], "read_GB": round(gb, 2),
                     "release_read_s": t.get("release_read_s"), "export_read_s": t.get("export_read_s"),
                     "read_wait_s": round(t.get("release_read_wait_s", 0) + t.get("export_read_wait_s", 0), 3),
                     "reference_build_s": t.get("reference_build_s"), "reference_forward_s": t.get("reference_forward_s"),
                     "candidate_build_s": t.get("candidate_build_s"), "candidate_forward_s": t.get("candidate_forward_s"),
                     "total_s": t["total_s"], "disk_read_s": round(disk_s, 2) if disk_s else None,
                     "x_disk_read": round(t["total_s"] / disk_s, 2) if disk_s else None,
                     "gpu_peak_GiB": round(t["gpu_peak_bytes"] / GIB, 2) if "gpu_peak_bytes" in t else None,
                     "own_error": b["local_rel_err"]})
    return rows


def projection(rows: list[dict], prepare_s: float, read_gbs: float, pro_blocks: int = 62,
               raid_gbs: float = 25.0) -> dict:
    steady = rows[1:] or rows
    mean = {k: sum(r[k] or 0 for r in steady) / len(steady) for k in
            ("total_s", "read_GB", "reference_build_s", "reference_forward_s", "candidate_build_s",
             "candidate_forward_s")}
    compute = sum(mean[k] for k in ("reference_build_s", "reference_forward_s", "candidate_build_s",
                                    "candidate_forward_s"))
    here = prepare_s + rows[0]["total_s"] + (pro_blocks - 1) * mean["total_s"]
    node = prepare_s + pro_blocks * max(mean["read_GB"] / raid_gbs, compute)
    return {"blocks": pro_blocks, "steady_block": {k: round(v, 3) for k, v in mean.items()},
            "compute_s_per_block": round(compute, 3), "this_machine_min": round(here / 60, 1),
            "b200_one_gpu_min": round(node / 60, 1),
            "assumptions": [
                f"V4 Pro = {pro_blocks} blocks, every one like the measured steady-state blocks (the release's and the "
                "export's bytes of a block, 384 experts of 3072 x 7168)",
                "this machine: the first block as measured, the others at the steady mean, plus the preparation",
                f"B200 node: both checkpoints read at {raid_gbs:g} GB/s (the low end of its NVMe RAID; this machine: "
                f"{read_gbs:g} GB/s), overlapped with compute; compute as fast as here (a B200 is faster)"]}


def table(rows: list[dict]) -> str:
    cols = list(rows[0]) if rows else []
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default OUT/scratch)")
    ap.add_argument("--like", default="pro")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--first-layer", type=int, default=3)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--samples", type=int, default=64, help="held-out sequences")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (only the amax come of it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=8, help="the export writer's workers")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--raw-read", action="store_true", help="also read every shard once, front to back, first")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(a.dir) if a.dir else out / "scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    res: dict = {"machine": machine(a.device), "args": vars(a)}
    cfg = bench_config(a.like, a.layers, a.first_layer, a.experts, a.vocab)
    src, res["build_s"] = build_release(cfg, scratch / "release")
    print(f"[eval_bench] release built in {res['build_s']:.0f} s", flush=True)
    calib = write_text(scratch / "calib.jsonl", a.calib_samples, a.seq, seed=0)
    heldout = write_text(scratch / "calib-heldout.jsonl", a.samples, a.seq, seed=1)
    cal = argparse.Namespace(samples=a.calib_samples, seq=a.seq, batch=a.batch, device=a.device)
    res["calibrate"] = {k: v for k, v in run_streaming(src, calib, cal, scratch, "run").items() if k != "timeline"}

    from quantbook import amax as amax_mod
    from quantbook.export import fidelity
    from quantbook.export.layout import write_serving_layout

    amax, _ = amax_mod.load_snapshot(scratch / "run" / amax_mod.SNAPSHOT)
    t = time.perf_counter()
    export = scratch / "export"
    rep = write_serving_layout(src, amax, export, workers=a.workers, progress=False)
    res["export_s"] = round(time.perf_counter() - t, 2)
    print(f"[eval_bench] export written in {res['export_s']:.0f} s", flush=True)
    files = shards(src) + shards(export)
    if a.raw_read:
        res["cache_drop"] = drop_cache(files)
        res["raw_read"] = raw_read(files)
        read_gbs = res["raw_read"]["gb_per_s"]
    else:  # the eval's own first read (not overlapped) measures the disk
        read_gbs = None
    res["cache_drop"] = drop_cache(files)
    settings = {"device": a.device, "samples": a.samples, "seq": a.seq, "batch_size": a.batch,
                "text": str(heldout), "engine": "sglang"}
    t = time.perf_counter()
    result = fidelity.evaluate(export, src, settings, calibration=calib)
    wall = time.perf_counter() - t
    if read_gbs is None:
        t0 = result["blocks"][0]["timing"]
        read_gbs = round((t0["release_read_bytes"] + t0["export_read_bytes"]) /
                         (t0["release_read_s"] + t0["export_read_s"]) / 1e9, 3)
        res["read_rate_from"] = "the eval's first block (its reads not overlapped)"
    rows = eval_rows(result, read_gbs)
    prepare = wall - sum(r["total_s"] for r in rows)
    res["eval"] = {"wall_s": round(wall, 2), "prepare_s": round(prepare, 2), "verdict": result["verdict"],
                   "numbers": result["numbers"], "rows": rows, "export_report": {k: rep.get(k) for k in
                                                                                 ("experts", "shards")}}
    res["projection"] = projection(rows, prepare, read_gbs)
    (out / "eval_bench.json").write_text(json.dumps(res, indent=2, default=str))
    md = [f"# eval_bench ({res['machine']})", "", f"raw read {read_gbs} GB/s ({res['cache_drop']}); eval wall "
          f"{wall:.1f} s, preparation {prepare:.1f} s; {a.samples} x {a.seq} tokens, batch {a.batch}", "",
          table(rows), "", "```", json.dumps(res["projection"], indent=2), "```"]
    (out / "eval_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    if not a.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
