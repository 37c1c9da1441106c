// the float64 steps (exp_parts below) are those of elu, selu, celu and softplus with beta != 1: each
// computed in double and rounded once (see "the float64 family" further down).
//
// sigmoid of float inputs, in float32 (a float64 one by those steps costs twice torch's float32
// sigmoid, which is what a fused sigmoid has to beat). within 2.41 ulp of the exact value for every
// float (checked over all 2^32 inputs against long double, bench/cpp/fewbit_exhaustive.cpp 6: worst
// 2.402 ulp, at x = -4.1573; the same bits from the avx2, avx-512 and portable paths for every input).
// 2.9% of all floats are not the correctly rounded float; torch's cpu sigmoid: up to 2.3 ulp on samples,
// and 0 below x = -88.7 where the true value is a subnormal this one returns. the method, with
// a = min(|x|, 105):
//   e = e^-a = 2^k * (1 + p(r)),  k = round(-a / ln2),  r = -a - k*ln2 by two fmas (cody-waite: ln2
//   split into a 21-bit head, so -a - k*ln2_hi is exact, and a tail), p(r) = e^r - 1 by its taylor
//   series to r^7 (truncation below 5e-9 relative on |r| <= ln2/2). e = (2^(k+32) * (1 + p)) * 2^-32:
//   one rounding where e is normal (the fma), a second only where e is subnormal (a > 87.3);
//   sigmoid(x) = num / (1 + e), num = 1 for x > 0 (sigmoid(|x|)), else e (sigmoid(-|x|)): one rounding
//   for 1 + e and one for the division.
// NOTE: until 2026-11-25 the quotient was corrected for the rounding of 1 + e (fast2sum d + c, r0 = 1/d,
// q0 + r0 (num - q0 d - q0 c) by fmas): within 1.553 ulp, 1.8% not correctly rounded, but ~6 more
// operations of ~25 a vector (the 16-lane pass 1.02-1.05 against 0.84-0.86 ms, ad hoc).
// every step is an ieee operation or an fma, so the avx2 version in simd.h (the same steps on 8 floats)
// gives the same bits as this one. nan returns nan; sigmoid(±0) = 0.5.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "tanh_table.h"

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
  return (x > 0.0f ? 1.0f : e) / (1.0f + e);
}

// silu(x) = x sigmoid(x) in float32: x / (1 + e) for x >= 0 and x e / (1 + e) below, with sigmoid's
// e = e^-|x| (exp_parts_f), four roundings and no correction:
// - e is kept scaled, es = e * 2^64 (2^(k+64) * (1 + p): normal for every a below the clamp, 120), so the
//   numerator x es of the negative side is a normal float down to the clamp, and the quotient is scaled
//   back by 2^-64 at the end (a second rounding only where the result is subnormal). with e itself in
//   the numerator, a subnormal e (a > 87.3) would carry a few bits into a product |x| times larger;
// - d = 1 + e is one fma (es * 2^-64 + 1), the quotient one IEEE division (the same bits on every path);
// - the clamp is 120, not 105: silu(-a) = -a e^-a rounds to a subnormal up to a = 108.6 (torch's float32
//   silu is -0 from x = -88.8 on, where exp(-x) overflows); from x = -120 down the result is -0, and
//   above 120 e rounds away in d (x / 1 = x). ±0 give ±0 (x / d, d = 2), nan gives nan (the clamp makes
//   the exponent finite, x's nan reaches the quotient), -inf gives -0 (the limit; torch's silu gives nan).
// over all 2^32 floats (bench/cpp/fewbit_exhaustive.cpp 5, against long double): within 3.344 ulp of the
// exact value (worst at x = -5.9389), 3.7% of them not the correctly rounded float, the same bits from
// the avx2, avx-512 and portable paths for every input. torch's cpu silu: 2.4 ulp on 32M samples in
// [-87, 30] (ad hoc), and -0 below x = -88.7 where the true value is a float this one returns.
// NOTE: the previous form carried e's rounding error and corrected the quotient for d's (within 1.123
// ulp, 0.12% not correctly rounded), ~48 operations a vector against ~27 here: its fused pass with 4-bit
// codes took 1.58-1.64 ms on 4M fp32 (AVX-512, 2 threads) against 1.01-1.07 for this one, torch's silu
// forward alone 0.78-0.87. between them (ad hoc, 16 lanes, the pass without codes): the quotient
// corrected for the division's and the numerator's rounding 2.5 ulp (+17% time), also for d's 1.6 ulp
// (+35%).
constexpr float kSiluClamp = 120.0f;

inline float silu_f32(float x) {
  const float a = std::fabs(x);
  const float t = -(a < kSiluClamp ? a : kSiluClamp);  // a nan gives the clamp (as minps), x's nan flows on
  float s;
  const float p = exp_parts_f<64>(t, s);
  const float es = std::fmaf(s, p, s);
  const float d = std::fmaf(es, 0x1p-64f, 1.0f);
  const bool neg = x < 0.0f;
  const float v = (neg ? x * es : x) / d;
  if (x <= -kSiluClamp) return -0.0f;
  return neg ? v * 0x1p-64f : v;
}


// ---- the float64 family: elu / selu (elu_f32), celu, softplus with any beta (the kernels take it for
// beta != 1; with beta 1, softplus1_g below) ----
// each computed in double from the float input by the steps below and rounded once to float. the
// double steps (exp_parts above; log1p01: log(1 + t) = 2 atanh(f / (2 + f)) by its series to s^19,
// truncation below 3e-17) are accurate to about 1e-15 relative, so the float result is the correctly
// rounded value of the function except where the exact value lies within that of a rounding midpoint
// between two floats (a chance of about 2^-28 an input), and always within 1 ulp. torch's float32
// forwards of these are within 1-2 ulp but not correctly rounded (selu's positive side is x times
// float(scale), so 1 ulp off for about half the inputs). arguments of exp are clamped to [-700, 0]
// for e^x - 1 (e^-700 - 1 is -1 in double) and to [-746, 0] for e^x (which is 0 from -745.2 on, as
// torch's float64 exp), nan returns nan. log1p01 of the smallest subnormal, 2^-1074 (e^-a for a from
// 744.04 to 745.13), is 0 (s rounds to 0), as torch's float64 log1p.
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

// ---- tanh, softplus (beta 1) and logsigmoid in float32, written once over a lane type ----
// F is FScalar below (one float: the portable path and every scalar tail), VecAVX2::F8 or
// VecAVX512::F16 (simd.h: 8 and 16 lanes). each step is an ieee operation or an fma, the same ones in
// the same order on every F, so all paths give the same bits (softplus and logsigmoid: tanh_g runs on F8
// alone now, see below; the few-bit translation units are built
// with -ffp-contract=off: a multiply and an add the compiler fused would round once where the other
// paths round twice). tanh_g is the avx2 path's tanh; the others take tanh_tab_f32. bounds below: over all 2^32 floats against long double (bench/cpp/fewbit_exhaustive.cpp).
// NOTE: on the avx-512 xeon the correctly rounded float64 tanh took 2.1 ms a 4M-element fused pass,
// 1.6 of it the float64 exp steps (the division another 0.3); torch's float32 tanh forward 0.67 ms,
// so the few-bit tanh was 0.55-0.62x torch's forward+backward; softplus and logsigmoid likewise
// (3.5-3.9 ms against torch's 2.8 ms softplus forward). ad hoc, 16 lanes, 4M floats, 2 threads: this
// tanh 1.2 ms, one with 1.6 ulp (p and t not carried as head + tail) 0.9, one with 2.4 ulp 0.64. the
// interval table that replaced it on 16 lanes (tanh_tab_f32): 0.62 ms, a copy 0.57, at 0.57 ulp.
// NOTE: the kernels run these one vector at a time. a lane type of N registers stepped side by side (as
// sigmoid_n / silu_n in simd.h are written) made tanh slower, 1.35-1.40 → 1.43-1.46 ms on 16 lanes and
// 2.0 → 3.4 ms on 8 (registers spill); and sigmoid / silu written once over the lane type, one vector at
// a time, kept their bits but made silu's 8-lane pass 10% slower (2.0 → 2.2 ms), so those stay hand-written
// (ad hoc, 4M fp32, 2 threads, 2026-11-24)
struct FScalar {
  using reg = float;
  using mask = bool;
  static inline reg bc(float v) { return v; }
  static inline reg add(reg a, reg b) { return a + b; }
  static inline reg sub(reg a, reg b) { return a - b; }
  static inline reg mul(reg a, reg b) { return a * b; }
  static inline reg div(reg a, reg b) { return a / b; }
  static inline reg fma(reg a, reg b, reg c) { return std::fmaf(a, b, c); }    // a b + c, one rounding
  static inline reg fnma(reg a, reg b, reg c) { return std::fmaf(-a, b, c); }  // c - a b, one rounding
  // minps / maxps: the second operand on a nan or a tie
  static inline reg min(reg a, reg b) { return a < b ? a : b; }
  static inline reg max(reg a, reg b) { return a > b ? a : b; }
  static inline reg abs(reg a) { return std::fabs(a); }
  static inline reg round(reg a) { return std::nearbyint(a); }  // to nearest, ties to even
  // 2^(k + SHIFT) for an integral k with k + SHIFT a normal float's exponent
  template <int SHIFT>
  static inline reg pow2(reg k) { return pow2f(static_cast<int>(k) + SHIFT); }
  static inline mask gt(reg a, reg b) { return a > b; }
  static inline mask ge(reg a, reg b) { return a >= b; }
  static inline reg sel(mask m, reg t, reg f) { return m ? t : f; }
  // v (>= +0) with x's sign bit
  static inline reg with_sign(reg v, reg x) { return std::signbit(x) ? -v : v; }
  static inline reg keep_nan(reg v, reg x) { return x != x ? x : v; }
};

constexpr float kTanhClamp = 9.1f;  // tanh rounds to 1.0f from 9.011 on
// 1/n! for n = 2 .. 8
constexpr float kTanhInvFact[7] = {1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040, 1.0f / 40320};

// e^y = s (1 + ph + pl), the steps tanh_g and log1p_exp_neg_g share: k = round(y / ln2), r + rl = y - k ln2
// (cody-waite: k ln2_hi exact, r = fl(rh - k ln2_lo), rl its rounding error by one more fma), p = e^r - 1
// = r + u, u = r^2 q(r) with q the taylor coefficients 1/2! .. 1/(NT+1)!, as ph + pl (fast2sum, |u| < |r|;
// rl goes into pl); returns s = 2^(k + SHIFT)
template <class F, int NT, int SHIFT>
inline typename F::reg exp_head_tail_g(typename F::reg y, typename F::reg& ph, typename F::reg& pl) {
  static_assert(NT >= 2 && NT <= 7, "kTanhInvFact holds 1/2! .. 1/8!");
  using R = typename F::reg;
  const R k = F::round(F::mul(y, F::bc(kSigLog2e)));
  const R rh = F::fnma(k, F::bc(kSigLn2Hi), y);
  const R r = F::fnma(k, F::bc(kSigLn2Lo), rh);
  const R rl = F::fnma(k, F::bc(kSigLn2Lo), F::sub(rh, r));
  R q = F::bc(kTanhInvFact[NT - 1]);
  for (int i = NT - 2; i >= 0; --i) q = F::fma(q, r, F::bc(kTanhInvFact[i]));
  const R u = F::mul(F::mul(r, r), q);
  ph = F::add(r, u);
  pl = F::add(F::add(F::sub(r, ph), u), rl);
  return F::template pow2<SHIFT>(k);
}

// tanh(x) = t / (t + 2), t = e^(2|x|) - 1, with x's sign (the avx2 path's tanh, on F8; the avx-512 and
// portable paths take tanh_tab_f32 below: no division, 0.57 ulp); every step carried as head + tail where its
// rounding would show (within 0.763 ulp of the exact value: faithfully rounded, 0.058% of the floats not
// the correctly rounded one; torch's float32 tanh is within 1 ulp, the float64 one rounded once that
// this replaced was correctly rounded but 2.6x slower). with a = min(|x|, 9.1), y = 2a:
//   e^y = 2^k (1 + ph + pl) by exp_head_tail_g (taylor to r^8: truncation below 1e-9 relative on
//   |r| <= ln2/2);
//   t = 2^k (1 + p) - 1 = A + B, A = 2^k - 1 (exact up to k = 24; above, t is so large that its error
//   cannot show), B = 2^k ph (exact): th + tl by fast2sum (|A| >= |B| for k >= 1, A = 0 for k = 0), plus
//   2^k pl; D + c = th + 2 exactly (fast2sum on max, min) plus tl; the quotient q0 = th / D (as th r0,
//   r0 = 1 / D) corrected once: q0 + r0 (th - q0 D - q0 c + tl). nan returns nan, ±0 itself.
template <class F>
inline typename F::reg tanh_g(typename F::reg x) {
  using R = typename F::reg;
  const R a = F::min(F::abs(x), F::bc(kTanhClamp));  // a nan gives the clamp (minps), x's nan at the end
  R ph, pl;
  const R s = exp_head_tail_g<F, 7, 0>(F::add(a, a), ph, pl);
  const R A = F::sub(s, F::bc(1.0f)), B = F::mul(s, ph);
  const R th = F::add(A, B);
  const R tl = F::fma(s, pl, F::add(F::sub(A, th), B));
  const R two = F::bc(2.0f);
  const R D = F::add(th, two);
  const R c = F::add(F::add(F::sub(F::max(th, two), D), F::min(th, two)), tl);
  const R r0 = F::div(F::bc(1.0f), D);
  const R q0 = F::mul(th, r0);
  const R v = F::fma(r0, F::add(F::fnma(q0, c, F::fnma(q0, D, th)), tl), q0);
  return F::keep_nan(F::with_sign(v, x), x);
}

constexpr float kL1peClamp = 104.0f;  // e^-104 is below half the smallest subnormal
constexpr float kSqrt2m1F = 0.414213562f;
constexpr float kLn2HiF = 0x1.62e4p-1f;  // 17 significant bits
constexpr float kLn2LoF = 0x1.7f7d1cp-20f;
// 2/(2j+1) for j = 1 .. 4
constexpr float kLog1pC[4] = {2.0f / 3, 2.0f / 5, 2.0f / 7, 2.0f / 9};

// m + log(1 + e^-a) (NEG: m - log(1 + e^-a)) for a >= 0 (a nan gives the clamp's value; the callers keep
// x's nan), what softplus and logsigmoid share. e^-a as sigmoid_f32's exp steps with r's rounding error rl folded into p, scaled by
// 2^64 (es, a normal float down to the clamp, 104) with its rounding error el; t = es 2^-64. 1 + t =
// 2^e (1 + f): e = 0, f = t below t = 0.5, else e = 1, f = (t - 1) / 2 (exact for t >= 0.5), with the
// tail fl (el, or el / 2, scaled alike). log(1 + f) = f - f w, fdlibm's form: with s = f / (2 + f) (r0 =
// 1 / (2 + f), s = f r0), z = s^2, R = z (2/3 + 2z/5 + 2z^2/7 + 2z^3/9) (truncation below 2e-10 on |s|
// <= 0.2), f w = f^2/2 - s (f^2/2 + R): the leading f is exact and the rest small, so its rounding
// barely shows; the tail adds fl / (1 + f) ~ fl (1 - 2s). e = 1: ln2_hi + f by fast2sum, the rest
// and ln2_lo added to its tail, one rounding at the end; e = 0: es + (fl (1 - 2s) - es w), scaled back
// by 2^-64 (a second rounding only where the result is subnormal).
template <class F, bool NEG>
inline typename F::reg log1p_exp_neg_g(typename F::reg a, typename F::reg m) {
  using R = typename F::reg;
  const R one = F::bc(1.0f);
  R ph, pl;
  const R s = exp_head_tail_g<F, 6, 64>(F::sub(F::bc(0.0f), F::min(a, F::bc(kL1peClamp))), ph, pl);
  const R es = F::fma(s, ph, s);
  const R el = F::fma(s, pl, F::fma(s, ph, F::sub(s, es)));  // es's rounding error (s - es is exact: sterbenz) and s pl
  const R t = F::mul(es, F::bc(0x1p-64f));
  const typename F::mask big = F::gt(t, F::bc(kSqrt2m1F));
  // e = 1: t - 1 = d + (t - (d + 1)), both exact (d + 1 is a float of t's binade, then sterbenz)
  const R d = F::sub(t, one);
  const R f = F::sel(big, F::mul(d, F::bc(0.5f)), t);
  const R fl = F::sel(big, F::mul(F::add(F::mul(el, F::bc(0x1p-64f)), F::sub(t, F::add(d, one))), F::bc(0.5f)), el);
  const R r0 = F::div(one, F::add(F::bc(2.0f), f));
  const R sq = F::mul(f, r0);
  const R z = F::mul(sq, sq);
  R poly = F::bc(kLog1pC[3]);
  for (int i = 2; i >= 0; --i) poly = F::fma(poly, z, F::bc(kLog1pC[i]));
  const R rr = F::mul(poly, z);
  const R half_f = F::mul(f, F::bc(0.5f));
  const R hfsq = F::mul(half_f, f);
  const R w = F::fnma(r0, F::add(hfsq, rr), half_f);
  const R corr = F::fnma(F::add(sq, sq), fl, fl);
  // e = 1: L = H + T, H = ln2_hi + f rounded, T the rest; m + H by fast2sum (the larger magnitude
  // first: both terms have one sign), its error added to T, one rounding at the end
  const R ln2h = F::bc(kLn2HiF);
  const R H = F::add(ln2h, f);
  const R Hl = F::add(F::sub(ln2h, H), f);
  const R T = F::fnma(f, w, F::add(F::add(Hl, F::bc(kLn2LoF)), corr));
  R v1;
  if constexpr (NEG) {
    const R nh = F::sub(F::bc(0.0f), H);
    const R S = F::add(m, nh);
    v1 = F::add(S, F::sub(F::add(F::sub(F::min(m, nh), S), F::max(m, nh)), T));
  } else {
    const R S = F::add(m, H);
    v1 = F::add(S, F::add(F::add(F::sub(F::max(m, H), S), F::min(m, H)), T));
  }
  // e = 0: L = es + (fl (1 - 2s) - es w), scaled back
  const R v0 = F::mul(F::add(es, F::fnma(es, w, corr)), F::bc(0x1p-64f));
  return F::sel(big, v1, NEG ? F::sub(m, v0) : F::add(m, v0));
}

// torch's softplus with beta = 1 (the float64 softplus_f32 above takes any beta): x where x > threshold
// (torch's float32 test, x * 1 against float(threshold)), else max(x, 0) + log(1 + e^-|x|). within 0.842 ulp
// of the exact value over all 2^32 floats (worst at x = -0.8987), 0.083% of them not the correctly rounded
// float (softplus_f32 in float64: correctly rounded, 1.8x slower; torch's float32 one 1.5 ulp)
template <class F>
inline typename F::reg softplus1_g(typename F::reg x, typename F::reg threshold) {
  const typename F::reg v = log1p_exp_neg_g<F, false>(F::abs(x), F::max(x, F::bc(0.0f)));
  return F::keep_nan(F::sel(F::gt(x, threshold), x, v), x);
}

// log sigmoid(x) = min(x, 0) - log(1 + e^-|x|): +0 - L for x >= 0 (so +0 where L rounds to 0, as torch's
// float64 logsigmoid), within 0.842 ulp of the exact value (logsigmoid(x) = -softplus(-x): the same steps)
template <class F>
inline typename F::reg logsigmoid_g(typename F::reg x) {
  return F::keep_nan(log1p_exp_neg_g<F, true>(F::abs(x), F::min(x, F::bc(0.0f))), x);
}

// tanh(x) in float32 by interval table (the avx-512 path, VecAVX512::wtanh1 in simd.h, and the portable
// one; the avx2 path keeps tanh_g above: a 32-entry lookup costs one vpermt2ps on 16 lanes, but four
// vpermps and three blends on 8). a = min(|x|, 16) picks slot s = (bits(max(a, pred(0.125))) >> 21) & 31
// (exponent and two mantissa bits: four intervals an octave over [0.125, 16), one slot below 0.125 and
// one for 16), t = a - ctr[s] (exact), tanh(a) = c0h + (t c1 + (c0l + t^2 (c2 + t (c3 + t (c4 + t (c5 +
// t c6)))))), with x's sign; csrc/tanh_table.h and tools/fit_tanh_table.py (the fit). no division: the
// pass runs at the speed of a copy on the xeon. within 0.568 ulp of the exact value over all 2^32 floats
// (bench/cpp/fewbit_exhaustive.cpp 7), 0.03% of them not the correctly rounded float; nan returns nan (t
// is nan), ±inf ±1 (a = 16: the constant slot), ±0 itself. every step is an ieee operation or an fma, in
// the same order as on 16 lanes, so both paths give the same bits
constexpr float kTanhTabLow = 0x1.fffffep-4f;  // the largest float below 0.125: its slot is the series at 0
constexpr float kTanhTabClamp = 16.0f;
inline float tanh_tab_f32(float x) {
  const float a = std::fabs(x);
  const float ac = kTanhTabClamp < a ? kTanhTabClamp : a;  // minps(16, a): a nan stays
  const float ai = ac > kTanhTabLow ? ac : kTanhTabLow;     // maxps(ac, low)
  uint32_t b;
  std::memcpy(&b, &ai, 4);
  const int s = static_cast<int>((b >> 21) & 31u);
  const float t = ac - kTanhTab[0][s];
  float r = kTanhTab[kTanhTabRows - 1][s];
  for (int k = kTanhTabRows - 2; k >= 4; --k) r = std::fmaf(r, t, kTanhTab[k][s]);
  const float lo = std::fmaf(t * t, r, kTanhTab[2][s]);
  const float v = kTanhTab[1][s] + std::fmaf(t, kTanhTab[3][s], lo);
  return std::copysign(v, x);
}
inline float softplus1_f32(float x, float threshold) { return softplus1_g<FScalar>(x, threshold); }
inline float logsigmoid_f32(float x) { return logsigmoid_g<FScalar>(x); }

}  // namespace
}  // namespace fmath
}  // namespace sparseops
