"""A full-size release made of sparse files: the real shard layout, headers and sizes, data as holes."""

from __future__ import annotations

import pytest
import torch

from quantbook.release import convert
from quantbook.release.format import FLASH_CONFIG, PRO_CONFIG, load_config
from quantbook.release.shards import Checkpoint, read_index
from quantbook.release.sparse import allocated_bytes, write_sparse_release

# the real releases' listings (../shared/docs/deepseek-v4-format.md): tensors, shards, tensor bytes
REAL = {"pro": (PRO_CONFIG, 145_116, 64, 864_704_792_696), "flash": (FLASH_CONFIG, 69_187, 46, 159_609_485_896)}


@pytest.mark.parametrize("like", sorted(REAL))
def test_full_size_release_as_holes(like, tmp_path):
    config, tensors, shards, nbytes = REAL[like]
    out = write_sparse_release(config, tmp_path / like)
    index = read_index(out)
    assert len(index["weight_map"]) == tensors and len(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == nbytes
    assert allocated_bytes(out) < 64 * 2**20  # headers only, whatever the apparent size
    p = convert.plan(out, tmp_path / "bf16")  # step 01's validation of every header passes
    assert p.bytes_in == nbytes and len(p.shards) == shards
    assert load_config(out) == load_config(config)


def test_fill_writes_the_chosen_tensors(tmp_path):
    cfg = load_config(FLASH_CONFIG)
    wanted = "layers.1.ffn.experts.5.w2.weight"

    def fill(spec):
        if spec.name != wanted:
            return None
        return torch.arange(spec.nbytes, dtype=torch.int64).remainder(251).to(torch.uint8).numpy().tobytes()

    out = write_sparse_release(cfg, tmp_path / "f", fill=fill)
    ck = Checkpoint(out)
    got = ck.tensor(wanted).view(torch.uint8).reshape(-1)
    assert got[:300].tolist() == [i % 251 for i in range(300)] and got.shape[0] == 4096 * 1024
    assert not ck.tensor("layers.1.ffn.experts.4.w2.weight").view(torch.uint8).any()  # a hole reads as zeros
    with pytest.raises(Exception, match="not empty"):
        write_sparse_release(cfg, tmp_path / "f")
