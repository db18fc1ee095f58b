"""The fidelity gate's numbers for the choices an export makes, on the README's tiny chain.

From a finished run of `quantbook run params/tiny.yaml` (its release, amax and held-out text), writes
the other exports next to it and evaluates each (`export.fidelity.evaluate`, CPU):

  carry / re-quantize   `cast_mxfp4_to_nvfp4: true` (the released codes kept) or `false` (every weight
                        re-quantized from the calibrated amax, modelopt's bytes)
  W4A4 / W4A16          activations NVFP4 (B200: FlashInfer/CUTLASS) or BF16 (H100/H200: Marlin)
  MTP experts           released MXFP4 read by SGLang / by vLLM; NVFP4 read by vLLM / by SGLang
  input scales          one per layer and projection (the engines' max) vs each expert's own: whether
                        they differ at all in these exports

    python benchmarks/fidelity_table.py [--run-dir runs/tiny] [--params params/tiny.yaml] [--out OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def row(name: str, r: dict) -> str:
    n = r["numbers"]
    m = n.get("mtp") or {}
    routed = max(b["routed_rel_err"] for b in r["blocks"] if b["block"].startswith("layers."))
    return (f"| {name} | {n['ppl_release']:.4f} | {n['ppl_export']:.4f} | {n['ppl_ratio']:.4f} | {n['kld']['mean']:.5f} | "
            f"{n['kld']['p99']:.4f} | {n['same_top']:.2%} | {n['dp_rms']:.4f} | {routed:.4f} | "
            f"{m.get('top1_agreement', float('nan')):.2%} | {r['verdict']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--run-dir", default=None, help="the chain's run directory (default runs/<params name>)")
    ap.add_argument("--out", default="work/fidelity-table")
    ap.add_argument("--samples", type=int, default=None)
    a = ap.parse_args()

    from quantbook import amax as amax_mod
    from quantbook.export import fidelity
    from quantbook.export.layout import write_serving_layout
    from quantbook.export.recover import calibration_file
    from quantbook.params import load_params
    from quantbook.release.shards import Checkpoint

    p = load_params(a.params)
    e = p["export"]
    run_dir = Path(a.run_dir or Path("runs") / p["name"])
    src, carry = e["source"], Path(e["dir"])
    calib = calibration_file(run_dir)
    amax, _ = amax_mod.load_snapshot(run_dir / amax_mod.SNAPSHOT)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    exports = {"carry": carry}
    mtp_amax = any(k.startswith("mtp.0.") and "input_quantizer" in k for k in amax)  # the streaming driver's
    variants = [("requant", {"cast_mxfp4_to_nvfp4": False})] + ([("carry-mtp-nvfp4", {"mtp_experts": "nvfp4"})]
                                                                 if mtp_amax else [])
    for name, kw in variants:
        write_serving_layout(src, amax, out / name, progress=False, **kw)
        exports[name] = out / name
    base = dict(e.get("fidelity") or {})
    if a.samples:
        base["samples"] = a.samples
    runs = [("carry, W4A4 (the default)", "carry", {}),
            ("carry, W4A16", "carry", {"mode": "w4a16"}),
            ("re-quantized, W4A4", "requant", {}),
            ("re-quantized, W4A16", "requant", {"mode": "w4a16"}),
            ("carry, MTP released, read by vLLM", "carry", {"engine": "vllm"}),
            ("carry, MTP NVFP4, read by vLLM", "carry-mtp-nvfp4", {"engine": "vllm"}),
            ("carry, MTP NVFP4, read by SGLang", "carry-mtp-nvfp4", {"engine": "sglang"})]
    runs = [r for r in runs if r[1] in exports]  # MTP NVFP4 needs MTP's calibrated amax (driver streaming)
    lines = ["| export, engine reading | PPL release | PPL export | ratio | KLD mean | KLD p99 | same top | "
             "Δp RMS | worst routed err | MTP agreement | gate |", "|" + "---|" * 11]
    results = {}
    for name, which, over in runs:
        t = time.perf_counter()
        r = fidelity.evaluate(exports[which], src, {**base, **over}, calibration=calib, progress=False)
        results[name] = {"numbers": r["numbers"], "verdict": r["verdict"], "seconds": round(time.perf_counter() - t, 1)}
        lines.append(row(name, r))
        print(lines[-1], flush=True)
    # one input scale per layer vs per expert: are the experts' scales of a layer and projection equal?
    ck = Checkpoint(carry)
    groups: dict = {}
    for n in ck.weight_map:
        if n.endswith(".input_scale"):
            layer, proj = n.split(".ffn.experts.")[0], n.rsplit(".", 2)[-2]
            groups.setdefault((layer, "w2" if proj == "w2" else "w13"), []).append(n)
    differ = [k for k, names in groups.items() if len({bytes(ck.raw(x)) for x in names}) > 1]
    note = (f"input_scale per layer and projection: {len(groups)} groups, {len(differ)} with experts' scales that "
            "differ (modelopt calibrates fused experts with one input quantizer per layer and projection, so "
            "the engines' max over experts and each expert's own scale are the same number here)")
    lines += ["", note]
    (out / "fidelity_table.json").write_text(json.dumps({"results": results, "scale_groups_differing": differ},
                                                        indent=2, default=str))
    (out / "fidelity_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
