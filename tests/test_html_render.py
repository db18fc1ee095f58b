"""The HTML copy of an executed notebook renders in a real browser with its figures decoded.

Needs headless Chromium (`apt-get install -y chromium`). Skipped when it is absent, unless
QUANTBOOK_REQUIRE_CHROMIUM=1 (CI sets it), which turns the absence into a failure.
"""

import os

import numpy as np
import pytest
import yaml

from amax_synth import make_snapshot
from browser import find_chromium, render_report, screenshot
from quantbook.records.memory import MemorySampler
from quantbook.records.runs import run_chain

if find_chromium() is None:
    if os.environ.get("QUANTBOOK_REQUIRE_CHROMIUM") == "1":
        raise RuntimeError("QUANTBOOK_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install -y chromium)")
    pytest.skip("no chromium on PATH (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "html"
    make_snapshot(run, like="pro", layers=5, experts=16, seed=11, inject={
        "zero": ["model.layers.3.mlp.experts.down_proj_weight_quantizers.4"], "never_routed": [(1, 3)]})
    with MemorySampler(run, step="02_quantize", interval=0.05) as mem:
        with mem.phase("calibrate"):
            pass
    params = run.parent / "p.yaml"
    params.write_text(yaml.safe_dump({"name": "html", "inspect": {"interactive": True}}))
    run_chain(params, steps="04", runs_dir=run.parent, progress=False, echo=lambda s: None)
    return run / "04_inspect_amax.html"


def test_report_figures_decode_in_chromium(report):
    dom, facts = render_report(report)
    # histograms, layer profile, token heat map, memory timeline, the explorer's first view: all decoded
    assert facts["images"] == 5 and facts["decoded"] == 5, facts
    assert all(w > 300 and h > 150 for w, h in facts["sizes"]), facts
    assert "Anomalies by name" in dom and "model.layers.3.mlp.experts.down_proj_weight_quantizers.4" in dom
    assert "layers.1.ffn.experts.3" in dom
    # the explorer's place holds a figure (its static first view), not an empty widget output
    explore = dom.index("Explore the amax")
    assert explore < dom.find("<img", explore) < dom.index("The export's scales")


def test_report_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    png = screenshot(report, tmp_path / "shot.png", height=3000)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (3000, 1280)
    ink = (img < 200).any(axis=2).mean()
    colors = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.02 and colors > 100, (ink, colors)  # text, tables and colour figures, not a white page
