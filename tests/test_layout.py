"""The v4-serving layout writer: modelopt's numbers bit for bit (re-quantizing), the contract's layout,
amax rules, the lossless MXFP4 carry (the default), refusals, and an export killed with SIGKILL then
resumed. The fast writer's routes and methods in detail: test_layout_writer.py; MTP: test_mtp_experts.py."""

import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from layout_helpers import files, native_snapshot, raw_bytes, to_native_names
from quantbook.amax import save_snapshot
from quantbook.export import layout
from quantbook.errors import DestinationError, FormatError, LayoutError
from quantbook.release.shards import Checkpoint
from quantbook.export.layout import MANIFEST, write_serving_layout
from quantbook.release.dequant import dequant_fp4
from quantbook.release.format import PRO_CONFIG, load_config
from quantbook.release.shards import INDEX_NAME, read_header

# the shared folder beside the checkout (in CI too): NVIDIA's published DeepSeek-V4-Pro-NVFP4 configs
# NVIDIA's published DeepSeek-V4-Pro-NVFP4 config.json and hf_quant_config.json, kept with the tests
REF_DIR = Path(__file__).resolve().parent / "data" / "DeepSeek-V4-Pro-NVFP4"
# the test's own statement of which released tensors the layout replaces (main layers' routed experts)
RELEASED_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")


@pytest.fixture(scope="module")
def calibrated(tiny_chain):
    """The amax snapshot of the chain's calibrated tiny model, and modelopt's own export of it (step 02)."""
    from quantbook.amax import load_snapshot

    snap, _ = load_snapshot(tiny_chain["run_dir"] / "amax.safetensors")
    return snap, tiny_chain["generic"]


@pytest.fixture(scope="module")
def serving(calibrated, tiny_src, tmp_path_factory):
    """The v4-serving export of the calibrated tiny model, expert weights re-quantized from the amax
    (`cast_mxfp4_to_nvfp4: false`, modelopt's own numbers), uninterrupted (the reference for resumes)."""
    snap, _ = calibrated
    d = tmp_path_factory.mktemp("serving")
    path = d / "snap.safetensors"
    save_snapshot(path, snap)
    dst = d / "export"
    report = write_serving_layout(tiny_src, path, dst, cast_mxfp4_to_nvfp4=False, progress=False)
    return dst, path, report


def test_expert_tensors_bit_identical_to_modelopt_export(calibrated, serving, tiny_src):
    """The NVFP4 math is modelopt's: every expert tensor equals modelopt's own export's, byte for byte."""
    _, modelopt_dir = calibrated
    dst, _, report = serving
    mo, ours = Checkpoint(modelopt_dir), Checkpoint(dst)
    cfg = load_config(tiny_src)
    names = [f"layers.{i}.ffn.experts.{j}.{w}.{s}" for i in range(cfg["num_hidden_layers"])
             for j in range(cfg["n_routed_experts"]) for w in ("w1", "w2", "w3") for s in SUFFIXES]
    assert len(names) == 384
    for n in names:
        a, b = mo.entry("model." + n), ours.entry(n)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), n
        assert raw_bytes(mo, "model." + n) == raw_bytes(ours, n), n
    assert report["filled"] == {"weight": 0, "input": 0}
    assert report["calibrated"] == {"weight": 96, "input": 96}
    assert report["weight_amax_not_release_max"] == []  # max calibration on the exact BF16 copy


def test_layout_is_the_contract(serving, tiny_src):
    dst, _, _ = serving
    src, out = Checkpoint(tiny_src), Checkpoint(dst)
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(p.name for p in tiny_src.glob("*.safetensors"))
    assert not list(dst.glob("*.partial"))
    for name in src.weight_map:
        m = RELEASED_EXPERT.match(name)
        if m and m.group(4) == "scale":
            assert name not in out, f"{name}: the released E8M0 scale must be dropped"
        elif m:
            p = name[: -len(".weight")]
            for s in SUFFIXES:
                assert out.weight_map[f"{p}.{s}"] == src.weight_map[name]  # same shard as the release
        else:  # every other tensor byte for byte, name/dtype/shape unchanged (mtp.* experts too)
            a, b = src.entry(name), out.entry(name)
            assert (a.dtype, a.shape) == (b.dtype, b.shape), name
            assert raw_bytes(src, name) == raw_bytes(out, name), name
    assert sum(n.startswith("mtp.0.ffn.experts.") and n.endswith(".scale") for n in out.weight_map) == 24
    e = out.entry("layers.3.ffn.experts.5.w2.weight")
    assert (e.dtype, e.shape) == ("U8", (256, 64))
    assert out.entry("layers.3.ffn.experts.5.w2.weight_scale").dtype == "F8_E4M3"
    assert out.entry("layers.3.ffn.experts.5.w1.input_scale").shape == ()
    index = json.loads((dst / INDEX_NAME).read_text())
    union = {n: s for s in out.shards for n in read_header(dst / s).tensors}
    assert index["weight_map"] == union
    assert index["metadata"]["total_size"] == sum(e.nbytes for s in out.shards
                                                  for e in read_header(dst / s).tensors.values())
    cfg, src_cfg = load_config(dst), load_config(tiny_src)
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == \
        {k: v for k, v in src_cfg.items() if k != "quantization_config"}
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["scale_fmt"] == "ue8m0" and qc["moe_quant_algo"] == "NVFP4"
    assert set(qc["quantized_layers"]) == {f"layers.{i}.ffn.experts" for i in range(4)}
    hq = json.loads((dst / "hf_quant_config.json").read_text())
    assert hq["quantization"]["exclude_modules"] == qc["ignore"]
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / side).read_bytes() == (tiny_src / side).read_bytes()
    m = json.loads((dst / MANIFEST).read_text())
    assert m["complete"] and set(m["shards"]) == set(out.shards)


def test_configs_equal_nvidias_published_ones():
    """config.json / hf_quant_config.json for V4 Pro equal NVIDIA's DeepSeek-V4-Pro-NVFP4 files."""
    pro = load_config(PRO_CONFIG)
    assert layout.serving_config(pro) == json.loads((REF_DIR / "config.json").read_text())
    assert layout.hf_quant_config(pro) == json.loads((REF_DIR / "hf_quant_config.json").read_text())


def test_native_amax_names_give_the_same_bytes(calibrated, serving, tiny_src, tmp_path):
    """The writer's other input: a native-keyed snapshot (a streaming driver's) -> identical shards."""
    snap, _ = calibrated
    dst, _, _ = serving
    out = tmp_path / "native"
    write_serving_layout(tiny_src, to_native_names(snap), out, cast_mxfp4_to_nvfp4=False, progress=False)
    assert files(out, exclude=(MANIFEST,)) == files(dst, exclude=(MANIFEST,))


def _scalar(ck, name) -> float:
    return float(ck.tensor(name))


def test_amax_anomalies_are_filled_and_listed(tiny_src, tmp_path):
    """missing, 0, NaN, inf, negative weight or input amax never reach the files; each is listed."""
    snap = native_snapshot(tiny_src)
    clean = dict(snap)
    inject = {  # (projection, amax kind) -> what is injected
        ("layers.0.ffn.experts.1.w1", "weight"): "missing", ("layers.0.ffn.experts.1.w3", "weight"): "missing",
        ("layers.1.ffn.experts.2.w2", "weight"): "zero", ("layers.2.ffn.experts.3.w1", "weight"): "nan",
        ("layers.2.ffn.experts.4.w3", "weight"): "inf", ("layers.3.ffn.experts.5.w2", "weight"): "negative",
        ("layers.1.ffn.experts.0.w1", "input"): "missing", ("layers.1.ffn.experts.0.w3", "input"): "missing",
        ("layers.2.ffn.experts.6.w2", "input"): "zero", ("layers.3.ffn.experts.7.w1", "input"): "nan",
        ("layers.0.ffn.experts.3.w3", "input"): "inf", ("layers.3.ffn.experts.1.w2", "input"): "negative",
    }
    value = {"zero": 0.0, "nan": math.nan, "inf": math.inf, "negative": -1.5}
    for i in range(4):  # per-expert input amax (a streaming driver may have them), valid by default
        for j in range(8):
            for w in ("w1", "w2", "w3"):
                snap[f"layers.{i}.ffn.experts.{j}.{w}.input_quantizer._amax"] = \
                    clean[f"layers.{i}.ffn.experts.{w}.input_quantizer._amax"] * (1 + j / 16)
    for i in range(4):
        for w in ("w1", "w2", "w3"):
            del snap[f"layers.{i}.ffn.experts.{w}.input_quantizer._amax"]
    valid_input = dict(snap)
    for (proj, kind), what in inject.items():
        key = f"{proj}.{kind}_quantizer._amax"
        if what == "missing":
            del snap[key]
        else:
            snap[key] = torch.tensor(value[what])
    out = tmp_path / "export"
    report = write_serving_layout(tiny_src, snap, out, cast_mxfp4_to_nvfp4=False, progress=False)
    listed = {(f["projection"], f["amax"]): f["found"] for f in report["fills"]}
    assert listed == {k: v for k, v in inject.items()}
    assert report["filled"] == {"weight": 6, "input": 6}
    ck, src = Checkpoint(out), Checkpoint(tiny_src)
    for n in ck.weight_map:  # no scale anywhere is missing, zero, negative or not finite
        if n.endswith(("weight_scale_2", "input_scale")):
            v = _scalar(ck, n)
            assert math.isfinite(v) and v > 0, n
        if n.endswith(".weight_scale"):
            s = ck.tensor(n).float()
            assert torch.isfinite(s).all() and (s > 0).all(), n
    for i in range(4):
        for j in range(8):
            p = f"layers.{i}.ffn.experts.{j}"
            for w in ("w1", "w2", "w3"):
                assert (f"{p}.{w}.weight" in ck) and (f"{p}.{w}.input_scale" in ck)
            for s in ("weight_scale_2", "input_scale"):
                assert ck.raw(f"{p}.w1.{s}") == ck.raw(f"{p}.w3.{s}"), f"{p} {s}"

    def own(p, w):
        return float(dequant_fp4(src.tensor(f"{p}.{w}.weight").view(torch.uint8),
                                 src.tensor(f"{p}.{w}.scale").view(torch.uint8)).abs().amax().float())

    # weight fill: the projection's own released weights (w1/w3 fused by max), as modelopt's / 2688
    p = "layers.0.ffn.experts.1"
    assert _scalar(ck, f"{p}.w1.weight_scale_2") == pytest.approx(max(own(p, "w1"), own(p, "w3")) / 2688, rel=1e-6)
    p = "layers.2.ffn.experts.3"  # w1 NaN filled from w1's own weights, then max with w3's calibrated amax
    w3 = float(clean[f"{p}.w3.weight_quantizer._amax"])
    assert _scalar(ck, f"{p}.w1.weight_scale_2") == pytest.approx(max(own(p, "w1"), w3) / 2688, rel=1e-6)
    assert _scalar(ck, "layers.1.ffn.experts.2.w2.weight_scale_2") == \
        pytest.approx(own("layers.1.ffn.experts.2", "w2") / 2688, rel=1e-6)
    # input fill: the largest valid input amax of the same projection in the model
    w13_max = max(float(v) for k, v in valid_input.items()
                  if k.endswith(("w1.input_quantizer._amax", "w3.input_quantizer._amax")))
    w2_max = max(float(v) for k, v in valid_input.items() if k.endswith("w2.input_quantizer._amax"))
    assert _scalar(ck, "layers.1.ffn.experts.0.w1.input_scale") == pytest.approx(w13_max / 2688, rel=1e-6)
    assert _scalar(ck, "layers.2.ffn.experts.6.w2.input_scale") == pytest.approx(w2_max / 2688, rel=1e-6)
    # NaN in w1, valid w3: the fused value is max(fill, w3's own)
    p = "layers.3.ffn.experts.7"
    want = max(w13_max, float(valid_input[f"{p}.w3.input_quantizer._amax"]))
    assert _scalar(ck, f"{p}.w1.input_scale") == pytest.approx(want / 2688, rel=1e-6)

    from quantbook.export.verify import verify

    r = verify(out, source=tiny_src, progress=False)
    assert r["verdict"] == "pass", r["reasons"]


def test_refuses_when_nothing_was_calibrated(tiny_src, tmp_path):
    snap = native_snapshot(tiny_src)
    no_input = {k: (torch.tensor(0.0) if "input" in k else v) for k, v in snap.items()}
    with pytest.raises(LayoutError, match="no usable calibrated input amax"):
        write_serving_layout(tiny_src, no_input, tmp_path / "a", progress=False)
    with pytest.raises(LayoutError, match="no usable calibrated input amax"):
        write_serving_layout(tiny_src, {"model.layers.0.self_attn.q_a_proj.input_quantizer._amax": torch.tensor(1.0)},
                             tmp_path / "b", progress=False)
    no_weight = {k: (torch.tensor(math.nan) if "weight" in k else v) for k, v in snap.items()}
    with pytest.raises(LayoutError, match="no usable calibrated weight amax"):
        write_serving_layout(tiny_src, no_weight, tmp_path / "c", cast_mxfp4_to_nvfp4=False, progress=False)
    other_model = dict(snap, **{"layers.9.ffn.experts.0.w1.weight_quantizer._amax": torch.tensor(1.0)})
    with pytest.raises(LayoutError, match="layer 9, but config.json has 4 layers"):
        write_serving_layout(tiny_src, other_model, tmp_path / "d", progress=False)
    per_block = dict(snap, **{"layers.0.ffn.experts.0.w1.weight_quantizer._amax": torch.ones(4)})
    with pytest.raises(LayoutError, match="Per-block or per-channel amax"):
        write_serving_layout(tiny_src, per_block, tmp_path / "e", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before anything was written


def test_destination_refusals(serving, tiny_src, tmp_path):
    dst, snap_path, _ = serving
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="holds no quantbook-layout.json"):
        write_serving_layout(tiny_src, snap_path, foreign, progress=False)
    with pytest.raises(DestinationError, match="is the source, inside it or around it"):
        write_serving_layout(tiny_src, snap_path, tiny_src / "out", progress=False)
    other = native_snapshot(tiny_src, input_base=5.0)
    with pytest.raises(DestinationError, match="other amax"):
        write_serving_layout(tiny_src, other, dst, cast_mxfp4_to_nvfp4=False, progress=False)
    with pytest.raises(DestinationError, match="other options"):
        write_serving_layout(tiny_src, snap_path, dst, cast_mxfp4_to_nvfp4=True, progress=False)
    with pytest.raises(LayoutError, match="mtp_experts: 'mxfp4'; choose one of"):
        write_serving_layout(tiny_src, snap_path, dst, mtp_experts="mxfp4", progress=False)


def test_rerun_of_a_complete_export_skips_every_shard(serving, tiny_src, tmp_path):
    dst, snap_path, _ = serving
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    before = files(copy, exclude=(MANIFEST,))
    report = write_serving_layout(tiny_src, snap_path, copy, cast_mxfp4_to_nvfp4=False, progress=False)
    assert report["shards_skipped"] == 7 and report["shards_written"] == 0
    assert files(copy, exclude=(MANIFEST,)) == before


CHILD = textwrap.dedent("""
    import sys, time
    from quantbook.export import layout, writer
    src, snap, dst, target = sys.argv[1:5]

    class Stalling(writer.ShardWriter):
        def write(self, data):
            super().write(data)
            if self.path.name == target and self.written > 4096:
                print("PAUSED", flush=True)
                time.sleep(600)

    writer.ShardWriter = Stalling
    layout.write_serving_layout(src, snap, dst, cast_mxfp4_to_nvfp4=False, workers=1, progress=False)
    print("FINISHED", flush=True)
""")


def test_sigkill_mid_export_then_resume_is_bit_identical(serving, tiny_src, tmp_path):
    """A real process killed mid-shard leaves nothing that looks complete; the rerun resumes and
    gives the same bytes as the uninterrupted export."""
    ref, snap_path, _ = serving
    dst = tmp_path / "export"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    target = "model-00004-of-00007.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_src), str(snap_path), str(dst), target],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "PAUSED", line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    names = {p.name for p in dst.iterdir()}
    assert target + ".partial" in names  # the half-written shard never got its real name
    assert target not in names
    for final in ("config.json", "hf_quant_config.json", INDEX_NAME):
        assert final not in names, f"{final} written by an unfinished export"
    m = json.loads((dst / MANIFEST).read_text())
    assert m["complete"] is False and len(m["shards"]) == 3

    from quantbook.export.verify import verify

    assert not (dst / "config.json").exists()
    with pytest.raises(FormatError):
        verify(dst, progress=False)  # nothing there reads as an export

    report = write_serving_layout(tiny_src, snap_path, dst, cast_mxfp4_to_nvfp4=False, progress=False)
    assert report["shards_skipped"] == 3 and report["shards_written"] == 4
    assert files(dst, exclude=(MANIFEST,)) == files(ref, exclude=(MANIFEST,))
    assert json.loads((dst / MANIFEST).read_text())["shards"] == json.loads((ref / MANIFEST).read_text())["shards"]


def test_lossless_mxfp4_cast(tiny_src, tmp_path):
    """Codes equal the released codes where k_max - k <= 17; lossy blocks are counted and bounded."""
    from ckpt_edit import copy_checkpoint, rewrite_shard

    src = copy_checkpoint(tiny_src, tmp_path / "src")
    shard = Checkpoint(src).weight_map["layers.1.ffn.experts.2.w3.scale"]
    lossy_blocks = 5

    def edit(items):
        out = []
        for name, dtype, shape, b in items:
            if name == "layers.1.ffn.experts.2.w3.scale":  # 5 blocks 20 binades below the rest
                a = bytearray(b)
                top = max(a)
                for k in range(lossy_blocks):
                    a[k] = top - 20
                b = bytes(a)
            out.append([name, dtype, shape, b])
        return out

    rewrite_shard(src, shard, edit)
    snap = native_snapshot(src)
    out = tmp_path / "cast"
    report = write_serving_layout(src, snap, out, progress=False)  # the default: carried from the release
    blocks = 4 * 8 * (2 * 128 * 256 // 32 + 256 * 128 // 32)
    assert report["cast"] == {"blocks": blocks, "lossless": blocks - lossy_blocks, "lossy": lossy_blocks,
                              "lossy_tensors": {"layers.1.ffn.experts.2.w3.weight": lossy_blocks}}
    assert "layers.1.ffn.experts.2.w3.weight: 5 blocks re-quantized" in layout.report_summary(report)
    ck, rel = Checkpoint(out), Checkpoint(src)
    for i in range(4):
        for j in range(8):
            p = f"layers.{i}.ffn.experts.{j}"
            k = {w: rel.tensor(f"{p}.{w}.scale").view(torch.uint8).int() - 127 for w in ("w1", "w2", "w3")}
            k13 = int(max(k["w1"].max(), k["w3"].max()))
            assert _scalar(ck, f"{p}.w1.weight_scale_2") == 2.0 ** (k13 - 8) == _scalar(ck, f"{p}.w3.weight_scale_2")
            assert _scalar(ck, f"{p}.w2.weight_scale_2") == 2.0 ** (int(k["w2"].max()) - 8)
            for w in ("w1", "w2", "w3"):
                codes = ck.tensor(f"{p}.{w}.weight").view(torch.uint8)
                released = rel.tensor(f"{p}.{w}.weight").view(torch.uint8)
                if (i, j, w) != (1, 2, "w3"):
                    assert torch.equal(codes, released), f"{p}.{w}: codes differ from the release"
    # every lossless block dequantizes to exactly the released value
    from quantbook.export.verify import dequant_nvfp4

    p = "layers.1.ffn.experts.2.w3"
    got = dequant_nvfp4(ck.tensor(f"{p}.weight"), ck.tensor(f"{p}.weight_scale"), ck.tensor(f"{p}.weight_scale_2"))
    want = dequant_fp4(rel.tensor(f"{p}.weight").view(torch.uint8), rel.tensor(f"{p}.scale").view(torch.uint8)).float()
    same = (got == want).reshape(128, -1, 32).all(dim=2)
    assert int((~same).sum()) <= lossy_blocks and bool(same.reshape(-1)[lossy_blocks:].all())

    from quantbook.export.verify import verify

    r = verify(out, source=src, progress=False)
    assert r["verdict"] == "pass", r["reasons"]
    n = r["numbers"]  # against the release: every carried 16-block exact, the 10 re-quantized ones bounded
    assert n["against"] == "release" and n["blocks"] - n["blocks_exact"] <= 2 * lossy_blocks
    assert r["numbers_per_tensor"]["layers.0.ffn.experts.0.w1"]["rel_rmse"] == 0.0


def test_pro_shaped_amax_resolves(pro_snapshot):
    """61 layers x 384 experts of modelopt-named amax (synthetic) map and resolve, every value usable."""
    from quantbook.amax import load_snapshot

    cfg = load_config(PRO_CONFIG)
    snap, _ = load_snapshot(pro_snapshot[0] / "amax.safetensors")
    ea = layout.expert_amax(snap, cfg)
    assert len(ea.weight) == 61 * 384 * 3 and len(ea.input) == 61 * 384 * 3
    res = layout.resolve_amax(ea, cfg, None)
    assert res.table.shape == (61, 384, 4) and bool((res.table > 0).all())


def test_weight_amax_that_is_not_this_releases_is_flagged(tiny_src, tmp_path):
    """Weight amax other than max |w| of the release (another model's snapshot, other weights) is listed;
    one too low makes the verifier's numeric check fail (saturated blocks)."""
    snap = native_snapshot(tiny_src)
    snap["layers.0.ffn.experts.0.w2.weight_quantizer._amax"] = snap["layers.0.ffn.experts.0.w2.weight_quantizer._amax"] * 1.5
    for w in ("w1", "w3"):
        snap[f"layers.2.ffn.experts.4.{w}.weight_quantizer._amax"] = snap[f"layers.2.ffn.experts.4.{w}.weight_quantizer._amax"] / 4
    out = tmp_path / "export"
    report = write_serving_layout(tiny_src, snap, out, cast_mxfp4_to_nvfp4=False, workers=2, progress=False)
    assert [m["projection"] for m in report["weight_amax_not_release_max"]] == \
        ["layers.0.ffn.experts.0.w2", "layers.2.ffn.experts.4.w1/w3"]  # sorted, whatever order shards finished in
    assert "WARNING: 2 expert weight amax differ" in layout.report_summary(report)

    from quantbook.export.verify import verify

    r = verify(out, source=tiny_src, progress=False)
    assert r["verdict"] == "fail"
    failed = {c["id"]: c for c in r["checks"] if c["status"] == "fail"}
    assert set(failed) == {"7"} and "layers.2.ffn.experts.4.w1" in failed["7"]["detail"]
