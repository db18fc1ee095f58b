"""The packaged TRAINED tiny V4 release (`release/trained/`, written by scripts/train_tiny.py).

It must be a valid release (the same header validation step 01 runs), exactly the files its
TRAINING.json lists, what `tiny: {trained: true}` and `make-tiny --trained` put in place, and a
model that has learned something: its held-out perplexity far below a random tiny's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from quantbook.cli import main
from quantbook.errors import FormatError
from quantbook.release import tiny
from quantbook.release.convert import plan
from quantbook.release.format import FLASH_CONFIG, load_config

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "work" / "calib" / "english-heldout.jsonl"


def test_packaged_release_validates(tmp_path):
    p = plan(tiny.TRAINED_DIR, tmp_path / "bf16")  # every header, the index, names, dtypes, shapes, pairs
    assert p.config == tiny.tiny_config(load_config(FLASH_CONFIG), layers=4)
    cfg = p.config
    blocks = cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]
    assert p.accounting["fp4_weights"] == blocks * cfg["n_routed_experts"] * 3
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(p.extra_files)


def test_files_match_training_record(tmp_path):
    files = tiny.verify_trained()
    rec = tiny.trained_record()
    on_disk = sorted(x.name for x in tiny.TRAINED_DIR.iterdir() if x.is_file())
    assert sorted(files) == on_disk and "model.safetensors.index.json" in files
    assert rec["heldout_ppl_release"] < 0.1 * rec["heldout_ppl_random_tiny"]
    assert rec["steps"] > 0 and rec["versions"]["transformers"] and rec["seed"] == 0

    bad = tmp_path / "copy"
    shutil.copytree(tiny.TRAINED_DIR, bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="sha256"):
        tiny.verify_trained(bad)


def test_build_if_missing_copies_trained(tmp_path):
    src = tmp_path / "work" / "DeepSeek-V4-tiny-FP8"
    assert tiny.build_if_missing(src, {"like": "flash", "seed": 0, "layers": 4, "trained": True})
    assert tiny.verify_trained(src) == tiny.trained_record()["files"]
    assert not tiny.build_if_missing(src, {"trained": True})  # exists: left alone


def test_params_tiny_asks_for_the_trained_release():
    import yaml

    spec = yaml.safe_load((REPO / "params" / "tiny.yaml").read_text())["tiny"]
    assert spec["trained"] is True
    tiny.check_trained_spec(spec)
    assert tiny.section_config(spec) == load_config(tiny.TRAINED_DIR)


@pytest.mark.parametrize("key,value", [("layers", 2), ("experts", 4), ("like", "pro")])
def test_mismatching_spec_refused(tmp_path, key, value):
    with pytest.raises(FormatError, match=f"{key}: {value}"):
        tiny.build_if_missing(tmp_path / "x", {"like": "flash", "layers": 4, "trained": True, key: value})
    assert not (tmp_path / "x").exists()


def test_cli_make_tiny_trained(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["make-tiny", str(out), "--trained"]) == 0
    assert "TRAINING.json" in capsys.readouterr().out
    tiny.verify_trained(out)
    assert main(["make-tiny", str(tmp_path / "u"), "--trained", "--layers", "2"]) == 2
    assert "layers: 2" in capsys.readouterr().err and not (tmp_path / "u").exists()


def _heldout_perplexity(bf16: Path, texts: list[str], tokens: int = 128) -> float:
    """exp(mean next-token cross entropy) of a release dequantized exactly by step 01 (`bf16`), loaded
    by transformers (BF16, eager), on the first `tokens` tokens (BOS + bytes) of each text."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16, attn_implementation="eager").eval()
    model.config._experts_implementation = "eager"
    tok = Tokenizer.from_file(str(bf16 / "tokenizer.json"))
    ids = torch.tensor([([model.config.bos_token_id] + tok.encode(t).ids)[:tokens] for t in texts])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.skipif(not HELDOUT.is_file(), reason=f"{HELDOUT.relative_to(REPO)} missing: the held-out text is "
                    "written at set-up (`quantbook calib-data work/calib/english.jsonl`), never committed")
def test_heldout_perplexity_far_below_random(tmp_path, tiny_bf16):
    """The release as served (exact dequantization, BF16 forward) against the random seed-0 tiny
    (conftest's `tiny_bf16`, the same path), on 4 held-out samples x 128 tokens."""
    import torch

    from quantbook.release.convert import dequantize

    texts = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines()[:4]]
    dequantize(tiny.TRAINED_DIR, tmp_path / "trained-bf16", workers=1, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared cores, one thread is many times faster than two at this size
    try:
        trained = _heldout_perplexity(tmp_path / "trained-bf16", texts)
        random_ppl = _heldout_perplexity(tiny_bf16, texts)
    finally:
        torch.set_num_threads(threads)
    assert trained < 0.1 * random_ppl, (trained, random_ppl)
    assert trained < 2 * tiny.trained_record()["heldout_ppl_release"], trained
