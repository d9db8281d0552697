// The CPU attention's forward pass and the cu_seqlens check; see attention.h, and
// attention_tiles.h for the staging and micro-kernels.
#include "cpu/attention_tiles.h"

namespace engine {
namespace cpu {

using namespace attention_detail;

namespace {

// ---- forward --------------------------------------------------------------------------------

void forward_task(const AttentionFwdArgs& a, const Doc& doc, const Task& task, Scratch& w) {
  const AttentionShape& sh = a.shape;
  const int64_t d = sh.head_dim, Dp = round_up(d, 16), G = sh.heads / sh.kv_heads;
  const int64_t b = doc.b, hk = task.hk;
  const int64_t kend = sh.causal ? task.hi : doc.end;  // keys this task can need
  const int64_t nkb = (kend - doc.start + BN - 1) / BN;
  w.kt.resize(nkb * d * BN);
  w.v.resize(nkb * BN * Dp);
  w.row.resize(Dp);
  stage_keys(a.k, sh.dtype, b, hk, doc.start, kend, d, Dp, w.kt.data(), nullptr, w.row.data());
  stage_keys(a.v, sh.dtype, b, hk, doc.start, kend, d, Dp, nullptr, w.v.data(), w.row.data());
  w.q.resize(BM * Dp);
  w.o.resize(BM * Dp);
  w.s.resize(BM * BN);
  w.m.resize(BM);
  w.l.resize(BM);
  float *Q = w.q.data(), *O = w.o.data(), *S = w.s.data(), *m = w.m.data(), *l = w.l.data();
  // Scores in base 2: scale * log2(e) is folded into q once.
  const float qmul = sh.scale * LOG2E;
  const int64_t es = elem_size(sh.dtype);

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t q0 = task.lo; q0 < task.hi; q0 += BM) {
      const int64_t nr = std::min(BM, task.hi - q0), nr4 = round_up(nr, 4);
      for (int64_t r = 0; r < nr4; ++r) {
        if (r < nr) load_row(row_of(a.q, sh.dtype, b, h, q0 + r), sh.dtype, d, Dp, qmul, Q + r * Dp);
        else std::fill(Q + r * Dp, Q + (r + 1) * Dp, 0.0f);
      }
      std::fill(O, O + nr4 * Dp, 0.0f);
      std::fill(m, m + nr4, NEG_INF);
      std::fill(l, l + nr4, 0.0f);
      const int64_t klim = sh.causal ? q0 + nr : doc.end;
      for (int64_t kb0 = doc.start; kb0 < klim; kb0 += BN) {
        const int64_t nk = std::min(BN, klim - kb0), nk16 = round_up(nk, 16);
        const int64_t kb = (kb0 - doc.start) / BN;
        const float* Kt = w.kt.data() + kb * d * BN;
        const float* V = w.v.data() + kb * BN * Dp;
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t last = q0 + r4 + 3;  // the quad's last query
          for (int64_t j0 = 0; j0 < nk16 && !(sh.causal && kb0 + j0 > last); j0 += 16)
            dot_4x16(Q + r4 * Dp, Dp, Kt + j0, d, S + r4 * BN + j0, BN);
        }
        // Online softmax: rescale a row's sums only when its max moves.
        for (int64_t r = 0; r < nr4; ++r) {
          float* sr = S + r * BN;
          const int32_t vis = static_cast<int32_t>(visible(sh.causal, q0 + r, kb0, nk));
          if (vis == 0) {
            std::fill(sr, sr + nk16, 0.0f);
            continue;
          }
          vf mx = splat(NEG_INF);
          for (int64_t j0 = 0; j0 < nk16; j0 += 8) {
            const vf x = vload(sr + j0);
            const vf masked = iota8(static_cast<int32_t>(j0)) < vis ? x : splat(NEG_INF);
            mx = mx > masked ? mx : masked;
          }
          const float mnew = std::max(m[r], hmax(mx));
          const float alpha = std::exp2(m[r] - mnew);  // 0 on the first block (m = -inf)
          vf sum{};
          const vf mv = splat(mnew);
          for (int64_t j0 = 0; j0 < nk16; j0 += 8) {
            const vf p = exp2v(vload(sr + j0) - mv);
            const vf kept = iota8(static_cast<int32_t>(j0)) < vis ? p : splat(0.0f);
            vstore(sr + j0, kept);
            sum += kept;
          }
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = mnew;
          if (alpha != 1.0f) {
            float* orow = O + r * Dp;
#pragma omp simd
            for (int64_t c = 0; c < Dp; ++c) orow[c] *= alpha;
          }
        }
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t nj = visible(sh.causal, q0 + r4 + 3, kb0, nk);
          for (int64_t c0 = 0; nj > 0 && c0 < Dp; c0 += 16)
            acc_4x16(S + r4 * BN, BN, 1, V + c0, Dp, nj, O + r4 * Dp + c0, Dp);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = q0 + r;
        const int64_t flat = (b * sh.heads + h) * sh.seq + i;
        store_row(static_cast<char*>(a.out) + flat * d * es, sh.dtype, d, O + r * Dp, 1.0f / l[r]);
        a.lse[flat] = (m[r] + std::log2(l[r])) * LN2;
      }
    }
  }
}

}  // namespace

const char* check_documents(const int32_t* cu, int64_t n_docs, int64_t batch, int64_t seq) {
  if (n_docs < 1) return "cu_seqlens must hold at least 2 entries";
  if (cu[0] != 0 || cu[n_docs] != batch * seq) return "cu_seqlens must start at 0 and end at B*S";
  int64_t next_row_end = seq;
  for (int64_t i = 0; i < n_docs; ++i) {
    if (cu[i + 1] < cu[i]) return "cu_seqlens must not decrease";
    // Every row boundary must be an entry: a document that runs past one crosses rows.
    while (next_row_end <= cu[i]) next_row_end += seq;
    if (cu[i + 1] > next_row_end)
      return "a document crosses a row boundary; every multiple of S must be in cu_seqlens";
  }
  return nullptr;
}

void attention_forward(const AttentionFwdArgs& a) {
  const std::vector<Doc> docs = documents(a.shape);
  const std::vector<Task> tasks = make_tasks(a.shape, docs, false);
  run_tasks(tasks, a.shape.threads, [&](const Task& t, Scratch& w) { forward_task(a, docs[t.doc], t, w); });
}

}  // namespace cpu
}  // namespace engine
