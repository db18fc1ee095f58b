"""Step 03's export written along step 02's streaming pass (export.along, `quantize.export_along`):
byte for byte the export step 03 writes alone from the same amax; a layer that needs a fill waits for
the end; a writer that fails stops the pass and leaves no shard under its final name; a rerun
completes it identically. Kills with SIGKILL: tests/test_streaming.py (with the export section)."""

import copy
import json
from pathlib import Path

import pytest
from layout_helpers import files
import requires
from test_streaming import streaming_q

requires.importorskip("modelopt")

MTP_NVFP4 = {"cast_mxfp4_to_nvfp4": False, "mtp_experts": "nvfp4"}  # weight amax and MTP rows used too


def export_section(tiny_chain, dst: Path, **over) -> dict:
    return {"layout": "v4-serving", "source": str(tiny_chain["src"]), "dir": str(dst), "workers": 1, **over}


def manifest(d: Path) -> dict:
    """The layout manifest without where it is and who wrote which shard (counts of written/skipped)."""
    from quantbook.export.layout import MANIFEST

    m = json.loads((d / MANIFEST).read_text())
    for k in ("export", "shards_written", "shards_skipped"):
        m["report"].pop(k)
    for rec in m["shards"].values():
        rec.pop("numbers", None)  # what the pass checked in memory (test_verify_takes_the_pass_s_numbers)
    return m


@pytest.fixture(scope="module")
def along(tiny_chain, tmp_path_factory):
    """A streaming run writing the export along (weight amax and MTP experts used), and step 03's
    export written alone from that run's amax."""
    from quantbook import amax
    from quantbook.calibrate import quantize
    from quantbook.export.layout import write_serving_layout

    base = tmp_path_factory.mktemp("along")
    rec = quantize(streaming_q(tiny_chain), base / "run", progress=False,
                   export=export_section(tiny_chain, base / "export", **MTP_NVFP4))
    alone = write_serving_layout(tiny_chain["src"], base / "run" / amax.SNAPSHOT, base / "alone", progress=False,
                                 **MTP_NVFP4)
    return {"base": base, "record": rec, "alone": alone}


def test_the_export_written_along_is_step03s_byte_for_byte(along):
    rec, base = along["record"], along["base"]
    e = rec["export"]
    assert rec["status"] == "done" and e["along"] and e["layout"] == "v4-serving"
    # embed, 4 layers, head, MTP: every shard written during the pass, none left for the end
    assert e["shards_written_along"] == e["shards"] == 7 and e["shards_written_at_end"] == 0
    assert sorted(s["shard"] for s in e["along_shards"]) == sorted(
        p.name for p in (base / "export").glob("*.safetensors"))
    assert files(base / "export") != {} and files(base / "export", exclude=("quantbook-layout.json",)) == \
        files(base / "alone", exclude=("quantbook-layout.json",))
    assert manifest(base / "export") == manifest(base / "alone")
    assert "along" not in json.loads((base / "export" / "quantbook-layout.json").read_text())
    # each layer's shard from the block the pass had read (the release read once), embed and head from the files
    assert {s["shard"]: s["from"] for s in e["along_shards"]} == {
        s["shard"]: "the pass's read buffer" if s["layers"] or s["shard"].startswith("model-00007") else "the release's files"
        for s in e["along_shards"]}
    from quantbook.calibrate import report

    t = report.along_table(rec)  # notebook 02's table of the pass's shards
    assert len(t) == 8 and t["GiB"].iloc[:7].notna().all() and "0 shard(s) written" in t["layers"].iloc[7]
    assert (t["layers"] == "layers.2").sum() == 1 and report.along_table({"export": {}}) is None


def test_step03_after_the_pass_writes_nothing_and_verifies(along, tiny_chain):
    """Step 03 on the run finds every shard recorded and verified: it writes none again, and the
    export passes the verifier against the release."""
    from quantbook import amax
    from quantbook.export.layout import write_serving_layout
    from quantbook.export.verify import verify

    base = along["base"]
    before = files(base / "export")
    r = write_serving_layout(tiny_chain["src"], base / "run" / amax.SNAPSHOT, base / "export", progress=False,
                             **MTP_NVFP4)
    assert r["shards_written"] == 0 and r["shards_skipped"] == 7
    assert files(base / "export") == before
    assert verify(base / "export", source=tiny_chain["src"], progress=False)["verdict"] == "pass"


def test_verify_takes_the_pass_s_numbers(along, tiny_chain, tmp_path, monkeypatch):
    """The pass computes check 7's numbers on the bytes it writes, in memory: verify takes them instead
    of reading those expert tensors again. They equal verify's own from the files, number for number;
    a wrong recorded row fails the export; a shard whose size is not the recorded one gives none."""
    import shutil

    from quantbook.export import verify as v
    from quantbook.export.layout import MANIFEST

    shutil.copytree(along["base"] / "export", tmp_path / "export")
    d, src = tmp_path / "export", tiny_chain["src"]
    m = json.loads((d / MANIFEST).read_text())
    recorded = {n: r for rec in m["shards"].values() for n, r in rec.get("numbers", {}).items()}
    reread = v.verify(d, source=src, progress=False, reread=True)
    assert reread["verdict"] == "pass" and reread["numbers"]["from_record"] == 0
    assert recorded == reread["numbers_per_tensor"] and len(recorded) == 4 * 8 * 3 + 8 * 3  # 4 layers + MTP (nvfp4)

    def no_reading(*a, **k):
        raise AssertionError("an expert tensor read again")

    monkeypatch.setattr(v, "release_error", no_reading)
    taken = v.verify(d, source=src, progress=False)
    assert taken["verdict"] == "pass" and taken["numbers"]["from_record"] == len(recorded)
    assert taken["numbers_per_tensor"] == reread["numbers_per_tensor"]
    assert {k: x for k, x in taken["numbers"].items() if k != "from_record"} == \
        {k: x for k, x in reread["numbers"].items() if k != "from_record"}
    assert "computed by step 02's pass" in taken["summary"]
    monkeypatch.undo()
    from quantbook.cli import main

    assert main(["verify", str(d), "--source", str(src), "--reread", "--run-dir", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["numbers"]["from_record"] == 0

    name = sorted(recorded)[5]
    shard = next(s for s, rec in m["shards"].items() if name in rec.get("numbers", {}))
    m["shards"][shard]["numbers"][name]["blocks_over"] = 1
    (d / MANIFEST).write_text(json.dumps(m))
    bad = v.verify(d, source=src, progress=False)
    assert bad["verdict"] == "fail" and name in bad["reasons"][0]
    release = v.Checkpoint(src)
    assert v.recorded_numbers(v.Checkpoint(d), release).keys() == recorded.keys()
    other = {**m, "source_id": "another release"}  # numbers against another release are not this one's
    (d / MANIFEST).write_text(json.dumps(other))
    assert v.recorded_numbers(v.Checkpoint(d), release) == {}
    (d / MANIFEST).write_text(json.dumps(m))
    with open(d / shard, "ab") as f:  # not the bytes the numbers were computed on: the shard's are read again
        f.write(b"x")
    assert v.recorded_numbers(v.Checkpoint(d), release).keys() == \
        recorded.keys() - m["shards"][shard]["numbers"].keys()


def test_the_end_of_the_pass_reads_no_shard_again(along, tiny_chain, tmp_path, monkeypatch):
    """The pass's end takes the shards it wrote itself by their records (digest of the bytes as written):
    no second read of the export; a shard written by anyone else is read and hashed as before."""
    import shutil

    from quantbook import amax
    from quantbook.export.layout import write_serving_layout
    from quantbook.release import resume

    shutil.copytree(along["base"] / "export", tmp_path / "export")
    names = frozenset(p.name for p in (tmp_path / "export").glob("model-*.safetensors"))

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(resume, "file_digest", no_reading)
    args = (tiny_chain["src"], along["base"] / "run" / amax.SNAPSHOT, tmp_path / "export")
    r = write_serving_layout(*args, progress=False, trusted=names, **MTP_NVFP4)
    assert r["shards_written"] == 0 and r["shards_skipped"] == 7
    with pytest.raises(AssertionError, match="read again"):
        write_serving_layout(*args, progress=False, trusted=names - {"model-00002-of-00007.safetensors"}, **MTP_NVFP4)


def test_a_layer_that_needs_a_fill_is_written_at_the_end(along, tiny_chain, tmp_path):
    """An input amax that must be filled takes the largest of the whole model: its layer's shard
    waits for the end; the others go along; the result is step 03's, fills included."""
    from quantbook import amax
    from quantbook.export.along import Along
    from quantbook.export.layout import write_serving_layout

    snap, meta = amax.load_snapshot(along["base"] / "run" / amax.SNAPSHOT)
    bad = "model.layers.2.mlp.experts.down_proj_input_quantizer._amax"
    snap[bad] = torch_nan_like(snap[bad])
    path = tmp_path / amax.SNAPSHOT
    amax.save_snapshot(path, snap, meta)

    e = {**export_section(tiny_chain, tmp_path / "export", **MTP_NVFP4), "cast_mxfp4_to_nvfp4": False}
    from quantbook.export.recover import export_settings

    w = Along(export_settings(e), progress=False)
    for block in ["layers.0", "layers.1", "layers.2", "layers.3", "mtp.0"]:
        kind, i = block.split(".")
        mine = {k: v for k, v in snap.items() if k.startswith(f"model.{block}.") or k.startswith(f"{block}.")}
        w.block_done(mine, [(kind, int(i))])
    w.wait()
    w.close()
    along_written = sorted(s["shard"] for s in w.timeline)
    assert len(along_written) == 6 and all("00004" not in n for n in along_written), along_written
    r = write_serving_layout(tiny_chain["src"], path, tmp_path / "export", progress=False, **MTP_NVFP4)
    assert r["shards_written"] == 1 and r["filled"] == {"weight": 0, "input": 8}
    alone = write_serving_layout(tiny_chain["src"], path, tmp_path / "alone", progress=False, **MTP_NVFP4)
    assert alone["fills"] == r["fills"]
    assert files(tmp_path / "export", exclude=("quantbook-layout.json",)) == \
        files(tmp_path / "alone", exclude=("quantbook-layout.json",))
    assert manifest(tmp_path / "export") == manifest(tmp_path / "alone")


def torch_nan_like(t):
    import torch

    return torch.full_like(t, float("nan"))


def test_a_failing_shard_stops_the_pass_and_a_rerun_completes_it(along, tiny_chain, tmp_path, monkeypatch):
    """The writer fails inside layers.1's shard: the pass stops with that error at the next block,
    nothing is left under the shard's final name, and the rerun (resuming the calibration) writes an
    export identical to the uninterrupted one."""
    from quantbook.calibrate import quantize
    from quantbook.release import shards

    write = shards.ShardWriter.write

    def failing(self, data):
        if "00003" in str(self.path):
            raise OSError("injected: the disk failed in layers.1's shard")
        return write(self, data)

    monkeypatch.setattr(shards.ShardWriter, "write", failing)
    q = streaming_q(tiny_chain)
    e = export_section(tiny_chain, tmp_path / "export", **MTP_NVFP4)
    with pytest.raises(OSError, match="layers.1's shard"):
        quantize(copy.deepcopy(q), tmp_path / "run", progress=False, export=e)
    assert not any("00003" in p.name and p.suffix == ".safetensors" for p in (tmp_path / "export").iterdir())
    m = json.loads((tmp_path / "export" / "quantbook-layout.json").read_text())
    assert m["along"] and "model-00003-of-00007.safetensors" not in m["shards"] and m["shards"]

    monkeypatch.setattr(shards.ShardWriter, "write", write)
    rec = quantize(copy.deepcopy(q), tmp_path / "run", progress=False, export=e)
    assert rec["status"] == "done" and rec["streaming"]["resumed_from"] is not None
    assert files(tmp_path / "export", exclude=("quantbook-layout.json",)) == \
        files(along["base"] / "export", exclude=("quantbook-layout.json",))


def test_refusals(tiny_chain, tmp_path):
    """The export directory of step 03 (not a pass's) is refused before any block; so is a bad switch."""
    from quantbook import calibrate
    from quantbook.errors import QuantbookError

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "quantbook-layout.json").write_text(json.dumps(
        {"kind": "quantbook.layout", "source_id": "x", "identity": "y", "shards": {}}))
    with pytest.raises(QuantbookError, match="a finished export"):
        calibrate.quantize(streaming_q(tiny_chain), tmp_path / "run", progress=False,
                           export=export_section(tiny_chain, tmp_path / "export"))
    with pytest.raises(QuantbookError, match="quantize.export_along"):
        calibrate.preflight(streaming_q(tiny_chain, export_along="yes"), tmp_path / "run2")
