"""`quantbook preflight` at V4 Pro's real size: a sparse full-size release (64 shards, 145,116 tensors,
805 GiB apparent, a few MiB on disk), the production params, and the node described (8x B200) or
this machine as it is. Each of the predecessor's failed runs that a preflight check stops has its
test here (test_run*); the rehearsal's are in test_rehearsal.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import requires
from pro_support import GIB, TIB, b200, calib_file, pro_params, write_params
from quantbook.preflight import format_verdict, plan_rows, preflight, rates, require_pass, select
from quantbook.errors import ParamsError, RunError
from quantbook.release.format import PRO_CONFIG, load_config

REPO = Path(__file__).resolve().parents[1]
PRO_TENSORS = 145_116


def by(v, step, area) -> list[dict]:
    return [c for c in v.checks if c["step"] == step and c["area"] == area]


def refused(v) -> str:
    return "\n".join(f"{c['step']} {c['area']} {c['item']}: {c['detail']}" for c in v.refusals)


def test_full_size_pro_release_passes_on_the_node(pro_release, tmp_path):
    """The production params on the sparse full-size release and the node: every tensor classified,
    every step planned with its projected time and where the rate was measured, a PASS."""
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"))
    v = preflight(p, machine=b200(), runs_dir=tmp_path / "runs")
    assert v.ok, refused(v)
    assert sum(r["tensors"] for r in v.census) == sum(r["expected"] for r in v.census) == PRO_TENSORS
    experts = {(r["block"], r["kind"]): r["tensors"] for r in v.census if r["part"] == "routed_expert"}
    assert experts[("layers", "fp4_weight")] == 61 * 384 * 3 and experts[("mtp", "fp4_weight")] == 384 * 3
    release = by(v, "01", "release")[0]["detail"]
    assert "145,116 tensors in 64 shards" in release and "71,424 FP4 weights" in release
    memory = by(v, "02", "memory")[0]
    assert memory["status"] == "ok" and "the whole BF16 model (61 layers, 2.91 TiB)" in memory["item"]
    assert "on 8 GPU(s) at 0.7" in memory["detail"]
    outputs = {d["output"]: d for d in v.disk}
    assert set(outputs) == {"BF16 copy", "calibrated state", "v4-serving export"}  # no generic export by default
    assert outputs["BF16 copy"]["needs"] == 3_197_868_864_632  # step 01's plan, from the headers
    assert outputs["v4-serving export"]["needs"] == 913_061_485_688  # step 03's plan (test_sparse.py)
    plan = {r["step"] + " " + r["what"].split(" (")[0]: r for r in v.plan}
    dequant = plan["01 dequantize to BF16"]
    assert dequant["rate"].startswith("1105 MiB/s (16 workers) on H200 node, 16 cores")  # nearest measured machine
    assert dequant["seconds"] == pytest.approx(3_197_868_864_632 / (1105 * 2**20))
    assert plan["02 calibrate"]["seconds"] == pytest.approx(61 * 127.9) and "anchors.md" in plan["02 calibrate"]["rate"]
    write = plan["03 write the v4-serving layout"]  # carrying (the default), 32 workers: the 8-worker figure
    assert write["rate"].startswith("1312 MiB/s (8 workers) on H200 node") and "layout-pro" in write["rate"]
    assert write["seconds"] == pytest.approx(913_061_485_688 / (1312 * 2**20))
    assert plan["03 verify the export"]["seconds"] is None  # no measured rate: said, not guessed
    assert [r["projected"] for r in plan_rows(v) if r["step"] == "03"][1] == "not measured"
    gate = plan["03 fidelity gate: 62 blocks x 2 models on 64 x 512 held-out tokens"]
    assert gate["seconds"] == pytest.approx(62 * 3.2) and gate["rate"].startswith("3.2 s/layer on H100 80 GB")
    rehearsal = by(v, "run", "rehearsal")[0]
    assert rehearsal["status"] == "warn" and "--rehearse" in rehearsal["detail"]
    text = format_verdict(v)
    assert text.splitlines()[-1].startswith("PASS: v4_pro_b200") and "projected total: 3 h 10 min + 1 step(s) not measured" in text


def test_this_machine_refuses_with_every_reason(pro_release, tmp_path):
    """The same params on this machine, through the CLI: no GPU, hub datasets offline, 3 TB of model
    for ~20 GB of memory, terabytes of outputs for this disk: one verdict listing them all, exit 1."""
    params = write_params(pro_params(tmp_path, pro_release), tmp_path / "pro.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "lib")}
    cli = [sys.executable, "-m", "quantbook.cli", "preflight", str(params)]
    # the two invocations are independent: started together, each waited for in turn
    r, j = _run_together([cli + ["--runs-dir", str(tmp_path / "runs")], cli + ["--json", "--steps", "01"]], env)
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "release census (145,116 tensors found, 145,116 implied by config.json)" in out
    assert "REFUSED: v4_pro_b200" in out
    for needle in ("02 device: quantize.hf_ptq.device: 'cuda', but no GPU is visible",
                   "02 data: cnn_dailymail: a hub dataset (abisee/cnn_dailymail",
                   "02 memory: the whole BF16 model (61 layers, 2.91 TiB)", "run disk: BF16 copy (01) +"):
        assert needle in out
    verdict = json.loads(j.stdout)
    assert verdict["steps"] == ["01"] and sum(r["tensors"] for r in verdict["census"]) == PRO_TENSORS


def _run_together(commands: list[list[str]], env: dict, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=...)` of each command, all
    started at once (each CLI process spends seconds importing and planning: they overlap)."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands]
    done = []
    try:
        for c, p in zip(commands, procs):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_tiny_default_passes_here(tmp_path):
    """params/tiny.yaml (its paths moved): the release is built by step 01, so it is sized from its
    tiny: section; it needs no rehearsal (it is rehearsal-sized)."""
    text = (REPO / "params" / "tiny.yaml").read_text().replace("work/tiny/", f"{tmp_path}/tiny/")
    p = yaml.safe_load(text.replace("work/calib/english.jsonl", str(calib_file(tmp_path / "calib.jsonl"))))
    p["_path"] = "params/tiny.yaml"
    v = preflight(p, runs_dir=tmp_path / "runs")
    assert v.ok, refused(v)
    assert "built by step 01 from the tiny: section" in by(v, "01", "release")[0]["detail"]
    assert all(r["tensors"] is None for r in v.census) and sum(r["expected"] for r in v.census) > 0
    assert by(v, "02", "settings")[0]["detail"].endswith("model from the BF16 copy step 01 writes (its config from "
                                                         "the release's)")
    assert by(v, "run", "rehearsal")[0]["item"] == "not needed"


# ----------------------------------------------------------------------------- the predecessor's runs


def test_run1_fp8_source_and_batch_probe_refused(pro_release, tmp_path):
    """Run 1 calibrated the FP8 release and died in hf_ptq's batch-size probe: both refused in seconds."""
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"),
                   **{"quantize.hf_ptq": {"pyt_ckpt_path": str(pro_release), "batch_size": 0}})
    v = preflight(p, machine=b200())
    text = refused(v)
    assert not v.ok and "the source checkpoint is quantized (quant_method 'fp8'" in text
    assert "batch_size: 0; set a positive batch size" in text


def test_run2_untested_modelopt_refused(pro_release, tmp_path, monkeypatch):
    """Run 2's export read amax left on the GPU; patch 1 moves them to CPU, and the patches apply only
    to the modelopt they were tested with: another version is refused (force: loudly allowed)."""
    from quantbook.calibrate import patches

    monkeypatch.setattr(patches, "TESTED_MODELOPT", ("0.99.0",))
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"))
    v = preflight(p, steps=["02"], machine=b200())
    assert [c["item"] for c in v.refusals] == ["nvidia-modelopt"]
    assert "runtime patches were tested with 0.99.0" in v.refusals[0]["detail"]
    p["quantize"]["force"] = True
    forced = preflight(p, steps=["02"], machine=b200())
    assert forced.ok and by(forced, "02", "versions")[0]["status"] == "warn"


def test_run3_memory_placed_layer_by_layer(pro_release, tmp_path):
    """Run 3 put 31.5 GB of experts on a GPU with 25.9 GB free. The preflight places the BF16 model the
    way the sequential device map does (whole 48 GiB layers, each GPU at gpu_max_mem_percentage of
    its free memory, the rest in host memory) and refuses what cannot fit, naming the sizes."""
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"))
    crowded = preflight(p, steps=["02"], machine=b200(free_gpu=25.9e9))
    assert [c["area"] for c in crowded.refusals] == ["memory"]
    assert "no GPU holds one 48.13 GiB layer" in crowded.refusals[0]["detail"]
    small_host = preflight(p, steps=["02"], machine=b200(host=1 * TIB))
    detail = small_host.refusals[0]["detail"]
    assert [c["area"] for c in small_host.refusals] == ["memory"]
    assert "2,208.11 GiB for host memory after the GPUs take their share; 1,024.00 GiB available" in detail


@pytest.mark.parametrize("hf_ptq, needle", [
    ({"calib_size": [128, 128]}, "gives 256 calibration samples (128 from cnn_dailymail, 128 from "),
    ({"low_memory_mode": True}, "low_memory_mode: refused for DeepSeek V4"),
])
def test_known_bad_settings_of_the_node_refused(pro_release, tmp_path, hf_ptq, needle):
    """The node's other known-bad settings: 256 samples (host OOM), low_memory_mode (meta-device errors)."""
    v = preflight(pro_params(tmp_path, pro_release, **{"quantize.hf_ptq": hf_ptq}), steps=["02"], machine=b200())
    assert needle in refused(v)


def test_run6_7_calibration_data_checked(pro_release, tmp_path):
    """Runs 6 and 7 died building the calibration dataloader (dataset None). The preflight names every
    dataset with the samples it holds against the samples asked."""
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl", rows=100))
    v = preflight(p, steps=["02"], machine=b200())
    assert [c["area"] for c in v.refusals] == ["data"]
    assert "100 samples, 128 asked: too few" in v.refusals[0]["detail"]
    p["quantize"]["hf_ptq"]["dataset"] = str(tmp_path / "missing.jsonl")
    assert "does not exist; write it with `quantbook calib-data" in refused(preflight(p, steps=["02"], machine=b200()))


def test_run8_shell_script_flags_refused(pro_release, tmp_path):
    """Run 8 passed the shell script's flag names; every one is refused with hf_ptq's own name."""
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"),
                   **{"quantize.hf_ptq": {"quant": "nvfp4", "kv_cache_quant": "fp8", "tp": 8}})
    text = refused(preflight(p, steps=["02"], machine=b200()))
    for right in ("write `qformat`", "write `kv_cache_qformat`", "write `inference_tensor_parallel`"):
        assert right in text


def test_run9_calib_size_read_as_hf_ptq_reads_it(pro_release, tmp_path):
    """Run 9 handed hf_ptq a calib_size string its __main__ block had not converted. The preflight
    reads calib_size per dataset exactly as hf_ptq's block does, and refuses what it cannot convert."""
    p = pro_params(tmp_path, pro_release, **{"quantize.hf_ptq": {"calib_size": "64,sixty-four"}})
    assert "calib_size: '64,sixty-four' is not an int or a list of ints" in refused(
        preflight(p, steps=["02"], machine=b200()))


def test_hf_ptq_checkout_of_another_release_refused(pro_release, tmp_path):
    """The hf_ptq driver runs a checkout's hf_ptq.py: its release must be the installed modelopt's."""
    from test_hfptq import make_checkout

    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"),
                   quantize={"driver": "hf_ptq", "hf_ptq_dir": str(make_checkout(tmp_path / "mo", "0.45 (2026-06-01)"))})
    v = preflight(p, steps=["02"], machine=b200())
    assert [c["item"] for c in v.refusals] == ["hf_ptq checkout"]
    assert "the CHANGELOG's release differs" in v.refusals[0]["detail"]


# ----------------------------------------------------------------------------- outputs and disk


def test_output_directories_safe(pro_release, tmp_path):
    calib = calib_file(tmp_path / "calib.jsonl")
    inside = pro_params(tmp_path, pro_release, calib, export={"dir": str(pro_release / "nvfp4")})
    assert "is the release" in refused(preflight(inside, machine=b200()))
    same = pro_params(tmp_path, pro_release, calib, export={"dir": str(tmp_path / "out" / "DeepSeek-V4-Pro-BF16")})
    assert "are the same directory or one holds the other" in refused(preflight(same, machine=b200()))
    junk = tmp_path / "out" / "DeepSeek-V4-Pro-NVFP4-generic"
    junk.mkdir(parents=True)
    (junk / "notes.txt").write_text("not an export")
    generic = pro_params(tmp_path, pro_release, calib, quantize={"export_generic": True})
    assert "not empty and not a modelopt export" in refused(preflight(generic, steps=["02"], machine=b200()))
    assert preflight(pro_params(tmp_path, pro_release, calib), steps=["02"], machine=b200()).ok  # not written
    (junk / "notes.txt").unlink()
    serving = tmp_path / "out" / "DeepSeek-V4-Pro-NVFP4"
    serving.mkdir()
    (serving / "quantbook-layout.json").write_text(json.dumps({"source_id": "another release", "source": "/x"}))
    assert "holds an export of another release (/x)" in refused(preflight(pro_params(tmp_path, pro_release, calib),
                                                                          steps=["03"], machine=b200()))


def test_disk_summed_per_filesystem(pro_release, tmp_path):
    """Outputs on one filesystem are summed against its free space; on separate ones, each alone."""
    p = pro_params(tmp_path, pro_release, calib_file(tmp_path / "calib.jsonl"), quantize={"export_generic": True})
    one = preflight(p, machine=b200(disk=4 * TIB))
    assert [c["area"] for c in one.refusals] == ["disk"] and "needs 4.67 TiB, 4.00 TiB free" in refused(one)
    apart = preflight(p, machine=b200(disk=4 * TIB, disk_id=lambda path: hash(Path(path).name)))
    assert apart.ok, refused(apart)
    assert {d["status"] for d in apart.disk} == {"ok"}


def test_notebook_refuses_in_its_first_cell(tmp_path):
    """A step's notebook stops in its preflight cell, before anything is written: notebook 01 with its
    destination inside the release."""
    import papermill as pm

    from quantbook.records.runs import choose_kernel
    from quantbook.release.tiny import make_tiny

    src = make_tiny(tmp_path / "src", layers=2)
    with pytest.raises(pm.PapermillExecutionError, match="inside it or around it"):
        pm.execute_notebook(str(REPO / "notebooks" / "01_dequant.ipynb"), str(tmp_path / "01.ipynb"),
                            kernel_name=choose_kernel(), progress_bar=False,
                            parameters={"source": str(src), "destination": str(src / "bf16"),
                                        "run_dir": str(tmp_path / "run")})
    assert not (src / "bf16").exists() and not (tmp_path / "run" / "memory.csv").exists()


def test_every_notebook_calls_the_preflight_first():
    """The first cell after each notebook's parameters calls the same preflight and stops on a refusal."""
    for nb in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        i = next(k for k, c in enumerate(cells) if "parameters" in (c["metadata"].get("tags") or []))
        first = next("".join(c["source"]) for c in cells[i + 1:] if c["cell_type"] == "code")
        step = nb.name[:2]
        assert "preflight.preflight(" in first and f'steps=["{step}"]' in first, nb.name
        assert "preflight.require_pass(verdict)" in first, nb.name


# ----------------------------------------------------------------------------- the parts


def test_rates_each_with_where_it_was_measured(tmp_path):
    table = rates.load_rates()
    assert table and all(r["machine"] and r["command"] and r["date"] and r["source"] for r in table)
    assert rates.pick(table, "dequant", device="cuda", workers=16, cpus=224)["value"] == 1619
    assert rates.pick(table, "dequant", device="cpu", workers=2, cpus=2)["machine"].startswith("this 2-core VM")
    assert rates.pick(table, "dequant", device="cpu", workers=4, cpus=16)["value"] == 944
    assert rates.pick(table, "calibrate", device="cuda", driver="streaming")["value"] == 3.7
    assert rates.pick(table, "verify", device="cpu", workers=8, route="reread") is None  # not measured: not guessed
    assert rates.pick(table, "verify", route="in-pass", cpus=224)["unit"] == "s/tensor"
    assert rates.seconds({"unit": "s/tensor", "value": 0.25}, tensors=2048) == 512
    assert rates.pick(table, "v4-serving", workers=8, cpus=32, route="requant", device="cuda")["value"] == 786
    assert rates.pick(table, "v4-serving", workers=8, cpus=32, route="carry", device="cpu")["value"] == 1312
    assert rates.seconds({"unit": "s/layer", "value": 2.0}, layers=61) == 122
    bad = tmp_path / "rates.yaml"
    bad.write_text("rates:\n  - {what: dequant, unit: MiB/s, value: 900}\n")
    with pytest.raises(ParamsError, match="missing or wrong: \\['machine', 'command', 'date', 'source'\\]"):
        rates.load_rates(bad)


def test_memory_need_through_the_driver():
    """Drivers say what they hold: the whole BF16 model for modelopt / hf_ptq, one layer for a driver
    that does not load it whole; the checks place the need on a machine."""
    from quantbook.calibrate import registry
    from quantbook.calibrate.driver import Driver
    from quantbook.calibrate.resources import check_memory
    from quantbook.release.format import bf16_config

    cfg = bf16_config(load_config(PRO_CONFIG))
    whole = registry.get("modelopt").memory_need(cfg, {}, {})
    assert whole == registry.get("hf_ptq").memory_need(cfg, {}, {})
    assert (whole.model, whole.unit) == (3_197_868_864_632, 51_683_274_988)

    class Streaming(Driver):
        name = "streaming-example"
        loads_whole_model = False

    one = Streaming.memory_need(cfg, {}, {})
    assert (one.model, one.unit, one.host) == (0, whole.unit, whole.unit)
    gpus = [{"gpu": 0, "free": 80 * GIB}]
    assert check_memory(one, "cuda", 0.7, 64 * GIB, gpus)["problems"] == []
    assert "no GPU holds one 48.13 GiB layer" in check_memory(one, "cuda", 0.5, 64 * GIB, gpus)["problems"][0]
    assert check_memory(whole, "cuda", 0.7, 64 * GIB, gpus)["host_need"] == whole.model - whole.unit


def test_census_names_what_differs(pro_release):
    from quantbook.release.census import census, mismatches
    from quantbook.release.shards import read_header

    cfg = load_config(pro_release)
    name = "model-00002-of-00064.safetensors"
    header = read_header(pro_release / name)
    header.tensors.pop("layers.0.ffn.experts.7.w2.scale")
    rows = mismatches(census(cfg, {name: header}))
    assert {(r["part"], r["kind"]) for r in rows} >= {("routed_expert", "scale")}


def test_hub_datasets_from_modelopt_source_match_its_import():
    from quantbook.calibrate.data import modelopt_datasets

    requires.importorskip("modelopt")
    from modelopt.torch.utils.dataset_utils import DATASET_COMBOS, SUPPORTED_DATASET_CONFIG

    repos, combos = modelopt_datasets()
    assert repos == {k: v["config"]["path"] for k, v in SUPPORTED_DATASET_CONFIG.items()}
    assert combos == DATASET_COMBOS


def test_step_selection_and_require_pass():
    assert select(["01-03"]) == ["01", "02", "03"] and select("quantize 4") == ["02", "04"]
    with pytest.raises(ParamsError, match="no step '07'"):
        select("07")
    v = preflight({"name": "x", "inspect": {}}, steps=["04"], run_dir="/nonexistent")
    with pytest.raises(RunError, match="step 04 amax: .*amax.safetensors: missing"):
        require_pass(v)


def test_streaming_plan_counts_the_mtp_block(tiny_src, tmp_path):
    """Item 10 of issue 17: the streaming driver calibrates mtp.0 after the layers, a block like any other;
    the plan said "61 layers" and projected 61 blocks. The production params on the tiny release."""
    p = pro_params(tmp_path, tiny_src, calib_file(tmp_path / "calib.jsonl"), driver="streaming")
    v = preflight(p, machine=b200())
    (row,) = [r for r in v.plan if r["step"] == "02"]
    assert row["what"] == "calibrate (streaming, 4 layers + 1 MTP block = 5 blocks) + the v4-serving export written " \
                          "along + the fidelity gate"
    # the gate runs on each block after its calibration, on the same GPU: their seconds add up
    assert row["seconds"] == pytest.approx(5 * 3.7 + 5 * 3.2) and "the mtp.0 block's compute" in row["rate"]
    p["quantize"]["mtp"] = "skip"  # the pass never holds mtp.0, which the gate needs: step 03 runs it
    v = preflight(p, machine=b200())
    (row,) = [r for r in v.plan if r["step"] == "02"]
    assert row["what"].startswith("calibrate (streaming, 4 layers) +") and row["seconds"] == pytest.approx(4 * 3.7)
    assert next(r for r in v.plan if r["what"].startswith("fidelity gate"))["runs"] == "yes"
