"""The `streaming` driver: calibrate V4 block by block straight from the released FP8/FP4 checkpoint.

No BF16 copy on disk, no whole model in memory. Max calibration needs only each layer's inputs,
and a running maximum is exact, so a loop over layers gives the whole-model calibration's amax
bit for bit (tests/test_streaming.py, against the modelopt driver) while each weight is read once:

    once        the release's config; the calibration batches exactly as the modelopt driver makes
                them (`hf_model.load_tokenizer` / `make_dataloader`), embedded once; the quantization
                config the modelopt driver builds (`hf_model.build_quant_cfg`)
    each block  `layers.0` ... `layers.{n-1}`, then `mtp.0`: read its bytes from the shards (the next
                block's are read in a thread meanwhile), dequantize them exactly on the chosen device
                and materialize transformers' layer (`blocks`), `mtq.quantize` it inside a host model
                that puts it at `model.layers.{i}` with a forward loop that runs this process's batches
                through it with everything a V4 layer takes; record amax, token counts and the
                quantizer listing; keep the outputs as the next block's inputs; free it
    MTP         the MTP block (`mtp`) on the last layer's streams and the next tokens' embeddings;
                its amax and counts are reported under `mtp.0.*`
    resume      every `save_every` blocks, the results and the next inputs are saved in a background
                thread, atomically, signed (`block_checkpoint`); a rerun resumes at the first block
                not saved, and refuses a checkpoint made with anything else
    N processes `gpus: N`: fresh processes, one per GPU (NCCL) or on CPU (gloo); each takes batches
                r, r+N, ... at the driver's batch size; amax reduced with MAX, counts with SUM
                (`distributed`): the same bits as one process

It writes what steps 03 and 04 read: `amax.safetensors` (the modelopt driver's names and
quantizer set, plus `mtp.0.*`), `expert_token_counts.json` (with `mtp.0`), `.quant_summary.txt`,
`quantize.json` (with the per-block timeline and where a resumed run picked up) and `memory.csv`
(one phase per block). No calibrated state (`state/`) and no generic export: both need a whole
model; step 03's v4-serving layout is written from the release plus these amax.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from .. import atomic
from ..amax import amax_problem
from ..errors import ParamsError, QuantizeError
from ..machine import free_port
from . import block_checkpoint, blocks, distributed, mtp, state
from .checks import is_v4
from .data import ExpertTokenCounter, coverage, describe_dataloader
from .driver import SUMMARY, Driver, DriverRun, check_inputs
from .hf_model import build_quant_cfg, load_tokenizer, make_dataloader
from .resources import MemoryNeed
from .settings import HF_PTQ_DEFAULTS, RAND_SEED, modelopt_settings

# hf_ptq flags about loading or exporting a whole model: nothing to do for this driver (recorded)
IGNORED_FLAGS = ("export_path", "use_seq_device_map", "gpu_max_mem_percentage", "inference_tensor_parallel",
                 "inference_pipeline_parallel", "skip_generate", "verbose", "max_gpu_memory_gb", "max_cpu_memory_gb",
                 "export_fmt")
GIB = 2**30
NO_EXPORT = {"written": False, "why": "driver streaming never holds the whole model, so it writes no generic export; "
                                      "step 03 writes the v4-serving layout from the release and this step's amax"}


class StreamingDriver(Driver):
    """Block by block from the release, one block on the device at a time, resumable, N processes."""

    name = "streaming"
    loads_whole_model = False
    needs_bf16_copy = False
    writes_along = True

    @classmethod
    def settings(cls, q: dict) -> dict:
        return streaming_settings(q)

    @classmethod
    def preflight(cls, q: dict) -> dict:
        s = cls.settings(q)
        facts = check_inputs(q, s)
        cfg = facts["model_config"]
        if not is_v4(cfg):
            raise QuantizeError(f"{s['pyt_ckpt_path']}: not a DeepSeek V4 checkpoint; driver streaming calibrates "
                                "V4 only")
        from ..release.convert import plan

        release = plan(s["pyt_ckpt_path"], s["pyt_ckpt_path"])  # every header against the format; writes nothing
        n_mtp = cfg.get("num_nextn_predict_layers", 0)
        if q["mtp"] == "calibrate" and n_mtp > 1:
            raise QuantizeError(f"config.json: {n_mtp} MTP blocks; driver streaming calibrates mtp.0 only "
                                "(set quantize.mtp: skip)")
        if s["device"] != "cpu":
            import torch

            if q["gpus"] > torch.cuda.device_count():
                raise QuantizeError(f"quantize.gpus: {q['gpus']} processes but {torch.cuda.device_count()} GPUs are "
                                    "visible; use at most that many (or device cpu)")
            if q["gpus"] > 1 and s["device"] != "cuda":
                raise QuantizeError(f"hf_ptq.device {s['device']!r} with quantize.gpus {q['gpus']}: process r uses "
                                    "GPU r; set device: cuda")
        method = algorithm(build_quant_cfg(s))
        if method != "max":
            raise QuantizeError(f"qformat {s['qformat']}: calibration algorithm {method!r}; driver streaming runs max "
                                "calibration only (a running maximum is what makes a block-by-block pass exact)")
        ignored = {k: s[k] for k in IGNORED_FLAGS if s[k] != HF_PTQ_DEFAULTS[k]}
        facts["driver_facts"] = {
            "blocks": blocks.block_names(cfg, q["mtp"] == "calibrate"), "world": q["gpus"],
            "save_every": q["save_every"], "mtp": q["mtp"] if n_mtp else "none in the release",
            "release_id": release.source_id, "release_bytes": release.bytes_in, "ignored_flags": ignored,
        }
        return facts

    @classmethod
    def memory_need(cls, model_config: dict, s: dict, q: dict) -> MemoryNeed:
        return memory_need(model_config, s, q)

    @classmethod
    def run(cls, q: dict, run_dir: Path, progress: bool = True, facts: dict | None = None,
            export: dict | None = None) -> dict:
        facts = facts or cls.preflight(q)
        s, df = dict(facts["settings"]), facts["driver_facts"]
        with DriverRun(run_dir, cls.name, q, resources=facts.get("resources"), streaming=df) as run:
            run.update(patches=[], patches_note="none: the streaming driver keeps no model")
            with run.phase("prepare"):
                job = prepare(q, s, df, run.run_dir)
                job["along"] = export
                job["gate"] = gate_along(export, s)
            resume = job["plan"]
            run.update(calibration=job["calib"], batch_size=s["batch_size"],
                       resume={k: resume[k] for k in ("resume", "done", "start_block")})
            if progress:
                c = job["calib"]
                print(f"[quantbook] streaming: {len(job['blocks'])} blocks from {s['pyt_ckpt_path']}; "
                      f"{c['samples']} samples, {c['tokens']} tokens in {c['batches']} batches of {s['batch_size']}; "
                      f"{job['world']} process(es) on {job['device']}", flush=True)
                if resume["resume"]:
                    print(f"[quantbook] streaming: resuming at {resume['start_block']} ({len(resume['done'])} of "
                          f"{len(job['blocks'])} blocks saved; signature verified)", flush=True)
            with run.phase("calibrate"):
                if job["world"] == 1:
                    per_rank = [calibrate_blocks(job, 0, 1, memory=run.memory, progress=progress)]
                    _give_back_gpu_memory(job["device"])
                else:
                    per_rank = distributed.run_processes(PROCESS_TARGET, job, job["world"],
                                                         block_checkpoint.checkpoint_dir(run.run_dir))
            with run.phase("assemble"):
                out = assemble(run.run_dir, job, per_rank, q)
            if export is not None:
                with run.phase("export"):
                    out["export"] = finish_along(export, run.run_dir, per_rank[0], progress)
                if job["gate"]:
                    from ..export.fidelity_along import record

                    out["export"]["gate"] = record(per_rank[0]["gate"], run.run_dir)
            if progress:
                post = out["post_calibration"]
                print(f"[quantbook] amax snapshot: {post['snapshot']['tensors']} tensors of {post['quantizers']} "
                      f"quantizers -> {post['snapshot']['path']}", flush=True)
            return run.done(**out)


def gate_along(export: dict | None, s: dict) -> dict | None:
    """The fidelity gate's part of the job when it runs in the pass (`export.fidelity.along`, with the
    export written along): the calibration file whose held-out text it reads; else None."""
    from ..export.recover import local_calibration

    f = (export or {}).get("fidelity") or {}
    if not (f.get("enabled") and f.get("along")):
        return None
    return {"calibration": local_calibration(s["dataset"])}


PROCESS_TARGET = f"{__name__}:calibrate_blocks"  # what each process of `gpus: N` runs (`distributed.main`)


def streaming_settings(q: dict) -> dict:
    """hf_ptq-named settings for the streaming driver (the modelopt driver's, checked the same way);
    `pyt_ckpt_path` names the release."""
    if not (q.get("hf_ptq") or {}).get("pyt_ckpt_path"):
        raise ParamsError("quantize.hf_ptq.pyt_ckpt_path: required (driver streaming reads the released FP8/FP4 "
                          "checkpoint, dequant.source)")
    given = q["hf_ptq"]
    if given.get("offload_folder"):
        raise ParamsError("quantize.hf_ptq.offload_folder: driver streaming holds one block at a time and offloads "
                          "nothing; remove it")
    if given.get("attn_implementation") not in (None, "eager"):
        raise ParamsError(f"quantize.hf_ptq.attn_implementation: {given['attn_implementation']!r}; V4 runs eager "
                          "attention only (head_dim 512, attention sinks)")
    return modelopt_settings(q)


def algorithm(quant_cfg: dict) -> str:
    """The calibration method of a quantization config (`max`, `awq_lite`, ...)."""
    alg = quant_cfg.get("algorithm") or "max"
    if isinstance(alg, list):
        return "+".join(a if isinstance(a, str) else a.get("method", "?") for a in alg)
    return alg if isinstance(alg, str) else alg.get("method", "max")


def local_max(quant_cfg: dict) -> dict:
    """`quant_cfg` with max calibration kept to this process: modelopt's own cross-process sync
    all-reduces only the quantizers that hold an amax on each process, so processes that saw
    different experts would pair different tensors; the driver reduces every amax itself, by name."""
    return {**quant_cfg, "algorithm": {"method": "max", "distributed_sync": False}}


def device_of(s: dict, rank: int, world: int) -> str:
    """The device process `rank` calibrates on: the setting for one process, GPU `rank` for several."""
    if s["device"] == "cpu":
        return "cpu"
    return s["device"] if world == 1 else f"cuda:{rank}"


# ---------------------------------------------------------------------------------------------
# memory


def memory_need(model_config: dict, s: dict, q: dict) -> MemoryNeed:
    """What one process holds at its peak, from the config alone: on its device one block in BF16
    (the largest: a layer, or the MTP block) plus its batches' inputs and outputs (BF16 [B, T, hc, H]
    each) and their embeddings; in host memory two blocks as stored (this one and the next, read
    ahead) plus one copy of the outputs being saved. On CPU all of it is host memory."""
    from ..release.format import shard_groups
    from .resources import activation_bytes, model_sizes, size

    world = q.get("gpus", 1)
    unit = model_sizes(model_config)["largest"]
    stored = max(sum(t.nbytes for t in g) for g in shard_groups(model_config))
    try:
        act = activation_bytes(model_config, s)
    except ParamsError:  # a calib_size the data check refuses (with the reason): no activations counted
        act = 0
    embeds = act // max(model_config.get("hc_mult", 1), 1)
    device = (2 * act + embeds) // world
    host = 2 * stored + act // world
    what = (f"one block at a time: {size(unit)} in BF16 plus {size(device)} of activations per process; "
            f"{size(host)} of host memory (two blocks as stored: this one and the next, read ahead)")
    if s.get("device", "cuda") == "cpu":
        return MemoryNeed(what, host=host + (unit + device) * world)
    return MemoryNeed(what, unit=unit, gpu=device, host=host * world, gpus=world)


# ---------------------------------------------------------------------------------------------
# once per run (the parent process)


def prepare(q: dict, s: dict, df: dict, run_dir: Path) -> dict:
    """Batches, quantization config, signature and resume plan: the job every process runs."""
    import numpy as np
    import torch

    random.seed(RAND_SEED)  # as the modelopt driver seeds before loading and sampling
    np.random.seed(RAND_SEED)
    torch.compiler.set_stance("force_eager")
    tok, _, _ = load_tokenizer(s["pyt_ckpt_path"], s["trust_remote_code"])
    batches = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in make_dataloader(s, tok, "cpu")]
    calib = describe_dataloader(batches)
    world = q["gpus"]
    if world > len(batches):
        raise QuantizeError(f"quantize.gpus: {world} processes for {len(batches)} calibration batches; each process "
                            f"needs one: use at most {len(batches)}")
    quant_cfg = build_quant_cfg(s)
    device = device_of(s, 0, world)
    sig = block_checkpoint.signature(release_id=df["release_id"], settings=s, quant_cfg=quant_cfg, calib=calib,
                                     world=world, mtp="mtp.0" in df["blocks"], device_type=device.split(":")[0])
    plan = block_checkpoint.check_dir(run_dir, sig, df["blocks"])
    manifest = block_checkpoint.read_manifest(run_dir) or {}
    return {"release": s["pyt_ckpt_path"], "run_dir": str(run_dir), "settings": s, "batches": batches,
            "calib": calib, "quant_cfg": quant_cfg, "blocks": df["blocks"], "world": world,
            "save_every": q["save_every"], "device": device, "experts_calibration": q["experts_calibration"],
            "signature": sig, "plan": plan, "timeline": manifest.get("timeline", {}),
            "init_method": f"tcp://127.0.0.1:{free_port()}" if world > 1 else None}


# ---------------------------------------------------------------------------------------------
# each process


def _give_back_gpu_memory(device: str) -> None:
    """Return the caching allocator's GPU memory after a run in this process: a notebook kernel that
    keeps it would leave the next run's process on that GPU tens of GiB short (seen on an H200)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def calibrate_blocks(job: dict, rank: int, world: int, memory=None, progress: bool = True) -> dict:
    """One process's part of the run: every block not yet saved, in order. Returns its timeline.

    Runs in the driver's process for one process, else in each spawned process (`distributed`);
    `memory` (a MemorySampler) marks one phase per block, rank 0 of several opens its own."""
    from ..records.memory import MemorySampler

    distributed.init(rank, world, "cuda" if job["device"] != "cpu" else "cpu", job["init_method"])
    own = None
    if memory is None and rank == 0 and world > 1:
        own = memory = MemorySampler(job["run_dir"], step="02_quantize").start()
    try:
        result = _Process(job, rank, world).run(memory, progress)
    finally:
        if own is not None:
            own.stop()
    # Only after success: leaving the group waits for the other processes' collectives, which a
    # failed process never joins (on NCCL that wait hung rank 0 after an error, unreported).
    distributed.finish(world)
    return result


class _Process:
    """What one process holds for the whole run: the release, the configs, its batches (token ids,
    masks, embeddings, the layer inputs built once) and the hidden streams between blocks."""

    def __init__(self, job: dict, rank: int, world: int):
        import numpy as np
        import torch
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        from ..release.format import load_config
        from ..release.shards import Checkpoint

        random.seed(RAND_SEED)
        np.random.seed(RAND_SEED)
        torch.compiler.set_stance("force_eager")
        self.job, self.rank, self.world = job, rank, world
        self.run_dir = Path(job["run_dir"])
        self.device = torch.device(device_of(job["settings"], rank, world))
        self.release = Checkpoint(job["release"])
        self.raw_cfg = load_config(job["release"])
        self.cfg = blocks.hf_config(self.raw_cfg)
        self.table = blocks.block_table(self.raw_cfg)
        self.quant_cfg = job["quant_cfg"]
        self.sorted_loop = job["experts_calibration"] == "sorted"
        sig = block_checkpoint.signature(release_id=job["signature"]["release_id"], settings=job["settings"],
                                         quant_cfg=self.quant_cfg, calib=describe_dataloader(job["batches"]),
                                         world=world, mtp=job["signature"]["mtp"], device_type=self.device.type)
        if sig != job["signature"]:
            raise QuantizeError(f"process {rank}: its data, quantization config or versions differ from the driver's")
        mine = job["batches"][rank::world]  # the driver's batches, at its batch size, round robin
        self.rotary = DeepseekV4RotaryEmbedding(self.cfg).to(self.device)
        embed_w = self.release.tensor("embed.weight").to(self.device)
        self.ids = [b["input_ids"].to(self.device) for b in mine]
        self.masks = [b["attention_mask"].to(self.device) if "attention_mask" in b else None for b in mine]
        self.embeds = [torch.nn.functional.embedding(x, embed_w) for x in self.ids]
        del embed_w
        self.kwargs = [blocks.layer_kwargs(self.cfg, self.rotary, x, m, e)
                       for x, m, e in zip(self.ids, self.masks, self.embeds)]
        plan = job["plan"]
        self.todo = [b for b in job["blocks"] if b not in plan["done"]]
        if plan["acts_after"]:
            self.streams = block_checkpoint.load_acts(self.run_dir, plan["acts_after"], rank, self.device)
        else:
            self.streams = [blocks.first_streams(self.cfg, e) for e in self.embeds]
        if mtp.MTP_BLOCK not in self.todo:
            self.embeds = None

    def run(self, memory, progress: bool) -> dict:
        job = self.job
        saver = block_checkpoint.Saver(self.run_dir, job["signature"], job["blocks"], self.rank, self.world,
                                       job["plan"]["done"], job["timeline"])
        reader = blocks.ReadAhead(self.release, self.table, self.device.type == "cuda", self.todo)
        along = self._along(progress)
        gate = self._gate(along)
        timeline, finished = {}, []
        try:
            for k, block in enumerate(self.todo):
                nxt = self.todo[k + 1] if k + 1 < len(self.todo) else None
                with memory.phase(block) if memory is not None else nullcontext():
                    timing, entry, raw = self._block(block, nxt, reader)
                    lease = blocks.Lease(partial(reader.release, block))  # the writer may hold the buffer longer
                    if along is not None:
                        along.block_done(entry["amax"], block_layers(block), raw, lease)
                    if gate is not None:  # both models through the block while its bytes are in memory
                        timing.update(gate.block(block, raw, along))
                    del raw
                    lease.done()
                    finished.append(entry)
                    done_after = len(job["blocks"]) - len(self.todo) + k + 1
                    save = nxt is None or done_after % job["save_every"] == 0
                    if save:
                        timing["write_wait_s"] = round(saver.wait(), 4)
                    self._finish_timing(timing)
                    if save:  # the timings are final: the save writes them
                        saver.save([{**f, "meta": {**f["meta"], "timing": dict(f["meta"]["timing"])}}
                                    for f in finished], self.streams if nxt is not None else None,
                                   gate=gate.state() if gate is not None else None)
                        finished = []
                    timeline[block] = timing
                if memory is not None and block in memory.peaks:
                    timing["host_peak_bytes"] = int(memory.peaks[block].get("rss_mib", 0) * 2**20)
                if progress and self.rank == 0:
                    _print_block(block, timing)
        except BaseException:
            reader.close()
            saver.close(raise_errors=False)  # a save in flight is complete and valid: let it finish
            if along is not None:
                along.close()  # a shard being written finishes and is recorded; queued ones are dropped
            raise
        reader.close()
        saver.close()
        out = {"rank": self.rank, "device": str(self.device), "timeline": timeline}
        if gate is not None:
            out["gate"] = gate.result()
        if along is not None:
            out["along"] = {"wait_s": round(along.wait(), 3), "shards": along.timeline}
            along.close()
        return out

    def _along(self, progress: bool):
        """Process 0's writer of the export along the pass (`quantize.export_along`), told about the
        blocks an earlier run saved; None when the run writes no export."""
        if self.rank != 0 or not self.job.get("along"):
            return None
        from ..export.along import Along

        along = Along(self.job["along"], progress=False, pass_blocks=self.todo)
        done = self.job["plan"]["done"]
        if done:
            amax, _ = block_checkpoint.collect(self.run_dir)
            along.block_done(amax, [layer for b in done for layer in block_layers(b)])
        return along

    def _gate(self, along):
        """Process 0's fidelity gate along the pass (`export.fidelity_along`), carried on from the
        pass's checkpoint; None when the gate does not run in this pass."""
        if along is None or not self.job.get("gate"):
            return None
        from ..export.fidelity_along import GateAlong

        gate = GateAlong(self.job["along"], self.device, self.job["gate"]["calibration"], self.job["blocks"])
        done = self.job["plan"]["done"]
        gate.resume(block_checkpoint.load_gate(self.run_dir) if done else None, done, self.device)
        return gate

    def _block(self, block: str, nxt: str | None, reader) -> tuple[dict, dict, dict]:
        """Read (ahead), build, calibrate and reduce one block; its timing, its results to save and its
        release tensors (views of the read buffer: the caller releases it)."""
        import torch

        self._t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        raw, timing = reader.take(block)
        reader.ahead(nxt)
        keep = nxt is not None
        result = self._mtp(raw, keep) if block == mtp.MTP_BLOCK else self._layer(block, raw, keep)
        t1 = time.perf_counter()
        amax, changed = distributed.reduce_amax(result["amax"], self.device)
        counts = distributed.reduce_counts(result["counts"], self.device)
        timing.update(result["timing"], reduce_s=round(time.perf_counter() - t1, 4), amax_changed_by_reduce=changed)
        self.streams = result["outputs"]
        meta = {"block": block, "counts": counts, "summary": result["summary"], "enabled": result["enabled"],
                "problems": result["problems"], "quantizers": result["quantizers"], "timing": timing}
        return timing, {"block": block, "amax": amax, "meta": meta}, raw

    def _finish_timing(self, timing: dict) -> None:
        import torch

        from ..records.memory import host_rss

        blocks.sync(self.device)
        timing["total_s"] = round(time.perf_counter() - self._t0, 4)
        if self.device.type == "cuda":
            timing["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        timing["host_rss_bytes"] = host_rss()

    def _layer(self, block: str, raw: dict, keep: bool) -> dict:
        """Calibrate decoder layer `block` on this process's batches (`_calibrate`)."""
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

        i = int(block.split(".")[1])
        t0 = time.perf_counter()
        state_dict = blocks.block_state_dict(raw, block, self.table[block], self.raw_cfg, self.device)
        layer = blocks.build_layer(DeepseekV4DecoderLayer, self.cfg, i, state_dict, self.device)
        blocks.sync(self.device)
        dequant_s = time.perf_counter() - t0
        kwargs = self.kwargs
        result = _calibrate(self.cfg, f"model.layers.{i}", layer, self.streams, lambda j: kwargs[j], self.quant_cfg,
                            keep, self.device, rename=None, sorted_loop=self.sorted_loop)
        result["timing"]["dequant_s"] = round(dequant_s, 4)
        return result

    def _mtp(self, raw: dict, keep: bool) -> dict:
        """Calibrate the MTP block on the last layer's streams and the next tokens' embeddings."""
        n = self.raw_cfg["num_hidden_layers"]
        t0 = time.perf_counter()
        mcfg = blocks.hf_config(self.raw_cfg, layers=n + 1)  # layer n gets the MTP entry of compress_ratios
        state_dict = blocks.block_state_dict(raw, mtp.MTP_BLOCK, self.table[mtp.MTP_BLOCK], self.raw_cfg,
                                             self.device, extra=mtp.EXTRA_NAMES)
        layer = blocks.build_layer(mtp.mtp_layer_class(), mcfg, n, state_dict, self.device)
        blocks.sync(self.device)
        dequant_s = time.perf_counter() - t0
        inputs, kwargs = [], []
        for x, i, m, e in zip(self.streams, self.ids, self.masks, self.embeds):
            h, next_ids, mask2d = mtp.mtp_inputs(x, i, m)
            next_embeds = e[:, 1:]  # the embedding of token t+1 (a gather: the same bits as embedding next_ids)
            inputs.append(h)
            kwargs.append({**blocks.layer_kwargs(mcfg, self.rotary, next_ids, mask2d, next_embeds),
                           "next_embeds": next_embeds})
        result = _calibrate(mcfg, mtp.host_path(n), layer, inputs, lambda j: kwargs[j], self.quant_cfg, keep,
                            self.device, rename=lambda name: mtp.report_name(name, n), sorted_loop=self.sorted_loop)
        result["timing"]["dequant_s"] = round(dequant_s, 4)
        return result


def _print_block(block: str, t: dict) -> None:
    gpu = f", GPU peak {t['gpu_peak_bytes'] / GIB:.1f} GiB" if "gpu_peak_bytes" in t else ""
    gate = f", gate {t['eval_s']:.2f} s" if "eval_s" in t else ""
    print(f"[quantbook] {block}: read {t['read_s']:.2f} s (waited {t['read_wait_s']:.2f}), dequant+build "
          f"{t['dequant_s']:.2f} s, calibrate {t['calibrate_s']:.2f} s{gate}, total {t['total_s']:.2f} s{gpu}",
          flush=True)


def _calibrate(cfg, path: str, layer, inputs: list, kwargs_of, quant_cfg: dict, keep: bool, device, rename,
               sorted_loop: bool = True) -> dict:
    """`mtq.quantize` of one layer inside its host, the forward loop running every batch through it
    (the routed experts as `experts.SortedExperts` when `sorted_loop`: modelopt's amax, faster).

    Returns the outputs (when `keep`), amax (names as in the whole model; `rename` for MTP), token
    counts, the quantizer listing, the enabled quantizers, their amax problems and timings. An
    enabled quantizer left without an amax is an error: it is what `grouped_mm` experts (or a
    future transformers that bypasses `F.linear`) would cause silently."""
    import modelopt.torch.quantization as mtq
    import torch

    from .experts import sorted_experts

    rename = rename or (lambda name: name)
    host = blocks.make_host(cfg, path, layer)
    outputs: list = []
    t = {}

    def forward_loop(model):
        t0 = time.perf_counter()
        target = model.get_submodule(path)
        outputs.clear()
        with torch.no_grad(), sorted_experts(target, sorted_loop):
            for j, x in enumerate(inputs):
                y = target(x, **kwargs_of(j))
                if keep:
                    outputs.append(y)
        blocks.sync(device)
        t["forward_s"] = round(time.perf_counter() - t0, 4)

    counter = ExpertTokenCounter(host)
    t0 = time.perf_counter()
    try:
        mtq.quantize(host, local_max(quant_cfg), forward_loop=forward_loop)
    finally:
        counter.remove()
    blocks.sync(device)
    t1 = time.perf_counter()
    t["calibrate_s"] = round(t1 - t0, 4)
    quantizers = list(state.iter_quantizers(host))
    tensors = {rename(k): v.clone() for k, v in state.snapshot_tensors(host).items()}
    enabled = [rename(name) for name, q in quantizers if state.needs_amax(q)]
    missing = [name for name in enabled if f"{name}._amax" not in tensors]
    if missing:
        raise QuantizeError(
            f"{rename(path)}: {len(missing)} enabled quantizers got no amax after calibration (e.g. {missing[:3]}); "
            "modelopt sees the experts' inputs only through eager F.linear calls: the experts must run with "
            "_experts_implementation 'eager' (transformers' default grouped_mm bypasses them)")
    problems = {name: p for name in enabled if (p := amax_problem(tensors[f"{name}._amax"]))}
    summary = [f"{rename(name):80} {q}" for name, q in quantizers]
    counts = {rename(k): v for k, v in counter.as_dict().items()}
    blocks.release_layer(host)
    del host, layer, quantizers
    t["record_s"] = round(time.perf_counter() - t1, 4)
    return {"outputs": outputs, "amax": tensors, "counts": counts, "summary": summary, "enabled": enabled,
            "problems": problems, "quantizers": len(summary), "timing": t}


# ---------------------------------------------------------------------------------------------
# the run's outputs (the parent process)


def block_layers(block: str) -> list[tuple[str, int]]:
    """The (block kind, layer) whose amax a calibration block makes final: `layers.3` -> [("layers", 3)]."""
    kind, i = block.split(".")
    return [(kind, int(i))]


def finish_along(export: dict, run_dir: Path, rank0: dict, progress: bool) -> dict:
    """After the pass: step 03's call on the run's `amax.safetensors` adopts the shards written along
    and writes the rest, the index and configs (export.along); the export's record for quantize.json."""
    from ..amax import SNAPSHOT
    from ..export.layout import write_serving_layout

    along = rank0.get("along") or {"wait_s": 0.0, "shards": []}
    report = write_serving_layout(export["source"], run_dir / SNAPSHOT, export["dir"],
                                  cast_mxfp4_to_nvfp4=export["cast_mxfp4_to_nvfp4"], mtp_experts=export["mtp_experts"],
                                  workers=export["workers"], device="cpu", progress=progress,
                                  trusted=frozenset(s["shard"] for s in along["shards"]))
    return {"written": True, "layout": "v4-serving", "dir": str(export["dir"]), "along": True,
            "shards_written_along": len(along["shards"]), "shards_written_at_end": report["shards_written"],
            "shards": report["shards"], "bytes": report["bytes"], "along_wait_s": along["wait_s"],
            "along_shards": along["shards"],
            "why": "driver streaming wrote step 03's v4-serving export along the pass (quantize.export_along); "
                   "step 03 verifies it and runs the gate"}


def assemble(run_dir: Path, job: dict, per_rank: list[dict], q: dict) -> dict:
    """`amax.safetensors`, `expert_token_counts.json`, `.quant_summary.txt` from the saved blocks,
    and the record: the post-calibration facts, coverage, the per-block timeline, the resume."""
    t0 = time.time()
    amax, metas = block_checkpoint.collect(run_dir)
    counts = {k: v for m in metas for k, v in m["counts"].items()}
    enabled = [n for m in metas for n in m["enabled"]]
    problems = {k: v for m in metas for k, v in m["problems"].items()}
    summary = [line for m in metas for line in m["summary"]]
    quantizers = sum(m["quantizers"] for m in metas)
    summary.append(f"{len(summary)} TensorQuantizers found in model")  # modelopt's print_quant_summary format
    atomic.write_text(run_dir / SUMMARY, "\n".join(summary) + "\n")
    s = job["settings"]
    snap = state.write_snapshot(run_dir, amax, enabled, metadata={
        "run_dir": str(run_dir), "model_path": s["pyt_ckpt_path"], "source": "release", "driver": "streaming",
        "calibrated_state": False,
        "quantizers": quantizers, "amax_problems_before_repair": problems, "versions": state.versions()})
    counts_path = state.write_token_counts(run_dir, counts)
    manifest = block_checkpoint.read_manifest(run_dir)
    computed = set(per_rank[0]["timeline"])
    timeline = []
    for b in job["blocks"]:
        row = {"block": b, "this_run": b in computed, **manifest["timeline"].get(b, {}),
               **per_rank[0]["timeline"].get(b, {})}
        for r in per_rank[1:]:
            if "gpu_peak_bytes" in r["timeline"].get(b, {}):
                row[f"gpu_peak_bytes_rank{r['rank']}"] = r["timeline"][b]["gpu_peak_bytes"]
        timeline.append(row)
    plan = job["plan"]
    post = {"snapshot": snap, "token_counts": counts_path, "token_count_layers": len(counts), "quantizers": quantizers,
            "amax_problems_before_repair": problems, "amax_repairs": [], "state": None,
            "seconds": round(time.time() - t0, 3)}
    return {"post_calibration": post, "export": dict(NO_EXPORT), "expert_coverage": coverage(counts),
            "batch_size": s["batch_size"], "timeline": timeline,
            "streaming": {"world": job["world"], "device": job["device"], "devices": [r["device"] for r in per_rank],
                          "save_every": job["save_every"], "mtp": q["mtp"], "blocks": job["blocks"],
                          "experts_calibration": job["experts_calibration"],
                          "resumed_from": plan["start_block"] if plan["resume"] else None,
                          "blocks_this_run": [b for b in job["blocks"] if b in computed],
                          "checkpoint_dir": str(block_checkpoint.checkpoint_dir(run_dir))}}


__all__ = ["StreamingDriver", "calibrate_blocks", "memory_need", "streaming_settings"]
