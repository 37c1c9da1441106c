// activation-sparse products on raw pointers (fp32). torch-free; nothing here takes an index from
// the caller (every index is built from x inside the kernel), so the binding checks shapes only.
//
// the sparsifier s: v = relu ? max(x, 0) : x; input j of a row is active when |v| > thr[j] (thr has
// one entry for the tensor, or one per input when per_channel); s(x) = v where active, else 0.
// the weight comes transposed, wt [K, N] (row j = the weights input j multiplies, contiguous), so
// skipping an inactive input skips one contiguous row.
#pragma once

#include <cstdint>

namespace sparseops {

struct ActSel {
  const float* thr;  // [1] or [K]
  bool per_channel;
  bool relu;
};

// decode / small batch: y [T, N] (row stride ldy) = s(x) [T, K] (row stride ldx) @ wt (+ bias), reading
// each row of wt that at least one of the T rows activates exactly once (the union). returns the size
// of the union.
int64_t act_gemv(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const float* wt, int64_t N,
                 const float* bias, float* y, int64_t ldy, int nthreads);
// act_gemv with a 16-bit weight (bf16, else fp16), widened to fp32 as it is loaded; x, bias and y fp32
int64_t act_gemv16(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const uint16_t* wt, bool bf16,
                   int64_t N, const float* bias, float* y, int64_t ldy, int nthreads);
// any batch: the same product with each row's own active set (s(x) as CSR rows, then a row-sparse x
// dense product tiled so that the panel of wt it reads stays in cache). returns nnz of s(x).
int64_t act_spmm(const float* x, int64_t B, int64_t K, int64_t ldx, ActSel sel, const float* wt, int64_t N,
                 const float* bias, float* y, int64_t ldy, int nthreads);
// input gradient on the active set only: dx [B, K] = (dy [B, N] @ wtᵀ) ⊙ mask, one dot product of
// length N per active (b, j); every inactive entry is written 0.
void act_dsd(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx, ActSel sel,
             const float* wt, float* dx, int64_t lddx, int nthreads);
// weight gradient: dwt [K, N] = s(x)ᵀ @ dy, through s(x)'s columns; rows no input activates are 0.
void act_sdd(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx, ActSel sel,
             float* dwt, int nthreads);
// both gradients in one pass (act_dsd's dx and act_sdd's dwt): each active (b, j) reads row b of dy once
// for both. dx and dwt must not overlap each other or the inputs.
void act_backward(const float* dy, int64_t B, int64_t N, int64_t ldd, const float* x, int64_t K, int64_t ldx,
                  ActSel sel, const float* wt, float* dx, int64_t lddx, float* dwt, int nthreads);

#define SPARSEOPS_ACT_DECLARE(suffix)                                                                              \
  int64_t act_gemv_##suffix(const float*, int64_t, int64_t, int64_t, ActSel, const float*, int64_t, const float*,  \
                            float*, int64_t, int);                                                                  \
  int64_t act_gemv16_##suffix(const float*, int64_t, int64_t, int64_t, ActSel, const uint16_t*, bool, int64_t,     \
                              const float*, float*, int64_t, int);                                                \
  int64_t act_spmm_##suffix(const float*, int64_t, int64_t, int64_t, ActSel, const float*, int64_t, const float*,  \
                            float*, int64_t, int);                                                                  \
  void act_dsd_##suffix(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, ActSel,           \
                        const float*, float*, int64_t, int);                                                        \
  void act_sdd_##suffix(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, ActSel, float*, \
                        int);                                                                                     \
  void act_backward_##suffix(const float*, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, ActSel,      \
                             const float*, float*, int64_t, float*, int);

SPARSEOPS_ACT_DECLARE(portable)
#if defined(SPARSEOPS_HAVE_AVX2)
SPARSEOPS_ACT_DECLARE(avx2)
#endif
#if defined(SPARSEOPS_HAVE_AVX512)
SPARSEOPS_ACT_DECLARE(avx512)
#endif

}  // namespace sparseops
