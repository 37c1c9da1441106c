// weight- and activation-sparse forward on raw pointers (fp32): the product of an activation-sparse
// input with an unstructured sparse weight, skipping both the weight's zeros and the inputs' zeros.
// torch-free.
//
// the weight comes as the CSR of its transpose, M = Wᵀ [K, N]: row j holds the stored weights that
// input j multiplies, as (col = output index, val), ascending in col. skipping an inactive input
// skips one row of M: its values and indices are never read.
#pragma once

#include <cstdint>

#include "act.h"

namespace sparseops {

// y [T, N] (row stride ldy) = s(x) [T, K] (row stride ldx) @ M (+ bias). one serial pass over x builds
// the union of the T rows' active inputs; the outputs are split between the threads, and each thread
// scatters, for every input of the union, the part of that input's row of M that falls in its outputs
// (found by binary search) into a [T, its outputs] accumulator. returns the size of the union, or -1
// if an index the kernel would follow is invalid (ptr not running from 0 to nnz without decreasing,
// or a union row whose columns are not strictly increasing inside [0, N)): then nothing is written.
int64_t act_csr_gemv(const float* x, int64_t T, int64_t K, int64_t ldx, ActSel sel, const int32_t* ptr,
                     const int32_t* col, const float* val, int64_t nnz, int64_t N, const float* bias, float* y,
                     int64_t ldy, int nthreads);

}  // namespace sparseops
