"""torch.autograd.Function per layer kind, written in terms of sparseops ops."""

from .act import ActLinearFunction, act_linear
from .bsr import BlockLinearFunction, block_linear
from .csr import SparseLinearFunction, check_input, sparse_linear
from .nm import NMLinearFunction, nm_linear
from .fewbit import FewBitActivationFunction, SparseLinearFewBitFunction, fewbit_activation, sparse_linear_fewbit

__all__ = [
    "ActLinearFunction",
    "act_linear",
    "BlockLinearFunction",
    "block_linear",
    "SparseLinearFunction",
    "check_input",
    "sparse_linear",
    "FewBitActivationFunction",
    "SparseLinearFewBitFunction",
    "fewbit_activation",
    "sparse_linear_fewbit",
    "NMLinearFunction",
    "nm_linear",
]
