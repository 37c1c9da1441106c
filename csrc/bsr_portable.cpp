// the portable instantiation of the block-sparse kernels (see bsr_impl.h).

#include "bsr_impl.h"

namespace sparseops {
SPARSEOPS_BSR_INSTANTIATE(VecPortable, portable)
}  // namespace sparseops
