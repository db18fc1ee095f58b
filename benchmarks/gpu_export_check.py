"""GPU check of the v4-serving export: modelopt's fake-quantized model vs a model rebuilt from the export.

Needs CUDA (modelopt's NVFP4 fake-quant forward does). On the tiny V4 by default:

    python benchmarks/gpu_export_check.py --out /tmp/gpu-check
    python benchmarks/gpu_export_check.py --bf16 BF16_DIR --source RELEASE_DIR --out DIR   # a model that fits one GPU

What it does, on one calibration of the BF16 model (NVFP4 experts only, max, no KV cache):
1. logits of modelopt's fake-quantized model on a fixed batch;
2. the v4-serving export written from that model's amax twice, re-quantizing the expert weights
   (`cast_mxfp4_to_nvfp4: false`, what the fake-quantized forward used) on CPU (tables) and on
   CUDA (modelopt's calls batched): the files must be identical;
3. every expert weight dequantized from the export (quantbook.export.verify.dequant_nvfp4) against
   modelopt's fake-quantized weight of the same expert (the weight the forward used): equal;
   every exported input_scale against the calibrated input amax / (6*448): equal;
4. the same model with the expert weights replaced by the export's and the weight quantizers off
   (activation quantizers kept): logits against step 1's, equal bit for bit (max abs difference 0.0,
   top-1 agreement 1.0: what the README states, asserted as stated).
Prints a JSON result; exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch


def _tiny(out: Path) -> tuple[Path, Path]:
    from quantbook.release.convert import dequantize
    from quantbook.release.tiny import make_tiny

    src, bf16 = out / "tiny-FP8", out / "tiny-BF16"
    if not (src / "config.json").exists():
        make_tiny(src, seed=0)
    if not (bf16 / "config.json").exists():
        dequantize(src, bf16, progress=False)
    return bf16, src


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "quantbook-layout.json"}


def run_check(bf16: str | Path, source: str | Path, out: str | Path, device: str = "cuda", seed: int = 0,
              batches: int = 4, batch: int = 4, seq: int = 64) -> dict:
    """Run the checks above; returns the measurements and verdicts."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from quantbook.calibrate.state import snapshot_tensors
    from quantbook.export.layout import Checkpoint, write_serving_layout
    from quantbook.export.verify import dequant_nvfp4

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto").to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randint(2, vocab, (batch, seq), generator=gen).to(device) for _ in range(batches)]
    ids = torch.randint(2, vocab, (batch, seq), generator=gen).to(device)

    def loop(m):
        with torch.no_grad():
            for b in calib:
                m(b, use_cache=False)

    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_EXPERTS_ONLY_CFG), loop)
    with torch.no_grad():
        fq = model(ids, use_cache=False).logits.float()

    snap = snapshot_tensors(model)
    exports = {}
    for dev in ("cpu", device):
        d = out / f"export-{dev.replace(':', '')}"
        write_serving_layout(source, snap, d, cast_mxfp4_to_nvfp4=False, device=dev, progress=False)
        exports[dev] = d
    identical = _files(exports["cpu"]) == _files(exports[device])

    ck = Checkpoint(exports[device])
    worst_w, worst_in = 0.0, 0.0
    n_experts = 0
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        for j in range(ex.num_experts):
            p = f"layers.{i}.ffn.experts.{j}"
            w = {k: dequant_nvfp4(ck.tensor(f"{p}.{k}.weight"), ck.tensor(f"{p}.{k}.weight_scale"),
                                  ck.tensor(f"{p}.{k}.weight_scale_2")) for k in ("w1", "w2", "w3")}
            gate_up = torch.cat([w["w1"], w["w3"]]).to(ex.gate_up_proj.dtype).to(device)
            down = w["w2"].to(ex.down_proj.dtype).to(device)
            with torch.no_grad():
                fq_gate_up = ex.gate_up_proj_weight_quantizers[j](ex.gate_up_proj[j])
                fq_down = ex.down_proj_weight_quantizers[j](ex.down_proj[j])
            worst_w = max(worst_w, float((fq_gate_up.float() - gate_up.float()).abs().max()),
                          float((fq_down.float() - down.float()).abs().max()))
            for k, q in (("w1", ex.gate_up_proj_input_quantizer), ("w3", ex.gate_up_proj_input_quantizer),
                         ("w2", ex.down_proj_input_quantizer)):
                want = q.amax.detach().float().cpu().reshape(()) / (6.0 * 448.0)
                got = ck.tensor(f"{p}.{k}.input_scale")
                worst_in = max(worst_in, float((got - want).abs()))
            with torch.no_grad():
                ex.gate_up_proj[j].copy_(gate_up)
                ex.down_proj[j].copy_(down)
            n_experts += 1
        for q in list(ex.gate_up_proj_weight_quantizers) + list(ex.down_proj_weight_quantizers):
            q.disable()
    with torch.no_grad():
        rebuilt = model(ids, use_cache=False).logits.float()
    diff = float((rebuilt - fq).abs().max())
    scale = float(fq.abs().max())
    top1 = float((rebuilt.argmax(-1) == fq.argmax(-1)).float().mean())
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else device,
        "experts": n_experts, "cpu_cuda_export_identical": identical,
        "weights_identical": worst_w == 0.0, "max_weight_diff": worst_w,
        "input_scales_identical": worst_in == 0.0, "max_input_scale_diff": worst_in,
        "max_abs_diff": diff, "max_abs_logit": scale, "top1_agreement": top1,
        "tokens": ids.numel(),
    }
    # what the README claims, asserted as claimed: the same logits bit for bit (the rebuilt model's weights are
    # the fake-quantized ones exactly, its activations go through the same quantizers), every top-1 equal
    result["ok"] = bool(identical and result["weights_identical"] and result["input_scales_identical"]
                        and top1 == 1.0 and diff == 0.0)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", default=None, help="BF16 checkpoint (step 01); default: build the tiny V4 under --out")
    ap.add_argument("--source", default=None, help="the release it was dequantized from")
    ap.add_argument("--out", default="gpu-export-check")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: modelopt's NVFP4 fake-quant forward needs a GPU", file=sys.stderr)
        return 2
    out = Path(a.out)
    bf16, src = (Path(a.bf16), Path(a.source)) if a.bf16 else _tiny(out)
    result = run_check(bf16, src, out / "exports", device=a.device)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
