// unstructured CSR products on raw pointers (fp32). torch-free; the binding validates
// every index before these run, the kernels trust them.
#pragma once

#include <cstdint>

namespace sparseops {

enum class Isa { portable = 0, avx2 = 1, avx512 = 2 };

// the best path this cpu supports, the one in use, and a switch (for tests and SPARSEOPS_ISA)
Isa best_isa();
Isa active_isa();
void set_isa(Isa isa);
const char* isa_name(Isa isa);
// how many calls went into each ISA's kernels so far (see note_isa_call in simd.h)
int64_t isa_calls(Isa isa);

// y [B, n] = a [B, K] @ Mᵀ (+ bias [n]), where M [n, K] is CSR (ptr [n+1], idx [nnz]) with
// values vals[perm[k]] (perm may be null: vals[k]). a is read through strides (s0, s1); y is
// contiguous. dds is this with M = W; dsd is this with M = Wᵀ (the transposed index, perm =
// t_perm): the kernel copies the values into its own layout anyway, so it gathers them there.
void csr_spmm(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals, const int32_t* perm,
              const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads);

// the checks the bindings run before a kernel follows an index, split over nthreads threads:
// csr_rows_valid: every row r < n of (ptr, idx) holds indices in [0, limit), strictly increasing (ptr must
// be checked already: ptr[0] = 0, non-decreasing); indices_below: every idx[k], k < n, lies in [0, limit)
bool csr_rows_valid(const int32_t* ptr, int64_t n, const int32_t* idx, int64_t limit, int nthreads);
bool indices_below(const int32_t* idx, int64_t n, int64_t limit, int nthreads);

// csr_spmm with perm null (dds) that also checks the index it reads: every idx in [0, K), strictly
// increasing inside each row. ptr must be checked already (ptr[0] = 0, non-decreasing, ptr[n] = nnz).
// false when an index breaks that, with y untouched: the caller names the entry. a small batch checks
// each row as the kernel reaches it (into a buffer, copied to y at the end), so the index is read from
// memory once, not twice.
bool csr_spmm_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const float* vals,
                      const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads);

// csr_spmm_checked for a batch of at most CSR_SPMM16_MAX_B rows and a bf16 (bf16 true) or fp16 weight
// read as it is: the same fp32 sums as over its fp32 copy, with half the value bytes and no copy
constexpr int64_t CSR_SPMM16_MAX_B = 7;
bool csr_spmm16_checked(const float* a, int64_t B, int64_t K, int64_t s0, int64_t s1, const uint16_t* vals, bool bf16,
                        const int32_t* ptr, const int32_t* idx, int64_t n, const float* bias, float* y, int nthreads);

// dvals [nnz] = sum_b dy[b, i] * x[b, col[k]] for each stored (i, col[k]); dy and x strided.
void csr_sdd(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
             int64_t x0, int64_t x1, const int32_t* crow, const int32_t* col, float* dvals, int nthreads);

// csr_spmm for dx [B, in] = dy @ W through the transposed index (t_crow, t_row, t_perm) and
// csr_sdd for dvals in one call: dy is packed once and both run in one parallel region.
void csr_backward(const float* dy, int64_t B, int64_t out, int64_t d0, int64_t d1, const float* x, int64_t in,
                  int64_t x0, int64_t x1, const float* vals, const int32_t* crow, const int32_t* col,
                  const int32_t* t_crow, const int32_t* t_row, const int32_t* t_perm, float* dx, float* dvals,
                  int nthreads);


// per-isa entry points (csr_avx2.cpp, csr_portable.cpp)
void csr_spmm_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*,
                       const int32_t*, const int32_t*, int64_t, const float*, float*, int);
bool csr_rows_valid_portable(const int32_t*, int64_t, const int32_t*, int64_t, int);
bool indices_below_portable(const int32_t*, int64_t, int64_t, int);
bool csr_spmm16_checked_portable(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool,
                                 const int32_t*, const int32_t*, int64_t, const float*, float*, int);
bool csr_spmm_checked_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*,
                               const int32_t*, int64_t, const float*, float*, int);
void csr_sdd_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                      const int32_t*, const int32_t*, float*, int);
void csr_backward_portable(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                           const float*, const int32_t*, const int32_t*, const int32_t*, const int32_t*,
                           const int32_t*, float*, float*, int);
#if defined(SPARSEOPS_HAVE_AVX2)
void csr_spmm_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*, const int32_t*,
                   const int32_t*, int64_t, const float*, float*, int);
bool csr_rows_valid_avx2(const int32_t*, int64_t, const int32_t*, int64_t, int);
bool indices_below_avx2(const int32_t*, int64_t, int64_t, int);
bool csr_spmm16_checked_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool,
                             const int32_t*, const int32_t*, int64_t, const float*, float*, int);
bool csr_spmm_checked_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*,
                           const int32_t*, int64_t, const float*, float*, int);
void csr_sdd_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                  const int32_t*, const int32_t*, float*, int);
void csr_backward_avx2(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                       const float*, const int32_t*, const int32_t*, const int32_t*, const int32_t*, const int32_t*,
                       float*, float*, int);
#endif
#if defined(SPARSEOPS_HAVE_AVX512)
void csr_spmm_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*, const int32_t*,
                   const int32_t*, int64_t, const float*, float*, int);
bool csr_rows_valid_avx512(const int32_t*, int64_t, const int32_t*, int64_t, int);
bool indices_below_avx512(const int32_t*, int64_t, int64_t, int);
bool csr_spmm16_checked_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const uint16_t*, bool,
                             const int32_t*, const int32_t*, int64_t, const float*, float*, int);
bool csr_spmm_checked_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const int32_t*,
                           const int32_t*, int64_t, const float*, float*, int);
void csr_sdd_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                  const int32_t*, const int32_t*, float*, int);
void csr_backward_avx512(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                       const float*, const int32_t*, const int32_t*, const int32_t*, const int32_t*, const int32_t*,
                       float*, float*, int);
#endif

}  // namespace sparseops
