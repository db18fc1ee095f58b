"""How long notebook 04's export view takes on a full-size V4 Pro export: headers and shown tensors only.

A v4-serving export of V4 Pro's real shape (64 shards, 61 layers x 384 experts, 145,116 release
tensors) written as sparse files beside its sparse release (tests/export_synth.py): every
`weight_scale_2` and `input_scale` filled, and two experts of one layer with real block scales and
release exponents. Then, each timed as the notebook runs it: opening the export, reading every
expert projection's scales (70,272 x 2), the anomalies, the per-layer summary and profile figure,
one expert's block scales with re-quantized blocks, the explorer's build and a redraw.

    .venv/bin/python benchmarks/export_view_bench.py [--out DIR] [--repeat N]
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
    ap.add_argument("--out", default=None, help="where the sparse release and export go (default: a temporary dir)")
    ap.add_argument("--repeat", type=int, default=5, help="explorer redraws to time")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from export_synth import make_sparse_export
    from quantbook.records import inspect_export as ie

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        t0 = time.perf_counter()
        facts = make_sparse_export(base, like="pro", layer=1, block_experts=(0, 7), wide=3,
                                   inject={"outlier": [(30, 200, "w2", "weight_scale_2", 100.0)]})
        made = time.perf_counter() - t0
        rows = []

        def timed(what, fn):
            t = time.perf_counter()
            out = fn()
            rows.append((what, time.perf_counter() - t))
            return out

        ex = timed("open the export (index, config, manifest)", lambda: ie.open_export(facts["export"]))
        table = timed("every expert's weight_scale_2 + input_scale (64 headers)", lambda: ie.scale_table(ex))
        anom = timed("anomalies by name", lambda: ie.scale_outliers(table))
        timed("per-layer summary", lambda: ie.scale_summary(table))
        timed("profile figure (PNG)", lambda: ie.plot_scale_profile(table, anom).savefig(base / "p.png", dpi=80))
        plt.close("all")
        blocks = timed("one expert's block scales + release exponents", lambda: ie.expert_blocks(ex, 1, 7))
        timed("block heat maps (PNG)", lambda: ie.plot_expert_blocks(blocks).savefig(base / "b.png", dpi=80))
        plt.close("all")
        x = timed("explorer: build and first draw", lambda: ie.explorer(ex, table, anom, layer=1, expert=7))
        redraws = []
        for i in range(args.repeat):
            t = time.perf_counter()
            x.expert_w.value = (0, 7)[i % 2]
            redraws.append(time.perf_counter() - t)
        layers = []
        for i in range(args.repeat):
            t = time.perf_counter()
            x.layer_w.value = (2, 1)[i % 2]
            layers.append(time.perf_counter() - t)
    total = sum(s for _, s in rows)
    print(f"sparse V4 Pro export written in {made:.1f} s (not part of the view)")
    for what, seconds in rows:
        print(f"  {what:<58} {seconds:7.2f} s")
    print(f"  {'the notebook section (all of the above)':<58} {total:7.2f} s")
    print(f"  {'explorer redraw, expert change (median / max)':<58} {statistics.median(redraws):7.2f} / "
          f"{max(redraws):.2f} s")
    print(f"  {'explorer redraw, layer change (median / max)':<58} {statistics.median(layers):7.2f} / "
          f"{max(layers):.2f} s")


if __name__ == "__main__":
    main()
