"""The dense rebuilds behind the CUDA cuBLAS path (``ops._gpu``), checked on the CPU against each
format's own dense weight: they are plain torch, device-agnostic, so CI checks them without a GPU."""

import pytest
import torch

import sparseops
from sparseops.formats.csr import CSRWeight
from sparseops.ops import _gpu
from sparseops.ops.nm import _gather_t
from sparseops.patterns import NM


@pytest.mark.parametrize("out_f, in_f, density", [(1, 1, 1.0), (37, 53, 0.3), (3, 1000, 0.01), (37, 53, 0.0)])
def test_csr_weight(out_f, in_f, density):
    w = torch.randn(out_f, in_f)
    mask = torch.rand(out_f, in_f) < density
    if out_f > 3:
        mask[3] = False  # an empty row
        mask[:, 5 % in_f] = False  # an empty column
    f = CSRWeight.from_mask(mask)
    values = w[mask]  # row-major, the CSR order
    assert torch.equal(_gpu.csr_weight(values, f.crow, f.col, out_f, in_f), w * mask)
    assert torch.equal(_gpu.csr_weight_t(values, f.t_crow, f.t_row, f.t_perm, out_f), (w * mask).t())


@pytest.mark.parametrize(
    "pattern",
    [NM(2, 4), NM(1, 8), NM(3, 5), NM(7, 16), NM(2, 4, transposable=True)],
    ids=["2:4", "1:8", "3:5", "7:16", "2:4T"],
)
@pytest.mark.parametrize("in_f", [37, 64])  # 37: the last group is padded
def test_nm_weight(pattern, in_f):
    lin = torch.nn.Linear(in_f, 24)
    layer = sparseops.SparseLinear.from_dense(lin, pattern=pattern)
    f, v = layer.format, layer.values.detach()
    dense = layer.dense_weight().detach()
    assert torch.equal(_gpu.nm_weight(v, f.idx, f.n, f.m, in_f), dense)
    if f.transposable:
        assert torch.equal(_gpu.nm_weight(_gather_t(v, f.t_slot), f.t_idx, f.n, f.m, 24), dense.t())


def test_thresholds():
    assert not _gpu.use_dense(_gpu.CSR_DENSE_MIN_ROWS - 1, "csr") and _gpu.use_dense(_gpu.CSR_DENSE_MIN_ROWS, "csr")
    assert not _gpu.use_dense(_gpu.NM_DENSE_MIN_ROWS - 1, "nm") and _gpu.use_dense(_gpu.NM_DENSE_MIN_ROWS, "nm")
