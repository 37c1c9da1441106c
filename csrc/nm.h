// N:M products on raw pointers (fp32). torch-free; the binding validates every index first.
//
// format: W [rows, K] with at most n nonzeros in each group of m consecutive columns (1 <= n < m <= 16).
// G = ceil(K / m) groups and S = G * n slots a row; vals [rows, S]; idx [rows, ceil(S / 2)] bytes holding
// two 4-bit in-group positions each (slot j in the low nibble when j is even). slot j of a row sits at
// column (j / n) * m + pos; columns in [K, G * m) read as zero (the kernels pad their copy of a).
#pragma once

#include <cstdint>
#include <cstring>

namespace sparseops {

// whether every 4-bit position of one row of an index (S slots, in ceil(S / 2) bytes) lies in [0, m):
// the binding's check of a whole index runs it per row, the small-batch checked kernels on each row
// just before they read through it. internal linkage: the avx2 and the portable translation units each
// keep their own copy (the linker may not pick the -mavx2 one for the portable path)
namespace {
inline bool nm_row_ok(const uint8_t* ir, int m_, int64_t S) {
  const unsigned m = static_cast<unsigned>(m_);
  if (m >= 16) return true;
  const int64_t full = S / 2;  // bytes whose both nibbles are slots
  if ((m & (m - 1)) == 0) {
    // m = 2, 4 or 8: a position is < m exactly when its nibble has no bit at or above m's, so one AND
    // of 8 bytes at a time checks 16 positions (a compare per nibble made the binding's pass cost
    // ~1 ms of a 7 ms 4096x11008 2:4 decode)
    const uint64_t high = 0x0101010101010101ull * ((0x0fu & ~(m - 1)) * 0x11u);
    uint64_t acc = 0;
    int64_t k = 0;
    for (; k + 8 <= full; k += 8) {
      uint64_t w;
      std::memcpy(&w, ir + k, 8);
      acc |= w & high;
    }
    for (; k < full; ++k) acc |= ir[k] & (high & 0xffu);
    if (S & 1) acc |= ir[full] & (high & 0x0fu);
    return acc == 0;
  }
  unsigned bad = 0;
  for (int64_t k = 0; k < full; ++k)
    bad |= static_cast<unsigned>((ir[k] & 15u) >= m) | static_cast<unsigned>((ir[k] >> 4) >= m);
  if (S & 1) bad |= static_cast<unsigned>((ir[full] & 15u) >= m);
  return bad == 0;
}
}  // namespace

// y [B, rows] = a [B, K] @ Wᵀ (+ bias [rows]); a is read through strides (s0, s1), y is contiguous.
// vals is read as vals[perm[k]] when perm is given (perm[k] < 0 reads zero), else vals[k]: the
// transposable backward runs this on Wᵀ's index with the values gathered through t_perm.
void nm_spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
             const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads);

// nm_spmm for B < 8 with a 16-bit vals (bf16, else fp16) read as it is and widened in registers; no perm.
// NM_SPMM16_MAX_B is the bound the binding checks.
constexpr int64_t NM_SPMM16_MAX_B = 7;
void nm_spmm16(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
               const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads);

// nm_spmm without perm and nm_spmm16, checking the 4-bit positions they read (every one below m); only the
// index's shape must be checked before. false, with y untouched, when a position is not: the caller names it.
// a small batch checks each row just before it reads through it, so the index comes from memory once.
bool nm_spmm_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,
                     const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads);
bool nm_spmm16_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
                       const uint8_t* idx, int n, int m, int64_t rows, const float* bias, float* y, int nthreads);

// dvals [out, S] = sum_b dy[b, o] * x[b, col(o, j)] for every slot (0 where col >= in); dy and x strided.
void nm_sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in, int64_t x0,
            int64_t x1, const uint8_t* idx, int n, int m, float* dvals, int nthreads);

void nm_spmm_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*, const uint8_t*,
                      int, int, int64_t, const float*, float*, int);
void nm_spmm16_portable(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool, const uint8_t*, int,
                        int, int64_t, const float*, float*, int);
bool nm_spmm_checked_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const uint8_t*, int,
                              int, int64_t, const float*, float*, int);
bool nm_spmm16_checked_portable(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool,
                                const uint8_t*, int, int, int64_t, const float*, float*, int);
void nm_sdd_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                     const uint8_t*, int, int, float*, int);
#if defined(SPARSEOPS_HAVE_AVX2)
void nm_spmm_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*, const uint8_t*, int,
                  int, int64_t, const float*, float*, int);
void nm_spmm16_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool, const uint8_t*, int, int,
                    int64_t, const float*, float*, int);
bool nm_spmm_checked_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const uint8_t*, int, int,
                          int64_t, const float*, float*, int);
bool nm_spmm16_checked_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool, const uint8_t*,
                            int, int, int64_t, const float*, float*, int);
void nm_sdd_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                 const uint8_t*, int, int, float*, int);
#endif
#if defined(SPARSEOPS_HAVE_AVX512)
void nm_spmm_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*, const uint8_t*, int,
                  int, int64_t, const float*, float*, int);
void nm_spmm16_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool, const uint8_t*, int, int,
                    int64_t, const float*, float*, int);
bool nm_spmm_checked_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const uint8_t*, int, int,
                          int64_t, const float*, float*, int);
bool nm_spmm16_checked_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool, const uint8_t*,
                            int, int, int64_t, const float*, float*, int);
void nm_sdd_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                 const uint8_t*, int, int, float*, int);
#endif

}  // namespace sparseops
