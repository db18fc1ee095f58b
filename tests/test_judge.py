"""The whole run judged before any work (issue 17): `quantbook run` refuses with every reason on the
terminal, in run.log and in the manifest, leaving no run directory when nothing ran; the step commands
run alone refuse what they, or a later step of the chain, cannot do; one rule names run directories;
`quantbook runs` lists every run directory a command made, one line a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pro_support import b200, calib_file, pro_params, write_params
from quantbook.cli import main
from quantbook.errors import RunError
from quantbook.params import load_params
from quantbook.preflight import preflight
from quantbook.records.runs import format_runs, list_runs, load_manifest, run_chain

REPO = Path(__file__).resolve().parents[1]


def tiny_params(base: Path, **hf_ptq) -> Path:
    """params/tiny.yaml with every path under `base` (the release not built: step 01 would build it)."""
    text = (REPO / "params" / "tiny.yaml").read_text()
    raw = yaml.safe_load(text.replace("work/tiny/", f"{base}/tiny/").replace("work/calib/", f"{base}/calib/"))
    raw["quantize"]["hf_ptq"].update(hf_ptq)
    calib_file(base / "calib" / "english.jsonl", rows=40)
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_run_refuses_a_typo_before_step_01_and_says_why(tmp_path, capsys):
    """Item 2: a typo inside quantize.hf_ptq used to cost step 01 (46 minutes on the node) before step 02
    refused it. Now the whole run is judged first: the reason on the terminal, no run directory, no
    BF16 copy, no release built."""
    params = tiny_params(tmp_path, calib_sise=16)
    runs = tmp_path / "runs"
    assert main(["run", str(params), "--runs-dir", str(runs), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "preflight refused" in err and "before step 01" in err and "calib_sise" in err
    assert "  - step 02 settings:" in err  # each reason on its own line, all of them printed
    assert not runs.exists()
    assert not (tmp_path / "tiny").exists()  # step 01 never ran: nothing built, nothing converted


def test_refusal_of_an_existing_run_goes_to_its_log_and_manifest(tmp_path, capsys):
    """Item 4: a run directory that exists (an earlier try) records the refusal in run.log and in its
    manifest, and `quantbook runs` keeps its row on one line."""
    params = tiny_params(tmp_path, calib_sise=16)
    rd = tmp_path / "runs" / "tiny"
    rd.mkdir(parents=True)
    (rd / "manifest.json").write_text(json.dumps({"run_id": "tiny", "status": "failed", "created": "2026-01-01T00:00",
                                                  "steps": {}, "invocations": []}))
    with pytest.raises(RunError, match="(?s)preflight refused.*calib_sise"):
        run_chain(params, runs_dir=tmp_path / "runs", progress=False, echo=lambda s: None)
    log = (rd / "run.log").read_text()
    assert "preflight refused" in log and "calib_sise" in log
    inv = load_manifest(rd)["invocations"][-1]
    assert any("calib_sise" in r for r in inv["refused"]) and inv["steps"][0] == "01"
    assert not (rd / ".lock").exists()
    (row,) = list_runs(tmp_path / "runs")
    assert row["note"].startswith("refused by the preflight") and "\n" not in row["note"]
    table = format_runs([row])
    assert len(table.splitlines()) == 2  # header + one line for the run


def test_qformat_the_layout_cannot_export_is_refused_by_preflight_quantize_and_export(tmp_path, tiny_src, capsys):
    """Item 3: qformat int4_awq passed the preflight and step 02 and was refused by step 03 only, with a
    message about amax shapes; `export` then left a stray export.json. Now every command names qformat
    as the reason before any work."""
    params = tiny_params(tmp_path, qformat="int4_awq")
    p = load_params(params)
    v = preflight(p, runs_dir=tmp_path / "runs")
    (row,) = [c for c in v.refusals if c["item"] == "quantize.hf_ptq.qformat"]
    assert row["step"] == "02" and "'int4_awq'" in row["detail"] and "v4-serving" in row["detail"]

    runs = tmp_path / "runs"
    assert main(["quantize", str(params), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "qformat 'int4_awq'" in err and "export.layout v4-serving" in err
    assert not runs.exists()  # refused before a run directory was made

    # a run calibrated with int4_awq (its record says so): step 03 alone refuses it before writing anything
    shutil.copytree(tiny_src, Path(p["export"]["source"]))
    rd = runs / p["name"]  # where `quantbook run` keeps it, and where `export` looks by default
    rd.mkdir(parents=True)
    (rd / "amax.safetensors").write_bytes(b"")
    (rd / "quantize.json").write_text(json.dumps({"status": "done", "params": {"hf_ptq": {"qformat": "int4_awq"}}}))
    assert main(["export", str(params), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "calibrated with quantize.hf_ptq.qformat 'int4_awq'" in err
    assert not (rd / "export.json").exists() and not Path(p["export"]["dir"]).exists()


def test_step_commands_and_run_share_one_run_directory_rule(tmp_path, tiny_chain, tiny_bf16, monkeypatch, capsys):
    """Deliver 3: `quantize` names its run directory as `quantbook run` does (the params name, not a
    timestamp), `export` finds it there, a finished calibration is not overwritten, and `quantbook runs`
    lists the directories the step commands made too."""
    import quantbook.calibrate as calibrate
    from quantbook.records.runs import run_dir_for

    raw = yaml.safe_load(tiny_chain["params"].read_text())
    raw["name"] = "alone"
    raw["quantize"]["hf_ptq"]["pyt_ckpt_path"] = str(tiny_bf16)
    raw["quantize"]["export_generic"] = False
    raw["export"]["dir"] = str(tmp_path / "export")
    params = tmp_path / "alone.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    runs = tmp_path / "runs"

    def calibrated(q, run_dir, **kw):  # step 02's outputs, taken from the session's chain (no recalibration)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_chain["run_dir"] / "amax.safetensors", run_dir)
        rec = {**tiny_chain["record"], "run_dir": str(run_dir)}
        (run_dir / "quantize.json").write_text(json.dumps(rec))
        return rec

    monkeypatch.setattr(calibrate, "quantize", calibrated)
    assert main(["quantize", str(params), "--runs-dir", str(runs)]) == 0
    assert f"quantize: run alone -> {runs / 'alone'}" in capsys.readouterr().out
    assert run_dir_for(load_params(params), None, runs) == runs / "alone"
    assert main(["quantize", str(params), "--runs-dir", str(runs)]) == 2  # finished: not overwritten
    assert "holds a finished calibration" in capsys.readouterr().err
    assert main(["export", str(params), "--runs-dir", str(runs)]) == 0  # found by the same rule
    assert json.loads((runs / "alone" / "export.json").read_text())["verdict"] == "pass"
    assert main(["verify", str(tmp_path / "export"), "--source", str(raw["export"]["source"]),
                 "--run-dir", str(runs / "verify-export")]) == 0
    rows = {r["run_id"]: r for r in list_runs(runs)}
    assert rows["alone"]["status"] == "complete" and rows["alone"]["steps"] == {"02_quantize": "complete",
                                                                                "03_export": "complete",
                                                                                "verify": "complete"}
    assert rows["verify-export"]["steps"] == {"verify": "complete"}
    assert all(len(format_runs([r]).splitlines()) == 2 for r in rows.values())


def test_missing_release_is_named_before_the_rehearsal_rule(tmp_path, capsys):
    """Item 5: a release path that does not exist is the first thing said, not 'no rehearsal has passed'."""
    p = pro_params(tmp_path, tmp_path / "nowhere" / "DeepSeek-V4-Pro-FP8", calib_file(tmp_path / "c.jsonl"))
    params = write_params(p, tmp_path / "pro.yaml")
    assert main(["run", str(params), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere' / 'DeepSeek-V4-Pro-FP8'} does not exist" in err
    assert "no rehearsal" not in err and not (tmp_path / "runs").exists()


def test_after_a_rehearsal_the_real_run_is_judged_on_this_machine(tmp_path, tiny_src):
    """Item 6: "the real run may start" only where the preflight passes; elsewhere the reasons. (The
    production params on the tiny release: the same checks as at full size, in a second.)"""
    from quantbook.records.runs import after_rehearsal

    params = write_params(pro_params(tmp_path, tiny_src, calib_file(tmp_path / "c.jsonl"), driver="streaming"),
                          tmp_path / "pro.yaml")
    manifest = {"rehearsal_of": {"digest": "0123"}}
    ok, lines = after_rehearsal(params, manifest, runs_dir=tmp_path / "runs", machine=b200())
    assert ok and lines[0].startswith(f"the real run may start: quantbook run {params}")
    ok, lines = after_rehearsal(params, manifest, runs_dir=tmp_path / "runs")  # this machine: no GPU
    assert not ok and "cannot start on this machine" in lines[0] and "may start" not in "\n".join(lines)
    assert any("quantize.hf_ptq.device: 'cuda', but no GPU is visible" in ln for ln in lines)


def test_quantize_alone_refuses_before_step_01_has_written_its_input(tmp_path, capsys):
    """Deliver 2: step 02's command run alone refuses what it cannot do yet (the BF16 copy step 01 writes is
    not there), before a run directory is made; `quantbook preflight --steps 02` of the same plan warns."""
    params = tiny_params(tmp_path)
    runs = tmp_path / "runs"
    assert main(["quantize", str(params), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "quantize.hf_ptq.pyt_ckpt_path" in err and "does not exist yet: step 01 writes the BF16 copy" in err
    assert not runs.exists()
    v = preflight(load_params(params), steps=["02"], runs_dir=runs)
    (row,) = [c for c in v.checks if c["item"] == "quantize.hf_ptq.pyt_ckpt_path"]
    assert row["status"] == "warn" and v.ok
