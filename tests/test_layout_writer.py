"""The v4-serving writer's two routes in detail (export.writer, export.nvfp4).

Re-quantizing: both methods (CPU tables, modelopt's calls batched) give modelopt's own export
byte for byte, for every thread / window / worker setting; at function level, for every E8M0
byte, largest magnitude and code, under weight_scale_2 from amax 1e-30 to 1e30. Carrying (the
default): on a release whose scales span more than E4M3's range, every block within range keeps
the released codes, every other is re-quantized exactly as a whole-projection modelopt call
would, and each such tensor is named with its count; the verifier sees zero error on carried
blocks. A NaN scale is refused with nothing left behind.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_edit import edit_tensor
from layout_helpers import files, native_snapshot
from quantbook.amax import load_snapshot
from quantbook.errors import LayoutError
from quantbook.export import nvfp4
from quantbook.export.layout import MANIFEST, release_expert_bf16, write_serving_layout
from quantbook.release.dequant import dequant_fp4
from quantbook.release.shards import Checkpoint

SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")


@pytest.fixture(scope="module")
def calibrated(tiny_chain):
    """The chain's calibrated amax snapshot and modelopt's own export of that model (step 02)."""
    return load_snapshot(tiny_chain["run_dir"] / "amax.safetensors")[0], tiny_chain["generic"]


def _expert_names(layers=4, experts=8):
    return [f"layers.{i}.ffn.experts.{j}.{w}" for i in range(layers) for j in range(experts)
            for w in ("w1", "w2", "w3")]


REQUANT = [dict(method="table", workers=2), dict(method="table", workers=1, threads=2, window=3),
           dict(method="modelopt", workers=2, window=5), dict(method="modelopt", workers=1, threads=2)]


@pytest.mark.parametrize("opts", REQUANT, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_requant_methods_give_modelopts_export(opts, calibrated, tiny_src, tmp_path):
    snap, modelopt_dir = calibrated
    out = tmp_path / "export"
    report = write_serving_layout(tiny_src, snap, out, cast_mxfp4_to_nvfp4=False, progress=False, **opts)
    mo, ours = Checkpoint(modelopt_dir), Checkpoint(out)
    for p in _expert_names():
        for s in SUFFIXES:
            assert bytes(mo.raw(f"model.{p}.{s}")) == bytes(ours.raw(f"{p}.{s}")), f"{p}.{s} ({opts})"
    assert "cast" not in report and report["weight_amax_not_release_max"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the batched method on the GPU)")
def test_cuda_batched_requant_gives_modelopts_export(calibrated, tiny_src, tmp_path):
    snap, modelopt_dir = calibrated
    out = tmp_path / "export"
    write_serving_layout(tiny_src, snap, out, cast_mxfp4_to_nvfp4=False, device="cuda", window=7, progress=False)
    mo, ours = Checkpoint(modelopt_dir), Checkpoint(out)
    for p in _expert_names():
        for s in SUFFIXES:
            assert bytes(mo.raw(f"model.{p}.{s}")) == bytes(ours.raw(f"{p}.{s}")), f"{p}.{s}"


def _every_input():
    """Projection rows covering every E8M0 byte x largest magnitude m, codes drawn under m."""
    g = torch.Generator().manual_seed(1)
    rows, scales = [], []
    for k in range(256):
        for m in range(8):
            mags = torch.randint(0, m + 1, (32, 16), generator=g)
            mags[:, 0] = m  # every 16-block holds its largest magnitude m
            codes = mags | (torch.randint(0, 2, (32, 16), generator=g) << 3)
            codes = torch.gather(codes, 1, torch.argsort(torch.rand(32, 16, generator=g), dim=1))
            rows.append((codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(-1).to(torch.uint8))
            scales.append(torch.full((16,), k, dtype=torch.uint8))
    return torch.stack(rows), torch.stack(scales)  # [2048, 256] bytes: 512 inputs, 32 16-blocks per row


@pytest.mark.parametrize("amax", [1e-30, 1e-6, 0.02, 1.0, 3.5, 448.0, 1e4, 1e30])
def test_requant_functions_every_input(amax):
    """Tables and the batched method against the per-projection modelopt call (export.nvfp4.quantize_nvfp4)
    for every E8M0 byte (BF16 overflow, NaN at 255), largest magnitude and code; clamped scales at both ends."""
    codes, s = _every_input()
    w = dequant_fp4(codes, s)
    ws2 = nvfp4.weight_scale_2(torch.tensor(amax))
    c0, s0 = nvfp4.quantize_nvfp4(w, ws2)
    q, sc, own, _ = nvfp4.requant_table(codes.numpy(), s.numpy(), ws2)
    assert np.array_equal(q, c0.numpy()) and np.array_equal(sc, s0.view(torch.uint8).numpy())
    want = float(w.abs().amax())
    assert own == want or (np.isnan(own) and np.isnan(want))
    parts = [slice(0, 512), slice(512, 1024), slice(1024, 1536), slice(1536, 2048)]
    ws = [nvfp4.weight_scale_2(torch.tensor(amax * f)) for f in (1.0, 0.5, 3.0, 1e-3)]  # four ws2 in one batch
    for device in dict.fromkeys(["cpu", "cuda" if torch.cuda.is_available() else "cpu"]):
        qb, sb, ob = nvfp4.requant_modelopt(torch.stack([codes[p] for p in parts]), torch.stack([s[p] for p in parts]),
                                            torch.stack(ws), device)
        for b, (p, wsb) in enumerate(zip(parts, ws)):
            cb, scb = nvfp4.quantize_nvfp4(w[p], wsb)
            assert torch.equal(qb[b], cb) and torch.equal(sb[b].view(torch.uint8), scb.view(torch.uint8)), (device, b)
            want = float(w[p].abs().amax())
            assert float(ob[b]) == want or (np.isnan(want) and np.isnan(float(ob[b])))


# ----------------------------------------------------------------------------- a release beyond E4M3's range


@pytest.fixture(scope="module")
def wide(tiny_src, tmp_path_factory):
    """The tiny release with scales spanning more than E4M3's range: 5 blocks of one w3 20 binades below
    its max; one w1 block 19 binades above the rest (every block of that w1 and its w3 lossy); gaps of
    exactly 17 (lossless) and 18 (lossy) side by side and one 100 binades down; a 16-block of +0 codes
    and one of -0 codes."""
    src = tmp_path_factory.mktemp("wide") / "release"
    shutil.copytree(tiny_src, src)

    def low(a):
        a.reshape(-1)[:5] = int(a.max()) - 20

    def raise_top(a):
        a.reshape(-1)[7] = int(a.max()) + 19

    def edge(a):
        top = int(a.max())
        a[0, 1], a[0, 2], a[1, 0] = top - 17, top - 18, top - 100

    def zeros(a):
        a[0, :8] = 0x00
        a[1, 8:16] = 0x88

    edit_tensor(src, "layers.1.ffn.experts.2.w3.scale", low)
    edit_tensor(src, "layers.2.ffn.experts.5.w1.scale", raise_top)
    edit_tensor(src, "layers.0.ffn.experts.1.w2.scale", edge)
    edit_tensor(src, "layers.3.ffn.experts.0.w1.weight", zeros)
    return src


def expected_lossy(src: Path) -> dict[str, int]:
    """Independently: 32-blocks with k_max - k > 17 per expert weight (w1/w3 share k_max)."""
    ck, out = Checkpoint(src), {}
    for i in range(4):
        for j in range(8):
            p = f"layers.{i}.ffn.experts.{j}"
            k = {w: ck.tensor(f"{p}.{w}.scale").view(torch.uint8).int() for w in ("w1", "w2", "w3")}
            for group in (("w1", "w3"), ("w2",)):
                top = max(int(k[w].max()) for w in group)
                for w in group:
                    if n := int(((top - k[w]) > 17).sum()):
                        out[f"{p}.{w}.weight"] = n
    return out


@pytest.fixture(scope="module")
def wide_carried(wide, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide-carried") / "export"
    return out, write_serving_layout(wide, native_snapshot(wide), out, progress=False)


def test_carry_names_every_lossy_block_and_keeps_the_rest(wide, wide_carried):
    out, report = wide_carried
    want = expected_lossy(wide)
    assert len(want) == 4 and report["cast"]["lossy_tensors"] == want  # w3 (5), w1+w3 pair, w2 (2)
    assert report["cast"]["lossy"] == sum(want.values()) > 100
    ck, rel = Checkpoint(out), Checkpoint(wide)
    for p in _expert_names():
        codes, released = ck.raw(f"{p}.weight"), rel.raw(f"{p}.weight")
        if f"{p}.weight" not in want:
            assert codes == released, p
    # the lossy blocks: what a whole-projection modelopt call under the carried scales gives for them
    for p in want:
        p = p[: -len(".weight")]
        group = [p[:-2] + w for w in (("w1", "w3") if p[-2:] != "w2" else ("w2",))]
        top = max(int(rel.tensor(f"{g}.scale").view(torch.uint8).max()) for g in group)
        s = rel.tensor(f"{p}.scale").view(torch.uint8)
        scale, ws2, lossy = nvfp4.carry_scales(s.numpy(), top)
        q, _ = nvfp4.quantize_nvfp4(release_expert_bf16(rel, p), ws2,
                                    torch.from_numpy(scale.copy()).view(torch.float8_e4m3fn))
        keep = np.ones(s.numel(), dtype=bool)
        keep[lossy] = False
        keep = torch.from_numpy(keep.reshape(s.shape)).repeat_interleave(16, dim=1)  # 32 inputs = 16 code bytes
        want_codes = torch.where(keep, rel.tensor(f"{p}.weight").view(torch.uint8), q)
        assert bytes(ck.raw(f"{p}.weight")) == want_codes.numpy().tobytes(), p
        assert bytes(ck.raw(f"{p}.weight_scale")) == scale.tobytes() and float(ck.tensor(f"{p}.weight_scale_2")) == \
            2.0 ** (top - 127 - 8)


def test_verifier_sees_zero_error_on_carried_blocks(wide, wide_carried):
    from quantbook.export.verify import verify

    out, report = wide_carried
    r = verify(out, source=wide, progress=False)
    assert r["verdict"] == "pass", r["reasons"]
    rows, lossy = r["numbers_per_tensor"], report["cast"]["lossy_tensors"]
    for p, row in rows.items():
        if f"{p}.weight" in lossy:
            assert row["blocks"] - row["blocks_exact"] <= 2 * lossy[f"{p}.weight"] and row["max_ratio"] <= 1
        else:
            assert row["blocks_exact"] == row["blocks"] and row["rel_rmse"] == 0.0, p
    assert r["numbers"]["carried_tensors"] == 96


@pytest.mark.parametrize("opts", [dict(workers=1, threads=2, window=1), dict(workers=2, window=64)])
def test_carry_settings_give_the_same_bytes(opts, wide, wide_carried, tmp_path):
    out, report = wide_carried
    again = tmp_path / "export"
    write_serving_layout(wide, native_snapshot(wide), again, progress=False, **opts)
    assert files(again, exclude=(MANIFEST,)) == files(out, exclude=(MANIFEST,))


def test_requant_methods_agree_on_a_wide_release_with_foreign_amax(wide, tmp_path):
    """Weight amax below and above max |w| (another model's): both methods, same bytes, same flags."""
    snap = native_snapshot(wide)
    for key in [k for k in snap if k.startswith(("layers.1.", "layers.3.")) and "weight" in k]:
        snap[key] = snap[key] * (0.3 if ".w2." in key else 7.0)
    reports = {m: write_serving_layout(wide, snap, tmp_path / m, cast_mxfp4_to_nvfp4=False, method=m, workers=2,
                                       progress=False) for m in ("table", "modelopt")}
    assert files(tmp_path / "table", exclude=(MANIFEST,)) == files(tmp_path / "modelopt", exclude=(MANIFEST,))
    flagged = reports["table"]["weight_amax_not_release_max"]
    assert len(flagged) == 32 and flagged == reports["modelopt"]["weight_amax_not_release_max"]
    assert [m["projection"] for m in flagged] == sorted(m["projection"] for m in flagged)


def test_e8m0_nan_is_refused_and_leaves_no_shard(tiny_src, tmp_path):
    bad = tmp_path / "release"
    shutil.copytree(tiny_src, bad)

    def nan(a):
        a[3, 2] = 0xFF

    edit_tensor(bad, "layers.2.ffn.experts.4.w3.scale", nan)
    out = tmp_path / "export"
    with pytest.raises(LayoutError, match=r"layers\.2\.ffn\.experts\.4\.w3\.scale: E8M0 NaN \(0xFF\) in the release"):
        write_serving_layout(bad, native_snapshot(tiny_src), out, workers=1, progress=False)
    shard = Checkpoint(bad).weight_map["layers.2.ffn.experts.4.w3.weight"]
    assert not (out / shard).exists() and not list(out.glob("*.partial"))


@pytest.mark.parametrize("cast", [True, False], ids=["carry", "requant"])
def test_block_in_memory_gives_the_files_bytes(cast, wide, wide_carried, tmp_path):
    """The streaming pass's route: a shard written from the block already in memory (`BlockSource`)
    is the shard written from the files, byte for byte, lossy blocks included; `shard_tensors` (the
    gate's candidate) are the written tensors; the block's buffer is left as read."""
    from quantbook.export import layout, writer

    snap = native_snapshot(wide)
    out = tmp_path / "files"
    if cast:
        out = wide_carried[0]
    else:
        write_serving_layout(wide, snap, out, cast_mxfp4_to_nvfp4=False, method="table", progress=False)
    p = layout.plan(wide, tmp_path / "unused", snap, cast_mxfp4_to_nvfp4=cast)
    rel = Checkpoint(wide)
    s = writer.Settings(p.carried, p.resolved.amax, "cpu", "table")
    checked = 0
    for job in p.jobs:
        raw, _ = rel.read_block([n for n in rel.header(job.name).tensors])
        before = {n: bytes(t.reshape(-1).view(torch.uint8).numpy()) for n, t in raw.items()}
        source = writer.BlockSource(rel, raw)
        writer.write_shard(tmp_path / job.name, job.entries, job.ops, source, s)
        assert (tmp_path / job.name).read_bytes() == (out / job.name).read_bytes(), job.name
        got, written = writer.shard_tensors(job.entries, job.ops, source, s), Checkpoint(out)
        assert list(got) == [n for n, _, _ in job.entries]
        for name, t in got.items():
            assert bytes(t.reshape(-1).view(torch.uint8).numpy()) == bytes(written.raw(name)), name
            assert t.dtype == written.tensor(name).dtype and tuple(t.shape) == tuple(written.entry(name).shape)
        assert {n: bytes(t.reshape(-1).view(torch.uint8).numpy()) for n, t in raw.items()} == before
        checked += any(kind == "expert" for kind, _ in job.ops)
    assert checked == 4
