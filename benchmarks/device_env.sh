#!/usr/bin/env bash
# Source this on a GPU machine that cannot reach a package index: the wheels quantbook needs beyond
# what the machine has (modelopt, transformers, tokenizers, datasets, pydantic, omegaconf, pulp...)
# carried in .whl/ at the repository root, installed into /tmp/site, and the repository's lib/ first.
#   . benchmarks/device_env.sh && python3 benchmarks/streaming_bench.py ...
# Fetch the wheels once on a machine with an index (Python 3.12, manylinux x86_64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     nvidia-modelopt==0.47.0 transformers==5.23.0 tokenizers==0.23.3 datasets==5.2.0 omegaconf \
#     antlr4-python3-runtime pulp pydantic pydantic-core annotated-types typing-inspection dill multiprocess
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -d "$repo/.whl" ] && [ ! -f /tmp/site/.quantbook-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$repo"/.whl/*.whl && touch /tmp/site/.quantbook-wheels
fi
export PYTHONPATH="$repo/lib:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
