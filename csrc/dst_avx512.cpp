// the avx512 instantiation of the mask updates' candidate filter (see dst_filter_impl.h)
#if !defined(SPARSEOPS_AVX2) || !defined(SPARSEOPS_AVX512)
#error "dst_avx512.cpp must be compiled with SPARSEOPS_AVX2, SPARSEOPS_AVX512 and -mavx512f -mavx512vl"
#endif
#include "dst_filter_impl.h"

namespace sparseops {
SPARSEOPS_DST_INSTANTIATE(avx512)
}  // namespace sparseops
