#!/usr/bin/env bash
# The GPU machine's benchmarks, one part after another, each under its own time limit (SIGKILL, so
# that a hang cannot eat the next parts' time). Each part's output goes to LOG_DIR/PART.log and its
# JSON result to LOG_DIR/PART.json; the run directories stay in SCRATCH. Parts:
#   small      the streaming driver at small dimensions, gpus 1 then 2 (NCCL), amax compared, then a
#              process that fails must stop the run; every process prints its stacks every 30 s if it hangs
#   streaming  the streaming driver at real V4 Pro layer dimensions (1 layer + MTP, 384 experts) on one
#              GPU, against the disk's read rate (benchmarks/streaming_bench.py)
#   streaming2 the same, then gpus 2
#   side       the modelopt driver on step 01's BF16 copy and the streaming driver on the release, side by
#              side, on Pro-dimension layers with 32 experts
#   layout-pro, layout-flash  step 03's writer at Pro / Flash expert shapes: carrying (CPU) and
#              re-quantizing (CUDA), against the disk's raw write rate in the same run (layout_bench.py)
#   layout-ok  CPU and CUDA v4-serving exports byte-identical, the export's logits (gpu_export_check.py)
#   verify     `quantbook verify`'s numeric check at Pro expert shapes against the disk's read rate, new and
#              old side by side, 1 to 16 workers (verify_bench.py; CPU only)
# Usage (from the repository root; carried wheels in .whl/):
#   benchmarks/gpu_bench.sh LOG_DIR SCRATCH PART[:SECONDS]...     (default 300 s a part)
set -u
log=${1:?usage: gpu_bench.sh LOG_DIR SCRATCH PART[:SECONDS]...}
scratch=${2:?usage: gpu_bench.sh LOG_DIR SCRATCH PART[:SECONDS]...}
shift 2
mkdir -p "$log" "$scratch"
. "$(dirname "$0")/device_env.sh"
{ nvidia-smi -L; nproc; free -g | head -2; df -h "$scratch" | tail -1
  python3 -c "import torch, modelopt, transformers; print(torch.__version__, modelopt.__version__, transformers.__version__)"
} >> "$log/progress.txt" 2>&1
for spec in "$@"; do
  p=${spec%%:*}; secs=300; [ "$p" != "$spec" ] && secs=${spec#*:}
  run=(timeout -s KILL "$secs" python3)
  # what an earlier run of a part left, cleared before the part's own set-up below (which may create $scratch/$p)
  rm -rf "$scratch/$p" "$scratch/sm" "$scratch/st" "$scratch/ss"
  case $p in
    small)
      cmd=(benchmarks/streaming_bench.py --out "$scratch/small" --dir "$scratch/sm" --layers 2 --experts 8
           --vocab 4096 --samples 16 --seq 64 --batch 4 --side-experts 0 --fault-check)
      json=$scratch/small/streaming_bench.json
      export QUANTBOOK_STACKS_EVERY_S=30 ;;
    streaming|streaming2)
      g=1; [ "$p" = streaming2 ] && g=2
      cmd=(benchmarks/streaming_bench.py --out "$scratch/$p" --dir "$scratch/st" --layers 1 --side-experts 0
           --max-gpus $g); json=$scratch/$p/streaming_bench.json
      export QUANTBOOK_STACKS_EVERY_S=60 ;;
    side)
      cmd=(benchmarks/streaming_bench.py --out "$scratch/side" --dir "$scratch/ss" --skip-pro --side-experts 32
           --layers 1); json=$scratch/side/streaming_bench.json ;;
    layout-pro|layout-flash)
      like=${p#layout-}; e=32; [ "$like" = flash ] && e=64
      mkdir -p "$scratch/$p"
      cmd=(benchmarks/layout_bench.py --like "$like" --layers 2 --experts $e --routes carry requant --device cuda
           --workers 2 8 --dir "$scratch/$p" --json "$log/$p.json"); json= ;;
    layout-ok)
      cmd=(benchmarks/gpu_export_check.py --out "$scratch/gx"); json= ;;
    verify)
      mkdir -p "$scratch/$p"
      cmd=(benchmarks/verify_bench.py --like pro --layers 1 --experts 64 --workers 1 2 4 8 16 --old-sample 64
           --dir "$scratch/$p" --json "$log/$p.json"); json= ;;
    *) echo "unknown part $p" >> "$log/progress.txt"; continue ;;
  esac
  echo "=== $(date +%T) $p (${secs} s at most): ${cmd[*]}" >> "$log/progress.txt"
  "${run[@]}" "${cmd[@]}" > "$log/$p.log" 2>&1
  rc=$?
  echo "=== $(date +%T) $p exit $rc" >> "$log/progress.txt"
  [ -n "$json" ] && [ -f "$json" ] && cp "$json" "$log/$p.json"
  unset QUANTBOOK_STACKS_EVERY_S
done
echo "=== $(date +%T) all done" >> "$log/progress.txt"
