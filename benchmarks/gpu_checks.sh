#!/usr/bin/env bash
# What only a CUDA machine can show, in one go (each check also runs alone; see its docstring):
#   - the GPU dequant route writes the same bytes as the CPU route (tests/test_dequant.py)
#   - calibration on CUDA leaves every amax on CPU; fake-quant forward runs (tests/test_patches.py)
#   - step 02 on CUDA: restore-then-export == direct export, layerwise == plain (quantize_gpu_check.py)
#   - step 03: CPU and CUDA v4-serving exports identical; logits of modelopt's fake-quant model vs a
#     model rebuilt from the export (gpu_export_check.py, tests/test_verify.py -k gpu); the writer's
#     batched re-quantization on CUDA byte-identical to modelopt's export (tests/test_layout_writer.py -k cuda)
#   - hf_ptq vs the modelopt driver on CUDA when QUANTBOOK_HF_PTQ_DIR is set (tests/test_hfptq.py)
#   - a memory timeline with real NVML columns (memory.csv of the step-02 run)
# Usage: benchmarks/gpu_checks.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
run() { echo "=== $*"; "$@"; echo "=== exit $? : $1 $2 $3"; }
run $py -m pytest -q -p no:cacheprovider tests/test_dequant.py -k cuda
run $py -m pytest -q -p no:cacheprovider tests/test_patches.py -k cuda
run $py -m pytest -q -p no:cacheprovider tests/test_verify.py -k gpu
run $py -m pytest -q -p no:cacheprovider tests/test_layout_writer.py -k cuda
run $py benchmarks/quantize_gpu_check.py --out "$out/q-gpu"
run $py benchmarks/gpu_export_check.py --out "$out/export-gpu"
if [ -n "${QUANTBOOK_HF_PTQ_DIR:-}" ]; then
  run $py -m pytest -q -p no:cacheprovider tests/test_hfptq.py -k identical
fi
find "$out" -name memory.csv | head -3 | while read -r f; do echo "--- $f"; head -3 "$f"; done
