#!/usr/bin/env bash
# One GPU session (about 8-11 minutes; STEPS below splits it over two calls). Writes
# everything under the folder given (default $OUT, else bench/out), most important first, so
# a run cut short still returns what it finished:
#   1. install (no deps: the GPU machine's torch/triton are used) and build engine._C with the
#      CUDA kernels, in the background (it needs CPUs, the tuning needs the GPU);
#   2. tune the forward's tiles and loop variant (pointers or TMA, lazy rescaling;
#      scripts/tune_flash_attention.py -> flash_blocks.json). The backward's tiles were swept
#      in earlier sessions and are in the committed table; TUNE_KEYS="" sweeps every key;
#   3. the causal launch order: head by head against groups of heads under a few L2 budgets
#      (scripts/attention_launch_order.py); the rest runs with the best budget. LAUNCH_ORDER=0
#      skips it (the default budget then);
#   4. the attention benchmark with the tuned tiles, read against the targets
#      (bench/attention_targets.py): the headline, before anything a time limit may cut (the
#      tuner already checked each tile's output at the target shape);
#   5. the flash-attention `cuda` tests (every variant), with the tuned tiles, and how much of
#      the forward's time is Python (scripts/attention_launch_overhead.py);
#   6. the span-loss benchmark (auto's `chunked` against the reference and the fused kernel);
#   7. the remaining `cuda` tests (native build; among them the generation engine and a short
#      tiny training run on the GPU against the references), then the other GPU benchmarks
#      (sampling, paged decode, generation; then a training step, activation checkpointing,
#      serving);
#   8. the span loss against Liger-Kernel and Cut Cross-Entropy, when their wheels were carried.
#   bash bench/gpu.sh [OUT_DIR] [--quick]          STEPS=other,peers bash bench/gpu.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/out}}
QUICK=${2:-}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 ENGINE_BUILD_CUDA=1
# Each step's line also reads the GPU's SM clock, temperature and power, so that timings that
# drift during a call (scripts/tune_flash_attention.py) can be read against the card's state.
gpu_state() { nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv,noheader \
  2>/dev/null | head -1; }
log() { echo "== $(date +%T) [$(gpu_state)] $*" | tee -a "$OUT_DIR/gpu.log"; }
# STEPS picks parts (default all): attention (2-5), span_loss (6), other (7), peers (8), so a
# second call can finish what a first one cut short at the call's time limit.
STEPS=${STEPS:-attention,span_loss,other,peers}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

log "device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT_DIR/gpu.log"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT_DIR/gpu.log"

if want other; then
  log "install + CUDA build (background, build.log)"
  ( timeout 300 python -m pip install -v --no-deps --no-build-isolation -e . >"$OUT_DIR/build.log" 2>&1
    echo "pip exit $?" >>"$OUT_DIR/build.log" ) &
  BUILD=$!
fi
ATTN_TESTS="tests/ops/test_flash_attention.py tests/ops/test_flash_attention_variants.py
  tests/ops/test_flash_attention_model.py tests/ops/test_flash_attention_order.py"

if want attention; then
log "tune flash-attention tiles"
TUNE_KEYS=${TUNE_KEYS-fwd:128:causal,fwd:128:full,fwd:64:causal,fwd:64:full}
timeout 200 python scripts/tune_flash_attention.py --out "$OUT_DIR/flash_blocks.json" \
  --log "$OUT_DIR/tune.json" --budget-s "${TUNE_BUDGET_S:-140}" ${TUNE_KEYS:+--keys "$TUNE_KEYS"} \
  2>&1 | tee -a "$OUT_DIR/gpu.log"
if [ -s "$OUT_DIR/flash_blocks.json" ]; then export ENGINE_FLASH_BLOCKS="$OUT_DIR/flash_blocks.json"; fi

if [ "${LAUNCH_ORDER:-1}" != 0 ]; then
  log "launch order: head by head against groups of heads (L2 budgets), with the tuned tiles"
  timeout 120 python scripts/attention_launch_order.py --json "$OUT_DIR/launch_order.json" 2>&1 \
    | tee -a "$OUT_DIR/gpu.log"
  BEST_BUDGET=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['best_budget_mib'])" \
    "$OUT_DIR/launch_order.json" 2>/dev/null)
  if [ -n "$BEST_BUDGET" ]; then export ENGINE_FLASH_L2_BUDGET_MIB="$BEST_BUDGET"; fi
fi
log "L2 budget for the rest: ${ENGINE_FLASH_L2_BUDGET_MIB:-default} MiB"

log "attention benchmark"
timeout 200 python bench/run.py $QUICK --only attention --json "$OUT_DIR/bench_attention.json" \
  2>&1 | tee -a "$OUT_DIR/gpu.log" | tail -60
python bench/attention_targets.py "$OUT_DIR/bench_attention.json" 2>&1 | tee -a "$OUT_DIR/gpu.log"
log "flash-attention cuda tests (tiles: ${ENGINE_FLASH_BLOCKS:-table})"
timeout 150 python -m pytest -q -m cuda --timeout 120 -p no:cacheprovider -rfE $ATTN_TESTS \
  >"$OUT_DIR/cuda_tests_attention.txt" 2>&1
tail -8 "$OUT_DIR/cuda_tests_attention.txt" | tee -a "$OUT_DIR/gpu.log"

log "launch overhead of the forward (wrapper / op / CUDA graph)"
timeout 60 python scripts/attention_launch_overhead.py --profile 2>&1 | tee -a "$OUT_DIR/gpu.log"
fi

if want span_loss; then
log "span-loss benchmark (no native build needed; before the slower steps that may be cut)"
timeout 100 python bench/run.py $QUICK --only span_loss --json "$OUT_DIR/bench_span_loss.json" \
  2>&1 | tee -a "$OUT_DIR/gpu.log" | tail -12
fi

if want other; then
log "waiting for the build"; wait $BUILD; tail -3 "$OUT_DIR/build.log" | tee -a "$OUT_DIR/gpu.log"
python -c "import engine._native as n; print('engine._C', n.AVAILABLE, n.LOAD_ERROR)" | tee -a "$OUT_DIR/gpu.log"

log "other cuda tests"
ENGINE_REQUIRE_NATIVE=1 timeout 200 python -m pytest -q -m cuda --timeout 120 -p no:cacheprovider \
  -rfE $(for t in $ATTN_TESTS; do echo "--ignore=$t"; done) >"$OUT_DIR/cuda_tests.txt" 2>&1
tail -15 "$OUT_DIR/cuda_tests.txt" | tee -a "$OUT_DIR/gpu.log"

log "other GPU benchmarks"
timeout 120 python bench/run.py $QUICK --only sampling,paged_attention,generation \
  --json "$OUT_DIR/bench_other.json" 2>&1 | tee -a "$OUT_DIR/gpu.log" | tail -40
log "training and serving benchmarks"
timeout 120 python bench/run.py $QUICK --only training_step,training_memory,serving \
  --json "$OUT_DIR/bench_training.json" 2>&1 | tee -a "$OUT_DIR/gpu.log" | tail -12
fi

# Last, as the least needed: the span loss again with Liger-Kernel and Cut Cross-Entropy
# (CCE autotunes its kernels on first use), from scripts/peer_wheels.sh's wheels when carried,
# installed into a folder of their own rather than into site-packages.
PEERS_SITE=/tmp/span_loss_peers
if want peers && ls bench/peers/*.whl >/dev/null 2>&1; then
  log "span-loss benchmark with the peers"
  python -m pip install -q --no-deps --no-index --target "$PEERS_SITE" bench/peers/*.whl 2>&1 \
    | tail -2 | tee -a "$OUT_DIR/gpu.log"
  PYTHONPATH="$PEERS_SITE${PYTHONPATH:+:$PYTHONPATH}" timeout 180 python bench/run.py $QUICK \
    --only span_loss --json "$OUT_DIR/bench_span_loss_peers.json" 2>&1 \
    | tee -a "$OUT_DIR/gpu.log" | tail -16
fi
log "done"
