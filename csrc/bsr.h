// block-sparse (BSR) products on raw pointers (fp32). torch-free; the binding validates every index first.
//
// format: W [nbr*b, nbc*b] cut into b x b blocks (b in 8, 16, 32, 64); the nblk stored blocks are
// vals [nblk][b][b] (row-major inside a block) on a CSR index of the block grid: crow [nbr+1], col [nblk]
// (block columns), row [nblk] (block rows); Wᵀ's index is t_crow [nbc+1], t_row [nblk] (block rows of
// each block column) and t_perm [nblk] (the block's position in vals). activations are block-aligned:
// the caller pads in and out to whole blocks.
#pragma once

#include <cstdint>

namespace sparseops {

// y [B, nbr*b] (row stride ldy) = x [B, nbc*b] (row stride ldx) @ Wᵀ (+ bias [nbr*b])
void bsr_dds(const float* x, int64_t B, int64_t ldx, const float* vals, const int32_t* crow, const int32_t* col,
             int64_t nbr, int b, const float* bias, float* y, int64_t ldy, int nthreads);
// dx [B, nbc*b] (row stride ldx) = dy [B, nbr*b] (row stride ldd) @ W, walking Wᵀ's index
void bsr_dsd(const float* dy, int64_t B, int64_t ldd, const float* vals, const int32_t* t_crow, const int32_t* t_row,
             const int32_t* t_perm, int64_t nbc, int b, float* dx, int64_t ldx, int nthreads);
// dvals[k] = dy[:, row[k] block]ᵀ @ x[:, col[k] block] for the nblk stored blocks
void bsr_sdd(const float* dy, int64_t B, int64_t ldd, const float* x, int64_t ldx, const int32_t* row,
             const int32_t* col, int64_t nblk, int b, float* dvals, int nthreads);

#define SPARSEOPS_BSR_DECLARE(suffix)                                                                              \
  void bsr_dds_##suffix(const float*, int64_t, int64_t, const float*, const int32_t*, const int32_t*, int64_t, int, \
                        const float*, float*, int64_t, int);                                                        \
  void bsr_dsd_##suffix(const float*, int64_t, int64_t, const float*, const int32_t*, const int32_t*,              \
                        const int32_t*, int64_t, int, float*, int64_t, int);                                        \
  void bsr_sdd_##suffix(const float*, int64_t, int64_t, const float*, int64_t, const int32_t*, const int32_t*,     \
                        int64_t, int, float*, int);

SPARSEOPS_BSR_DECLARE(portable)
#if defined(SPARSEOPS_HAVE_AVX2)
SPARSEOPS_BSR_DECLARE(avx2)
#endif
#if defined(SPARSEOPS_HAVE_AVX512)
SPARSEOPS_BSR_DECLARE(avx512)
#endif

}  // namespace sparseops
