"""Step 02's refused settings: each known failure of the predecessor is refused with its reason."""

import copy
import warnings
from pathlib import Path

import pytest

from quantbook.calibrate.checks import calib_samples, check_quantize_settings, is_v4, is_v4_pro
from quantbook.errors import ParamsError
from quantbook.params import load_params
from quantbook.release.format import FLASH_CONFIG, PRO_CONFIG, bf16_config, load_config
from quantbook.release.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PRO_RELEASED = load_config(PRO_CONFIG)
PRO_BF16 = bf16_config(PRO_RELEASED)
TINY_BF16 = bf16_config(tiny_config(load_config(FLASH_CONFIG)))


@pytest.fixture
def production():
    """The quantize section of the B200 params file, as the notebook would read it."""
    return copy.deepcopy(load_params(ROOT / "params" / "v4_pro_b200.yaml")["quantize"])


def refused(q, config, *needles):
    with pytest.raises(ParamsError) as e:
        check_quantize_settings(q, config)
    for n in needles:
        assert n in str(e.value), f"{n!r} not in: {e.value}"
    return str(e.value)


def test_production_params_pass_and_read_the_bf16_copy(production):
    params = load_params(ROOT / "params" / "v4_pro_b200.yaml")
    assert production["hf_ptq"]["pyt_ckpt_path"] == params["dequant"]["destination"]  # YAML anchor
    s = production["hf_ptq"]
    assert (s["qformat"], s["kv_cache_qformat"], s["calib_seq"]) == ("nvfp4_experts_only", "fp8_cast", 512)
    assert sum(n for _, n in calib_samples(s)) == 128
    assert s["use_seq_device_map"] is True and s["gpu_max_mem_percentage"] == 0.7
    assert s["inference_tensor_parallel"] == 8
    check_quantize_settings(production, PRO_BF16)
    check_quantize_settings(production, None)


def test_config_kinds():
    assert is_v4(PRO_BF16) and is_v4_pro(PRO_BF16) and is_v4(TINY_BF16) and not is_v4_pro(TINY_BF16)
    assert not is_v4({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) and not is_v4(None)


@pytest.mark.parametrize("bad, right", [("quant", "qformat"), ("calib", "calib_size"),
                                        ("kv_cache_quant", "kv_cache_qformat"), ("tp", "inference_tensor_parallel"),
                                        ("--quant", "qformat")])
def test_shell_script_flag_names_refused_with_the_right_names(production, bad, right):
    production["hf_ptq"][bad] = "nvfp4"
    msg = refused(production, PRO_BF16, f"`{right}`", "shell-script")
    for hf_name in ("--qformat", "--calib_size", "--kv_cache_qformat", "--inference_tensor_parallel"):
        assert hf_name in msg


def test_low_memory_mode_refused_for_v4(production):
    production["hf_ptq"]["low_memory_mode"] = True
    refused(production, PRO_BF16, "low_memory_mode", "meta")
    refused(production, None, "low_memory_mode")  # unknown model: this project only quantizes V4
    production["hf_ptq"]["low_memory_mode"] = False
    check_quantize_settings(production, PRO_BF16)
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    check_quantize_settings({**production, "hf_ptq": {**production["hf_ptq"], "low_memory_mode": True}}, llama)


def test_fp8_source_refused(production):
    production["hf_ptq"]["pyt_ckpt_path"] = "/data/models/DeepSeek-V4-Pro-FP8"
    refused(production, PRO_RELEASED, "quantized", "'fp8'", "BF16 copy", "run 1")


@pytest.mark.parametrize("dataset, calib_size, total", [
    (["cnn_dailymail"], 256, 256),
    (["cnn_dailymail", "nemotron-post-training-dataset-v2"], 128, 256),  # one value is taken from EACH dataset
    ("cnn_dailymail,nemotron-post-training-dataset-v2", "200,100", 300),
    (None, None, 1024),  # hf_ptq's defaults: the cnn_nemotron_v2_mix combo, 1024 samples
])
def test_256_samples_on_the_pro_node_refused(production, dataset, calib_size, total):
    production["hf_ptq"].update(dataset=dataset, calib_size=calib_size)
    msg = refused(production, PRO_BF16, "calib_size", f"{total} calibration samples", "host memory")
    assert "EACH dataset" in msg
    refused(production, None, f"{total} calibration samples")
    check_quantize_settings(production, TINY_BF16)  # the limit is the Pro node's memory, not a rule for tiny


def test_calib_samples_follows_hf_ptq_padding():
    assert calib_samples({"dataset": "a,b,c", "calib_size": "8,4"}) == [("a", 8), ("b", 4), ("c", 4)]
    assert calib_samples({"dataset": ["a"], "calib_size": [8, 4]}) == [("a", 8)]
    assert calib_samples({"dataset": "x.jsonl", "calib_size": 16}) == [("x.jsonl", 16)]
    assert calib_samples({}) == [("cnn_nemotron_v2_mix", 1024)]
    with pytest.raises(ParamsError, match="calib_size"):
        calib_samples({"calib_size": "many"})
    with pytest.raises(ParamsError, match="positive"):
        calib_samples({"calib_size": [16, 0]})


@pytest.mark.parametrize("bs", [None, 0, -1, "4", True])
def test_batch_size_must_be_set(production, bs):
    production["hf_ptq"]["batch_size"] = bs
    refused(production, PRO_BF16, "batch_size", "probe")


def test_every_problem_reported_at_once(production):
    production["hf_ptq"].update(low_memory_mode=True, tp=8, calib_size=256, batch_size=0)
    production["driver"] = "hfptq"
    msg = refused(production, PRO_BF16)
    for n in ("low_memory_mode", "inference_tensor_parallel", "512 calibration samples", "batch_size",
              "quantize.driver"):
        assert n in msg
    assert msg.count("\n  - ") == 5


def test_section_shape(production):
    refused({**production, "hf_ptq": None}, PRO_BF16, "mapping")
    refused({**production, "force": "yes"}, PRO_BF16, "quantize.force")
    refused({**production, "layerwise_save_every": 0}, PRO_BF16, "layerwise_save_every")
    production["hf_ptq"]["--qformat"] = "nvfp4"
    refused(production, PRO_BF16, "without dashes")


def test_full_nvfp4_on_v4_warns(production):
    production["hf_ptq"]["qformat"] = "nvfp4"
    with pytest.warns(UserWarning, match="no serving engine"):
        check_quantize_settings(production, PRO_BF16)
    production["hf_ptq"]["qformat"] = "nvfp4_experts_only"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_quantize_settings(production, PRO_BF16)


def test_layerwise_with_hf_ptq_needs_a_recipe(production):
    production.update(driver="hf_ptq", layerwise=True)
    refused(production, PRO_BF16, "recipe")
    production["hf_ptq"]["recipe"] = "general/ptq/nvfp4_experts_only-kv_fp8_layerwise"
    check_quantize_settings(production, PRO_BF16)
    check_quantize_settings({**production, "driver": "modelopt", "hf_ptq": {**production["hf_ptq"], "recipe": None}},
                            PRO_BF16)
