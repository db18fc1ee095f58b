"""The fidelity gate (`quantbook eval`) at real V4 Pro layer dimensions, against the disk.

One run, on one GPU: a synthetic release with V4 Pro's real dimensions (`streaming_bench.bench_config`:
384 experts of 3072 x 7168 per layer, the real layer kinds, plus the MTP block; random valid codes),
calibrated by the streaming driver, exported to the v4-serving layout (carry), then:

  raw read   the release's and the export's shards read front to back after dropping the page cache:
             the disk's sequential read rate on these files
  eval       `export.fidelity.evaluate` on `--samples` x `--seq` held-out tokens (random printable text,
             the byte tokenizer: only routing depends on it), page cache dropped before each run, once per
             entry of `--runs` (transformers' experts implementation: `grouped_mm`, the gate's, or
             `eager`, its per-expert loop), side by side in this one process: per block the read of each
             checkpoint, the reference and candidate builds and forwards, peak GPU memory. The first run
             pays CUDA's start; the projection takes the last `grouped_mm` run.
  projection V4 Pro (61 layers + MTP) on this machine and on one GPU of the 8x B200 node

Writes `eval_bench.json` and `eval_bench.md` under `--out` after every phase (a run cut short by a time
limit leaves what it measured); `--deadline` skips runs that would not finish before it.

    python benchmarks/eval_bench.py --out OUT --dir SCRATCH [--layers 1] [--runs grouped_mm,grouped_mm,eager]
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


COMPUTE = ("reference_build_s", "reference_forward_s", "candidate_build_s", "candidate_forward_s")


def projection(rows: list[dict], prepare_s: float, read_gbs: float, main_layers: int = 61,
               raid_gbs: float = 25.0) -> dict:
    """V4 Pro's eval from one run's blocks: every main layer like the measured main layers' mean,
    the MTP block as measured."""
    def mean(rs: list[dict]) -> dict:
        m = {k: sum(r[k] or 0 for r in rs) / len(rs) for k in ("total_s", "read_GB", *COMPUTE)}
        m["compute_s"] = sum(m[k] for k in COMPUTE)
        return m

    main = mean([r for r in rows if r["block"].startswith("layers.")])
    last = [r for r in rows if r["block"].startswith("mtp.")]
    extra = mean(last) if last else {k: 0.0 for k in main}
    here = prepare_s + main_layers * main["total_s"] + extra["total_s"]
    node = prepare_s + main_layers * max(main["read_GB"] / raid_gbs, main["compute_s"]) + max(
        extra["read_GB"] / raid_gbs, extra["compute_s"])
    return {"blocks": main_layers + bool(last), "main_block": {k: round(v, 3) for k, v in main.items()},
            "mtp_block": {k: round(v, 3) for k, v in extra.items()},
            "this_machine_min": round(here / 60, 1), "b200_one_gpu_min": round(node / 60, 1),
            "assumptions": [
                f"V4 Pro = {main_layers} main layers like the measured ones (the release's and the export's bytes "
                "of a block, 384 experts of 3072 x 7168) and the MTP block as measured",
                "this machine: each block's measured wall time (reads from this disk included), plus the preparation",
                f"B200 node: both checkpoints read at {raid_gbs:g} GB/s (the low end of its NVMe RAID; this machine: "
                f"{read_gbs:g} GB/s), overlapped with compute; compute as fast as here (a B200 is faster)"]}


def table(rows: list[dict]) -> str:
    cols = list(rows[0]) if rows else []
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def write(out: Path, res: dict) -> None:
    """eval_bench.json and eval_bench.md as they stand (after every phase)."""
    (out / "eval_bench.json").write_text(json.dumps(res, indent=2, default=str))
    md = [f"# eval_bench ({res['machine']})", "", f"build {res.get('build_s')} s; export {res.get('export_s')} s; "
          f"read rate {res.get('read_gbs')} GB/s ({res.get('read_rate_from')})", ""]
    for i, run in enumerate(res.get("evals", [])):
        md += [f"## run {i + 1}: {run['implementation']} (wall {run['wall_s']} s, preparation {run['prepare_s']} s, "
               f"{run['verdict']})", "", table(run["rows"]), ""]
    b = res.get("baseline")
    if b and "rows" in b:
        md += [f"## baseline: {b['lib']} (wall {b['wall_s']} s, preparation {b['prepare_s']} s, {b['verdict']})", "",
               table(b["rows"]), ""]
    elif b:
        md += [f"## baseline failed (exit {b['returncode']})", "", "```", b["stderr_tail"], "```", ""]
    if "compare" in res:
        md += ["## side by side", "", "```", json.dumps(res["compare"], indent=2), "```", ""]
    if "projection" in res:
        md += ["## projection", "", "```", json.dumps(res["projection"], indent=2), "```"]
    (out / "eval_bench.md").write_text("\n".join(md) + "\n")


def compare(evals: list[dict]) -> dict:
    """Per block, the compute seconds (builds + forwards) of the last run of each implementation."""
    last = {e["implementation"]: e for e in evals}
    keys = COMPUTE
    out = {}
    for impl, e in last.items():
        out[impl] = {r["block"]: round(sum(r[k] or 0 for k in keys), 3) for r in e["rows"]}
    if {"grouped_mm", "eager"} <= set(out):
        out["eager_over_grouped"] = {b: round(out["eager"][b] / out["grouped_mm"][b], 2) for b in out["grouped_mm"]
                                     if b in out["eager"] and out["grouped_mm"][b]}
    return out


BASELINE = """
import json, sys, time
from quantbook.export import fidelity
t = time.perf_counter()
r = fidelity.evaluate(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), calibration=sys.argv[4], progress=False)
print("@@" + json.dumps({"wall_s": time.perf_counter() - t, "verdict": r["verdict"], "numbers": r["numbers"],
                         "blocks": r["blocks"]}, default=str))
"""


def baseline(lib: Path, export: Path, src: Path, settings: dict, calib: Path, read_gbs: float) -> dict:
    """`evaluate` of the code in `lib` (the package's parent directory) on the same files, in a process
    of its own; its rows as this run's."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{lib}:{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-c", BASELINE, str(export), str(src), json.dumps(settings), str(calib)],
                       env=env, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("@@")), None)
    if line is None:
        return {"lib": str(lib), "returncode": p.returncode, "stderr_tail": p.stderr[-3000:]}
    r = json.loads(line[2:])
    rows = eval_rows(r, read_gbs)
    return {"lib": str(lib), "wall_s": round(r["wall_s"], 2), "prepare_s": round(r["wall_s"] - sum(x["total_s"] for x in rows), 2),
            "verdict": r["verdict"], "numbers": r["numbers"], "rows": rows}


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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (only the amax come of it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=8, help="the export writer's workers")
    ap.add_argument("--runs", default="grouped_mm,grouped_mm,eager", help="the evals, in order, by implementation")
    ap.add_argument("--deadline", type=float, default=None, help="seconds from start: skip an eval that would end later")
    ap.add_argument("--baseline-lib", default=None, help="a checkout's lib/ whose evaluate runs last, in its own "
                    "process (cold, as run 1), on the same files: the code before a change")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--raw-read", action="store_true", help="also read every shard once, front to back, first")
    a = ap.parse_args()
    start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(a.dir) if a.dir else out / "scratch"
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    res: dict = {"machine": machine(a.device), "args": vars(a), "evals": []}
    cfg = bench_config(a.like, a.layers, a.first_layer, a.experts, a.vocab)
    src, res["build_s"] = build_release(cfg, scratch / "release")
    print(f"[eval_bench] release built in {res['build_s']:.0f} s", flush=True)
    calib = write_text(scratch / "calib.jsonl", a.calib_samples, a.seq, seed=0)
    heldout = write_text(scratch / "calib-heldout.jsonl", a.samples, a.seq, seed=1)
    cal = argparse.Namespace(samples=a.calib_samples, seq=a.seq, batch=a.batch, device=a.device)
    res["calibrate"] = {k: v for k, v in run_streaming(src, calib, cal, scratch, "run").items() if k != "timeline"}
    write(out, res)

    from quantbook import amax as amax_mod
    from quantbook.export import fidelity
    from quantbook.export.layout import write_serving_layout

    amax, _ = amax_mod.load_snapshot(scratch / "run" / amax_mod.SNAPSHOT)
    t = time.perf_counter()
    export = scratch / "export"
    rep = write_serving_layout(src, amax, export, workers=a.workers, progress=False)
    res["export_s"] = round(time.perf_counter() - t, 2)
    res["export_report"] = {k: rep.get(k) for k in ("experts", "shards")}
    print(f"[eval_bench] export written in {res['export_s']:.0f} s", flush=True)
    files = shards(src) + shards(export)
    read_gbs = None
    if a.raw_read:
        res["cache_drop"] = drop_cache(files)
        res["raw_read"] = raw_read(files)
        read_gbs, res["read_rate_from"] = res["raw_read"]["gb_per_s"], "raw read of every shard"
    write(out, res)
    settings = {"device": a.device, "samples": a.samples, "seq": a.seq, "batch_size": a.batch,
                "text": str(heldout), "engine": "sglang", "gate": False}  # random weights: measured, not judged
    for impl in [r for r in a.runs.split(",") if r]:  # --runs "": the baseline alone
        if a.deadline and res["evals"] and time.perf_counter() - start + res["evals"][-1]["wall_s"] * (
                3 if impl == "eager" else 1.2) > a.deadline:
            res.setdefault("skipped", []).append(impl)
            continue
        res["cache_drop"] = drop_cache(files)
        t = time.perf_counter()
        result = fidelity.evaluate(export, src, settings, calibration=calib, progress=False, implementation=impl)
        wall = time.perf_counter() - t
        if read_gbs is None:  # the eval's first block: its reads are not overlapped
            t0 = result["blocks"][0]["timing"]
            read_gbs = round((t0["release_read_bytes"] + t0["export_read_bytes"]) /
                             (t0["release_read_s"] + t0["export_read_s"]) / 1e9, 3)
            res["read_rate_from"] = "the first eval's first block (its reads not overlapped)"
        rows = eval_rows(result, read_gbs)
        prepare = wall - sum(r["total_s"] for r in rows)
        res["read_gbs"] = read_gbs
        res["evals"].append({"implementation": impl, "wall_s": round(wall, 2), "prepare_s": round(prepare, 2),
                             "verdict": result["verdict"], "numbers": result["numbers"], "rows": rows})
        print(f"[eval_bench] eval {impl}: {wall:.1f} s", flush=True)
        res["compare"] = compare(res["evals"])
        grouped = [e for e in res["evals"] if e["implementation"] == "grouped_mm"]
        if grouped:
            res["projection"] = projection(grouped[-1]["rows"], grouped[-1]["prepare_s"], read_gbs)
        write(out, res)
    if a.baseline_lib and not (a.deadline and res["evals"] and
                               time.perf_counter() - start + 2.5 * res["evals"][0]["wall_s"] > a.deadline):
        if a.device != "cpu":  # this process's cached GPU memory back to the driver, for the baseline's process
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        res["cache_drop"] = drop_cache(files)
        res["baseline"] = baseline(Path(a.baseline_lib), export, src, settings, calib, read_gbs)
        write(out, res)
    res["total_s"] = round(time.perf_counter() - start, 1)
    write(out, res)
    print((out / "eval_bench.md").read_text(), flush=True)
    if not a.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
