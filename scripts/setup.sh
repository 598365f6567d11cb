#!/usr/bin/env bash
# Set up fluxkit in ./.venv. Usage: scripts/setup.sh [--dev]
#   --dev  also installs the test/benchmark extras (pytest, diffusers as the reference oracle, ruff, ...).
# On a machine without an NVIDIA GPU this installs the CPU build of PyTorch first, so that pip never pulls the
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="train,quant,control,serve"
[[ "${1:-}" == "--dev" ]] && extras="$extras,test"

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "fluxkit needs Python >= 3.11" >&2; exit 2; }
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" torch
    elif .venv/bin/python -m pip download --quiet --no-deps --no-index -d "$(mktemp -d)" torch==2.13.0 2>/dev/null; then
        "${pip[@]}" torch==2.13.0  # a CPU wheel provided locally (pip's find-links), as on this project's machines
    else
        "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"${pip[@]}" -e ".[$extras]"

# Real OCR for `fluxkit eval` (sign text). Installed when we may; otherwise eval says how to get it.
if ! command -v tesseract >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq tesseract-ocr >/dev/null) || echo "warning: could not install tesseract-ocr" >&2
    else
        echo "note: install tesseract-ocr (e.g. 'sudo apt-get install tesseract-ocr') for fluxkit eval's sign OCR" >&2
    fi
fi
# Headless Chromium for tests/test_web_ui.py (Playwright drives Debian's chromium; never `playwright install`).
if [[ "${1:-}" == "--dev" ]] && [[ ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium" >&2
    else
        echo "note: install chromium (sudo apt-get install chromium) for the web UI test" >&2
    fi
fi
echo "fluxkit is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
