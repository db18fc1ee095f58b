"""notebooks/02_quantize.ipynb under papermill on the tiny V4 (CPU), as CI and `quantbook run` run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import requires
from quantize_support import tiny_q, write_calib

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_quantize.ipynb"


def test_parameters_cell_matches_the_params_section():
    """The chain runner injects the `quantize:` keys, run_dir and the `export:` section (which the
    streaming driver writes along its pass) as notebook parameters."""
    import papermill as pm

    from quantbook.calibrate.settings import QUANTIZE_DEFAULTS

    declared = set(pm.inspect_notebook(str(NOTEBOOK)))
    assert declared == set(QUANTIZE_DEFAULTS) | {"run_dir", "export"}


def test_notebook_02_in_the_chain(tiny_chain):
    """Step 02 of the session's chain run: every cell ran; the tables and figures it shows come from
    the library functions tested in test_quantize_report.py."""
    import nbformat

    run_dir = tiny_chain["run_dir"]
    nb = nbformat.read(run_dir / "02_quantize.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]
    assert not [c for c in code if "def " in c.source]  # the notebook orchestrates; the library computes
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in code for o in c.outputs)
    assert "status: done" in text and "nvfp4_input_scale_cpu" in text
    assert "bad amax repaired before export: 0" in text and "experts never routed: 0" in text
    rec = json.loads((run_dir / "quantize.json").read_text())
    assert rec["status"] == "done" and (tiny_chain["generic"] / "model.safetensors").is_file()
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # token-count heatmap and memory timeline


def test_notebook_02_preflight_refuses_before_loading(tiny_bf16, tmp_path):
    """A refused setting stops the notebook in the preflight cell, before any model loads."""
    import papermill as pm

    from quantbook.records.runs import choose_kernel

    q = tiny_q(tiny_bf16, tmp_path / "export", write_calib(tmp_path / "calib.jsonl"),
               hf_ptq={"low_memory_mode": True})
    with pytest.raises(pm.PapermillExecutionError, match="low_memory_mode"):
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "02.ipynb"), kernel_name=choose_kernel(),
                            progress_bar=False, parameters={**q, "run_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run" / "quantize.json").exists()
    assert not (tmp_path / "run" / "memory.csv").exists()
