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
//
// sigmoid of float inputs, in float32 (a float64 one by the steps above costs twice torch's float32
// sigmoid, which is what a fused sigmoid has to beat). within 1.56 ulp of the exact value for every
// float (checked over all 2^32 inputs against float64: worst 1.553 ulp, at x = -16.98; the same bits
// from the avx2 and the portable path for every input). 1.8% of all floats, 14% of N(0, 3) samples,
// are not the correctly rounded float; torch's cpu sigmoid: 34% of those samples, up to 2.3 ulp, and 0
// below x = -88.7 where the true value is a subnormal this one returns. the method, with a = min(|x|, 105):
//   e = e^-a = 2^k * (1 + p(r)),  k = round(-a / ln2),  r = -a - k*ln2 by two fmas (cody-waite: ln2
//   split into a 21-bit head, so -a - k*ln2_hi is exact, and a tail), p(r) = e^r - 1 by its taylor
//   series to r^7 (truncation below 5e-9 relative on |r| <= ln2/2). e = (2^(k+32) * (1 + p)) * 2^-32:
//   one rounding where e is normal (the fma), a second only where e is subnormal (a > 87.3);
//   d + c = 1 + e exactly (fast2sum: d = fl(1 + e), c = e - (d - 1)), r0 = fl(1 / d);
//   sigmoid(x) = num / (d + c), num = 1 for x > 0 (sigmoid(|x|)), else e (sigmoid(-|x|)):
//   q0 + r0 * (num - q0*d - q0*c), q0 = fl(num * r0), the residual by fmas.
// every step is an ieee operation or an fma, so the avx2 version in simd.h (the same steps on 8 floats)
// gives the same bits as this one. nan returns nan; sigmoid(±0) = 0.5.
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

// e^y = s * (1 + p) * 2^-shift: returns p and sets s = 2^(k + shift) (|y| below ~700 for shift 0)
inline double exp_parts(double y, double& s, int shift = 0) {
  const double k = std::nearbyint(y * kInvLn2);
  const double r = (y - k * kLn2Hi) - k * kLn2Lo;
  double q = kInvFact[11];
  for (int i = 10; i >= 0; --i) q = q * r + kInvFact[i];
  s = pow2i(static_cast<int>(k) + shift);
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

constexpr float kSigLog2e = 1.44269504088896341f;
constexpr float kSigLn2Hi = 0x1.62e43p-1f;   // 21 significant bits
constexpr float kSigLn2Lo = -0x1.05c61p-29f;
// 1/n! for n = 2 .. 7
constexpr float kSigInvFact[6] = {1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
constexpr float kSigClamp = 105.0f;  // e^-105 is below half the smallest subnormal: sigmoid(-105) = 0

inline float pow2f(int k) {
  const uint32_t b = static_cast<uint32_t>(k + 127) << 23;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// e^t = s * (1 + p) * 2^-SHIFT for t <= 0, the steps sigmoid_f32 and silu_f32 share (their clamps keep
// k + SHIFT a normal float's exponent): returns p and sets s = 2^(k + SHIFT), k = round(t / ln2)
template <int SHIFT>
inline float exp_parts_f(float t, float& s) {
  const float k = std::nearbyint(t * kSigLog2e);
  const float r = std::fmaf(-k, kSigLn2Lo, std::fmaf(-k, kSigLn2Hi, t));
  float q = kSigInvFact[5];
  for (int i = 4; i >= 0; --i) q = std::fmaf(q, r, kSigInvFact[i]);
  s = pow2f(static_cast<int>(k) + SHIFT);
  return std::fmaf(r * r, q, r);
}

inline float sigmoid_f32(float x) {
  if (x != x) return x;
  const float t = -(std::fabs(x) < kSigClamp ? std::fabs(x) : kSigClamp);
  float s;
  const float p = exp_parts_f<32>(t, s);
  const float e = std::fmaf(s, p, s) * 0x1p-32f;
  const float d = 1.0f + e;
  const float c = e - (d - 1.0f);
  const float r0 = 1.0f / d;
  // num / (d + c) for num = 1 (x > 0) or e; for num = 1, q0 is r0 exactly
  const float num = x > 0.0f ? 1.0f : e;
  const float q0 = num * r0;
  return std::fmaf(r0, std::fmaf(-q0, c, std::fmaf(-q0, d, num)), q0);
}

// silu(x) = x sigmoid(x), in float32 by sigmoid_f32's steps: x * num / (d + c). two changes, both for
// the negative side, where the value is x e / (1 + e) with e = e^x, down to subnormal results:
// - e is kept scaled, es = e * 2^64 (2^(k+64) * (1 + p): normal for every a below the clamp, 120), with
//   its rounding error el (es + el = s + s p to about 2^-48), and the numerator is x * (es + el) as
//   hi + lo (lo = fma(x, es, -hi) + x el); el also goes into c. the quotient is scaled back by 2^-64 at
//   the end (one rounding, a second only where the result is subnormal). with e itself in the
//   numerator, a subnormal e (a > 87.3) would carry a few bits into a product |x| times larger;
// - the clamp is 120, not 105: silu(-a) = -a e^-a rounds to a subnormal up to a = 108.6 (torch's float32
//   silu is -0 from x = -88.8 on, where exp(-x) overflows); from a = 120 on the result is x (x > 0) or -0.
// d + c, r0 and the residual as in sigmoid_f32, with lo added to the residual; for x > 0 the numerator
// is x and the scale 1. ±0 returns x (the steps would give +0 for -0); nan returns nan; -inf gives -0
// (the limit; torch's silu gives nan). over all 2^32 floats (bench/cpp/fewbit_exhaustive.cpp, against
// long double): within 1.123 ulp of the exact value (worst at x = -82.134), 0.12% of them not the
// correctly rounded float, the same bits from the avx2 and the portable path for every input. torch's
// cpu silu: 2.2 ulp, 28% of N(0, 3) samples not correctly rounded, and -0 below x = -88.7 where the
// true value is a float this one returns (ad hoc samples).
constexpr float kSiluClamp = 120.0f;

inline float silu_f32(float x) {
  if (x != x) return x;
  const float a = std::fabs(x);
  if (!(a < kSiluClamp)) return x > 0.0f ? x : -0.0f;
  if (a == 0.0f) return x;
  float s;
  const float p = exp_parts_f<64>(-a, s);
  const float es = std::fmaf(s, p, s);
  const float el = std::fmaf(s, p, s - es);  // es's rounding error (s - es is exact: Sterbenz)
  const float e = es * 0x1p-64f;
  const float d = 1.0f + e;
  const float c = (e - (d - 1.0f)) + el * 0x1p-64f;
  const float r0 = 1.0f / d;
  const bool pos = x > 0.0f;
  const float m = pos ? 1.0f : es;
  const float hi = x * m;
  const float lo = std::fmaf(x, pos ? 0.0f : el, std::fmaf(x, m, -hi));
  const float q0 = hi * r0;
  const float v = std::fmaf(r0, std::fmaf(-q0, c, std::fmaf(-q0, d, hi)) + lo, q0);
  return pos ? v : v * 0x1p-64f;
}


// ---- the float64 family: elu / selu (elu_f32), celu, softplus, logsigmoid ----
// each computed in double from the float input by the steps below and rounded once to float. the
// double steps (exp_parts above; log1p01: log(1 + t) = 2 atanh(f / (2 + f)) by its series to s^19,
// truncation below 3e-17) are accurate to about 1e-15 relative, so the float result is the correctly
// rounded value of the function except where the exact value lies within that of a rounding midpoint
// between two floats (a chance of about 2^-28 an input), and always within 1 ulp. torch's float32
// forwards of these are within 1-2 ulp but not correctly rounded (selu's positive side is x times
// float(scale), so 1 ulp off for about half the inputs). arguments of exp are clamped to [-700, 0]
// for e^x - 1 (e^-700 - 1 is -1 in double) and to [-746, 0] for e^x (which is 0 from -745.2 on, as
// torch's float64 exp), nan returns nan. log1p01 of the smallest subnormal, 2^-1074 (e^-a for a from
// 744.04 to 745.13), is 0 (s rounds to 0), as torch's float64 log1p: logsigmoid is +0 there, as torch's.
constexpr double kExpClamp = 700.0;
constexpr double kExpZero = 746.0;
constexpr double kSqrt2m1 = 0.41421356237309504880;
constexpr double kLn2 = 0.69314718055994530942;
// 1/(2j+1) for j = 1 .. 9
constexpr double kAtanhC[9] = {1.0 / 3, 1.0 / 5, 1.0 / 7, 1.0 / 9, 1.0 / 11, 1.0 / 13, 1.0 / 15, 1.0 / 17, 1.0 / 19};

// e^y - 1 for y in [-700, 0]
inline double expm1_d(double y) {
  double s;
  const double p = exp_parts(y, s);
  return s * p + (s - 1.0);
}
// y in [-746, 0]: scaled by 2^64 so that 2^k stays a normal double down to the subnormal results
inline double exp_d(double y) {
  double s;
  const double p = exp_parts(y, s, 64);
  return (s * p + s) * 0x1p-64;
}

// log(1 + t) for t in [0, 1]: 1 + t = 2^e (1 + f) with e = 0, f = t (exact) up to t = sqrt2 - 1, else
// e = 1, f = (t - 1) / 2; log(1 + f) = 2 atanh(s) = 2s (1 + s^2/3 + s^4/5 + ...), s = f / (2 + f), |s| <= 0.172
inline double log1p01(double t) {
  const bool big = t > kSqrt2m1;
  const double f = big ? (t - 1.0) * 0.5 : t;
  const double s = f / (2.0 + f), z = s * s, s2 = s + s;
  double q = kAtanhC[8];
  for (int i = 7; i >= 0; --i) q = q * z + kAtanhC[i];
  const double r = s2 * z * q + s2;
  return big ? r + kLn2 : r;
}

inline double clamp_exp_arg(double y) { return y < -kExpClamp ? -kExpClamp : y; }

// x >= 0 ? x * pos : neg * (e^x - 1): elu (pos = 1, neg = alpha) and selu (pos = scale, neg = alpha * scale)
inline float elu_f32(float x, double neg, double pos) {
  if (x != x) return x;
  const double d = x;
  return static_cast<float>(d >= 0.0 ? d * pos : neg * expm1_d(clamp_exp_arg(d)));
}

// x >= 0 ? x : alpha * (e^(x / alpha) - 1), alpha > 0 (inv = 1 / alpha)
inline float celu_f32(float x, double alpha, double inv) {
  if (x != x) return x;
  const double d = x;
  return d >= 0.0 ? x : static_cast<float>(alpha * expm1_d(clamp_exp_arg(d * inv)));
}

// torch's softplus: x where x * beta > threshold (torch's test, in float32: x times float(beta) against
// float(threshold)), else log(1 + e^(x beta)) / beta, as (max(x beta, 0) + log(1 + e^-|x beta|)) / beta
// in float64, which does not overflow where torch's does (inv = 1 / beta, beta > 0)
inline float softplus_f32(float x, double beta, double threshold, double inv) {
  if (x != x) return x;
  if (x * static_cast<float>(beta) > static_cast<float>(threshold)) return x;
  const double xb = static_cast<double>(x) * beta;
  const double a = std::fabs(xb) < kExpZero ? std::fabs(xb) : kExpZero;
  return static_cast<float>(((xb > 0.0 ? xb : 0.0) + log1p01(exp_d(-a))) * inv);
}

// log sigmoid(x) = min(x, 0) - log(1 + e^-|x|)
inline float logsigmoid_f32(float x) {
  if (x != x) return x;
  const double d = x, a = std::fabs(d) < kExpZero ? std::fabs(d) : kExpZero;
  return static_cast<float>((d < 0.0 ? d : 0.0) - log1p01(exp_d(-a)));
}

}  // namespace
}  // namespace fmath
}  // namespace sparseops
