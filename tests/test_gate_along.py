"""The fidelity gate run inside step 02's streaming pass (export.fidelity_along, `export.fidelity.along`):
its numbers are `quantbook eval`'s on the written export, number for number; step 03 adopts them (judged
under its own thresholds) and runs the gate itself only when the pass measured something else or
dropped it (an input amax filled with the whole model's largest). Resumed after kills: tests/test_streaming.py
(SIGKILL, gpus 2 over gloo), against the chain's separate gate."""

import copy
import json

import pytest
import requires
import yaml
from layout_helpers import files, gate_numbers
from test_streaming import streaming_q

requires.importorskip("modelopt")


def export_of(chain, dst, **fidelity) -> dict:
    e = copy.deepcopy(yaml.safe_load(chain["params"].read_text())["export"])
    e["fidelity"] = {**(e.get("fidelity") or {}), **fidelity}
    return {**e, "dir": str(dst)}


@pytest.fixture(scope="module")
def passed(trained_chain, tmp_path_factory):
    """The trained chain's settings on the streaming driver: calibration, export and gate in one pass."""
    from quantbook.calibrate import quantize

    base = tmp_path_factory.mktemp("gate-along")
    e = export_of(trained_chain, base / "export")
    rec = quantize(streaming_q(trained_chain), base / "run", progress=False, export=e)
    return {"base": base, "run": base / "run", "record": rec, "e": e}


def test_the_gate_in_the_pass_is_quantbook_eval(passed, trained_chain):
    """The same bytes as the chain's step 03 export, and the gate's numbers equal to the chain's
    separate `quantbook eval` of them, every block and every number."""
    from quantbook.export.layout import MANIFEST

    g = passed["record"]["export"]["gate"]
    assert g["in_pass"] and g["verdict"] == "pass", g
    assert files(passed["base"] / "export", exclude=(MANIFEST, "README.md")) == \
        files(trained_chain["export"], exclude=(MANIFEST, "README.md"))
    mine, separate = gate_numbers(passed["run"] / "eval-02.json"), gate_numbers(trained_chain["run_dir"] / "eval.json")
    assert mine == separate
    assert [r["block"] for r in mine["blocks"]] == ["layers.0", "layers.1", "layers.2", "layers.3", "mtp.0"]
    timeline = {t["block"]: t for t in passed["record"]["timeline"]}
    assert all(t["eval_s"] > 0 for t in timeline.values())


def test_step03_adopts_the_pass_gate_and_judges_it(passed, trained_chain, tmp_path):
    """Step 03 on the pass's run writes nothing, verifies, and takes the gate's numbers from the pass
    (its model card too); its own thresholds re-judge them; other tokens make it run the gate itself."""
    import shutil

    from quantbook.export.recover import export

    run = tmp_path / "run"
    shutil.copytree(passed["run"], run)
    rec = export(passed["e"], run, progress=False)
    assert rec["verdict"] == "pass" and rec["layout_report"]["shards_written"] == 0
    assert rec["fidelity"]["ran"].startswith("in step 02") and rec["fidelity"]["verdict"] == "pass"
    assert gate_numbers(run / "eval.json") == gate_numbers(run / "eval-02.json")
    assert "PASS" in (passed["base"] / "export" / "README.md").read_text()

    strict = export({**passed["e"], "fidelity": {**passed["e"]["fidelity"], "max_ppl_ratio": 1.00001}}, run,
                    progress=False)
    assert strict["fidelity"]["ran"].startswith("in step 02") and strict["fidelity"]["verdict"] == "fail"
    assert any("PPL ratio" in r for r in strict["fidelity"]["reasons"])
    assert gate_numbers(run / "eval.json") == gate_numbers(run / "eval-02.json")

    other = export({**passed["e"], "fidelity": {**passed["e"]["fidelity"], "samples": 4}}, run, progress=False)
    assert other["fidelity"]["ran"] == "here" and gate_numbers(run / "eval.json")["tokens"]["samples"] == 4
    export(passed["e"], run, progress=False)  # the shared export's model card back as the pass's gate says


def test_a_fill_drops_the_gate_to_step03(passed, trained_chain, capsys):
    """An input amax that must be filled with the whole model's largest is known only at the end: the
    gate stops at that block (said), its result says why, and step 03 would run it."""
    import torch

    from quantbook import amax
    from quantbook.calibrate import blocks
    from quantbook.export.along import Along
    from quantbook.export.fidelity_along import GateAlong, adoptable
    from quantbook.export.recover import export_settings
    from quantbook.release.format import load_config
    from quantbook.release.shards import Checkpoint

    snap, _ = amax.load_snapshot(passed["run"] / amax.SNAPSHOT)
    bad = "model.layers.2.mlp.experts.down_proj_input_quantizer._amax"
    snap[bad] = torch.full_like(snap[bad], float("nan"))
    e = export_settings(export_of(trained_chain, passed["base"] / "unused", samples=2, seq=32))
    along = Along(e, progress=False)
    src = Checkpoint(e["source"])
    table = blocks.block_table(load_config(e["source"]))
    order = ["layers.0", "layers.1", "layers.2", "layers.3", "mtp.0"]
    gate = GateAlong(e, torch.device("cpu"), trained_chain["calib"], order)
    try:
        for block in order:
            kind, i = block.split(".")
            along.block_done({k: v for k, v in snap.items() if k.startswith((f"model.{block}.", f"{block}."))},
                             [(kind, int(i))])
            raw, _ = src.read_block(list(table[block]))
            gate.block(block, raw, along)
    finally:
        along.close()
    result = gate.result()
    assert "model-00004-of-00007.safetensors" in result["dropped"] and "filled" in result["dropped"]
    assert [r["block"] for r in gate.rows] == ["layers.0", "layers.1"]
    assert "fidelity gate: not in this pass" in capsys.readouterr().out
    assert adoptable(result, e, "x", e["fidelity"]).startswith("step 02's pass dropped it")


def test_a_pass_without_the_mtp_block_leaves_the_gate_to_step03(trained_chain, tmp_path, capsys):
    """quantize.mtp: skip: the pass never holds mtp.0, which the gate needs: dropped at once, said, and
    recorded as such for quantize.json (step 03 runs it)."""
    import torch

    from quantbook.export.fidelity_along import GateAlong, record
    from quantbook.export.recover import export_settings

    e = export_settings(export_of(trained_chain, tmp_path / "export", samples=2, seq=32))
    gate = GateAlong(e, torch.device("cpu"), trained_chain["calib"], [f"layers.{i}" for i in range(4)])
    assert gate.block("layers.0", {}, along=None) == {} and gate.rows == []
    got = record(gate.result(), tmp_path)
    assert got == {"in_pass": False, "why": got["why"]} and "mtp.0" in got["why"]
    assert not (tmp_path / "eval-02.json").exists() and "not in this pass" in capsys.readouterr().out
