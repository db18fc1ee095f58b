"""The benchmark scripts' own plumbing, on CPU: what they run and where, without the GPU work itself."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# a python3 that stands in for the part's program: records its arguments, and for layout_bench.py fails as
# the real one did (FileNotFoundError) when its --dir is missing
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$QB_CALLS"
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --dir ] && [ ! -d "${args[$((i + 1))]}" ]; then
    echo "FileNotFoundError: ${args[$((i + 1))]}" >&2; exit 1
  fi
done
exit 0
"""


@pytest.mark.parametrize("part", ["layout-pro", "layout-flash"])
def test_gpu_bench_layout_parts_keep_their_directory(part, tmp_path):
    """Item 12 of issue 17: the loop deleted $scratch/$p after the part's `case` had created it, so the
    layout parts failed at once (FileNotFoundError: ... qb-layout-bench-...)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(FAKE_PYTHON)
        (bin_dir / name).chmod(0o755)
    log, scratch, calls = tmp_path / "log", tmp_path / "scratch", tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "QB_CALLS": str(calls)}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_bench.sh"), str(log), str(scratch), f"{part}:60"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    progress = (log / "progress.txt").read_text()
    assert f"=== " in progress and f"{part} exit 0" in progress, progress + (log / f"{part}.log").read_text()
    ran = [ln for ln in calls.read_text().splitlines() if "layout_bench.py" in ln]
    assert len(ran) == 1 and f"--dir {scratch / part}" in ran[0]
