"""GPU check of step 02 (the modelopt driver) on the tiny V4: what the CPU tests cannot show.

    python benchmarks/quantize_gpu_check.py --out /tmp/q-gpu            # tiny model built in --out
    python benchmarks/quantize_gpu_check.py --bf16 BF16_DIR --out DIR    # a model that fits the GPUs

Runs, each in its own run directory under --out (calibration text written here, no network):
1. `calibrate.quantize` with device cuda (use_seq_device_map when more than one GPU): status done,
   every amax in the snapshot finite, the cheap state restored onto a fresh GPU model exports the
   same bytes as the run's export (restore path of step 03);
2. the same with `layerwise: true`: export bytes equal to run 1 (KV cache off, max calibration);
3. the same settings on CPU: which export files differ from the GPU run (GPU matmuls round
   differently, so activation amax and input_scale may; weights and weight scales should not);
4. the CUDA unit test of the patches (`tests/test_patches.py::test_cuda_calibration_leaves_amax_on_cpu`)
   is separate: `pytest -q tests/test_patches.py -k cuda`.
Prints a JSON result; exit status 0 when checks 1 and 2 hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _tiny(out: Path) -> Path:
    from quantbook.release.convert import dequantize
    from quantbook.release.tiny import make_tiny

    src, bf16 = out / "tiny-FP8", out / "tiny-BF16"
    if not (src / "config.json").exists():
        make_tiny(src, seed=0)
    if not (bf16 / "config.json").exists():
        dequantize(src, bf16, progress=False)
    return bf16


def _text(path: Path, n: int = 64) -> Path:
    words = ("river stone bridge lamp winter harbour orchard clock signal ledger garden engine north "
             "market letter silver window thunder meadow copper").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 30)) + "." for i in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return path


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _differ(a: Path, b: Path) -> list[str]:
    fa, fb = _files(a), _files(b)
    return sorted(set(fa) ^ set(fb)) + [k for k in fa if k in fb and fa[k] != fb[k]]


def _tensor_diffs(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sorted(k for k in ta if k not in tb or not ta[k].equal(tb[k]))


def main() -> int:
    import torch

    from quantbook import amax, calibrate
    from quantbook.calibrate import hf_model, settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", default=None)
    ap.add_argument("--qformat", default="nvfp4_experts_only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = Path(args.bf16) if args.bf16 else _tiny(out)
    data = _text(out / "calib.jsonl")
    base = {"pyt_ckpt_path": str(bf16), "qformat": args.qformat, "kv_cache_qformat": "fp8_cast",
            "dataset": str(data), "calib_size": 32, "calib_seq": 128, "batch_size": 8, "device": "cuda",
            "skip_generate": True, "use_seq_device_map": torch.cuda.device_count() > 1}
    result = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "versions": __import__("quantbook.calibrate.state", fromlist=["versions"]).versions()}

    def run(name, **over):
        hf = {**base, **over.pop("hf", {}), "export_path": str(out / f"export-{name}")}
        t0 = time.time()
        rec = calibrate.quantize({"hf_ptq": hf, "export_generic": True, **over}, out / f"run-{name}")
        snap, _ = amax.load_snapshot(out / f"run-{name}" / amax.SNAPSHOT)
        result[name] = {"status": rec["status"], "seconds": round(time.time() - t0, 1), "timings": rec["timings"],
                        "amax_tensors": len(snap),
                        "amax_all_finite": all(bool(torch.isfinite(t).all()) for t in snap.values()),
                        "amax_repairs": len(rec["post_calibration"]["amax_repairs"])}
        return out / f"export-{name}"

    gpu = run("gpu")
    model, tok, manifest = hf_model.restore(out / "run-gpu")
    s = settings.modelopt_settings(settings.normalize(manifest["params"]))
    restored = out / "export-gpu-restored"
    import modelopt.torch.quantization as mtq

    restored.mkdir(exist_ok=True)
    mtq.print_quant_summary(model, str(restored))
    hf_model.export_model(model, tok, s, restored)
    result["restore_differs"] = _differ(gpu, restored)
    del model
    torch.cuda.empty_cache()

    lw = run("gpu-layerwise", layerwise=True)
    result["layerwise_differs"] = _differ(gpu, lw)
    cpu = run("cpu", hf={"device": "cpu", "use_seq_device_map": False})
    result["cpu_vs_gpu_files_differ"] = _differ(gpu, cpu)
    diffs = _tensor_diffs(gpu, cpu)
    result["cpu_vs_gpu_tensors_differ"] = {"count": len(diffs), "kinds": sorted({k.rsplit(".", 1)[-1] for k in diffs}),
                                           "first": diffs[:10]}
    ok = (result["gpu"]["status"] == "done" and result["gpu"]["amax_all_finite"] and not result["restore_differs"]
          and not result["layerwise_differs"])
    result["ok"] = ok
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
