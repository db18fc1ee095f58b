"""Notebook 04 at V4 Pro scale in JupyterLab and Chromium: how long Run All and each explorer redraw take.

A run directory with a synthetic amax snapshot in V4 Pro's shape (61 layers x 384 experts, 48,308
quantizers, tests/amax_synth.py) and a full-size sparse V4 Pro export (tests/export_synth.py) as
its step-03 export; step 04 executed by `quantbook run`; then opened the way `quantbook lab` opens
it, in Debian's Chromium through Playwright (tests/lab_browser.py): Run > Run All Cells, then the
amax explorer's layer slider moved (routed w2: a bar per expert) and the export explorer's expert
slider moved, each timed from the key press until the new figure is decoded and the kernel idle.

    .venv/bin/python benchmarks/lab_bench.py [--repeat N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="slider moves timed per explorer")
    ap.add_argument("--out", default=None, help="where the run, export and screenshots go (default: a temporary dir)")
    args = ap.parse_args()

    import yaml

    from amax_synth import make_snapshot
    from browser import find_chromium
    from export_synth import make_sparse_export
    from lab_browser import LabPage, chromium_context
    from quantbook.records.lab import LabServer, lab_notebook
    from quantbook.records.runs import run_chain

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        run = base / "runs" / "pro"
        make_snapshot(run, like="pro", seed=7, inject={"never_routed": [(1, 100)]})
        facts = make_sparse_export(base / "sparse", like="pro", layer=1, block_experts=(0, 7), wide=3,
                                   inject={"outlier": [(30, 200, "w2", "weight_scale_2", 100.0)]})
        # what step 03 records about its export (export.recover.export), as far as notebook 04 reads it
        (run / "export.json").write_text(json.dumps({"settings": {"layout": "v4-serving", "dir": str(facts["export"])},
                                                     "layout_report": {"export": str(facts["export"])}}))
        params = base / "pro.yaml"
        params.write_text(yaml.safe_dump({"name": "pro", "inspect": {"export_layer": 1, "export_expert": 7}}))
        t = time.perf_counter()
        run_chain(params, steps="04", runs_dir=run.parent, progress=False, echo=lambda s: None)
        rows = [("quantbook run --steps 04 (papermill)", time.perf_counter() - t)]
        nb = lab_notebook(run)
        with contextlib.ExitStack() as stack:
            t = time.perf_counter()
            lab = stack.enter_context(LabServer(run))
            context = stack.enter_context(chromium_context(find_chromium()))
            lp = LabPage(context)
            lp.open(lab.url(f"lab/tree/{nb.name}"))
            rows.append(("JupyterLab + Chromium up, notebook open, kernel idle", time.perf_counter() - t))
            t = time.perf_counter()
            state = lp.run_all()
            rows.append(("Run > Run All Cells", time.perf_counter() - t))
            if lp.errors(state):
                raise SystemExit("cells failed:\n" + "\n".join(lp.errors(state)))
            amax = _moves(lp, ".quantbook-amax-explorer", "layer", args.repeat, routed=True)
            export = _moves(lp, ".quantbook-export-explorer", "expert", args.repeat)
            lp.page.locator(".quantbook-export-explorer").screenshot(path=str(base / "export-explorer-pro.png"))
    for what, seconds in rows:
        print(f"  {what:<58} {seconds:7.2f} s")
    for what, times in (("amax explorer: layer -> figure (routed w2, 384 experts)", amax),
                        ("export explorer: expert -> figure", export)):
        print(f"  {what:<58} {statistics.median(times):7.2f} s median, {max(times):.2f} max ({len(times)} moves)")


def _moves(lp, css: str, label: str, n: int, routed: bool = False) -> list[float]:
    """Move an explorer's slider `n` steps right, timing each from the key press to the new figure
    decoded with the kernel idle."""
    widget = lp.page.locator(css)
    el = widget.locator("img.quantbook-figure").element_handle()
    shown = lp.wait_image(el)
    if routed and lp.choose(lp.control(widget, "projection").locator("select"), "routed w2"):
        shown = lp.wait_redrawn(el, shown)
    control, times = lp.control(widget, label), []
    for _ in range(n):
        t = time.perf_counter()
        lp.next_value(control)
        shown = lp.wait_redrawn(el, shown)
        times.append(time.perf_counter() - t)
    return times


if __name__ == "__main__":
    main()
