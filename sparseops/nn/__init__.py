"""Modules: SparseLinear and the sparse/few-bit layers that build on it."""

from .activation import (
    FewBitActivation,
    FewBitCELU,
    FewBitELU,
    FewBitGELU,
    FewBitHardsigmoid,
    FewBitHardswish,
    FewBitHardtanh,
    FewBitLeakyReLU,
    FewBitLogSigmoid,
    FewBitMish,
    FewBitReLU,
    FewBitReLU6,
    FewBitSELU,
    FewBitSigmoid,
    FewBitSiLU,
    FewBitSoftplus,
    FewBitSoftsign,
    FewBitTanh,
)
from .act import ActivationSparseLinear, calibrate_
from .linear import SparseLinear
from .monarch import MonarchLinear

__all__ = [
    "ActivationSparseLinear",
    "calibrate_",
    "SparseLinear",
    "MonarchLinear",
    "FewBitActivation",
    "FewBitGELU",
    "FewBitSiLU",
    "FewBitTanh",
    "FewBitSigmoid",
    "FewBitSoftplus",
    "FewBitELU",
    "FewBitSELU",
    "FewBitCELU",
    "FewBitMish",
    "FewBitLogSigmoid",
    "FewBitHardswish",
    "FewBitSoftsign",
    "FewBitReLU",
    "FewBitLeakyReLU",
    "FewBitReLU6",
    "FewBitHardtanh",
    "FewBitHardsigmoid",
]
