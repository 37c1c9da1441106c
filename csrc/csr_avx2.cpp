// the avx2/fma instantiation: this file alone is compiled with -mavx2 -mfma, and its
// functions run only after dispatch.cpp has seen both features on the cpu.
#ifndef SPARSEOPS_AVX2
#error "csr_avx2.cpp must be compiled with SPARSEOPS_AVX2 and -mavx2 -mfma"
#endif
#include "csr_impl.h"

namespace sparseops {
SPARSEOPS_CSR_INSTANTIATE(VecAVX2, avx2)
}  // namespace sparseops
