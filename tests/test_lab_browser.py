"""Inspecting a run as a person does: `quantbook lab`'s notebook in a real JupyterLab, in a real browser.

A copy of the session's tiny chain run is opened the way `quantbook lab RUN` opens it (the lab
notebook beside the record, JupyterLab rooted at the run, autosave off); Debian's headless Chromium,
driven by Playwright with `executable_path` set to the system browser, runs every cell from the Run
menu, then moves the amax explorer's layer slider and checks that the figure changed, pixel by
pixel, and that no cell shows an error. Screenshots go to `test-output/` (or $QUANTBOOK_TEST_OUTPUT):
the README's come from there.

Needs `apt-get install -y chromium` and the `playwright` package (the `test` extra); skipped with
the reason when either is missing, unless QUANTBOOK_REQUIRE_CHROMIUM=1 (CI), which makes that a failure.
"""

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from browser import find_chromium

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path(os.environ.get("QUANTBOOK_TEST_OUTPUT") or REPO / "test-output")

_missing = []
if find_chromium() is None:
    _missing.append("no chromium on PATH (apt-get install -y chromium)")
try:
    import playwright.sync_api  # noqa: F401
except ImportError:
    _missing.append("no playwright package (pip install the `test` extra: .venv/bin/pip install -e '.[test]')")
if _missing:
    if os.environ.get("QUANTBOOK_REQUIRE_CHROMIUM") == "1":
        raise RuntimeError("QUANTBOOK_REQUIRE_CHROMIUM=1 but " + "; ".join(_missing))
    pytest.skip("; ".join(_missing), allow_module_level=True)

from lab_browser import LabPage, chromium_context, pixel_diff  # noqa: E402
from quantbook.records.lab import RECORD, LabServer, kernel_name, lab_notebook  # noqa: E402


@pytest.fixture
def run_copy(tiny_chain, tmp_path):
    """The tiny chain's run directory, copied (the session's run is read-only)."""
    return Path(shutil.copytree(tiny_chain["run_dir"], tmp_path / "runs" / "tiny",
                                ignore=shutil.ignore_patterns(".lock")))


def test_notebook_04_in_jupyterlab(run_copy):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    record = (run_copy / RECORD).read_bytes()
    timings, t0 = {}, time.perf_counter()
    nb = lab_notebook(run_copy)
    with contextlib.ExitStack() as stack:  # unwound on any failure: browser first, then kernels and server
        lab = stack.enter_context(LabServer(run_copy, log_path=OUTPUT / "jupyterlab.log"))
        assert lab.check_kernel(kernel_name(nb)).startswith("Python 3")  # and it runs this interpreter
        docs = lab.api("lab/api/settings/@jupyterlab/docmanager-extension:plugin")
        assert docs["settings"]["autosave"] is False  # the record's copy is never saved behind a user's back
        context = stack.enter_context(chromium_context(find_chromium()))
        lp = LabPage(context)
        stack.callback(lp.save_console, OUTPUT / "browser-console.log")
        try:
            _exercise(lp, lab, nb, timings)
        except BaseException:
            with contextlib.suppress(Exception):
                lp.page.screenshot(path=str(OUTPUT / "failure.png"), full_page=True)
            raise
        t_down = time.perf_counter()
    timings["shutdown"] = time.perf_counter() - t_down
    timings["total"] = time.perf_counter() - t0
    (OUTPUT / "lab-timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1))
    assert (run_copy / RECORD).read_bytes() == record  # the executed record is untouched


def _exercise(lp: LabPage, lab, nb: Path, timings: dict) -> None:
    page = lp.page
    t = time.perf_counter()
    lp.open(lab.url(f"lab/tree/{nb.name}"))
    timings["open"] = time.perf_counter() - t
    # as opened, the record's outputs: the explorer's first view is a figure, not a widget's text
    cell = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text="ia.explorer(run)"))
    assert cell.locator(".jp-OutputArea-output img").count() == 1
    assert "VBox(" not in cell.locator(".jp-OutputArea").inner_text()

    t = time.perf_counter()
    state = lp.run_all()
    timings["run all"] = time.perf_counter() - t
    assert state["kernelName"].startswith("Python 3") and state["path"] == nb.name
    assert not lp.errors(state), "cells failed:\n" + "\n".join(lp.errors(state))
    assert lp.rendered_tracebacks() == 0

    explorer = page.locator(".quantbook-amax-explorer")
    plot = explorer.locator("img.quantbook-figure")
    plot.wait_for(state="visible")
    el = plot.element_handle()
    shown = lp.wait_image(el)
    if lp.choose(lp.control(explorer, "projection").locator("select"), "routed w2"):  # a bar per expert
        shown = lp.wait_redrawn(el, shown)
    layer = lp.control(explorer, "layer")
    before = lp.readout(layer)
    plot.screenshot(path=str(OUTPUT / "explorer-before.png"))
    explorer.screenshot(path=str(OUTPUT / "amax-explorer.png"))

    t = time.perf_counter()
    lp.next_value(layer)
    lp.wait_redrawn(el, shown)
    timings["layer change -> redrawn"] = time.perf_counter() - t
    assert lp.readout(layer) != before
    plot.screenshot(path=str(OUTPUT / "explorer-after.png"))
    changed = pixel_diff(OUTPUT / "explorer-before.png", OUTPUT / "explorer-after.png")
    assert changed > 0.002, f"the figure did not change with the layer ({changed:.2%} of pixels)"
    assert not lp.errors(lp.state()) and lp.rendered_tracebacks() == 0

    export = page.locator(".quantbook-export-explorer")
    lp.wait_image(export.locator("img.quantbook-figure").element_handle())
    export.screenshot(path=str(OUTPUT / "export-explorer.png"))
