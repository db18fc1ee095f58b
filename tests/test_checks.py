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


def test_production_params_pass_and_stream_the_release(production):
    params = load_params(ROOT / "params" / "v4_pro_b200.yaml")
    assert production["driver"] == "streaming"
    assert production["hf_ptq"]["pyt_ckpt_path"] == params["dequant"]["source"]  # YAML anchor: the release
    s = production["hf_ptq"]
    assert (s["qformat"], s["kv_cache_qformat"], s["calib_seq"]) == ("nvfp4_experts_only", "fp8_cast", 512)
    assert sum(n for _, n in calib_samples(s)) == 128
    assert s["use_seq_device_map"] is True and s["gpu_max_mem_percentage"] == 0.7
    assert s["inference_tensor_parallel"] == 8
    check_quantize_settings(production, PRO_RELEASED)
    check_quantize_settings(production, None)
    refused(production, PRO_BF16, "driver streaming reads the released", "no quantization_config")
    # the whole-model drivers on the BF16 copy, as before
    whole = {**production, "driver": "modelopt", "hf_ptq": {**s, "pyt_ckpt_path": params["dequant"]["destination"]}}
    check_quantize_settings(whole, PRO_BF16)


@pytest.fixture
def whole_model(production):
    """The production settings on the modelopt driver and the BF16 copy (what the refusals below guard)."""
    params = load_params(ROOT / "params" / "v4_pro_b200.yaml")
    return {**production, "driver": "modelopt",
            "hf_ptq": {**production["hf_ptq"], "pyt_ckpt_path": params["dequant"]["destination"]}}


def test_config_kinds():
    assert is_v4(PRO_BF16) and is_v4_pro(PRO_BF16) and is_v4(TINY_BF16) and not is_v4_pro(TINY_BF16)
    assert not is_v4({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) and not is_v4(None)


@pytest.mark.parametrize("bad, right", [("quant", "qformat"), ("calib", "calib_size"),
                                        ("kv_cache_quant", "kv_cache_qformat"), ("tp", "inference_tensor_parallel"),
                                        ("--quant", "qformat")])
def test_shell_script_flag_names_refused_with_the_right_names(whole_model, bad, right):
    whole_model["hf_ptq"][bad] = "nvfp4"
    msg = refused(whole_model, PRO_BF16, f"`{right}`", "shell-script")
    for hf_name in ("--qformat", "--calib_size", "--kv_cache_qformat", "--inference_tensor_parallel"):
        assert hf_name in msg


def test_low_memory_mode_refused_for_v4(whole_model):
    whole_model["hf_ptq"]["low_memory_mode"] = True
    refused(whole_model, PRO_BF16, "low_memory_mode", "meta")
    refused(whole_model, None, "low_memory_mode")  # unknown model: this project only quantizes V4
    whole_model["hf_ptq"]["low_memory_mode"] = False
    check_quantize_settings(whole_model, PRO_BF16)
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    check_quantize_settings({**whole_model, "hf_ptq": {**whole_model["hf_ptq"], "low_memory_mode": True}}, llama)


def test_fp8_source_refused(whole_model):
    whole_model["hf_ptq"]["pyt_ckpt_path"] = "/data/models/DeepSeek-V4-Pro-FP8"
    refused(whole_model, PRO_RELEASED, "quantized", "'fp8'", "BF16 copy", "run 1")


@pytest.mark.parametrize("dataset, calib_size, total", [
    (["cnn_dailymail"], 256, 256),
    (["cnn_dailymail", "nemotron-post-training-dataset-v2"], 128, 256),  # one value is taken from EACH dataset
    ("cnn_dailymail,nemotron-post-training-dataset-v2", "200,100", 300),
    (None, None, 1024),  # hf_ptq's defaults: the cnn_nemotron_v2_mix combo, 1024 samples
])
def test_256_samples_on_the_pro_node_refused(whole_model, dataset, calib_size, total):
    whole_model["hf_ptq"].update(dataset=dataset, calib_size=calib_size)
    msg = refused(whole_model, PRO_BF16, "calib_size", f"{total} calibration samples", "host memory")
    assert "EACH dataset" in msg
    refused(whole_model, None, f"{total} calibration samples")
    check_quantize_settings(whole_model, TINY_BF16)  # the limit is the Pro node's memory, not a rule for tiny


def test_256_samples_streamed_are_not_the_offload_problem(production):
    """The 256-sample limit is the whole-model drivers' (3.2 TB BF16 offloaded to host memory); the
    streaming driver holds one block and the activations (7 GiB at 256 x 512 on V4 Pro)."""
    production["hf_ptq"].update(calib_size=[128, 128])
    check_quantize_settings(production, PRO_RELEASED)


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
def test_batch_size_must_be_set(whole_model, bs):
    whole_model["hf_ptq"]["batch_size"] = bs
    refused(whole_model, PRO_BF16, "batch_size", "probe")


def test_every_problem_reported_at_once(whole_model):
    whole_model["hf_ptq"].update(low_memory_mode=True, tp=8, calib_size=256, batch_size=0)
    whole_model["driver"] = "hfptq"
    msg = refused(whole_model, PRO_BF16)
    for n in ("low_memory_mode", "inference_tensor_parallel", "512 calibration samples", "batch_size",
              "quantize.driver"):
        assert n in msg
    assert msg.count("\n  - ") == 5


def test_section_shape(whole_model):
    refused({**whole_model, "hf_ptq": None}, PRO_BF16, "mapping")
    refused({**whole_model, "force": "yes"}, PRO_BF16, "quantize.force")
    refused({**whole_model, "layerwise_save_every": 0}, PRO_BF16, "layerwise_save_every")
    whole_model["hf_ptq"]["--qformat"] = "nvfp4"
    refused(whole_model, PRO_BF16, "without dashes")


def test_full_nvfp4_on_v4_warns(whole_model):
    whole_model["hf_ptq"]["qformat"] = "nvfp4"
    with pytest.warns(UserWarning, match="no serving engine"):
        check_quantize_settings(whole_model, PRO_BF16)
    whole_model["hf_ptq"]["qformat"] = "nvfp4_experts_only"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_quantize_settings(whole_model, PRO_BF16)


def test_layerwise_with_hf_ptq_needs_a_recipe(whole_model):
    whole_model.update(driver="hf_ptq", layerwise=True)
    refused(whole_model, PRO_BF16, "recipe")
    whole_model["hf_ptq"]["recipe"] = "general/ptq/nvfp4_experts_only-kv_fp8_layerwise"
    check_quantize_settings(whole_model, PRO_BF16)
    check_quantize_settings({**whole_model, "driver": "modelopt", "hf_ptq": {**whole_model["hf_ptq"], "recipe": None}},
                            PRO_BF16)
