// Math for the CPU kernels, written so that the loops calling it vectorise.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace effvision {

// exp for the softmax: Cephes' single-precision polynomial (about 1 ulp), written so that the
// loops calling it vectorise: no libm call and no float comparison (GCC does not if-convert one
// under the default -ftrapping-math), the rounding by the 1.5 * 2^23 shifter and the exponent
// clamped as an integer. Arguments are softmax exponents, x <= ~0; below -87.3 the result
// flushes to 0 (it stays finite for |x| up to ~1e9).
__attribute__((always_inline)) inline float fast_exp(float x) {
  constexpr float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;  // round(x / ln 2) in the low mantissa
  const float n = t - shifter;
  int32_t e = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(shifter);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  e = e < -127 ? -127 : (e > 128 ? 128 : e);  // 2^-127 -> 0 (flush), 2^128 -> inf
  return p * std::bit_cast<float>((e + 127) << 23);
}
__attribute__((always_inline)) inline double fast_exp(double x) { return std::exp(x); }

}  // namespace effvision
