"""Pure-torch implementations of every op: the test oracle and the fallback path."""

from .csr import csr_dds, csr_dsd, csr_sdd

__all__ = ["csr_dds", "csr_dsd", "csr_sdd"]
