"""The `modelopt` driver (the default, offline): hf_ptq's pipeline done here on modelopt's public API.

The steps of modelopt's `examples/hf_ptq/hf_ptq.py`, each one `hf_model` says must match, so
that the export is byte-identical to hf_ptq's for the same settings (tests/test_hfptq.py compares
them whenever a checkout is available): load, tokenizer, calibration data, quantization config,
`mtq.quantize` with a forward loop that keeps the KV cache off, the post-calibration hook
(`state.post_calibration`: amax snapshot, repairs, cheap state), then, with `export_generic:
true` only, the unified HF export, written into `<export_path>.partial` and renamed into place
when complete (not servable for V4: step 03 writes the layout engines serve, from the snapshot).

With `layerwise: true` modelopt calibrates one decoder layer at a time and keeps a checkpoint per
layer in `<run_dir>/layerwise/`, signed by `state.layerwise_signature`; a rerun with the same run
directory resumes after the last finished layer, and a stale or foreign checkpoint is refused.
"""

from __future__ import annotations

import random
from pathlib import Path

from . import patches, state
from .data import ExpertTokenCounter, coverage, describe_dataloader
from .driver import Driver, DriverRun, check_inputs, export_dirs, finish_export, start_export
from .hf_model import (
    build_quant_cfg, export_model, kv_cache_off_guard, load_model, load_tokenizer, make_dataloader, model_device,
)
from .settings import RAND_SEED, calib_plan, modelopt_settings


class ModeloptDriver(Driver):
    """hf_ptq's pipeline on modelopt's public API (no checkout needed)."""

    name = "modelopt"

    @classmethod
    def settings(cls, q: dict) -> dict:
        return modelopt_settings(q)

    @classmethod
    def preflight(cls, q: dict) -> dict:
        return {**check_inputs(q, cls.settings(q)), "driver_facts": {}}

    @classmethod
    def run(cls, q: dict, run_dir: Path, progress: bool = True, facts: dict | None = None) -> dict:
        import numpy as np
        import torch

        facts = facts or cls.preflight(q)
        s = dict(facts["settings"])
        with DriverRun(run_dir, cls.name, q, resources=facts.get("resources")) as run:
            run.update(patches=patches.apply(force=q["force"]))
            random.seed(RAND_SEED)
            np.random.seed(RAND_SEED)
            torch.compiler.set_stance("force_eager")
            final, work = export_dirs(q, s, run.run_dir)
            start_export(work)
            result = _calibrate_and_export(q, s, run, work, progress, export=final is not None)
            with run.phase("finalize"):
                result["export"] = {**result["export"], **finish_export(final, work, run.run_dir)}
            return run.done(**result)


def _calibrate_and_export(q: dict, s: dict, run: DriverRun, export_dir: Path, progress: bool,
                          export: bool = True) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import save_expert_token_count_table
    from modelopt.torch.quantization.config import need_calibration
    from modelopt.torch.utils.dataset_utils import create_forward_loop

    with run.phase("load"):
        model = load_model(s)
        tok, default_side, default_pad = load_tokenizer(s["pyt_ckpt_path"], s["trust_remote_code"])
    if s["batch_size"] == 0:
        if q["layerwise"]:
            s["batch_size"] = 1
        else:
            from modelopt.torch.utils.dataset_utils import get_max_batch_size

            s["batch_size"] = min(get_max_batch_size(model, max_sample_length=s["calib_seq"],
                                                     sample_memory_usage_ratio=1.1), sum(calib_plan(s)[1]))
    with run.phase("data"):
        dataloader = make_dataloader(s, tok, model_device(model))
        calib = describe_dataloader(dataloader)
    run.update(calibration=calib)
    if progress:
        print(f"[quantbook] calibration data: {calib['samples']} samples, {calib['tokens']} tokens "
              f"({calib['positions']} positions with padding), batch size {s['batch_size']}")

    lw = state.layerwise_paths(run.run_dir)
    counts_dir, keep_below = None, 0
    quant_cfg = build_quant_cfg(s, lw["ckpt"] if q["layerwise"] else None, q["layerwise_save_every"])
    if q["layerwise"]:
        sig = state.layerwise_signature(model_path=s["pyt_ckpt_path"], settings=s, quant_cfg=quant_cfg,
                                        calib=calib, save_every=q["layerwise_save_every"])
        lw_plan = state.check_layerwise_dir(run.run_dir, sig)
        counts_dir, keep_below = lw["counts"], lw_plan["start_layer"]
        run.update(layerwise={**lw_plan, "checkpoint_dir": str(lw["ckpt"])})
        if progress and lw_plan["resume"]:
            print(f"[quantbook] layerwise: resuming from layer {lw_plan['start_layer']} of {lw_plan['num_layers']} "
                  f"(signature verified)")
    counter = ExpertTokenCounter(model, persist_dir=counts_dir, keep_layers_below=keep_below)
    try:
        with run.phase("calibrate"):
            loop = create_forward_loop(dataloader=dataloader) if need_calibration(quant_cfg) else None
            with kv_cache_off_guard(model):
                model = mtq.quantize(model, quant_cfg, forward_loop=loop)
    finally:
        counter.remove()
    counts = counter.as_dict()
    if s["verbose"]:
        try:
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # modelopt names the scratch path, renamed later
                mtq.print_quant_summary(model, str(export_dir))
            save_expert_token_count_table(model, str(export_dir))
        except Exception as e:  # hf_ptq carries on too
            print(f"quant summary not written: {e}")
    hook = state.post_calibration(model, run.run_dir, q, run.ledger, calib=calib, token_counts=counts,
                                  model_path=s["pyt_ckpt_path"], quant_cfg=quant_cfg, progress=progress,
                                  phase=run.phase)
    run.update(post_calibration=hook, expert_coverage=coverage(counts))
    exp = {}
    if export:
        with run.phase("export"):
            exp = export_model(model, tok, s, export_dir, default_side, default_pad)
    return {"post_calibration": hook, "export": exp, "expert_coverage": coverage(counts),
            "batch_size": s["batch_size"]}
