"""Weight formats: plain containers of index tensors, with validation and dense round trips."""

from .bsr import BSRWeight
from .csr import INDEX_DTYPE, CSRWeight, validate_csr
from .ell import ELLWeight
from .nm import NMWeight

__all__ = ["BSRWeight", "INDEX_DTYPE", "CSRWeight", "ELLWeight", "validate_csr", "NMWeight"]
