"""Step 03 (v4-serving writer) throughput against the disk's raw write rate, in one run.

Builds a synthetic release with V4 Flash's or Pro's real tensor shapes (a few layers and experts,
a smaller vocabulary and no MTP block, so that routed experts are most of the bytes as in the real
release; random valid codes with E8M0 scales near 2^-6), an amax snapshot for it (input amax per
layer and projection, weight amax = max |w| of each expert), then measures on the same disk, for
the same output byte count:

  raw      sequential writes of the output's shard sizes (16 MiB blocks, fsync per file)
  carry    the default route: expert weights carried from the release (codes copied, scales
           re-encoded through a table, no arithmetic on the weights)
  requant  `cast_mxfp4_to_nvfp4: false`: re-quantized from the weight amax (`--method table` on
           CPU, `modelopt` batched on `--device cuda`)

A raw write runs before and after every writer run and the writer's rate is compared with their
mean (this kind of disk varies within a minute). Throughput = output bytes / wall time of the
whole export (plan, shards, index, configs; every shard fsynced). CPU-s/GiB: the process's user +
system time per GiB written, all threads. The source is read from the page cache (it was just
written), as in dequant_bench.py. modelopt's one-off import (~10 s) is paid before the timings.
`--compute` adds the time per projection of the NVFP4 math alone, one thread: modelopt's
per-projection calls (what the writer did for every projection before the table and batched
methods), the table method and the carried scales.

    .venv/bin/python benchmarks/layout_bench.py --like flash --layers 2 --experts 64 --workers 1 2
    .venv/bin/python benchmarks/layout_bench.py --like pro --layers 2 --experts 64 --routes requant --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from disk_rates import raw_write

MiB = 2**20


def build_source(root: Path, like: str, layers: int, experts: int, vocab: int) -> Path:
    from quantbook.release.format import load_config, named_config
    from quantbook.release.tiny import random_code_tensors, write_checkpoint

    cfg = load_config(named_config(like))
    cfg.update(num_hidden_layers=layers, n_routed_experts=experts, num_nextn_predict_layers=0, vocab_size=vocab,
               compress_ratios=cfg["compress_ratios"][:layers], num_hash_layers=min(cfg["num_hash_layers"], layers))
    src = root / "src"
    src.mkdir()
    return write_checkpoint(cfg, src, seed=0, tensors=random_code_tensors)


def amax_snapshot(src: Path) -> dict:
    """Input amax per layer and projection; weight amax = max |w| of the released weights (w1/w3 fused)."""
    from quantbook.release.dequant import E2M1
    from quantbook.release.format import load_config
    from quantbook.release.shards import Checkpoint

    cfg, ck = load_config(src), Checkpoint(src)
    mags = torch.tensor(E2M1[:8])

    def own(p):
        c, s = ck.tensor(f"{p}.weight").view(torch.uint8), ck.tensor(f"{p}.scale").view(torch.uint8)
        m = torch.maximum(c & 7, (c >> 4) & 7).reshape(s.shape[0], s.shape[1], 16).amax(dim=2)
        return (mags[m.long()] * torch.exp2(s.float() - 127)).max()

    out = {}
    for i in range(cfg["num_hidden_layers"]):
        for proj, k in (("w1", 1.0), ("w2", 2.0), ("w3", 1.0)):
            out[f"layers.{i}.ffn.experts.{proj}.input_quantizer._amax"] = torch.tensor(3.0 * k * (1 + i / 8))
        for j in range(cfg["n_routed_experts"]):
            p = f"layers.{i}.ffn.experts.{j}"
            out[f"{p}.w1.weight_quantizer._amax"] = out[f"{p}.w3.weight_quantizer._amax"] = \
                torch.maximum(own(f"{p}.w1"), own(f"{p}.w3"))
            out[f"{p}.w2.weight_quantizer._amax"] = own(f"{p}.w2")
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compute_only(like: str) -> dict:
    """ms per projection of the NVFP4 math alone, one thread, at the config's expert shape."""
    from quantbook.export import nvfp4
    from quantbook.release.dequant import dequant_fp4
    from quantbook.release.format import load_config, named_config

    cfg = load_config(named_config(like))
    out_f, in_f = cfg["moe_intermediate_size"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (out_f, in_f // 2), generator=g, dtype=torch.uint8)
    s = torch.randint(118, 124, (out_f, in_f // 32), generator=g, dtype=torch.uint8)
    ws2 = nvfp4.weight_scale_2(torch.tensor(0.05))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best(fn, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(min(times) * 1e3, 2)

    try:
        tables = nvfp4.requant_table(codes.numpy(), s.numpy(), ws2)[3]
        return {"modelopt per projection": best(lambda: nvfp4.quantize_nvfp4(dequant_fp4(codes, s), ws2), 2),
                "table": best(lambda: nvfp4.requant_table(codes.numpy(), s.numpy(), ws2, tables), 5),
                "carried scales": best(lambda: nvfp4.carry_scales(s.numpy(), int(s.max())), 5)}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", choices=["flash", "pro"], default="flash")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=16384, help="embed/head rows (the real vocabulary is 129,280)")
    ap.add_argument("--routes", nargs="+", choices=["carry", "requant"], default=["carry", "requant"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="shards written in parallel")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the re-quantizing route's math)")
    ap.add_argument("--method", choices=["table", "modelopt"], default=None,
                    help="re-quantizing method (default: table on CPU, modelopt batched on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads per shard (default 1 carrying, 2 else)")
    ap.add_argument("--window", type=int, default=None, help="projections per compute task (the GPU batch)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    ap.add_argument("--compute", action="store_true", help="also ms per projection of the math alone")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    from quantbook.export import layout, nvfp4

    root = Path(tempfile.mkdtemp(prefix="qb-layout-bench-", dir=a.dir))
    try:
        t = time.perf_counter()
        src = build_source(root, a.like, a.layers, a.experts, a.vocab)
        snap = amax_snapshot(src)
        print(f"synthetic source: {sum(p.stat().st_size for p in src.iterdir()) / 2**30:.2f} GiB ({a.layers} layers x "
              f"{a.experts} experts, {a.like} shapes, vocab {a.vocab}) in {time.perf_counter() - t:.0f} s", flush=True)
        nvfp4.modelopt()
        probe = layout.plan(src, root / "probe", snap)
        sizes = [j.bytes_out for j in probe.jobs]
        out_bytes = sum(sizes)
        copied = sum(e.nbytes for j in probe.jobs for k, e in j.ops if k == "copy") / out_bytes
        print(f"output {out_bytes / 2**30:.2f} GiB in {len(sizes)} shards ({1 - copied:.0%} routed experts); "
              f"{os.cpu_count()} cores; device {a.device}", flush=True)
        results = {"args": vars(a), "out_bytes": out_bytes, "cores": os.cpu_count(), "runs": {}}
        for r in range(a.repeat):
            for route in a.routes:
                for w in a.workers:
                    name = f"{route} w={w}" + (f" {a.method or nvfp4.default_method(a.device)}" if route == "requant"
                                               else "")
                    before = raw_write(root / "raw", sizes)
                    shutil.rmtree(root / "raw")
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    layout.write_serving_layout(src, snap, root / "out", cast_mxfp4_to_nvfp4=route == "carry",
                                                workers=w, device=a.device, progress=False, method=a.method,
                                                threads=a.threads, window=a.window)
                    secs, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                    shutil.rmtree(root / "out")
                    after = raw_write(root / "raw", sizes)
                    shutil.rmtree(root / "raw")
                    raw = out_bytes / ((before + after) / 2)
                    run = {"MiBps": out_bytes / secs / MiB, "raw_MiBps": raw / MiB, "ratio": out_bytes / secs / raw,
                           "cpu_s_per_GiB": cpu / (out_bytes / 2**30), "seconds": secs}
                    results["runs"].setdefault(name, []).append(run)
                    print(f"{name:>24}: {secs:7.2f} s {run['MiBps']:8.1f} MiB/s | raw "
                          f"{out_bytes / before / MiB:6.0f} / {out_bytes / after / MiB:6.0f} MiB/s before / after -> "
                          f"{run['ratio']:5.2f}x raw | "
                          f"{run['cpu_s_per_GiB']:5.2f} CPU-s/GiB", flush=True)
        print(f"\noutput {out_bytes / 2**30:.2f} GiB; median of {a.repeat} round(s), writer / mean of the raw writes "
              "around it:")
        summary = {}
        for name, runs in results["runs"].items():
            summary[name] = {k: statistics.median(x[k] for x in runs) for k in ("MiBps", "raw_MiBps", "ratio",
                                                                                 "cpu_s_per_GiB")}
            m = summary[name]
            print(f"  {name:>24}: {m['MiBps']:8.1f} MiB/s  raw {m['raw_MiBps']:8.1f} MiB/s  {m['ratio']:5.2f}x  "
                  f"{m['cpu_s_per_GiB']:5.2f} CPU-s/GiB")
        results["summary"] = summary
        if a.compute:
            results["compute_ms_per_projection"] = compute_only(a.like)
            print("compute alone, ms per projection, 1 thread:", results["compute_ms_per_projection"])
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
