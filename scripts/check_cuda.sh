#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu alone (no torch, no GPU needed) for sm_90a, so CUDA
# kernels are checked on machines without a GPU. Fails on the first error or warning-as-error.
#   scripts/check_cuda.sh            NVCC=/path/to/nvcc scripts/check_cuda.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[[ -x "$NVCC" ]] || { echo "check_cuda: nvcc not found (set NVCC=...)" >&2; exit 2; }
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
(( ${#sources[@]} )) || { echo "check_cuda: no csrc/cuda/*.cu found" >&2; exit 2; }
failed=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  echo "nvcc $name.cu"
  if ! "$NVCC" -c -std=c++17 -arch=sm_90a -O3 --expt-relaxed-constexpr -Werror all-warnings \
       -I "$ROOT/csrc" -o "$OUT/$name.o" "$src"; then
    echo "check_cuda: FAILED to compile csrc/cuda/$name.cu" >&2
    failed=1
  fi
done
(( failed == 0 )) || exit 1
echo "check_cuda: ${#sources[@]} file(s) compiled for sm_90a"
