"""Step 01 throughput against the disk's raw write bandwidth and a naive serial converter.

Builds a synthetic release with V4 Flash's real tensor shapes (a few layers, fewer experts so it
fits the disk), then in one run measures, side by side on the same disk and byte count:
  raw    sequential writes of the output's byte count (16 MiB blocks, fsync per file)
  ours   quantbook dequant (validation, streaming, hashing, atomic renames, manifest)
  naive  load a shard with safetensors, dequantize tensor by tensor in torch, save_file
and prints throughputs (output bytes / s) and the ratios. Page cache: the source is read from
cache in every variant (it was just written); writes are fsynced in every variant.

    .venv/bin/python benchmarks/dequant_bench.py --layers 3 --experts 32 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from disk_rates import raw_write


def build_source(root: Path, layers: int, experts: int) -> Path:
    from quantbook.release.format import FLASH_CONFIG, load_config
    from quantbook.release.tiny import random_code_tensors, write_checkpoint

    cfg = load_config(FLASH_CONFIG)
    cfg.update(num_hidden_layers=layers, n_routed_experts=experts,
               compress_ratios=cfg["compress_ratios"][:layers] + cfg["compress_ratios"][-1:])
    src = root / "src"
    src.mkdir()
    return write_checkpoint(cfg, src, seed=0, tensors=random_code_tensors)


def naive(src: Path, dst: Path) -> float:
    """The straightforward converter: whole shard in memory, tensor by tensor, save_file."""
    from safetensors.torch import load_file, save_file

    from quantbook.release.dequant import E2M1

    table = torch.tensor(E2M1)
    dst.mkdir()
    t = time.perf_counter()
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors = load_file(shard)
        out = {}
        for name, w in tensors.items():
            if name.endswith(".scale"):
                continue
            scale_name = name[: -len(".weight")] + ".scale"
            if scale_name not in tensors:
                out[name] = w
                continue
            s = tensors[scale_name].float()
            if w.dtype == torch.int8:  # packed FP4
                b = w.view(torch.uint8).long()
                v = torch.stack([table[b & 15], table[b >> 4]], dim=-1).flatten(1)
                out[name] = (v * s.repeat_interleave(32, 1)).bfloat16()
            else:
                s = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
                out[name] = (w.float() * s).bfloat16()
        save_file(out, dst / shard.name)
        with open(dst / shard.name, "rb") as f:
            os.fsync(f.fileno())
    return time.perf_counter() - t


def ours(src: Path, dst: Path, workers: int, device: str) -> float:
    from quantbook.release.convert import dequantize

    t = time.perf_counter()
    dequantize(src, dst, workers=workers, device=device, progress=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="qb-bench-", dir=a.dir))
    try:
        t = time.perf_counter()
        src = build_source(root, a.layers, a.experts)
        print(f"synthetic source: {sum(p.stat().st_size for p in src.iterdir()) / 2**30:.2f} GiB "
              f"({a.layers} layers x {a.experts} experts, Flash shapes) built in {time.perf_counter() - t:.0f} s")
        from quantbook.release.convert import plan

        out_bytes = plan(src, root / "probe").bytes_out
        sizes = [s.bytes_out for s in plan(src, root / "probe").shards]
        results = {"out_bytes": out_bytes, "cores": os.cpu_count(), "device": a.device}

        def measure(name, fn, target):
            secs = fn()
            results[name] = out_bytes / secs
            print(f"{name:>14}: {secs:7.2f} s  {out_bytes / secs / 2**20:8.1f} MiB/s")
            shutil.rmtree(target, ignore_errors=True)

        measure("raw write", lambda: raw_write(root / "raw", sizes), root / "raw")
        for w in a.workers:
            measure(f"ours w={w}", lambda: ours(src, root / f"ours{w}", w, a.device), root / f"ours{w}")
        if not a.skip_naive:
            measure("naive serial", lambda: naive(src, root / "naive"), root / "naive")
        measure("raw write (2)", lambda: raw_write(root / "raw2", sizes), root / "raw2")
        raw = (results["raw write"] + results["raw write (2)"]) / 2
        print(f"\noutput {out_bytes / 2**30:.2f} GiB on {os.cpu_count()} cores; ratios (same run, same disk):")
        for w in a.workers:
            print(f"  ours w={w} / raw write: {results[f'ours w={w}'] / raw:.2f}x")
            if not a.skip_naive:
                print(f"  ours w={w} / naive:     {results[f'ours w={w}'] / results['naive serial']:.2f}x")
        if len(a.workers) > 1:
            print(f"  ours w={a.workers[-1]} / ours w={a.workers[0]}: "
                  f"{results[f'ours w={a.workers[-1]}'] / results[f'ours w={a.workers[0]}']:.2f}x")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
