"""torch.library custom ops, one file per family. Importing this registers them."""

from .csr import csr_backward, csr_dds, csr_dsd, csr_sdd
from .fewbit import csr_dds_fewbit, fewbit_pack, fewbit_unpack

__all__ = ["csr_dds", "csr_dsd", "csr_sdd", "csr_backward", "fewbit_pack", "fewbit_unpack", "csr_dds_fewbit"]
