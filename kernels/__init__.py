"""Triton kernels of sparseops, installed as ``sparseops.kernels``.

Submodules are imported on demand (``from sparseops.kernels import csr``) so that
importing this package needs no triton and leaves ``TRITON_INTERPRET`` unread.
"""
