"""The streaming driver on the tiny V4 (CPU): the modelopt driver's amax and token counts bit for
bit, the same serving export, transformers' own weights, resume after SIGKILL, two processes over
gloo, the refusals, and the whole chain through `quantbook run` passing `quantbook verify`."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import requires
from layout_helpers import files, gate_numbers

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)

MTP = "mtp."


def streaming_q(tiny_chain, **over) -> dict:
    """The chain's `quantize:` section (params/tiny.yaml's settings) on the streaming driver: the
    same data, batches and quantization config; `pyt_ckpt_path` names the release; no generic export."""
    q = copy.deepcopy(tiny_chain["q"])
    hf = {**q["hf_ptq"], "pyt_ckpt_path": str(tiny_chain["src"]), **over.pop("hf_ptq", {})}
    return {**q, "driver": "streaming", "export_generic": False, **over, "hf_ptq": hf}


@pytest.fixture(scope="module")
def streamed(tiny_chain, tmp_path_factory):
    """One uninterrupted streaming run with the chain's settings, one process."""
    from quantbook.calibrate import quantize

    run_dir = tmp_path_factory.mktemp("streaming") / "run"
    rec = quantize(streaming_q(tiny_chain), run_dir, progress=False)
    return {"dir": run_dir, "record": rec}


def snapshot(run_dir: Path) -> tuple[dict, dict, dict]:
    from quantbook import amax

    tensors, meta = amax.load_snapshot(run_dir / amax.SNAPSHOT)
    return tensors, meta, json.loads((run_dir / amax.TOKEN_COUNTS).read_text())


def assert_same_calibration(a: Path, b: Path) -> None:
    """Two streaming runs: the same amax (names, dtypes, bits), token counts and enabled quantizers."""
    ta, ma, ca = snapshot(a)
    tb, mb, cb = snapshot(b)
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if not ta[k].equal(tb[k])] == []
    assert ca == cb and ma["enabled_quantizers"] == mb["enabled_quantizers"]


def test_equal_to_the_modelopt_driver_bit_for_bit(streamed, tiny_chain):
    """Every quantizer's amax (names and values) and every token count equal the whole-model
    calibration's; the MTP block adds its own, under mtp.0."""
    rec = streamed["record"]
    assert rec["status"] == "done" and rec["driver"] == "streaming" and rec["export"]["written"] is False
    got, meta, counts = snapshot(streamed["dir"])
    want, want_meta, want_counts = snapshot(tiny_chain["run_dir"])
    main = {k: v for k, v in got.items() if not k.startswith(MTP)}
    assert sorted(main) == sorted(want) and len(want) == 72
    assert [k for k in want if not (main[k].dtype == want[k].dtype and main[k].equal(want[k]))] == []
    assert {k: v for k, v in counts.items() if not k.startswith(MTP)} == want_counts
    assert [n for n in meta["enabled_quantizers"] if not n.startswith(MTP)] == want_meta["enabled_quantizers"]

    # MTP: its experts' input amax and a weight amax per expert, finite and positive; its router's
    # counts add up to every MTP position (T - 1 per sample) times top-k
    mtp_amax = {k: v for k, v in got.items() if k.startswith(MTP)}
    cfg = json.loads((tiny_chain["src"] / "config.json").read_text())
    assert "mtp.0.mlp.experts.gate_up_proj_input_quantizer._amax" in mtp_amax
    assert "mtp.0.mlp.experts.down_proj_input_quantizer._amax" in mtp_amax
    assert len(mtp_amax) == 2 + 2 * cfg["n_routed_experts"]
    assert all(float(v) > 0 and v.isfinite().all() for v in mtp_amax.values())
    c = rec["calibration"]
    assert sum(counts["mtp.0"]) == c["samples"] * (c["positions"] // c["samples"] - 1) * cfg["num_experts_per_tok"]
    assert sum(counts["layers.0"]) == c["positions"] * cfg["num_experts_per_tok"]


def test_serving_export_from_streaming_amax_is_byte_identical(streamed, tiny_chain, tmp_path):
    """Step 03's v4-serving writer takes the streaming amax unchanged and writes the same bytes as
    from the modelopt driver's (its manifest aside, which names where its amax came from)."""
    from quantbook import amax
    from quantbook.export.layout import MANIFEST, write_serving_layout

    a = write_serving_layout(tiny_chain["src"], streamed["dir"] / amax.SNAPSHOT, tmp_path / "streaming",
                             cast_mxfp4_to_nvfp4=False, progress=False)
    b = write_serving_layout(tiny_chain["src"], tiny_chain["run_dir"] / amax.SNAPSHOT, tmp_path / "modelopt",
                             cast_mxfp4_to_nvfp4=False, progress=False)
    assert a["amax_sha256"] == b["amax_sha256"] and a["filled"] == b["filled"] == {"weight": 0, "input": 0}
    assert files(tmp_path / "streaming", exclude=(MANIFEST,)) == files(tmp_path / "modelopt", exclude=(MANIFEST,))
    assert sum(n for why, n in a["ignored_amax"].items() if why.startswith("MTP expert")) == 2 + 2 * 8


def test_mtp_experts_nvfp4_from_the_streaming_amax(streamed, tiny_chain, tmp_path):
    """`export.mtp_experts: nvfp4` takes the MTP experts' input scales from the amax this driver
    calibrates (no whole-model calibration reaches them): every one calibrated, none filled, and the
    export passes the verifier."""
    from quantbook import amax
    from quantbook.export.layout import write_serving_layout
    from quantbook.export.verify import verify

    r = write_serving_layout(tiny_chain["src"], streamed["dir"] / amax.SNAPSHOT, tmp_path / "nvfp4",
                             mtp_experts="nvfp4", progress=False)
    assert r["calibrated"]["mtp_input"] == 8 * 3 and r["filled"] == {"weight": 0, "input": 0}
    v = verify(tmp_path / "nvfp4", source=tiny_chain["src"], progress=False)
    assert v["verdict"] == "pass", v["summary"]


def test_blocks_equal_transformers_own_load(tiny_chain):
    """Each block built from the release (read, exact dequant, transformers' names and dtypes, fused
    experts) equals, tensor for tensor, bits and dtype, transformers' load of step 01's BF16 copy; the
    MTP block equals the BF16 copy's mtp.0.* tensors."""
    import torch
    from transformers import DeepseekV4ForCausalLM
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

    from quantbook.calibrate import blocks, mtp
    from quantbook.release.format import expert_name, load_config
    from quantbook.release.shards import Checkpoint

    raw_cfg = load_config(tiny_chain["src"])
    cfg = blocks.hf_config(raw_cfg)
    table = blocks.block_table(raw_cfg)
    release = Checkpoint(tiny_chain["src"])
    ref = DeepseekV4ForCausalLM.from_pretrained(str(tiny_chain["bf16"]), dtype="auto")
    for i in range(raw_cfg["num_hidden_layers"]):
        raw, _ = release.read_block(list(table[f"layers.{i}"]))
        layer = blocks.build_layer(DeepseekV4DecoderLayer, cfg, i,
                                   blocks.block_state_dict(raw, f"layers.{i}", table[f"layers.{i}"], raw_cfg, "cpu"),
                                   "cpu")
        got, want = layer.state_dict(), ref.model.layers[i].state_dict()
        assert sorted(got) == sorted(want)
        bad = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
        assert bad == [], (i, bad)

    raw, _ = release.read_block(list(table["mtp.0"]))
    state = blocks.block_state_dict(raw, "mtp.0", table["mtp.0"], raw_cfg, "cpu", extra=mtp.EXTRA_NAMES)
    n = raw_cfg["num_hidden_layers"]
    layer = blocks.build_layer(mtp.mtp_layer_class(), blocks.hf_config(raw_cfg, layers=n + 1), n, state, "cpu")
    bf16 = Checkpoint(tiny_chain["bf16"])  # step 01's output keeps mtp.0.* (dequantized, native names)
    native = {name: bf16.tensor(name) for name in bf16.weight_map if name.startswith("mtp.0.")}
    assert sorted(native) == sorted(k for k in table["mtp.0"] if not k.endswith(".scale"))
    got = layer.state_dict()
    inter = raw_cfg["moe_intermediate_size"]
    for name, t in native.items():
        x = expert_name(name)
        if x is not None:
            fused = got["mlp.experts.down_proj" if x.proj == "w2" else "mlp.experts.gate_up_proj"][x.expert]
            mine = {"w1": fused[:inter], "w3": fused[inter:], "w2": fused}[x.proj]
        else:
            mine = got[blocks.hf_name(name, mtp.EXTRA_NAMES)]
        assert torch.equal(mine.to(t.dtype), t), name  # norms are kept in fp32 (exact upcast), as transformers does


# ---------------------------------------------------------------------------------------------
# resume


def _params(path: Path, q: dict, export: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({"name": "streaming", "quantize": q, **({"export": export} if export else {})}))
    return path


class _Cli:
    """`quantbook quantize` in a subprocess, its output collected line by line."""

    def __init__(self, params: Path, runs: Path, run_id: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "quantbook.cli", "quantize", str(params), "--run-id", run_id,
               "--runs-dir", str(runs)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def kill_when(self, ready, timeout: float = 300.0) -> None:
        t0 = time.time()
        try:
            while time.time() - t0 < timeout:
                if ready():
                    self.proc.send_signal(signal.SIGKILL)
                    self.proc.wait()
                    return
                if self.proc.poll() is not None:
                    raise AssertionError(f"quantize ended (rc {self.proc.returncode}) before the kill:\n"
                                         + "".join(self.lines)[-3000:])
                time.sleep(0.01)
            raise AssertionError("the moment to kill never came:\n" + "".join(self.lines)[-3000:])
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def test_sigkill_inside_and_between_blocks_then_resume_identically(streamed, tiny_chain, tmp_path):
    """A real process killed with SIGKILL inside a block (its calibration under way, the previous
    block's save possibly in flight), then again right after a block's checkpoint was committed;
    each rerun resumes at the first block the checkpoint does not hold, and the end result is the
    uninterrupted run's, bit for bit; the export written along the pass too (step 03's bytes)."""
    from quantbook.calibrate import block_checkpoint, quantize
    from quantbook.export.layout import MANIFEST

    export = {**yaml.safe_load(tiny_chain["params"].read_text())["export"], "dir": str(tmp_path / "export")}
    params = _params(tmp_path / "s.yaml", streaming_q(tiny_chain), export)
    runs, run_id = tmp_path / "runs", "killed"
    run_dir = runs / run_id
    blocks = streamed["record"]["streaming"]["blocks"]

    first = _Cli(params, runs, run_id)
    first.kill_when(lambda: any(line.startswith("[quantbook] layers.1:") for line in first.lines))
    done1 = block_checkpoint.read_manifest(run_dir)["done"]
    assert blocks[:1] <= done1 and len(done1) < len(blocks) - 1, done1
    assert json.loads((run_dir / "quantize.json").read_text())["status"] == "running"

    second = _Cli(params, runs, run_id)
    second.kill_when(lambda: len((block_checkpoint.read_manifest(run_dir) or {}).get("done", [])) > len(done1))
    assert any(f"resuming at {blocks[len(done1)]}" in line for line in second.lines), second.lines[-20:]
    done2 = block_checkpoint.read_manifest(run_dir)["done"]
    assert done2[: len(done1)] == done1 and len(done1) < len(done2) < len(blocks), (done1, done2)

    rec = quantize(yaml.safe_load(params.read_text())["quantize"], run_dir, progress=False, export=export)
    assert rec["status"] == "done" and rec["streaming"]["resumed_from"] == blocks[len(done2)]
    assert files(tmp_path / "export", exclude=(MANIFEST, "README.md")) == \
        files(tiny_chain["export"], exclude=(MANIFEST, "README.md"))
    assert rec["export"]["gate"]["in_pass"]  # the gate's streams resumed twice: the chain's separate gate exactly
    assert gate_numbers(run_dir / "eval-02.json") == gate_numbers(tiny_chain["run_dir"] / "eval.json")
    # verify's numbers, computed by three processes as they wrote their shards, are verify's own of the files
    from quantbook.export.verify import verify

    took = verify(tmp_path / "export", source=tiny_chain["src"], sample=export.get("verify_sample"), progress=False)
    assert took["verdict"] == "pass" and took["numbers"]["from_record"] == took["numbers"]["tensors"] > 0
    assert took["numbers_per_tensor"] == verify(tiny_chain["export"], source=tiny_chain["src"], progress=False,
                                                sample=export.get("verify_sample"))["numbers_per_tensor"]
    assert [t["block"] for t in rec["timeline"] if not t["this_run"]] == done2
    assert_same_calibration(streamed["dir"], run_dir)
    leftovers = sorted(p.name for p in block_checkpoint.checkpoint_dir(run_dir).iterdir())
    assert leftovers == sorted([block_checkpoint.MANIFEST] + [f"amax.{b}.safetensors" for b in blocks])


KILL_MID_SHARD = """
import os, signal, sys
from quantbook.release import shards
write = shards.ShardWriter.write
def killing_write(self, data):
    write(self, data)
    if self.path.name.startswith(sys.argv[1]) and self.written > self.expected // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # half of this shard is in its .partial file
shards.ShardWriter.write = killing_write
from quantbook.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_in_the_middle_of_a_shard_then_resume_identically(tiny_chain, tmp_path):
    """A real process SIGKILLed while it writes a layer's shard along the pass, half of it in its
    `.partial` file: nothing under the shard's final name; the rerun gives the chain's export byte for
    byte, and verify's numbers from the pass are verify's own."""
    from quantbook.calibrate import quantize
    from quantbook.export.layout import MANIFEST
    from quantbook.export.verify import verify

    export = {**yaml.safe_load(tiny_chain["params"].read_text())["export"], "dir": str(tmp_path / "export")}
    params = _params(tmp_path / "s.yaml", streaming_q(tiny_chain), export)
    shard = "model-00003-of-00007.safetensors"  # layers.1
    cmd = [sys.executable, "-c", KILL_MID_SHARD, shard, "quantize", str(params), "--run-id", "killed",
           "--runs-dir", str(tmp_path / "runs")]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "export" / f"{shard}.partial").is_file() and not (tmp_path / "export" / shard).exists()

    rec = quantize(yaml.safe_load(params.read_text())["quantize"], tmp_path / "runs" / "killed", progress=False,
                   export=export)
    assert rec["status"] == "done" and not list((tmp_path / "export").glob("*.partial"))
    assert files(tmp_path / "export", exclude=(MANIFEST, "README.md")) == \
        files(tiny_chain["export"], exclude=(MANIFEST, "README.md"))
    took = verify(tmp_path / "export", source=tiny_chain["src"], sample=export.get("verify_sample"), progress=False)
    assert took["verdict"] == "pass" and took["numbers"]["from_record"] == took["numbers"]["tensors"] > 0
    assert took["numbers_per_tensor"] == verify(tiny_chain["export"], source=tiny_chain["src"], progress=False,
                                                sample=export.get("verify_sample"))["numbers_per_tensor"]


def test_stale_or_foreign_checkpoint_refused(streamed, tiny_chain, tmp_path):
    """Other calibration data, another world size or a manifest quantbook did not sign: refused,
    the differences listed, nothing removed."""
    import shutil

    from quantbook.calibrate import block_checkpoint, quantize
    from quantbook.errors import StaleCheckpoint

    run_dir = tmp_path / "run"
    shutil.copytree(streamed["dir"], run_dir)
    before = files(block_checkpoint.checkpoint_dir(run_dir))
    with pytest.raises(StaleCheckpoint, match=r"calibration\.(samples|sha256|batches)"):
        quantize(streaming_q(tiny_chain, hf_ptq={"calib_size": 12}), run_dir, progress=False)
    with pytest.raises(StaleCheckpoint, match="world: checkpoint has 1, this run 2"):
        quantize(streaming_q(tiny_chain, gpus=2), run_dir, progress=False)
    with pytest.raises(StaleCheckpoint, match="mtp"):
        quantize(streaming_q(tiny_chain, mtp="skip"), run_dir, progress=False)
    assert files(block_checkpoint.checkpoint_dir(run_dir)) == before
    manifest = block_checkpoint.checkpoint_dir(run_dir) / block_checkpoint.MANIFEST
    manifest.write_text(json.dumps({"done": ["layers.0"]}))
    with pytest.raises(StaleCheckpoint, match="no signature"):
        quantize(streaming_q(tiny_chain), run_dir, progress=False)


def test_finished_checkpoint_reassembles_without_calibrating(streamed, tiny_chain, tmp_path):
    """A rerun of a finished run (killed while writing its outputs, say) calibrates nothing again."""
    import shutil

    from quantbook.calibrate import quantize

    run_dir = tmp_path / "run"
    shutil.copytree(streamed["dir"], run_dir)
    (run_dir / "amax.safetensors").unlink()
    rec = quantize(streaming_q(tiny_chain), run_dir, progress=False)
    assert rec["streaming"]["blocks_this_run"] == [] and all(not t["this_run"] for t in rec["timeline"])
    assert_same_calibration(streamed["dir"], run_dir)


def test_two_processes_over_gloo_equal_one(streamed, tiny_chain, tmp_path):
    """gpus: 2 on CPU: two processes over gloo, batches split as one process runs them, amax MAX and
    token counts SUM: the one-process result bit for bit, saved every two blocks; process 0 writes the
    export along with the reduced amax: step 03's bytes."""
    from quantbook.calibrate import quantize
    from quantbook.export.layout import MANIFEST

    export = {**yaml.safe_load(tiny_chain["params"].read_text())["export"], "dir": str(tmp_path / "export")}
    rec = quantize(streaming_q(tiny_chain, gpus=2, save_every=2), tmp_path / "run", progress=False, export=export)
    assert rec["streaming"]["world"] == 2 and rec["streaming"]["devices"] == ["cpu", "cpu"]
    assert_same_calibration(streamed["dir"], tmp_path / "run")
    assert rec["export"]["shards_written_along"] == 7 and rec["export"]["shards_written_at_end"] == 0
    assert files(tmp_path / "export", exclude=(MANIFEST, "README.md")) == \
        files(tiny_chain["export"], exclude=(MANIFEST, "README.md"))
    assert gate_numbers(tmp_path / "run" / "eval-02.json") == gate_numbers(tiny_chain["run_dir"] / "eval.json")
    timeline = {t["block"]: t for t in rec["timeline"]}
    assert [b for b, t in timeline.items() if "write_s" in t] == ["layers.1", "layers.3", "mtp.0"]


def test_a_failing_process_is_reported_not_waited_for(streamed, tiny_chain, tmp_path, monkeypatch):
    """gpus: 2 where process 0 alone fails (its save of layers.1 raises, `streaming_faults`) while
    process 1 goes on into the next block's collectives: the run stops within seconds with process
    0's error, not its peer's echo, and nothing is left running. (On NCCL, a failed process used to
    wait in the process group's teardown for its peer, which waited for it: an H200 run hung.)"""
    from quantbook.calibrate import distributed, quantize, streaming_driver
    from quantbook.errors import QuantizeError

    # a regression waits the collective timeout (400 s), then fails here instead of hanging an hour; the run
    # itself, two fresh processes on a shared 2-core machine, took up to 103 s: under 300 s is "not waited for"
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "400")
    monkeypatch.setattr(streaming_driver, "PROCESS_TARGET", "streaming_faults:calibrate_blocks_rank0_fails")
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(QuantizeError, match=r"(?s)calibration process 0 of 2 failed: OSError: injected: rank 0 "
                                            r"cannot save layers\.1"):
        quantize(streaming_q(tiny_chain, gpus=2, save_every=1), run_dir, progress=False)
    assert time.monotonic() - t0 < 300
    rec = json.loads((run_dir / "quantize.json").read_text())
    assert rec["status"] == "failed" and "process 0 of 2 failed: OSError" in rec["error"]
    assert [p for p in _quantbook_processes() if str(run_dir) in p] == []


def _quantbook_processes() -> list[str]:
    """Command lines of this machine's running `quantbook.calibrate.distributed` processes (Linux)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "quantbook.calibrate.distributed" in cmd:
            out.append(cmd)
    return out


# ---------------------------------------------------------------------------------------------
# guards and refusals


def test_experts_that_bypass_f_linear_are_an_error(tiny_chain, tmp_path, monkeypatch):
    """With modelopt's own experts loop (`experts_calibration: modelopt`) and transformers' default
    `grouped_mm` experts, modelopt never sees the experts' inputs and their input amax are missing,
    silently; the driver stops at the first block, naming them."""
    from quantbook.calibrate import blocks, quantize
    from quantbook.errors import QuantizeError

    build = blocks.build_layer

    def grouped_mm_experts(cls, cfg, layer_idx, state, device):
        layer = build(cls, cfg, layer_idx, state, device)
        layer.mlp.experts.config = copy.copy(cfg)  # the experts pick their implementation from it at each call
        layer.mlp.experts.config._experts_implementation = "grouped_mm"
        return layer

    monkeypatch.setattr(blocks, "build_layer", grouped_mm_experts)
    with pytest.raises(QuantizeError, match=r"layers\.0: 2 enabled quantizers got no amax.*input_quantizer"):
        quantize(streaming_q(tiny_chain, experts_calibration="modelopt"), tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "quantize.json").read_text())
    assert rec["status"] == "failed" and "layers.0" in rec["error"]


@pytest.mark.parametrize("over, needle", [
    ({"hf_ptq": {"qformat": "nvfp4"}}, "nvfp4_experts_only only"),
    ({"hf_ptq": {"recipe": "general/ptq/nvfp4_experts_only-kv_fp8"}}, "recipe"),
    ({"layerwise": True}, "quantize.layerwise"),
    ({"export_generic": True}, "quantize.export_generic"),
    ({"gpus": 5}, "5 processes for 4 calibration batches"),
    ({"gpus": 0}, "quantize.gpus: expected a positive int"),
    ({"save_every": "2"}, "quantize.save_every"),
    ({"mtp": "yes"}, "quantize.mtp"),
    ({"experts_calibration": "grouped"}, "quantize.experts_calibration"),
    ({"hf_ptq": {"offload_folder": "/tmp/x"}}, "offloads nothing"),
])
def test_refused_with_the_reason(tiny_chain, tmp_path, over, needle):
    from quantbook import calibrate
    from quantbook.errors import QuantbookError

    with pytest.raises(QuantbookError, match=needle):
        calibrate.preflight(streaming_q(tiny_chain, **over), tmp_path / "run")
    assert not (tmp_path / "run" / "quantize.json").exists()


def test_sources_refused_per_driver(tiny_chain, tmp_path):
    """The streaming driver takes the release and refuses the BF16 copy; the whole-model drivers
    still refuse the release; the streaming keys are refused by the others."""
    from quantbook import calibrate
    from quantbook.errors import ParamsError

    with pytest.raises(ParamsError, match="no quantization_config"):
        calibrate.preflight(streaming_q(tiny_chain, hf_ptq={"pyt_ckpt_path": str(tiny_chain["bf16"])}), tmp_path / "r")
    q = copy.deepcopy(tiny_chain["q"])
    q["hf_ptq"]["pyt_ckpt_path"] = str(tiny_chain["src"])
    with pytest.raises(ParamsError, match="source checkpoint is quantized.*driver streaming"):
        calibrate.preflight(q, tmp_path / "r")
    with pytest.raises(ParamsError, match="quantize.gpus: 2 is read by driver streaming only"):
        calibrate.preflight({**tiny_chain["q"], "gpus": 2}, tmp_path / "r")


def test_more_processes_than_gpus_refused(tiny_chain, tmp_path, monkeypatch):
    import torch

    from quantbook import calibrate
    from quantbook.errors import QuantizeError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(QuantizeError, match="2 processes but 1 GPUs are visible"):
        calibrate.preflight(streaming_q(tiny_chain, gpus=2, hf_ptq={"device": "cuda"}), tmp_path / "run")


def test_only_max_calibration():
    from quantbook.calibrate.streaming_driver import algorithm

    assert algorithm({"algorithm": "max"}) == "max" and algorithm({}) == "max"
    assert algorithm({"algorithm": {"method": "max", "moe_calib_experts_ratio": 0.5}}) == "max"
    assert algorithm({"algorithm": {"method": "awq_lite"}}) == "awq_lite"


def test_memory_and_disk_of_v4_pro(pro_release, tmp_path):
    """From V4 Pro's config: a process holds one block in BF16 (51.7 GB: 384 experts of 3072 x 7168,
    x3, plus attention) and its batches' activations on its GPU, two blocks as stored (13.8 GB each)
    in host memory; the resume checkpoint is two sets of activations (3.76 GB each at 128 x 512)."""
    from quantbook.calibrate import registry, resources, settings
    from quantbook.release.format import load_config

    cfg = load_config(pro_release)
    hf = {"pyt_ckpt_path": str(pro_release), "calib_size": 128, "calib_seq": 512, "batch_size": 16, "device": "cuda"}
    q = settings.normalize({"driver": "streaming", "hf_ptq": hf})
    s = {**settings.HF_PTQ_DEFAULTS, **hf}
    act = 128 * 512 * 7168 * 4 * 2
    assert act == 3_758_096_384
    need = registry.get("streaming").memory_need(cfg, s, q)
    assert 51.5e9 < need.unit < 52e9 and need.model == 0
    assert need.gpu == 2 * act + act // 4
    assert 2 * 13.5e9 + act < need.host < 2 * 14e9 + act
    two = registry.get("streaming").memory_need(cfg, s, {**q, "gpus": 2})
    assert two.gpu == need.gpu // 2 and two.unit == need.unit
    assert resources.run_dir_bytes(cfg, s, q, 0)[1] == 2 * act
    placed = resources.check_memory(need, "cuda", 0.7, 2 * 2**40, [{"gpu": 0, "free": 179 * 2**30, "total": 0}])
    assert placed["problems"] == [] and placed["placed"][0]["units"] >= 1  # a B200 holds a block and its batches


# ---------------------------------------------------------------------------------------------
# the chain


def test_chain_with_the_streaming_driver_passes_verify(tiny_chain, tmp_path):
    """`quantbook run` with `driver: streaming` on the tiny release, as the production params have it
    (no `export.reference`): step 01's BF16 copy is left out, saying why; notebooks 02-04 complete,
    step 02 shows its per-block timeline and writes the v4-serving layout along the pass from the
    streaming amax (byte-identical to the modelopt chain's step 03 export) and runs the fidelity gate on
    each block (the chain's separate gate's numbers), step 03 finds every shard written and verified
    (writes none), the export passes the verifier, which compares with the release, and the gate's
    numbers are the pass's."""
    import nbformat

    from quantbook.export.layout import MANIFEST
    from quantbook.records.runs import run_chain

    raw = yaml.safe_load(tiny_chain["params"].read_text())
    raw["name"] = "tiny-streaming"
    raw["dequant"]["destination"] = str(tmp_path / "bf16")
    raw["export"]["reference"] = None
    raw["quantize"].update(driver="streaming", export_generic=False)
    raw["quantize"]["hf_ptq"].update(pyt_ckpt_path=raw["dequant"]["source"], export_path=str(tmp_path / "unused"))
    raw["export"]["dir"] = str(tmp_path / "export")
    params = tmp_path / "streaming.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    said = []
    manifest = run_chain(params, runs_dir=tmp_path / "runs", progress=False, echo=said.append)
    assert manifest["status"] == "complete", {k: v.get("error") for k, v in manifest["steps"].items()}
    assert sorted(manifest["steps"]) == ["02_quantize", "03_recover_export", "04_inspect_amax"]
    assert manifest["invocations"][-1]["not_needed"] == ["01_dequant"] and not (tmp_path / "bf16").exists()
    assert "01_dequant: not run (driver streaming calibrates from the release" in said[0]
    run_dir = tmp_path / "runs" / "tiny-streaming"
    assert json.loads((run_dir / "quantize.json").read_text())["driver"] == "streaming"
    assert json.loads((run_dir / "export.json").read_text())["verdict"] == "pass"
    assert not (tmp_path / "unused").exists() and not (run_dir / "state").exists()
    assert files(tmp_path / "export", exclude=(MANIFEST, "README.md")) == files(tiny_chain["export"], exclude=(MANIFEST, "README.md"))

    def text(nb):
        cells = [c for c in nbformat.read(run_dir / nb, as_version=4).cells if c.cell_type == "code"]
        assert not [o for c in cells for o in c.outputs if o["output_type"] == "error"], nb
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in cells
                       for o in c.outputs), sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)

    out02, images02 = text("02_quantize.ipynb")
    assert "calibrated from the first block: 5 blocks in this run" in out02
    assert "nothing to verify: driver streaming wrote step 03's v4-serving export along the pass" in out02
    assert "dequant + build" in out02 and "v4-serving export written along the pass" in out02
    exported = json.loads((run_dir / "export.json").read_text())
    assert exported["layout_report"]["shards_written"] == 0
    # the gate ran in the pass; step 03 judged its numbers (the chain's separate gate's, number for number)
    assert exported["fidelity"]["ran"].startswith("in step 02") and exported["fidelity"]["verdict"] == "measured"
    assert gate_numbers(run_dir / "eval.json") == gate_numbers(tiny_chain["run_dir"] / "eval.json")
    assert "gate (both models)" in out02 and "export shard write (background)" in out02
    assert images02 >= 4  # the per-block timeline, the gate's per-block errors, the token-count heat map, memory
    out03, _ = text("03_recover_export.ipynb")
    assert "no calibrated state by design" in out03 and "verdict: pass" in out03
    assert "gate measured in step 02's streaming pass (eval-02.json), judged here" in out03
    text("04_inspect_amax.ipynb")


# ---------------------------------------------------------------------------------------------
# records and step 03 on a streaming run


def test_record_timeline_and_reports(streamed):
    """quantize.json holds a timeline row per block; notebook 02's tables and figure come from it."""
    from quantbook.calibrate import report
    from quantbook.calibrate.driver import generic_export_dir
    from quantbook.records.memory import read_memory

    rec = streamed["record"]
    rows = rec["timeline"]
    assert rec["streaming"]["experts_calibration"] == "sorted"
    assert [r["block"] for r in rows] == ["layers.0", "layers.1", "layers.2", "layers.3", "mtp.0"]
    for r in rows:
        assert r["this_run"] and r["read_bytes"] > 0 and r["calibrate_s"] > 0 and r["host_rss_bytes"] > 0
        assert r["total_s"] >= r["dequant_s"] + r["calibrate_s"]
    assert all("write_s" in r for r in rows) and rows[-1]["state_bytes"] == 0 < rows[0]["state_bytes"]
    t = report.timeline_table(rec)
    assert list(t.index) == [r["block"] for r in rows] and t["calibrate"].notna().all()
    assert report.plot_timeline(rec) is not None
    assert report.resume_summary(rec) == "calibrated from the first block: 5 blocks in this run"
    assert generic_export_dir(rec) is None and "never holds the whole model" in rec["export"]["why"]
    out = report.outputs_table(streamed["dir"], rec)
    assert "calibrated state" not in out.index and "block checkpoint (resume)" in out.index
    q = report.quantizer_table(streamed["dir"])
    assert int(q[(q.kind == "routed_expert") & (q.role == "input")]["enabled"].sum()) == 10  # 4 layers + MTP, x2
    assert {"layers.0", "mtp.0", "calibrate"} <= {r["phase"] for r in read_memory(streamed["dir"])}


def test_step03_validation_without_a_state(streamed, tiny_chain):
    """No calibrated state by design: the v4-serving export only warns, the generic one is refused
    with the reason."""
    from quantbook.export import recover

    v = recover.validate_state(streamed["dir"], model_path=tiny_chain["bf16"], source=tiny_chain["src"])
    assert v["verdict"] == "ok"
    row = next(r for r in v["checks"] if r["check"] == "state files")
    assert row["status"] == "warn" and "no calibrated state by design" in row["detail"]
    g = recover.validate_state(streamed["dir"], model_path=tiny_chain["bf16"], layout="generic")
    assert g["verdict"] == "refused"
    with pytest.raises(Exception, match="driver streaming never holds the whole model"):
        recover.require_ok(g)


def test_checkpoint_dir_keeps_only_what_the_manifest_names(tmp_path):
    """A directory without a manifest is half an attempt and is cleared; with one, files it does not
    name (uncommitted blocks, temporary files) go, and a file it names but is missing is an error."""
    import torch

    from quantbook.calibrate import block_checkpoint as bc
    from quantbook.errors import StateError

    sig = {"world": 1, "any": "thing"}
    d = bc.checkpoint_dir(tmp_path)
    d.mkdir()
    (d / "acts.layers.0.rank0.safetensors").write_bytes(b"half")
    assert bc.check_dir(tmp_path, sig, ["layers.0", "layers.1"])["resume"] is False
    assert list(d.iterdir()) == []

    saver = bc.Saver(tmp_path, sig, ["layers.0", "layers.1"], 0, 1, [], {})
    acts = [torch.ones(1, 2, 4, 8, dtype=torch.bfloat16)]
    saver.save([{"block": "layers.0", "amax": {"x._amax": torch.tensor(1.5)}, "meta": {"timing": {"total_s": 1.0}}}],
               acts)
    saver.close()
    (d / "amax.layers.1.safetensors").write_bytes(b"uncommitted")
    (d / ".manifest.json.tmp").write_bytes(b"")
    plan = bc.check_dir(tmp_path, sig, ["layers.0", "layers.1"])
    assert plan == {"resume": True, "done": ["layers.0"], "acts_after": "layers.0", "start_block": "layers.1"}
    assert sorted(p.name for p in d.iterdir()) == ["acts.layers.0.rank0.safetensors", "amax.layers.0.safetensors",
                                                   "manifest.json"]
    assert bc.load_acts(tmp_path, "layers.0", 0, "cpu")[0].equal(acts[0])
    (d / "amax.layers.0.safetensors").unlink()
    with pytest.raises(StateError, match="amax.layers.0.safetensors"):
        bc.check_dir(tmp_path, sig, ["layers.0", "layers.1"])


def test_preflight_of_the_production_params_on_the_node(pro_release, tmp_path):
    """params/v4_pro_b200.yaml as it is (driver streaming) on the sparse full-size release and the
    described 8x B200 node: a PASS, one block on a GPU, no step 01 and no BF16 copy planned."""
    from pro_support import b200, calib_file, pro_params

    from quantbook.preflight import format_verdict, preflight

    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"), driver="streaming")
    v = preflight(p, machine=b200(), runs_dir=tmp_path / "runs")
    assert v.ok, v.refusals
    memory = next(c for c in v.checks if c["step"] == "02" and c["area"] == "memory")
    assert memory["item"].startswith("one block at a time: 48.13 GiB in BF16")
    assert {d["output"] for d in v.disk} == {"amax + block checkpoint (resume)", "v4-serving export"}
    assert next(r for r in v.plan if r["step"] == "01")["runs"] == "no"
    calibrate = next(r for r in v.plan if r["step"] == "02")
    # mtp.0 too; the export and the gate along: step 02 takes the longer of the GPU's work (calibration, then
    # the gate on each block) and the writer
    assert calibrate["what"] == "calibrate (streaming, 61 layers + 1 MTP block = 62 blocks) + the v4-serving " \
                                "export written along + the fidelity gate"
    along = next(r for r in v.plan if r["step"] == "03" and r["runs"] == "in 02" and r["what"].startswith("write"))
    gate = next(r for r in v.plan if r["step"] == "03" and r["what"].startswith("fidelity gate"))
    assert gate["runs"] == "in 02" and gate["seconds"] == pytest.approx(62 * 3.2)
    # verify's numbers of the 2,048 sampled expert tensors computed in the pass, 8 threads a shard
    numbers = next(r for r in v.plan if r["step"] == "03" and r["what"].startswith("verify's numbers"))
    assert numbers["runs"] == "in 02" and numbers["what"].startswith("verify's numbers of 2,048 expert tensors")
    assert numbers["seconds"] == pytest.approx(2048 * 0.253 / 8)
    assert calibrate["seconds"] == pytest.approx(max(62 * 3.7 + 62 * 3.2, along["seconds"] + numbers["seconds"]))
    assert "benchmarks/streaming_bench.py" in calibrate["rate"]
    # then verify takes those numbers and reads the pass-through tensors of both checkpoints (2 x 42.65 GB)
    verify = next(r for r in v.plan if r["step"] == "03" and r["what"].startswith("verify the export"))
    assert verify["bytes"] == 2 * 42_650_568_824 and verify["seconds"] == pytest.approx(verify["bytes"] / 1220 / 2**20)
    text = format_verdict(v)
    assert "projected total: 13 min 31 s" in text and "not measured" not in text, text
