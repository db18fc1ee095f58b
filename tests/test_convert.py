"""Step 01 behaviour: validation before writing, destination rules, outputs, resume, memory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_edit import copy_checkpoint, corrupt_header, rewrite_shard
from quantbook.release import convert, resume
from quantbook.errors import DestinationError
from quantbook.errors import FormatError
from quantbook.release.format import load_config
from quantbook.release.shards import read_header, read_index


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- validation before any byte


def _layer_shard(ckpt, layer=2):
    return read_index(ckpt)["weight_map"][f"layers.{layer}.attn.wq_a.weight"]


BROKEN = {
    "weight without scale": (lambda items: [i for i in items if i[0] != "layers.2.attn.wq_a.scale"],
                             "quantized weight layers.2.attn.wq_a.weight has no scale"),
    "scale without weight": (lambda items: [i for i in items if i[0] != "layers.2.attn.wq_a.weight"],
                             "scale layers.2.attn.wq_a.scale has no weight layers.2.attn.wq_a.weight"),
    "scale of wrong shape": (lambda items: [[n, d, (s[0], s[1] + 1), b + b"\x7f" * s[0]] if n == "layers.2.attn.wkv.scale"
                                            else [n, d, s, b] for n, d, s, b in items],
                             "scale layers.2.attn.wkv.scale: shape"),
    "unknown dtype": (lambda items: [[n, "F16" if n == "layers.2.attn_norm.weight" else d, s, b] for n, d, s, b in items],
                      "tensor layers.2.attn_norm.weight: dtype F16"),
    "FP8 scale dtype read as I8 weight": (lambda items: [[n, "I8" if n == "layers.2.attn.wq_b.weight" else d, s, b]
                                                          for n, d, s, b in items],
                                          "tensor layers.2.attn.wq_b.weight: dtype I8"),
    "name outside the format": (lambda items: items + [["layers.2.attn.wq_c.weight", "BF16", (2,), b"\0" * 4]],
                                "tensor layers.2.attn.wq_c.weight (BF16[2]) is not part of the V4 format"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_tensor_is_refused_before_writing(tiny_src, tmp_path, case):
    edit, message = BROKEN[case]
    ckpt = copy_checkpoint(tiny_src, tmp_path / "src")
    shard = _layer_shard(ckpt)
    rewrite_shard(ckpt, shard, edit)
    dst = tmp_path / "dst"
    with pytest.raises(FormatError) as e:
        convert.dequantize(ckpt, dst, progress=False)
    assert message in str(e.value)
    assert f"shard {shard}" in str(e.value)
    assert not dst.exists()


def test_missing_truncated_and_corrupt_shards(tiny_src, tmp_path):
    shard = _layer_shard(tiny_src, 3)
    cases = {
        "missing": (lambda p: p.unlink(), f"shard {shard}: file is missing"),
        "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), f"shard {shard}: truncated"),
        "corrupt": (corrupt_header, f"shard {shard}: corrupt header"),
    }
    for what, (damage, message) in cases.items():
        ckpt = copy_checkpoint(tiny_src, tmp_path / what)
        damage(ckpt / shard)
        with pytest.raises(FormatError, match=message):
            convert.dequantize(ckpt, tmp_path / f"out-{what}", progress=False)
        assert not (tmp_path / f"out-{what}").exists(), what


def test_validation_reads_every_header_before_writing(tiny_src, tmp_path):
    """A fault in the LAST shard stops the run before the first shard is written."""
    ckpt = copy_checkpoint(tiny_src, tmp_path / "src")
    last = sorted(set(read_index(ckpt)["weight_map"].values()))[-1]
    corrupt_header(ckpt / last)
    with pytest.raises(FormatError, match=last):
        convert.dequantize(ckpt, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------- destination rules


def test_destination_rules(tiny_src, tmp_path, monkeypatch):
    with pytest.raises(DestinationError, match="is the source, inside it or around it"):
        convert.plan(tiny_src, tiny_src) and convert.check_destination(convert.plan(tiny_src, tiny_src))
    with pytest.raises(DestinationError, match="is the source, inside it or around it"):
        convert.check_destination(convert.plan(tiny_src, tiny_src / "bf16"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not empty and holds no"):
        convert.check_destination(convert.plan(tiny_src, foreign))
    other = tmp_path / "other-src"
    from quantbook.release.tiny import make_tiny
    make_tiny(other, seed=1)
    dst = tmp_path / "dst"
    convert.dequantize(other, dst, progress=False)
    with pytest.raises(DestinationError, match="holds a run of another source"):
        convert.check_destination(convert.plan(tiny_src, dst))
    monkeypatch.setattr(resume, "free_disk", lambda path: 1000)
    with pytest.raises(DestinationError, match=r"GiB still to write, 0.00 GiB free"):
        convert.check_destination(convert.plan(tiny_src, tmp_path / "new"))


# ---------------------------------------------------------------- what the output holds


def test_output_config_index_and_files(tiny_src, tiny_bf16):
    cfg = json.loads((tiny_bf16 / "config.json").read_text())
    src_cfg = load_config(tiny_src)
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    assert {k: v for k, v in cfg.items() if k != "dtype"} == {
        k: v for k, v in src_cfg.items() if k not in ("quantization_config", "expert_dtype", "torch_dtype")}
    index = read_index(tiny_bf16)
    headers = {s: read_header(tiny_bf16 / s) for s in set(index["weight_map"].values())}
    assert index["metadata"]["total_size"] == sum(e.nbytes for h in headers.values() for e in h.tensors.values())
    assert {n for h in headers.values() for n in h.tensors} == set(index["weight_map"])
    assert any(n.startswith("mtp.0.") for n in index["weight_map"])
    assert not any(n.endswith(".scale") for n in index["weight_map"])
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_bf16 / name).read_bytes() == (tiny_src / name).read_bytes()
    manifest = json.loads((tiny_bf16 / convert.MANIFEST).read_text())
    acct = manifest["accounting"]
    assert manifest["complete"] is True
    by = acct["by_dtype"]
    assert acct["scales_consumed"] == by["F8_E8M0"]["tensors_in"]
    assert by["BF16"]["tensors_out"] == by["BF16"]["tensors_in"] + acct["fp8_weights"] + acct["fp4_weights"]
    assert sum(r["bytes_out"] for r in by.values()) == index["metadata"]["total_size"]
    assert sum(r["bytes_in"] for r in by.values()) == read_index(tiny_src)["metadata"]["total_size"]


def test_transformers_loads_both_and_agrees(tiny_src, tiny_bf16):
    """The release loads with dequantize-on-load, the BF16 output loads plainly, with no missing or
    unexpected keys; their weights agree exactly up to the sign of zero (a third implementation)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    ref, info_ref = AutoModelForCausalLM.from_pretrained(
        tiny_src, quantization_config=FineGrainedFP8Config(dequantize=True), output_loading_info=True)
    ours, info = AutoModelForCausalLM.from_pretrained(tiny_bf16, dtype="auto", output_loading_info=True)
    assert type(ours).__name__ == "DeepseekV4ForCausalLM"
    for i in (info_ref, info):
        assert not i["missing_keys"] and not i["unexpected_keys"] and not i["mismatched_keys"], i
    theirs = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k].to(v.dtype)), k  # torch.equal: -0.0 == +0.0


def test_verify_sample_and_workers_agree(tiny_src, tiny_bf16, tmp_path):
    rows = convert.verify_sample(convert.plan(tiny_src, tiny_bf16), n=12)
    assert rows and all(r["identical"] for r in rows)
    one = tmp_path / "one"
    convert.dequantize(tiny_src, one, workers=1, progress=False, chunk_elems=1 << 12)
    assert _files(one).keys() == _files(tiny_bf16).keys()
    for name, data in _files(tiny_bf16).items():
        if name != convert.MANIFEST:
            assert _files(one)[name] == data, name


def test_rerun_skips_verified_and_redoes_damaged(tiny_src, tmp_path):
    dst = tmp_path / "dst"
    convert.dequantize(tiny_src, dst, progress=False)
    before = _files(dst)
    acct = convert.dequantize(tiny_src, dst, progress=False)
    assert acct["shards_written"] == 0 and acct["shards_skipped"] == len(convert.plan(tiny_src, dst).shards)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    acct = convert.dequantize(tiny_src, dst, progress=False)
    assert acct["shards_written"] == 1
    after = _files(dst)
    assert {k: v for k, v in after.items() if k != convert.MANIFEST} == {
        k: v for k, v in before.items() if k != convert.MANIFEST}


# ---------------------------------------------------------------- kill -9 and memory


def _random_src(tmp_path_factory, name, layers, experts, **dims):
    from quantbook.release.format import FLASH_CONFIG
    from quantbook.release.tiny import random_code_tensors, tiny_config, write_checkpoint

    cfg = tiny_config(load_config(FLASH_CONFIG), layers=layers, experts=experts)
    cfg.update(dims)
    out = tmp_path_factory.mktemp(name) / "src"
    out.mkdir()
    return write_checkpoint(cfg, out, seed=3, tensors=random_code_tensors)


@pytest.fixture(scope="module")
def medium_src(tmp_path_factory):
    """4 layers, 32 experts of 512x512: ~60 MB of BF16 per layer shard, random valid codes; 7 shards (each
    kill-and-rerun attempt of the kill -9 test costs a fresh interpreter, so no more shards than needed for
    kills mid-shard and between shards, again and again)."""
    return _random_src(tmp_path_factory, "medium", 4, 32, hidden_size=512, moe_intermediate_size=512)


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory):
    """2 layers with V4 Flash's real expert shape (2048x4096): 16 MiB per BF16 expert weight."""
    return _random_src(tmp_path_factory, "wide", 2, 4, hidden_size=4096, moe_intermediate_size=2048)


def _cli(*args):
    return [sys.executable, "-m", "quantbook.cli", *map(str, args)]


def _recorded(dst: Path) -> int:
    try:
        return len(json.loads((dst / convert.MANIFEST).read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_kill_9_at_any_moment_then_rerun_is_identical(medium_src, tmp_path):
    """SIGKILL mid-shard (a .partial on disk) and between shards, again and again; then finish."""
    ref = tmp_path / "ref"
    subprocess.run(_cli("dequant", medium_src, ref, "--workers", "2"), check=True, capture_output=True)
    expected = _files(ref)
    dst = tmp_path / "dst"
    kills = {"mid-shard": 0, "after a recorded shard": 0}
    for attempt in range(40):
        before = _recorded(dst)
        proc = subprocess.Popen(_cli("dequant", medium_src, dst, "--workers", "2", "--chunk-elems", 1 << 14),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        want = "mid-shard" if attempt % 2 == 0 else "after a recorded shard"
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            if (want == "mid-shard" and any(dst.glob("*.partial"))) or \
                    (want != "mid-shard" and _recorded(dst) > before):
                os.kill(proc.pid, signal.SIGKILL)
                kills[want] += 1
                break
            time.sleep(0.005)
        if proc.wait() == 0:
            break
        for p in dst.glob("model-*.safetensors"):  # nothing half-written under a shard's name
            read_header(p)
    assert min(kills.values()) >= 1 and sum(kills.values()) >= 3, kills
    subprocess.run(_cli("dequant", medium_src, dst, "--workers", "2"), check=True, capture_output=True)
    got = _files(dst)
    assert got.keys() == expected.keys()
    for name in expected:
        if name != convert.MANIFEST:
            assert got[name] == expected[name], name


def _peak_rss_mib(args=None) -> float:
    """Peak RSS of a fresh interpreter running the CLI with `args` (None: imports only)."""
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss
    code = ("import sys; from quantbook.cli import main; import torch, tqdm.auto, safetensors;"
            "rc=main(sys.argv[1:]) if len(sys.argv)>1 else 0;"
            "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
            "print(int(hwm.split()[1])/1024); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args or [])], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_memory_stays_bounded(wide_src, tmp_path):
    """Peak RSS above the bare interpreter stays under convert.memory_bound for small and large
    chunks, while converting whole tensors at once (no chunking) breaks that bound."""
    baseline = _peak_rss_mib()
    for chunk in (1 << 16, 1 << 20):
        peak = _peak_rss_mib(["dequant", wide_src, tmp_path / f"c{chunk}", "--workers", "2", "--chunk-elems", chunk])
        bound = convert.memory_bound(2, chunk) / 2**20
        print(f"chunk {chunk}: {peak - baseline:.0f} MiB above the interpreter, bound {bound:.0f} MiB")
        assert peak - baseline < bound
    whole = _peak_rss_mib(["dequant", wide_src, tmp_path / "whole", "--workers", "2", "--chunk-elems", 1 << 30])
    print(f"whole tensors: {whole - baseline:.0f} MiB")
    assert whole - baseline > convert.memory_bound(2, 1 << 16) / 2**20  # the measurement sees a violation
