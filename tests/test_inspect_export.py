"""The export view: every expert's weight_scale_2 and input_scale with anomalies by name, one expert's
block scales with the blocks that were re-quantized, on real exports (the tiny chain's, a cast one
with blocks too far apart to be carried) and on a full-size V4 Pro export made of sparse files."""

import json
import shutil

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from export_synth import make_sparse_export  # noqa: E402
from quantbook.errors import FormatError  # noqa: E402
from quantbook.export.layout import MANIFEST, write_serving_layout  # noqa: E402
from quantbook.records import inspect_export as ie  # noqa: E402
from quantbook.release.format import PROJS  # noqa: E402
from quantbook.release.shards import Checkpoint  # noqa: E402

LOSSY = "layers.1.ffn.experts.2.w3"  # the cast export's projection with blocks 20 binades below the rest
N_LOSSY = 5


@pytest.fixture(scope="module")
def cast_export(tiny_src, tmp_path_factory):
    """The tiny release with 5 blocks of one projection 20 binades below its largest, exported with the
    lossless cast by the real writer: those 5 blocks are re-quantized, every other one is carried."""
    from ckpt_edit import copy_checkpoint, rewrite_shard
    from layout_helpers import native_snapshot

    base = tmp_path_factory.mktemp("cast")
    src = copy_checkpoint(tiny_src, base / "src")

    def edit(items):
        for item in items:
            if item[0] == f"{LOSSY}.scale":
                a = bytearray(item[3])
                a[:N_LOSSY] = bytes([max(a) - 20]) * N_LOSSY
                item[3] = bytes(a)
        return items

    rewrite_shard(src, Checkpoint(src).weight_map[f"{LOSSY}.scale"], edit)
    report = write_serving_layout(src, native_snapshot(src), base / "export", cast_mxfp4_to_nvfp4=True,
                                  progress=False)
    return {"src": src, "export": base / "export", "report": report}


@pytest.fixture(scope="module")
def pro_export(tmp_path_factory):
    """A full-size V4 Pro export (sparse files) with anomalies injected by name."""
    inject = {"outlier": [(30, 200, "w2", "weight_scale_2", 100.0), (12, 5, "w1", "input_scale", 1 / 50)],
              "zero": ["layers.5.ffn.experts.9.w2.input_scale"],
              "missing": ["layers.7.ffn.experts.3.w2.input_scale"], "w13": [(2, 11)]}
    facts = make_sparse_export(tmp_path_factory.mktemp("pro"), like="pro", layer=1, block_experts=(0, 7), wide=3,
                               inject=inject)
    return facts, inject


def test_the_chain_export(tiny_chain):
    """The tiny chain's export, found from its run directory; read values equal the stored tensors."""
    ex, note = ie.open_run_export(tiny_chain["run_dir"])
    assert ex.path == tiny_chain["export"] and "export.json" in note
    assert ex.cast is True and ex.source.resolve() == tiny_chain["src"].resolve() and not ex.notes  # the default
    facts = ie.describe(ex)["value"]
    assert facts["routed experts"] == "4 layers x 8 experts x 3 projections" and "lossless" in facts["weights"]
    blocks_in_all = 4 * 8 * (2 * 128 * 256 // 32 + 256 * 128 // 32)  # w1, w3: [128, 256]; w2: [256, 128]
    assert facts["lossless 32-blocks (manifest)"] == f"{blocks_in_all:,} of {blocks_in_all:,}"
    t = ie.scale_table(ex)
    assert len(t) == 4 * 8 * 3 and (t["missing"] == "").all()
    ck = Checkpoint(tiny_chain["export"])
    for r in t.sample(12, random_state=0).itertuples():
        for s in ie.SCALES:
            assert getattr(r, s) == float(ck.tensor(f"{r.prefix}.{s}"))
    w13 = [t.loc[t["proj"] == p, "weight_scale_2"].to_numpy() for p in ("w1", "w3")]
    assert (w13[0] == w13[1]).all()
    assert ie.scale_outliers(t).empty  # a healthy export
    summary = ie.scale_summary(t)
    assert summary.shape[0] == 12 and (summary["experts"] == 8).all()
    blocks = ie.expert_blocks(ex, 2, 5)
    assert list(blocks) == ["w1", "w3", "w2"]
    for p, b in blocks.items():
        assert np.array_equal(b.weight_scale, ck.tensor(f"layers.2.ffn.experts.5.{p}.weight_scale").float().numpy())
        assert not b.requantized.any() and b.requantized.shape == (b.weight_scale.shape[0], b.weight_scale.shape[1] // 2)
    assert (ie.blocks_table(blocks)["re-quantized"] == 0).all()  # the tiny release's exponents all carry


def test_lossless_and_requantized_blocks(cast_export):
    """With the cast, exactly the blocks the writer could not carry are marked, and they add up to
    the writer's own count."""
    ex = ie.open_export(cast_export["export"])
    assert ex.cast is True and ex.source == cast_export["src"].resolve()
    total = 0
    for layer in ex.layers:
        for expert in range(ex.n_experts):
            for p, b in ie.expert_blocks(ex, layer, expert).items():
                assert "lossless cast" in b.why
                total += int(b.requantized.sum())
                if b.prefix == LOSSY:
                    want = np.zeros_like(b.requantized)
                    want.flat[:N_LOSSY] = True
                    assert np.array_equal(b.requantized, want)
                else:
                    assert not b.requantized.any(), b.prefix
    assert total == cast_export["report"]["cast"]["lossy"] == N_LOSSY
    # carried blocks keep the released codes byte for byte, re-quantized ones are the ones that may not
    released = Checkpoint(cast_export["src"]).tensor(f"{LOSSY}.weight").view(torch.uint8).reshape(-1, 16)
    codes = Checkpoint(cast_export["export"]).tensor(f"{LOSSY}.weight").view(torch.uint8).reshape(-1, 16)
    carried = ~torch.from_numpy(ie.expert_blocks(ex, 1, 2)["w3"].requantized.reshape(-1))
    assert torch.equal(codes[carried], released[carried])


def test_marks_refused_for_another_release(cast_export, tmp_path):
    """Marks come only from the release the export was cast from: another one's exponents do not
    give the export's weight_scale_2, and the view says so instead of marking."""
    from quantbook.release.tiny import make_tiny

    other = make_tiny(tmp_path / "other", seed=5)
    ex = ie.open_export(cast_export["export"], source=other)
    why = {b.why for layer in ex.layers for b in ie.expert_blocks(ex, layer, 0).values() if b.requantized is None}
    assert why and all("another release" in w for w in why)


def test_without_manifest_or_release(cast_export, tmp_path):
    moved = shutil.copytree(cast_export["export"], tmp_path / "moved")
    m = json.loads((moved / MANIFEST).read_text())
    m["source"] = str(tmp_path / "gone")
    (moved / MANIFEST).write_text(json.dumps(m))
    ex = ie.open_export(moved)
    assert ex.source is None and "not on this machine" in ex.notes[0]
    assert all(b.requantized is None and "not on this machine" in b.why for b in ie.expert_blocks(ex, 0, 0).values())
    (moved / MANIFEST).write_text('{"kind": "quantbook.layout", "opt')  # cut short
    ex = ie.open_export(moved)
    assert ex.cast is None and "lossless and re-quantized blocks cannot be told apart" in ex.notes[0]
    assert all(b.requantized is None for b in ie.expert_blocks(ex, 0, 0).values())


def test_finding_the_export(tiny_chain, tmp_path):
    assert ie.open_run_export(tmp_path)[0] is None and "no export.json" in ie.open_run_export(tmp_path)[1]
    rec = json.loads((tiny_chain["run_dir"] / "export.json").read_text())
    gone = {**rec, "layout_report": {**rec["layout_report"], "export": str(tmp_path / "x")},
            "settings": {**rec["settings"], "dir": str(tmp_path / "x")}}
    (tmp_path / "export.json").write_text(json.dumps(gone))
    ex, note = ie.open_run_export(tmp_path)
    assert ex is None and "is not on this machine: pass export_dir" in note
    ex, note = ie.open_run_export(tmp_path, export_dir=tiny_chain["export"])
    assert ex.path == tiny_chain["export"] and "parameter export_dir" in note
    (tmp_path / "export.json").write_text(json.dumps({**rec, "settings": {**rec["settings"], "layout": "generic"}}))
    assert "reads the v4-serving layout" in ie.open_run_export(tmp_path)[1]
    with pytest.raises(FormatError, match="not a v4-serving export"):
        ie.open_export(tiny_chain["generic"])  # modelopt's own export of the transformers model


def test_reported_counts_are_read_when_listed():
    """A writer that lists re-quantized blocks per tensor (issue 10's report) is read, in either form."""
    per_tensor = {"layers.0.ffn.experts.1.w3.weight": 2, "layers.0.ffn.experts.2.w1": {"lossy": 1}}
    m = {"report": {"cast": {"blocks": 10, "lossless": 7, "lossy": 3}, "requantized_blocks": per_tensor}}
    assert ie.reported_requantized(m) == {"layers.0.ffn.experts.1.w3.weight": 2, "layers.0.ffn.experts.2.w1": 1}
    assert ie.reported_requantized({"report": {"cast": {"blocks": 10}}}) == {} == ie.reported_requantized({})


def test_v4_pro_scale_export(pro_export):
    """61 layers x 384 experts from sparse files: every injected anomaly named, nothing else; one
    expert's blocks marked as constructed; figures and the explorer drawn (timing: benchmarks/)."""
    import matplotlib.pyplot as plt

    facts, inject = pro_export
    ex = ie.open_export(facts["export"])
    assert (len(ex.layers), ex.n_experts, ex.cast, ex.source) == (61, 384, True, facts["release"])
    t = ie.scale_table(ex)
    assert len(t) == 61 * 384 * 3
    anom = ie.scale_outliers(t)
    got = set(zip(anom["category"].astype(str), anom["name"]))
    assert got == {
        ("missing", "layers.7.ffn.experts.3.w2.input_scale"),
        ("not positive", "layers.5.ffn.experts.9.w2.input_scale"),
        ("w1/w3 differ", "layers.2.ffn.experts.11.w1.weight_scale_2"),
        ("outlier", "layers.30.ffn.experts.200.w2.weight_scale_2"),
        ("outlier", "layers.12.ffn.experts.5.w1.input_scale"),
        ("w1/w3 differ", "layers.12.ffn.experts.5.w1.input_scale"),
    }
    assert anom["category"].iloc[0] == "missing"
    row = anom[anom["name"] == "layers.30.ffn.experts.200.w2.weight_scale_2"].iloc[0]
    assert row["value"] / row["median"] > 8 and f"{row['value'] / row['median']:.3g}x the median" in row["detail"]
    assert row["value"] == pytest.approx(facts["values"][row["name"]], rel=1e-6)
    assert ie.pick_expert(t) == (30, 200)

    for e in facts["block_experts"]:
        blocks = ie.expert_blocks(ex, facts["layer"], e)
        for p, b in blocks.items():
            assert int(b.requantized.sum()) == facts["requantized"][b.prefix], b.prefix
    fig = ie.plot_scale_profile(t, anom)
    for ax in fig.axes:  # one outlier of each scale
        assert "outliers (1)" in [x.get_text() for x in ax.get_legend().get_texts()]
    ie.plot_layer_scales(t, 30, 200, anom)
    ie.plot_expert_blocks(ie.expert_blocks(ex, 1, 7))
    plt.close("all")

    x = ie.explorer(ex, t, anom, layer=1, expert=7)
    first = x.png()
    assert x.draws == 1 and "layers.1.ffn.experts.7.w3.weight_scale" in x.text.value
    x.expert_w.value = 0
    assert x.draws == 2 and x.png() != first and "layers.1.ffn.experts.0.w1.weight_scale" in x.text.value
    bundle = x._repr_mimebundle_()
    assert {"application/vnd.jupyter.widget-view+json", "image/png", "text/plain"} <= set(bundle)
    assert set(PROJS) == set(x.blocks)
