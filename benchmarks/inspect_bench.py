"""How long reading a V4 Pro-scale calibration takes: step 04 and the serving layout's amax mapping.

A synthetic amax snapshot in V4 Pro's shape (61 layers x 384 experts, ~48,000 quantizers with
modelopt's names, tests/amax_synth.py) and a second one that moved, then, each timed:
loading it for inspection, the library's analysis and figures, the amax explorer's build and its
redraw per control change (what a change costs in the kernel; the browser adds a round trip and
the PNG's decode: benchmarks/lab_bench.py), notebook 04 under papermill with the diff view, and
mapping plus resolving the routed-expert amax the way step 03 does.

    .venv/bin/python benchmarks/inspect_bench.py [--out DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where the snapshots go (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=7, help="explorer redraws timed per kind of change")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import papermill as pm

    from amax_synth import make_snapshot
    from quantbook.amax import load_snapshot
    from quantbook.export import layout
    from quantbook.records import inspect_amax as ia
    from quantbook.records.runs import choose_kernel
    from quantbook.release.format import PRO_CONFIG, load_config

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        a, b = base / "a", base / "b"
        facts = make_snapshot(a, like="pro", seed=7, inject={"never_routed": [(1, 100)]})
        make_snapshot(b, like="pro", seed=7, inject={"outlier": ["model.layers.30.mlp.experts.down_proj_weight_quantizers.200"]})
        rows = []

        t0 = time.perf_counter()
        run = ia.load_run(a)
        rows.append(("load the snapshot", time.perf_counter() - t0))
        t0 = time.perf_counter()
        ia.summary(run), ia.anomalies(run), ia.w13_ratios(run)
        for fn in (ia.plot_histograms, ia.plot_layer_profile, ia.plot_token_counts):
            fn(run).savefig(base / "f.png", dpi=80)
            plt.close("all")
        rows.append(("analysis and figures (library)", time.perf_counter() - t0))
        t0 = time.perf_counter()
        ex = ia.explorer(run)
        rows.append(("amax explorer: build and first draw", time.perf_counter() - t0))
        layers = list(ex.layer_w.options)
        ex.proj_w.value = next(o for o in ex.proj_w.options if o.startswith("routed w2"))  # 384 bars
        changes = {"layer (routed w2, 384 experts)": (ex.layer_w, [layers[(i * 7 + 1) % len(layers)]
                                                                  for i in range(args.repeat)]),
                   "expert": (ex.expert_w, [(i * 37 + 1) % 384 for i in range(args.repeat)]),
                   "role": (ex.role_w, [ex.role_w.options[(i + 1) % len(ex.role_w.options)]
                                        for i in range(args.repeat)]),
                   "projection": (ex.proj_w, [o for _, o in zip(range(args.repeat), ex.proj_w.options)])}
        redraws = {}
        for what, (control, values) in changes.items():
            times = []
            for v in values:
                t = time.perf_counter()
                control.value = v
                times.append(time.perf_counter() - t)
            redraws[what] = times
        t0 = time.perf_counter()
        pm.execute_notebook(str(REPO / "notebooks" / "04_inspect_amax.ipynb"), str(base / "04.ipynb"),
                            kernel_name=choose_kernel(), progress_bar=False,
                            parameters={"run_dir": str(a), "compare_run_dir": str(b)})
        rows.append(("notebook 04 with the diff view (papermill, wall)", time.perf_counter() - t0))
        t0 = time.perf_counter()
        snap, _ = load_snapshot(a / "amax.safetensors")
        cfg = load_config(PRO_CONFIG)
        layout.resolve_amax(layout.expert_amax(snap, cfg), cfg, None)
        rows.append(("step 03: map and resolve the expert amax", time.perf_counter() - t0))

    print(f"{len(facts['names']):,} quantizers (V4 Pro shape)")
    for what, seconds in rows:
        print(f"  {what:<52} {seconds:7.2f} s")
    for what, times in redraws.items():
        print(f"  amax explorer redraw, {what:<31} {statistics.median(times):7.2f} s median, {max(times):.2f} max")


if __name__ == "__main__":
    main()
