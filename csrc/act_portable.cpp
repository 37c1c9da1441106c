// the portable instantiation of the activation-sparse kernels (see act_impl.h).

#include "act_impl.h"

namespace sparseops {
SPARSEOPS_ACT_INSTANTIATE(VecPortable, portable)
}  // namespace sparseops
