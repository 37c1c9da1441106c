// the portable instantiation of the mask updates' candidate filter (see dst_filter_impl.h)
#if defined(SPARSEOPS_AVX2) || defined(SPARSEOPS_AVX512)
#error "dst_portable.cpp must be compiled without the isa definitions"
#endif
#include "dst_filter_impl.h"

namespace sparseops {
SPARSEOPS_DST_INSTANTIATE(portable)
}  // namespace sparseops
