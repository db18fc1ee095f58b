"""Step 02's streaming driver at real V4 Pro layer dimensions, against the disk and the modelopt driver.

Builds a synthetic release in the released format (`release.tiny.write_checkpoint` with random
valid codes) with V4 Pro's real dimensions: every layer 384 experts of 3072 x 7168 (w1, w2, w3),
128 heads of 512, hidden 7168, the real layer kinds (by default layers 3 and 4 of Pro: one HCA and
one CSA layer, both score-routed) plus the MTP block. Calibration data: `--samples` lines of random
printable ASCII, tokenized by the release's byte-level tokenizer into `--seq` tokens each (random
text is fine for timing: only the routing pattern depends on it). Then, in one run:

  raw read     every shard read front to back in 64 MiB reads, after dropping the page cache
               (`/proc/sys/vm/drop_caches` when writable, else posix_fadvise DONTNEED per file: the
               method used is reported); the disk's sequential read rate on this source
  streaming    `quantbook.calibrate.quantize` with driver streaming, gpus 1, page cache dropped first:
               per block read / dequant / calibrate / write seconds, peak GPU and host memory; once per
               `--experts-calibration` method (sorted, modelopt), their amax compared bit for bit; with
               `--plain-forward` each block's plain BF16 forward (grouped_mm experts, no quantizer) on the
               same inputs, timed just before its calibration: the ratio calibrate / plain forward
  along        (`--along`) the first method's run writes the v4-serving export along the pass from its
               read buffer, and with `--gate S,T,B` runs the fidelity gate in the pass on S x T held-out
               tokens: its wall time against max(raw read, raw write) of the release and export;
               with `--verify`, `quantbook verify` of that export against the release, page cache
               dropped, taking the numbers the pass computed on the bytes it wrote, then `--reread`
  gpus 2       the same with two processes when two GPUs are visible, amax compared with gpus 1
  side by side (`--side-experts N`, 0 to skip) a second release with N experts per layer (the
               BF16 copy of a Pro layer is 51 GiB: a few do not fit a 64 GiB disk): step 01's BF16
               copy, the modelopt driver on it (whole model on the GPU) and the streaming driver on
               the release, timings and amax compared
  projection   V4 Pro (61 layers + MTP) on one GPU and on the 8x B200 node, assumptions listed

Prints a table; writes `streaming_bench.json` and `streaming_bench.md` under `--out`.

    python benchmarks/streaming_bench.py --out OUT [--layers 2] [--side-experts 32]      # GPU machine
    python benchmarks/streaming_bench.py --out OUT --device cpu --experts 4 --vocab 4096 \\
        --samples 8 --seq 64 --batch 4 --side-experts 4                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import string
import time
from pathlib import Path

GIB = 2**30
CHUNK = 64 << 20


# ---------------------------------------------------------------------------------------------
# inputs


def bench_config(like: str, layers: int, first: int, experts: int | None, vocab: int | None) -> dict:
    """The release config with `layers` main layers taken from the real pattern at `first`, plus MTP."""
    from quantbook.release.format import load_config, named_config

    c = load_config(named_config(like))
    ratios = c["compress_ratios"]
    mtp = c.get("num_nextn_predict_layers", 0)
    c["compress_ratios"] = ratios[first: first + layers] + ratios[len(ratios) - mtp:]
    c["num_hash_layers"] = max(0, min(layers, c.get("num_hash_layers", 0) - first))
    c["num_hidden_layers"] = layers
    if experts:
        if experts < c["num_experts_per_tok"]:
            raise SystemExit(f"--experts/--side-experts {experts}: at least num_experts_per_tok "
                             f"({c['num_experts_per_tok']}) are needed")
        c["n_routed_experts"] = experts
    if vocab:
        c["vocab_size"] = vocab
    return c


def build_release(cfg: dict, dst: Path) -> tuple[Path, float]:
    from quantbook.release.tiny import random_code_tensors, write_checkpoint

    dst.mkdir(parents=True)
    t = time.perf_counter()
    write_checkpoint(cfg, dst, seed=0, tensors=random_code_tensors)
    return dst, time.perf_counter() - t


def write_text(path: Path, samples: int, seq: int, seed: int = 0) -> Path:
    """Random printable ASCII, one JSONL sample a line, long enough for `seq` byte tokens."""
    r = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,;:!?-'"
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(json.dumps({"text": "".join(r.choice(alphabet) for _ in range(2 * seq))}) + "\n")
    return path


def quantize_section(driver: str, src: Path, calib: Path, a, export: Path, gpus: int = 1,
                     experts_calibration: str = "sorted") -> dict:
    hf = {"pyt_ckpt_path": str(src), "export_path": str(export), "qformat": "nvfp4_experts_only",
          "kv_cache_qformat": "fp8_cast", "dataset": str(calib), "calib_size": a.samples, "calib_seq": a.seq,
          "batch_size": a.batch, "device": a.device, "skip_generate": True}
    q = {"driver": driver, "hf_ptq": hf}
    if driver == "streaming":
        q.update(gpus=gpus, experts_calibration=experts_calibration)
    return q


# ---------------------------------------------------------------------------------------------
# disk


def drop_cache(paths: list[Path]) -> str:
    """Evict these files from the page cache; the method that was used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED) per file"


def raw_read(paths: list[Path]) -> dict:
    """Read every file front to back in CHUNK reads (the driver's access pattern): bytes, seconds."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total, t = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    secs = time.perf_counter() - t
    return {"bytes": total, "seconds": round(secs, 3), "gb_per_s": round(total / secs / 1e9, 3)}


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("model-*.safetensors"))


# ---------------------------------------------------------------------------------------------
# runs


def run_streaming(src: Path, calib: Path, a, out: Path, name: str, gpus: int = 1,
                  experts_calibration: str = "sorted", along: Path | None = None) -> dict:
    from quantbook.calibrate import quantize

    export = None
    if along is not None:
        gate = {"enabled": False}
        if a.gate:  # the gate in the pass, on held-out text beside the calibration file (random: measured, not gated)
            samples, seq, batch = (int(x) for x in a.gate.split(","))
            write_text(calib.with_name(f"{calib.stem}-heldout.jsonl"), samples, seq, seed=1)
            gate = {"samples": samples, "seq": seq, "batch_size": batch, "gate": False, "device": a.device}
        export = {"layout": "v4-serving", "source": str(src), "dir": str(along), "workers": min(16, os.cpu_count() or 1),
                  "fidelity": gate, "verify_sample": a.verify_sample}
    t = time.perf_counter()
    rec = quantize(quantize_section("streaming", src, calib, a, out / "unused", gpus, experts_calibration),
                   out / name, progress=True, export=export)
    wall = time.perf_counter() - t
    r = {"wall_s": round(wall, 2), "timings": rec["timings"], "timeline": rec["timeline"],
         "run_dir": str(out / name), "world": gpus, "experts_calibration": experts_calibration}
    if along is not None:
        r["along"] = {k: v for k, v in rec["export"].items() if k != "why"}
        r["export_bytes"] = sum(p.stat().st_size for p in shards(along))
        r["gate_s"] = round(sum(t.get("eval_s", 0.0) for t in rec["timeline"]), 2)
    return r


def time_verify(export: Path, src: Path, a, res_along: dict) -> dict:
    """`quantbook verify` of the export the pass wrote, against the release, page cache dropped before
    each: taking the pass's numbers (its default) and reading every checked tensor again (--reread),
    with the machine's cores; the verdicts and numbers must agree. Also what computing those numbers
    cost the pass (`res_along`: its export record): tensors, compute threads' seconds."""
    from quantbook.export.verify import passthrough_bytes, verify
    from quantbook.release.format import load_config, named_config

    out, numbers = {}, {}
    workers = min(16, os.cpu_count() or 1)
    for how, reread in (("with the pass's record", False), ("reread", True)):
        drop_cache(shards(export) + shards(src))
        t = time.perf_counter()
        r = verify(export, source=src, sample=a.verify_sample, workers=workers, progress=False, reread=reread)
        out[how] = {"seconds": round(time.perf_counter() - t, 2), "verdict": r["verdict"],
                    "tensors": r["numbers"].get("tensors"), "from_record": r["numbers"].get("from_record"),
                    "checks": {c["id"]: c["status"] for c in r["checks"]}}
        numbers[how] = r["numbers_per_tensor"]
    out["same_numbers"] = numbers["with the pass's record"] == numbers["reread"]
    out["workers"] = workers
    # with the record, verify reads the pass-through tensors of both checkpoints (check 5's byte
    # comparison) and headers: its rate on those bytes against the disk's, and V4 Pro's at that ratio
    through = passthrough_bytes(load_config(src), "released")
    drop_cache(shards(export) + shards(src))
    raw = raw_read(shards(export))
    rate = 2 * through / out["with the pass's record"]["seconds"] / 1e9
    pro_through = passthrough_bytes(load_config(named_config("pro")), "released")
    out["record_mode"] = {"passthrough_GB_both": round(2 * through / 1e9, 3), "GB_per_s": round(rate, 3),
                          "raw_read_GB_per_s": raw["gb_per_s"], "x_raw": round(rate / raw["gb_per_s"], 3),
                          "v4_pro_passthrough_GB_both": round(2 * pro_through / 1e9, 1),
                          "v4_pro_s_at_disk_1.71_GB_per_s": round(2 * pro_through / 1e9 / (1.71 * min(1.0, rate / raw["gb_per_s"])), 1)}
    shards_along = res_along.get("along_shards", [])
    out["in_pass"] = {"tensors": sum(s.get("checked", 0) for s in shards_along),
                      "thread_s": round(sum(s.get("check_s", 0.0) for s in shards_along), 2),
                      "shard_write_s": round(sum(s["write_s"] for s in shards_along), 2)}
    return out


def raw_write(d: Path, nbytes: int = 4 << 30) -> dict:
    """Write `nbytes` to a new file in CHUNK writes, fsync, delete: the disk's sequential write rate."""
    buf = os.urandom(CHUNK)
    path = d / "raw-write.bin"
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // CHUNK):
            f.write(buf)
        os.fsync(f.fileno())
    secs = time.perf_counter() - t
    path.unlink()
    return {"bytes": nbytes, "seconds": round(secs, 3), "gb_per_s": round(nbytes / secs / 1e9, 3)}


def time_plain_forwards() -> None:
    """From now on, each block's calibration in this process is preceded by the block's plain BF16
    forward on the same inputs (experts as transformers' grouped_mm, no quantizer), timed into its
    timeline as `plain_forward_s`: the yardstick of the calibration's compute."""
    import torch

    from quantbook.calibrate import blocks, streaming_driver

    calibrate = streaming_driver._calibrate

    def timed(cfg, path, layer, inputs, kwargs_of, quant_cfg, keep, device, rename, **kw):
        experts = layer.mlp.experts
        own = experts.config
        experts.config = copy.copy(own)
        experts.config._experts_implementation = "grouped_mm"
        blocks.sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for j, x in enumerate(inputs):
                layer(x, **kwargs_of(j))
        blocks.sync(device)
        plain = time.perf_counter() - t0
        experts.config = own
        result = calibrate(cfg, path, layer, inputs, kwargs_of, quant_cfg, keep, device, rename, **kw)
        result["timing"]["plain_forward_s"] = round(plain, 4)
        return result

    streaming_driver._calibrate = timed


def fault_check(src: Path, calib: Path, a, out: Path, limit_s: float = 100.0) -> dict:
    """gpus 2 where process 0's save of layers.1 fails (tests/streaming_faults.py) while process 1
    waits in the next collective: the run must stop with process 0's error within `limit_s`."""
    import sys

    from quantbook.calibrate import streaming_driver
    from quantbook.errors import QuantizeError

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the processes get this path too
    target, streaming_driver.PROCESS_TARGET = (streaming_driver.PROCESS_TARGET,
                                               "streaming_faults:calibrate_blocks_rank0_fails")
    t = time.perf_counter()
    try:
        run_streaming(src, calib, a, out, "streaming-fault", gpus=2)
        error = None
    except QuantizeError as e:
        error = str(e)
    finally:
        streaming_driver.PROCESS_TARGET = target
    secs = time.perf_counter() - t
    ok = bool(error) and "process 0 of 2 failed: OSError: injected" in error and secs < limit_s
    return {"seconds": round(secs, 1), "error_first_line": (error or "").splitlines()[0][:200], "ok": ok}


def run_modelopt(bf16: Path, calib: Path, a, out: Path) -> dict:
    from quantbook.calibrate import quantize

    t = time.perf_counter()
    rec = quantize(quantize_section("modelopt", bf16, calib, a, out / "modelopt-export"), out / "modelopt",
                   progress=True)
    return {"wall_s": round(time.perf_counter() - t, 2), "timings": rec["timings"], "run_dir": str(out / "modelopt")}


def compare_amax(a_dir: str, b_dir: str, main_only: bool = True) -> dict:
    """How many amax of `b` equal `a`'s bit for bit (MTP aside when `main_only`), the largest relative gap."""
    from quantbook import amax

    a, _ = amax.load_snapshot(Path(a_dir) / amax.SNAPSHOT)
    b, _ = amax.load_snapshot(Path(b_dir) / amax.SNAPSHOT)
    if main_only:
        a = {k: v for k, v in a.items() if not k.startswith("mtp.")}
        b = {k: v for k, v in b.items() if not k.startswith("mtp.")}
    common = sorted(set(a) & set(b))
    diff = [k for k in common if not a[k].equal(b[k])]
    rel = max((float(((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-30)).max()) for k in diff), default=0.0)
    ca = json.loads((Path(a_dir) / amax.TOKEN_COUNTS).read_text())
    cb = json.loads((Path(b_dir) / amax.TOKEN_COUNTS).read_text())
    keys = [k for k in ca if k in cb]
    return {"compared": len(common), "only_in_a": len(set(a) - set(b)), "only_in_b": len(set(b) - set(a)),
            "different": len(diff), "max_rel_diff": rel, "examples": diff[:5],
            "token_counts_equal": all(ca[k] == cb[k] for k in keys)}


# ---------------------------------------------------------------------------------------------
# report


def block_rows(stream: dict, disk_gbs: float | None) -> list[dict]:
    rows = []
    for t in stream["timeline"]:
        read_gb = t.get("read_bytes", 0) / 1e9
        disk_s = read_gb / disk_gbs if disk_gbs else None
        rows.append({
            "block": t["block"], "read_GB": round(read_gb, 2), "read_s": t.get("read_s"),
            "read_GB_s": round(read_gb / t["read_s"], 2) if t.get("read_s") else None,
            "read_wait_s": t.get("read_wait_s"), "dequant_s": t.get("dequant_s"), "calibrate_s": t.get("calibrate_s"),
            "forward_s": t.get("forward_s"), "record_s": t.get("record_s"), "reduce_s": t.get("reduce_s"),
            "plain_forward_s": t.get("plain_forward_s"),
            "x_plain": round(t["calibrate_s"] / t["plain_forward_s"], 2) if t.get("plain_forward_s") else None,
            "write_s": t.get("write_s"),
            "write_wait_s": t.get("write_wait_s"), "total_s": t.get("total_s"),
            "gpu_peak_GiB": round(t["gpu_peak_bytes"] / GIB, 2) if "gpu_peak_bytes" in t else None,
            "host_peak_GiB": round(t.get("host_peak_bytes", t.get("host_rss_bytes", 0)) / GIB, 2),
            "disk_read_s": round(disk_s, 2) if disk_s else None,
            "x_disk_read": round(t["total_s"] / disk_s, 2) if disk_s else None,
        })
    return rows


def projection(rows: list[dict], prepare_s: float, disk_gbs: float, pro_blocks: int = 62,
               raid_gbs: float = 25.0, gpus: int = 8) -> dict:
    """V4 Pro from the measured blocks: steady-state blocks (read overlapped) are all but the first."""
    steady = rows[1:] or rows
    mean = {k: sum(r[k] or 0 for r in steady) / len(steady) for k in
            ("total_s", "read_s", "read_GB", "dequant_s", "calibrate_s", "forward_s", "record_s", "reduce_s",
             "write_wait_s")}
    compute = mean["dequant_s"] + mean["calibrate_s"] + mean["record_s"] + mean["reduce_s"] + mean["write_wait_s"]
    here = prepare_s + rows[0]["total_s"] + (pro_blocks - 1) * mean["total_s"]
    b200_read = mean["read_GB"] / raid_gbs
    b200_one = prepare_s + pro_blocks * max(b200_read, compute)
    per_proc = compute - mean["forward_s"] * (1 - 1 / gpus)
    b200_eight = prepare_s + pro_blocks * max(b200_read, per_proc)
    return {
        "blocks": pro_blocks, "steady_block": {k: round(v, 3) for k, v in mean.items()},
        "this_machine_one_gpu_min": round(here / 60, 1),
        "b200_one_gpu_min": round(b200_one / 60, 1),
        "b200_eight_gpus_min": round(b200_eight / 60, 1),
        "assumptions": [
            f"V4 Pro = {pro_blocks} blocks (61 layers + mtp.0), every one like the measured steady-state blocks "
            "(384 experts of 3072 x 7168; hash, HCA and CSA layers differ in attention only)",
            "this machine: the first block as measured (its read is not overlapped), the others at the steady "
            "state mean, plus the one-time preparation",
            f"B200 node: reads at {raid_gbs:g} GB/s (the low end of its NVMe RAID, 25-50 GB/s, shared docs "
            f"anchors.md; this machine's disk: {disk_gbs:g} GB/s), overlapped with compute as measured here",
            "B200 compute taken as fast as the H200's (conservative: a B200 is faster), so a block costs "
            "max(read, dequant + calibrate + record + reduce + write wait) as measured",
            f"{gpus} GPUs: every process reads and dequantizes the whole block (the page cache serves the same "
            "bytes; host memory 2 blocks per process) and inserts its quantizers; only the forward is split "
            f"({gpus} batches of 16 for 128 samples: one each)",
        ],
    }


def table(rows: list[dict]) -> str:
    cols = ["block", "read_GB", "read_s", "read_GB_s", "read_wait_s", "dequant_s", "calibrate_s", "forward_s",
            "plain_forward_s", "x_plain", "record_s", "write_s", "write_wait_s", "total_s", "x_disk_read", "gpu_peak_GiB", "host_peak_GiB"]
    fmt = lambda v: "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine(device: str) -> dict:
    import psutil
    import torch

    m = {"host": platform.node(), "cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
         "torch": torch.__version__}
    if device != "cpu":
        m["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return m


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results (JSON, table) and, unless --dir, the scratch files")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default OUT/scratch)")
    ap.add_argument("--like", default="pro")
    ap.add_argument("--layers", type=int, default=2, help="main layers (plus MTP); 13.8 GB each at Pro size")
    ap.add_argument("--first-layer", type=int, default=3, help="where in the real layer pattern they start")
    ap.add_argument("--experts", type=int, default=None, help="experts per layer (default: the config's, 384)")
    ap.add_argument("--vocab", type=int, default=None, help="smaller vocabulary (CPU smoke runs only)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--side-experts", type=int, default=32, help="experts of the side-by-side model (0: skip)")
    ap.add_argument("--skip-pro", action="store_true", help="only the side-by-side comparison")
    ap.add_argument("--max-gpus", type=int, default=2, help="1: skip the two-process run")
    ap.add_argument("--fault-check", action="store_true",
                    help="after gpus 2, one failing process must stop the run with its error (needs --layers 2+)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--experts-calibration", default="sorted,modelopt",
                    help="comma list: one streaming run per method (the first is the reference run)")
    ap.add_argument("--plain-forward", action="store_true", help="time each block's plain BF16 forward too")
    ap.add_argument("--along", action="store_true",
                    help="the first method's run writes the v4-serving export along the pass (from its read buffer)")
    ap.add_argument("--gate", default=None, metavar="SAMPLES,SEQ,BATCH",
                    help="with --along: the fidelity gate in the pass on that many held-out tokens (e.g. 64,512,8)")
    ap.add_argument("--verify", action="store_true",
                    help="with --along: time quantbook verify of the export, with the pass's numbers and --reread")
    ap.add_argument("--verify-sample", type=int, default=None,
                    help="export.verify_sample: expert tensors the pass and verify check (default all)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(a.dir) if a.dir else out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    calib = write_text(scratch / "calib.jsonl", a.samples, a.seq)
    res = {"machine": machine(a.device), "args": vars(a), "text": "random printable ASCII, byte tokens"}
    import torch

    try:
        if a.side_experts:  # the modelopt driver needs the BF16 copy: run it on a model that fits
            from quantbook.release.convert import dequantize

            cfg = bench_config(a.like, a.layers, a.first_layer, a.side_experts, a.vocab)
            src, build_s = build_release(cfg, scratch / "side-release")
            t = time.perf_counter()
            dequantize(src, scratch / "side-bf16", workers=min(16, os.cpu_count() or 1), device=a.device,
                       progress=False)
            dequant_s = time.perf_counter() - t
            side = {"experts": a.side_experts, "release_GB": round(sum(p.stat().st_size for p in shards(src)) / 1e9, 2),
                    "bf16_GB": round(sum(p.stat().st_size for p in shards(scratch / "side-bf16")) / 1e9, 2),
                    "build_s": round(build_s, 1), "step01_dequant_s": round(dequant_s, 1)}
            side["streaming"] = run_streaming(src, calib, a, out, "side-streaming")
            side["modelopt"] = run_modelopt(scratch / "side-bf16", calib, a, out)
            side["amax_streaming_vs_modelopt"] = compare_amax(side["modelopt"]["run_dir"],
                                                              side["streaming"]["run_dir"])
            res["side_by_side"] = side
            shutil.rmtree(scratch / "side-bf16")
            shutil.rmtree(out / "modelopt-export", ignore_errors=True)
            shutil.rmtree(src)
            brief = {**side, "streaming": {k: v for k, v in side["streaming"].items() if k != "timeline"}}
            print("side by side:", json.dumps(brief, indent=1))

        if not a.skip_pro:
            cfg = bench_config(a.like, a.layers, a.first_layer, a.experts, a.vocab)
            need = 14.5e9 * (a.layers + 1) + 4e9 + 2 * a.samples * a.seq * cfg["hidden_size"] * cfg["hc_mult"] * 2
            free = shutil.disk_usage(scratch).free
            if cfg["n_routed_experts"] >= 384 and need > free:
                raise SystemExit(f"{scratch}: {free / 1e9:.0f} GB free, this run needs ~{need / 1e9:.0f} GB; "
                                 "use --layers 1 or another --dir")
            src, build_s = build_release(cfg, scratch / "release")
            files = shards(src)
            res["release"] = {"layers": a.layers, "experts": cfg["n_routed_experts"],
                              "GB": round(sum(p.stat().st_size for p in files) / 1e9, 2), "build_s": round(build_s, 1)}
            res["cache_drop"] = drop_cache(files)
            res["raw_read"] = raw_read(files)
            print(f"raw read: {res['raw_read']} ({res['cache_drop']})")
            if a.plain_forward:
                time_plain_forwards()
            methods = a.experts_calibration.split(",")
            for m in methods:
                drop_cache(files)
                key = "streaming" if m == methods[0] else f"streaming_{m}"
                along = scratch / "export" if a.along and m == methods[0] else None
                res[key] = run_streaming(src, calib, a, out, key, experts_calibration=m, along=along)
                if along is not None:
                    res["raw_write"] = raw_write(scratch)
                    read_s = res["raw_read"]["seconds"]  # the whole release, page cache dropped
                    write_s = res[key]["export_bytes"] / 1e9 / res["raw_write"]["gb_per_s"]
                    calib_s = res[key]["timings"].get("calibrate", 0) + res[key]["timings"].get("export", 0)
                    gate_s = res[key]["gate_s"]
                    res["along_vs_disk"] = {"raw_read_s": round(read_s, 2), "raw_write_s": round(write_s, 2),
                                            "calibrate_and_export_s": round(calib_s, 2), "of_which_gate_s": gate_s,
                                            "x_max_read_write": round(calib_s / max(read_s, write_s), 2),
                                            "x_read_plus_write": round(calib_s / (read_s + write_s), 2),
                                            "x_max_read_write_without_gate": round((calib_s - gate_s) /
                                                                                   max(read_s, write_s), 2)}
                    print("along vs disk:", json.dumps(res["along_vs_disk"]))
                    if a.verify:
                        res["verify"] = time_verify(along, src, a, res[key]["along"])
                        print("verify:", json.dumps(res["verify"]))
                    shutil.rmtree(along)
                if m != methods[0]:
                    res[f"blocks_{m}"] = block_rows(res[key], res["raw_read"]["gb_per_s"])
                    res[f"amax_{m}_vs_{methods[0]}"] = compare_amax(res["streaming"]["run_dir"], res[key]["run_dir"],
                                                                    main_only=False)
                    print(f"{m} vs {methods[0]}:", json.dumps(res[f"amax_{m}_vs_{methods[0]}"]))
                    print(f"\n{m}:\n" + table(res[f"blocks_{m}"]))
                (out / "streaming_bench.json").write_text(json.dumps(res, indent=1, default=str))
            rows = block_rows(res["streaming"], res["raw_read"]["gb_per_s"])
            res["blocks"] = rows
            res["projection"] = projection(rows, res["streaming"]["timings"].get("prepare", 0.0),
                                           res["raw_read"]["gb_per_s"])
            if a.device != "cpu" and a.max_gpus >= 2 and torch.cuda.device_count() >= 2:
                drop_cache(files)
                res["streaming_gpus2"] = run_streaming(src, calib, a, out, "streaming-gpus2", gpus=2)
                res["gpus2_vs_gpus1"] = compare_amax(res["streaming"]["run_dir"],
                                                     res["streaming_gpus2"]["run_dir"], main_only=False)
                res["blocks_gpus2"] = block_rows(res["streaming_gpus2"], res["raw_read"]["gb_per_s"])
                print("gpus 2 vs gpus 1:", json.dumps(res["gpus2_vs_gpus1"]))
                print("\n" + table(res["blocks_gpus2"]))
                if a.fault_check:
                    res["fault_check"] = fault_check(src, calib, a, out)
                    print("one failing process:", json.dumps(res["fault_check"]))
            print("\n" + table(rows))
            print(json.dumps(res["projection"], indent=1))
    finally:
        (out / "streaming_bench.json").write_text(json.dumps(res, indent=1, default=str))
        md = [f"# streaming bench {time.strftime('%Y-%m-%d %H:%M')}", "", "```", json.dumps(res["machine"]), "```"]
        if "blocks" in res:
            md += ["", f"raw read {res['raw_read']} ({res['cache_drop']})", "", table(res["blocks"])]
            for k in [k for k in res if k.startswith("blocks_") and k != "blocks_gpus2"]:
                md += ["", k, "", table(res[k])]
        (out / "streaming_bench.md").write_text("\n".join(md) + "\n")
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
