// the avx2 instantiation of the activation-sparse kernels (see act_impl.h); compiled with -mavx2 -mfma
// and called only after dispatch.cpp has seen both on the cpu.
#ifndef SPARSEOPS_AVX2
#error "act_avx2.cpp must be compiled with SPARSEOPS_AVX2 and -mavx2 -mfma"
#endif
#include "act_impl.h"

namespace sparseops {
SPARSEOPS_ACT_INSTANTIATE(VecAVX2, avx2)
}  // namespace sparseops
