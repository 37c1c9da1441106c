"""CUDA dispatch of the unstructured and N:M forward and input gradient: Triton kernel or cuBLAS.

Measured on an H100 (``bench/bench_gpu.py``, 2026-11-22, bf16; the JSON is ``bench/gpu/h100_2026-11-22.json``):

- decode, 4096→11008, CUDA-graph replay: the Triton products win over rebuilding the dense
  weight, which costs more than the product itself at this size (90% CSR: 0.055 ms against
  0.243 ms at 1 row; 2:4: 0.176 against 0.851 ms); dense ``F.linear`` takes 0.047 ms;
- training, 4096 rows of 4096→4096, forward + backward: the Triton forward and input
  gradient ran 1.3 ms and 54 ms (2:4) where cuBLAS on the rebuilt weight takes about 0.2 ms each.

So a CUDA call with at least ``CSR_DENSE_MIN_ROWS`` / ``NM_DENSE_MIN_ROWS`` rows rebuilds the
dense weight for the call (one scatter into a transient ``[out, in]`` buffer, freed when the call
returns) and runs cuBLAS; fewer rows run the Triton kernel. The crossover between 16 and 4096 rows
was not measured: the thresholds are set from the two ends (the rebuild's cost over the Triton
kernel's growth with rows). The stored weight stays compressed, so the memory saved at rest is
kept. The weight gradient never takes this path: it stays on the mask (``csr_sdd`` / ``nm_sdd``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# rows of the activation at or above which CUDA forward / input-gradient calls use cuBLAS
CSR_DENSE_MIN_ROWS = 64
NM_DENSE_MIN_ROWS = 128


def use_dense(rows: int, family: str) -> bool:
    """Whether a CUDA product over ``rows`` rows of a ``family`` ("csr" or "nm") weight runs cuBLAS."""
    return rows >= (CSR_DENSE_MIN_ROWS if family == "csr" else NM_DENSE_MIN_ROWS)


def csr_weight(values: Tensor, crow: Tensor, col: Tensor, rows: int, cols: int) -> Tensor:
    """The dense ``[rows, cols]`` matrix of a CSR ``(values, crow, col)``, in ``values.dtype``."""
    r = torch.repeat_interleave(
        torch.arange(rows, device=values.device), (crow[1:] - crow[:-1]).long(), output_size=col.numel()
    )
    w = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    # (row, col) pairs of a CSR are distinct: a plain index_put_
    w.index_put_((r, col.long()), values)
    return w


def csr_weight_t(values: Tensor, t_crow: Tensor, t_row: Tensor, t_perm: Tensor, out_features: int) -> Tensor:
    """The dense ``Wᵀ [in, out]`` from the transposed index (``t_perm`` maps it to ``values``)."""
    return csr_weight(values[t_perm.long()], t_crow, t_row, t_crow.numel() - 1, out_features)


def nm_weight(values: Tensor, idx: Tensor, n: int, m: int, cols: int) -> Tensor:
    """The dense ``[rows, cols]`` matrix of N:M slots ``(values [rows, S], idx)``."""
    from ..formats.nm import _columns

    rows, S = values.shape
    c = _columns(idx, S, n, m)  # [rows, S]: a group's positions are distinct
    w = torch.zeros(rows, -(-cols // m) * m, dtype=values.dtype, device=values.device)
    w.scatter_(1, c.long(), values)
    return w[:, :cols]
