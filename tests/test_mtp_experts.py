"""`export.mtp_experts: nvfp4`: the MTP block's routed experts in the four-tensor NVFP4 form (weights
carried from the release, input_scale from MTP's calibrated input amax), everything else of `mtp.*`
as released, configs to match, refused without MTP amax; and what the verifier says of each form.

The MTP amax come from a driver that calibrates the MTP block (the modelopt and hf_ptq drivers never
run it): here the chain's modelopt snapshot plus synthetic `mtp.0.*` entries under modelopt's names,
as such a driver writes them into the same `amax.safetensors`."""

import fnmatch
import json
import shutil

import pytest
import torch

from quantbook.amax import load_snapshot, save_snapshot
from quantbook.errors import LayoutError, ParamsError
from quantbook.export import nvfp4, recover
from quantbook.export import verify as V
from quantbook.export.layout import IGNORE_MTP_NVFP4, MANIFEST, write_serving_layout
from quantbook.release.shards import Checkpoint

MTP_GATE_UP, MTP_DOWN = 0.75, 1.25  # the synthetic MTP input amax


def with_mtp_amax(snap: dict, experts: int = 8) -> dict:
    """The snapshot plus the MTP block's quantizers under modelopt's names (one input amax per fused
    projection, one weight amax per expert)."""
    out = {k: v.clone() for k, v in snap.items()}
    out["mtp.0.mlp.experts.gate_up_proj_input_quantizer._amax"] = torch.tensor(MTP_GATE_UP)
    out["mtp.0.mlp.experts.down_proj_input_quantizer._amax"] = torch.tensor(MTP_DOWN)
    for j in range(experts):
        out[f"mtp.0.mlp.experts.gate_up_proj_weight_quantizers.{j}._amax"] = torch.tensor(0.01 * (j + 1))
        out[f"mtp.0.mlp.experts.down_proj_weight_quantizers.{j}._amax"] = torch.tensor(0.02 * (j + 1))
    return out


@pytest.fixture(scope="module")
def snapshots(tiny_chain):
    snap, _ = load_snapshot(tiny_chain["run_dir"] / "amax.safetensors")
    return snap, with_mtp_amax(snap)


@pytest.fixture(scope="module")
def exports(snapshots, tiny_src, tmp_path_factory):
    snap, mtp = snapshots
    d = tmp_path_factory.mktemp("mtp")
    released = write_serving_layout(tiny_src, mtp, d / "released", progress=False)
    nv = write_serving_layout(tiny_src, mtp, d / "nvfp4", mtp_experts="nvfp4", progress=False)
    return {"released": (d / "released", released), "nvfp4": (d / "nvfp4", nv)}


MTP_PROJ = [f"mtp.0.ffn.experts.{j}.{w}" for j in range(8) for w in ("w1", "w2", "w3")]


def test_nvfp4_mtp_experts_carried_with_mtp_input_scales(exports, tiny_src):
    out, report = exports["nvfp4"]
    ck, rel = Checkpoint(out), Checkpoint(tiny_src)
    for p in MTP_PROJ:
        assert f"{p}.scale" not in ck
        assert ck.raw(f"{p}.weight") == rel.raw(f"{p}.weight"), p  # the released codes
        fused = [p[:-2] + w for w in (("w1", "w3") if p[-2:] != "w2" else ("w2",))]
        top = max(int(rel.tensor(f"{g}.scale").view(torch.uint8).max()) for g in fused)
        assert float(ck.tensor(f"{p}.weight_scale_2")) == 2.0 ** (top - 127 - 8)
        amax = MTP_DOWN if p.endswith("w2") else MTP_GATE_UP
        assert bytes(ck.raw(f"{p}.input_scale")) == nvfp4.f32_bytes(nvfp4.input_scale(torch.tensor(amax)))
        assert ck.weight_map[f"{p}.weight"] == rel.weight_map[f"{p}.weight"]  # same shard as released
    for n in rel.weight_map:  # every other mtp.* tensor as released
        if n.startswith("mtp.") and ".ffn.experts." not in n:
            assert ck.raw(n) == rel.raw(n), n
    m = report["mtp_experts"]
    assert m["form"] == "nvfp4" and m["projections"] == 24 and m["drafts_correctly_on"] == "vLLM 0.33"
    assert report["calibrated"]["mtp_input"] == 24 and report["filled"] == {"weight": 0, "input": 0}
    assert report["ignored_amax"]["MTP weight amax (MTP expert weights are carried from the release)"] == 16
    assert report["cast"]["blocks"] == 4 * 8 * 3072 + 8 * 3072 and report["cast"]["lossy"] == 0


def test_main_layers_are_the_same_either_way(exports):
    (a, _), (b, _) = exports["released"], exports["nvfp4"]
    ca, cb = Checkpoint(a), Checkpoint(b)
    for n in ca.weight_map:
        if not n.startswith("mtp."):
            assert ca.raw(n) == cb.raw(n), n


def test_configs_list_the_mtp_experts_and_keep_the_rest_of_mtp_out(exports):
    out, _ = exports["nvfp4"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quantized_layers"]["mtp.0.ffn.experts"] == {"group_size": 16, "quant_algo": "NVFP4"}
    assert len(qc["quantized_layers"]) == 5 and qc["ignore"] == IGNORE_MTP_NVFP4
    assert not any(fnmatch.fnmatchcase("mtp.0.ffn.experts.3.w2", p) for p in qc["ignore"])
    for module in ("mtp.0.e_proj", "mtp.0.h_proj", "mtp.0.ffn.gate", "mtp.0.attn.wq_a", "mtp.0.ffn.shared_experts.w1"):
        assert any(fnmatch.fnmatchcase(module, p) for p in qc["ignore"]), module
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quantized_layers"] == qc["quantized_layers"] and hq["exclude_modules"] == qc["ignore"]
    assert qc["moe_quant_algo"] == "NVFP4" and qc["quant_method"] == "fp8"
    released = json.loads((exports["released"][0] / "config.json").read_text())["quantization_config"]
    assert "mtp.0.ffn.experts" not in released["quantized_layers"] and "mtp.*" in released["ignore"]


def test_verifier_passes_nvfp4_mtp_and_says_vllm_drafts_correctly(exports, tiny_src, tiny_bf16):
    out, _ = exports["nvfp4"]
    r = V.verify(out, source=tiny_src, reference=tiny_bf16, progress=False)
    assert r["verdict"] == "pass", r["reasons"]
    assert [c["status"] for c in r["checks"]] == ["pass"] * 9  # no MTP warning: vLLM builds what is stored
    n = r["numbers"]
    assert n["tensors"] == 96 + 24 and n["blocks_exact"] == n["blocks"] and n["carried_tensors"] == 120
    assert r["mtp_experts"]["stored"] == "nvfp4"
    assert "drafts correctly on vLLM 0.33" in V.format_table(r)
    r = V.verify(exports["released"][0], source=tiny_src, progress=False)
    assert r["mtp_experts"]["stored"] == "released" and "drafts correctly on SGLang 0.5.23" in V.format_table(r)


def _damage(src_dir, dst, fn):
    shutil.copytree(src_dir, dst)
    (dst / MANIFEST).unlink()
    fn(dst)
    return dst


def _config(d, fn):
    for name, key in (("config.json", None), ("hf_quant_config.json", "quantization")):
        obj = json.loads((d / name).read_text())
        fn(obj["quantization_config"] if key is None else obj["quantization"], key)
        (d / name).write_text(json.dumps(obj))


def test_verifier_catches_mtp_mismatches(exports, tiny_src, tmp_path):
    """NVFP4 MTP experts under `mtp.*` in ignore, MXFP4 ones listed as quantized, and a missing MTP scale."""
    nv, rel = exports["nvfp4"][0], exports["released"][0]

    def ignore_all_mtp(qc, key):
        qc["exclude_modules" if key else "ignore"] = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]

    d = _damage(nv, tmp_path / "a", lambda d: _config(d, ignore_all_mtp))
    failed = {c["id"]: c for c in V.verify(d, progress=False)["checks"] if c["status"] == "fail"}
    assert set(failed) == {"2"} and "'mtp.*' matches NVFP4 routed experts" in failed["2"]["detail"]

    def list_mtp(qc, key):
        qc["quantized_layers"]["mtp.0.ffn.experts"] = {"group_size": 16, "quant_algo": "NVFP4"}

    d = _damage(rel, tmp_path / "b", lambda d: _config(d, list_mtp))
    failed = {c["id"]: c for c in V.verify(d, progress=False)["checks"] if c["status"] == "fail"}
    assert set(failed) == {"2"} and "quantized_layers differs" in failed["2"]["detail"]

    from test_verify import _edit

    d = _damage(nv, tmp_path / "c", lambda d: _edit(d, {"mtp.0.ffn.experts.5.w2.input_scale"}, lambda *a: None))
    r = V.verify(d, progress=False)
    assert r["missing_expert_tensors"] == {"mtp.0.ffn.experts.5.w2": ["input_scale"]}
    assert {c["id"] for c in r["checks"] if c["status"] == "fail"} == {"4"}


def test_refused_without_mtp_amax(snapshots, tiny_src, tmp_path):
    snap, _ = snapshots
    with pytest.raises(LayoutError, match="mtp_experts: nvfp4 needs the MTP block's calibrated input amax") as e:
        write_serving_layout(tiny_src, snap, tmp_path / "out", mtp_experts="nvfp4", progress=False)
    assert "the modelopt and hf_ptq drivers never run the MTP block" in str(e.value)
    assert not (tmp_path / "out").exists()
    zero = with_mtp_amax(snap)
    zero["mtp.0.mlp.experts.down_proj_input_quantizer._amax"] = torch.tensor(0.0)
    with pytest.raises(LayoutError, match=r"experts' w2 \(8 present, none finite and > 0\)"):
        write_serving_layout(tiny_src, zero, tmp_path / "out", mtp_experts="nvfp4", progress=False)
    with pytest.raises(ParamsError, match="export.mtp_experts: 'NVFP4'; choose one of"):
        recover.export_settings({"dir": "x", "source": "y", "mtp_experts": "NVFP4"})


def test_mtp_input_amax_filled_within_the_mtp_block(snapshots, tiny_src, tmp_path):
    """Native per-expert MTP input amax (a streaming driver's), one missing: filled from MTP's own, listed."""
    snap, _ = snapshots
    native = dict(snap)
    for j in range(8):
        for w, v in (("w1", 0.5), ("w3", 0.6), ("w2", 1.0)):
            native[f"mtp.0.ffn.experts.{j}.{w}.input_quantizer._amax"] = torch.tensor(v * (1 + j / 8))
    del native["mtp.0.ffn.experts.3.w1.input_quantizer._amax"]
    report = write_serving_layout(tiny_src, native, tmp_path / "out", mtp_experts="nvfp4", progress=False)
    fill = [f for f in report["fills"] if f["projection"].startswith("mtp.")]
    assert fill == [{"projection": "mtp.0.ffn.experts.3.w1", "amax": "input", "found": "missing", "value": None,
                     "filled_with": pytest.approx(0.6 * (1 + 7 / 8)),
                     "rule": "largest calibrated w1/w3 input amax in the MTP block"}]
    ck = Checkpoint(tmp_path / "out")
    assert ck.raw("mtp.0.ffn.experts.3.w1.input_scale") == ck.raw("mtp.0.ffn.experts.3.w3.input_scale")


def test_chain_export_with_mtp_nvfp4_passes(tiny_chain, tmp_path):
    """Step 03 of the chain's run with `mtp_experts: nvfp4`, the run's snapshot holding MTP amax as a
    driver that calibrates MTP writes them: the export passes the verifier; without them, --validate-only
    and the export refuse with the reason."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_chain["run_dir"], run_dir)
    e = {"layout": "v4-serving", "source": str(tiny_chain["src"]), "dir": str(tmp_path / "export"),
         "reference": str(tiny_chain["bf16"]), "mtp_experts": "nvfp4"}
    v = recover.validate_state(run_dir, model_path=tiny_chain["bf16"], source=tiny_chain["src"], mtp_experts="nvfp4")
    assert v["verdict"] == "refused" and "never run the MTP block" in recover.format_validation(v)
    snap, meta = load_snapshot(run_dir / "amax.safetensors")
    save_snapshot(run_dir / "amax.safetensors", with_mtp_amax(snap), meta)
    rec = recover.export(e, run_dir, progress=False)
    assert rec["verdict"] == "pass", rec["verify_summary"]
    assert rec["layout_report"]["mtp_experts"]["form"] == "nvfp4"
    assert "drafts correctly on vLLM 0.33" in (run_dir / "verify.md").read_text()
