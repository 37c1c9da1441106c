// the portable instantiation: plain c++, vectorised by the compiler for the baseline isa.
#include "csr_impl.h"

namespace sparseops {
SPARSEOPS_CSR_INSTANTIATE(VecPortable, portable)
}  // namespace sparseops
