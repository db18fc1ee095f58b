"""What the serving engines build DeepSeek V4's routed experts as, from an export's config.json.

Read from vLLM 0.33's and SGLang 0.5.23's own loading code, run on CPU on this layout
(../shared/docs/v4-nvfp4-serving-layout.md):

- vLLM 0.33 reads only `quant_method`, `activation_scheme`, `weight_block_size`, `scale_fmt`,
  `moe_quant_algo`, `ignored_layers` / `modules_to_not_convert` from `quantization_config` and the
  top-level `expert_dtype` (`hf_quant_config.json` is not read when config.json has a
  `quantization_config`). Routed experts are NVFP4 when `quant_method` is fp8, `expert_dtype` fp4
  (or absent) and `moe_quant_algo` NVFP4; `expert_dtype` fp8 sends them down the FP8 path; no
  `moe_quant_algo` keeps the release's MXFP4; an ignore entry covering them builds them
  unquantized. The MTP draft reuses that config with no per-layer exception: its experts are
  built like the main layers'. A tensor of another form loads without an error (E8M0 scales
  read as E4M3, `weight_scale_2` / `input_scale` never written), and so does an expert missing
  a scale (a stacked parameter counts as loaded once any expert wrote to it).
- SGLang 0.5.23 reads `quant_algo`, `moe_quant_algo`, `group_size` and `ignore`; it builds the
  MTP block (`model.decoder`) outside NVFP4, with MXFP4 experts, whatever those say.

So the two engines need opposite MTP expert forms (`MTP_SERVING`): an export drafts correctly
with MTP speculative decoding on one of them.
"""

from __future__ import annotations

import fnmatch
import re

ENGINE_IGNORE_KEYS = ("ignored_layers", "modules_to_not_convert")
MTP_SERVING = {
    "released": {
        "drafts_correctly_on": "SGLang 0.5.23",
        "note": "MTP experts kept MXFP4 as released (NVIDIA's form): SGLang 0.5.23 drafts with them exactly; vLLM "
                "0.33 builds the MTP draft's experts NVFP4 and loads these MXFP4 ones without an error into garbage "
                "(E8M0 scales read as E4M3, no weight_scale_2 / input_scale), so MTP drafts will be wrong on vLLM: "
                "serve with MTP off on vLLM 0.33, or export with mtp_experts: nvfp4."},
    "nvfp4": {
        "drafts_correctly_on": "vLLM 0.33",
        "note": "MTP experts NVFP4 (codes carried from the release, input_scale from MTP's calibrated amax): vLLM "
                "0.33 drafts with them exactly; SGLang 0.5.23 builds the MTP block's experts MXFP4 whatever the "
                "config says and loads these NVFP4 tensors without an error into garbage: serve with MTP off on "
                "SGLang 0.5.23, or export with mtp_experts: released."},
}


def covers(entry: str, module: str) -> bool:
    """Could an ignore-list entry exclude `module` (`layers.3.ffn.experts`)? Read broadly: a `re:` regex,
    a glob, or a substring either way, with or without the `model.` prefix engines put in front."""
    names = (module, f"model.{module}")
    if entry.startswith("re:"):
        return any(re.search(entry[3:], n) for n in names)
    return any(fnmatch.fnmatchcase(n, entry) or fnmatch.fnmatchcase(n, entry + ".*") or entry in n or n in entry
               for n in names)


def vllm_expert_form(config: dict, module: str) -> tuple[str, str]:
    """What vLLM 0.33 builds the routed experts of `module` (`layers.3.ffn.experts`) as: (form, why).

    form: `nvfp4`, `mxfp4`, `fp8`, `unquantized` or `other`."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return "other", f"quant_method {qc.get('quant_method')!r} is not the fp8 path vLLM's DeepSeek V4 loader takes"
    for key in ENGINE_IGNORE_KEYS:
        hit = [e for e in qc.get(key) or [] if covers(str(e), module)]
        if hit:
            return "unquantized", f"{key} entry {hit[0]!r} covers {module}: vLLM builds them unquantized"
    dtype = config.get("expert_dtype", "fp4")
    if dtype == "fp8":
        return "fp8", "expert_dtype fp8 sends the experts down vLLM's FP8 path"
    if dtype != "fp4":
        return "other", f"expert_dtype {dtype!r} (vLLM knows fp4 and fp8)"
    algo = qc.get("moe_quant_algo")
    if algo is None:
        return "mxfp4", "no moe_quant_algo: vLLM builds the release's MXFP4 experts"
    if algo != "NVFP4":
        return "other", f"moe_quant_algo {algo!r} (this layout's experts need NVFP4)"
    return "nvfp4", "quant_method fp8, expert_dtype fp4, moe_quant_algo NVFP4"
