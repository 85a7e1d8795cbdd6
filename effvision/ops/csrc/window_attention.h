// Window attention: the index arithmetic shared by the CPU and CUDA kernels.
//
// A window slot (window k, position p) is mapped to the token of the (B, H, W, C) map it reads
// after padding the map to a multiple of the window (at the end, or centred) and rolling it by
// -shift; padded slots have no token. Python's effvision/ops/window_attention.py writes the same
// arithmetic with tensor ops (the reference), and the tests compare the two.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EV_HOST_DEVICE inline
#endif

namespace effvision {
namespace window_attention {

struct Geometry {
  int H, W;          // token map
  int wh, ww;        // window (a full axis is resolved to its size)
  int sh, sw;        // cyclic shift, 0 <= shift < window
  int Hp, Wp;        // padded canvas
  int top, left;     // padding before the map
  int windows_per_row;
  int num_windows;
  int N;             // tokens per window
  bool shifted;      // Swin's region mask applies
};

// A window of 0 spans the whole axis (CSWin's stripes, global attention).
inline Geometry make_geometry(int H, int W, int wh, int ww, int sh, int sw, bool center_pad) {
  Geometry g;
  g.H = H;
  g.W = W;
  g.wh = wh == 0 ? H : wh;
  g.ww = ww == 0 ? W : ww;
  g.sh = sh;
  g.sw = sw;
  g.Hp = (H + g.wh - 1) / g.wh * g.wh;
  g.Wp = (W + g.ww - 1) / g.ww * g.ww;
  g.top = center_pad ? (g.Hp - H) / 2 : 0;
  g.left = center_pad ? (g.Wp - W) / 2 : 0;
  g.windows_per_row = g.Wp / g.ww;
  g.num_windows = (g.Hp / g.wh) * g.windows_per_row;
  g.N = g.wh * g.ww;
  g.shifted = sh != 0 || sw != 0;
  return g;
}

EV_HOST_DEVICE int floor_mod(int a, int n) {
  const int r = a % n;
  return r < 0 ? r + n : r;
}

// Swin's shift-mask region along one axis of the rolled canvas: 0 before the last window,
// 1 in it before the shift, 2 after (tokens wrapped around from the other side).
EV_HOST_DEVICE int axis_region(int t, int window, int shift, int padded) {
  return shift == 0 ? 0 : (t >= padded - window) + (t >= padded - shift);
}

struct Slot {
  int row, col;  // map coordinates; row < 0 for a padded slot
  int region;    // comparable between slots of one window; 0 when not shifted
};

EV_HOST_DEVICE Slot slot_source(const Geometry& g, int window, int pos) {
  const int tr = (window / g.windows_per_row) * g.wh + pos / g.ww;
  const int tc = (window % g.windows_per_row) * g.ww + pos % g.ww;
  const int row = floor_mod(tr + g.sh, g.Hp) - g.top;
  const int col = floor_mod(tc + g.sw, g.Wp) - g.left;
  Slot s;
  const bool inside = row >= 0 && row < g.H && col >= 0 && col < g.W;
  s.row = inside ? row : -1;
  s.col = inside ? col : -1;
  s.region = g.shifted
                 ? axis_region(tr, g.wh, g.sh, g.Hp) * 3 + axis_region(tc, g.ww, g.sw, g.Wp)
                 : 0;
  return s;
}

// Everything a kernel needs besides the tensors' data pointers.
template <typename acc_t>
struct Params {
  Geometry g;
  int B, heads, d, C;              // C = heads * d
  int64_t sB, sH, sW;              // strides of qkv (its channel stride is 1)
  acc_t scale;
  acc_t shift_mask_value;
  bool mask_padded_keys;
  int T;                           // rows of the bias table (0: no bias)
  int64_t num_tasks() const { return static_cast<int64_t>(B) * g.num_windows * heads; }
  // log-sum-exp of query slot p of (b, window, head): laid out (B, nW, heads, N)
  EV_HOST_DEVICE int64_t lse_index(int64_t task, int p) const { return task * g.N + p; }
};

}  // namespace window_attention
}  // namespace effvision
