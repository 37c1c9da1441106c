"""Pure-torch implementations of every op: the test oracle and the fallback path."""

from .csr import csr_dds, csr_dsd, csr_sdd
from .nm import nm_dds, nm_dsd, nm_dsd_csr, nm_sdd
from .fewbit import fewbit_codes, fewbit_pack, fewbit_unpack

__all__ = ["csr_dds", "csr_dsd", "csr_sdd", "fewbit_codes", "fewbit_pack", "fewbit_unpack", "nm_dds", "nm_dsd", "nm_dsd_csr", "nm_sdd"]
