// Sort-free CFG sampling on the CPU: plain C++17 + OpenMP over raw pointers (no torch).
// Semantics follow engine/ops/sampling.py `reference`; the binding adapts torch tensors.
#pragma once

#include <cstdint>

namespace engine {
namespace cpu {

enum class LogitType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Per-row outcome codes, shared with the Python wrapper (engine/ops/sampling.py).
enum CfgStatus : int32_t { kCfgOk = 0, kCfgNaN = 1, kCfgNoAllowed = 2 };

struct CfgSampleArgs {
  const void* logits;      // [rows, vocab], unit stride along vocab
  LogitType dtype;
  int64_t row_stride;      // elements between consecutive rows
  int64_t batch;           // B: rows sampled (logits has 2B rows when guided)
  int64_t vocab;
  bool guided;             // rows [0,B) cond, [B,2B) uncond
  const float* cfg_scale;    // [B]
  const float* temperature;  // [B], 0 = greedy
  const int64_t* top_k;      // [B], 0 = off
  const float* top_p;        // [B], 1 = off
  const int64_t* allowed;    // [B, 2]: ids in [start, end) may be drawn
  float cd_alpha;          // CD-K plausibility factor (used when cd_k > 0)
  int64_t cd_k;            // 0 = off; replaces the CFG mix when > 0
  uint64_t seed;           // per-row uniforms come from (seed, row), not from thread order
  int64_t* tokens;         // [B] out
  float* logprobs;         // [B] out
  int32_t* status;         // [B] out, CfgStatus
};

void cfg_sample(const CfgSampleArgs& args);

// The uniform in [0, 1) that row `row` draws with `seed`: splitmix64 of a per-row counter,
// so results do not depend on thread count or scheduling. The CUDA and Triton kernels
// compute the same function.
inline double cfg_row_uniform(uint64_t seed, int64_t row) {
  uint64_t z = seed + (static_cast<uint64_t>(row) + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);  // 53 bits
}

}  // namespace cpu
}  // namespace engine
