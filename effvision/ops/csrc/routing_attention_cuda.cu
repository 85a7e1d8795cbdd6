// Bi-level routing attention: CUDA kernels (fp32 / fp16 / bf16 with fp32 math, fp64 in fp64).
//
// Same decomposition as the CPU kernels (routing_attention.cpp), with the arithmetic of
// routing_attention.h. A block has kWarps warps; each warp owns kPerWarp rows (queries in the
// forward and in pass 1 of the backward, keys in pass 2) and keeps their running state in
// registers, lane c holding channels c, c + 32, ... (head dims up to 32 * kMaxLanesPerRow).
// The other side (routed keys and values, or the queries of the routed-to regions) streams
// through shared memory in chunks of 32 rows, read in place from the maps by index: lane j scores
// row j of the chunk, and the products with the chunk are accumulated with warp shuffles.
//
// * forward: online softmax over the topk * N routed keys; writes the output and the
//   log-sum-exp of every query.
// * backward pass 1 (query rows): P from the saved log-sum-exp, dS = P (dP - delta), dQ; saves
//   delta = dO . O for pass 2.
// * backward pass 2 (key rows of one key region): visits the query regions that routed to it
//   (the inverse index built on the host side with a stable sort), accumulates dK and dV. Every
//   gradient element is written by exactly one thread: no atomics, deterministic.
#include <torch/extension.h>

// The current stream from c10 (what at::cuda::getCurrentCUDAStream() returns): ATen/cuda/
// CUDAContext.h includes the cuSPARSE/cuBLAS headers, which a bare CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "routing_attention.h"

namespace effvision {
namespace routing_attention {

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPerWarp = 4;                      // rows per warp
constexpr int kBlockRows = kWarps * kPerWarp;    // rows per block
constexpr int kChunk = 32;                       // streamed rows per step, one per lane
constexpr int kMaxLanesPerRow = 4;               // head dims up to 128

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return __logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t* a, const acc_t* b, int n) {
  acc_t s = 0;
  for (int c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

struct Task {
  int b, r, h;
};

__device__ __forceinline__ Task split_task(const Params<float>& p, int64_t task) {
  Task t;
  t.h = int(task % p.heads);
  t.r = int((task / p.heads) % p.g.R);
  t.b = int(task / (int64_t(p.heads) * p.g.R));
  return t;
}

// Map offsets (channel 0 of head h) of routed key slots [j0, j0 + n) of query region (b, r).
__device__ __forceinline__ void routed_offsets(const Params<float>& p, const int64_t* routed,
                                               int b, int h, int j0, int n, int64_t* koff,
                                               int64_t* voff) {
  const int j = threadIdx.x;
  if (j < n) {
    const int slot = j0 + j;
    const int64_t region = routed[slot / p.g.N];
    CUDA_KERNEL_ASSERT(region >= 0 && region < p.g.R);
    const int pos = slot % p.g.N;
    koff[j] = p.offset(p.k, b, int(region), pos) + int64_t(h) * p.dqk;
    voff[j] = p.offset(p.v, b, int(region), pos) + int64_t(h) * p.dv;
  }
}

// rows x width elements from `src + offsets[row]` into shared `dst` (row stride `stride`).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_rows(acc_t* dst, int stride, const scalar_t* src,
                                          const int64_t* offsets, int rows, int width,
                                          acc_t mul = acc_t(1)) {
  for (int e = threadIdx.x; e < rows * width; e += kThreads) {
    const int row = e / width, c = e - row * width;
    dst[row * stride + c] = static_cast<acc_t>(src[offsets[row] + c]) * mul;
  }
}

struct Smem {
  // byte layout: int64 offsets first (alignment), then acc_t arrays
  static size_t forward(int dqk, int dv, size_t acc) {
    return 2 * kChunk * sizeof(int64_t) +
           acc * (size_t(kBlockRows) * (dqk + 1) + size_t(kChunk) * (dqk + 1 + dv + 1));
  }
  static size_t backward(int dqk, int dv, size_t acc) {
    return 2 * kChunk * sizeof(int64_t) +
           acc * (size_t(kBlockRows + kChunk) * (dqk + 1 + dv + 1) + 2 * kChunk);
  }
};

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int D>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, const int64_t* __restrict__ index,
                   scalar_t* __restrict__ out, acc_t* __restrict__ lse, const Params<float> p,
                   const acc_t scale, const int query_blocks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* koff = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* voff = koff + kChunk;
  const int dqk = p.dqk, dv = p.dv, sq = dqk + 1, sv = dv + 1;
  acc_t* qs = reinterpret_cast<acc_t*>(voff + kChunk);  // kBlockRows x sq, scaled
  acc_t* ks = qs + kBlockRows * sq;                       // kChunk x sq
  acc_t* vs = ks + kChunk * sq;                           // kChunk x sv

  const int64_t block = blockIdx.x;
  const int i0 = int(block % query_blocks) * kBlockRows;
  const Task t = split_task(p, block / query_blocks);
  const int N = p.g.N, L = p.topk * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t* routed = index + (int64_t(t.b) * p.g.R + t.r) * p.topk;

  for (int e = threadIdx.x; e < kBlockRows * dqk; e += kThreads) {
    const int i = e / dqk, c = e - i * dqk;
    qs[i * sq + c] = i0 + i < N ? static_cast<acc_t>(q[p.offset(p.q, t.b, t.r, i0 + i) +
                                                       int64_t(t.h) * dqk + c]) * scale
                                : acc_t(0);
  }
  acc_t m[kPerWarp], l[kPerWarp], o[kPerWarp][D];
#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    m[u] = -std::numeric_limits<acc_t>::infinity();
    l[u] = 0;
#pragma unroll
    for (int dd = 0; dd < D; ++dd) o[u][dd] = 0;
  }

  for (int j0 = 0; j0 < L; j0 += kChunk) {
    const int nk = min(kChunk, L - j0);
    __syncthreads();  // the previous chunk is consumed
    routed_offsets(p, routed, t.b, t.h, j0, nk, koff, voff);
    __syncthreads();
    load_rows(ks, sq, k, koff, nk, dqk);
    load_rows(vs, sv, v, voff, nk, dv);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPerWarp; ++u) {
      const acc_t* qi = qs + (warp * kPerWarp + u) * sq;
      const acc_t s = lane < nk ? dot(qi, ks + lane * sq, dqk)
                                : -std::numeric_limits<acc_t>::infinity();
      const acc_t m_new = max(m[u], warp_max(s));
      const acc_t pj = lane < nk ? exp_acc(s - m_new) : acc_t(0);
      const acc_t correction = exp_acc(m[u] - m_new);
      l[u] = l[u] * correction + warp_sum(pj);
      m[u] = m_new;
#pragma unroll
      for (int dd = 0; dd < D; ++dd) o[u][dd] *= correction;
      for (int j = 0; j < nk; ++j) {
        const acc_t pjj = __shfl_sync(0xffffffffu, pj, j);
        const acc_t* vj = vs + j * sv;
#pragma unroll
        for (int dd = 0; dd < D; ++dd) {
          const int c = lane + 32 * dd;
          if (c < dv) o[u][dd] += pjj * vj[c];
        }
      }
    }
  }

#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    const int i = i0 + warp * kPerWarp + u;
    if (i >= N) continue;
    const acc_t inv = acc_t(1) / l[u];
    scalar_t* dst = out + p.token(t.b, t.r, i) * p.Cv + int64_t(t.h) * dv;
#pragma unroll
    for (int dd = 0; dd < D; ++dd) {
      const int c = lane + 32 * dd;
      if (c < dv) dst[c] = static_cast<scalar_t>(o[u][dd] * inv);
    }
    if (lane == 0) lse[p.stat_index(t.b, t.r, t.h, i)] = m[u] + log_acc(l[u]);
  }
}

// ---------------------------------------------------------------------------------------------
// backward pass 1: dQ (rows: queries), delta
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int D>
__global__ void __launch_bounds__(kThreads)
    backward_query_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          const int64_t* __restrict__ index, const scalar_t* __restrict__ out,
                          const acc_t* __restrict__ lse, acc_t* __restrict__ delta,
                          scalar_t* __restrict__ grad_q, const Params<float> p,
                          const acc_t scale, const int query_blocks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* koff = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* voff = koff + kChunk;
  const int dqk = p.dqk, dv = p.dv, sq = dqk + 1, sv = dv + 1;
  acc_t* qs = reinterpret_cast<acc_t*>(voff + kChunk);  // kBlockRows x sq, scaled
  acc_t* gs = qs + kBlockRows * sq;                       // kBlockRows x sv: dO
  acc_t* ks = gs + kBlockRows * sv;                       // kChunk x sq
  acc_t* vs = ks + kChunk * sq;                           // kChunk x sv

  const int64_t block = blockIdx.x;
  const int i0 = int(block % query_blocks) * kBlockRows;
  const Task t = split_task(p, block / query_blocks);
  const int N = p.g.N, L = p.topk * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t* routed = index + (int64_t(t.b) * p.g.R + t.r) * p.topk;

  for (int e = threadIdx.x; e < kBlockRows * dqk; e += kThreads) {
    const int i = e / dqk, c = e - i * dqk;
    qs[i * sq + c] = i0 + i < N ? static_cast<acc_t>(q[p.offset(p.q, t.b, t.r, i0 + i) +
                                                       int64_t(t.h) * dqk + c]) * scale
                                : acc_t(0);
  }
  for (int e = threadIdx.x; e < kBlockRows * dv; e += kThreads) {
    const int i = e / dv, c = e - i * dv;
    gs[i * sv + c] = i0 + i < N ? static_cast<acc_t>(grad_out[p.token(t.b, t.r, i0 + i) * p.Cv +
                                                              int64_t(t.h) * dv + c])
                                : acc_t(0);
  }
  __syncthreads();
  acc_t lse_i[kPerWarp], delta_i[kPerWarp], dq[kPerWarp][D];
#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    const int row = warp * kPerWarp + u, i = i0 + row;
    acc_t part = 0;
    if (i < N) {
      const scalar_t* oi = out + p.token(t.b, t.r, i) * p.Cv + int64_t(t.h) * dv;
      for (int c = lane; c < dv; c += 32) part += gs[row * sv + c] * static_cast<acc_t>(oi[c]);
    }
    delta_i[u] = warp_sum(part);
    lse_i[u] = i < N ? lse[p.stat_index(t.b, t.r, t.h, i)] : acc_t(0);
    if (i < N && lane == 0) delta[p.stat_index(t.b, t.r, t.h, i)] = delta_i[u];
#pragma unroll
    for (int dd = 0; dd < D; ++dd) dq[u][dd] = 0;
  }

  for (int j0 = 0; j0 < L; j0 += kChunk) {
    const int nk = min(kChunk, L - j0);
    __syncthreads();
    routed_offsets(p, routed, t.b, t.h, j0, nk, koff, voff);
    __syncthreads();
    load_rows(ks, sq, k, koff, nk, dqk);
    load_rows(vs, sv, v, voff, nk, dv);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPerWarp; ++u) {
      const int row = warp * kPerWarp + u;
      acc_t ds = 0;
      if (lane < nk && i0 + row < N) {
        const acc_t pj = exp_acc(dot(qs + row * sq, ks + lane * sq, dqk) - lse_i[u]);
        ds = pj * (dot(gs + row * sv, vs + lane * sv, dv) - delta_i[u]);
      }
      for (int j = 0; j < nk; ++j) {
        const acc_t dsj = __shfl_sync(0xffffffffu, ds, j);
        const acc_t* kj = ks + j * sq;
#pragma unroll
        for (int dd = 0; dd < D; ++dd) {
          const int c = lane + 32 * dd;
          if (c < dqk) dq[u][dd] += dsj * kj[c];
        }
      }
    }
  }

#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    const int i = i0 + warp * kPerWarp + u;
    if (i >= N) continue;
    scalar_t* dst = grad_q + p.token(t.b, t.r, i) * p.Cqk + int64_t(t.h) * dqk;
#pragma unroll
    for (int dd = 0; dd < D; ++dd) {
      const int c = lane + 32 * dd;
      if (c < dqk) dst[c] = static_cast<scalar_t>(dq[u][dd] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward pass 2: dK, dV (rows: keys of one key region)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int D>
__global__ void __launch_bounds__(kThreads)
    backward_key_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                        const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                        const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                        const int64_t* __restrict__ key_offsets,
                        const int64_t* __restrict__ key_entries, scalar_t* __restrict__ grad_k,
                        scalar_t* __restrict__ grad_v, const Params<float> p, const acc_t scale,
                        const int key_blocks) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* qoff = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* goff = qoff + kChunk;
  const int dqk = p.dqk, dv = p.dv, sq = dqk + 1, sv = dv + 1;
  acc_t* ks = reinterpret_cast<acc_t*>(goff + kChunk);  // kBlockRows x sq: own keys
  acc_t* vs = ks + kBlockRows * sq;                       // kBlockRows x sv: own values
  acc_t* qc = vs + kBlockRows * sv;                       // kChunk x sq: queries, scaled
  acc_t* gc = qc + kChunk * sq;                           // kChunk x sv: their dO
  acc_t* lse_c = gc + kChunk * sv;                        // kChunk
  acc_t* delta_c = lse_c + kChunk;                        // kChunk

  const int64_t block = blockIdx.x;
  const int j0 = int(block % key_blocks) * kBlockRows;
  const Task t = split_task(p, block / key_blocks);  // t.r: the key region
  const int N = p.g.N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int e = threadIdx.x; e < kBlockRows * dqk; e += kThreads) {
    const int j = e / dqk, c = e - j * dqk;
    ks[j * sq + c] = j0 + j < N ? static_cast<acc_t>(k[p.offset(p.k, t.b, t.r, j0 + j) +
                                                       int64_t(t.h) * dqk + c])
                                : acc_t(0);
  }
  for (int e = threadIdx.x; e < kBlockRows * dv; e += kThreads) {
    const int j = e / dv, c = e - j * dv;
    vs[j * sv + c] = j0 + j < N ? static_cast<acc_t>(v[p.offset(p.v, t.b, t.r, j0 + j) +
                                                       int64_t(t.h) * dv + c])
                                : acc_t(0);
  }
  acc_t dk[kPerWarp][D], dvv[kPerWarp][D];
#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
#pragma unroll
    for (int dd = 0; dd < D; ++dd) dk[u][dd] = dvv[u][dd] = 0;
  }

  const int64_t region = int64_t(t.b) * p.g.R + t.r;
  for (int64_t e = key_offsets[region]; e < key_offsets[region + 1]; ++e) {
    const int r = int(key_entries[e] % p.g.R);  // a query region of the same image
    for (int i0 = 0; i0 < N; i0 += kChunk) {
      const int nq = min(kChunk, N - i0);
      __syncthreads();  // the previous chunk is consumed (and the own rows are loaded)
      if (threadIdx.x < nq) {
        const int i = i0 + threadIdx.x;
        qoff[threadIdx.x] = p.offset(p.q, t.b, r, i) + int64_t(t.h) * dqk;
        goff[threadIdx.x] = p.token(t.b, r, i) * p.Cv + int64_t(t.h) * dv;
        lse_c[threadIdx.x] = lse[p.stat_index(t.b, r, t.h, i)];
        delta_c[threadIdx.x] = delta[p.stat_index(t.b, r, t.h, i)];
      }
      __syncthreads();
      load_rows(qc, sq, q, qoff, nq, dqk, scale);
      load_rows(gc, sv, grad_out, goff, nq, dv);
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kPerWarp; ++u) {
        const int row = warp * kPerWarp + u;
        acc_t pi = 0, ds = 0;
        if (lane < nq && j0 + row < N) {
          pi = exp_acc(dot(qc + lane * sq, ks + row * sq, dqk) - lse_c[lane]);
          ds = pi * (dot(gc + lane * sv, vs + row * sv, dv) - delta_c[lane]);
        }
        for (int i = 0; i < nq; ++i) {
          const acc_t pii = __shfl_sync(0xffffffffu, pi, i);
          const acc_t dsi = __shfl_sync(0xffffffffu, ds, i);
#pragma unroll
          for (int dd = 0; dd < D; ++dd) {
            const int c = lane + 32 * dd;
            if (c < dv) dvv[u][dd] += pii * gc[i * sv + c];
            if (c < dqk) dk[u][dd] += dsi * qc[i * sq + c];
          }
        }
      }
    }
  }

#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    const int j = j0 + warp * kPerWarp + u;
    if (j >= N) continue;
    const int64_t token = p.token(t.b, t.r, j);
    scalar_t* gk = grad_k + token * p.Cqk + int64_t(t.h) * dqk;
    scalar_t* gv = grad_v + token * p.Cv + int64_t(t.h) * dv;
#pragma unroll
    for (int dd = 0; dd < D; ++dd) {
      const int c = lane + 32 * dd;
      if (c < dqk) gk[c] = static_cast<scalar_t>(dk[u][dd]);
      if (c < dv) gv[c] = static_cast<scalar_t>(dvv[u][dd]);
    }
  }
}

// Registers per row: ceil(max(dqk, dv) / 32) lanes' worth, rounded to 1, 2 or 4.
int lanes_per_row(const Params<float>& p) {
  const int d = std::max(p.dqk, p.dv);
  TORCH_CHECK(d <= 32 * kMaxLanesPerRow, "routing_attention (CUDA): head dims up to ",
              32 * kMaxLanesPerRow, " are supported, got q/k ", p.dqk, " and v ", p.dv);
  return d <= 32 ? 1 : d <= 64 ? 2 : 4;
}

template <typename Kernel>
void prepare(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
  }
}

#define EV_DISPATCH_LANES(lanes, ...)                 \
  switch (lanes) {                                    \
    case 1: { constexpr int D = 1; __VA_ARGS__(); break; } \
    case 2: { constexpr int D = 2; __VA_ARGS__(); break; } \
    default: { constexpr int D = 4; __VA_ARGS__(); break; } \
  }

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& index, const Params<float>& p,
                                     double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({p.B, p.g.H, p.g.W, p.Cv}, q.options());
  auto lse = at::empty({p.B, p.g.R, p.heads, p.g.N}, q.options().dtype(acc));
  const int64_t tasks = int64_t(p.B) * p.g.R * p.heads;
  if (tasks == 0 || p.g.N == 0) return {out, lse};
  const int query_blocks = (p.g.N + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(tasks * query_blocks < std::numeric_limits<int>::max(),
              "routing_attention (CUDA): input too large");
  const int lanes = lanes_per_row(p);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = q.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_attention_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t smem = Smem::forward(p.dqk, p.dv, sizeof(acc_t));
    EV_DISPATCH_LANES(lanes, [&] {
      auto kernel = forward_kernel<scalar_t, acc_t, D>;
      prepare(kernel, smem);
      kernel<<<tasks * query_blocks, kThreads, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          index.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), p,
          acc_t(scale), query_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& index, const at::Tensor& out,
                                      const at::Tensor& lse, const at::Tensor& key_offsets,
                                      const at::Tensor& key_entries, const Params<float>& p,
                                      double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  auto grad_q = at::empty({p.B, p.g.H, p.g.W, p.Cqk}, q.options());
  auto grad_k = at::empty({p.B, p.g.H, p.g.W, p.Cqk}, q.options());
  auto grad_v = at::empty({p.B, p.g.H, p.g.W, p.Cv}, q.options());
  const int64_t tasks = int64_t(p.B) * p.g.R * p.heads;
  if (tasks == 0 || p.g.N == 0) return {grad_q, grad_k, grad_v};
  auto delta = at::empty_like(lse);
  const int row_blocks = (p.g.N + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(tasks * row_blocks < std::numeric_limits<int>::max(),
              "routing_attention (CUDA): input too large");
  const int lanes = lanes_per_row(p);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = q.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "routing_attn_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t smem = Smem::backward(p.dqk, p.dv, sizeof(acc_t));
    EV_DISPATCH_LANES(lanes, [&] {
      auto query_kernel = backward_query_kernel<scalar_t, acc_t, D>;
      prepare(query_kernel, smem);
      query_kernel<<<tasks * row_blocks, kThreads, smem, stream>>>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), grad_q.data_ptr<scalar_t>(), p,
          acc_t(scale), row_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto key_kernel = backward_key_kernel<scalar_t, acc_t, D>;
      prepare(key_kernel, smem);
      key_kernel<<<tasks * row_blocks, kThreads, smem, stream>>>(
          grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
          v.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
          key_offsets.data_ptr<int64_t>(), key_entries.data_ptr<int64_t>(),
          grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), p, acc_t(scale),
          row_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace routing_attention
}  // namespace effvision
