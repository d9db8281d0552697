// The CPU attention's backward pass (flash-attention-2 style); see attention.h, and
// attention_tiles.h for the staging and micro-kernels.
#include "cpu/attention_tiles.h"

namespace engine {
namespace cpu {

using namespace attention_detail;

namespace {

// ---- backward -------------------------------------------------------------------------------

// dq_acc: fp32 [B, Hq, S, d] that split documents add their partial dq into (atomically);
// a task that owns its whole document writes dq directly.
void backward_task(const AttentionBwdArgs& a, const Doc& doc, const Task& task, Scratch& w, float* dq_acc) {
  const AttentionShape& sh = a.shape;
  const int64_t d = sh.head_dim, Dp = round_up(d, 16), G = sh.heads / sh.kv_heads;
  const int64_t b = doc.b, hk = task.hk, k0 = task.lo, k1 = task.hi;
  const int64_t qlo = sh.causal ? k0 : doc.start, nq = doc.end - qlo;
  const int64_t nkb = (k1 - k0 + BN - 1) / BN;
  const int64_t es = elem_size(sh.dtype);
  w.kt.resize(nkb * d * BN);
  w.kr.resize(nkb * BN * Dp);
  w.vt.resize(nkb * d * BN);
  w.row.resize(Dp);
  stage_keys(a.k, sh.dtype, b, hk, k0, k1, d, Dp, w.kt.data(), w.kr.data(), w.row.data());
  stage_keys(a.v, sh.dtype, b, hk, k0, k1, d, Dp, w.vt.data(), nullptr, w.row.data());
  w.dk.assign(nkb * BN * Dp, 0.0f);
  w.dv.assign(nkb * BN * Dp, 0.0f);
  // Query-side rows [qlo, end) plus 4 zero rows, so a tile's last quad never reads past them.
  const int64_t nqp = nq + 4;
  w.q.resize(nqp * Dp);
  w.dout.resize(nqp * Dp);
  w.dq.resize(nqp * Dp);
  w.dd.resize(nqp);
  w.lse2.resize(nqp);
  w.s.resize(BM * BN);
  w.dp.resize(BM * BN);
  float *Q = w.q.data(), *dO = w.dout.data(), *dQ = w.dq.data(), *D = w.dd.data(), *L2 = w.lse2.data();
  float *S = w.s.data(), *dP = w.dp.data(), *row = w.row.data();
  const float cmul = sh.scale * LOG2E;

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t i = qlo + r, flat = (b * sh.heads + h) * sh.seq + i;
      load_row(row_of(a.q, sh.dtype, b, h, i), sh.dtype, d, Dp, 1.0f, Q + r * Dp);
      load_row(row_of(a.dout, sh.dtype, b, h, i), sh.dtype, d, Dp, 1.0f, dO + r * Dp);
      load_row(row_of(a.out, sh.dtype, b, h, i), sh.dtype, d, Dp, 1.0f, row);
      // D_i = sum_c dO * O = sum_j P_ij dP_ij, so dS = P * (dP - D). A gradient on lse adds
      // dlse_i * P_ij to dS (d lse_i / d s_ij = P_ij).
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += dO[r * Dp + c] * row[c];
      D[r] = dot - (a.dlse != nullptr ? a.dlse[flat] : 0.0f);
      L2[r] = a.lse[flat] * LOG2E;
    }
    std::fill(Q + nq * Dp, Q + nqp * Dp, 0.0f);
    std::fill(dO + nq * Dp, dO + nqp * Dp, 0.0f);
    std::fill(D + nq, D + nqp, 0.0f);
    std::fill(L2 + nq, L2 + nqp, 0.0f);
    std::fill(dQ, dQ + nqp * Dp, 0.0f);

    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t kb0 = k0 + kb * BN, nk = std::min(BN, k1 - kb0), nk16 = round_up(nk, 16);
      const float* Kt = w.kt.data() + kb * d * BN;
      const float* Vt = w.vt.data() + kb * d * BN;
      const float* Kr = w.kr.data() + kb * BN * Dp;
      float* dKb = w.dk.data() + kb * BN * Dp;
      float* dVb = w.dv.data() + kb * BN * Dp;
      for (int64_t q0 = sh.causal ? kb0 : doc.start; q0 < doc.end; q0 += BM) {
        const int64_t nr = std::min(BM, doc.end - q0), nr4 = round_up(nr, 4), qoff = q0 - qlo;
        const float* Qt = Q + qoff * Dp;
        const float* dOt = dO + qoff * Dp;
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t last = q0 + r4 + 3;
          for (int64_t j0 = 0; j0 < nk16 && !(sh.causal && kb0 + j0 > last); j0 += 16) {
            dot_4x16(Qt + r4 * Dp, Dp, Kt + j0, d, S + r4 * BN + j0, BN);
            dot_4x16(dOt + r4 * Dp, Dp, Vt + j0, d, dP + r4 * BN + j0, BN);
          }
        }
        // P = 2^(s * scale * log2 e - lse * log2 e), recomputed; dS = P * (dP - D) in dP's place.
        for (int64_t r = 0; r < nr4; ++r) {
          const int32_t vis = r < nr ? static_cast<int32_t>(visible(sh.causal, q0 + r, kb0, nk)) : 0;
          float* sr = S + r * BN;
          float* dr = dP + r * BN;
          const vf l2 = splat(L2[qoff + r]), dd = splat(D[qoff + r]);
          for (int64_t j0 = 0; j0 < nk16; j0 += 8) {
            const vi keep = iota8(static_cast<int32_t>(j0)) < vis;
            const vf p = exp2v(vload(sr + j0) * cmul - l2);
            vstore(sr + j0, keep ? p : splat(0.0f));
            vstore(dr + j0, keep ? p * (vload(dr + j0) - dd) : splat(0.0f));
          }
        }
        // dV += P^T dO and dK += dS^T Q, four keys at a time from the first query that sees them.
        for (int64_t j4 = 0; j4 < nk; j4 += 4) {
          const int64_t rlo = sh.causal ? std::max<int64_t>(0, kb0 + j4 - q0) : 0;
          for (int64_t c0 = 0; rlo < nr && c0 < Dp; c0 += 16) {
            acc_4x16(S + rlo * BN + j4, 1, BN, dOt + rlo * Dp + c0, Dp, nr - rlo, dVb + j4 * Dp + c0, Dp);
            acc_4x16(dP + rlo * BN + j4, 1, BN, Qt + rlo * Dp + c0, Dp, nr - rlo, dKb + j4 * Dp + c0, Dp);
          }
        }
        // dQ += dS K
        for (int64_t r4 = 0; r4 < nr4; r4 += 4) {
          const int64_t nj = visible(sh.causal, q0 + r4 + 3, kb0, nk);
          for (int64_t c0 = 0; nj > 0 && c0 < Dp; c0 += 16)
            acc_4x16(dP + r4 * BN, BN, 1, Kr + c0, Dp, nj, dQ + (qoff + r4) * Dp + c0, Dp);
        }
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t flat = (b * sh.heads + h) * sh.seq + qlo + r;
      if (!task.split) {
        store_row(static_cast<char*>(a.dq) + flat * d * es, sh.dtype, d, dQ + r * Dp, sh.scale);
        continue;
      }
      float* acc = dq_acc + flat * d;
      for (int64_t c = 0; c < d; ++c) {
        const float x = dQ[r * Dp + c] * sh.scale;
#pragma omp atomic
        acc[c] += x;
      }
    }
  }
  for (int64_t j = 0; j < k1 - k0; ++j) {
    const int64_t flat = (b * sh.kv_heads + hk) * sh.seq + k0 + j;
    store_row(static_cast<char*>(a.dk) + flat * d * es, sh.dtype, d, w.dk.data() + j * Dp, sh.scale);
    store_row(static_cast<char*>(a.dv) + flat * d * es, sh.dtype, d, w.dv.data() + j * Dp, 1.0f);
  }
}

}  // namespace

void attention_backward(const AttentionBwdArgs& a) {
  const AttentionShape& sh = a.shape;
  const std::vector<Doc> docs = documents(sh);
  const std::vector<Task> tasks = make_tasks(sh, docs, true);
  // Split documents sum partial dq from several tasks: in dq itself when it is fp32, else in
  // an fp32 buffer converted afterwards. Only their rows are zeroed and converted.
  std::vector<int64_t> split_docs;
  for (const Task& t : tasks)
    if (t.split) split_docs.push_back(t.doc);
  std::sort(split_docs.begin(), split_docs.end());
  split_docs.erase(std::unique(split_docs.begin(), split_docs.end()), split_docs.end());
  const int64_t d = sh.head_dim;
  std::vector<float> scratch;
  float* dq_acc = nullptr;
  if (!split_docs.empty()) {
    if (sh.dtype == AttnType::F32) {
      dq_acc = static_cast<float*>(a.dq);
    } else {
      scratch.resize(sh.batch * sh.heads * sh.seq * d);
      dq_acc = scratch.data();
    }
    for (int64_t i : split_docs)
      for (int64_t h = 0; h < sh.heads; ++h) {
        const int64_t first = (docs[i].b * sh.heads + h) * sh.seq + docs[i].start;
        std::fill(dq_acc + first * d, dq_acc + (first + docs[i].end - docs[i].start) * d, 0.0f);
      }
  }
  run_tasks(tasks, sh.threads, [&](const Task& t, Scratch& w) { backward_task(a, docs[t.doc], t, w, dq_acc); });
  if (dq_acc != nullptr && sh.dtype != AttnType::F32)
    for (int64_t i : split_docs)
      for (int64_t h = 0; h < sh.heads; ++h)
        for (int64_t s = docs[i].start; s < docs[i].end; ++s) {
          const int64_t flat = (docs[i].b * sh.heads + h) * sh.seq + s;
          store_row(static_cast<uint16_t*>(a.dq) + flat * d, sh.dtype, d, dq_acc + flat * d, 1.0f);
        }
}

}  // namespace cpu
}  // namespace engine
