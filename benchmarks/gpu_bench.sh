#!/usr/bin/env bash
# The GPU machine's benchmarks, one part after another, each part's output and JSON kept in LOG_DIR
# (a part that fails does not stop the next). Parts:
#   layout     step 03's writer at Flash and Pro expert shapes: carrying (CPU) and re-quantizing (CUDA),
#              against the disk's raw write rate in the same run (benchmarks/layout_bench.py)
#   layout-ok  CPU and CUDA v4-serving exports byte-identical, the export's logits (benchmarks/gpu_export_check.py)
#   streaming-small gpus 1 and 2 (NCCL) at small dimensions, stacks printed every 30 s should it hang
#   streaming       step 02's streaming driver at real V4 Pro layer dimensions (2 layers + MTP, 384 experts)
#                   against the disk's read rate, gpus 2 when two GPUs are visible (benchmarks/streaming_bench.py)
#   streaming-side  the modelopt driver on step 01's BF16 copy and the streaming driver on the release, side by
#                   side, on Pro-dimension layers with 32 experts
# Usage (from the repository root; carried wheels in .whl/): benchmarks/gpu_bench.sh LOG_DIR SCRATCH PART...
set -u
log=${1:?usage: gpu_bench.sh LOG_DIR SCRATCH PART...}
scratch=${2:?usage: gpu_bench.sh LOG_DIR SCRATCH PART...}
shift 2
mkdir -p "$log" "$scratch"
. "$(dirname "$0")/device_env.sh"
{ nvidia-smi -L; nproc; free -g | head -2; df -h "$scratch" | tail -1; python3 -c "import torch, modelopt, transformers; print(torch.__version__, modelopt.__version__, transformers.__version__)"; } > "$log/machine.txt" 2>&1
part() {  # name command...
  local name=$1; shift
  echo "=== $(date +%T) $name: $*" >> "$log/progress.txt"
  "$@" > "$log/$name.log" 2>&1
  echo "=== $(date +%T) $name exit $?" >> "$log/progress.txt"
}
for p in "$@"; do
  case $p in
    layout)
      mkdir -p "$scratch/lp" "$scratch/lf"
      part layout-pro python3 benchmarks/layout_bench.py --like pro --layers 2 --experts 32 --routes carry requant \
        --device cuda --workers 2 8 --dir "$scratch/lp" --json "$log/layout-pro.json"
      part layout-flash python3 benchmarks/layout_bench.py --like flash --layers 2 --experts 64 --routes carry requant \
        --device cuda --workers 2 8 --dir "$scratch/lf" --json "$log/layout-flash.json" ;;
    layout-ok)
      part layout-ok python3 benchmarks/gpu_export_check.py --out "$scratch/gx" ;;
    streaming-small)  # gpus 1 and 2 at small dimensions, every process's stacks each 30 s if it hangs
      QUANTBOOK_STACKS_EVERY_S=30 part streaming-small timeout -s INT 240 python3 benchmarks/streaming_bench.py \
        --out "$log/streaming-small" --dir "$scratch/sm" --layers 1 --experts 8 --vocab 4096 --samples 16 \
        --seq 64 --batch 4 --side-experts 0 ;;
    streaming)
      QUANTBOOK_STACKS_EVERY_S=60 part streaming timeout -s INT 480 python3 benchmarks/streaming_bench.py --out "$log/streaming" --dir "$scratch/st" --layers 1 \
        --side-experts 0 ;;
    streaming-side)
      part streaming-side python3 benchmarks/streaming_bench.py --out "$log/streaming-side" --dir "$scratch/ss" \
        --skip-pro --side-experts 32 --layers 1 ;;
    *) echo "unknown part $p" >> "$log/progress.txt" ;;
  esac
done
echo "=== $(date +%T) all done" >> "$log/progress.txt"
