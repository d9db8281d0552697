#!/usr/bin/env bash
# One GPU session in one call: install (no deps: the GPU machine's torch/triton are used),
# build engine._C with the CUDA kernels, run the `cuda` tests and the benchmarks, and write
# everything under the folder given (default $OUT, else bench/out).
#   bash bench/gpu.sh [OUT_DIR] [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/out}}
QUICK=${2:-}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 ENGINE_BUILD_CUDA=1 ENGINE_REQUIRE_NATIVE=1
log() { echo "== $*" | tee -a "$OUT_DIR/gpu.log"; }

log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT_DIR/gpu.log"
log "install + CUDA build"
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee -a "$OUT_DIR/gpu.log"
python -c "import torch, engine._native as n; print('engine._C', n.AVAILABLE, n.LOAD_ERROR, 'torch', torch.__version__)" \
  | tee -a "$OUT_DIR/gpu.log"

log "cuda tests"
python -m pytest -q -m cuda -x --timeout 300 -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT_DIR/cuda_tests.txt"

log "benchmarks"
python bench/run.py $QUICK --json "$OUT_DIR/bench.json" --png "$OUT_DIR/bench.png" 2>&1 \
  | tee "$OUT_DIR/bench.txt" | tail -80
log "done"
