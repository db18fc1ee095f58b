"""`quantbook verify`'s numeric check (check 7) against the disk's read rate, old and new side by side.

Builds a synthetic release with V4 Pro's (or Flash's) real expert shapes (3072 x 7168 for Pro; a
few layers and experts, a small vocabulary, no MTP block; random valid codes with E8M0 scales near
2^-6, as layout_bench.py), writes its v4-serving export (the default route: expert weights carried
from the release), then measures in one run, the page cache dropped before each measurement
(`/proc/sys/vm/drop_caches` when writable, else posix_fadvise DONTNEED per file: the method used
is reported):

  raw    every shard of the export read front to back in 64 MiB reads: the disk's sequential rate
  new    `verify.check_numbers` against the release (every expert tensor), per `--workers`
  old    the check as it was before issue 18: a thread per worker, torch at one thread, each tensor
         the release's BF16 (`release_expert_bf16`) and `numeric.nvfp4_error_reference` (whole-tensor
         torch ops); `--old-sample N` tensors only (it is ~20x slower), per `--workers`

Rate = bytes of the export's expert tensors checked (codes + both scales) per second of wall time,
the numbers as `raw` counts them; `x raw` = that rate over the raw read rate of the same run (the
issue's target: >= 0.8 with the machine's cores). The check also reads the release's codes and
scales (about as many bytes again): `read GB/s` counts both. A raw read runs before and after each
round; the mean of all is the raw rate. Every tensor's numbers from new and old are compared
(`identical`: equal as Python floats, NaN equal to NaN).

    .venv/bin/python benchmarks/verify_bench.py --experts 8 --workers 1 2            # this 2-core VM
    python3 benchmarks/verify_bench.py --experts 64 --workers 1 2 4 8 16 --dir /scratch   # 16 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from layout_bench import amax_snapshot, build_source
from streaming_bench import drop_cache, raw_read


def expert_bytes(ck, names: list[str]) -> int:
    return sum(ck.entry(f"{n}.{k}").nbytes for n in names for k in ("weight", "weight_scale", "weight_scale_2"))


def release_bytes(src, names: list[str]) -> int:
    return sum(src.entry(f"{n}.{k}").nbytes for n in names for k in ("weight", "scale"))


def old_check(ck, src, names: list[str], workers: int) -> dict:
    """check_numbers' per-tensor work as it was before issue 18 (same pool, same thread setting)."""
    from quantbook.export import numeric
    from quantbook.export.layout import release_expert_bf16

    def one(name):
        r = release_expert_bf16(src, name)
        return name, numeric.nvfp4_error_reference(ck.tensor(f"{name}.weight"), ck.tensor(f"{name}.weight_scale"),
                                                   ck.tensor(f"{name}.weight_scale_2"), r)

    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return dict(pool.map(one, names))
    finally:
        torch.set_num_threads(threads)


def same(a: dict, b: dict) -> bool:
    def eq(x, y):
        return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))

    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", choices=["flash", "pro"], default="pro")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384, help="embed/head rows (the real vocabulary is 129,280)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--old-sample", type=int, default=None,
                    help="tensors the old check runs on (default: all; it is ~20x slower)")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    from quantbook.export import layout, verify
    from quantbook.release.format import load_config
    from quantbook.release.shards import Checkpoint

    root = Path(tempfile.mkdtemp(prefix="qb-verify-bench-", dir=a.dir))
    try:
        t = time.perf_counter()
        src = build_source(root, a.like, a.layers, a.experts, a.vocab)
        out = root / "export"
        layout.write_serving_layout(src, amax_snapshot(src), out, progress=False)
        ck, srck, cfg = Checkpoint(out), Checkpoint(src), load_config(out)
        names = verify.converted_prefixes(cfg, verify.mtp_form(ck, cfg))
        nbytes, rbytes = expert_bytes(ck, names), release_bytes(srck, names)
        files = sorted(out.glob("*.safetensors"))
        src_files = sorted(src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in files)
        step = len(names) / a.old_sample if a.old_sample and a.old_sample < len(names) else 1
        old_names = [names[int(k * step)] for k in range(round(len(names) / step))]
        old_bytes = expert_bytes(ck, old_names)
        print(f"export {total / 2**30:.2f} GiB ({len(names)} expert tensors, {nbytes / 2**30:.2f} GiB of them; "
              f"{a.layers} layers x {a.experts} experts, {a.like} shapes) built in {time.perf_counter() - t:.0f} s; "
              f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
              f"{torch.get_num_threads()} torch threads", flush=True)
        results = {"args": vars(a), "cores": os.cpu_count(), "export_bytes": total, "expert_bytes": nbytes,
                   "release_expert_bytes": rbytes, "tensors": len(names), "old_tensors": len(old_names),
                   "raw": [], "runs": {}}

        def raw() -> float:
            results["drop"] = drop_cache(files)
            r = raw_read(files)
            results["raw"].append(r["bytes"] / r["seconds"])
            print(f"{'raw read':>12}: {r['seconds']:7.2f} s {r['bytes'] / r['seconds'] / 1e9:7.3f} GB/s "
                  f"({results['drop']})", flush=True)
            return r["bytes"] / r["seconds"]

        reference_rows = {}
        for rnd in range(a.repeat):
            raw()
            for w in a.workers:
                drop_cache(files + src_files)
                t0 = time.perf_counter()
                check, summary = verify.check_numbers(ck, cfg, None, srck, names=names, workers=w, progress=False)
                secs = time.perf_counter() - t0
                rows = summary["per_tensor"]
                assert check.status == "pass" and not any("error" in r for r in rows.values()), check.detail
                run = {"seconds": secs, "GBps": nbytes / secs / 1e9, "read_GBps": (nbytes + rbytes) / secs / 1e9}
                results["runs"].setdefault(f"new w={w}", []).append(run)
                print(f"{'new w=' + str(w):>12}: {secs:7.2f} s {run['GBps']:7.3f} GB/s of the export "
                      f"({run['read_GBps']:.3f} GB/s read, both checkpoints)", flush=True)
                if a.skip_old:
                    continue
                drop_cache(files + src_files)
                t0 = time.perf_counter()
                old = old_check(ck, srck, old_names, w)
                secs = time.perf_counter() - t0
                ok = all(same(old[n], rows[n]) for n in old_names)
                ob = old_bytes + release_bytes(srck, old_names)
                run = {"seconds": secs, "GBps": old_bytes / secs / 1e9, "read_GBps": ob / secs / 1e9, "identical": ok}
                results["runs"].setdefault(f"old w={w}", []).append(run)
                reference_rows.update(old)
                print(f"{'old w=' + str(w):>12}: {secs:7.2f} s {run['GBps']:7.3f} GB/s of the export "
                      f"({len(old_names)} tensors); numbers identical to new: {ok}", flush=True)
            raw()
        rate = statistics.mean(results["raw"])
        print(f"\nraw read {rate / 1e9:.3f} GB/s (mean of {len(results['raw'])}); median of {a.repeat} round(s):")
        summary = {}
        for name, runs in results["runs"].items():
            m = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "GBps", "read_GBps")}
            m["x_raw"] = m["GBps"] * 1e9 / rate
            if "identical" in runs[0]:
                m["identical"] = all(r["identical"] for r in runs)
            summary[name] = m
            print(f"  {name:>10}: {m['GBps']:7.3f} GB/s  {m['x_raw']:5.2f}x raw  ({m['read_GBps']:.3f} GB/s read)"
                  + (f"  identical {m['identical']}" if "identical" in m else ""))
        for w in a.workers:
            if f"old w={w}" in summary:
                print(f"  w={w}: new / old = {summary[f'new w={w}']['GBps'] / summary[f'old w={w}']['GBps']:.1f}x")
        results["raw_GBps"] = rate / 1e9
        results["summary"] = summary
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
