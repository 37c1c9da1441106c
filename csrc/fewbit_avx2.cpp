// the avx2/fma/f16c instantiation of the few-bit kernels; runs only after dispatch.cpp has seen
// all three features on the cpu.
#ifndef SPARSEOPS_AVX2
#error "fewbit_avx2.cpp must be compiled with SPARSEOPS_AVX2 and -mavx2 -mfma -mf16c"
#endif
#include "fewbit_impl.h"

namespace sparseops {
SPARSEOPS_FEWBIT_INSTANTIATE(VecAVX2, avx2)
}  // namespace sparseops
