// the portable instantiation of the few-bit kernels: plain c++ for the compiler's baseline isa.
#include "fewbit_impl.h"

namespace sparseops {
SPARSEOPS_FEWBIT_INSTANTIATE(VecPortable, portable)
}  // namespace sparseops
