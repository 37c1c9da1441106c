"""Pure-torch implementations of every op: the test oracle and the fallback path."""

from .act import act_csr_dds, act_dds, act_dsd, act_mask, act_sdd, union_density
from .bsr import bsr_dds, bsr_dsd, bsr_sdd
from .csr import csr_dds, csr_dsd, csr_sdd
from .nm import nm_dds, nm_dsd, nm_dsd_csr, nm_sdd
from .fewbit import fewbit_codes, fewbit_pack, fewbit_unpack
from .monarch import monarch_dense, monarch_forward

__all__ = ["act_csr_dds", "act_dds", "act_dsd", "act_mask", "act_sdd", "union_density", "bsr_dds", "bsr_dsd", "bsr_sdd", "csr_dds", "csr_dsd", "csr_sdd", "fewbit_codes", "fewbit_pack", "fewbit_unpack", "monarch_dense", "monarch_forward", "nm_dds", "nm_dsd", "nm_dsd_csr", "nm_sdd"]
