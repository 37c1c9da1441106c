// the avx512 instantiation of the CSR kernels: VecAVX512 is VecAVX2 plus 16-lane loops for the blocked
// walks (see simd.h). compiled with -mavx512f -mavx512vl on top of the avx2 flags, and called only after
// dispatch.cpp has seen all of them on the cpu.
#if !defined(SPARSEOPS_AVX2) || !defined(SPARSEOPS_AVX512)
#error "csr_avx512.cpp must be compiled with SPARSEOPS_AVX2, SPARSEOPS_AVX512 and -mavx512f -mavx512vl"
#endif
#include "csr_impl.h"

namespace sparseops {
SPARSEOPS_CSR_INSTANTIATE(VecAVX512, avx512)
}  // namespace sparseops
