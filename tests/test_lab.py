"""`quantbook lab RUN`: the notebook it writes beside a run's record, and the JupyterLab it serves
(REST only here; tests/test_lab_browser.py drives it in a browser)."""

import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from quantbook.errors import RunError
from quantbook.records.lab import LAB_NOTEBOOK, RECORD, kernel_name, lab_notebook, lab_parameters, open_run


@pytest.fixture
def run_copy(tiny_chain, tmp_path):
    return Path(shutil.copytree(tiny_chain["run_dir"], tmp_path / "moved" / "tiny",
                                ignore=shutil.ignore_patterns(".lock")))


def _injected(nb: Path) -> str:
    cells = json.loads(nb.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "injected-parameters" in c["metadata"].get("tags", []))


def test_lab_notebook_points_at_the_run_where_it_is(tiny_chain, run_copy):
    record = (run_copy / RECORD).read_bytes()
    assert f"run_dir = \"{tiny_chain['run_dir']}\"" in _injected(run_copy / RECORD)  # papermill's absolute path
    nb = lab_notebook(run_copy)
    assert nb == run_copy / LAB_NOTEBOOK and (run_copy / RECORD).read_bytes() == record
    src = _injected(nb)
    assert "run_dir = '.'" in src and "fail_on = ['nan', 'inf', 'negative']" in src
    assert str(tiny_chain["run_dir"]) not in src
    lab, rec = json.loads(nb.read_text()), json.loads(record)
    assert kernel_name(nb) == rec["metadata"]["kernelspec"]["name"] and "widgets" not in lab["metadata"]
    # the record's outputs stay: its figures show as soon as the notebook opens
    assert [c.get("outputs") for c in lab["cells"]] == [c.get("outputs") for c in rec["cells"]]
    # the step ran from this directory: relative parameters are read from there
    assert json.loads((run_copy / "manifest.json").read_text())["steps"]["04_inspect_amax"]["cwd"] == os.getcwd()


def test_relative_parameters_become_absolute(tmp_path):
    (tmp_path / "runs" / "older").mkdir(parents=True)
    values = {"run_dir": "/somewhere/else", "compare_run_dir": "runs/older", "fail_on": ["nan"], "note": "runs/none",
              "snapshot": None}
    want = {**values, "run_dir": ".", "compare_run_dir": str(tmp_path / "runs/older")}
    assert lab_parameters(values, tmp_path) == want
    assert lab_parameters(values, None) == {**values, "run_dir": "."}


def test_refuses_a_run_without_notebook_04(tmp_path, capsys):
    with pytest.raises(RunError, match=re.escape(f"{tmp_path / RECORD} not found: step 04 has not run")):
        lab_notebook(tmp_path)
    from quantbook.cli import main

    assert main(["lab", str(tmp_path)]) == 2
    assert "quantbook lab: error:" in capsys.readouterr().err


def test_quantbook_lab_serves_the_run_and_stops(run_copy):
    """The command's own code: served at the printed address with the token, the lab notebook there
    with run_dir '.', autosave off; on stop the server is gone."""
    lines, stop = [], threading.Event()
    t = threading.Thread(target=open_run, args=(run_copy,), kwargs={"echo": lines.append, "stop": stop}, daemon=True)
    t.start()
    try:
        for _ in range(600):
            if any("open:" in x for x in lines) or not t.is_alive():
                break
            stop.wait(0.1)
        text = "\n".join(lines)
        assert "kernel:   Python 3" in text, text
        url = re.search(r"open:\s+(\S+)", text).group(1)
        base, token = re.match(r"(http://127\.0\.0\.1:\d+)/lab/tree/04_inspect_amax\.lab\.ipynb\?token=(\w+)",
                               url).groups()

        def get(path):
            req = urllib.request.Request(f"{base}/{path}", headers={"Authorization": f"token {token}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())

        nb = get(f"api/contents/{LAB_NOTEBOOK}")
        assert nb["type"] == "notebook" and any("run_dir = '.'" in "".join(c["source"]) for c in nb["content"]["cells"])
        assert get("lab/api/settings/@jupyterlab/docmanager-extension:plugin")["settings"]["autosave"] is False
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/api/contents/{LAB_NOTEBOOK}", timeout=30)  # no token, no notebook
    finally:
        stop.set()
        t.join(timeout=90)
    assert not t.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/api/status", timeout=5)
