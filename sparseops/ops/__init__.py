"""torch.library custom ops, one file per family. Importing this registers them."""

from .csr import csr_backward, csr_dds, csr_dsd, csr_sdd

__all__ = ["csr_dds", "csr_dsd", "csr_sdd", "csr_backward"]
