"""What notebook 02 shows, computed by the library: preflight tables, patches, phases, quantizers,
repairs, coverage and outputs of the session's chain run; the resource refusal for every driver."""

from __future__ import annotations

import pytest

import requires
from quantbook import calibrate
from quantbook.calibrate import patches, report
from quantbook.errors import QuantizeError

requires.importorskip("modelopt")  # a failure, not a skip, under QUANTBOOK_REQUIRE_MODELOPT=1 (CI)


@pytest.fixture(scope="module")
def facts(tiny_chain, tmp_path_factory):
    return calibrate.preflight(tiny_chain["q"], tmp_path_factory.mktemp("pre") / "run")


def test_preflight_tables(facts, tiny_chain, tmp_path):
    q = calibrate.settings.normalize(tiny_chain["q"])
    summary = report.preflight_summary(facts, q, tmp_path)["value"]
    assert summary["driver"] == "modelopt" and "DeepseekV4ForCausalLM, 4 layers, 8 routed experts" in summary["model"]
    assert summary["calibration"].startswith(f"16 samples from {tiny_chain['calib']}; calib_seq 64; batch_size 4")
    assert summary["generic export (estimate)"].endswith("MiB") and "FORCED despite" not in summary.index
    flags = report.flags_table(facts, q)["value"]
    assert flags["qformat"] == "nvfp4_experts_only" and flags["layerwise"] is False
    disk = report.disk_table(facts)
    assert list(disk.index) == ["export", "run_dir"] and disk.loc["export", "path"] == str(tiny_chain["generic"])
    assert report.gpu_table(facts).empty  # device cpu: no GPU asked about
    assert report.size(1536) == "1.50 KiB" and report.size(3 * 2**40) == "3.00 TiB" and report.size(7) == "7 B"


def test_run_tables(tiny_chain):
    rec, run_dir = tiny_chain["record"], tiny_chain["run_dir"]
    assert list(report.patches_table(patches.apply()).index) == list(patches.PATCHES)
    assert set(report.timings_table(rec).index) >= {"load", "data", "calibrate", "snapshot", "save_state", "export"}
    quantizers = report.quantizer_table(run_dir).set_index(["kind", "role"])
    assert quantizers.loc[("routed_expert", "weight"), "enabled"] == 4 * 8 * 2  # gate_up and down, per expert
    assert quantizers.loc[("routed_expert", "input"), "enabled"] == 4 * 2
    assert quantizers.loc[("attention", "weight"), "enabled"] == 0  # experts only
    cal = report.calibration_facts(rec)["value"]
    assert cal["samples"] == 15 and cal["tokens"] > 0 and len(cal["data sha256"]) == 16
    assert report.repairs_table(rec).empty and report.export_time_bad_amax(rec).empty
    counts = report.token_counts(run_dir)
    cov = report.coverage_table(counts)
    assert list(cov.index) == [f"layers.{i}" for i in range(4)] and (cov["never routed"] == 0).all()
    assert (cov["tokens"] == rec["calibration"]["positions"] * 2).all()  # top-2 routing
    outputs = report.outputs_table(run_dir, rec)
    assert list(outputs.index) == ["export (unified HF, NVFP4)", "calibrated state", "amax snapshot",
                                   "expert token counts", "run record"]


def test_repairs_and_coverage_from_records():
    rec = {"post_calibration": {"amax_repairs": [{"quantizer": "q1", "problem": "zero", "values": [0.0],
                                                  "replacement": 4.5, "fallback": "largest of 3"}]},
           "bad_amax": [{"quantizer": "q1", "problem": "zero", "replacement": 4.5, "fallback": "f",
                         "seen_in": ["repair_amax (before export)"]},
                        {"quantizer": "q2", "problem": "nan", "replacement": 6.0, "fallback": "maxbound",
                         "seen_in": ["export input_scale"]}]}
    assert report.repairs_table(rec).to_dict("records") == [
        {"quantizer": "q1", "problem": "zero", "raw": [0.0], "replacement": 4.5, "from": "largest of 3"}]
    assert list(report.export_time_bad_amax(rec)["quantizer"]) == ["q2"]
    cov = report.coverage_table({"layers.0": [3, 0, 5], "layers.1": [1, 1, 1]})
    assert cov.loc["layers.0"].tolist() == [8, 0, 5, 1] and cov.loc["layers.1", "never routed"] == 0


@pytest.mark.parametrize("driver", ["modelopt", "hf_ptq"])
def test_resource_refusal_for_every_driver(driver, tiny_chain, tmp_path, monkeypatch):
    """Not enough disk: refused by `calibrate.preflight` (the CLI's and the notebook's path) before
    anything loads, whichever driver; `force` runs anyway with a warning."""
    from test_hfptq import make_checkout

    from quantbook.calibrate import resources

    q = {**tiny_chain["q"], "driver": driver}
    if driver == "hf_ptq":
        q["hf_ptq_dir"] = str(make_checkout(tmp_path / "Model-Optimizer", "0.47 (2026-09-23)"))
    monkeypatch.setattr(resources, "free_disk", lambda path: 1000)
    with pytest.raises(QuantizeError, match=r"not enough room for this run:\n  - disk for export"):
        calibrate.preflight(q, tmp_path / "run")
    with pytest.warns(UserWarning, match="FORCED: not enough room"):
        calibrate.preflight({**q, "force": True}, tmp_path / "run")
