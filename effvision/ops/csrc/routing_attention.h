// Bi-level routing attention: the index arithmetic shared by the CPU and CUDA kernels.
//
// The op reads q (B, H, W, C_qk), k (B, H, W, C_qk) and v (B, H, W, C_v) as token maps (the last
// dim contiguous, the others strided, e.g. channel slices of one qkv projection). The map is cut
// into nh x nw regions of rh x rw tokens (H = nh * rh, W = nw * rw), regions and the positions in
// a region numbered row-major. Query region r attends to every token of the topk regions
// index[b, r, :] routed to it; the keys and values are read where they lie in the map (region
// slot -> map row and column below), never gathered into topk copies. Python's
// effvision/ops/routing_attention.py writes the same arithmetic with tensor ops (the reference).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EV_HOST_DEVICE inline
#endif

namespace effvision {
namespace routing_attention {

struct Geometry {
  int H, W;    // token map, a multiple of the region grid
  int nh, nw;  // regions per column and per row
  int rh, rw;  // tokens per region side
  int R;       // regions, nh * nw
  int N;       // tokens per region, rh * rw
};

inline Geometry make_geometry(int H, int W, int nh, int nw) {
  Geometry g;
  g.H = H;
  g.W = W;
  g.nh = nh;
  g.nw = nw;
  g.rh = H / nh;
  g.rw = W / nw;
  g.R = nh * nw;
  g.N = g.rh * g.rw;
  return g;
}

// Map row and column of position `pos` of region `region`.
EV_HOST_DEVICE void token_of(const Geometry& g, int region, int pos, int& row, int& col) {
  row = (region / g.nw) * g.rh + pos / g.rw;
  col = (region % g.nw) * g.rw + pos % g.rw;
}

// Strides of one (B, H, W, C) map whose channel stride is 1.
struct MapStrides {
  int64_t sB, sH, sW;
  EV_HOST_DEVICE int64_t at(int b, int row, int col) const {
    return b * sB + row * sH + col * sW;
  }
};

// Everything a kernel needs besides the tensors' data pointers.
template <typename acc_t>
struct Params {
  Geometry g;
  int B, heads, topk;
  int dqk, dv;      // channels per head of q/k and of v
  int Cqk, Cv;      // heads * dqk, heads * dv
  MapStrides q, k, v;
  acc_t scale;
  // token offset of (b, region, pos) in a map with these strides
  EV_HOST_DEVICE int64_t offset(const MapStrides& s, int b, int region, int pos) const {
    int row, col;
    token_of(g, region, pos, row, col);
    return s.at(b, row, col);
  }
  // row of a contiguous (B, H, W, C) map (the output and the gradients)
  EV_HOST_DEVICE int64_t token(int b, int region, int pos) const {
    int row, col;
    token_of(g, region, pos, row, col);
    return (int64_t(b) * g.H + row) * g.W + col;
  }
  // log-sum-exp and delta (dO . O) of query pos of (b, region, head): laid out (B, R, heads, N)
  EV_HOST_DEVICE int64_t stat_index(int b, int region, int head, int pos) const {
    return ((int64_t(b) * g.R + region) * heads + head) * g.N + pos;
  }
};

}  // namespace routing_attention
}  // namespace effvision
