"""How long `quantbook preflight` and `quantbook run --rehearse` take on a full-size V4 Pro release.

Writes V4 Pro's release as sparse files (64 shards, 145,116 tensors, 805 GiB apparent, a few MiB
on disk), points params/v4_pro_b200.yaml at it (outputs under the same temporary directory), then
times, as a user runs them (a fresh interpreter each, imports included):

    quantbook make-sparse OUT --like pro
    quantbook preflight PARAMS                 # verdict and plan; exit 1 here (no GPU, small disk)
    quantbook run PARAMS --rehearse            # with --rehearse: the whole chain on the tiny copy, on CPU

    .venv/bin/python benchmarks/preflight_bench.py [--rehearse] [--calib-file work/calib/english.jsonl] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="where the sparse release and outputs go (default: a temporary dir)")
    ap.add_argument("--rehearse", action="store_true", help="also time the rehearsal of the production params")
    ap.add_argument("--calib-file", default="work/calib/english.jsonl", help="the rehearsal's calibration text")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    qb = [sys.executable, "-m", "quantbook.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        release = base / "DeepSeek-V4-Pro-FP8"
        rows = []
        s, r = timed(qb + ["make-sparse", str(release), "--like", "pro"], env)
        rows.append(("make-sparse (V4 Pro, 64 shards)", s, r.returncode))
        text = (REPO / "params" / "v4_pro_b200.yaml").read_text()
        params = base / "v4_pro_b200.yaml"
        params.write_text(text.replace("/data/models/DeepSeek-V4-Pro-FP8", str(release))
                          .replace("/data/models/", f"{base}/out/"))
        s, r = timed(qb + ["preflight", str(params), "--runs-dir", str(base / "runs")], env)
        rows.append(("preflight (verdict and plan)", s, r.returncode))
        print(r.stdout.split("\nrelease census")[0])
        print(r.stdout.rsplit("\n\n", 1)[-1])
        if args.rehearse:
            s, r = timed(qb + ["run", str(params), "--rehearse", "--quiet", "--runs-dir", str(base / "runs"),
                               "--calib-file", str(Path(args.calib_file).resolve())], env)
            rows.append(("run --rehearse (CPU)", s, r.returncode))
            print(r.stdout[-1500:], r.stderr[-1500:] if r.returncode else "")
        print(f"\n{os.cpu_count()} CPUs")
        for what, seconds, rc in rows:
            print(f"  {what:<36} {seconds:7.1f} s   exit {rc}")


if __name__ == "__main__":
    main()
