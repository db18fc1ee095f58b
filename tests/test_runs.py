"""The chain runner: records, resume by run id, failures that name notebook and cell, `quantbook runs`.

The step notebooks here are small ones written by the test (the real 02/03 are exercised by their
own tests); notebook 04 runs through the chain in test_inspect_amax.py.
"""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from quantbook.errors import ParamsError, RunError
from quantbook.records.runs import (
    StepFailed, discover_steps, format_runs, list_runs, load_manifest, run_chain, select_steps,
)

QUANTBOOK = [sys.executable, "-m", "quantbook.cli"]


def _notebook(path: Path, params: str, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {path.stem}"))
    nb.cells.append(nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}))
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


COUNT = """import json, sys
from pathlib import Path
p = Path(run_dir) / "ran_{name}.json"
n = json.loads(p.read_text())["n"] + 1 if p.exists() else 1
p.write_text(json.dumps({{"n": n, "prefix": sys.prefix}}))
print("hello from {name}, attempt", n)"""


def _chain(tmp_path, fail_02=False):
    nbs = tmp_path / "notebooks"
    nbs.mkdir(exist_ok=True)
    _notebook(nbs / "01_dequant.ipynb", 'source = "x"\nworkers = 1\ntiny = None\nrun_dir = "runs/x"',
              COUNT.format(name="01"), "assert tiny == {'layers': 2}, tiny")
    _notebook(nbs / "02_quantize.ipynb", "calib_size = 4\nrun_dir = None",
              COUNT.format(name="02"),
              "x = 1\nif FAIL:\n    raise ValueError(f'boom {calib_size}')".replace("FAIL", str(fail_02)),
              "print('after')")
    _notebook(nbs / "03_export.ipynb", "run_dir = None", COUNT.format(name="03"))
    _notebook(nbs / "04_inspect_amax.ipynb", "run_dir = None", "print('inspected')")
    (nbs / "notes.ipynb").write_text((nbs / "03_export.ipynb").read_text())  # not a step: no NN_ prefix
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"name": "t", "tiny": {"layers": 2},
                                      "dequant": {"source": "src", "workers": 2}, "quantize": {"calib_size": 8}}))
    return nbs, params


def _ran(run_dir, step):
    p = run_dir / f"ran_{step}.json"
    return json.loads(p.read_text())["n"] if p.exists() else 0


def test_select_steps(tmp_path):
    nbs, _ = _chain(tmp_path)
    steps = discover_steps(nbs)
    assert [s.name for s in steps] == ["01_dequant", "02_quantize", "03_export", "04_inspect_amax"]
    assert [s.section for s in steps] == ["dequant", "quantize", "export", "inspect"]
    pick = lambda spec: [s.key for s in select_steps(steps, spec)]  # noqa: E731
    assert pick(None) == ["01", "02", "03", "04"]
    assert pick(["3", "01"]) == ["01", "03"]
    assert pick("quantize,03_export") == ["02", "03"]
    assert pick(["01-02"]) == ["01", "02"]
    with pytest.raises(ParamsError, match="no step '07'"):
        pick("07")


def test_chain_records_and_skips_completed_steps(tmp_path):
    nbs, params = _chain(tmp_path)
    runs = tmp_path / "runs"
    lines = []
    m = run_chain(params, runs_dir=runs, notebooks_dir=nbs, progress=False, echo=lines.append)
    rd = runs / "t"
    assert m["status"] == "complete" and m["run_id"] == "t"
    assert [_ran(rd, k) for k in ("01", "02", "03")] == [1, 1, 1]
    # the kernel ran this interpreter's environment
    assert json.loads((rd / "ran_01.json").read_text())["prefix"] == sys.prefix
    disk = load_manifest(rd)
    assert disk["status"] == "complete"
    for key in ("python", "torch", "transformers", "nvidia-modelopt", "torch_cuda", "driver", "cuda_driver"):
        assert key in disk["versions"]
    assert disk["versions"]["python"] == "%d.%d.%d" % sys.version_info[:3]
    assert disk["host"]["name"] and isinstance(disk["gpus"], list) and "commit" in disk["git"]
    assert disk["params"]["quantize"] == {"calib_size": 8}
    for name in ("01_dequant", "02_quantize", "03_export"):
        rec = disk["steps"][name]
        assert rec["status"] == "complete" and rec["duration_s"] > 0 and rec["start"] <= rec["end"]
        assert (rd / f"{name}.ipynb").is_file() and (rd / f"{name}.html").is_file()
        assert not (rd / f"{name}.running.ipynb").exists()
    assert disk["steps"]["01_dequant"]["params"] == {"source": "src", "workers": 2, "tiny": {"layers": 2},
                                                    "run_dir": str(rd.resolve())}
    executed = nbformat.read(str(rd / "02_quantize.ipynb"), 4)
    assert any("calib_size = 8" in c.source for c in executed.cells)  # papermill's injected cell
    log = (rd / "run.log").read_text()
    assert "hello from 02, attempt 1" in log  # cell output streamed to the log
    assert lines[0].startswith("[1/4] 01_dequant: dequantize")
    assert not (rd / ".lock").exists()  # only while a run works (runs/README.md)

    # the same run id again: everything is complete, nothing runs
    lines.clear()
    run_chain(params, runs_dir=runs, notebooks_dir=nbs, progress=False, echo=lines.append)
    assert [_ran(rd, k) for k in ("01", "02", "03")] == [1, 1, 1]
    assert all("skipped, complete since" in ln for ln in lines)
    assert len(load_manifest(rd)["invocations"]) == 2

    # changed parameters of a completed step are refused before anything runs ...
    params.write_text(params.read_text().replace("calib_size: 8", "calib_size: 16"))
    with pytest.raises(ParamsError, match=r"02_quantize of run t .*\(changed: \['calib_size'\]\).*--redo 02"):
        run_chain(params, runs_dir=runs, notebooks_dir=nbs, progress=False, echo=lines.append)
    # ... and rerun with --redo: 01 skipped, 02 runs, and so does 03 after it
    run_chain(params, runs_dir=runs, notebooks_dir=nbs, redo=["02"], progress=False, echo=lines.append)
    assert [_ran(rd, k) for k in ("01", "02", "03")] == [1, 2, 2]
    assert load_manifest(rd)["steps"]["02_quantize"]["attempt"] == 2


def test_failure_names_notebook_and_cell_then_resume(tmp_path):
    nbs, params = _chain(tmp_path, fail_02=True)
    runs = tmp_path / "runs"
    with pytest.raises(StepFailed) as ei:
        run_chain(params, runs_dir=runs, notebooks_dir=nbs, run_id="r1", progress=False, echo=lambda s: None)
    msg = str(ei.value)
    assert f"step 02_quantize FAILED in notebook {nbs / '02_quantize.ipynb'}, cell 4 of 5 (code cell 3, In [" in msg
    assert "ValueError: boom 8" in msg and "    x = 1" in msg
    assert "    line 3: raise ValueError(f'boom {calib_size}')" in msg
    rd = runs / "r1"
    assert f"executed notebook: {rd.resolve() / '02_quantize.ipynb'}" in msg
    assert [_ran(rd, k) for k in ("01", "02", "03")] == [1, 1, 0]  # stopped at the first failure
    m = load_manifest(rd)
    assert m["status"] == "failed" and "03_export" not in m["steps"] and "04_inspect_amax" not in m["steps"]
    err = m["steps"]["02_quantize"]["error"]
    assert (err["cell"], err["ename"], err["evalue"]) == (4, "ValueError", "boom 8")
    assert err["line"].startswith("3: raise ValueError")
    assert (rd / "02_quantize.html").is_file()  # the failed notebook is readable too
    (row,) = list_runs(runs)
    assert row["status"] == "failed" and row["steps"]["02_quantize"] == "failed"
    assert "02_quantize cell 4: ValueError: boom 8" in format_runs([row])

    _chain(tmp_path, fail_02=False)  # the fix
    lines = []
    m = run_chain(params, runs_dir=runs, notebooks_dir=nbs, run_id="r1", progress=False, echo=lines.append)
    assert m["status"] == "complete"
    assert [_ran(rd, k) for k in ("01", "02", "03")] == [1, 2, 1]
    assert "skipped" in lines[0] and "skipped" not in lines[1]


def test_a_refusal_inside_a_step_shows_every_reason(tmp_path, capsys):
    """Item 4: a step that refuses with several reasons (a notebook's preflight cell) printed only the first
    line of its error; the reasons were in the manifest alone. Now the terminal and run.log get them all,
    and `quantbook runs` keeps the run on one line."""
    nbs, params = _chain(tmp_path)
    _notebook(nbs / "02_quantize.ipynb", "calib_size = 4\nrun_dir = None",
              "from quantbook.errors import RunError\nwhy = {'settings': 'first', 'data': 'second'}\n"
              "raise RunError('preflight refused params (2 reason(s)):\\n' + '\\n'.join(\n"
              "    f'  - step 02 {k}: {v} reason' for k, v in why.items()))")
    runs = tmp_path / "runs"
    with pytest.raises(StepFailed) as ei:
        run_chain(params, runs_dir=runs, notebooks_dir=nbs, progress=False, echo=lambda s: None)
    log = (runs / "t" / "run.log").read_text()
    for text in (str(ei.value), log[log.index("quantbook.runs ERROR"):]):
        assert "RunError: preflight refused params (2 reason(s)):" in text
        assert "  - step 02 settings: first reason" in text and "  - step 02 data: second reason" in text
    (row,) = list_runs(runs)
    assert "\n" not in row["note"] and len(format_runs([row]).splitlines()) == 2


def test_dead_kernel_names_the_running_cell(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_dequant.ipynb", "run_dir = None", "print('loading')",
              "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does")
    params = tmp_path / "p.yaml"
    params.write_text("name: k\n")
    with pytest.raises(StepFailed) as ei:
        run_chain(params, steps="01", runs_dir=tmp_path / "runs", notebooks_dir=nbs, progress=False,
                  echo=lambda s: None)
    assert "cell 4 of 4 (code cell 3" in str(ei.value) and "os.kill" not in str(ei.value).splitlines()[0]
    assert "import os, signal" in str(ei.value)
    assert "DeadKernelError" in str(ei.value) or "died" in str(ei.value).lower()


def test_whole_chain_needs_every_step_notebook(tmp_path):
    nbs, params = _chain(tmp_path)
    (nbs / "02_quantize.ipynb").unlink()
    with pytest.raises(ParamsError, match=r"lacks step notebook\(s\) \['02'\].*--steps"):
        run_chain(params, runs_dir=tmp_path / "runs", notebooks_dir=nbs, progress=False)
    m = run_chain(params, steps=["01", "03"], runs_dir=tmp_path / "runs", notebooks_dir=nbs, progress=False,
                  echo=lambda s: None)
    assert m["status"] == "incomplete" and set(m["steps"]) == {"01_dequant", "03_export"}
    assert "incomplete" in format_runs(list_runs(tmp_path / "runs"))


def test_unknown_parameter_refused_before_anything_runs(tmp_path):
    nbs, params = _chain(tmp_path)
    params.write_text(params.read_text().replace("calib_size: 8", "calib_size: 8\n  calib_sise: 9"))
    with pytest.raises(ParamsError, match=r"section 'quantize' has key\(s\) \['calib_sise'\]"):
        run_chain(params, runs_dir=tmp_path / "runs", notebooks_dir=nbs, progress=False)
    assert not (tmp_path / "runs" / "t").exists()


def test_locked_run_and_interrupted_listing(tmp_path):
    nbs, params = _chain(tmp_path)
    rd = tmp_path / "runs" / "t"
    rd.mkdir(parents=True)
    with open(rd / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunError, match="in use by another"):
            run_chain(params, runs_dir=tmp_path / "runs", notebooks_dir=nbs, progress=False)
        (rd / "manifest.json").write_text(json.dumps({"run_id": "t", "status": "running", "created": "x",
                                                      "steps": {"01_dequant": {"status": "running"}}}))
        assert list_runs(tmp_path / "runs")[0]["status"] == "running"
    assert list_runs(tmp_path / "runs")[0]["status"] == "interrupted"  # nobody holds the lock


def test_cli_run_failure_exit_code_and_runs_listing(tmp_path):
    nbs, params = _chain(tmp_path, fail_02=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(QUANTBOOK + ["run", str(params), "--notebooks", str(nbs), "--runs-dir", str(tmp_path / "runs"),
                                    "--steps", "01", "02"], capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stderr
    assert "02_quantize.ipynb, cell 4 of 5" in r.stderr and "ValueError: boom 8" in r.stderr
    assert f"fix it and rerun: quantbook run {params} --run-id t (completed steps are skipped)" in r.stderr
    assert "hello from 01, attempt 1" in r.stderr  # cell output streamed while it ran
    assert "02_quantize: calibrate" in r.stderr  # the progress bar's step description
    # item 8 of issue 17: papermill's cell bookkeeping and the kernel's own log are not the user's business
    for noise in ("Executing Cell", "Ending Cell", "Input Notebook:", "[IPKernelApp]"):
        assert noise not in r.stderr, noise
    out = subprocess.run(QUANTBOOK + ["runs", "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.splitlines()[0].split() == ["RUN", "STATUS", "STEPS", "CREATED", "STEP", "TIME", "FIDELITY", "NOTE"]
    assert "t  " in out.stdout and "failed" in out.stdout and "01:ok 02:FAILED" in out.stdout


def test_real_chain_01_to_04_on_tiny_then_rerun_skips(tiny_chain):
    """The README's main command on the embedded tiny default (the session's chain run, params/tiny.yaml
    with its paths moved): the repository's four notebooks end to end on CPU, then the same run id
    again runs nothing."""
    m, rd, params = tiny_chain["manifest"], tiny_chain["run_dir"], tiny_chain["params"]
    assert m["status"] == "complete", {k: v.get("error") for k, v in m["steps"].items()}
    names = ["01_dequant", "02_quantize", "03_recover_export", "04_inspect_amax"]
    assert list(m["steps"]) == names
    for n in names:
        assert (rd / f"{n}.ipynb").is_file() and (rd / f"{n}.html").is_file()
    assert (rd / "amax.safetensors").is_file() and (rd / "amax_anomalies.csv").is_file()
    steps_in_memory = {line.split(",")[3] for line in (rd / "memory.csv").read_text().splitlines()[1:]}
    assert {"01_dequant", "02_quantize", "03_recover_export"} <= steps_in_memory
    before = {n: m["steps"][n]["end"] for n in names}
    lines = []
    m2 = run_chain(params, runs_dir=tiny_chain["runs"], progress=False, echo=lines.append)
    assert m2["status"] == "complete" and all("skipped, complete since" in ln for ln in lines)
    assert {n: m2["steps"][n]["end"] for n in names} == before


def test_chain_records_read_right(tiny_chain):
    """Items 7 and 8 of issue 17, on the session's chain: progress bars end at 100% in the executed
    notebooks (widget bars were saved at 0%), no path that no longer exists, no unexplained warning
    box, no table that is a bare header, and papermill's cell bookkeeping is not in run.log."""
    import re

    rd = tiny_chain["run_dir"]

    def outputs(step):
        nb = nbformat.read(str(rd / f"{step}.ipynb"), 4)
        return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]

    def text(outs):
        return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outs)

    for step, bars in (("01_dequant", ["dequant:"]), ("03_recover_export", ["v4-serving:", "verify numbers:"])):
        outs = outputs(step)
        assert not [o for o in outs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})], step
        for bar in bars:
            last = [ln for ln in text(outs).splitlines() if ln.startswith(bar)]
            assert last and "100%" in last[-1], (step, bar, last)
    q = text(outputs("02_quantize"))
    assert ".partial" not in q and "Updated quant_cfg with KV cache quantization" not in q
    assert "step 03 rebuilds the calibrated model from the state" not in q
    assert not [o for o in outputs("02_quantize") if o.get("name") == "stderr" and "is not tested" in o.get("text", "")]
    empty = [o for o in outputs("04_inspect_amax") if re.search(r"<tbody>\s*</tbody>", o.get("data", {}).get("text/html", ""))]
    assert not empty, [str(o["data"].get("text/plain"))[:200] for o in empty]
    log = (rd / "run.log").read_text()
    assert "Executing Cell" not in log and "Ending Cell" not in log and "Input Notebook:" not in log
