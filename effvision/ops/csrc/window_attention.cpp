// Window attention: CPU kernels and the Python bindings of effvision.ops._window_attention.
//
// One task = one (image, window, head). A task gathers its window's q, k, v straight from the
// (B, H, W, 3C) map through the slot -> token arithmetic of window_attention.h (padding, shift and
// partition are index math, never copies of the map), computes each query row's logits, softmax
// and output in thread-local buffers, and writes the output row to its token of the (B, H, W, C)
// result. The backward pass recomputes the logits from the saved log-sum-exp (no N x N tensor is
// kept) and writes d(qkv) the same way; the relative position bias and the padding value get
// their gradients through per-thread accumulators.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "window_attention.h"

namespace effvision {
namespace window_attention {

#if defined(EFFVISION_WITH_CUDA)
std::vector<at::Tensor> forward_cuda(const at::Tensor& qkv, const Params<float>& p,
                                     const c10::optional<at::Tensor>& bias_table,
                                     const c10::optional<at::Tensor>& bias_index,
                                     const c10::optional<at::Tensor>& pad_value);
std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                      const at::Tensor& out, const at::Tensor& lse,
                                      const Params<float>& p,
                                      const c10::optional<at::Tensor>& bias_table,
                                      const c10::optional<at::Tensor>& bias_index,
                                      const c10::optional<at::Tensor>& pad_value,
                                      bool need_bias_grad, bool need_pad_grad);
#endif

namespace {

// The hot helpers are forced inline so that they are compiled into each target_clones version of
// the task loops (a plain `inline` helper stays one baseline-ISA function).
#define EV_INLINE inline __attribute__((always_inline))


// out[0, width) = sum_r coef[r] * rows[r * stride + (0, width)]: K accumulators stay in vector
// registers across all rows instead of streaming `out` through memory once per row.
template <int K, typename acc_t>
EV_INLINE void combine_rows(acc_t* __restrict out, const acc_t* __restrict coef,
                            const acc_t* __restrict rows, int nrows, int stride, int width) {
  int c = 0;
  for (; c + K <= width; c += K) {
    acc_t acc[K] = {};
    for (int r = 0; r < nrows; ++r) {
      const acc_t a = coef[r];
      const acc_t* row = rows + size_t(r) * stride + c;
#pragma omp simd
      for (int t = 0; t < K; ++t) acc[t] += a * row[t];
    }
    for (int t = 0; t < K; ++t) out[c + t] = acc[t];
  }
  if (c < width) {
    acc_t acc[K] = {};
    const int rest = width - c;
    for (int r = 0; r < nrows; ++r) {
      const acc_t a = coef[r];
      const acc_t* row = rows + size_t(r) * stride + c;
      for (int t = 0; t < rest; ++t) acc[t] += a * row[t];
    }
    for (int t = 0; t < rest; ++t) out[c + t] = acc[t];
  }
}
constexpr int kLanes = 32;  // accumulators per combine_rows pass (4 AVX2 registers of floats)

// R outputs at once: out[r][0, width) = sum_k coef[r][k] * rows[k * stride + (0, width)]. Each
// loaded row segment feeds R multiply-adds (R x K accumulators in registers), which is what makes
// the small per-window matrix products compute-bound rather than load-bound.
template <int R, int K, typename acc_t>
EV_INLINE void combine_rows_multi(acc_t* const* out, const acc_t* const* coef,
                                  const acc_t* __restrict rows, int nrows, int stride, int width) {
  for (int c = 0; c < width; c += K) {
    const int lanes = width - c < K ? width - c : K;
    acc_t acc[R][K] = {};
    if (lanes == K) {
      for (int k = 0; k < nrows; ++k) {
        const acc_t* row = rows + size_t(k) * stride + c;
        for (int r = 0; r < R; ++r) {
          const acc_t a = coef[r][k];
#pragma omp simd
          for (int t = 0; t < K; ++t) acc[r][t] += a * row[t];
        }
      }
    } else {
      for (int k = 0; k < nrows; ++k) {
        const acc_t* row = rows + size_t(k) * stride + c;
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < lanes; ++t) acc[r][t] += coef[r][k] * row[t];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < lanes; ++t) out[r][c + t] = acc[r][t];
  }
}
constexpr int kRows = 4;    // query rows per combine_rows_multi call
constexpr int kRowLanes = 16;

template <typename acc_t>
struct Inputs {
  const acc_t* table = nullptr;    // (heads, T): the bias table transposed, one row per head
  const acc_t* dense = nullptr;    // (heads, N, N): the table gathered once per call, or nullptr
  const int64_t* index = nullptr;  // (N, N)
  const acc_t* pad = nullptr;      // (3C) value of padded tokens, nullptr for zeros
};

// One task's window, gathered into thread-local buffers.
template <typename acc_t>
struct Window {
  int N, Np, d;
  std::vector<acc_t> q, k, kt, v, vt;  // q: (N, d) pre-scaled; kt, vt: (d, Np) transposed
  std::vector<acc_t> key_weight;       // 1, or 0 for a masked padded key
  std::vector<int64_t> offset;         // token offset into the map (without channel), -1: padded
  std::vector<acc_t> region;          // shift-mask region of each slot (small integers)
  std::vector<acc_t> logits;           // one query row (Np)

  Window(int N_, int d_) : N(N_), Np((N_ + 15) / 16 * 16), d(d_) {
    q.resize(size_t(N) * d);
    k.resize(size_t(N) * d);
    v.resize(size_t(N) * d);
    kt.assign(size_t(d) * Np, acc_t(0));
    vt.assign(size_t(d) * Np, acc_t(0));
    key_weight.resize(N);
    offset.resize(N);
    region.resize(N);
    logits.resize(Np);
  }

  // Gathers q, k, v of (b, window, head); `with_vt` also fills the transposed values.
  template <typename scalar_t>
  EV_INLINE void load(const scalar_t* qkv, const Params<acc_t>& p, const Inputs<acc_t>& in, int b, int win,
            int h, bool with_vt) {
    const int64_t ch = int64_t(h) * d;
    for (int s = 0; s < N; ++s) {
      const Slot slot = slot_source(p.g, win, s);
      region[s] = acc_t(slot.region);
      acc_t* qs = &q[size_t(s) * d];
      acc_t* ks = &k[size_t(s) * d];
      acc_t* vs = &v[size_t(s) * d];
      if (slot.row >= 0) {
        offset[s] = b * p.sB + slot.row * p.sH + slot.col * p.sW;
        const scalar_t* src = qkv + offset[s] + ch;
        const acc_t scale = p.scale;
#pragma omp simd
        for (int c = 0; c < d; ++c) qs[c] = static_cast<acc_t>(src[c]) * scale;
#pragma omp simd
        for (int c = 0; c < d; ++c) ks[c] = static_cast<acc_t>(src[p.C + c]);
#pragma omp simd
        for (int c = 0; c < d; ++c) vs[c] = static_cast<acc_t>(src[2 * p.C + c]);
        key_weight[s] = 1;
      } else {
        offset[s] = -1;
        const acc_t* pad = in.pad;
        for (int c = 0; c < d; ++c) {
          qs[c] = pad ? pad[ch + c] * p.scale : acc_t(0);
          ks[c] = pad ? pad[p.C + ch + c] : acc_t(0);
          vs[c] = pad ? pad[2 * p.C + ch + c] : acc_t(0);
        }
        key_weight[s] = p.mask_padded_keys ? 0 : 1;
      }
      for (int c = 0; c < d; ++c) {
        kt[size_t(c) * Np + s] = ks[c];
        if (with_vt) vt[size_t(c) * Np + s] = vs[c];
      }
    }
  }

  // logits[j] = q_i . k_j + bias + shift mask (see add_bias_and_masks).
  EV_INLINE void compute_logits(int i, int h, const Params<acc_t>& p, const Inputs<acc_t>& in) {
    combine_rows<kLanes>(logits.data(), &q[size_t(i) * d], kt.data(), d, Np, Np);
    add_bias_and_masks(logits.data(), i, h, p, in);
  }

  // s[j] (q_i . k_j) += bias + shift mask; masked keys get a large negative logit.
  EV_INLINE void add_bias_and_masks(acc_t* s, int i, int h, const Params<acc_t>& p,
                                    const Inputs<acc_t>& in) {
    if (in.dense) {
      const acc_t* bias = in.dense + (int64_t(h) * N + i) * N;
#pragma omp simd
      for (int j = 0; j < N; ++j) s[j] += bias[j];
    } else if (in.table) {
      const acc_t* table = in.table + int64_t(h) * p.T;
      const int64_t* index = in.index + int64_t(i) * N;
      for (int j = 0; j < N; ++j) s[j] += table[index[j]];
    }
    if (p.g.shifted) {
      const acc_t ri = region[i], fill = p.shift_mask_value;
      const acc_t* r = region.data();
#pragma omp simd
      for (int j = 0; j < N; ++j) s[j] += r[j] != ri ? fill : acc_t(0);
    }
    if (p.mask_padded_keys) {
      // exponentiate zeroes masked keys through key_weight; their logit only has to stay below
      // the real maximum and finite (fast_exp of -inf is NaN, and NaN * 0 is NaN)
      for (int j = 0; j < N; ++j)
        if (key_weight[j] == 0) s[j] = acc_t(-1e8);
    }
  }

  // logits -> probabilities exp(s - shift) (masked keys exactly 0); returns their sum.
  EV_INLINE acc_t exponentiate(acc_t shift) { return exponentiate(logits.data(), shift); }
  EV_INLINE acc_t exponentiate(acc_t* s, acc_t shift) {
    const acc_t* kw = key_weight.data();
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < N; ++j) {
      s[j] = fast_exp(s[j] - shift) * kw[j];
      sum += s[j];
    }
    return sum;
  }
};

template <typename acc_t>
void split_task(const Params<acc_t>& p, int64_t task, int& b, int& win, int& h) {
  h = int(task % p.heads);
  win = int((task / p.heads) % p.g.num_windows);
  b = int(task / (int64_t(p.heads) * p.g.num_windows));
}

template <typename scalar_t, typename acc_t>
__attribute__((target_clones("arch=x86-64-v3", "default"))) void forward_tasks(
    const scalar_t* qkv, scalar_t* out, acc_t* lse, const Params<acc_t>& p,
    const Inputs<acc_t>& in, int64_t begin, int64_t end) {
  static_assert(kRows == 4, "prow below lists kRows rows");
  Window<acc_t> w(p.g.N, p.d);
  std::vector<acc_t> logits(size_t(kRows) * w.Np, acc_t(0)), o(size_t(kRows) * p.d);
  int rows[kRows];
  acc_t sums[kRows];
  acc_t* srow[kRows];
  acc_t* orow[kRows];
  const acc_t* qrow[kRows];
  for (int64_t task = begin; task < end; ++task) {
    int b, win, h;
    split_task(p, task, b, win, h);
    w.load(qkv, p, in, b, win, h, false);
    // queries in groups of kRows real ones (padded queries are cropped away)
    for (int i0 = 0; i0 < w.N;) {
      int count = 0;
      for (; i0 < w.N && count < kRows; ++i0) {
        if (w.offset[i0] < 0) {
          lse[p.lse_index(task, i0)] = 0;
        } else {
          rows[count++] = i0;
        }
      }
      if (count == 0) continue;
      for (int r = 0; r < kRows; ++r) {  // unused slots of a short group repeat its first row
        qrow[r] = &w.q[size_t(rows[r < count ? r : 0]) * p.d];
        srow[r] = &logits[size_t(r) * w.Np];
        orow[r] = &o[size_t(r) * p.d];
      }
      combine_rows_multi<kRows, kRowLanes>(srow, qrow, w.kt.data(), p.d, w.Np, w.Np);
      for (int r = 0; r < count; ++r) {
        w.add_bias_and_masks(srow[r], rows[r], h, p, in);
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int j = 0; j < w.N; ++j) m = std::max(m, srow[r][j]);
        sums[r] = w.exponentiate(srow[r], m);
        lse[p.lse_index(task, rows[r])] = m + std::log(sums[r]);
      }
      const acc_t* prow[kRows] = {srow[0], srow[1], srow[2], srow[3]};
      combine_rows_multi<kRows, kRowLanes>(orow, prow, w.v.data(), w.N, p.d, p.d);
      for (int r = 0; r < count; ++r) {
        const Slot slot = slot_source(p.g, win, rows[r]);  // the output is contiguous (B, H, W, C)
        const int64_t token = (int64_t(b) * p.g.H + slot.row) * p.g.W + slot.col;
        scalar_t* dst = out + token * p.C + int64_t(h) * p.d;
        const acc_t inv = acc_t(1) / sums[r];
        for (int c = 0; c < p.d; ++c) dst[c] = static_cast<scalar_t>(orow[r][c] * inv);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__attribute__((target_clones("arch=x86-64-v3", "default"))) void backward_tasks(
    const scalar_t* grad_out, const scalar_t* qkv, const scalar_t* out, const acc_t* lse,
    scalar_t* grad_qkv, acc_t* grad_table, acc_t* grad_pad, const Params<acc_t>& p,
    const Inputs<acc_t>& in, int64_t begin, int64_t end) {
  const int d = p.d;
  Window<acc_t> w(p.g.N, d);
  const int N = w.N, Np = w.Np;
  // kRows query rows at a time: every pass over K, V, dK and dV serves all of them
  std::vector<acc_t> dk(size_t(N) * d), dv(size_t(N) * d);
  std::vector<acc_t> prob(size_t(kRows) * Np), ds(size_t(kRows) * Np);
  std::vector<acc_t> go(size_t(kRows) * d), dq(size_t(kRows) * d);
  int rows[kRows];
  int64_t tokens[kRows];
  acc_t* prow[kRows];
  acc_t* dsrow[kRows];
  acc_t* gorow[kRows];
  acc_t* dqrow[kRows];
  const acc_t* qrow[kRows];
  for (int r = 0; r < kRows; ++r) {
    prow[r] = &prob[size_t(r) * Np];
    dsrow[r] = &ds[size_t(r) * Np];
    gorow[r] = &go[size_t(r) * d];
    dqrow[r] = &dq[size_t(r) * d];
  }
  for (int64_t task = begin; task < end; ++task) {
    int b, win, h;
    split_task(p, task, b, win, h);
    w.load(qkv, p, in, b, win, h, true);
    std::fill(dk.begin(), dk.end(), acc_t(0));
    std::fill(dv.begin(), dv.end(), acc_t(0));
    const int64_t ch = int64_t(h) * d;
    for (int i0 = 0; i0 < N;) {
      int count = 0;
      for (; i0 < N && count < kRows; ++i0) {
        if (w.offset[i0] >= 0) rows[count++] = i0;  // padded queries have no gradient
      }
      if (count == 0) continue;
      acc_t delta[kRows];  // sum_j P_ij dP_ij = dO_i . O_i
      for (int r = 0; r < kRows; ++r) {
        qrow[r] = &w.q[size_t(rows[r < count ? r : 0]) * d];
        delta[r] = 0;
        if (r >= count) {  // the rows a short group lacks contribute zeros
          std::fill(gorow[r], gorow[r] + d, acc_t(0));
          continue;
        }
        const Slot slot = slot_source(p.g, win, rows[r]);
        tokens[r] = (int64_t(b) * p.g.H + slot.row) * p.g.W + slot.col;
        const scalar_t* goi = grad_out + tokens[r] * p.C + ch;
        const scalar_t* oi = out + tokens[r] * p.C + ch;
        for (int c = 0; c < d; ++c) {
          gorow[r][c] = static_cast<acc_t>(goi[c]);
          delta[r] += gorow[r][c] * static_cast<acc_t>(oi[c]);
        }
      }
      combine_rows_multi<kRows, kRowLanes>(prow, qrow, w.kt.data(), d, Np, Np);  // logits
      const acc_t* gorow_c[kRows] = {gorow[0], gorow[1], gorow[2], gorow[3]};
      combine_rows_multi<kRows, kRowLanes>(dsrow, gorow_c, w.vt.data(), d, Np, Np);  // dP
      for (int r = 0; r < kRows; ++r) {
        if (r >= count) {
          std::fill(prow[r], prow[r] + Np, acc_t(0));
          std::fill(dsrow[r], dsrow[r] + Np, acc_t(0));
          continue;
        }
        w.add_bias_and_masks(prow[r], rows[r], h, p, in);
        w.exponentiate(prow[r], lse[p.lse_index(task, rows[r])]);  // P_i
        acc_t* dsr = dsrow[r];
        const acc_t* pr = prow[r];
        const acc_t dr = delta[r];
#pragma omp simd
        for (int j = 0; j < N; ++j) dsr[j] = pr[j] * (dsr[j] - dr);
      }
      const acc_t* dsrow_c[kRows] = {dsrow[0], dsrow[1], dsrow[2], dsrow[3]};
      combine_rows_multi<kRows, kRowLanes>(dqrow, dsrow_c, w.k.data(), N, d, d);
      for (int j = 0; j < N; ++j) {
        acc_t* dkj = &dk[size_t(j) * d];
        acc_t* dvj = &dv[size_t(j) * d];
        const acc_t s0 = dsrow[0][j], s1 = dsrow[1][j], s2 = dsrow[2][j], s3 = dsrow[3][j];
        const acc_t p0 = prow[0][j], p1 = prow[1][j], p2 = prow[2][j], p3 = prow[3][j];
        const acc_t *q0 = qrow[0], *q1 = qrow[1], *q2 = qrow[2], *q3 = qrow[3];
        const acc_t *g0 = gorow[0], *g1 = gorow[1], *g2 = gorow[2], *g3 = gorow[3];
#pragma omp simd
        for (int c = 0; c < d; ++c) {
          dkj[c] += s0 * q0[c] + s1 * q1[c] + s2 * q2[c] + s3 * q3[c];
          dvj[c] += p0 * g0[c] + p1 * g1[c] + p2 * g2[c] + p3 * g3[c];
        }
      }
      for (int r = 0; r < count; ++r) {
        scalar_t* gq = grad_qkv + tokens[r] * 3 * p.C + ch;
        for (int c = 0; c < d; ++c) gq[c] = static_cast<scalar_t>(dqrow[r][c] * p.scale);
        if (grad_table) {
          acc_t* table = grad_table + int64_t(h) * p.T;
          const int64_t* index = in.index + int64_t(rows[r]) * N;
          for (int j = 0; j < N; ++j) table[index[j]] += dsrow[r][j];
        }
      }
    }
    for (int j = 0; j < N; ++j) {
      const acc_t* dkj = &dk[size_t(j) * d];
      const acc_t* dvj = &dv[size_t(j) * d];
      if (w.offset[j] >= 0) {
        const Slot slot = slot_source(p.g, win, j);
        const int64_t token = (int64_t(b) * p.g.H + slot.row) * p.g.W + slot.col;
        scalar_t* g = grad_qkv + token * 3 * p.C + ch;
        for (int c = 0; c < d; ++c) {
          g[p.C + c] = static_cast<scalar_t>(dkj[c]);
          g[2 * p.C + c] = static_cast<scalar_t>(dvj[c]);
        }
      } else if (grad_pad && !p.mask_padded_keys) {
        for (int c = 0; c < d; ++c) {
          grad_pad[p.C + ch + c] += dkj[c];
          grad_pad[2 * p.C + ch + c] += dvj[c];
        }
      }
    }
  }
}

template <typename acc_t>
Params<acc_t> make_params(const at::Tensor& qkv, int64_t num_heads, const std::vector<int64_t>& window,
                          const std::vector<int64_t>& shift, double scale,
                          const c10::optional<at::Tensor>& bias_table, bool center_pad,
                          bool mask_padded_keys, double shift_mask_value) {
  TORCH_CHECK(qkv.dim() == 4, "window_attention: qkv must be (B, H, W, 3C), got ", qkv.sizes());
  TORCH_CHECK(qkv.stride(3) == 1, "window_attention: qkv's channels must be contiguous");
  TORCH_CHECK(window.size() == 2 && shift.size() == 2, "window and shift are (rows, cols)");
  TORCH_CHECK(qkv.size(3) % (3 * num_heads) == 0, "qkv channels ", qkv.size(3),
              " are not 3 x heads x head_dim with heads = ", num_heads);
  TORCH_CHECK(qkv.numel() < (int64_t(1) << 31) * 4, "window_attention: input too large");
  Params<acc_t> p;
  p.g = make_geometry(int(qkv.size(1)), int(qkv.size(2)), int(window[0]), int(window[1]),
                      int(shift[0]), int(shift[1]), center_pad);
  TORCH_CHECK(shift[0] < p.g.wh && shift[1] < p.g.ww && shift[0] >= 0 && shift[1] >= 0,
              "window_attention: need 0 <= shift < window");
  p.B = int(qkv.size(0));
  p.heads = int(num_heads);
  p.C = int(qkv.size(3) / 3);
  p.d = p.C / p.heads;
  p.sB = qkv.stride(0);
  p.sH = qkv.stride(1);
  p.sW = qkv.stride(2);
  p.scale = acc_t(scale);
  p.shift_mask_value = acc_t(shift_mask_value);
  p.mask_padded_keys = mask_padded_keys;
  p.T = bias_table ? int(bias_table->size(0)) : 0;
  return p;
}

void check_optional(const c10::optional<at::Tensor>& bias_table,
                    const c10::optional<at::Tensor>& bias_index,
                    const c10::optional<at::Tensor>& pad_value, const at::Tensor& qkv, int heads,
                    int N) {
  TORCH_CHECK(bias_table.has_value() == bias_index.has_value(),
              "window_attention: bias_table and bias_index go together");
  if (bias_table) {
    TORCH_CHECK(bias_table->dim() == 2 && bias_table->size(1) == heads,
                "window_attention: bias_table must be (T, heads), got ", bias_table->sizes());
    TORCH_CHECK(bias_index->scalar_type() == at::kLong && bias_index->numel() == int64_t(N) * N,
                "window_attention: bias_index must be int64 (N, N) with N = ", N);
    TORCH_CHECK(bias_table->device() == qkv.device() && bias_index->device() == qkv.device(),
                "window_attention: bias tensors must be on qkv's device");
  }
  if (pad_value) {
    TORCH_CHECK(pad_value->numel() == qkv.size(3) && pad_value->device() == qkv.device(),
                "window_attention: pad_value must be (3C,) on qkv's device");
  }
}

template <typename acc_t>
Inputs<acc_t> cpu_inputs(const c10::optional<at::Tensor>& bias_table,
                         const c10::optional<at::Tensor>& bias_index,
                         const c10::optional<at::Tensor>& pad_value, at::ScalarType acc,
                         std::vector<at::Tensor>& keep) {
  Inputs<acc_t> in;
  if (bias_table) {
    keep.push_back(bias_table->to(acc).t().contiguous());
    keep.push_back(bias_index->contiguous());
    in.table = keep[keep.size() - 2].data_ptr<acc_t>();
    in.index = keep.back().data_ptr<int64_t>();
    // every window reads the same (heads, N, N) bias: gather it once, unless it is large
    const int64_t N = bias_index->size(0);
    if (N * N * bias_table->size(1) <= (int64_t(1) << 22)) {
      keep.push_back(keep[keep.size() - 2].index_select(1, keep.back().view(-1)).contiguous());
      in.dense = keep.back().data_ptr<acc_t>();
    }
  }
  if (pad_value) {
    keep.push_back(pad_value->to(acc).contiguous());
    in.pad = keep.back().data_ptr<acc_t>();
  }
  return in;
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& qkv, int64_t num_heads,
                                const std::vector<int64_t>& window,
                                const std::vector<int64_t>& shift, double scale,
                                const c10::optional<at::Tensor>& bias_table,
                                const c10::optional<at::Tensor>& bias_index,
                                const c10::optional<at::Tensor>& pad_value, bool center_pad,
                                bool mask_padded_keys, double shift_mask_value) {
  if (qkv.is_cuda()) {
#if defined(EFFVISION_WITH_CUDA)
    auto p = make_params<float>(qkv, num_heads, window, shift, scale, bias_table, center_pad,
                                mask_padded_keys, shift_mask_value);
    check_optional(bias_table, bias_index, pad_value, qkv, p.heads, p.g.N);
    return forward_cuda(qkv, p, bias_table, bias_index, pad_value);
#else
    TORCH_CHECK(false, "effvision was built without CUDA kernels");
#endif
  }
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "window_attention", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    auto p = make_params<acc_t>(qkv, num_heads, window, shift, scale, bias_table, center_pad,
                                mask_padded_keys, shift_mask_value);
    check_optional(bias_table, bias_index, pad_value, qkv, p.heads, p.g.N);
    std::vector<at::Tensor> keep;
    const auto in = cpu_inputs<acc_t>(bias_table, bias_index, pad_value, acc, keep);
    auto out = at::empty({p.B, p.g.H, p.g.W, p.C}, qkv.options());
    auto lse = at::empty({p.B, int64_t(p.g.num_windows) * p.heads * p.g.N}, qkv.options().dtype(acc));
    const scalar_t* src = qkv.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, p.num_tasks(), 1, [&](int64_t begin, int64_t end) {
      forward_tasks<scalar_t, acc_t>(src, dst, lse_ptr, p, in, begin, end);
    });
    result = {out, lse};
  });
  return result;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                 const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
                                 const std::vector<int64_t>& window,
                                 const std::vector<int64_t>& shift, double scale,
                                 const c10::optional<at::Tensor>& bias_table,
                                 const c10::optional<at::Tensor>& bias_index,
                                 const c10::optional<at::Tensor>& pad_value, bool center_pad,
                                 bool mask_padded_keys, double shift_mask_value,
                                 bool need_bias_grad, bool need_pad_grad) {
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "window_attention backward: grad_out, out and lse must be contiguous");
  need_bias_grad = need_bias_grad && bias_table.has_value();
  need_pad_grad = need_pad_grad && pad_value.has_value();
  if (qkv.is_cuda()) {
#if defined(EFFVISION_WITH_CUDA)
    auto p = make_params<float>(qkv, num_heads, window, shift, scale, bias_table, center_pad,
                                mask_padded_keys, shift_mask_value);
    check_optional(bias_table, bias_index, pad_value, qkv, p.heads, p.g.N);
    return backward_cuda(grad_out, qkv, out, lse, p, bias_table, bias_index, pad_value,
                         need_bias_grad, need_pad_grad);
#else
    TORCH_CHECK(false, "effvision was built without CUDA kernels");
#endif
  }
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "window_attention_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    auto p = make_params<acc_t>(qkv, num_heads, window, shift, scale, bias_table, center_pad,
                                mask_padded_keys, shift_mask_value);
    check_optional(bias_table, bias_index, pad_value, qkv, p.heads, p.g.N);
    std::vector<at::Tensor> keep;
    const auto in = cpu_inputs<acc_t>(bias_table, bias_index, pad_value, acc, keep);
    auto grad_qkv = at::empty({p.B, p.g.H, p.g.W, 3 * p.C}, qkv.options());
    // per-thread accumulators of the bias table's and the padding value's gradients
    const int threads = at::get_num_threads();
    auto table_acc = at::zeros({need_bias_grad ? threads : 0, p.heads, p.T}, qkv.options().dtype(acc));
    auto pad_acc = at::zeros({need_pad_grad ? threads : 0, 3 * p.C}, qkv.options().dtype(acc));
    at::parallel_for(0, p.num_tasks(), 1, [&](int64_t begin, int64_t end) {
      const int t = at::get_thread_num();
      backward_tasks<scalar_t, acc_t>(
          grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), grad_qkv.data_ptr<scalar_t>(),
          need_bias_grad ? table_acc[t].data_ptr<acc_t>() : nullptr,
          need_pad_grad ? pad_acc[t].data_ptr<acc_t>() : nullptr, p, in, begin, end);
    });
    auto grad_table = need_bias_grad ? table_acc.sum(0).t().to(bias_table->scalar_type())
                                     : at::empty({0}, qkv.options());
    auto grad_pad = need_pad_grad ? pad_acc.sum(0).to(pad_value->scalar_type())
                                  : at::empty({0}, qkv.options());
    result = {grad_qkv, grad_table.contiguous(), grad_pad};
  });
  return result;
}

}  // namespace window_attention
}  // namespace effvision

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effvision window attention kernels (CPU, and CUDA when WITH_CUDA)";
  m.def("forward", &effvision::window_attention::forward, "window attention forward");
  m.def("backward", &effvision::window_attention::backward, "window attention backward");
#if defined(EFFVISION_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
