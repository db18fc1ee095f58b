"""notebooks/02_quantize.ipynb under papermill on the tiny V4 (CPU), as CI and `quantbook run` run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize_support import tiny_q, write_calib

pytest.importorskip("modelopt")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_quantize.ipynb"


def test_parameters_cell_matches_the_params_section():
    """The chain runner injects the `quantize:` keys and run_dir as notebook parameters."""
    import papermill as pm

    from quantbook.drivers import QUANTIZE_DEFAULTS

    declared = set(pm.inspect_notebook(str(NOTEBOOK)))
    assert declared == set(QUANTIZE_DEFAULTS) | {"run_dir"}


def test_notebook_02_runs_under_papermill(tiny_bf16, tmp_path):
    import nbformat
    import papermill as pm

    from quantbook.runs import choose_kernel

    q = tiny_q(tiny_bf16, tmp_path / "export", write_calib(tmp_path / "calib.jsonl"))
    run_dir = tmp_path / "run"
    out_nb = tmp_path / "02.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out_nb), kernel_name=choose_kernel(), progress_bar=False,
                        parameters={**q, "run_dir": str(run_dir)})
    nb = nbformat.read(out_nb, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "preflight passed" in text
    assert "nvfp4_input_scale_cpu" in text and "status: done" in text
    assert "bad amax repaired before export: 0" in text
    assert "experts never routed: 0" in text
    assert "calibrated state" in text and "step 03 rebuilds" in text
    rec = json.loads((run_dir / "quantize.json").read_text())
    assert rec["status"] == "done" and (tmp_path / "export" / "model.safetensors").is_file()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # token-count heatmap and memory timeline


def test_notebook_02_preflight_refuses_in_seconds(tiny_bf16, tmp_path):
    """A refused setting stops the notebook in the preflight cell, before any model loads."""
    import papermill as pm

    from quantbook.runs import choose_kernel

    q = tiny_q(tiny_bf16, tmp_path / "export", write_calib(tmp_path / "calib.jsonl"),
               hf_ptq={"low_memory_mode": True})
    with pytest.raises(pm.PapermillExecutionError, match="low_memory_mode"):
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "02.ipynb"), kernel_name=choose_kernel(),
                            progress_bar=False, parameters={**q, "run_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run" / "quantize.json").exists()
    assert not (tmp_path / "run" / "memory.csv").exists()
