// the one place that knows the instruction set.
//
// kernels are templates over a vector type V with a fixed width of 8 fp32 lanes:
//   V::zero(), V::load(p), V::store(p, a), V::bcast(s), V::fma(a, b, c) = a*b+c,
//   V::add(a, b), V::sum(a) -> float, V::gather(base, idx[8]),
//   V::hsum8(a[8]) -> lane m holds the sum of a[m]'s lanes,
//   V::transpose8(a[8]) -> in place, a[j].lane[m] becomes a[m].lane[j] (an 8x8 block),
//   and for the few-bit codes: integer lanes (ireg), planes<BITS> (the code bit planes of x against
//   sorted borders), decode, lookup, and
//   loads/stores of bf16 and fp16 (the avx2 path needs f16c, checked with avx2 and fma).
// VecAVX2 is compiled only in translation units built with -mavx2 -mfma; VecPortable
// is plain C++ that any compiler vectorises for its baseline ISA. the choice between
// them is made at run time (see dispatch.cpp), never with -march=native.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "fmath.h"

#if defined(SPARSEOPS_AVX2) || defined(SPARSEOPS_AVX512)
#include <immintrin.h>
#endif

namespace sparseops {

// a count of the calls into each ISA's kernels (every entry point of the *_avx2 / *_portable objects
// notes its own), defined in dispatch.cpp and read by _C.isa_calls(): the tests check that a test run on
// the portable path ran the portable objects. A relaxed atomic add a call.
void note_isa_call(int isa) noexcept;
#define ISA_OF_portable 0
#define ISA_OF_avx2 1
#define ISA_OF_avx512 2
// internal linkage, as in the *_impl.h headers that include this: no -mavx2 copy of a VecPortable
// member (or any other inline function here) can stand in for the portable translation unit's own.
namespace {

// scalar conversions between float and the 16-bit float formats, bit-exact with torch's
// (round to nearest even; every nan becomes torch's canonical quiet nan for bf16). static: each
// translation unit keeps its own copy, so none compiled with -mavx2 serves the portable path.
static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }
static inline uint16_t f32_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  const uint32_t u = f32_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    // zero or subnormal: m * 2^-24 is exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
static inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (a >= 0x477ff000u) return sign | 0x7c00;  // 65520 and up round to inf
  if (a < 0x38800000u) {
    // below the smallest normal half: adding 0.5 puts the value where one float ulp is one
    // half subnormal ulp (2^-24), so the fpu does the round-to-nearest-even
    const float r = bits_f32(a) + 0.5f;
    return sign | static_cast<uint16_t>(f32_bits(r) - 0x3f000000u);
  }
  // rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even
  return sign | static_cast<uint16_t>((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13);
}

struct VecPortable {
  struct reg {
    float v[8];
  };
  static constexpr const char* name = "portable";
  static constexpr bool wide = false;  // no 16-lane operations (see VecAVX512)
  static constexpr int lanes = 8;
  static inline reg fold(const reg& a) { return a; }  // already 8 lanes (see VecAVX512::W16::fold)
  static inline reg zero() {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = 0.f;
    return r;
  }
  static inline reg load(const float* p) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  static inline void store(float* p, const reg& a) {
    for (int i = 0; i < 8; ++i) p[i] = a.v[i];
  }
  // a store that bypasses the caches, for a large output written once (p aligned to sizeof(reg)); then
  // stream_fence before the output is read. here a plain store
  static inline void stream(float* p, const reg& a) { store(p, a); }
  static inline void stream_fence() {}
  static inline reg bcast(float s) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = s;
    return r;
  }
  static inline reg fma(const reg& a, const reg& b, const reg& c) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static inline reg add(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static inline float sum(const reg& a) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a.v[i];
    return s;
  }
  static inline reg gather(const float* base, const int32_t* idx) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = base[idx[i]];
    return r;
  }
  // a * b + c on one float, as V::fma does it per lane (here two roundings, as the portable V::fma)
  static inline float fma1(float a, float b, float c) { return a * b + c; }
  // whether idx[0 .. len) all lie in [0, lim) and increase strictly (a CSR row the kernels may follow)
  static inline bool sorted_below(const int32_t* idx, int64_t len, uint32_t lim) {
    if (len <= 0) return true;
    uint32_t bad = static_cast<uint32_t>(idx[0]) >= lim;
    for (int64_t k = 1; k < len; ++k)
      bad |= static_cast<uint32_t>(static_cast<uint32_t>(idx[k]) >= lim) | static_cast<uint32_t>(idx[k] <= idx[k - 1]);
    return bad == 0;
  }
  static inline reg hsum8(const reg* a) {
    reg r;
    for (int m = 0; m < 8; ++m) {
      float s = 0.f;
      for (int i = 0; i < 8; ++i) s += a[m].v[i];
      r.v[m] = s;
    }
    return r;
  }
  static inline void transpose8(reg* a) {
    for (int j = 0; j < 8; ++j)
      for (int m = j + 1; m < 8; ++m) {
        const float t = a[j].v[m];
        a[j].v[m] = a[m].v[j];
        a[m].v[j] = t;
      }
  }

  // ---- few-bit codes (see fewbit_impl.h): integer lanes, bit planes, table lookups ----
  struct ireg {
    int32_t v[8];
  };
  static inline reg mul(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  // the piecewise-linear activations of the fused few-bit forward, with maxps/minps semantics: on a
  // tie (+0 vs -0) or a nan the second operand comes back, so x's nan and -0 pass through as torch's do
  static inline reg max2(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  static inline reg min2(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  // x > 0 ? x : x * s
  static inline reg leaky(const reg& x, const reg& s) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = x.v[i] > 0.0f ? x.v[i] : x.v[i] * s.v[i];
    return r;
  }
  static inline reg div(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] / b.v[i];
    return r;
  }
  // fmath.h's float32 tanh, softplus (beta 1) and logsigmoid, lane by lane
  template <int N>
  static inline void tanh_n(const reg* x, reg* y) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::tanh_tab_f32(x[h].v[i]);
  }
  template <int N>
  static inline void softplus1_n(const reg* x, reg* y, float threshold) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::softplus1_f32(x[h].v[i], threshold);
  }
  template <int N>
  static inline void logsigmoid_n(const reg* x, reg* y) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::logsigmoid_f32(x[h].v[i]);
  }
  static inline float lane0(const reg& v) { return v.v[0]; }
  // the float64 family of fmath.h, lane by lane (N vectors: the avx2 path's interface)
  template <int N>
  static inline void elu_n(const reg* x, reg* y, double neg, double pos) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::elu_f32(x[h].v[i], neg, pos);
  }
  template <int N>
  static inline void celu_n(const reg* x, reg* y, double alpha, double inv) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::celu_f32(x[h].v[i], alpha, inv);
  }
  template <int N>
  static inline void softplus_n(const reg* x, reg* y, double beta, double threshold, double inv) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::softplus_f32(x[h].v[i], beta, threshold, inv);
  }
  // sigmoid in float32 (fmath.h), on 8 lanes and on one element
  static inline reg sigmoid_f(const reg& x) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = fmath::sigmoid_f32(x.v[i]);
    return r;
  }
  static inline float sigmoid1(float x) { return fmath::sigmoid_f32(x); }
  // silu in float32 (fmath.h), lane by lane
  static inline float silu1(float x) { return fmath::silu_f32(x); }
  template <int N>
  static inline void silu_n(const reg* x, reg* y) {
    for (int h = 0; h < N; ++h)
      for (int i = 0; i < 8; ++i) y[h].v[i] = fmath::silu_f32(x[h].v[i]);
  }
  template <int N>
  static inline void sigmoid_n(const reg* x, reg* y) {
    for (int h = 0; h < N; ++h) y[h] = sigmoid_f(x[h]);
  }
  // lane i: how many of the nb borders x.v[i] exceeds (false for nan)
  static inline ireg count_gt(const reg& x, const reg* b, int nb) {
    ireg c;
    for (int i = 0; i < 8; ++i) {
      int32_t n = 0;
      for (int k = 0; k < nb; ++k) n += x.v[i] > b[k].v[i];
      c.v[i] = n;
    }
    return c;
  }
  // bit i of the result is bit j of lane i
  static inline uint32_t bitplane(const ireg& c, int j) {
    uint32_t m = 0;
    for (int i = 0; i < 8; ++i) m |= ((static_cast<uint32_t>(c.v[i]) >> j) & 1u) << i;
    return m;
  }
  // the 2^BITS - 1 sorted borders of a few-bit table, in the form planes() reads them
  template <int BITS>
  struct Borders {
    reg b[(1 << BITS) - 1];
    explicit Borders(const float* f) {
      for (int k = 0; k < (1 << BITS) - 1; ++k) b[k] = bcast(f[k]);
    }
  };
  // m[j] = bit plane j of the codes of x's 8 lanes: the code of a lane is the number of borders it
  // exceeds (borders sorted non-decreasing; nan exceeds none)
  template <int BITS>
  static inline void planes(const reg& x, const Borders<BITS>& t, uint32_t* m) {
    const ireg c = count_gt(x, t.b, (1 << BITS) - 1);
    for (int j = 0; j < BITS; ++j) m[j] = bitplane(c, j);
  }
  // lane i: sum_j bit (shift + i) of w[j], shifted to bit j
  template <int BITS>
  static inline ireg decode(const uint32_t* w, int shift) {
    ireg c;
    for (int i = 0; i < 8; ++i) {
      int32_t n = 0;
      for (int j = 0; j < BITS; ++j) n |= static_cast<int32_t>((w[j] >> (shift + i)) & 1u) << j;
      c.v[i] = n;
    }
    return c;
  }
  // lane i: levels[c.v[i]], with lv[0] = levels[0..8) and lv[1] = levels[8..16); c < 2^BITS <= 16
  template <int BITS>
  static inline reg lookup(const reg* lv, const ireg& c) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = lv[c.v[i] >> 3].v[c.v[i] & 7];
    return r;
  }

  // ---- N:M positions (see nm_impl.h) ----
  // lane i: nibble i of w, plus off.v[i]
  static inline ireg nib8(uint32_t w, const ireg& off) {
    ireg c;
    for (int i = 0; i < 8; ++i) c.v[i] = static_cast<int32_t>((w >> (4 * i)) & 15u) + off.v[i];
    return c;
  }
  // lane i: w >> (4 * i), the higher nibbles left in (for permil, which reads the low 2 bits)
  static inline ireg shr4x8(uint32_t w) {
    ireg c;
    for (int i = 0; i < 8; ++i) c.v[i] = static_cast<int32_t>(w >> (4 * i));
    return c;
  }
  static inline ireg iload(const int32_t* p) {
    ireg c;
    for (int i = 0; i < 8; ++i) c.v[i] = p[i];
    return c;
  }
  static inline void istore(int32_t* p, const ireg& a) {
    for (int i = 0; i < 8; ++i) p[i] = a.v[i];
  }
  static inline ireg ibcast(int32_t b) {
    ireg c;
    for (int i = 0; i < 8; ++i) c.v[i] = b;
    return c;
  }
  static inline ireg iadd(const ireg& a, const ireg& b) {
    ireg c;
    for (int i = 0; i < 8; ++i) c.v[i] = a.v[i] + b.v[i];
    return c;
  }
  // lane i: a.v[4 * (i / 4) + (c.v[i] & 3)] (a permute within each 128-bit half)
  static inline reg permil(const reg& a, const ireg& c) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[4 * (i / 4) + (c.v[i] & 3)];
    return r;
  }
  // lanes 0, 1, 4, 5 from a, lanes 2, 3, 6, 7 from b
  static inline reg blend_cc(const reg& a, const reg& b) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = (i & 2) ? b.v[i] : a.v[i];
    return r;
  }
  // lane i: x[c.v[i]] from NW loaded registers x[0..8*NW), c < 8 * NW (NW = 2 or 4)
  template <int NW>
  static inline reg select(const reg* x, const ireg& c) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = x[c.v[i] >> 3].v[c.v[i] & 7];
    return r;
  }
  static inline reg load_bf16(const uint16_t* p) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = bf16_to_f32(p[i]);
    return r;
  }
  static inline void store_bf16(uint16_t* p, const reg& a) {
    for (int i = 0; i < 8; ++i) p[i] = f32_to_bf16(a.v[i]);
  }
  static inline reg load_f16(const uint16_t* p) {
    reg r;
    for (int i = 0; i < 8; ++i) r.v[i] = f16_to_f32(p[i]);
    return r;
  }
  static inline void store_f16(uint16_t* p, const reg& a) {
    for (int i = 0; i < 8; ++i) p[i] = f32_to_f16(a.v[i]);
  }
};

#if defined(SPARSEOPS_AVX2)
struct VecAVX2 {
  using reg = __m256;
  static constexpr const char* name = "avx2";
  static constexpr bool wide = false;
  static constexpr int lanes = 8;
  static inline reg fold(reg a) { return a; }  // already 8 lanes (see VecAVX512::W16::fold)
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static inline void stream(float* p, reg a) { _mm256_stream_ps(p, a); }  // p 32-byte aligned
  static inline void stream_fence() { _mm_sfence(); }
  static inline reg bcast(float s) { return _mm256_set1_ps(s); }
  static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static inline float sum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline reg gather(const float* base, const int32_t* idx) {
    return _mm256_i32gather_ps(base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  }
  // one fused multiply-add, explicitly: left to the compiler, a * b + c in this -mfma unit may or may not
  // be contracted, differently in two instantiations of the same template
  static inline float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
  }
  // VecPortable::sorted_below, 8 indices a step: v < lim unsigned is (v ^ INT_MIN) < (lim ^ INT_MIN) signed,
  // and every index is compared with its predecessor (one unaligned load back; both already range-checked)
  static inline bool sorted_below(const int32_t* idx, int64_t len, uint32_t lim) {
    if (len <= 0) return true;
    uint32_t bad = static_cast<uint32_t>(idx[0]) >= lim;
    const __m256i flip = _mm256_set1_epi32(INT32_MIN);
    const __m256i limf = _mm256_set1_epi32(static_cast<int32_t>(lim ^ 0x80000000u));
    __m256i ok = _mm256_set1_epi32(-1);
    int64_t k = 1;
    for (; k + 8 <= len; k += 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k));
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + k - 1));
      ok = _mm256_and_si256(ok, _mm256_and_si256(_mm256_cmpgt_epi32(limf, _mm256_xor_si256(v, flip)),
                                                 _mm256_cmpgt_epi32(v, p)));
    }
    for (; k < len; ++k)
      bad |= static_cast<uint32_t>(static_cast<uint32_t>(idx[k]) >= lim) | static_cast<uint32_t>(idx[k] <= idx[k - 1]);
    return bad == 0 && _mm256_movemask_epi8(ok) == -1;
  }
  static inline reg hsum8(const reg* a) {
    // pairwise hadd tree: 8 vectors -> one vector of their 8 sums
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
    __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
    __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23);
    __m256 s4567 = _mm256_hadd_ps(s45, s67);
    // each 128-bit half holds partial sums; combine the halves
    __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
  }
  static inline void transpose8(reg* a) {
    // 2x2 float blocks (unpack), then 4x4 (shuffle), then swap the 128-bit halves
    const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
    const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
    const __m256 t4 = _mm256_unpacklo_ps(a[4], a[5]), t5 = _mm256_unpackhi_ps(a[4], a[5]);
    const __m256 t6 = _mm256_unpacklo_ps(a[6], a[7]), t7 = _mm256_unpackhi_ps(a[6], a[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    a[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    a[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    a[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    a[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    a[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    a[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    a[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    a[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
  }

  // ---- few-bit codes (see VecPortable for the meaning of each) ----
  using ireg = __m256i;
  static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static inline reg max2(reg a, reg b) { return _mm256_max_ps(a, b); }
  static inline reg min2(reg a, reg b) { return _mm256_min_ps(a, b); }
  static inline reg leaky(reg x, reg s) {
    return _mm256_blendv_ps(_mm256_mul_ps(x, s), x, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
  }
  static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  // fmath.h's steps on M vectors of 4 doubles at once (e^y = s * (1 + p), s = 2^k), with the series
  // by estrin's scheme: the chains of dependent fmas are 5 long instead of 13, and the halves of the
  // float vectors run side by side
  // NOTE: ~2.1 ns an element a thread (a float64 tanh, one vector at a time) with or without the division and
  // with horner instead of estrin. a float64 sigmoid by the same steps (1 / (1 + e^-x)) took as long,
  // twice torch's float32 one, so sigmoid has a float32 path; the float64 family fused this way is
  // the one whose torch forwards are slower (elu, softplus; tanh and logsigmoid went float32 later, 2026-11-24)
  template <int M, int SHIFT = 0>
  static inline void exp_parts_m(const __m256d* y, __m256d* s, __m256d* p) {
    __m256d r[M], r2[M], r4[M], a[M][6];
    for (int h = 0; h < M; ++h) {
      const __m256d k = _mm256_round_pd(_mm256_mul_pd(y[h], _mm256_set1_pd(fmath::kInvLn2)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r[h] = _mm256_fnmadd_pd(k, _mm256_set1_pd(fmath::kLn2Lo), _mm256_fnmadd_pd(k, _mm256_set1_pd(fmath::kLn2Hi), y[h]));
      const __m256i e = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)), _mm256_set1_epi64x(1023 + SHIFT));
      s[h] = _mm256_castsi256_pd(_mm256_slli_epi64(e, 52));
    }
    for (int h = 0; h < M; ++h) {
      r2[h] = _mm256_mul_pd(r[h], r[h]);
      for (int j = 0; j < 6; ++j)
        a[h][j] = _mm256_fmadd_pd(_mm256_set1_pd(fmath::kInvFact[2 * j + 1]), r[h], _mm256_set1_pd(fmath::kInvFact[2 * j]));
    }
    for (int h = 0; h < M; ++h) {
      r4[h] = _mm256_mul_pd(r2[h], r2[h]);
      a[h][0] = _mm256_fmadd_pd(a[h][1], r2[h], a[h][0]);
      a[h][2] = _mm256_fmadd_pd(a[h][3], r2[h], a[h][2]);
      a[h][4] = _mm256_fmadd_pd(a[h][5], r2[h], a[h][4]);
    }
    for (int h = 0; h < M; ++h) {
      const __m256d q = _mm256_fmadd_pd(_mm256_fmadd_pd(a[h][4], r4[h], a[h][2]), r4[h], a[h][0]);
      p[h] = _mm256_fmadd_pd(r2[h], q, r[h]);
    }
  }
  static inline void split(reg v, __m256d* d) {
    d[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    d[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  }
  static inline reg join(const __m256d* d) { return _mm256_set_m128(_mm256_cvtpd_ps(d[1]), _mm256_cvtpd_ps(d[0])); }
  static inline reg keep_nan(reg v, reg x) { return _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
  // fmath.h's lane type on 8 floats: tanh_g, softplus1_g and logsigmoid_g run on it
  struct F8 {
    using reg = __m256;
    using mask = __m256;
    static inline reg bc(float v) { return _mm256_set1_ps(v); }
    static inline reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
    static inline reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
    static inline reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
    static inline reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
    static inline reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    static inline reg fnma(reg a, reg b, reg c) { return _mm256_fnmadd_ps(a, b, c); }
    static inline reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
    static inline reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
    static inline reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
    static inline reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    template <int SHIFT>
    static inline reg pow2(reg k) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127 + SHIFT)), 23));
    }
    static inline mask gt(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
    static inline mask ge(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
    static inline reg sel(mask m, reg t, reg f) { return _mm256_blendv_ps(f, t, m); }
    static inline reg with_sign(reg v, reg x) { return _mm256_or_ps(v, _mm256_and_ps(x, _mm256_set1_ps(-0.0f))); }
    static inline reg keep_nan(reg v, reg x) { return VecAVX2::keep_nan(v, x); }
  };
  template <int N>
  static inline void tanh_n(const reg* x, reg* y) {
    for (int h = 0; h < N; ++h) y[h] = fmath::tanh_g<F8>(x[h]);
  }
  template <int N>
  static inline void softplus1_n(const reg* x, reg* y, float threshold) {
    for (int h = 0; h < N; ++h) y[h] = fmath::softplus1_g<F8>(x[h], _mm256_set1_ps(threshold));
  }
  template <int N>
  static inline void logsigmoid_n(const reg* x, reg* y) {
    for (int h = 0; h < N; ++h) y[h] = fmath::logsigmoid_g<F8>(x[h]);
  }
  static inline float lane0(reg v) { return _mm256_cvtss_f32(v); }
  // the float64 functions below run on N float vectors at once (2N vectors of 4 doubles, each step over
  // all of them before the next): softplus's chains of dependent steps (the series,
  // the divisions) are long, and one vector at a time left the pipes waiting on them; fewbit_impl.h's
  // fused_n picks N per function
  // fmath.h's float64 family (e^y by exp_parts_m, log(1 + t) by log1p01's series, with fmas)
  template <int M>
  static inline void log1p01_m(const __m256d* t, __m256d* out) {
    __m256d big[M], s[M];
    for (int h = 0; h < M; ++h) {
      big[h] = _mm256_cmp_pd(t[h], _mm256_set1_pd(fmath::kSqrt2m1), _CMP_GT_OQ);
      const __m256d f = _mm256_blendv_pd(
          t[h], _mm256_mul_pd(_mm256_sub_pd(t[h], _mm256_set1_pd(1.0)), _mm256_set1_pd(0.5)), big[h]);
      s[h] = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
    }
    for (int h = 0; h < M; ++h) {
      const __m256d z = _mm256_mul_pd(s[h], s[h]), z2 = _mm256_mul_pd(z, z), s2 = _mm256_add_pd(s[h], s[h]);
      // the series in z by estrin's scheme (pairs, then pairs of pairs)
      __m256d c[4];
      for (int j = 0; j < 4; ++j)
        c[j] = _mm256_fmadd_pd(_mm256_set1_pd(fmath::kAtanhC[2 * j + 1]), z, _mm256_set1_pd(fmath::kAtanhC[2 * j]));
      const __m256d z4 = _mm256_mul_pd(z2, z2);
      const __m256d lo = _mm256_fmadd_pd(c[1], z2, c[0]), hi = _mm256_fmadd_pd(c[3], z2, c[2]);
      const __m256d q = _mm256_fmadd_pd(_mm256_fmadd_pd(_mm256_set1_pd(fmath::kAtanhC[8]), z4, hi), z4, lo);
      const __m256d r = _mm256_fmadd_pd(_mm256_mul_pd(s2, z), q, s2);
      out[h] = _mm256_add_pd(r, _mm256_and_pd(big[h], _mm256_set1_pd(fmath::kLn2)));
    }
  }
  // e^-|d| with |d| clamped to 746 (a nan in d clamps too: minpd gives its second operand), as exp_d
  template <int M>
  static inline void exp_neg_abs_m(const __m256d* d, __m256d* t) {
    __m256d y[M], s[M], p[M];
    for (int h = 0; h < M; ++h)
      y[h] = _mm256_sub_pd(_mm256_setzero_pd(),
                           _mm256_min_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), d[h]), _mm256_set1_pd(fmath::kExpZero)));
    exp_parts_m<M, 64>(y, s, p);
    for (int h = 0; h < M; ++h) t[h] = _mm256_mul_pd(_mm256_fmadd_pd(s[h], p[h], s[h]), _mm256_set1_pd(0x1p-64));
  }
  // e^y - 1 for y clamped to [-700, 0]
  template <int M>
  static inline void expm1_neg_m(const __m256d* d, __m256d* e) {
    __m256d y[M], s[M], p[M];
    for (int h = 0; h < M; ++h)
      y[h] = _mm256_max_pd(_mm256_min_pd(d[h], _mm256_setzero_pd()), _mm256_set1_pd(-fmath::kExpClamp));
    exp_parts_m<M>(y, s, p);
    for (int h = 0; h < M; ++h) e[h] = _mm256_fmadd_pd(s[h], p[h], _mm256_sub_pd(s[h], _mm256_set1_pd(1.0)));
  }
  template <int N>
  static inline void elu_n(const reg* x, reg* out, double neg, double pos) {
    __m256d d[2 * N], e[2 * N], v[2 * N];
    for (int q = 0; q < N; ++q) split(x[q], d + 2 * q);
    expm1_neg_m<2 * N>(d, e);
    for (int h = 0; h < 2 * N; ++h)
      v[h] = _mm256_blendv_pd(_mm256_mul_pd(_mm256_set1_pd(neg), e[h]), _mm256_mul_pd(d[h], _mm256_set1_pd(pos)),
                              _mm256_cmp_pd(d[h], _mm256_setzero_pd(), _CMP_GE_OQ));
    for (int q = 0; q < N; ++q) out[q] = keep_nan(join(v + 2 * q), x[q]);
  }
  template <int N>
  static inline void celu_n(const reg* x, reg* out, double alpha, double inv) {
    __m256d d[2 * N], e[2 * N];
    for (int q = 0; q < N; ++q) split(x[q], d + 2 * q);
    for (int h = 0; h < 2 * N; ++h) d[h] = _mm256_mul_pd(d[h], _mm256_set1_pd(inv));
    expm1_neg_m<2 * N>(d, e);
    for (int h = 0; h < 2 * N; ++h) e[h] = _mm256_mul_pd(_mm256_set1_pd(alpha), e[h]);
    for (int q = 0; q < N; ++q)
      out[q] = keep_nan(_mm256_blendv_ps(join(e + 2 * q), x[q], _mm256_cmp_ps(x[q], _mm256_setzero_ps(), _CMP_GE_OQ)), x[q]);
  }
  template <int N>
  static inline void softplus_n(const reg* x, reg* out, double beta, double threshold, double inv) {
    __m256d xb[2 * N], t[2 * N], l[2 * N];
    for (int q = 0; q < N; ++q) split(x[q], xb + 2 * q);
    for (int h = 0; h < 2 * N; ++h) xb[h] = _mm256_mul_pd(xb[h], _mm256_set1_pd(beta));
    exp_neg_abs_m<2 * N>(xb, t);
    log1p01_m<2 * N>(t, l);
    for (int q = 0; q < N; ++q) {
      __m256d v[2];
      for (int h = 0; h < 2; ++h)
        v[h] = _mm256_mul_pd(_mm256_add_pd(_mm256_max_pd(xb[2 * q + h], _mm256_setzero_pd()), l[2 * q + h]),
                             _mm256_set1_pd(inv));
      // where x beta > threshold, torch's test in float32: x itself
      const __m256 above = _mm256_cmp_ps(_mm256_mul_ps(x[q], _mm256_set1_ps(static_cast<float>(beta))),
                                         _mm256_set1_ps(static_cast<float>(threshold)), _CMP_GT_OQ);
      out[q] = keep_nan(_mm256_blendv_ps(join(v), x[q], above), x[q]);
    }
  }
  // fmath.h's sigmoid_f32, step for step (fnmadd(a, b, c) is fma(-a, b, c), one rounding), so the
  // two isas agree bit for bit; on N vectors at once, each step over all N before the next
  // NOTE: throughput-bound (~36 instructions a vector, 19 of them on the two fma pipes); N = 4
  // side by side took 0.73 ns an element a thread against 0.92 for one at a time (in L2)
  // fmath.h's exp_parts_f on N vectors, each step over all N before the next: p and s = 2^(k + SHIFT)
  template <int N, int SHIFT>
  static inline void exp_parts_f_n(const __m256* t, __m256* p, __m256* s) {
    __m256 k[N], r[N], q[N];
    for (int h = 0; h < N; ++h)
      k[h] = _mm256_round_ps(_mm256_mul_ps(t[h], _mm256_set1_ps(fmath::kSigLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    for (int h = 0; h < N; ++h)
      r[h] = _mm256_fnmadd_ps(k[h], _mm256_set1_ps(fmath::kSigLn2Lo),
                              _mm256_fnmadd_ps(k[h], _mm256_set1_ps(fmath::kSigLn2Hi), t[h]));
    for (int h = 0; h < N; ++h) q[h] = _mm256_set1_ps(fmath::kSigInvFact[5]);
    for (int i = 4; i >= 0; --i)
      for (int h = 0; h < N; ++h) q[h] = _mm256_fmadd_ps(q[h], r[h], _mm256_set1_ps(fmath::kSigInvFact[i]));
    for (int h = 0; h < N; ++h) {
      p[h] = _mm256_fmadd_ps(_mm256_mul_ps(r[h], r[h]), q[h], r[h]);
      s[h] = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k[h]), _mm256_set1_epi32(127 + SHIFT)), 23));
    }
  }
  template <int N>
  static inline void sigmoid_n(const reg* x, reg* y) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    __m256 t[N], p[N], s[N];
    // minps gives its second operand for a nan: the clamp, replaced by x's nan at the end
    for (int h = 0; h < N; ++h)
      t[h] = _mm256_xor_ps(_mm256_min_ps(_mm256_andnot_ps(sign, x[h]), _mm256_set1_ps(fmath::kSigClamp)), sign);
    exp_parts_f_n<N, 32>(t, p, s);
    for (int h = 0; h < N; ++h) {
      const __m256 e = _mm256_mul_ps(_mm256_fmadd_ps(s[h], p[h], s[h]), _mm256_set1_ps(0x1p-32f));
      const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x[h], _mm256_setzero_ps(), _CMP_GT_OQ));
      y[h] = keep_nan(_mm256_div_ps(num, _mm256_add_ps(one, e)), x[h]);
    }
  }
  // fmath.h's silu_f32, step for step (the avx2 twin of the portable path, bit for bit): sigmoid_n's
  // exponential scaled by 2^64 in the numerator x * es, one division, the quotient scaled back for x < 0
  template <int N>
  static inline void silu_n(const reg* x, reg* y) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m256 clamp = _mm256_set1_ps(fmath::kSiluClamp), scale = _mm256_set1_ps(0x1p-64f);
    const __m256 nclamp = _mm256_set1_ps(-fmath::kSiluClamp);
    __m256 t[N], p[N], s[N];
    // minps gives its second operand for a nan: the clamp; x's nan reaches the quotient through num
    for (int h = 0; h < N; ++h) t[h] = _mm256_xor_ps(_mm256_min_ps(_mm256_andnot_ps(sign, x[h]), clamp), sign);
    exp_parts_f_n<N, 64>(t, p, s);
    for (int h = 0; h < N; ++h) {
      const __m256 es = _mm256_fmadd_ps(s[h], p[h], s[h]);
      const __m256 d = _mm256_fmadd_ps(es, scale, one);
      const __m256 neg = _mm256_cmp_ps(x[h], zero, _CMP_LT_OQ);
      __m256 v = _mm256_div_ps(_mm256_blendv_ps(x[h], _mm256_mul_ps(x[h], es), neg), d);
      v = _mm256_blendv_ps(v, _mm256_mul_ps(v, scale), neg);
      y[h] = _mm256_blendv_ps(v, sign, _mm256_cmp_ps(x[h], nclamp, _CMP_LE_OQ));
    }
  }
  static inline float silu1(float x) {
    reg v = _mm256_set1_ps(x), y;
    silu_n<1>(&v, &y);
    return _mm256_cvtss_f32(y);
  }
  static inline reg sigmoid_f(reg x) {
    reg y;
    sigmoid_n<1>(&x, &y);
    return y;
  }
  // one element by the vector steps: no scalar copy of them in this -mfma translation unit, whose
  // contraction could differ from the portable one
  static inline float sigmoid1(float x) { return _mm256_cvtss_f32(sigmoid_f(_mm256_set1_ps(x))); }
  // the codes by a binary search over the sorted borders: the compare at depth d is bit BITS-1-d of
  // the code, made against the border the higher bits picked; its movemask is that bit plane. the
  // candidates of a depth (at most 8) sit in one register, picked by a permute on the bits so far:
  // BITS compares instead of 2^BITS - 1, and BITS registers instead of 2^BITS - 1 broadcasts
  // NOTE: a blend tree over broadcast borders was slower at 4 bits than the compare chain (it spilled)
  template <int BITS>
  struct Borders {
    __m256 cand[BITS];
    explicit Borders(const float* f) {
      for (int d = 0; d < BITS; ++d) {
        alignas(32) float t[8] = {};
        const int span = 1 << (BITS - d);
        for (int j = 0; j < (1 << d); ++j) t[j] = f[j * span + span / 2 - 1];
        cand[d] = d == 0 ? _mm256_set1_ps(t[0]) : _mm256_load_ps(t);
      }
    }
  };
  template <int BITS>
  static inline void planes(reg x, const Borders<BITS>& t, uint32_t* m) {
    __m256i prefix = _mm256_setzero_si256();
    for (int d = 0; d < BITS; ++d) {
      const __m256 border = d == 0 ? t.cand[0] : _mm256_permutevar8x32_ps(t.cand[d], prefix);
      const __m256 gt = _mm256_cmp_ps(x, border, _CMP_GT_OQ);
      m[BITS - 1 - d] = static_cast<uint32_t>(_mm256_movemask_ps(gt));
      prefix = _mm256_or_si256(_mm256_slli_epi32(prefix, 1), _mm256_srli_epi32(_mm256_castps_si256(gt), 31));
    }
  }
  template <int BITS>
  static inline ireg decode(const uint32_t* w, int shift) {
    const __m256i sh = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(shift));
    const __m256i one = _mm256_set1_epi32(1);
    __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[0])), sh), one);
    for (int j = 1; j < BITS; ++j) {
      const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[j])), sh), one);
      c = _mm256_or_si256(c, _mm256_sllv_epi32(bit, _mm256_set1_epi32(j)));
    }
    return c;
  }
  template <int BITS>
  static inline reg lookup(const reg* lv, ireg c) {
    const __m256 lo = _mm256_permutevar8x32_ps(lv[0], c);
    if (BITS <= 3) return lo;
    // bit 3 of the code picks the upper table; blendv reads the sign bit
    const __m256 hi = _mm256_permutevar8x32_ps(lv[1], c);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  }

  // ---- N:M positions (see VecPortable for the meaning of each) ----
  static inline ireg nib8(uint32_t w, ireg off) {
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), sh), _mm256_set1_epi32(15));
    return _mm256_add_epi32(c, off);
  }
  static inline ireg shr4x8(uint32_t w) {
    return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  }
  static inline ireg iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline void istore(int32_t* p, ireg a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
  static inline ireg ibcast(int32_t b) { return _mm256_set1_epi32(b); }
  static inline ireg iadd(ireg a, ireg b) { return _mm256_add_epi32(a, b); }
  static inline reg permil(reg a, ireg c) { return _mm256_permutevar_ps(a, c); }
  static inline reg blend_cc(reg a, reg b) { return _mm256_blend_ps(a, b, 0xCC); }
  template <int NW>
  static inline reg select(const reg* x, ireg c) {
    // vpermps reads the low 3 bits; blendv picks by the sign bit of bit 3 (then bit 4) moved up
    const __m256 m3 = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));
    const __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(x[0], c), _mm256_permutevar8x32_ps(x[1], c), m3);
    if (NW == 2) return lo;
    const __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(x[2], c), _mm256_permutevar8x32_ps(x[3], c), m3);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 27)));
  }
  static inline reg load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  static inline void store_bf16(uint16_t* p, reg a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // 32 -> 16 bits: packus works per 128-bit half, permute4x64 puts the two halves together
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static inline reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store_f16(uint16_t* p, reg a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#endif

#if defined(SPARSEOPS_AVX512)
// every 8-lane operation of VecAVX2 (in this -mavx512f -mavx512vl unit the compiler may encode them with
// EVEX and use 32 registers), plus 16-lane ones (w*) for the hot loops of the blocked walks (rows_tile,
// sdd_tiles_lanes in csr_impl.h, and the activation-sparse strips): there one zmm load feeds 16 FMA lanes, where the AVX2 path's ymm feeds 8, and
// the loads, not the FMAs, bound those loops. the packed layout is the 8-lane one: a tile of BT = 8*NV
// lanes with NV even is NV/2 zmm vectors.
struct VecAVX512 : VecAVX2 {
  static constexpr const char* name = "avx512";
  static constexpr bool wide = true;
  using wreg = __m512;
  static inline wreg wzero() { return _mm512_setzero_ps(); }
  static inline wreg wload(const float* p) { return _mm512_loadu_ps(p); }
  static inline void wstore(float* p, wreg a) { _mm512_storeu_ps(p, a); }
  static inline wreg wbcast(float s) { return _mm512_set1_ps(s); }
  static inline wreg wfma(wreg a, wreg b, wreg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline wreg wadd(wreg a, wreg b) { return _mm512_add_ps(a, b); }
  // the 16-lane operations under the 8-lane names, for the loops written once over a lane type
  // (rows_tile_lanes, sdd_tiles_lanes, spmm_chunk_lanes, sddmm_chunk_lanes, sddmm_group_lanes, bwd_group)
  struct W16 {
    using reg = __m512;
    static constexpr int lanes = 16;
    static inline reg zero() { return wzero(); }
    static inline reg load(const float* p) { return wload(p); }
    static inline void store(float* p, reg a) { wstore(p, a); }
    static inline void stream(float* p, reg a) { _mm512_stream_ps(p, a); }  // p 64-byte aligned
    static inline reg bcast(float s) { return wbcast(s); }
    static inline reg fma(reg a, reg b, reg c) { return wfma(a, b, c); }
    static inline reg add(reg a, reg b) { return wadd(a, b); }
    static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
    // the few-bit kernels' fused forwards (fewbit_impl.h's fused<>, on 16 lanes): the same operations as
    // VecAVX2's, so the same bits, nan and -0 included (max/min return the second operand on a nan)
    static inline reg max2(reg a, reg b) { return _mm512_max_ps(a, b); }
    static inline reg min2(reg a, reg b) { return _mm512_min_ps(a, b); }
    static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
    static inline reg leaky(reg x, reg s) {
      return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_mul_ps(x, s), x);
    }
    // 8 lanes for VecAVX2::hsum8: lane l of the result is lanes l and l + 8 of a, added
    static inline VecAVX2::reg fold(reg a) {
      return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_castps512_ps256(_mm512_shuffle_f32x4(a, a, 0xEE)));
    }
  };

  // ---- sigmoid and silu on 16 lanes: VecAVX2's sigmoid_n / silu_n (fmath.h's steps), instruction for
  // instruction on 512-bit vectors, so the same bits; the few-bit pass's wide path runs them ----
  // (andnot and xor through the integer forms: the float ones are AVX512DQ, which the build does not ask for)
  static inline __m512 wabs(__m512 x) { return _mm512_abs_ps(x); }
  static inline __m512 wneg(__m512 x) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  }
  static inline __m512 wkeep_nan(__m512 v, __m512 x) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), v, x); }
  template <int N, int SHIFT>
  static inline void wexp_parts_f_n(const __m512* t, __m512* p, __m512* s) {
    __m512 k[N], r[N], q[N];
    for (int h = 0; h < N; ++h)
      k[h] = _mm512_roundscale_ps(_mm512_mul_ps(t[h], _mm512_set1_ps(fmath::kSigLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    for (int h = 0; h < N; ++h)
      r[h] = _mm512_fnmadd_ps(k[h], _mm512_set1_ps(fmath::kSigLn2Lo),
                              _mm512_fnmadd_ps(k[h], _mm512_set1_ps(fmath::kSigLn2Hi), t[h]));
    for (int h = 0; h < N; ++h) q[h] = _mm512_set1_ps(fmath::kSigInvFact[5]);
    for (int i = 4; i >= 0; --i)
      for (int h = 0; h < N; ++h) q[h] = _mm512_fmadd_ps(q[h], r[h], _mm512_set1_ps(fmath::kSigInvFact[i]));
    for (int h = 0; h < N; ++h) {
      p[h] = _mm512_fmadd_ps(_mm512_mul_ps(r[h], r[h]), q[h], r[h]);
      s[h] = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k[h]), _mm512_set1_epi32(127 + SHIFT)), 23));
    }
  }
  template <int N>
  static inline void wsigmoid_n(const __m512* x, __m512* y) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 t[N], p[N], s[N];
    for (int h = 0; h < N; ++h) t[h] = wneg(_mm512_min_ps(wabs(x[h]), _mm512_set1_ps(fmath::kSigClamp)));
    wexp_parts_f_n<N, 32>(t, p, s);
    for (int h = 0; h < N; ++h) {
      const __m512 e = _mm512_mul_ps(_mm512_fmadd_ps(s[h], p[h], s[h]), _mm512_set1_ps(0x1p-32f));
      const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x[h], _mm512_setzero_ps(), _CMP_GT_OQ), e, one);
      y[h] = wkeep_nan(_mm512_div_ps(num, _mm512_add_ps(one, e)), x[h]);
    }
  }
  template <int N>
  static inline void wsilu_n(const __m512* x, __m512* y) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps(), clamp = _mm512_set1_ps(fmath::kSiluClamp);
    const __m512 scale = _mm512_set1_ps(0x1p-64f);
    __m512 t[N], p[N], s[N];
    for (int h = 0; h < N; ++h) t[h] = wneg(_mm512_min_ps(wabs(x[h]), clamp));
    wexp_parts_f_n<N, 64>(t, p, s);
    for (int h = 0; h < N; ++h) {
      const __m512 es = _mm512_fmadd_ps(s[h], p[h], s[h]);
      const __m512 d = _mm512_fmadd_ps(es, scale, one);
      const __mmask16 neg = _mm512_cmp_ps_mask(x[h], zero, _CMP_LT_OQ);
      const __m512 num = _mm512_mask_mul_ps(x[h], neg, x[h], es);
      __m512 v = _mm512_div_ps(num, d);
      v = _mm512_mask_mul_ps(v, neg, v, scale);
      const __mmask16 big = _mm512_cmp_ps_mask(x[h], _mm512_set1_ps(-fmath::kSiluClamp), _CMP_LE_OQ);
      y[h] = _mm512_mask_mov_ps(v, big, _mm512_set1_ps(-0.0f));
    }
  }

  // ---- the float64 family on 16 float lanes (two vectors of 8 doubles each): VecAVX2's elu_n, celu_n
  // and softplus_n (fmath.h's steps), instruction for instruction, so the same
  // bits; the blends take compare masks, and the float and/or/andnot go through the integer or abs forms
  // (their float forms are AVX512DQ) ----
  static inline void wsplit(__m512 v, __m512d* d) {
    d[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    d[1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static inline __m512 wjoin(const __m512d* d) {
    const __m256 lo = _mm512_cvtpd_ps(d[0]), hi = _mm512_cvtpd_ps(d[1]);
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
  }
  template <int M, int SHIFT = 0>
  static inline void wexp_parts_m(const __m512d* y, __m512d* s, __m512d* p) {
    __m512d r[M], r2[M], r4[M], a[M][6];
    for (int h = 0; h < M; ++h) {
      const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(y[h], _mm512_set1_pd(fmath::kInvLn2)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r[h] = _mm512_fnmadd_pd(k, _mm512_set1_pd(fmath::kLn2Lo), _mm512_fnmadd_pd(k, _mm512_set1_pd(fmath::kLn2Hi), y[h]));
      const __m512i e = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_cvtpd_epi32(k)), _mm512_set1_epi64(1023 + SHIFT));
      s[h] = _mm512_castsi512_pd(_mm512_slli_epi64(e, 52));
    }
    for (int h = 0; h < M; ++h) {
      r2[h] = _mm512_mul_pd(r[h], r[h]);
      for (int j = 0; j < 6; ++j)
        a[h][j] = _mm512_fmadd_pd(_mm512_set1_pd(fmath::kInvFact[2 * j + 1]), r[h], _mm512_set1_pd(fmath::kInvFact[2 * j]));
    }
    for (int h = 0; h < M; ++h) {
      r4[h] = _mm512_mul_pd(r2[h], r2[h]);
      a[h][0] = _mm512_fmadd_pd(a[h][1], r2[h], a[h][0]);
      a[h][2] = _mm512_fmadd_pd(a[h][3], r2[h], a[h][2]);
      a[h][4] = _mm512_fmadd_pd(a[h][5], r2[h], a[h][4]);
    }
    for (int h = 0; h < M; ++h) {
      const __m512d q = _mm512_fmadd_pd(_mm512_fmadd_pd(a[h][4], r4[h], a[h][2]), r4[h], a[h][0]);
      p[h] = _mm512_fmadd_pd(r2[h], q, r[h]);
    }
  }
  template <int M>
  static inline void wlog1p01_m(const __m512d* t, __m512d* out) {
    __mmask8 big[M];
    __m512d s[M];
    for (int h = 0; h < M; ++h) {
      big[h] = _mm512_cmp_pd_mask(t[h], _mm512_set1_pd(fmath::kSqrt2m1), _CMP_GT_OQ);
      const __m512d f = _mm512_mask_blend_pd(
          big[h], t[h], _mm512_mul_pd(_mm512_sub_pd(t[h], _mm512_set1_pd(1.0)), _mm512_set1_pd(0.5)));
      s[h] = _mm512_div_pd(f, _mm512_add_pd(_mm512_set1_pd(2.0), f));
    }
    for (int h = 0; h < M; ++h) {
      const __m512d z = _mm512_mul_pd(s[h], s[h]), z2 = _mm512_mul_pd(z, z), s2 = _mm512_add_pd(s[h], s[h]);
      __m512d c[4];
      for (int j = 0; j < 4; ++j)
        c[j] = _mm512_fmadd_pd(_mm512_set1_pd(fmath::kAtanhC[2 * j + 1]), z, _mm512_set1_pd(fmath::kAtanhC[2 * j]));
      const __m512d z4 = _mm512_mul_pd(z2, z2);
      const __m512d lo = _mm512_fmadd_pd(c[1], z2, c[0]), hi = _mm512_fmadd_pd(c[3], z2, c[2]);
      const __m512d q = _mm512_fmadd_pd(_mm512_fmadd_pd(_mm512_set1_pd(fmath::kAtanhC[8]), z4, hi), z4, lo);
      const __m512d r = _mm512_fmadd_pd(_mm512_mul_pd(s2, z), q, s2);
      // r + (big ? ln 2 : +0), as VecAVX2's r + and(big, ln 2)
      out[h] = _mm512_add_pd(r, _mm512_maskz_mov_pd(big[h], _mm512_set1_pd(fmath::kLn2)));
    }
  }
  template <int M>
  static inline void wexp_neg_abs_m(const __m512d* d, __m512d* t) {
    __m512d y[M], s[M], p[M];
    for (int h = 0; h < M; ++h)
      y[h] = _mm512_sub_pd(_mm512_setzero_pd(), _mm512_min_pd(_mm512_abs_pd(d[h]), _mm512_set1_pd(fmath::kExpZero)));
    wexp_parts_m<M, 64>(y, s, p);
    for (int h = 0; h < M; ++h) t[h] = _mm512_mul_pd(_mm512_fmadd_pd(s[h], p[h], s[h]), _mm512_set1_pd(0x1p-64));
  }
  template <int M>
  static inline void wexpm1_neg_m(const __m512d* d, __m512d* e) {
    __m512d y[M], s[M], p[M];
    for (int h = 0; h < M; ++h)
      y[h] = _mm512_max_pd(_mm512_min_pd(d[h], _mm512_setzero_pd()), _mm512_set1_pd(-fmath::kExpClamp));
    wexp_parts_m<M>(y, s, p);
    for (int h = 0; h < M; ++h) e[h] = _mm512_fmadd_pd(s[h], p[h], _mm512_sub_pd(s[h], _mm512_set1_pd(1.0)));
  }
  template <int N>
  static inline void welu_n(const __m512* x, __m512* out, double neg, double pos) {
    __m512d d[2 * N], e[2 * N], v[2 * N];
    for (int q = 0; q < N; ++q) wsplit(x[q], d + 2 * q);
    wexpm1_neg_m<2 * N>(d, e);
    for (int h = 0; h < 2 * N; ++h)
      v[h] = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(d[h], _mm512_setzero_pd(), _CMP_GE_OQ),
                                  _mm512_mul_pd(_mm512_set1_pd(neg), e[h]), _mm512_mul_pd(d[h], _mm512_set1_pd(pos)));
    for (int q = 0; q < N; ++q) out[q] = wkeep_nan(wjoin(v + 2 * q), x[q]);
  }
  template <int N>
  static inline void wcelu_n(const __m512* x, __m512* out, double alpha, double inv) {
    __m512d d[2 * N], e[2 * N];
    for (int q = 0; q < N; ++q) wsplit(x[q], d + 2 * q);
    for (int h = 0; h < 2 * N; ++h) d[h] = _mm512_mul_pd(d[h], _mm512_set1_pd(inv));
    wexpm1_neg_m<2 * N>(d, e);
    for (int h = 0; h < 2 * N; ++h) e[h] = _mm512_mul_pd(_mm512_set1_pd(alpha), e[h]);
    for (int q = 0; q < N; ++q)
      out[q] = wkeep_nan(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x[q], _mm512_setzero_ps(), _CMP_GE_OQ), wjoin(e + 2 * q), x[q]), x[q]);
  }
  template <int N>
  static inline void wsoftplus_n(const __m512* x, __m512* out, double beta, double threshold, double inv) {
    __m512d xb[2 * N], t[2 * N], l[2 * N];
    for (int q = 0; q < N; ++q) wsplit(x[q], xb + 2 * q);
    for (int h = 0; h < 2 * N; ++h) xb[h] = _mm512_mul_pd(xb[h], _mm512_set1_pd(beta));
    wexp_neg_abs_m<2 * N>(xb, t);
    wlog1p01_m<2 * N>(t, l);
    for (int q = 0; q < N; ++q) {
      __m512d v[2];
      for (int h = 0; h < 2; ++h)
        v[h] = _mm512_mul_pd(_mm512_add_pd(_mm512_max_pd(xb[2 * q + h], _mm512_setzero_pd()), l[2 * q + h]),
                             _mm512_set1_pd(inv));
      const __mmask16 above = _mm512_cmp_ps_mask(_mm512_mul_ps(x[q], _mm512_set1_ps(static_cast<float>(beta))),
                                                 _mm512_set1_ps(static_cast<float>(threshold)), _CMP_GT_OQ);
      out[q] = wkeep_nan(_mm512_mask_blend_ps(above, wjoin(v), x[q]), x[q]);
    }
  }
  // ---- tanh, softplus (beta 1) and logsigmoid on 16 lanes: fmath.h's steps on F16, VecAVX2::F8's
  // operations on 512-bit vectors (the blends take compare masks; and/or through the integer forms, the
  // float ones being AVX512DQ), so the same bits ----
  struct F16 {
    using reg = __m512;
    using mask = __mmask16;
    static inline reg bc(float v) { return _mm512_set1_ps(v); }
    static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
    static inline reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
    static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
    static inline reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
    static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
    static inline reg fnma(reg a, reg b, reg c) { return _mm512_fnmadd_ps(a, b, c); }
    static inline reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
    static inline reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
    static inline reg abs(reg a) { return _mm512_abs_ps(a); }
    static inline reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    template <int SHIFT>
    static inline reg pow2(reg k) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127 + SHIFT)), 23));
    }
    static inline mask gt(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
    static inline mask ge(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
    static inline reg sel(mask m, reg t, reg f) { return _mm512_mask_blend_ps(m, f, t); }
    static inline reg with_sign(reg v, reg x) {
      return _mm512_castsi512_ps(_mm512_or_si512(
          _mm512_castps_si512(v), _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))));
    }
    static inline reg keep_nan(reg v, reg x) { return wkeep_nan(v, x); }
  };
  // fmath.h's tanh_tab_f32 on 16 lanes: each of the table's rows is two zmm, a lookup one vpermt2ps
  // (the low 5 bits of the slot index pick one of the 32 floats); the same steps in the same order
  static inline __m512 wtab(int row, __m512i slot) {
    return _mm512_permutex2var_ps(_mm512_load_ps(fmath::kTanhTab[row]), slot, _mm512_load_ps(fmath::kTanhTab[row] + 16));
  }
  static inline __m512 wtanh1(__m512 x) {
    const __m512i sign = _mm512_set1_epi32(INT32_MIN);
    const __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
    const __m512 ac = _mm512_min_ps(_mm512_set1_ps(fmath::kTanhTabClamp), a);  // a nan stays
    const __m512i slot = _mm512_srli_epi32(_mm512_castps_si512(_mm512_max_ps(ac, _mm512_set1_ps(fmath::kTanhTabLow))), 21);
    const __m512 t = _mm512_sub_ps(ac, wtab(0, slot));
    __m512 r = wtab(fmath::kTanhTabRows - 1, slot);
    for (int k = fmath::kTanhTabRows - 2; k >= 4; --k) r = _mm512_fmadd_ps(r, t, wtab(k, slot));
    const __m512 lo = _mm512_fmadd_ps(_mm512_mul_ps(t, t), r, wtab(2, slot));
    const __m512 v = _mm512_add_ps(wtab(1, slot), _mm512_fmadd_ps(t, wtab(3, slot), lo));
    // v (sign bit clear) with x's sign bit, as copysign
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sign, _mm512_castps_si512(x), _mm512_castps_si512(v), 0xca));
  }
  template <int N>
  static inline void wtanh_n(const __m512* x, __m512* y) {
    for (int h = 0; h < N; ++h) y[h] = wtanh1(x[h]);
  }
  // the 8-lane tanh (bf16 / fp16 elements, and one float of a tail) on 16 lanes too, two vectors to a
  // zmm: the avx-512 path gives tanh_tab_f32's bits for every dtype
  template <int N>
  static inline void tanh_n(const reg* x, reg* y) {
    int h = 0;
    for (; h + 1 < N; h += 2) {
      const __m512 v = wtanh1(_mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(x[h])), _mm256_castps_pd(x[h + 1]), 1)));
      y[h] = _mm512_castps512_ps256(v);
      y[h + 1] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    }
    if (h < N) y[h] = _mm512_castps512_ps256(wtanh1(_mm512_castps256_ps512(x[h])));  // the upper lanes: whatever they hold, dropped
  }
  template <int N>
  static inline void wsoftplus1_n(const __m512* x, __m512* y, float threshold) {
    for (int h = 0; h < N; ++h) y[h] = fmath::softplus1_g<F16>(x[h], _mm512_set1_ps(threshold));
  }
  template <int N>
  static inline void wlogsigmoid_n(const __m512* x, __m512* y) {
    for (int h = 0; h < N; ++h) y[h] = fmath::logsigmoid_g<F16>(x[h]);
  }

  // ---- few-bit codes on 16 lanes (fewbit_impl.h's wide path) ----
  // VecAVX2's binary search (see planes there), with the compares into mask registers: a depth's mask
  // is its bit plane as it is (no movemask), and a lane's next border is looked up by the code bits
  // found so far, kept in place (prefix: bits BITS-1 .. BITS-d of the code, the rest 0), so that a depth
  // costs a compare, a masked add and a permute (depth 1: a blend of its two borders instead)
  // NOTE: ad hoc, 4M fp32 elements, 2 threads, the fused silu pass with 4-bit codes: the prefix shifted
  // up a depth (slli, masked add of 1, permute) 1.05-1.10 ms, this one 1.01-1.07 (3-bit 0.89-0.92 and
  // 0.88-0.91). storing each depth's mask straight to its half of the code word (_store_mask16, no kmov
  // to a general register, shift and or) did not add to it (1.05-1.13): not kept
  template <int BITS>
  struct WBorders {
    __m512 cand[BITS];  // depth d's borders by prefix (depth 0 broadcast; depth 1 is lo1 / hi1 instead)
    __m512 lo1, hi1;    // depth 1's two borders, broadcast
    explicit WBorders(const float* f) {
      cand[0] = _mm512_set1_ps(f[(1 << (BITS - 1)) - 1]);
      if constexpr (BITS > 1) {
        const int half = 1 << (BITS - 1);
        lo1 = _mm512_set1_ps(f[half / 2 - 1]), hi1 = _mm512_set1_ps(f[half + half / 2 - 1]);
      }
      for (int d = 2; d < BITS; ++d) {
        alignas(64) float t[16] = {};
        const int span = 1 << (BITS - d);
        // the border below which a code with prefix j (a multiple of span) goes down
        for (int j = 0; j < (1 << BITS); j += span) t[j] = f[j + span / 2 - 1];
        cand[d] = _mm512_load_ps(t);
      }
    }
  };
  // m[j]: bit plane j of the codes of x's 16 lanes (lane i: bit i)
  template <int BITS>
  static inline void wplanes(__m512 x, const WBorders<BITS>& t, uint32_t* m) {
    __mmask16 gt = _mm512_cmp_ps_mask(x, t.cand[0], _CMP_GT_OQ);
    m[BITS - 1] = gt;
    if constexpr (BITS > 1) {
      __m512i prefix = _mm512_maskz_mov_epi32(gt, _mm512_set1_epi32(1 << (BITS - 1)));
      gt = _mm512_cmp_ps_mask(x, _mm512_mask_blend_ps(gt, t.lo1, t.hi1), _CMP_GT_OQ);
      m[BITS - 2] = gt;
      for (int d = 2; d < BITS; ++d) {
        prefix = _mm512_mask_add_epi32(prefix, gt, prefix, _mm512_set1_epi32(1 << (BITS - d)));
        gt = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(prefix, t.cand[d]), _CMP_GT_OQ);
        m[BITS - 1 - d] = gt;
      }
    }
  }
  // the levels of the 16 codes at bits shift .. shift + 15 of the planes w[0 .. BITS) (table: the 2^BITS
  // levels, zero-padded to 16)
  template <int BITS>
  static inline __m512 wlevel(const uint32_t* w, int shift, __m512 table) {
    __m512i c = _mm512_setzero_si512();
    for (int j = 0; j < BITS; ++j)
      c = _mm512_mask_or_epi32(c, static_cast<__mmask16>(w[j] >> shift), c, _mm512_set1_epi32(1 << j));
    return _mm512_permutexvar_ps(c, table);
  }
};
#endif

// loads of a weight's element type WD (0: fp32, 1: bf16, 2: fp16) as 8 fp32 lanes of V, and of one
// element: the kernels that read a 16-bit weight as it is (activation-sparse and N:M decode)
template <class V, int WD>
struct WLoad {
  using T = float;
  static typename V::reg load(const T* p) { return V::load(p); }
  static float one(T v) { return v; }
};
template <class V>
struct WLoad<V, 1> {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_bf16(p); }
  static float one(T v) { return bf16_to_f32(v); }
};
template <class V>
struct WLoad<V, 2> {
  using T = uint16_t;
  static typename V::reg load(const T* p) { return V::load_f16(p); }
  static float one(T v) { return f16_to_f32(v); }
};

}  // namespace
}  // namespace sparseops
