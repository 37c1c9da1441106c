// the avx2 instantiation of the mask updates' candidate filter (see dst_filter_impl.h)
#if !defined(SPARSEOPS_AVX2) || defined(SPARSEOPS_AVX512)
#error "dst_avx2.cpp must be compiled with SPARSEOPS_AVX2 (and -mavx2), without SPARSEOPS_AVX512"
#endif
#include "dst_filter_impl.h"

namespace sparseops {
SPARSEOPS_DST_INSTANTIATE(avx2)
}  // namespace sparseops
