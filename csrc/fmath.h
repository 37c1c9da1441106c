// tanh of float inputs, computed in double precision and rounded once to float: the correctly
// rounded result, except where the exact value lies within about 1e-15 (relative) of a rounding
// midpoint between two floats, a chance of about 2^-25 an input. torch's cpu tanh is accurate to
// 1 ulp but not correctly rounded, so this differs from it in the last bit for about 0.1% of
// inputs (0.11% of normal samples of std 3); against float64 torch rounded to float32 it agrees.
//
// the method (fdlibm's, in double):
//   e^y = 2^k * (1 + p(r)),  k = round(y / ln2),  r = y - k*ln2 in [-ln2/2, ln2/2]
//   (ln2 split into a 32-bit head, so k*ln2_hi is exact, and a tail), with p(r) = e^r - 1 by its
//   taylor series to r^13 (truncation below 2e-17 relative on that interval);
//   tanh|x| = t / (t + 2), t = e^(2|x|) - 1 = 2^k*p + (2^k - 1) (no cancellation: for k = 0 it is p,
//   whose relative error is that of the series; for k >= 1 it is above 0.4); the sign is x's.
// |x| is clamped to 10 first (tanh rounds to 1.0f from about 9.01 on); nan returns nan.
//
// the portable scalar version is here; simd.h's VecAVX2 runs the same steps on 4 doubles.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparseops {
namespace fmath {
// internal linkage: the avx2 and the portable translation units each keep their own copy (one built
// with -mavx2 -mfma must never be merged into the portable path)
namespace {

constexpr double kInvLn2 = 1.4426950408889634074;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits: k * kLn2Hi is exact
constexpr double kLn2Lo = 1.90821492927058770002e-10;
// 1/n! for n = 2 .. 13
constexpr double kInvFact[12] = {
    1.0 / 2,         1.0 / 6,          1.0 / 24,          1.0 / 120,          1.0 / 720,         1.0 / 5040,
    1.0 / 40320,     1.0 / 362880,     1.0 / 3628800,     1.0 / 39916800,     1.0 / 479001600,   1.0 / 6227020800,
};
constexpr float kTanhClamp = 10.0f;

inline double pow2i(int k) {
  const uint64_t b = static_cast<uint64_t>(k + 1023) << 52;
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}

// e^y = s * (1 + p): returns p and sets s = 2^k (|y| below ~700)
inline double exp_parts(double y, double& s) {
  const double k = std::nearbyint(y * kInvLn2);
  const double r = (y - k * kLn2Hi) - k * kLn2Lo;
  double q = kInvFact[11];
  for (int i = 10; i >= 0; --i) q = q * r + kInvFact[i];
  s = pow2i(static_cast<int>(k));
  return r + r * r * q;
}

inline float tanh_f32(float x) {
  if (x != x) return x;
  const double a = std::fabs(x) < kTanhClamp ? std::fabs(static_cast<double>(x)) : kTanhClamp;
  double s;
  const double p = exp_parts(a + a, s);
  const double t = s * p + (s - 1.0);
  const float v = static_cast<float>(t / (t + 2.0));
  return std::signbit(x) ? -v : v;
}

}  // namespace
}  // namespace fmath
}  // namespace sparseops
