"""torch.library ops for activation-sparse linear layers (see ``reference.act`` for the math).

- ``sparseops::act_dds``: forward ``y [B, out] = s(x) @ weight_t + bias``, skipping inactive inputs;
- ``sparseops::act_dsd``: input gradient ``(dy @ weight_tᵀ) ⊙ mask``, computed on the active entries only;
- ``sparseops::act_sdd``: weight gradient ``dweight_t [in, out] = s(x)ᵀ @ dy`` through s(x)'s nonzeros;
- ``sparseops::act_backward``: both gradients, ``(act_dsd, act_sdd)``, in one pass (the layer's backward);
- ``sparseops::act_csr_dds``: the forward with an unstructured sparse weight, skipping both sparsities
  (see the end of this file).

``weight_t`` is ``Wᵀ [in, out]``, contiguous, and the sparsifier is ``(threshold, relu)``: a 0-d or
``[in]`` threshold, active when ``|v| > threshold`` with ``v = relu(x)`` or ``x``.

CPU (C++): up to ``GEMV_MAX_ROWS`` rows, the forward reads each row of ``weight_t`` that *any* row
activates once (the union, for decode and small batches); above, each row walks its own active set.
A bf16/fp16 ``weight_t`` is read as it is by the decode kernel (widened to fp32 in registers); the
other bf16/fp16 products run the fp32 kernels on fp32 copies (``ops.csr.half_via_fp32``).
CUDA: the forward is the Triton split-K GEMV of ``kernels.act`` (the union again); the two gradients run
the reference (dense GEMMs masked), since GPU training with a sparse input has no kernel here yet.
Other dtypes (fp64) and devices take the reference. On a CPU with AVX-512, the forward and the fused backward of a
batch over ``GEMV_MAX_ROWS`` rows whose sampled share of active inputs is above the measured crossover run masked dense
GEMMs instead (``DENSE_FALLBACK``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._cpp import _C
from ._checks import check_operands, check_threshold, checked, dtypes_ok, mats_ok
from .csr import _CPP_HALF, _CPU, _HALF, _eager_cpu, _eager_cuda, _np, _threads, _use_cpp, half_via_fp32, triton_op


# rows up to which the CPU forward reads the union of the rows' active inputs (one pass over those rows
# of weight_t for all rows) rather than each row's own; the decode range is 1 to 32 tokens
GEMV_MAX_ROWS = 32


# ---- the dense fallback of large batches ----
#
# Above a share of active inputs, the activation-sparse products of a large batch lose to torch's dense GEMMs on a CPU
# with AVX-512 (README, "dense fallback", with the bench/ratio.py rows it was checked on; Xeon, 2 threads, fp32, ms,
# sparse against dense, from an ad hoc sweep of the layer's training step, fresh gradients, backward = step - forward):
# - forward: 72 vs 95 at 30% active, 109 vs 95 at 50% (B=256, 16384->4096); 60 vs 85 and 98 vs 85 (B=1024, 4096^2);
# - backward: 196 vs 237 at 30%, 282 vs 239 at 50% (B=256); 262 vs 196 at 30%, 76 vs 189 at 10% (B=1024); at B=64
#   the sparse one still wins at 50% (25 vs 31).
# There the forward (act_dds) and the fused backward (act_backward) of a batch above GEMV_MAX_ROWS whose sampled density
# is above the crossover run the masked dense GEMMs instead; act_dsd and act_sdd alone (one gradient) and act_csr_dds
# do not. On a CPU without AVX-512 (or a build without the avx512 path) torch's dense kernels are about half as fast and
# the crossover was not measured: nothing changes there. ``DENSE_FALLBACK = False`` turns it off.
DENSE_FALLBACK = True
DENSE_FWD_DENSITY = 0.42


def _dense_bwd_density(batch: int) -> float:
    # 0.2 at B=1024 (the kernels lose there at 30% active), 0.6 from B=256 down (at 50% active a wash at B=256:
    # bench/ratio.py --suite act, 398 ms without the fallback against 419 with it, dense 341-345; B=64 wins)
    return min(0.6, 0.2 * 1024 / max(1, batch))


def _density(x: Tensor, threshold: Tensor, relu: bool) -> float:
    """The share of active inputs in a sample of ``x``: up to 16 rows spread from the first to the last, up to ~4096
    evenly spaced columns of each (0.85 ms at 256 x 16384 with every column, 0.24 ms so). The column step is odd, so
    a pattern that repeats every 2^k channels (heads, interleaving) is not sampled on one phase only."""
    step = max(1, x.shape[1] // 4096) | 1
    rows = torch.linspace(0, x.shape[0] - 1, min(16, x.shape[0])).round().long().unique()
    sample = x[rows][:, ::step]
    if sample.numel() == 0:
        return 0.0
    thr = threshold if threshold.numel() == 1 else threshold.reshape(-1)[::step]
    return reference.act_mask(sample, thr, relu)[1].float().mean().item()


def _masked(x: Tensor, threshold: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """``reference.act_mask`` for fp32 ``x`` in two passes (one compare, one select; 24 -> 8.7 ms at 256 x 16384), with
    the threshold rounded to fp32 first, as the kernels take it (the reference compares a float64 threshold in
    float64)."""
    thr = threshold.to(torch.float32)
    if relu:  # active iff x > 0 and x > threshold, i.e. x > max(threshold, 0); NaN never
        mask = x > thr.clamp(min=0)
    else:
        mask = x.abs() > thr
    return torch.where(mask, x, 0.0), mask


def _avx512_cpu() -> bool:
    # the best path the CPU and the build have, not the one chosen (set_isa): torch's dense kernels use AVX-512
    # whatever ours use
    return _C is not None and _C.best_isa() == "avx512"


def _dense_wins(x: Tensor, threshold: Tensor, relu: bool, limit: float) -> bool:
    return (DENSE_FALLBACK and x.shape[0] > GEMV_MAX_ROWS and _avx512_cpu()
            and _density(x, threshold, relu) > limit)


def _thr(threshold: Tensor) -> Tensor:
    return threshold.detach().reshape(-1).to(torch.float32).contiguous()


def _rows(a: Tensor) -> Tensor:
    # the kernels read contiguous, non-overlapping rows at any row stride (the binding's rule: column
    # stride 1 unless a row holds at most one element, row stride >= columns when there are 2+ rows);
    # anything else (a transposed view, a step slice even of a single row, the stride-0 rows autograd
    # hands back for a sum over the batch, a single column among them) is copied
    rows, cols = a.shape
    if rows == 0 or ((cols <= 1 or a.stride(1) == 1) and (rows <= 1 or a.stride(0) >= cols)):
        return a
    return a.contiguous()


def _check_act(x, dy=None, weight_t=None, bias=None, threshold=None, values=None, out_features=None):
    # the operand checks of every path (see ops._checks); the threshold stays fp32 for 16-bit inputs
    check_operands({"x": x} if dy is None else {"x": x, "dy": dy},
                   same_dtype={"dy": dy, "x": x, "weight_t": weight_t, "values": values, "bias": bias})
    if weight_t is not None:
        want = (x.shape[1], weight_t.shape[-1] if dy is None else dy.shape[1])
        if weight_t.dim() != 2 or tuple(weight_t.shape) != want:
            raise ValueError(f"weight_t: expected shape [{want[0]}, {want[1]}] (x's in_features rows"
                             f"{'' if dy is None else ', dy columns'}), got {tuple(weight_t.shape)}")
        out_features = weight_t.shape[1]
    if bias is not None:
        check_operands({}, bias=bias, out_features=out_features)
    if threshold is not None:
        check_threshold(threshold, x.shape[1])


def _thr_ok(threshold, k: int) -> bool:
    return threshold.dim() <= 1 and threshold.numel() in (1, k)


def _act_ok(x, dy=None, weight_t=None, bias=None, threshold=None, values=None, out_features=None) -> bool:
    # _check_act's conditions, tested quickly (see ops._checks.checked)
    if not (mats_ok(x, dy) and dtypes_ok(x, dy, weight_t, values, bias)):
        return False
    if weight_t is not None:
        if weight_t.dim() != 2 or weight_t.shape[0] != x.shape[1] or (dy is not None and weight_t.shape[1] != dy.shape[1]):
            return False
        out_features = weight_t.shape[1]
    return (bias is None or bias.shape == (out_features,)) and (threshold is None or _thr_ok(threshold, x.shape[1]))


# ---- host ops: cpu -> _C, anything else -> reference ----


@torch.library.custom_op("sparseops::act_dds_host", mutates_args=())
def act_dds_host(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], threshold: Tensor, relu: bool) -> Tensor:
    return reference.act_dds(x, weight_t, bias, threshold, relu)


@act_dds_host.register_kernel("cpu")
@checked(lambda x, weight_t, bias, threshold, relu: _check_act(x, weight_t=weight_t, bias=bias, threshold=threshold),
         ok=lambda x, weight_t, bias, threshold, relu: _act_ok(x, weight_t=weight_t, bias=bias, threshold=threshold))
def _act_dds_cpu(x, weight_t, bias, threshold, relu):
    B, K = x.shape
    if _C is not None and x.dtype in _HALF and weight_t.dtype == x.dtype and B <= GEMV_MAX_ROWS:
        # decode with a 16-bit weight: the kernel reads the active rows of weight_t as they are (half
        # the bytes of fp32) and widens them in registers; x, bias and y are small, converted here
        N = weight_t.shape[1]
        y = torch.empty(B, N, dtype=torch.float32, device=_CPU)
        b = None if bias is None else _np(bias.float().contiguous())
        _C.act_gemv16(_np(_rows(x.float())), _np(_thr(threshold.float())), relu,
                      _np(weight_t.contiguous().view(torch.int16)), _CPP_HALF[x.dtype], b, _np(y),
                      _threads(B * K * N))
        return y.to(x.dtype)
    return _act_dds_cpu32(x, weight_t, bias, threshold, relu)


@half_via_fp32
def _act_dds_cpu32(x, weight_t, bias, threshold, relu):
    if not _use_cpp(x, weight_t, *(() if bias is None else (bias,))):
        return reference.act_dds(x, weight_t, bias, threshold, relu)
    if _dense_wins(x, threshold, relu, DENSE_FWD_DENSITY):
        xs = _masked(x, threshold, relu)[0]
        return xs @ weight_t if bias is None else torch.addmm(bias, xs, weight_t)
    B, K = x.shape
    N = weight_t.shape[1]
    y = torch.empty(B, N, dtype=torch.float32, device=_CPU)
    b = None if bias is None else _np(bias.contiguous())
    kernel = _C.act_gemv if B <= GEMV_MAX_ROWS else _C.act_spmm
    kernel(_np(_rows(x)), _np(_thr(threshold)), relu, _np(weight_t.contiguous()), b, _np(y), _threads(B * K * N))
    return y


@act_dds_host.register_fake
def _(x, weight_t, bias, threshold, relu):
    return x.new_empty(x.shape[0], weight_t.shape[1])


def _check_dsd(dy, x, weight_t, threshold, relu):
    """The operand checks of the ops taking (dy, x, weight_t, threshold, relu): act_dsd and act_backward."""
    _check_act(x, dy=dy, weight_t=weight_t, threshold=threshold)


def _ok_dsd(dy, x, weight_t, threshold, relu):
    return _act_ok(x, dy=dy, weight_t=weight_t, threshold=threshold)


@torch.library.custom_op("sparseops::act_dsd_host", mutates_args=())
def act_dsd_host(dy: Tensor, x: Tensor, weight_t: Tensor, threshold: Tensor, relu: bool) -> Tensor:
    return reference.act_dsd(dy, x, weight_t, threshold, relu)


@act_dsd_host.register_kernel("cpu")
@checked(_check_dsd, ok=_ok_dsd)
@half_via_fp32
def _act_dsd_cpu(dy, x, weight_t, threshold, relu):
    if not _use_cpp(dy, x, weight_t):
        return reference.act_dsd(dy, x, weight_t, threshold, relu)
    dx = torch.empty(x.shape, dtype=torch.float32, device=_CPU)
    _C.act_dsd(_np(_rows(dy)), _np(_rows(x)), _np(_thr(threshold)), relu, _np(weight_t.contiguous()), _np(dx),
               _threads(x.numel() * dy.shape[1]))
    return dx


@act_dsd_host.register_fake
def _(dy, x, weight_t, threshold, relu):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparseops::act_sdd_host", mutates_args=())
def act_sdd_host(dy: Tensor, x: Tensor, threshold: Tensor, relu: bool) -> Tensor:
    return reference.act_sdd(dy, x, threshold, relu)


@act_sdd_host.register_kernel("cpu")
@checked(lambda dy, x, threshold, relu: _check_act(x, dy=dy, threshold=threshold),
         ok=lambda dy, x, threshold, relu: _act_ok(x, dy=dy, threshold=threshold))
@half_via_fp32
def _act_sdd_cpu(dy, x, threshold, relu):
    if not _use_cpp(dy, x):
        return reference.act_sdd(dy, x, threshold, relu)
    dw = torch.empty(x.shape[1], dy.shape[1], dtype=torch.float32, device=_CPU)
    _C.act_sdd(_np(_rows(dy)), _np(_rows(x)), _np(_thr(threshold)), relu, _np(dw), _threads(x.numel() * dy.shape[1]))
    return dw


@act_sdd_host.register_fake
def _(dy, x, threshold, relu):
    return dy.new_empty(x.shape[1], dy.shape[1])


def _backward_reference(dy, x, weight_t, threshold, relu):
    return reference.act_dsd(dy, x, weight_t, threshold, relu), reference.act_sdd(dy, x, threshold, relu)


@torch.library.custom_op("sparseops::act_backward_host", mutates_args=())
def act_backward_host(dy: Tensor, x: Tensor, weight_t: Tensor, threshold: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    return _backward_reference(dy, x, weight_t, threshold, relu)


@act_backward_host.register_kernel("cpu")
@checked(_check_dsd, ok=_ok_dsd)
@half_via_fp32
def _act_backward_cpu(dy, x, weight_t, threshold, relu):
    if not _use_cpp(dy, x, weight_t):
        return _backward_reference(dy, x, weight_t, threshold, relu)
    if _dense_wins(x, threshold, relu, _dense_bwd_density(x.shape[0])):
        xs, mask = _masked(x, threshold, relu)
        # filled, not multiplied by the mask: an inf in dy @ weight_tᵀ must give 0 at an inactive input, as the kernel;
        # and dx stays row-major whatever x's layout
        dx = dy @ weight_t.t()
        return dx.masked_fill_(~mask, 0.0), xs.t() @ dy
    dx = torch.empty(x.shape, dtype=torch.float32, device=_CPU)
    dw = torch.empty(x.shape[1], dy.shape[1], dtype=torch.float32, device=_CPU)
    _C.act_backward(_np(_rows(dy)), _np(_rows(x)), _np(_thr(threshold)), relu, _np(weight_t.contiguous()), _np(dx),
                    _np(dw), _threads(2 * x.numel() * dy.shape[1]))
    return dx, dw


@act_backward_host.register_fake
def _(dy, x, weight_t, threshold, relu):
    return x.new_empty(x.shape), dy.new_empty(x.shape[1], dy.shape[1])


# ---- public ops: cuda -> triton (forward) or reference (gradients), else -> host op ----


@triton_op("sparseops::act_dds")
def act_dds(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], threshold: Tensor, relu: bool) -> Tensor:
    """Forward ``y [B, out] = s(x) [B, in] @ weight_t [in, out] + bias``, reading only active rows of ``weight_t``."""
    if x.device.type == "cuda":
        from ..kernels import act as K

        return K.act_dds(x, weight_t, bias, threshold, relu)
    return act_dds_host(x, weight_t, bias, threshold, relu)


@triton_op("sparseops::act_dsd")
def act_dsd(dy: Tensor, x: Tensor, weight_t: Tensor, threshold: Tensor, relu: bool) -> Tensor:
    """Input gradient ``dx [B, in] = (dy @ weight_tᵀ) ⊙ mask``: the sparsifier's derivative is its mask."""
    if dy.device.type == "cuda":
        return reference.act_dsd(dy, x, weight_t, threshold, relu)
    return act_dsd_host(dy, x, weight_t, threshold, relu)


@triton_op("sparseops::act_sdd")
def act_sdd(dy: Tensor, x: Tensor, threshold: Tensor, relu: bool) -> Tensor:
    """Weight gradient ``dweight_t [in, out] = s(x)ᵀ @ dy``; rows of inputs that no row activates are 0."""
    if dy.device.type == "cuda":
        return reference.act_sdd(dy, x, threshold, relu)
    return act_sdd_host(dy, x, threshold, relu)


@triton_op("sparseops::act_backward")
def act_backward(dy: Tensor, x: Tensor, weight_t: Tensor, threshold: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """Both gradients, ``(act_dsd, act_sdd)``, in one pass: on CPU each active ``(b, j)`` reads row ``b`` of ``dy``
    once for both, and only the rows of ``weight_t`` that some row activates are read."""
    if dy.device.type == "cuda":
        return _backward_reference(dy, x, weight_t, threshold, relu)
    return act_backward_host(dy, x, weight_t, threshold, relu)


# eager cpu calls go straight to the c++ kernels (see ops.csr)
act_dds.register_kernel("cpu")(_act_dds_cpu)
act_dsd.register_kernel("cpu")(_act_dsd_cpu)
act_sdd.register_kernel("cpu")(_act_sdd_cpu)
act_backward.register_kernel("cpu")(_act_backward_cpu)


def dds(x, weight_t, bias, threshold, relu: bool) -> Tensor:
    if _eager_cpu(x):
        return _act_dds_cpu.unchecked(x, weight_t, bias, threshold, relu)
    if _eager_cuda(x):
        return act_dds.body(x, weight_t, bias, threshold, relu)
    return torch.ops.sparseops.act_dds(x, weight_t, bias, threshold, relu)


def dsd(dy, x, weight_t, threshold, relu: bool) -> Tensor:
    if _eager_cpu(dy):
        return _act_dsd_cpu.unchecked(dy, x, weight_t, threshold, relu)
    if _eager_cuda(dy):
        return act_dsd.body(dy, x, weight_t, threshold, relu)
    return torch.ops.sparseops.act_dsd(dy, x, weight_t, threshold, relu)


def backward(dy, x, weight_t, threshold, relu: bool) -> tuple[Tensor, Tensor]:
    if _eager_cpu(dy):
        return _act_backward_cpu.unchecked(dy, x, weight_t, threshold, relu)
    if _eager_cuda(dy):
        return act_backward.body(dy, x, weight_t, threshold, relu)
    return torch.ops.sparseops.act_backward(dy, x, weight_t, threshold, relu)


def sdd(dy, x, threshold, relu: bool) -> Tensor:
    if _eager_cpu(dy):
        return _act_sdd_cpu.unchecked(dy, x, threshold, relu)
    if _eager_cuda(dy):
        return act_sdd.body(dy, x, threshold, relu)
    return torch.ops.sparseops.act_sdd(dy, x, threshold, relu)


# ---- weight- and activation-sparse forward: s(x) @ Wᵀ with W unstructured (inference) ----
#
# ``sparseops::act_csr_dds(x, t_crow, t_col, t_values, bias, threshold, relu, out_features)``:
# ``y = s(x) @ M + bias`` with ``M = Wᵀ [in, out]`` as CSR over the inputs (``t_crow [in+1]``, ``t_col``
# the output of each stored weight, ascending within a row, ``t_values``). The CPU kernel (fp32, C++)
# reads only the rows of M that some row of x activates, and in them only the stored weights: both
# sparsities are skipped. Other dtypes and devices take the reference (a dense M). No autograd: the
# layers call it without gradients only (their training path runs the weight-sparse kernels on s(x)).


def _act_csr_dds_ref(x, t_crow, t_col, t_values, bias, threshold, relu, out_features):
    # the reference, after the checks the binding makes (so a hand-made index gets the same ValueError)
    from .csr import _check_index

    _check_index("t_crow", t_crow, "t_col", t_col, x.shape[1], out_features)
    if t_values.shape != t_col.shape:
        raise ValueError(f"t_values: expected {t_col.numel()} entries (one per t_col), got {tuple(t_values.shape)}")
    return reference.act_csr_dds(x, t_crow, t_col, t_values, bias, threshold, relu, out_features)


@torch.library.custom_op("sparseops::act_csr_dds", mutates_args=())
def act_csr_dds(x: Tensor, t_crow: Tensor, t_col: Tensor, t_values: Tensor, bias: Optional[Tensor],
                threshold: Tensor, relu: bool, out_features: int) -> Tensor:
    return _act_csr_dds_ref(x, t_crow, t_col, t_values, bias, threshold, relu, out_features)


@act_csr_dds.register_kernel("cpu")
@checked(lambda x, t_crow, t_col, t_values, bias, threshold, relu, out_features: _check_act(
    x, values=t_values, bias=bias, threshold=threshold, out_features=out_features),
    ok=lambda x, t_crow, t_col, t_values, bias, threshold, relu, out_features: _act_ok(
        x, values=t_values, bias=bias, threshold=threshold, out_features=out_features))
@half_via_fp32
def _act_csr_dds_cpu(x, t_crow, t_col, t_values, bias, threshold, relu, out_features):
    if not _use_cpp(x, t_values, *(() if bias is None else (bias,))):
        return _act_csr_dds_ref(x, t_crow, t_col, t_values, bias, threshold, relu, out_features)
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=_CPU)
    b = None if bias is None else _np(bias.contiguous())
    _C.act_csr_gemv(_np(_rows(x)), _np(_thr(threshold)), relu, _np(t_crow.contiguous()), _np(t_col.contiguous()),
                    _np(t_values.contiguous()), out_features, b, _np(y), _threads(x.shape[0] * t_values.numel()))
    return y


@act_csr_dds.register_fake
def _(x, t_crow, t_col, t_values, bias, threshold, relu, out_features):
    return x.new_empty(x.shape[0], out_features)


def csr_dds(x, t_crow, t_col, t_values, bias, threshold, relu: bool, out_features: int) -> Tensor:
    if _eager_cpu(x):
        return _act_csr_dds_cpu.unchecked(x, t_crow, t_col, t_values, bias, threshold, relu, out_features)
    return torch.ops.sparseops.act_csr_dds(x, t_crow, t_col, t_values, bias, threshold, relu, out_features)
