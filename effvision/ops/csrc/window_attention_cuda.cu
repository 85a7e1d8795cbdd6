// Window attention: CUDA kernels.
//
// One thread block per (image, window, head). Threads own query rows (forward, dQ) or key rows
// (dK, dV); the other side streams through shared memory in tiles, so any window size runs (CSWin
// stripes and global attention included) with an online softmax and nothing of size N x N is
// stored. Slots are mapped to tokens of the (B, H, W, 3C) map with window_attention.h, shared
// with the CPU kernels. Accumulation is in float (double for double inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <vector>

#include "window_attention.h"

namespace effvision {
namespace window_attention {
namespace {

constexpr int kThreads = 128;
constexpr int kTableInShared = 4096;  // bias table rows kept in shared memory (per head)

template <typename acc_t>
__device__ __forceinline__ acc_t exp_acc(acc_t x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float exp_acc<float>(float x) {
  return __expf(x);
}

template <typename acc_t>
struct DeviceInputs {
  const acc_t* table;      // (heads, T) or nullptr
  const int64_t* index;    // (N, N)
  const acc_t* pad;        // (3C) or nullptr (zeros)
};

struct TaskId {
  int b, win, h;
  int64_t task;
};

template <typename acc_t>
__device__ __forceinline__ TaskId task_id(const Params<acc_t>& p) {
  TaskId t;
  t.task = blockIdx.x;
  t.h = int(t.task % p.heads);
  t.win = int((t.task / p.heads) % p.g.num_windows);
  t.b = int(t.task / (int64_t(p.heads) * p.g.num_windows));
  return t;
}

// Token offset (without channels) of a slot in a map with the given strides; -1 if padded.
template <typename acc_t>
__device__ __forceinline__ int64_t slot_offset(const Params<acc_t>& p, const Slot& s, int b,
                                               int64_t sB, int64_t sH, int64_t sW) {
  return s.row < 0 ? -1 : b * sB + s.row * sH + s.col * sW;
}

// Loads `d` channels of part (0 q, 1 k, 2 v) of a slot; padded slots take the padding value.
template <typename scalar_t, typename acc_t, int D>
__device__ __forceinline__ void load_row(acc_t* dst, const scalar_t* qkv, int64_t offset,
                                         const Params<acc_t>& p, const DeviceInputs<acc_t>& in,
                                         int part, int h, acc_t mul) {
  const int64_t ch = int64_t(part) * p.C + int64_t(h) * p.d;
#pragma unroll
  for (int c = 0; c < D; ++c) {
    acc_t value = 0;
    if (c < p.d) {
      if (offset >= 0) {
        value = static_cast<acc_t>(qkv[offset + ch + c]);
      } else if (in.pad != nullptr) {
        value = in.pad[ch + c];
      }
    }
    dst[c] = value * mul;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t logit_extra(const Params<acc_t>& p,
                                             const DeviceInputs<acc_t>& in,
                                             const acc_t* table, int i, int j, int region_i,
                                             int region_j) {
  acc_t extra = 0;
  if (table != nullptr) extra += table[in.index[int64_t(i) * p.g.N + j]];
  if (p.g.shifted && region_i != region_j) extra += p.shift_mask_value;
  return extra;
}

// Shared memory: a key/value (or query/grad) tile, per-slot data, the head's bias table and,
// in the backward pass, the accumulator of its gradient.
template <typename acc_t, int D>
struct Shared {
  static constexpr int kTile = 2048 / D;
  int64_t* offset;    // (kTile)
  acc_t* a;           // (kTile, D)
  acc_t* b;           // (kTile, D)
  acc_t* c;           // (kTile) per-slot value (forward: key weight; backward: lse)
  acc_t* e;           // (kTile) second per-slot value (backward: delta)
  int* region;        // (kTile)
  const acc_t* table; // this head's (T) bias row: shared memory when it fits, else global
  acc_t* table_grad;  // (T) block-local gradient of it, or nullptr

  __host__ __device__ static bool table_shared(int T) { return T > 0 && T <= kTableInShared; }
  static size_t host_bytes(int T, bool with_grad) {
    size_t n = sizeof(int64_t) * kTile + sizeof(acc_t) * (2 * kTile * D + 2 * kTile) +
               sizeof(int) * kTile;
    if (table_shared(T)) n += sizeof(acc_t) * T * (with_grad ? 2 : 1);
    return n;
  }
  // Carves the dynamic shared memory and loads the head's bias table (block-wide).
  __device__ Shared(char* base, const Params<acc_t>& p, const acc_t* global_table, int h,
                    bool with_grad) {
    offset = reinterpret_cast<int64_t*>(base);
    a = reinterpret_cast<acc_t*>(offset + kTile);
    b = a + kTile * D;
    c = b + kTile * D;
    e = c + kTile;
    region = reinterpret_cast<int*>(e + kTile);
    acc_t* rest = reinterpret_cast<acc_t*>(region + kTile);
    table = nullptr;
    table_grad = nullptr;
    if (global_table == nullptr) return;
    const acc_t* row = global_table + int64_t(h) * p.T;
    if (!(p.T <= kTableInShared)) {
      table = row;
      return;
    }
    for (int t = threadIdx.x; t < p.T; t += blockDim.x) rest[t] = row[t];
    table = rest;
    if (with_grad) {
      table_grad = rest + p.T;
      for (int t = threadIdx.x; t < p.T; t += blockDim.x) table_grad[t] = 0;
    }
    __syncthreads();
  }
};

// Block-wide: keys and values of slots [j0, j0 + tile) of the task's window into shared memory
// (a: keys, b: values, c: key weight 0 for masked padded keys, region, offset). Returns tile.
template <typename scalar_t, typename acc_t, int D>
__device__ __forceinline__ int load_key_tile(Shared<acc_t, D>& sm, const scalar_t* qkv,
                                             const Params<acc_t>& p,
                                             const DeviceInputs<acc_t>& in, const TaskId& t,
                                             int j0) {
  __syncthreads();  // the previous tile is no longer read
  const int tile = min(Shared<acc_t, D>::kTile, p.g.N - j0);
  for (int j = threadIdx.x; j < tile; j += blockDim.x) {
    const Slot ks = slot_source(p.g, t.win, j0 + j);
    sm.offset[j] = slot_offset(p, ks, t.b, p.sB, p.sH, p.sW);
    sm.region[j] = ks.region;
    sm.c[j] = (ks.row < 0 && p.mask_padded_keys) ? acc_t(0) : acc_t(1);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < tile; j += blockDim.x) {
    load_row<scalar_t, acc_t, D>(sm.a + j * D, qkv, sm.offset[j], p, in, 1, t.h, acc_t(1));
    load_row<scalar_t, acc_t, D>(sm.b + j * D, qkv, sm.offset[j], p, in, 2, t.h, acc_t(1));
  }
  __syncthreads();
  return tile;
}

template <typename scalar_t, typename acc_t, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const scalar_t* __restrict__ qkv,
                                                           scalar_t* __restrict__ out,
                                                           acc_t* __restrict__ lse,
                                                           Params<acc_t> p,
                                                           DeviceInputs<acc_t> in) {
  extern __shared__ __align__(16) char smem_raw[];
  using S = Shared<acc_t, D>;
  const TaskId t = task_id(p);
  S sm(smem_raw, p, in.table, t.h, false);
  const int N = p.g.N;
  for (int q0 = 0; q0 < N; q0 += blockDim.x) {
    const int i = q0 + threadIdx.x;
    Slot qs;
    qs.row = -1;
    qs.region = 0;
    if (i < N) qs = slot_source(p.g, t.win, i);
    const bool active = i < N && qs.row >= 0;  // padded queries are cropped away
    acc_t q[D], o[D];
    const int64_t q_offset = active ? slot_offset(p, qs, t.b, p.sB, p.sH, p.sW) : -1;
    if (active) load_row<scalar_t, acc_t, D>(q, qkv, q_offset, p, in, 0, t.h, p.scale);
#pragma unroll
    for (int c = 0; c < D; ++c) o[c] = 0;
    acc_t m = -INFINITY, l = 0;
    for (int j0 = 0; j0 < N; j0 += S::kTile) {
      const int tile = load_key_tile<scalar_t, acc_t, D>(sm, qkv, p, in, t, j0);
      if (!active) continue;
      for (int j = 0; j < tile; ++j) {
        if (sm.c[j] == acc_t(0)) continue;
        const acc_t* k = sm.a + j * D;
        acc_t s = 0;
#pragma unroll
        for (int c = 0; c < D; ++c) s += q[c] * k[c];
        s += logit_extra(p, in, sm.table, i, j0 + j, qs.region, sm.region[j]);
        const acc_t m_new = s > m ? s : m;
        const acc_t correction = exp_acc(m - m_new);
        const acc_t pj = exp_acc(s - m_new);
        l = l * correction + pj;
        const acc_t* v = sm.b + j * D;
#pragma unroll
        for (int c = 0; c < D; ++c) o[c] = o[c] * correction + pj * v[c];
        m = m_new;
      }
    }
    if (i < N) lse[p.lse_index(t.task, i)] = active ? m + log(l) : acc_t(0);
    if (active) {
      const int64_t token = (int64_t(t.b) * p.g.H + qs.row) * p.g.W + qs.col;
      scalar_t* dst = out + token * p.C + int64_t(t.h) * p.d;
      const acc_t inv = acc_t(1) / l;
#pragma unroll
      for (int c = 0; c < D; ++c)
        if (c < p.d) dst[c] = static_cast<scalar_t>(o[c] * inv);
    }
  }
}

// dQ, delta (dO . O) and the bias table's gradient: threads own query rows.
template <typename scalar_t, typename acc_t, int D>
__global__ void __launch_bounds__(kThreads) backward_query_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ qkv,
    const scalar_t* __restrict__ out, const acc_t* __restrict__ lse, acc_t* __restrict__ delta,
    scalar_t* __restrict__ grad_qkv, acc_t* __restrict__ grad_table, Params<acc_t> p,
    DeviceInputs<acc_t> in) {
  extern __shared__ __align__(16) char smem_raw[];
  using S = Shared<acc_t, D>;
  const TaskId t = task_id(p);
  const bool shared_grad = grad_table != nullptr && S::table_shared(p.T);
  S sm(smem_raw, p, in.table, t.h, shared_grad);
  const int N = p.g.N;
  const int64_t ch = int64_t(t.h) * p.d;
  for (int q0 = 0; q0 < N; q0 += blockDim.x) {
    const int i = q0 + threadIdx.x;
    Slot qs;
    qs.row = -1;
    qs.region = 0;
    if (i < N) qs = slot_source(p.g, t.win, i);
    const bool active = i < N && qs.row >= 0;
    acc_t q[D], go[D], dq[D];
    acc_t lse_i = 0, delta_i = 0;
    int64_t token = 0;
    if (active) {
      load_row<scalar_t, acc_t, D>(q, qkv, slot_offset(p, qs, t.b, p.sB, p.sH, p.sW), p, in, 0,
                                   t.h, p.scale);
      token = (int64_t(t.b) * p.g.H + qs.row) * p.g.W + qs.col;
#pragma unroll
      for (int c = 0; c < D; ++c) {
        go[c] = c < p.d ? static_cast<acc_t>(grad_out[token * p.C + ch + c]) : acc_t(0);
        const acc_t oc = c < p.d ? static_cast<acc_t>(out[token * p.C + ch + c]) : acc_t(0);
        delta_i += go[c] * oc;
        dq[c] = 0;
      }
      lse_i = lse[p.lse_index(t.task, i)];
    }
    if (i < N) delta[p.lse_index(t.task, i)] = delta_i;
    for (int j0 = 0; j0 < N; j0 += S::kTile) {
      const int tile = load_key_tile<scalar_t, acc_t, D>(sm, qkv, p, in, t, j0);
      if (!active) continue;
      for (int j = 0; j < tile; ++j) {
        if (sm.c[j] == acc_t(0)) continue;
        const acc_t* k = sm.a + j * D;
        const acc_t* v = sm.b + j * D;
        acc_t s = 0, dp = 0;
#pragma unroll
        for (int c = 0; c < D; ++c) {
          s += q[c] * k[c];
          dp += go[c] * v[c];
        }
        s += logit_extra(p, in, sm.table, i, j0 + j, qs.region, sm.region[j]);
        const acc_t ds = exp_acc(s - lse_i) * (dp - delta_i);
#pragma unroll
        for (int c = 0; c < D; ++c) dq[c] += ds * k[c];
        if (grad_table != nullptr) {
          const int64_t slot = in.index[int64_t(i) * N + j0 + j];
          atomicAdd(shared_grad ? sm.table_grad + slot : grad_table + int64_t(t.h) * p.T + slot,
                    ds);
        }
      }
    }
    if (active) {
      scalar_t* g = grad_qkv + token * 3 * p.C + ch;
#pragma unroll
      for (int c = 0; c < D; ++c)
        if (c < p.d) g[c] = static_cast<scalar_t>(dq[c] * p.scale);
    }
  }
  if (shared_grad) {
    __syncthreads();
    for (int slot = threadIdx.x; slot < p.T; slot += blockDim.x)
      atomicAdd(grad_table + int64_t(t.h) * p.T + slot, sm.table_grad[slot]);
  }
}

// dK and dV: threads own key rows, query rows stream through shared memory.
template <typename scalar_t, typename acc_t, int D>
__global__ void __launch_bounds__(kThreads) backward_key_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ qkv,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
    scalar_t* __restrict__ grad_qkv, acc_t* __restrict__ grad_pad, Params<acc_t> p,
    DeviceInputs<acc_t> in) {
  extern __shared__ __align__(16) char smem_raw[];
  using S = Shared<acc_t, D>;
  const TaskId t = task_id(p);
  S sm(smem_raw, p, in.table, t.h, false);
  const int N = p.g.N;
  const int64_t ch = int64_t(t.h) * p.d;
  for (int k0 = 0; k0 < N; k0 += blockDim.x) {
    const int j = k0 + threadIdx.x;
    Slot ks;
    ks.row = -1;
    ks.region = 0;
    if (j < N) ks = slot_source(p.g, t.win, j);
    // a key contributes unless it is a masked padded slot
    const bool active = j < N && (ks.row >= 0 || !p.mask_padded_keys);
    acc_t k[D], v[D], dk[D], dv[D];
    if (active) {
      const int64_t offset = slot_offset(p, ks, t.b, p.sB, p.sH, p.sW);
      load_row<scalar_t, acc_t, D>(k, qkv, offset, p, in, 1, t.h, acc_t(1));
      load_row<scalar_t, acc_t, D>(v, qkv, offset, p, in, 2, t.h, acc_t(1));
    }
#pragma unroll
    for (int c = 0; c < D; ++c) dk[c] = dv[c] = 0;
    for (int i0 = 0; i0 < N; i0 += S::kTile) {
      __syncthreads();
      const int tile = min(S::kTile, N - i0);
      for (int i = threadIdx.x; i < tile; i += blockDim.x) {
        const Slot qs = slot_source(p.g, t.win, i0 + i);
        sm.offset[i] = qs.row < 0 ? -1 : (int64_t(t.b) * p.g.H + qs.row) * p.g.W + qs.col;
        sm.region[i] = qs.region;
        sm.c[i] = lse[p.lse_index(t.task, i0 + i)];
        sm.e[i] = delta[p.lse_index(t.task, i0 + i)];
      }
      __syncthreads();
      for (int i = threadIdx.x; i < tile; i += blockDim.x) {
        const int64_t token = sm.offset[i];
        if (token < 0) continue;
        const Slot qs = slot_source(p.g, t.win, i0 + i);
        load_row<scalar_t, acc_t, D>(sm.a + i * D, qkv,
                                     slot_offset(p, qs, t.b, p.sB, p.sH, p.sW), p, in, 0, t.h,
                                     p.scale);
#pragma unroll
        for (int c = 0; c < D; ++c)
          sm.b[i * D + c] =
              c < p.d ? static_cast<acc_t>(grad_out[token * p.C + ch + c]) : acc_t(0);
      }
      __syncthreads();
      if (!active) continue;
      for (int i = 0; i < tile; ++i) {
        if (sm.offset[i] < 0) continue;  // padded queries: no gradient flows from them
        const acc_t* q = sm.a + i * D;
        const acc_t* go = sm.b + i * D;
        acc_t s = 0, dp = 0;
#pragma unroll
        for (int c = 0; c < D; ++c) {
          s += q[c] * k[c];
          dp += go[c] * v[c];
        }
        s += logit_extra(p, in, sm.table, i0 + i, j, sm.region[i], ks.region);
        const acc_t prob = exp_acc(s - sm.c[i]);
        const acc_t ds = prob * (dp - sm.e[i]);
#pragma unroll
        for (int c = 0; c < D; ++c) {
          dv[c] += prob * go[c];
          dk[c] += ds * q[c];
        }
      }
    }
    if (!active) continue;
    if (ks.row >= 0) {
      const int64_t token = (int64_t(t.b) * p.g.H + ks.row) * p.g.W + ks.col;
      scalar_t* g = grad_qkv + token * 3 * p.C + ch;
#pragma unroll
      for (int c = 0; c < D; ++c) {
        if (c < p.d) {
          g[p.C + c] = static_cast<scalar_t>(dk[c]);
          g[2 * p.C + c] = static_cast<scalar_t>(dv[c]);
        }
      }
    } else if (grad_pad != nullptr) {
#pragma unroll
      for (int c = 0; c < D; ++c) {
        if (c < p.d) {
          atomicAdd(grad_pad + p.C + ch + c, dk[c]);
          atomicAdd(grad_pad + 2 * p.C + ch + c, dv[c]);
        }
      }
    }
  }
}

template <typename acc_t>
Params<acc_t> cast_params(const Params<float>& f) {
  Params<acc_t> p;
  p.g = f.g;
  p.B = f.B;
  p.heads = f.heads;
  p.d = f.d;
  p.C = f.C;
  p.sB = f.sB;
  p.sH = f.sH;
  p.sW = f.sW;
  p.scale = acc_t(f.scale);
  p.shift_mask_value = acc_t(f.shift_mask_value);
  p.mask_padded_keys = f.mask_padded_keys;
  p.T = f.T;
  return p;
}

struct Prepared {
  at::Tensor table, index, pad;
};

template <typename acc_t>
DeviceInputs<acc_t> device_inputs(const c10::optional<at::Tensor>& bias_table,
                                  const c10::optional<at::Tensor>& bias_index,
                                  const c10::optional<at::Tensor>& pad_value, at::ScalarType acc,
                                  Prepared& keep) {
  DeviceInputs<acc_t> in{nullptr, nullptr, nullptr};
  if (bias_table) {
    keep.table = bias_table->to(acc).t().contiguous();  // (heads, T)
    keep.index = bias_index->contiguous();
    in.table = keep.table.data_ptr<acc_t>();
    in.index = keep.index.data_ptr<int64_t>();
  }
  if (pad_value) {
    keep.pad = pad_value->to(acc).contiguous();
    in.pad = keep.pad.data_ptr<acc_t>();
  }
  return in;
}

// Calls `fn.template operator()<D>()` with the smallest supported D >= head_dim.
template <typename Fn>
void dispatch_head_dim(int d, Fn&& fn) {
  if (d <= 32) {
    fn.template operator()<32>();
  } else if (d <= 64) {
    fn.template operator()<64>();
  } else if (d <= 128) {
    fn.template operator()<128>();
  } else {
    TORCH_CHECK(false, "window_attention (CUDA): head_dim ", d, " > 128 is not supported");
  }
}

template <typename Kernel>
void set_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(bytes)));
  }
}

}  // namespace

std::vector<at::Tensor> forward_cuda(const at::Tensor& qkv, const Params<float>& pf,
                                     const c10::optional<at::Tensor>& bias_table,
                                     const c10::optional<at::Tensor>& bias_index,
                                     const c10::optional<at::Tensor>& pad_value) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty({pf.B, pf.g.H, pf.g.W, pf.C}, qkv.options());
  const auto acc = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lse = at::empty({pf.B, int64_t(pf.g.num_windows) * pf.heads * pf.g.N},
                       qkv.options().dtype(acc));
  if (pf.num_tasks() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                  "window_attention_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto p = cast_params<acc_t>(pf);
    Prepared keep;
    const auto in = device_inputs<acc_t>(bias_table, bias_index, pad_value, acc, keep);
    dispatch_head_dim(p.d, [&]<int D>() {
      const size_t bytes = Shared<acc_t, D>::host_bytes(p.T, false);
      auto kernel = forward_kernel<scalar_t, acc_t, D>;
      set_shared(kernel, bytes);
      kernel<<<p.num_tasks(), kThreads, bytes, stream>>>(
          qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), p, in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                      const at::Tensor& out, const at::Tensor& lse,
                                      const Params<float>& pf,
                                      const c10::optional<at::Tensor>& bias_table,
                                      const c10::optional<at::Tensor>& bias_index,
                                      const c10::optional<at::Tensor>& pad_value,
                                      bool need_bias_grad, bool need_pad_grad) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // every real token is one slot of one window per head, so d(qkv) is fully written
  auto grad_qkv = at::empty({pf.B, pf.g.H, pf.g.W, 3 * pf.C}, qkv.options());
  auto delta = at::empty_like(lse);
  auto table_acc = at::zeros({need_bias_grad ? pf.heads : 0, pf.T}, qkv.options().dtype(acc));
  auto pad_acc = at::zeros({need_pad_grad ? 3 * pf.C : 0}, qkv.options().dtype(acc));
  if (pf.num_tasks() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(),
                                    "window_attention_backward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const auto p = cast_params<acc_t>(pf);
      Prepared keep;
      const auto in = device_inputs<acc_t>(bias_table, bias_index, pad_value, acc, keep);
      dispatch_head_dim(p.d, [&]<int D>() {
        const size_t bytes = Shared<acc_t, D>::host_bytes(p.T, false);
        const size_t query_bytes = Shared<acc_t, D>::host_bytes(p.T, need_bias_grad);
        auto query_kernel = backward_query_kernel<scalar_t, acc_t, D>;
        set_shared(query_kernel, query_bytes);
        query_kernel<<<p.num_tasks(), kThreads, query_bytes, stream>>>(
            grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(), grad_qkv.data_ptr<scalar_t>(),
            need_bias_grad ? table_acc.data_ptr<acc_t>() : nullptr, p, in);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto key_kernel = backward_key_kernel<scalar_t, acc_t, D>;
        set_shared(key_kernel, bytes);
        key_kernel<<<p.num_tasks(), kThreads, bytes, stream>>>(
            grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
            delta.data_ptr<acc_t>(), grad_qkv.data_ptr<scalar_t>(),
            need_pad_grad ? pad_acc.data_ptr<acc_t>() : nullptr, p, in);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  auto grad_table = need_bias_grad ? table_acc.t().to(bias_table->scalar_type()).contiguous()
                                   : at::empty({0}, qkv.options());
  auto grad_pad = need_pad_grad ? pad_acc.to(pad_value->scalar_type())
                                : at::empty({0}, qkv.options());
  return {grad_qkv, grad_table, grad_pad};
}

}  // namespace window_attention
}  // namespace effvision
