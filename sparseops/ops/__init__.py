"""torch.library custom ops, one file per family. Importing this registers them."""

from .act import act_dds, act_dsd, act_sdd
from .bsr import bsr_dds, bsr_dsd, bsr_sdd
from .csr import csr_backward, csr_dds, csr_dsd, csr_sdd
from .fewbit import csr_dds_fewbit, fewbit_pack, fewbit_unpack
from .nm import nm_dds, nm_dsd, nm_dsd_csr, nm_sdd

__all__ = ["act_dds", "act_dsd", "act_sdd", "bsr_dds", "bsr_dsd", "bsr_sdd", "csr_dds", "csr_dsd", "csr_sdd", "csr_backward", "fewbit_pack", "fewbit_unpack", "csr_dds_fewbit", "nm_dds", "nm_sdd", "nm_dsd", "nm_dsd_csr"]
