"""torch.autograd.Function per layer kind, written in terms of sparseops ops."""

from .csr import SparseLinearFunction, check_input, sparse_linear

__all__ = ["SparseLinearFunction", "check_input", "sparse_linear"]
