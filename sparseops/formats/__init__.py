"""Weight formats: plain containers of index tensors, with validation and dense round trips."""

from .csr import INDEX_DTYPE, CSRWeight, validate_csr
from .nm import NMWeight

__all__ = ["INDEX_DTYPE", "CSRWeight", "validate_csr", "NMWeight"]
