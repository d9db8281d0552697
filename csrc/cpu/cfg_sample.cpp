// Sort-free CFG sampling on the CPU. One row per OpenMP task; per row:
//   1. load (fp16/bf16 -> fp32), NaN check, guidance (CFG mix or CD-K), temperature, max;
//   2. e = exp(x - max) with a polynomial exp the compiler vectorises;
//   3. TopK / TopP cut: radix select on order-preserving 32-bit keys of x (11+11+10 bits),
//      weighted by e for TopP; each level compacts the chosen bucket, so only the first
//      level touches the whole row;
//   4. inverse-CDF draw in id order (the reference's order) with one uniform per row.
// Masses accumulate in double so the TopP cut matches the reference's fp32 cumsum up to
// ties with the threshold itself.
#include "cpu/cfg_sample.h"

#include "cpu/float_bits.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace engine {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kDigitBits[3] = {11, 11, 10};
constexpr int kDigitShift[3] = {21, 10, 0};

// Unsigned keys that order like the floats (-inf smallest). Zeros are canonicalised to +0
// before keys are taken, so -0 and +0 tie as they do in the reference.
inline uint32_t order_key(float x) {
  const uint32_t b = float_to_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline float key_value(uint32_t k) { return bits_to_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

// exp(x) for x <= 0: Cody-Waite reduction to |r| <= ln2/2, degree-7 Taylor (rel. error
// ~1e-7, like expf), 2^n assembled in the exponent bits. Branch-free so loops vectorise;
// x < -87 (including -inf) gives exactly 0, so masked ids carry no mass.
inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

struct Scratch {
  std::vector<float> cond, uncond, x, e, cand_e;
  std::vector<uint32_t> cand_key;
  std::vector<uint32_t> count;
  std::vector<double> mass;
  Scratch() : count(1 << 11), mass(1 << 11) {}
  // Grows only, so a thread reuses its buffers across calls instead of zero-filling them.
  void fit(int64_t vocab) {
    if (static_cast<int64_t>(x.size()) >= vocab) return;
    for (auto* v : {&cond, &uncond, &x, &e, &cand_e}) v->resize(vocab);
    cand_key.resize(vocab);
  }
};

Scratch& thread_scratch(int64_t vocab) {
  thread_local Scratch s;
  s.fit(vocab);
  return s;
}

void load_row(const CfgSampleArgs& a, int64_t row, float* out) {
  const int64_t off = row * a.row_stride, n = a.vocab;
  if (a.dtype == LogitType::F32) {
    std::memcpy(out, static_cast<const float*>(a.logits) + off, n * sizeof(float));
  } else if (a.dtype == LogitType::F16) {
    const uint16_t* p = static_cast<const uint16_t*>(a.logits) + off;
    for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(a.logits) + off;
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
  }
}

bool has_nan(const float* v, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= (v[i] != v[i]);
  return bad != 0;
}

float row_max(const float* v, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

int64_t count_finite(const float* v, int64_t n) {
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < n; ++i) c += (v[i] > kNegInf);
  return c;
}

// Picks the digit at `level` for the key prefix being built, from the histogram in s.
// Count mode (TopK): the bucket holding the `need`-th largest key; `need` becomes the rank
// inside that bucket. Mass mode (TopP): the lowest non-empty bucket whose mass strictly
// above it (`base` + buckets above) is still < target; `base` becomes that mass.
int pick_count(const Scratch& s, int buckets, int64_t& need) {
  int64_t above = 0;
  for (int b = buckets - 1; b > 0; --b) {
    if (above + s.count[b] >= need) { need -= above; return b; }
    above += s.count[b];
  }
  need -= above;
  return 0;
}

int pick_mass(const Scratch& s, int buckets, double& base, double target) {
  double above = base;
  int chosen = -1;
  double chosen_base = base;
  for (int b = buckets - 1; b >= 0; --b) {
    if (s.count[b] == 0) continue;
    if (above >= target) break;
    chosen = b;
    chosen_base = above;
    above += s.mass[b];
  }
  base = chosen_base;
  return chosen < 0 ? 0 : chosen;  // the top non-empty bucket always qualifies: base < target
}

// Level-0 histogram over the row (keys >= floor only), then compaction of the chosen
// bucket into s.cand_*; later levels run over the candidates only.
template <bool kMass>
uint32_t radix_select(const float* x, const float* e, int64_t n, float floor_val, Scratch& s,
                      int64_t need, double target) {
  uint32_t prefix = 0;
  int64_t ncand = n;
  double base = 0.0;
  for (int level = 0; level < 3; ++level) {
    const int buckets = 1 << kDigitBits[level], shift = kDigitShift[level];
    const uint32_t digit_mask = static_cast<uint32_t>(buckets - 1);
    std::fill(s.count.begin(), s.count.begin() + buckets, 0u);
    if (kMass) std::fill(s.mass.begin(), s.mass.begin() + buckets, 0.0);
    if (level == 0) {
      for (int64_t i = 0; i < n; ++i) {
        if (!(x[i] >= floor_val)) continue;
        const uint32_t d = order_key(x[i]) >> shift;
        s.count[d] += 1;
        if (kMass) s.mass[d] += e[i];
      }
    } else {
      for (int64_t i = 0; i < ncand; ++i) {
        const uint32_t d = (s.cand_key[i] >> shift) & digit_mask;
        s.count[d] += 1;
        if (kMass) s.mass[d] += s.cand_e[i];
      }
    }
    const int b = kMass ? pick_mass(s, buckets, base, target) : pick_count(s, buckets, need);
    prefix |= static_cast<uint32_t>(b) << shift;
    if (level == 2) break;
    // Keep the keys whose digits so far equal the prefix.
    const uint32_t high = ~((1u << shift) - 1u);
    int64_t m = 0;
    if (level == 0) {
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t k = order_key(x[i]);
        if (x[i] >= floor_val && (k & high) == prefix) {
          s.cand_key[m] = k;
          if (kMass) s.cand_e[m] = e[i];
          ++m;
        }
      }
    } else {
      for (int64_t i = 0; i < ncand; ++i) {
        if ((s.cand_key[i] & high) == prefix) {
          s.cand_key[m] = s.cand_key[i];
          if (kMass) s.cand_e[m] = s.cand_e[i];
          ++m;
        }
      }
    }
    ncand = m;
  }
  return prefix;
}

double kept_mass(const float* x, const float* e, int64_t n, float t) {
  double z = 0.0;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) z += x[i] >= t ? static_cast<double>(e[i]) : 0.0;
  return z;
}

// CD-K scores over the whole vocabulary, as the reference computes them before the
// allowed range applies: keep x when log p_c(x) >= log(alpha) + log p_c(k-th), score
// log p_c(x) - log p_u(x); ids that either model rules out (-inf) are never kept.
bool cdk_scores(const CfgSampleArgs& a, Scratch& s, float* x) {
  const int64_t V = a.vocab;
  const float* c = s.cond.data();
  const float* u = s.uncond.data();
  const float mc = row_max(c, V), mu = row_max(u, V);
  if (mc == kNegInf || mu == kNegInf) return false;
  float* e = s.e.data();
  double zc = 0.0, zu = 0.0;
#pragma omp simd reduction(+ : zc)
  for (int64_t i = 0; i < V; ++i) zc += exp_nonpos(c[i] - mc);
#pragma omp simd reduction(+ : zu)
  for (int64_t i = 0; i < V; ++i) zu += exp_nonpos(u[i] - mu);
  const float lse_c = mc + static_cast<float>(std::log(zc));
  const float lse_u = mu + static_cast<float>(std::log(zu));
  const int64_t k = a.cd_k < V ? a.cd_k : V;
  float kth = kNegInf;
  if (k <= count_finite(c, V)) kth = key_value(radix_select<false>(c, e, V, kNegInf, s, k, 0.0));
  const float cut = (kth - lse_c) + std::log(a.cd_alpha);
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {
    const float lc = c[i] - lse_c;
    const bool keep = c[i] > kNegInf && u[i] > kNegInf && lc >= cut;
    x[i] = keep ? lc - (u[i] - lse_u) : kNegInf;
  }
  return true;
}

int32_t sample_row(const CfgSampleArgs& a, int64_t r, Scratch& s) {
  const int64_t V = a.vocab;
  float* c = s.cond.data();
  float* u = s.uncond.data();
  float* x = s.x.data();
  load_row(a, r, c);
  if (has_nan(c, V)) return kCfgNaN;
  if (a.guided) {
    load_row(a, a.batch + r, u);
    if (has_nan(u, V)) return kCfgNaN;
  }
  if (a.cd_k > 0) {
    if (!cdk_scores(a, s, x)) return kCfgNoAllowed;
  } else if (a.guided) {
    const float w = a.cfg_scale[r];
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float mixed = w == 1.0f ? c[i] : (w == 0.0f ? u[i] : u[i] + w * (c[i] - u[i]));
      x[i] = (c[i] == kNegInf || u[i] == kNegInf) ? kNegInf : mixed;
    }
  } else {
    std::memcpy(x, c, V * sizeof(float));
  }

  int64_t start = a.allowed[2 * r], end = a.allowed[2 * r + 1];
  start = start < 0 ? 0 : (start > V ? V : start);
  end = end < start ? start : (end > V ? V : end);
  const int64_t n = end - start;
  float* xs = x + start;
  float* es = s.e.data() + start;
  const bool greedy = a.temperature[r] == 0.0f;
  const float temp = greedy ? 1.0f : a.temperature[r];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = xs[i] / temp;
    xs[i] = v == 0.0f ? 0.0f : v;
  }
  const float m = row_max(xs, n);
  if (!(m > kNegInf)) return kCfgNoAllowed;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) es[i] = exp_nonpos(xs[i] - m);

  float t = kNegInf;  // keep x >= t
  const int64_t k = a.top_k[r];
  if (k > 0 && k < count_finite(xs, n)) t = key_value(radix_select<false>(xs, es, n, t, s, k, 0.0));
  const double p = a.top_p[r];
  if (p < 1.0) {
    const double target = p * kept_mass(xs, es, n, t);
    t = key_value(radix_select<true>(xs, es, n, t, s, 0, target));
  }
  const double z = kept_mass(xs, es, n, t);

  int64_t pick = -1;
  if (greedy) {
    for (int64_t i = 0; i < n && pick < 0; ++i) pick = xs[i] == m ? i : -1;
  } else {
    const double target = cfg_row_uniform(a.seed, r) * z;
    double acc = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (xs[i] < t || es[i] == 0.0f) continue;
      last = i;
      acc += es[i];
      if (acc > target) { pick = i; break; }
    }
    if (pick < 0) pick = last;  // target rounded up to the total: take the last kept id
  }
  a.tokens[r] = start + pick;
  a.logprobs[r] = (xs[pick] - m) - static_cast<float>(std::log(z));
  return kCfgOk;
}

}  // namespace

void cfg_sample(const CfgSampleArgs& args) {
  const int64_t rows = args.batch;
#pragma omp parallel if (rows > 1)
  {
    Scratch& scratch = thread_scratch(args.vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      args.status[r] = sample_row(args, r, scratch);
      if (args.status[r] != kCfgOk) {
        args.tokens[r] = -1;
        args.logprobs[r] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

}  // namespace cpu
}  // namespace engine
