// index work of mask updates (dynamic sparse training, pruning) on a CSR weight [rows, cols]:
// selecting by magnitude, sampling free positions, and re-packing both orientations. torch-free;
// the binding validates every index before these run, the kernels trust them. the code is scalar
// index work, but for the selections' candidate filter (keys_past), which has a path per isa.
#pragma once

#include <cstdint>

namespace sparseops {

// the flat positions (r * cols + c) of the n largest |s| among the entries of s [rows, cols]
// (contiguous) that the CSR (crow [rows+1], col) does not hold (crow null: none excluded) and that
// eligible [rows * cols] flags (null: all). ties go to the lower position; nan ranks above everything
// (as torch.topk). out [n], ascending. requires 0 <= n <= the number of eligible entries.
// z != 0: first try one pass over s whose bound comes from a sample (z: the bound's margin in standard
// deviations; when it lets through too few entries, the exact three passes run, which z == 0 asks for
// outright; a negative z makes that fallback the rule, for tests). the result is the same either way.
void top_abs(const float* s, int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col,
             const uint8_t* eligible, int64_t n, int64_t* out, int nthreads, double z = 4.0);

// row by row: row r gets need[r+1] - need[r] positions, written ascending to out[need[r] ...]: the
// largest |s| among the positions the CSR row does not hold and then, when those run out, among the
// held ones whose keep flag (keep [nnz]) is 0. ties to the lower column. requires each row's count to
// be at most cols minus the row's kept entries.
void top_abs_rows(const float* s, int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col,
                  const uint8_t* keep, const int64_t* need, int64_t* out, int nthreads);

// counts [rows]: for each row, how many of the flat positions pos [n] (ascending) in it are not a
// stored entry whose keep flag (keep [nnz]) is set. returns their total.
int64_t count_off_kept(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, const uint8_t* keep,
                       const int64_t* pos, int64_t n, int64_t* counts, int nthreads);

// the candidate filter of the selections: every i in [b, e) whose key (|s[i]|'s bits, sign cleared) satisfies
// (key ^ flip) >= lo as int32 (lo >= 0) and whose bit of E is clear (E null: none held), written as i to
// P[0..] and the key to K[0..], ascending; returns their count. b must be a multiple of 16 (the vector
// paths read E 8 or 16 bits at a time from b on). P and K must have room for e - b entries
// (the vector paths store whole vectors past the last one written, within that room). keys_past takes
// the active isa's (dst_filter_impl.h; dst_<isa>.cpp).
int64_t keys_past(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo, int64_t* P,
                  uint32_t* K);
int64_t keys_past_portable(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo,
                           int64_t* P, uint32_t* K);
#if defined(SPARSEOPS_HAVE_AVX2)
int64_t keys_past_avx2(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo, int64_t* P,
                       uint32_t* K);
#endif
#if defined(SPARSEOPS_HAVE_AVX512)
int64_t keys_past_avx512(const float* s, const uint64_t* E, int64_t b, int64_t e, uint32_t flip, int32_t lo,
                         int64_t* P, uint32_t* K);
#endif

// outs[t][i] = xs[t][src[i]], or 0 where src[i] < 0, for t < k: the re-map of values and of every
// optimizer state tensor in one pass over src
void gather_or_zero(const int32_t* src, int64_t n, const float* const* xs, float* const* outs, int k, int nthreads);

// n distinct flat positions that the CSR does not hold, uniformly at random (a seeded splitmix64
// stream), ascending. requires 0 <= n <= rows * cols - nnz.
void sample_off(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, int64_t n, uint64_t seed,
                int64_t* out, int nthreads = 1);

// the CSR of the old entries at positions kept [nk] (ascending indices into col) plus new entries at
// the flat positions grown [ng] (ascending), both orientations at once: ncrow [rows+1], ncol, nrow
// [nk+ng]; t_crow [cols+1], t_row, t_perm [nk+ng] (rows ascending within a column); src [nk+ng] (int32) the
// old position of each new entry, -1 for a grown one. with k > 0 the merge also re-maps k tensors laid
// out like the old values: outs[t][i] = xs[t][src[i]], 0 for a grown entry (gather_or_zero fused, so
// src is not read back). returns false (outputs unspecified) when a grown position is also a kept one.
bool csr_repack(int64_t rows, int64_t cols, const int32_t* crow, const int32_t* col, const int64_t* kept,
                int64_t nk, const int64_t* grown, int64_t ng, int32_t* ncrow, int32_t* ncol, int32_t* nrow,
                int32_t* t_crow, int32_t* t_row, int32_t* t_perm, int32_t* src, int nthreads,
                const float* const* xs = nullptr, float* const* outs = nullptr, int k = 0);

}  // namespace sparseops
