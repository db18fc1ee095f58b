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


def test_layout_plan_at_pro_scale(pro_release, tmp_path):
    """Step 03's plan on the full-size Pro release (the run's shared one: `write_sparse_release` of
    PRO_CONFIG, read-only) with a complete synthetic amax (no weight is read: every amax is usable,
    so no fill needs the release's bytes): every shard planned, the sizes the preflight computes
    from config.json alone."""
    from quantbook.export import layout

    out = pro_release
    cfg = load_config(out)
    L, E = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    amax = {f"layers.{i}.ffn.experts.{j}.{p}.{role}_quantizer._amax": torch.tensor(1.0 + j / E)
            for i in range(L) for j in range(E) for p in ("w1", "w2", "w3") for role in ("weight", "input")}
    p = layout.plan(out, tmp_path / "nvfp4", amax, cast_mxfp4_to_nvfp4=False)  # weight amax used too
    assert p.resolved.fills == [] and p.resolved.calibrated == {"weight": L * E * 3, "input": L * E * 3}
    assert len(p.jobs) == 64 and {j.name: j.bytes_out for j in p.jobs} == layout.shard_bytes(cfg)
    assert p.bytes_out == 913_061_485_688
    assert len(p.weight_map) == PRO_TENSORS_OUT


# every released tensor but the main layers' expert weight + scale (2 per projection), which become 4
PRO_TENSORS_OUT = 145_116 - 2 * 61 * 384 * 3 + 4 * 61 * 384 * 3


def test_resource_estimates_at_pro_scale(tmp_path):
    """Step 02's estimate on a full-size BF16 copy made of holes (3.2 TB apparent): the model bytes from
    its 64 shard headers equal the BF16 size the config implies (what the preflight and the drivers'
    `memory_need` use before the copy exists), and this machine is refused with the sizes."""
    from quantbook.calibrate import resources
    from quantbook.calibrate.settings import normalize
    from quantbook.errors import QuantizeError
    from quantbook.release.format import bf16_config, bf16_groups

    bf16 = write_sparse_release(PRO_CONFIG, tmp_path / "bf16", bf16=True)
    assert allocated_bytes(bf16) < 64 * 2**20 and load_config(bf16) == bf16_config(load_config(PRO_CONFIG))
    q = normalize({"export_generic": True, "hf_ptq": {"pyt_ckpt_path": str(bf16), "export_path": str(tmp_path / "exp"),
                                                      "device": "cpu", "qformat": "nvfp4_experts_only", "batch_size": 16}})
    r = resources.estimate_resources(q, tmp_path / "run")
    need = resources.registry.get("modelopt").memory_need(load_config(bf16), {}, q)
    assert r["model_bytes"] == need.model == 3_197_868_864_632
    tensors = [(t.name, t.shape, t.nbytes) for g in bf16_groups(load_config(bf16)) for t in g]
    assert r["export_bytes"] == resources.export_bytes(tensors, q["hf_ptq"])  # the preflight's, from config
    assert r["memory"]["host_need"] == need.model
    with pytest.raises(QuantizeError, match=r"memory: the whole BF16 model \(61 layers, 2.91 TiB\): 2,978.25 GiB"):
        resources.check_resources(q, tmp_path / "run")
    no_export = resources.estimate_resources({**q, "export_generic": False}, tmp_path / "run")  # the default
    assert no_export["export_bytes"] == 0 and "export" not in no_export["disk"]
