"""`quantbook verify`: a good v4-serving export passes; each way an export can be wrong fails the
check that names it; a generic modelopt export is research-only with its reasons; the numeric
bound holds for modelopt's NVFP4 and breaks for a wrong one."""

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from ckpt_edit import rewrite_shard
from layout_helpers import native_snapshot
from quantbook.export import verify as V
from quantbook.release.shards import Checkpoint
from quantbook.export.layout import MANIFEST, write_serving_layout
from quantbook.release.shards import INDEX_NAME


@pytest.fixture(scope="module")
def export(tiny_src, tmp_path_factory):
    """Expert weights re-quantized from amax: every block's error is bounded, not zero."""
    out = tmp_path_factory.mktemp("verify") / "export"
    write_serving_layout(tiny_src, native_snapshot(tiny_src), out, cast_mxfp4_to_nvfp4=False, progress=False)
    return out


@pytest.fixture(scope="module")
def carried(tiny_src, tmp_path_factory):
    """The default export: expert weights carried from the release."""
    out = tmp_path_factory.mktemp("verify-carried") / "export"
    write_serving_layout(tiny_src, native_snapshot(tiny_src), out, progress=False)
    return out


MTP_WARNING = "MTP drafts will be wrong on vLLM"


def test_good_export_passes_and_is_recorded(export, tiny_src, tiny_bf16, tmp_path):
    r = V.verify(export, source=tiny_src, reference=tiny_bf16, progress=False)
    assert r["verdict"] == "pass", r["reasons"]
    assert [c["status"] for c in r["checks"]] == ["pass"] * 8 + ["warn"]  # 9: MTP experts MXFP4 (released)
    assert MTP_WARNING in r["checks"][8]["detail"] and "warning in check(s) 9" in r["summary"]
    assert r["numbers"]["tensors"] == 96 and r["numbers"]["max_ratio"] <= 1
    assert r["numbers"]["against"] == "release" and r["numbers"]["carried_tensors"] == 0
    assert 0.02 < r["numbers"]["rel_rmse_mean"] < 0.15  # re-quantized NVFP4 on these weights: a few percent
    j, m = V.write_result(r, tmp_path / "run")
    assert json.loads(j.read_text())["verdict"] == "pass"
    text = m.read_text()
    assert "**PASS**" in text and "| 7 |" in text and "drafts correctly on SGLang 0.5.23" in text
    assert not list((tmp_path / "run").glob(".*.tmp"))
    assert "all 9 checks ran" in r["summary"] and V.exit_code(r) == 0
    # globs are escaped in the Markdown table, not rendered as italics (issue 17 item 7)
    assert "'\\*.attn.\\*'" in text and "'*.attn.*'" not in text.split("| # |")[1]


def test_checks_that_did_not_run_are_not_a_pass(export, tiny_src, tiny_bf16, tmp_path, capsys):
    """Item 13: without --source (and --reference) checks 1, 5 and 7 do not run; the verdict was PASS,
    exit 0. Now it is `incomplete`: which checks ran and which did not, exit 4, and the notebooks'
    require_pass stops on it."""
    from quantbook.cli import main

    r = V.verify(export, progress=False)
    assert r["verdict"] == "incomplete" and "not proven" in r["summary"]
    assert "check(s) 2, 3, 4, 6, 8, 9 ran and passed, check(s) 1, 5, 7 did not run" in r["summary"]
    assert {c["id"] for c in r["checks"] if c["status"] == "skip"} == {"1", "5", "7"}
    assert V.exit_code(r) == 4 and "**INCOMPLETE**" in V.format_table(r)
    with pytest.raises(V.VerifyFailed, match="not proven"):
        V.require_pass(r)
    assert main(["verify", str(export), "--run-dir", str(tmp_path / "v")]) == 4
    assert "INCOMPLETE" in capsys.readouterr().out and "PASS" not in V.format_table(r)
    # the BF16 reference alone (step 01's copy of the release's values) gives the same numbers, still incomplete
    by_ref = V.verify(export, reference=tiny_bf16, progress=False)
    by_src = V.verify(export, source=tiny_src, progress=False)
    assert by_ref["verdict"] == "incomplete" and by_src["verdict"] == "pass"
    by_ref, by_src = by_ref["numbers"], by_src["numbers"]
    assert by_ref["against"] == "BF16 reference" and by_ref["rel_rmse_mean"] == by_src["rel_rmse_mean"]
    assert by_ref["blocks_exact"] == by_src["blocks_exact"]
    # a sample says it is one (item 18)
    s = V.verify(export, source=tiny_src, sample=10, progress=False)
    assert s["verdict"] == "pass" and "numbers on a sample of 10 of 96 expert tensors" in s["summary"]
    assert "a sample of 10 of the 96" in s["checks"][6]["detail"]


def test_carried_export_equals_the_release(carried, tiny_src, tiny_bf16):
    """Carried weights: zero error against the release's own values, every block; a carried block changed
    by one code fails check 7 even though it stays within NVFP4's bound."""
    r = V.verify(carried, source=tiny_src, progress=False)
    assert r["verdict"] == "pass", r["reasons"]
    n = r["numbers"]
    assert n["carried_tensors"] == 96 and n["blocks_exact"] == n["blocks"] == 196_608
    assert n["rel_rmse_max"] == 0.0 and n["max_ratio"] == 0.0
    assert V.verify(carried, reference=tiny_bf16, progress=False)["numbers"]["rel_rmse_max"] == 0.0


def test_a_carried_block_that_moved_fails(carried, tiny_src, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(carried, d)

    def one_step(n, t, s, b):  # the first code moved by one E2M1 step: bounded, but no longer the release's
        return [n, t, s, bytes([b[0] ^ 0x01]) + b[1:]]

    _edit(d, {"layers.2.ffn.experts.1.w2.weight"}, one_step)
    (d / MANIFEST).write_text((carried / MANIFEST).read_text())  # as written: the manifest says carried
    r = V.verify(d, source=tiny_src, progress=False)
    failed = {c["id"]: c for c in r["checks"] if c["status"] == "fail"}
    assert set(failed) == {"7", "8"} and "carried from the release with 0 lossy 32-blocks" in failed["7"]["detail"]


def _edit(ck_dir: Path, names: set, fn) -> None:
    """Apply fn(name, dtype, shape, bytes) -> [name, dtype, shape, bytes] | None to named tensors."""
    ck = Checkpoint(ck_dir)
    for shard in sorted({ck.weight_map[n] for n in names}):
        def edit(items):
            out = []
            for name, dtype, shape, b in items:
                r = fn(name, dtype, shape, b) if name in names else [name, dtype, shape, b]
                if r is not None:
                    out.append(r)
            return out
        rewrite_shard(ck_dir, shard, edit)


def _f32(x: float) -> bytes:
    return struct.pack("<f", x)


def _swap_w1_w3(d):
    ck = Checkpoint(d)
    a, b = ck.raw("layers.2.ffn.experts.3.w1.weight"), ck.raw("layers.2.ffn.experts.3.w3.weight")
    _edit(d, {"layers.2.ffn.experts.3.w1.weight", "layers.2.ffn.experts.3.w3.weight"},
          lambda n, t, s, _: [n, t, s, bytes(b if n.endswith("w1.weight") else a)])


def _swap_nibbles(d):
    _edit(d, {"layers.1.ffn.experts.0.w2.weight"},
          lambda n, t, s, b: [n, t, s, bytes(((x & 0xF) << 4) | (x >> 4) for x in b)])


def _w3_scale2(d):
    def f(n, t, s, b):  # the next float32 up
        (bits,) = struct.unpack("<I", b)
        return [n, t, s, struct.pack("<I", bits + 1)]
    _edit(d, {"layers.1.ffn.experts.4.w3.weight_scale_2"}, f)


def _input_zero(d):
    _edit(d, {"layers.0.ffn.experts.0.w2.input_scale"}, lambda n, t, s, b: [n, t, s, _f32(0.0)])


def _input_missing(d):
    _edit(d, {"layers.3.ffn.experts.6.w1.input_scale"}, lambda *a: None)


def _inflated_scales(d):  # every block scale at its maximum and every code 0: errors hidden in a huge unit
    p = "layers.2.ffn.experts.5.w1"
    _edit(d, {f"{p}.weight", f"{p}.weight_scale"},
          lambda n, t, s, b: [n, t, s, bytes(len(b)) if n.endswith(".weight") else bytes([0x7E]) * len(b)])


def _passthrough_byte(d):
    _edit(d, {"layers.1.attn.wo_a.weight"}, lambda n, t, s, b: [n, t, s, bytes([b[0] ^ 1]) + b[1:]])


def _drop_mtp(d):  # all of mtp.* but one norm (the shard stays)
    _edit(d, {n for n in Checkpoint(d).weight_map if n.startswith("mtp.") and n != "mtp.0.norm.weight"},
          lambda *a: None)


def _transformers_name(d):
    _edit(d, {"head.weight"}, lambda n, t, s, b: ["lm_head.weight", t, s, b])


def _json_edit(d, name, fn):
    p = d / name
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj))


def _quant_algo(d):
    _json_edit(d, "config.json", lambda c: c["quantization_config"].update(quant_algo="NVFP4"))


def _expert_dtype(d):
    _json_edit(d, "config.json", lambda c: c.update(expert_dtype="fp8"))


def _ignore_experts(d):
    def f(c):
        c["quantization_config"]["ignore"].append("*.ffn.*")
    _json_edit(d, "config.json", f)


def _moe_algo_missing(d):
    _json_edit(d, "config.json", lambda c: c["quantization_config"].pop("moe_quant_algo"))


def _moe_algo_fp8(d):
    _json_edit(d, "config.json", lambda c: c["quantization_config"].update(moe_quant_algo="FP8"))


def _ignored_layers(d):
    _json_edit(d, "config.json",
               lambda c: c["quantization_config"].update(ignored_layers=["model.layers.0.ffn.experts"]))


def _not_convert(d):
    _json_edit(d, "config.json", lambda c: c["quantization_config"].update(modules_to_not_convert=["re:.*experts.*"]))


def _hf_quant_mismatch(d):
    _json_edit(d, "hf_quant_config.json", lambda c: c["quantization"].update(exclude_modules=["head"]))


def _total_size(d):
    _json_edit(d, INDEX_NAME, lambda c: c["metadata"].update(total_size=c["metadata"]["total_size"] + 1))


def _stray_partial(d):
    (d / "model-00003-of-00007.safetensors.partial").write_bytes(b"half")


def _incomplete(d):
    _json_edit(d, MANIFEST, lambda c: c.update(complete=False))


CORRUPTIONS = {
    "w1/w3 swapped": (_swap_w1_w3, {"7"}),
    "nibbles swapped": (_swap_nibbles, {"7"}),
    "w3 weight_scale_2 one ulp off": (_w3_scale2, {"4"}),
    "input_scale 0": (_input_zero, {"4"}),
    "input_scale missing": (_input_missing, {"4"}),
    "block scales inflated": (_inflated_scales, {"7"}),
    "pass-through byte flipped": (_passthrough_byte, {"5"}),
    "mtp dropped": (_drop_mtp, {"5"}),
    "transformers name": (_transformers_name, {"3", "5"}),
    "quant_algo NVFP4": (_quant_algo, {"2"}),
    "expert_dtype fp8": (_expert_dtype, {"1", "9"}),
    "moe_quant_algo missing": (_moe_algo_missing, {"2", "9"}),
    "moe_quant_algo FP8": (_moe_algo_fp8, {"2", "9"}),
    "ignored_layers covers experts": (_ignored_layers, {"2", "9"}),
    "modules_to_not_convert covers experts": (_not_convert, {"2", "9"}),
    "ignore matches experts": (_ignore_experts, {"2"}),
    "hf_quant_config differs": (_hf_quant_mismatch, {"2"}),
    "total_size wrong": (_total_size, {"6"}),
    "stray partial shard": (_stray_partial, {"6"}),
    "writer did not finish": (_incomplete, {"8"}),
    "shard changed after the export": (_input_missing, {"4", "8"}),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_defect_fails_its_check(kind, export, tiny_src, tmp_path):
    damage, failing = CORRUPTIONS[kind]
    d = tmp_path / "export"
    shutil.copytree(export, d)
    if "8" not in failing:  # as if written by another tool: shard sizes then go unchecked by check 8
        (d / MANIFEST).unlink()
    damage(d)
    r = V.verify(d, source=tiny_src, progress=False)
    assert r["verdict"] == "fail"
    assert {c["id"] for c in r["checks"] if c["status"] == "fail"} == failing, r["reasons"]


ENGINE_REASONS = {
    "expert_dtype fp8": "vLLM 0.33 builds them fp8: expert_dtype fp8",
    "moe_quant_algo missing": "builds them mxfp4: no moe_quant_algo",
    "moe_quant_algo FP8": "builds them other: moe_quant_algo 'FP8'",
    "ignored_layers covers experts": "ignored_layers entry 'model.layers.0.ffn.experts' covers layers.0.ffn.experts",
    "modules_to_not_convert covers experts": "modules_to_not_convert entry 're:.*experts.*'",
}


@pytest.mark.parametrize("kind", list(ENGINE_REASONS))
def test_engine_check_says_why(kind, export, tmp_path):
    """Check 9 names what vLLM 0.33 would build the experts as, and which config key makes it."""
    d = tmp_path / "export"
    shutil.copytree(export, d)
    CORRUPTIONS[kind][0](d)
    check = {c["id"]: c for c in V.verify(d, progress=False)["checks"]}["9"]
    assert check["status"] == "fail" and ENGINE_REASONS[kind] in check["detail"], check["detail"]


def test_every_expert_missing_a_tensor_is_named(export, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(export, d)
    (d / MANIFEST).unlink()
    gone = {f"layers.{i}.ffn.experts.{j}.w{k}.input_scale" for i, j, k in
            [(0, 1, 1), (0, 2, 2), (1, 3, 3), (1, 4, 1), (2, 5, 2), (3, 6, 3), (3, 7, 1)]}
    gone.add("layers.2.ffn.experts.0.w2.weight_scale_2")
    _edit(d, gone, lambda *a: None)
    r = V.verify(d, progress=False)
    assert r["verdict"] == "fail"
    missing = r["missing_expert_tensors"]
    assert {f"{p}.{s}" for p, ss in missing.items() for s in ss} == gone  # all 8, more than a check's detail shows
    assert missing["layers.2.ffn.experts.0.w2"] == ["weight_scale_2"]
    table = V.format_table(r)
    for p, ss in missing.items():
        assert f"- {p}: {', '.join(ss)}" in table


@pytest.fixture(scope="module")
def generic_exports(tiny_chain, tiny_nvfp4):
    """modelopt's generic export of the tiny model through the modelopt driver: full NVFP4 and experts-only."""
    return {"nvfp4": tiny_nvfp4["export"], "nvfp4_experts_only": tiny_chain["generic"]}


def test_generic_export_is_research_only_with_reasons(generic_exports, tiny_bf16, tmp_path):
    from safetensors.torch import load_file, save_file

    r = V.verify(generic_exports["nvfp4"], reference=tiny_bf16, progress=False)
    assert r["verdict"] == "research-only" and "not loadable by vLLM/SGLang" in r["summary"]
    text = "\n".join(r["reasons"])
    for why in ("quant_method is 'modelopt'", "transformers names", "hc_head.hc_fn",
                "attention projections are NVFP4", "compressor/indexer projections are NVFP4",
                "norms stored F32"):
        assert why in text, why
    assert "no mtp.*" not in text  # the drivers carry the checkpoint's MTP tensors into the export
    dropped = tmp_path / "no-mtp"  # what a bare export_hf_checkpoint of the transformers model writes
    shutil.copytree(generic_exports["nvfp4"], dropped)
    t = load_file(str(dropped / "model.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith("mtp.")}, str(dropped / "model.safetensors"))
    assert "no mtp.* tensors (transformers drops the MTP block on load)" in V.generic_reasons(
        Checkpoint(dropped), json.loads((dropped / "config.json").read_text()))
    # the verifier's numbers hold for modelopt's own NVFP4 of attention and experts alike
    assert r["checks"][0]["status"] == "pass", r["checks"][0]["detail"]
    assert r["numbers"]["tensors"] > 96 and r["numbers"]["max_ratio"] <= 1
    r = V.verify(generic_exports["nvfp4_experts_only"], progress=False)
    text = "\n".join(r["reasons"])
    assert r["verdict"] == "research-only"
    assert "wo_a is BF16" in text and "attention projections are NVFP4" not in text
    assert "Why it is not loadable" in V.format_table(r)


def test_a_numerically_wrong_generic_export_fails(generic_exports, tiny_bf16, tmp_path):
    """Item 14: a generic export was research-only whatever its numbers (exit 3, and notebook 02's
    require_pass let it through). A failed numeric check now fails it: exit 1, require_pass raises."""
    bad = tmp_path / "bad"
    shutil.copytree(generic_exports["nvfp4_experts_only"], bad)
    from safetensors.torch import load_file, save_file

    ck = Checkpoint(bad)
    name = next(n for n in sorted(ck.weight_map) if n.endswith(".weight_scale_2"))[: -len("_scale_2")]
    path = bad / ck.weight_map[name]
    t = load_file(str(path))
    t[name] = torch.full_like(t[name], 0x77)  # every code 6.0: far over the bound
    save_file(t, str(path), metadata={"format": "pt"})
    r = V.verify(bad, reference=tiny_bf16, progress=False)
    assert r["verdict"] == "fail" and r["checks"][0]["status"] == "fail"
    assert r["summary"].startswith("fail: check 7 (numbers) failed") and V.exit_code(r) == 1
    with pytest.raises(V.VerifyFailed):
        V.require_pass(r)


def test_cli_exit_codes(export, generic_exports, tiny_src, tmp_path, capsys):
    from quantbook.cli import main

    assert main(["verify", str(export), "--source", str(tiny_src), "--run-dir", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "verify.json").read_text())["verdict"] == "pass"
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    _input_zero(bad)
    assert main(["verify", str(bad), "--run-dir", str(tmp_path / "b")]) == 1
    assert main(["verify", str(generic_exports["nvfp4"]), "--run-dir", str(tmp_path / "c")]) == 3
    assert "RESEARCH-ONLY" in capsys.readouterr().out


def test_numeric_bound_holds_for_modelopt_nvfp4_and_catches_errors():
    """Blocks of every magnitude (E4M3 subnormal and clamped scales, zero blocks) stay within the
    bound under modelopt's quantizer; a code moved by one step, or a lower weight amax, does not."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    mag = torch.logspace(0, -9, 64 * 16, base=10.0).reshape(64, 16, 1)  # 1 down to 1e-9 per block
    w = (w.reshape(64, 16, 16) * mag).reshape(64, 256)
    w[3, 32:48] = 0
    w = w.to(torch.bfloat16)
    ws2 = (w.float().abs().amax() / (6 * 448)).reshape(())
    scale = NVFP4QTensor.get_weights_scaling_factor(w, 16, ws2)[0]
    codes = NVFP4QTensor.quantize(w, 16, scale, ws2)[0]._quantized_data
    r = V.nvfp4_error(codes, scale, ws2, w)
    assert r["max_ratio"] <= 1 and r["blocks_over"] == 0 and r["bad_block_scales"] == 0
    assert r["max_ratio"] > 0.3  # the bound is not loose by orders of magnitude
    moved = codes.clone()
    moved[0, 0] = (moved[0, 0] & 0xF0) | ((moved[0, 0] & 0xF) ^ 0x2)  # low nibble moved on the grid
    assert V.nvfp4_error(moved, scale, ws2, w)["blocks_over"] >= 1
    small = (ws2 / 4).reshape(())  # weight amax too low: saturation beyond what E4M3 rounding allows
    scale2 = NVFP4QTensor.get_weights_scaling_factor(w, 16, small)[0]
    codes2 = NVFP4QTensor.quantize(w, 16, scale2, small)[0]._quantized_data
    assert V.nvfp4_error(codes2, scale2, small, w)["blocks_over"] >= 1


GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_export_check.py"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (modelopt's NVFP4 fake-quant forward)")
def test_gpu_logits_fake_quant_vs_rebuilt_from_export(tiny_src, tiny_bf16, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_export_check", GPU_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.run_check(tiny_bf16, tiny_src, tmp_path / "out")
    assert result["cpu_cuda_export_identical"], result
    assert result["weights_identical"], result
    # the README's claim as it is stated: max abs difference 0.0, top-1 agreement 1.0 (not 1e-3 x max|logit|, 0.99)
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] == 0.0, result
    assert result["ok"], result
