// the portable instantiation of the N:M kernels (see nm_impl.h).

#include "nm_impl.h"

namespace sparseops {
SPARSEOPS_NM_INSTANTIATE(VecPortable, portable)
}  // namespace sparseops
