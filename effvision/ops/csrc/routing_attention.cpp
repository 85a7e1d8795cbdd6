// Bi-level routing attention: CPU kernels and the Python bindings of
// effvision.ops._routing_attention.
//
// The region-level routing (region means, R x R affinity, topk) happens in PyTorch; these kernels
// do the token attention of every query region over the union of its topk routed regions.
//
// Forward, one task = one (image, query region, head): the routed keys and values are read where
// they lie in the (B, H, W, C) maps through a table of row pointers (region slot -> map token, see
// routing_attention.h); only the bf16/fp16 kernels convert them into a thread-local float copy. The
// logits are computed transposed, S^T = K Q^T (L keys x N queries), so that both products read
// the keys and values as rows and the softmax runs vectorised across queries; the output row is
// written to its token of the (B, H, W, C_v) result with the log-sum-exp saved for the backward.
//
// Backward, two passes, each owning what it writes (no atomics, no per-thread copies of the
// gradients, deterministic): pass 1 per (image, query region, head) recomputes P from the saved
// log-sum-exp and writes dQ; pass 2 per (image, key region, head) visits the query regions that
// routed to it (an inverse index, built with a stable sort) and accumulates dK and dV. Pass 2's
// tasks have uneven work (a key region may be chosen by many query regions or by none) and are
// handed out dynamically, largest first.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "routing_attention.h"

namespace effvision {
namespace routing_attention {

#if defined(EFFVISION_WITH_CUDA)
std::vector<at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& index, const Params<float>& p,
                                     double scale);
std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& index, const at::Tensor& out,
                                      const at::Tensor& lse, const at::Tensor& key_offsets,
                                      const at::Tensor& key_entries, const Params<float>& p,
                                      double scale);
#endif

namespace {

// Function multiversioning of the hot loops: an AVX2 + FMA clone, chosen at load time where the
// CPU has them, and a baseline one. Not "arch=haswell": GCC selects that clone only on CPUs that
// identify as Haswell (__builtin_cpu_is), i.e. never on AMD or newer Intel cores.
#define EV_CPU_CLONES "arch=x86-64-v3", "default"

// Queries handled together: the logits buffer is (L keys x kQueryBlock) per thread.
constexpr int kQueryBlock = 64;

int round_up(int x, int m) { return (x + m - 1) / m * m; }


// Register tiles of kTileRows x two 256-bit vectors (12 accumulators of the 16 AVX registers).
constexpr int kTileRows = 6;
template <typename T>
struct Simd {
  static constexpr int W = 32 / sizeof(T);
};

// An MR x (NV * W) tile of C = alpha * A B (+ C), see gemm(). Plain arrays and `omp simd`: the
// compiler keeps the accumulators in registers with AVX2/FMA in the x86-64-v3 clones and SSE in
// the default ones (GCC vector extensions of 256 bits are ten times slower without AVX).
template <int MR, int NV, typename T>
__attribute__((always_inline)) inline void gemm_tile(int K, const T* const* a, int64_t a_step,
                                                     const T* const* b, int j0, T* c, int64_t ldc,
                                                     T alpha, bool accumulate) {
  constexpr int NC = NV * Simd<T>::W;
  T acc[MR][NC];
  const T* ar[MR];
  for (int i = 0; i < MR; ++i) {
    ar[i] = a[i];
    for (int u = 0; u < NC; ++u) acc[i][u] = 0;
  }
#pragma GCC unroll 4
  for (int kk = 0; kk < K; ++kk) {
    const T* bk = b[kk] + j0;
    for (int i = 0; i < MR; ++i) {
      const T ai = ar[i][kk * a_step];
#pragma omp simd
      for (int u = 0; u < NC; ++u) acc[i][u] += ai * bk[u];
    }
  }
  for (int i = 0; i < MR; ++i) {
    T* dst = c + i * ldc + j0;
    for (int u = 0; u < NC; ++u)
      dst[u] = accumulate ? dst[u] + alpha * acc[i][u] : alpha * acc[i][u];
  }
}

template <int NV, typename T>
__attribute__((always_inline)) inline void gemm_rows(int mr, int K, const T* const* a,
                                                     int64_t a_step, const T* const* b, int j0,
                                                     T* c, int64_t ldc, T alpha, bool accumulate) {
  switch (mr) {
    case 6: gemm_tile<6, NV>(K, a, a_step, b, j0, c, ldc, alpha, accumulate); break;
    case 5: gemm_tile<5, NV>(K, a, a_step, b, j0, c, ldc, alpha, accumulate); break;
    case 4: gemm_tile<4, NV>(K, a, a_step, b, j0, c, ldc, alpha, accumulate); break;
    case 3: gemm_tile<3, NV>(K, a, a_step, b, j0, c, ldc, alpha, accumulate); break;
    case 2: gemm_tile<2, NV>(K, a, a_step, b, j0, c, ldc, alpha, accumulate); break;
    default: gemm_tile<1, NV>(K, a, a_step, b, j0, c, ldc, alpha, accumulate); break;
  }
}

// C (M x ncol, row-major, ldc) = alpha * A B, or += with `accumulate`, where
// A(i, k) = a[i][k * a_step] and B(k, j) = b[k][j]: both operands come as row pointers, so the
// keys and values are read in place from the map and A may be a transposed buffer.
template <typename T>
__attribute__((target_clones(EV_CPU_CLONES))) void gemm(
    int M, int ncol, int K, const T* const* a, int64_t a_step, const T* const* b, T* c,
    int64_t ldc, T alpha, bool accumulate) {
  constexpr int W = Simd<T>::W;
  for (int i0 = 0; i0 < M; i0 += kTileRows) {
    const int mr = std::min(kTileRows, M - i0);
    const T* const* ai = a + i0;
    T* ci = c + int64_t(i0) * ldc;
    int j0 = 0;
    for (; j0 + 2 * W <= ncol; j0 += 2 * W)
      gemm_rows<2>(mr, K, ai, a_step, b, j0, ci, ldc, alpha, accumulate);
    for (; j0 + W <= ncol; j0 += W)
      gemm_rows<1>(mr, K, ai, a_step, b, j0, ci, ldc, alpha, accumulate);
    for (; j0 < ncol; ++j0) {  // the last columns of a row that is not a multiple of W
      for (int i = 0; i < mr; ++i) {
        T sum = 0;
        for (int kk = 0; kk < K; ++kk) sum += ai[i][kk * a_step] * b[kk][j0];
        T& dst = ci[int64_t(i) * ldc + j0];
        dst = accumulate ? dst + alpha * sum : alpha * sum;
      }
    }
  }
}

// `n` channels at `src` as acc_t: the row itself, or its conversion into `scratch`.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int n, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int c = 0; c < n; ++c) scratch[c] = static_cast<acc_t>(src[c]);
    return scratch;
  }
}

template <typename acc_t>
void split_task(const Params<acc_t>& p, int64_t task, int& b, int& r, int& h) {
  h = int(task % p.heads);
  r = int((task / p.heads) % p.g.R);
  b = int(task / (int64_t(p.heads) * p.g.R));
}

// Thread-local buffers of the forward and of backward pass 1 (one query region at a time).
template <typename scalar_t, typename acc_t>
struct Scratch {
  static constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  int ld;                                // padded query block (columns of S^T)
  std::vector<const acc_t*> krow, vrow;  // routed key / value rows (L)
  std::vector<const acc_t*> arow;        // operand row table
  std::vector<acc_t> kbuf, vbuf;         // converted rows (bf16 / fp16 only)
  std::vector<acc_t> qt, got;            // Q^T (scaled), dO^T: (d x ld)
  std::vector<acc_t> s, ds;              // S^T -> P^T, dP^T -> dS^T: (L x ld)
  std::vector<acc_t> o, m, sum, delta;

  Scratch(const Params<acc_t>& p, int keys) {
    const int N = p.g.N;
    ld = round_up(std::min(N, kQueryBlock), 16);
    const int d = std::max(p.dqk, p.dv);
    const int rows = std::max({keys, ld, p.dqk, p.dv});
    krow.resize(keys);
    vrow.resize(keys);
    arow.resize(rows);
    if (convert) {
      kbuf.resize(size_t(keys) * p.dqk);
      vbuf.resize(size_t(keys) * p.dv);
    }
    qt.resize(size_t(p.dqk) * ld);
    got.resize(size_t(p.dv) * ld);
    s.resize(size_t(keys) * ld);
    ds.resize(size_t(keys) * ld);
    o.resize(size_t(std::max(ld, keys)) * d);
    m.resize(ld);
    sum.resize(ld);
    delta.resize(ld);
  }

  // key and value rows of head h of region `region` at slots [first, first + N)
  void load_region(const scalar_t* k, const scalar_t* v, const Params<acc_t>& p, int b,
                   int region, int h, int first) {
    for (int pos = 0; pos < p.g.N; ++pos) {
      const int j = first + pos;
      krow[j] = as_acc(k + p.offset(p.k, b, region, pos) + int64_t(h) * p.dqk, p.dqk,
                       convert ? &kbuf[size_t(j) * p.dqk] : nullptr);
      vrow[j] = as_acc(v + p.offset(p.v, b, region, pos) + int64_t(h) * p.dv, p.dv,
                       convert ? &vbuf[size_t(j) * p.dv] : nullptr);
    }
  }

  // Q^T (scaled) of queries [i0, i0 + nq) of region r into qt (dqk x ld), padded with zeros
  void load_queries(const scalar_t* q, const Params<acc_t>& p, int b, int r, int h, int i0,
                    int nq) {
    std::fill(qt.begin(), qt.begin() + size_t(p.dqk) * ld, acc_t(0));
    for (int i = 0; i < nq; ++i) {
      const scalar_t* src = q + p.offset(p.q, b, r, i0 + i) + int64_t(h) * p.dqk;
      for (int c = 0; c < p.dqk; ++c) qt[size_t(c) * ld + i] = static_cast<acc_t>(src[c]) * p.scale;
    }
  }

  // dO^T of queries [i0, i0 + nq) into got (dv x ld), and delta_i = dO_i . O_i
  void load_grad(const scalar_t* grad_out, const scalar_t* out, const Params<acc_t>& p, int b,
                 int r, int h, int i0, int nq) {
    std::fill(got.begin(), got.begin() + size_t(p.dv) * ld, acc_t(0));
    for (int i = 0; i < nq; ++i) {
      const int64_t at = p.token(b, r, i0 + i) * p.Cv + int64_t(h) * p.dv;
      const scalar_t* g = grad_out + at;
      const scalar_t* o_i = out + at;
      acc_t dot = 0;
      for (int c = 0; c < p.dv; ++c) {
        const acc_t gc = static_cast<acc_t>(g[c]);
        got[size_t(c) * ld + i] = gc;
        dot += gc * static_cast<acc_t>(o_i[c]);
      }
      delta[i] = dot;
    }
  }

  void set_rows(std::vector<const acc_t*>& table, const std::vector<acc_t>& buf, int n,
                int64_t step) {
    for (int i = 0; i < n; ++i) table[i] = buf.data() + i * step;
  }
};

// S^T (keys x ld) holds logits; turn column i into exp(S - lse_i), zero for padded queries.
template <typename acc_t>
inline void probabilities(acc_t* s, int keys, int ld, int nq, const acc_t* lse) {
  for (int j = 0; j < keys; ++j) {
    acc_t* sj = s + int64_t(j) * ld;
#pragma omp simd
    for (int i = 0; i < nq; ++i) sj[i] = fast_exp(sj[i] - lse[i]);
    for (int i = nq; i < ld; ++i) sj[i] = 0;
  }
}

// dS^T = P^T * (dP^T - delta), in place of dP^T.
template <typename acc_t>
inline void score_grad(acc_t* ds, const acc_t* s, int keys, int ld, const acc_t* delta) {
  for (int j = 0; j < keys; ++j) {
    acc_t* dj = ds + int64_t(j) * ld;
    const acc_t* sj = s + int64_t(j) * ld;
#pragma omp simd
    for (int i = 0; i < ld; ++i) dj[i] = sj[i] * (dj[i] - delta[i]);
  }
}

template <typename scalar_t, typename acc_t>
__attribute__((target_clones(EV_CPU_CLONES))) void forward_tasks(
    const scalar_t* q, const scalar_t* k, const scalar_t* v, const int64_t* index,
    scalar_t* out, acc_t* lse, const Params<acc_t>& p, int64_t begin, int64_t end) {
  const int N = p.g.N, L = p.topk * N;
  Scratch<scalar_t, acc_t> w(p, L);
  acc_t* s = w.s.data();
  acc_t* m = w.m.data();
  acc_t* sum = w.sum.data();
  for (int64_t task = begin; task < end; ++task) {
    int b, r, h;
    split_task(p, task, b, r, h);
    const int64_t* routed = index + (int64_t(b) * p.g.R + r) * p.topk;
    for (int t = 0; t < p.topk; ++t) w.load_region(k, v, p, b, int(routed[t]), h, t * N);
    for (int i0 = 0; i0 < N; i0 += kQueryBlock) {
      const int nq = std::min(kQueryBlock, N - i0), ld = w.ld;
      w.load_queries(q, p, b, r, h, i0, nq);
      w.set_rows(w.arow, w.qt, p.dqk, ld);
      gemm<acc_t>(L, ld, p.dqk, w.krow.data(), 1, w.arow.data(), s, ld, 1, false);  // S^T
      std::fill(m, m + ld, -std::numeric_limits<acc_t>::infinity());
      for (int j = 0; j < L; ++j) {
        const acc_t* sj = s + int64_t(j) * ld;
#pragma omp simd
        for (int i = 0; i < ld; ++i) m[i] = std::max(m[i], sj[i]);
      }
      std::fill(sum, sum + ld, acc_t(0));
      for (int j = 0; j < L; ++j) {
        acc_t* sj = s + int64_t(j) * ld;
#pragma omp simd
        for (int i = 0; i < ld; ++i) {
          sj[i] = fast_exp(sj[i] - m[i]);
          sum[i] += sj[i];
        }
      }
      w.set_rows(w.arow, w.s, nq, 1);  // A(i, j) = P^T[j][i]
      gemm<acc_t>(nq, p.dv, L, w.arow.data(), ld, w.vrow.data(), w.o.data(), p.dv, 1, false);
      for (int i = 0; i < nq; ++i) {
        const acc_t inv = acc_t(1) / sum[i];
        const acc_t* oi = &w.o[size_t(i) * p.dv];
        scalar_t* dst = out + p.token(b, r, i0 + i) * p.Cv + int64_t(h) * p.dv;
        for (int c = 0; c < p.dv; ++c) dst[c] = static_cast<scalar_t>(oi[c] * inv);
        lse[p.stat_index(b, r, h, i0 + i)] = m[i] + std::log(sum[i]);
      }
    }
  }
}

// Pass 1: dQ of every query, and delta = dO . O saved for pass 2.
template <typename scalar_t, typename acc_t>
__attribute__((target_clones(EV_CPU_CLONES))) void backward_query_tasks(
    const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
    const int64_t* index, const scalar_t* out, const acc_t* lse, acc_t* delta,
    scalar_t* grad_q, const Params<acc_t>& p, int64_t begin, int64_t end) {
  const int N = p.g.N, L = p.topk * N;
  Scratch<scalar_t, acc_t> w(p, L);
  std::vector<acc_t> lse_block(w.ld);
  for (int64_t task = begin; task < end; ++task) {
    int b, r, h;
    split_task(p, task, b, r, h);
    const int64_t* routed = index + (int64_t(b) * p.g.R + r) * p.topk;
    for (int t = 0; t < p.topk; ++t) w.load_region(k, v, p, b, int(routed[t]), h, t * N);
    for (int i0 = 0; i0 < N; i0 += kQueryBlock) {
      const int nq = std::min(kQueryBlock, N - i0), ld = w.ld;
      w.load_queries(q, p, b, r, h, i0, nq);
      w.load_grad(grad_out, out, p, b, r, h, i0, nq);
      std::fill(w.delta.begin() + nq, w.delta.end(), acc_t(0));
      for (int i = 0; i < nq; ++i) {
        lse_block[i] = lse[p.stat_index(b, r, h, i0 + i)];
        delta[p.stat_index(b, r, h, i0 + i)] = w.delta[i];
      }
      w.set_rows(w.arow, w.qt, p.dqk, ld);
      gemm<acc_t>(L, ld, p.dqk, w.krow.data(), 1, w.arow.data(), w.s.data(), ld, 1, false);
      probabilities(w.s.data(), L, ld, nq, lse_block.data());
      w.set_rows(w.arow, w.got, p.dv, ld);
      gemm<acc_t>(L, ld, p.dv, w.vrow.data(), 1, w.arow.data(), w.ds.data(), ld, 1, false);
      score_grad(w.ds.data(), w.s.data(), L, ld, w.delta.data());
      w.set_rows(w.arow, w.ds, nq, 1);  // A(i, j) = dS^T[j][i]
      gemm<acc_t>(nq, p.dqk, L, w.arow.data(), ld, w.krow.data(), w.o.data(), p.dqk, p.scale,
                  false);
      for (int i = 0; i < nq; ++i) {
        const acc_t* gi = &w.o[size_t(i) * p.dqk];
        scalar_t* dst = grad_q + p.token(b, r, i0 + i) * p.Cqk + int64_t(h) * p.dqk;
        for (int c = 0; c < p.dqk; ++c) dst[c] = static_cast<scalar_t>(gi[c]);
      }
    }
  }
}

// Pass 2: dK and dV of the key region of each task, from every query region routed to it. The
// task's keys and values are transposed once; the queries and their dO are read in place as
// rows, so a (key region, query region) pair costs its four products and nothing else.
template <typename scalar_t, typename acc_t>
__attribute__((target_clones(EV_CPU_CLONES))) void backward_key_tasks(
    const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
    const acc_t* lse, const acc_t* delta, const int64_t* key_offsets, const int64_t* key_entries,
    const int64_t* order, scalar_t* grad_k, scalar_t* grad_v, const Params<acc_t>& p,
    std::atomic<int64_t>& next, int64_t num_tasks) {
  constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
  const int N = p.g.N, dqk = p.dqk, dv = p.dv;
  const int ldk = round_up(N, 16);             // the task's keys: columns of S and dP
  const int rows = std::min(N, kQueryBlock);   // queries per step
  std::vector<acc_t> kt(size_t(dqk) * ldk, acc_t(0)), vt(size_t(dv) * ldk, acc_t(0));
  std::vector<acc_t> s(size_t(rows) * ldk), ds(size_t(rows) * ldk), lse_i(rows), delta_i(rows);
  std::vector<acc_t> dk(size_t(N) * dqk), dvv(size_t(N) * dv);
  std::vector<acc_t> qbuf(convert ? size_t(rows) * dqk : 0), gbuf(convert ? size_t(rows) * dv : 0);
  std::vector<const acc_t*> qrow(rows), grow(rows), ktrow(dqk), vtrow(dv), arow(N);
  for (int c = 0; c < dqk; ++c) ktrow[c] = kt.data() + int64_t(c) * ldk;
  for (int c = 0; c < dv; ++c) vtrow[c] = vt.data() + int64_t(c) * ldk;
  for (int64_t slot = next++; slot < num_tasks; slot = next++) {
    const int64_t region = order[slot / p.heads];  // b * R + key region
    const int h = int(slot % p.heads);
    const int b = int(region / p.g.R), kr = int(region % p.g.R);
    for (int j = 0; j < N; ++j) {  // K^T, V^T (the padded columns stay 0)
      const scalar_t* kj = k + p.offset(p.k, b, kr, j) + int64_t(h) * dqk;
      const scalar_t* vj = v + p.offset(p.v, b, kr, j) + int64_t(h) * dv;
      for (int c = 0; c < dqk; ++c) kt[int64_t(c) * ldk + j] = static_cast<acc_t>(kj[c]);
      for (int c = 0; c < dv; ++c) vt[int64_t(c) * ldk + j] = static_cast<acc_t>(vj[c]);
    }
    std::fill(dk.begin(), dk.end(), acc_t(0));
    std::fill(dvv.begin(), dvv.end(), acc_t(0));
    for (int64_t e = key_offsets[region]; e < key_offsets[region + 1]; ++e) {
      const int r = int(key_entries[e] % p.g.R);  // the query region (same image)
      for (int i0 = 0; i0 < N; i0 += rows) {
        const int nq = std::min(rows, N - i0);
        for (int i = 0; i < nq; ++i) {
          const scalar_t* qi = q + p.offset(p.q, b, r, i0 + i) + int64_t(h) * dqk;
          const scalar_t* gi = grad_out + p.token(b, r, i0 + i) * p.Cv + int64_t(h) * dv;
          qrow[i] = as_acc(qi, dqk, convert ? &qbuf[size_t(i) * dqk] : nullptr);
          grow[i] = as_acc(gi, dv, convert ? &gbuf[size_t(i) * dv] : nullptr);
          lse_i[i] = lse[p.stat_index(b, r, h, i0 + i)];
          delta_i[i] = delta[p.stat_index(b, r, h, i0 + i)];
        }
        // S = scale Q K^T and dP = dO V^T (rows: queries), then P and dS in place
        gemm<acc_t>(nq, ldk, dqk, qrow.data(), 1, ktrow.data(), s.data(), ldk, p.scale, false);
        gemm<acc_t>(nq, ldk, dv, grow.data(), 1, vtrow.data(), ds.data(), ldk, 1, false);
        for (int i = 0; i < nq; ++i) {
          acc_t* si = &s[size_t(i) * ldk];
          acc_t* di = &ds[size_t(i) * ldk];
          const acc_t l = lse_i[i], dl = delta_i[i];
#pragma omp simd
          for (int j = 0; j < ldk; ++j) {
            si[j] = fast_exp(si[j] - l);
            di[j] = si[j] * (di[j] - dl);
          }
        }
        // dV += P^T dO and dK += scale dS^T Q (rows: keys, reduction over the nq queries)
        for (int j = 0; j < N; ++j) arow[j] = s.data() + j;
        gemm<acc_t>(N, dv, nq, arow.data(), ldk, grow.data(), dvv.data(), dv, 1, true);
        for (int j = 0; j < N; ++j) arow[j] = ds.data() + j;
        gemm<acc_t>(N, dqk, nq, arow.data(), ldk, qrow.data(), dk.data(), dqk, p.scale, true);
      }
    }
    for (int j = 0; j < N; ++j) {
      const int64_t token = p.token(b, kr, j);
      scalar_t* gk = grad_k + token * p.Cqk + int64_t(h) * dqk;
      scalar_t* gv = grad_v + token * p.Cv + int64_t(h) * dv;
      for (int c = 0; c < dqk; ++c) gk[c] = static_cast<scalar_t>(dk[size_t(j) * dqk + c]);
      for (int c = 0; c < dv; ++c) gv[c] = static_cast<scalar_t>(dvv[size_t(j) * dv + c]);
    }
  }
}

void check_map(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "routing_attention: ", name, " must be (B, H, W, C), got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "routing_attention: ", name,
              "'s channels must be contiguous (stride 1), got strides ", t.strides());
  TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2),
              "routing_attention: ", name, " ", t.sizes(), " and q ", q.sizes(),
              " must have the same batch and map size");
  TORCH_CHECK(t.scalar_type() == q.scalar_type() && t.device() == q.device(),
              "routing_attention: q, k and v must share dtype and device");
}

MapStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename acc_t>
Params<acc_t> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& index, const std::vector<int64_t>& n_win,
                          int64_t num_heads, double scale) {
  check_map(q, "q", q);
  check_map(k, "k", q);
  check_map(v, "v", q);
  TORCH_CHECK(n_win.size() == 2 && n_win[0] > 0 && n_win[1] > 0,
              "routing_attention: n_win must be (regions per column, regions per row) > 0");
  TORCH_CHECK(num_heads > 0 && q.size(3) == k.size(3) && q.size(3) % num_heads == 0 &&
                  v.size(3) % num_heads == 0,
              "routing_attention: q and k (", q.size(3), " channels) and v (", v.size(3),
              ") must split into ", num_heads, " heads, with as many q as k channels");
  TORCH_CHECK(q.size(1) % n_win[0] == 0 && q.size(2) % n_win[1] == 0,
              "routing_attention: the map ", q.size(1), " x ", q.size(2),
              " is not a multiple of the ", n_win[0], " x ", n_win[1], " region grid");
  Params<acc_t> p;
  p.g = make_geometry(int(q.size(1)), int(q.size(2)), int(n_win[0]), int(n_win[1]));
  TORCH_CHECK(index.dim() == 3 && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.size(0) == q.size(0) && index.size(1) == p.g.R && index.size(2) >= 1 &&
                  index.device() == q.device(),
              "routing_attention: index must be contiguous int64 (B, R, topk) on q's device with "
              "R = ", p.g.R, ", got ", index.sizes(), " ", index.scalar_type());
  p.B = int(q.size(0));
  p.heads = int(num_heads);
  p.topk = int(index.size(2));
  p.Cqk = int(q.size(3));
  p.Cv = int(v.size(3));
  p.dqk = p.Cqk / p.heads;
  p.dv = p.Cv / p.heads;
  p.q = strides_of(q);
  p.k = strides_of(k);
  p.v = strides_of(v);
  p.scale = acc_t(scale);
  return p;
}

void check_index_range(const at::Tensor& index, int R) {
  if (index.numel() == 0) return;
  const auto range = at::aminmax(index);
  const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < R, "routing_attention: routed region indices must be in [0, ", R,
              "), got [", lo, ", ", hi, "]");
}

// For every key region (b * R + r), the query regions (b * R + r') that routed to it, one entry
// per routing slot, in query order: entries[offsets[x] : offsets[x + 1]].
std::pair<at::Tensor, at::Tensor> invert_routing(const at::Tensor& index, int R) {
  const int64_t B = index.size(0), topk = index.size(2);
  auto image = at::arange(B, index.options()).view({B, 1, 1}) * R;
  auto key = (index + image).reshape(-1);
  auto entries = at::argsort(key, /*stable=*/true).div(topk, "floor");
  auto counts = at::bincount(key, {}, B * R);
  auto offsets = at::zeros({B * R + 1}, index.options());
  offsets.slice(0, 1).copy_(counts.cumsum(0));
  return {offsets, entries.contiguous()};
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& index, const std::vector<int64_t>& n_win,
                                int64_t num_heads, double scale) {
  if (q.is_cuda()) {
#if defined(EFFVISION_WITH_CUDA)
    auto p = make_params<float>(q, k, v, index, n_win, num_heads, scale);
    return forward_cuda(q, k, v, index, p, scale);
#else
    TORCH_CHECK(false, "effvision was built without CUDA kernels");
#endif
  }
  std::vector<at::Tensor> result;
  const auto dtype = q.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "routing_attention", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    auto p = make_params<acc_t>(q, k, v, index, n_win, num_heads, scale);
    check_index_range(index, p.g.R);
    auto out = at::empty({p.B, p.g.H, p.g.W, p.Cv}, q.options());
    auto lse = at::empty({p.B, p.g.R, p.heads, p.g.N}, q.options().dtype(acc));
    const int64_t tasks = int64_t(p.B) * p.g.R * p.heads;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      forward_tasks<scalar_t, acc_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                     v.data_ptr<scalar_t>(), index.data_ptr<int64_t>(),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), p, begin,
                                     end);
    });
    result = {out, lse};
  });
  return result;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& index, const at::Tensor& out,
                                 const at::Tensor& lse, const std::vector<int64_t>& n_win,
                                 int64_t num_heads, double scale) {
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "routing_attention backward: grad_out, out and lse must be contiguous");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type(),
              "routing_attention backward: grad_out must match the output");
  if (q.is_cuda()) {
#if defined(EFFVISION_WITH_CUDA)
    auto p = make_params<float>(q, k, v, index, n_win, num_heads, scale);
    auto [offsets, entries] = invert_routing(index, p.g.R);
    return backward_cuda(grad_out, q, k, v, index, out, lse, offsets, entries, p, scale);
#else
    TORCH_CHECK(false, "effvision was built without CUDA kernels");
#endif
  }
  std::vector<at::Tensor> result;
  const auto dtype = q.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "routing_attention_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto p = make_params<acc_t>(q, k, v, index, n_win, num_heads, scale);
    check_index_range(index, p.g.R);
    auto [offsets, entries] = invert_routing(index, p.g.R);
    // key regions by decreasing number of routed query regions: the longest tasks start first
    auto order = std::get<1>(at::sort(offsets.slice(0, 1) - offsets.slice(0, 0, -1),
                                      /*stable=*/true, /*dim=*/0, /*descending=*/true))
                     .contiguous();
    auto grad_q = at::empty({p.B, p.g.H, p.g.W, p.Cqk}, q.options());
    auto grad_k = at::empty({p.B, p.g.H, p.g.W, p.Cqk}, q.options());
    auto grad_v = at::empty({p.B, p.g.H, p.g.W, p.Cv}, q.options());
    auto delta = at::empty_like(lse);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t tasks = int64_t(p.B) * p.g.R * p.heads;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      backward_query_tasks<scalar_t, acc_t>(go, qp, kp, vp, index.data_ptr<int64_t>(), op,
                                            lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
                                            grad_q.data_ptr<scalar_t>(), p, begin, end);
    });
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      backward_key_tasks<scalar_t, acc_t>(
          go, qp, kp, vp, lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
          offsets.data_ptr<int64_t>(), entries.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
          grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), p, next, tasks);
    });
    result = {grad_q, grad_k, grad_v};
  });
  return result;
}

}  // namespace routing_attention
}  // namespace effvision

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effvision bi-level routing attention kernels (CPU, and CUDA when WITH_CUDA)";
  m.def("forward", &effvision::routing_attention::forward,
        "routing attention forward: (out, lse) from q, k, v maps and routed region indices");
  m.def("backward", &effvision::routing_attention::backward,
        "routing attention backward: (grad_q, grad_k, grad_v)");
#if defined(EFFVISION_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
