// the candidate filter of the mask-update selections (dst.cpp: top_abs_sampled, top_abs_rows), one
// instantiation per isa: dst_portable.cpp (SSE2 tests of 16 keys, then the set bits one by one),
// dst_avx2.cpp (8 keys a step, left-packed by a permutation table) and dst_avx512.cpp (16 keys a step,
// vpcompress). every path writes the same entries in the same order. included by those files only.
// NOTE: ad hoc, RigL's grow selection on a 4096^2 dense gradient (16.7M keys, 664K candidates), 2
// threads, AVX-512 Xeon: the one pass over the keys took 7.4-7.7 ms of the call's ~10 on the portable
// filter (a branch a run of 16 whether it holds one, and one a candidate), against 1.3 ms for torch's
// sum over the same array
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dst.h"
#include "simd.h"

#if defined(SPARSEOPS_AVX2) || defined(SPARSEOPS_AVX512)
#include <immintrin.h>
#elif defined(__SSE2__) && !defined(SPARSEOPS_NO_SSE2_FILTER)
#include <emmintrin.h>
#define SPARSEOPS_SSE2_FILTER 1
#endif

namespace sparseops {
namespace {

inline bool past(uint32_t key, uint32_t flip, int32_t lo) { return static_cast<int32_t>(key ^ flip) >= lo; }
inline uint32_t key_at(const float* s, int64_t i) {
  uint32_t u;
  std::memcpy(&u, s + i, sizeof u);
  return u & 0x7fffffffu;
}
inline bool held_at(const uint64_t* E, int64_t i) { return E && ((E[i >> 6] >> (i & 63)) & 1); }

// i in [b, e) one at a time (the tail past the last whole vector)
inline int64_t keys_past_scalar(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo,
                                int64_t* P, uint32_t* K, int64_t m) {
  for (int64_t i = b; i < e; ++i) {
    const uint32_t k = key_at(s, i);
    if (past(k, flip, lo) && !held_at(E, i)) {
      P[m] = i;
      K[m] = k;
      ++m;
    }
  }
  return m;
}

#if defined(SPARSEOPS_AVX512)
// 16 keys a step: the lanes that pass, less those E holds (16 bits of E at once: b, so i, is a multiple of 16),
// compressed to the front of a vector and stored whole (the lanes past the count are overwritten by the
// next step's store or never read: P and K have room for e - b entries, and m + 16 <= i + 16 - b <= e - b);
// positions likewise, as two vectors of 8 int64
template <bool HasE>
__attribute__((target("popcnt"))) int64_t keys_past_v(const float* s, const uint64_t* E, int64_t b, int64_t e,
                                                      uint32_t flip, int32_t lo, int64_t* P, uint32_t* K) {
  int64_t m = 0, i = b;
  const __m512i absm = _mm512_set1_epi32(0x7fffffff), fl = _mm512_set1_epi32(static_cast<int>(flip)),
                bound = _mm512_set1_epi32(lo - 1), step = _mm512_set1_epi64(16);  // lo >= 0: lo - 1 does not wrap
  __m512i p0 = _mm512_add_epi64(_mm512_set1_epi64(i), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  __m512i p1 = _mm512_add_epi64(p0, _mm512_set1_epi64(8));
  for (; i + 16 <= e; i += 16) {
    const __m512i k = _mm512_and_si512(_mm512_loadu_si512(reinterpret_cast<const void*>(s + i)), absm);
    __mmask16 mk = _mm512_cmpgt_epi32_mask(_mm512_xor_si512(k, fl), bound);
    if (HasE) mk = static_cast<__mmask16>(mk & ~static_cast<uint32_t>(E[i >> 6] >> (i & 63)));
    _mm512_storeu_si512(reinterpret_cast<void*>(K + m), _mm512_maskz_compress_epi32(mk, k));
    const __mmask8 lo8 = static_cast<__mmask8>(mk), hi8 = static_cast<__mmask8>(mk >> 8);
    const int nlo = __builtin_popcount(lo8);
    _mm512_storeu_si512(reinterpret_cast<void*>(P + m), _mm512_maskz_compress_epi64(lo8, p0));
    _mm512_storeu_si512(reinterpret_cast<void*>(P + m + nlo), _mm512_maskz_compress_epi64(hi8, p1));
    m += nlo + __builtin_popcount(hi8);
    p0 = _mm512_add_epi64(p0, step);
    p1 = _mm512_add_epi64(p1, step);
  }
  return keys_past_scalar(s, E, i, e, flip, lo, P, K, m);
}
#elif defined(SPARSEOPS_AVX2)
// lane indices of the set bits of an 8-bit mask, first to last, then zeros: left-packs a vector by vpermd
struct PackTable {
  int32_t idx[256][8];
  constexpr PackTable() : idx() {
    for (int mk = 0; mk < 256; ++mk) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (mk >> l & 1) idx[mk][n++] = l;
    }
  }
};
constexpr PackTable kPack{};

// 8 keys a step: the lanes that pass, less those E holds (8 bits of E at once: b, so i, is a multiple of 8),
// left-packed and stored whole (m + 8 <= e - b, as in the avx512 path); positions as i plus the packed
// lane indices, widened to two vectors of 4 int64
template <bool HasE>
__attribute__((target("popcnt"))) int64_t keys_past_v(const float* s, const uint64_t* E, int64_t b, int64_t e,
                                                      uint32_t flip, int32_t lo, int64_t* P, uint32_t* K) {
  int64_t m = 0, i = b;
  const __m256i absm = _mm256_set1_epi32(0x7fffffff), fl = _mm256_set1_epi32(static_cast<int>(flip)),
                bound = _mm256_set1_epi32(lo - 1);
  for (; i + 8 <= e; i += 8) {
    const __m256i k = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)), absm);
    unsigned mk = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_xor_si256(k, fl), bound))));
    if (HasE) mk &= ~static_cast<unsigned>(E[i >> 6] >> (i & 63)) & 0xffu;
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPack.idx[mk]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(K + m), _mm256_permutevar8x32_epi32(k, perm));
    const __m256i base = _mm256_set1_epi64x(i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + m),
                        _mm256_add_epi64(base, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(perm))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(P + m + 4),
                        _mm256_add_epi64(base, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(perm, 1))));
    m += __builtin_popcount(mk);
  }
  return keys_past_scalar(s, E, i, e, flip, lo, P, K, m);
}
#else
inline int lowest16(unsigned v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(v);
#else
  int i = 0;
  while (!(v & 1u)) {
    v >>= 1;
    ++i;
  }
  return i;
#endif
}

// a run of 16 tested at once (SSE2 where the target has it: x86-64 always does), and only the runs
// holding one looked into, a set bit at a time. without SSE2 (or with SPARSEOPS_NO_SSE2_FILTER, which no
// build sets) every key goes through keys_past_scalar, the loop every path runs on its tail
template <bool HasE>
int64_t keys_past_v(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo, int64_t* P,
                    uint32_t* K) {
  int64_t m = 0, i = b;
#if defined(SPARSEOPS_SSE2_FILTER)
  const uint32_t* u = reinterpret_cast<const uint32_t*>(s);
  const __m128i absmask = _mm_set1_epi32(0x7fffffff), fl = _mm_set1_epi32(static_cast<int>(flip)),
                bound = _mm_set1_epi32(lo - 1);  // lo >= 0, so lo - 1 does not wrap
  for (; i + 16 <= e; i += 16) {
    unsigned bits = 0;
    for (int j = 0; j < 4; ++j) {
      __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i + 4 * j));
      x = _mm_xor_si128(_mm_and_si128(x, absmask), fl);
      bits |= static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(x, bound)))) << (4 * j);
    }
    while (bits) {
      const int j = lowest16(bits);
      bits &= bits - 1;
      if (HasE && held_at(E, i + j)) continue;
      P[m] = i + j;
      K[m] = key_at(s, i + j);
      ++m;
    }
  }
#endif
  return keys_past_scalar(s, HasE ? E : nullptr, i, e, flip, lo, P, K, m);
}
#endif

}  // namespace
}  // namespace sparseops

#define SPARSEOPS_DST_INSTANTIATE(suffix)                                                                         \
  int64_t keys_past_##suffix(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo, \
                             int64_t* P, uint32_t* K) {                                                           \
    note_isa_call(ISA_OF_##suffix);                                                                               \
    return E ? keys_past_v<true>(s, E, b, e, flip, lo, P, K) : keys_past_v<false>(s, E, b, e, flip, lo, P, K);    \
  }
