#!/usr/bin/env bash
# The span-loss peers for bench/span_loss.py on the GPU machine, which has no network:
# Liger-Kernel and Cut Cross-Entropy, pure-Python wheels, pinned so that runs compare.
# Downloaded into bench/peers/ (git-ignored); hand it to the device run with
# `carry: ["bench/peers"]` and bench/gpu.sh installs them with --no-deps beside the engine.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/peers
python -m pip download -q --no-deps -d bench/peers liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls bench/peers
