#!/usr/bin/env bash
# Sets up cm3leon-engine on a fresh machine (Python 3.10+): the CPU build of torch (pinned:
# an unpinned `torch` would pull a multi-GB CUDA build), the Python dependencies, the test
# tools (OpenAI's client among them: the server's OpenAI-compatible routes are tested with it),
# Triton (its interpreter runs the Triton kernels' tests on CPU), and the editable
# install that builds the native extension engine._C with CMake against that torch.
# Where a torch is already installed (e.g. a CUDA build on a GPU machine) it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
if ! command -v cmake >/dev/null; then pip_install cmake; fi
pip_install "setuptools>=64" wheel ninja numpy pillow "tokenizers>=0.15" "safetensors>=0.4" \
  tqdm matplotlib "faiss-cpu>=1.8" "triton>=3.6" "pytest>=8" "hypothesis>=6" pytest-timeout \
  "openai>=1.0"
pip_install --no-build-isolation --no-deps -e .
"$PY" -c "import engine._native as n; print('engine._C:', 'built' if n.AVAILABLE else n.LOAD_ERROR)"
