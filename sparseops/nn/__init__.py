"""Modules: SparseLinear and the sparse/few-bit layers that build on it."""

from .linear import SparseLinear

__all__ = ["SparseLinear"]
