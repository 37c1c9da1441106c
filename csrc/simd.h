// the one place that knows the instruction set.
//
// kernels are templates over a vector type V with a fixed width of 8 fp32 lanes:
//   V::zero(), V::load(p), V::store(p, a), V::bcast(s), V::fma(a, b, c) = a*b+c,
//   V::add(a, b), V::sum(a) -> float, V::gather(base, idx[8]),
//   V::hsum8(a[8]) -> lane m holds the sum of a[m]'s lanes,
//   V::transpose8(a[8]) -> in place, a[j].lane[m] becomes a[m].lane[j] (an 8x8 block).
// VecAVX2 is compiled only in translation units built with -mavx2 -mfma; VecPortable
// is plain C++ that any compiler vectorises for its baseline ISA. the choice between
// them is made at run time (see dispatch.cpp), never with -march=native.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(SPARSEOPS_AVX2)
#include <immintrin.h>
#endif

namespace sparseops {

struct VecPortable {
  struct reg {
    float v[8];
  };
  static constexpr const char* name = "portable";
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
};

#if defined(SPARSEOPS_AVX2)
struct VecAVX2 {
  using reg = __m256;
  static constexpr const char* name = "avx2";
  static inline reg zero() { return _mm256_setzero_ps(); }
  static inline reg load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
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
};
#endif

}  // namespace sparseops
