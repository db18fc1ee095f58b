"""Test double of the INTERFACE of Model-Optimizer's examples/hf_ptq/hf_ptq.py (not its code).

What quantbook.hfptq relies on, and nothing more: `parse_args()` reading sys.argv with hf_ptq's
flag kinds (a required flag with an alias, str/int values, store_true switches, a
BooleanOptionalAction, choices, a post-parse `parser.error`), a `__main__` block that converts
dataset and calib_size and applies two checks before `main(args)`, a `main` that opens with the
"GPU is required" guard and calls `quantize_main(args, full_model, ...)`, which calls
`make_calib_dataloader` (returning a tuple), `post_quantize` calling `export_quantized` through the module global
with hf_ptq's seven parameters, and a sibling module imported by bare name (like example_utils).
Every step appends an event to the JSON-lines file named by $QB_DOUBLE_EVENTS.
"""

import argparse
import json
import os
import warnings

import torch
from double_utils import log

log("imported")


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--pyt_ckpt_path", "--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--qformat", default="fp8")
    p.add_argument("--kv_cache_qformat", default="fp8_cast", choices=["none", "fp8", "fp8_cast"])
    p.add_argument("--batch_size", type=int, default=0)
    p.add_argument("--calib_size", type=str, default="1024")
    p.add_argument("--calib_seq", type=int, default=512)
    p.add_argument("--dataset", type=str, default=None)
    p.add_argument("--export_path", default="exported_model")
    p.add_argument("--export_fmt", default="hf", choices=["tensorrt_llm", "hf"])
    p.add_argument("--skip_generate", action="store_true", default=False)
    p.add_argument("--low_memory_mode", action="store_true", default=False)
    p.add_argument("--cast_mxfp4_to_nvfp4", action="store_true", default=False)
    p.add_argument("--verbose", default=True, action=argparse.BooleanOptionalAction)
    p.add_argument("--specdec_offline_dataset", default=None)
    p.add_argument("--recipe", default=None)
    args = p.parse_args()
    if args.recipe is not None and args.low_memory_mode:
        p.error("--low_memory_mode does not support --recipe")
    return args


def export_quantized(args, full_model, language_model, model_type, tokenizer, default_padding_side,
                     default_pad_token):
    log("export", model=type(full_model).__name__, model_type=model_type, pad=default_pad_token)
    os.makedirs(args.export_path, exist_ok=True)
    with open(os.path.join(args.export_path, "args.json"), "w") as f:
        json.dump({k: v for k, v in vars(args).items()}, f, default=str)


def make_calib_dataloader(args, language_model, processor, tokenizer, device, model_type):
    batches = [{"input_ids": torch.arange(8).reshape(2, 4) + i} for i in range(sum(args.calib_size) // 2)]
    return batches, None


def post_quantize(args, model):
    export_quantized(args, model, model, "double", None, "left", "<pad>")


def quantize_main(args, full_model, language_model, model_type):
    loader, _ = make_calib_dataloader(args, language_model, None, None, args.device, model_type)
    log("calibrate", batches=len(loader))
    post_quantize(args, full_model)


def helper_sees_cuda():
    return torch.cuda.is_available()


def main(args):
    if not torch.cuda.is_available():
        raise OSError("GPU is required for inference.")
    log("main", helper_sees_cuda=helper_sees_cuda(), main_sees_cuda_again=torch.cuda.is_available(),
        calib_size=args.calib_size, dataset=args.dataset, verbose=args.verbose,
        skip_generate=args.skip_generate)
    model = torch.nn.Linear(2, 2)
    quantize_main(args, model, model, "double")


if __name__ == "__main__":
    args = parse_args()
    if args.export_fmt != "hf":
        warnings.warn("--export_fmt is deprecated")
    if isinstance(args.dataset, str):
        args.dataset = args.dataset.split(",")
    args.calib_size = [int(n) for n in args.calib_size.split(",")]
    if args.specdec_offline_dataset and len(args.calib_size) > 1:
        raise ValueError("--specdec_offline_dataset takes one calib_size")
    if args.cast_mxfp4_to_nvfp4 and "nvfp4" not in args.qformat:
        raise ValueError("--cast_mxfp4_to_nvfp4 needs an nvfp4 qformat")
    main(args)
