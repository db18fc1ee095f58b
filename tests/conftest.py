"""Shared fixtures: tiny V4 checkpoints in the released format, built once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """A 4-layer tiny V4 (Flash-shaped config) in the released FP8/FP4 format. Read-only."""
    from quantbook.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "DeepSeek-V4-tiny-FP8", seed=0)


@pytest.fixture(scope="session")
def tiny_bf16(tiny_src, tmp_path_factory):
    """`tiny_src` dequantized to BF16 by step 01. Read-only."""
    from quantbook.convert import dequantize

    dst = tmp_path_factory.mktemp("tiny_bf16") / "DeepSeek-V4-tiny-BF16"
    dequantize(tiny_src, dst, workers=2, progress=False)
    return dst
