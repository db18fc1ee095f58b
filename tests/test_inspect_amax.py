"""Amax inspection: every injected anomaly is listed by name, in the library and in notebook 04
executed by papermill through `quantbook run`, also at V4 Pro scale (~48,000 quantizers)."""

import time
from pathlib import Path

import matplotlib
import nbformat
import pandas as pd
import pytest
import yaml

matplotlib.use("Agg")

from amax_synth import make_snapshot  # noqa: E402
from quantbook.amax import parse_quantizer  # noqa: E402
from quantbook.records import inspect_amax as ia  # noqa: E402
from quantbook.records.runs import load_manifest, run_chain  # noqa: E402

NB04 = Path(__file__).resolve().parents[1] / "notebooks" / "04_inspect_amax.ipynb"
L = "model.layers."
INJECT = {
    "missing": [f"{L}4.mlp.experts.gate_up_proj_weight_quantizers.3", f"{L}1.self_attn.q_b_proj.input_quantizer"],
    "zero": [f"{L}2.mlp.experts.down_proj_weight_quantizers.5"],
    "nan": [f"{L}3.mlp.experts.gate_up_proj_input_quantizer"],
    "inf": [f"{L}5.self_attn.kv_proj.weight_quantizer"],
    "negative": [f"{L}0.mlp.shared_experts.up_proj.input_quantizer"],
    "outlier": [f"{L}5.mlp.experts.down_proj_weight_quantizers.11"],
    "never_routed": [(0, 2), (4, 9)],
}


def _expected():
    exp = {(cat, n) for cat, names in INJECT.items() if cat != "never_routed" for n in names}
    exp |= {("never routed", f"layers.{li}.ffn.experts.{e}") for li, e in INJECT["never_routed"]}
    return exp


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    d = tmp_path_factory.mktemp("inj") / "run"
    make_snapshot(d, like="pro", layers=6, experts=16, seed=3, inject=INJECT)
    return d


def test_native_names_parse():
    q = parse_quantizer("layers.7.ffn.experts.12.w3.weight_quantizer")
    assert (q.kind, q.role, q.layer, q.expert, q.projs, q.native) == (
        "routed_expert", "weight", 7, 12, ("w3",), "layers.7.ffn.experts.12.w3")
    q = parse_quantizer("layers.7.ffn.experts.w2.input_quantizer")
    assert (q.kind, q.role, q.expert, q.projs) == ("routed_expert", "input", None, ("w2",))
    q = parse_quantizer("model.layers.2.mlp.experts.gate_up_proj_weight_quantizers.3")
    assert (q.projs, ia.quantizer_group(q.kind, q.projs, q.role)) == (("w1", "w3"), "routed w1+w3")


def test_every_injected_anomaly_is_listed(injected):
    run = ia.load_run(injected)
    assert run.num_hash_layers == 3 and run.hash_source == "snapshot metadata" and run.quantizer_list
    anom = ia.anomalies(run, outlier_factor=8.0)
    got = set(zip(anom["category"].astype(str), anom["name"]))
    assert got == _expected()  # each one, and nothing else on clean random values
    row = anom[anom["category"] == "outlier"].iloc[0]
    assert "median" in row["detail"] and "routed w2 per expert" in row["detail"] and row["value"] > 1
    assert anom.loc[anom["category"] == "negative", "value"].iloc[0] < 0
    nr = anom[anom["category"] == "never routed"]
    assert list(nr["layer_group"]) == ["hash-routed", "score-routed"]
    s = ia.summary(run).set_index(["group", "role"])
    assert s.loc[("routed w1+w3", "weight"), "missing"] == 1 and s.loc[("attention", "input"), "missing"] == 1
    assert s.loc[("routed w1+w3", "input"), "nan"] == 1 and s.loc[("routed w2", "weight"), "zero"] == 1
    assert s.loc[("routed w2", "weight"), "quantizers"] == 6 * 16


def test_missing_without_quantizer_list_is_inferred_for_experts(tmp_path):
    make_snapshot(tmp_path, like="pro", layers=4, experts=8, inject={
        "missing": [f"{L}2.mlp.experts.down_proj_weight_quantizers.6", f"{L}3.mlp.experts.down_proj_input_quantizer",
                    f"{L}1.self_attn.q_a_proj.weight_quantizer"]}, list_quantizers=False, hash_in_meta=False)
    run = ia.load_run(tmp_path, num_hash_layers=2)
    assert run.hash_source == "parameter num_hash_layers"
    missing = set(ia.anomalies(run).query("category == 'missing'")["name"])
    # experts are implied by their siblings; an attention quantizer absent everywhere is not (said in notes)
    assert missing == {f"{L}2.mlp.experts.down_proj_weight_quantizers.6", f"{L}3.mlp.experts.down_proj_input_quantizer"}
    assert any("lists no enabled quantizers" in n for n in run.notes)
    assert ia.load_run(tmp_path).num_hash_layers is None  # unknown, and said so
    assert "unknown" in ia.load_run(tmp_path).hash_source


def test_step_02_metadata(tmp_path):
    """What state.post_calibration writes: a count of quantizers, its own pre-repair findings by
    name, the model path (whose config.json gives num_hash_layers)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hash_layers": 2}')
    gone = f"{L}1.self_attn.kv_proj.input_quantizer"
    make_snapshot(tmp_path / "run", like="pro", layers=4, experts=8, list_quantizers=False, hash_in_meta=False,
                  inject={"missing": [gone]}, meta_extra={"quantizers": 123, "model_path": str(model),
                                                          "amax_problems_before_repair": {gone: "missing"}})
    run = ia.load_run(tmp_path / "run")
    assert (run.num_hash_layers, run.hash_source) == (2, str(model / "config.json"))
    assert list(ia.anomalies(run).query("category == 'missing'")["name"]) == [gone]


def test_w13_ratio_separate_and_fused(tmp_path, injected):
    make_snapshot(tmp_path, like="pro", layers=4, experts=8, native_w13=True, inject={"w13": [(2, 5, 3.0)]})
    run = ia.load_run(tmp_path)
    ratios, note = ia.w13_ratios(run)
    sep = ratios[~ratios["fused"].astype(bool)]
    assert (sep["role"] == "weight").sum() == 4 * 8 and (sep["role"] == "input").sum() == 4  # shared inputs
    assert "separate w1 and w3" in note
    sep = sep[sep["role"] == "weight"]
    assert sep.set_index(["layer", "expert"]).loc[(2, 5), "ratio"] == pytest.approx(3.0, rel=1e-6)
    anom = ia.anomalies(run, w13_ratio_threshold=2.0)
    assert list(anom.loc[anom["category"] == "w1/w3 ratio", "native"]) == ["layers.2.ffn.experts.5.w1/w3"]
    fused, note = ia.w13_ratios(ia.load_run(injected))
    assert fused["fused"].all() and (fused["ratio"] == 1.0).all() and "by construction" in note
    fig = ia.plot_w13_ratios(ratios, 2.0)
    assert fig.axes[0].patches and fig.axes[0].lines[0].get_xdata()[0] == 2.0  # the threshold line


def test_diff_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_snapshot(a, like="pro", layers=4, experts=8, seed=5)
    moved = [f"{L}1.mlp.experts.gate_up_proj_weight_quantizers.2", f"{L}3.self_attn.o_b_proj.input_quantizer"]
    make_snapshot(b, like="pro", layers=4, experts=8, seed=5,
                  inject={"outlier": moved, "missing": [f"{L}0.self_attn.q_a_proj.input_quantizer"]})
    d = ia.diff_runs(ia.load_run(a), ia.load_run(b), moved_threshold=0.05)
    assert set(d.loc[d["status"] == "moved", "name"]) == set(moved)
    assert d.loc[d["status"] == "moved", "ratio"].tolist() == pytest.approx([50.0, 50.0], rel=1e-5)
    assert list(d.loc[d["status"] == "only in A", "name"]) == [f"{L}0.self_attn.q_a_proj.input_quantizer"]
    back = ia.diff_runs(ia.load_run(b), ia.load_run(a))
    only_b = back[back["status"] == "only in B"]
    assert list(only_b["name"]) == [f"{L}0.self_attn.q_a_proj.input_quantizer"]
    assert list(only_b[["group", "role", "layer"]].iloc[0]) == ["attention", "input", 0]
    s = ia.diff_summary(d).set_index(["group", "role"])
    assert s.loc[("routed w1+w3", "weight"), "moved"] == 1 and s.loc[("attention", "input"), "only in A"] == 1
    assert ia.plot_diff(d) is not None


def test_notebook_04_pieces(injected, tmp_path):
    """What notebook 04 displays and decides, as library calls: the run's facts, anomaly counts and
    tables (cut at max_rows, all of them in the CSV), the fail_on verdict, the second run to diff."""
    from quantbook.errors import AmaxError

    run = ia.load_run(injected)
    facts = ia.describe(run)["value"]
    assert facts["hash-routed layers"] == "3 (from snapshot metadata)"
    assert facts["token counts"] == "6 layers x 16 experts" and facts["enabled quantizers listed by step 02"] == "yes"
    anom = ia.anomalies(run)
    counts = ia.anomaly_counts(anom)
    assert list(counts.columns) == list(ia.CATEGORIES) and counts.loc["count", "never routed"] == 2
    tables = dict(ia.anomaly_tables(anom, max_rows=1))
    assert set(tables) == {"missing: 2 (first 1 shown; all in amax_anomalies.csv)", "zero: 1", "nan: 1", "inf: 1",
                           "negative: 1", "outlier: 1", "never routed: 2 (first 1 shown; all in amax_anomalies.csv)"}
    assert all(len(t) == 1 for t in tables.values())
    csv = pd.read_csv(ia.write_anomalies(anom, tmp_path), keep_default_na=False)
    assert set(zip(csv["category"], csv["name"])) == _expected() and not list(tmp_path.glob(".*.tmp"))
    ia.check_fail_on(anom, [])
    ia.check_fail_on(anom, ["w1/w3 ratio"])  # none of those here
    with pytest.raises(AmaxError, match=r"amax anomalies in \['inf', 'nan'\] \(fail_on\): inf: "
                                        r"model.layers.5.self_attn.kv_proj.weight_quantizer; nan: "):
        ia.check_fail_on(anom, ["nan", "inf"])
    assert ia.load_compare(injected).path == ia.load_compare(injected / "amax.safetensors").path == run.path
    assert ia.plot_w13_ratios(ia.w13_ratios(run)[0], 2.0) is None  # fused w1/w3: nothing to plot


def test_figures_and_explorer(injected, tmp_path):
    import matplotlib.pyplot as plt

    make_snapshot(tmp_path / "four", like="pro", layers=4, experts=8, seed=1)  # the tiny chain's 4 layers
    fig = ia.plot_layer_profile(ia.load_run(tmp_path / "four"))
    for ax in fig.axes:  # whole-number layer ticks only (issue 17 item 7: 0.5-layer ticks on 4 layers)
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    run = ia.load_run(injected)
    fig = ia.plot_histograms(run)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == list(ia.HIST_GROUPS)
    assert [ax.get_ylabel().split("\n")[0] for ax in fig.axes[::4]] == ["hash-routed", "score-routed"]
    assert ia.plot_layer_profile(run) is not None
    fig = ia.plot_token_counts(run)
    assert "never routed in red: 2 of 96" in fig.axes[0].get_title()
    plt.close("all")


def test_explorer(injected):
    """One draw per change (a layer whose projection list differs included), the chosen quantizers'
    names and amax from the table, the current view as PNG in the display bundle, no pyplot figure."""
    import base64

    import matplotlib.pyplot as plt

    run = ia.load_run(injected)
    ex = ia.explorer(run)
    assert ex.draws == 1 and list(ex.layer_w.options) == list(range(6)) and ex.expert_w.max == 15
    by_layer = {L: set(ex.views.projections[L]) for L in ex.layer_w.options}
    a, b = next((a, b) for a in by_layer for b in by_layer if by_layer[a] - by_layer[b])
    ex.layer_w.value = a
    ex.proj_w.value = sorted(by_layer[a] - by_layer[b])[0]  # a projection layer b does not have
    draws, png = ex.draws, ex.png()
    ex.layer_w.value = b
    assert ex.draws == draws + 1 and ex.proj_w.value == ex.views.projections[b][0] and ex.png() != png
    ex.layer_w.value = 4
    ex.proj_w.value = next(o for o in ex.proj_w.options if o.startswith("routed w2"))
    ex.expert_w.value = 9
    amax = run.amax.set_index("name")["amax"]
    weight, shared = f"{L}4.mlp.experts.down_proj_weight_quantizers.9", f"{L}4.mlp.experts.down_proj_input_quantizer"
    assert [r[0] for r in ex.rows] == [weight, shared] and all(r[2] == amax[r[0]] for r in ex.rows)
    assert all(n in ex.text.value for n in (weight, shared))
    assert ex.fig.axes[0].get_xlabel() == "expert"  # a bar per expert, the chosen one red
    draws = ex.draws
    ex.role_w.value = "input"  # the experts' shared input quantizer: one per layer, drawn across layers
    assert ex.draws == draws + 1 and ex.fig.axes[0].get_xlabel() == "layer" and ex.rows[0][0] == shared
    bundle = ex._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]) == ex.png() and ex.png().startswith(b"\x89PNG")
    assert "layer 4, routed w2" in bundle["text/plain"] and "application/vnd.jupyter.widget-view+json" in bundle
    assert plt.get_fignums() == []


def _outputs_text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", ""))
            parts.append(o.get("data", {}).get("text/html", ""))
            parts.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_notebook_04_lists_each_anomaly_through_the_chain(injected, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"name": "insp", "inspect": {"outlier_factor": 8.0, "fail_on": []}}))
    runs = injected.parent
    from quantbook.records.memory import MemorySampler

    with MemorySampler(injected, step="02_quantize", interval=0.05) as mem:  # what steps 01-03 leave
        with mem.phase("calibrate"):
            time.sleep(0.2)
    m = run_chain(params, steps=["04"], run_id=injected.name, runs_dir=runs, progress=False, echo=lambda s: None)
    assert m["steps"]["04_inspect_amax"]["status"] == "complete"
    nb = nbformat.read(str(injected / "04_inspect_amax.ipynb"), 4)
    text = _outputs_text(nb)
    for cat, name in _expected():
        assert name in text, (cat, name)
    csv = pd.read_csv(injected / "amax_anomalies.csv", keep_default_na=False)
    assert set(zip(csv["category"], csv["name"])) == _expected()
    assert "3 (from snapshot metadata)" in text  # hash-routed layers, and where that came from
    pngs = [o["data"]["image/png"] for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 5  # histograms, layer profile, token heat map, memory timeline, the explorer's first view
    explorer = [o for c in nb.cells if "ia.explorer(run)" in c.source for o in c.outputs]
    assert len(explorer) == 1 and explorer[0]["data"]["image/png"] == pngs[-1]
    assert "widgets" not in nb.metadata  # no saved widget state: nbconvert renders the PNG, not an empty widget view
    assert "no export.json" in text  # no step 03 in this run: the export view says why it shows nothing
    assert "no memory.csv" not in text and "no second run given" in text
    html = (injected / "04_inspect_amax.html").read_text()
    assert all(p.strip()[:200] in html for p in pngs)  # every static figure is in the HTML copy

    # fail_on turns chosen categories into a failed step that names them
    params.write_text(yaml.safe_dump({"name": "insp", "inspect": {"fail_on": ["nan", "missing"]}}))
    from quantbook.errors import StepFailed

    with pytest.raises(StepFailed, match=r"AmaxError: amax anomalies in \['missing', 'nan'\]"):
        run_chain(params, steps=["04"], run_id=injected.name, runs_dir=runs, redo=["04"], progress=False,
                  echo=lambda s: None)
    assert load_manifest(injected)["steps"]["04_inspect_amax"]["status"] == "failed"


def test_v4_pro_scale_snapshot(pro_snapshot, tmp_path):
    """~48,000 quantizers (61 layers x 384 experts) through the library and the notebook, with a
    diff against a second run; how long it takes is benchmarks/inspect_bench.py's to measure."""
    import matplotlib.pyplot as plt
    import papermill as pm

    a, facts = pro_snapshot
    b = tmp_path / "b"
    moved = [f"{L}30.mlp.experts.down_proj_weight_quantizers.200"]
    make_snapshot(b, like="pro", seed=7, inject={"outlier": moved})
    assert len(facts["names"]) > 48_000

    run = ia.load_run(a)
    assert ia.summary(run)["quantizers"].sum() == run.amax["name"].nunique() == len(facts["names"])
    nr = ia.never_routed(run)
    assert list(zip(nr["layer"], nr["expert"])) == [(1, 100)]
    for fn in (ia.plot_histograms, ia.plot_layer_profile, ia.plot_token_counts):
        fn(run).savefig(tmp_path / "f.png", dpi=80)
        plt.close("all")

    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(NB04), str(out), kernel_name="python3", progress_bar=False,
                        parameters={"run_dir": str(a), "compare_run_dir": str(b)})
    text = _outputs_text(nbformat.read(str(out), 4))
    assert f"{len(facts['names']):,} quantizers" in text
    assert moved[0] in text and "layers.1.ffn.experts.100" in text


def test_token_counts_and_repairs_files(tmp_path):
    (tmp_path / "expert_token_counts.json").write_text(
        '{"layers.1": [0, 5, 7], "layers.0": [3, 0], "mtp.0": [9, 9, 9]}')
    counts, layers = ia.load_token_counts(tmp_path / "expert_token_counts.json")
    assert layers == [0, 1] and counts.tolist() == [[3, 0, -1], [0, 5, 7]]  # -1: no such expert in the file
    (tmp_path / "quantize.json").write_text('{"status": "done", "post_calibration": {"amax_repairs": ['
                                            '{"quantizer": "q1", "problem": "zero", "values": [0.0], '
                                            '"replacement": 4.5, "fallback": "largest of 3"}]}}')
    rep = ia.load_repairs(tmp_path)
    assert rep.to_dict("records") == [{"quantizer": "q1", "problem": "zero", "values": [0.0], "replacement": 4.5,
                                       "fallback": "largest of 3"}]
    assert ia.load_repairs(tmp_path / "nowhere").empty
