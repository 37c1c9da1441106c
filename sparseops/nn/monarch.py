"""MonarchLinear: a drop-in ``nn.Linear`` whose weight is a Monarch matrix (Dao et al., ICML 2022).

The weight is a product of two block-diagonal factors with a reshape-transpose between them,
in the layout of HazyResearch/fly's ``MonarchLinear``: the same parameter names (``blkdiag1``,
``blkdiag2``, ``bias``), shapes and product (its ``blockdiag_butterfly_multiply``), so the same
tensors give the same layer.

## Definition

With ``k = nblocks``, ``p = ceil(in/k)``, ``q = ceil(out/k)`` and ``m = min(p, q)``; ``x [B, in]``
is zero padded to ``in_p = k*p`` and the output sliced from ``out_p = k*q``::

    x~ [B, k, p]   h[b, i, a] = sum_t L[i, a, t] x~[b, i, t]     L = blkdiag1 [k, m, p]   -> h [B, k, m]
    P1             z[b, l, r] = h[b, i, a]  where  i*m + a = r*k + l                       -> z [B, k, m]
                   u[b, l, s] = sum_r R[l, s, r] z[b, l, r]      R = blkdiag2 [k, q, m]   -> u [B, k, q]
    P2             y[b, s*k + l] = u[b, l, s], sliced to [B, out], plus bias

i.e. ``W = (P2 · blockdiag(R) · P1 · blockdiag(L))[:out, :in]``: P1 reads the flat middle axis
``(k, m)`` as ``(m, k)`` and transposes it, so each block of R sees entries from every block of L
(when ``m >= k``), and P2 interleaves the output blocks.

Cost per row: ``k*m*(p + q) = m*(in_p + out_p)`` multiply-adds (and as many parameters), against
``in*out`` dense. For ``in = out = n`` divisible by ``k`` that is ``2*n²/k``: half of dense at ``k = 4``.

## Projection (``from_dense``)

Write the middle index as ``f = i*m + a = r*k + l``, so ``i = f // m``, ``a = f % m``, ``r = f // k``,
``l = f % k``. Then::

    W[s*k + l, i*p + t] = sum_{f in F(i, l)} R[l, s, f // k] * L[i, f % m, t],
    F(i, l) = {f in [0, k*m) : f // m = i, f % k = l}.

Every f, hence every column of R[l] and row of L[i], belongs to exactly one pair (input block i,
output block l). So the ``k²`` slices ``W_il [q, p] = W[l::k rows, i-th p columns]`` are independent,
and the Monarch matrices are exactly the W with ``rank(W_il) <= c_il = |F(i, l)|`` (``m/k`` when k
divides m; 1 in the paper's square case ``n = k²``, where this is its rank-1 projection). The
Frobenius-nearest Monarch matrix is therefore the rank-``c_il`` truncated SVD of every slice
(Eckart-Young), split as ``U sqrt(S)`` into R and ``sqrt(S) Vᵀ`` into L. With padding, it is that
of the zero-padded weight; zeroing rows or columns never raises a rank, so a weight that is
itself Monarch is still recovered exactly. When ``m < k`` some ``c_il`` are 0 and those slices
are zero: the layer is then block sparse as well.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..autograd._once import once_differentiable
from ..autograd import check_input
from . import _autocast
from ._load import load_all_or_nothing
from .linear import _check_dtype


def _check_int(name: str, n, low: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}: expected an int, got {type(n).__name__}")
    if n < low:
        raise ValueError(f"{name}: expected >= {low}, got {n}")
    return n


def monarch_sizes(in_features: int, out_features: int, nblocks: int) -> tuple[int, int, int]:
    """``(p, q, m)``: the block sizes of ``blkdiag1 [k, m, p]`` and ``blkdiag2 [k, q, m]``.

    Raises:
        TypeError: a size is not an int; ValueError: a size is < 1, or ``nblocks > min(in, out)``.
    """
    _check_int("in_features", in_features, 1)
    _check_int("out_features", out_features, 1)
    _check_int("nblocks", nblocks, 1)
    if nblocks > min(in_features, out_features):
        raise ValueError(
            f"nblocks: expected <= min(in_features, out_features) = {min(in_features, out_features)}, got {nblocks}"
        )
    p = -(-in_features // nblocks)
    q = -(-out_features // nblocks)
    return p, q, min(p, q)


def _mid_to_blocks(h: Tensor, B: int, k: int, m: int) -> Tensor:
    """P1: ``h [k(i), B, m(a)] -> z [k(l), B, m(r)]`` (contiguous) with ``i*m + a = r*k + l``."""
    if m % k == 0:
        # r = i*(m/k) + a // k and l = a % k: one strided copy
        return h.view(k, B, m // k, k).permute(3, 1, 0, 2).reshape(k, B, m)
    return h.transpose(0, 1).reshape(B, m, k).permute(2, 0, 1).contiguous()


def _blocks_to_mid(dz: Tensor, B: int, k: int, m: int) -> Tensor:
    """P1ᵀ: ``dz [k(l), B, m(r)] -> dh [k(i), B, m(a)]`` (a view whose rows have unit stride)."""
    return dz.permute(1, 2, 0).reshape(B, k * m).view(B, k, m).transpose(0, 1)


class MonarchFunction(torch.autograd.Function):
    """``y [B, out] = x [B, in] Wᵀ + b`` for the Monarch ``W`` of ``blkdiag1``/``blkdiag2``.

    Saves the padded x and z (the permuted middle activation, ``[k, B, m]``); nothing of size out x in.
    Every product is a ``torch.bmm`` over the block dimension.
    """
    FACTORS = (0, 1, 2)  # forward inputs that multiply each other (see autograd._once)

    # NOTE: the classic forward(ctx, ...) form, as SparseLinearFunction: no per-call signature binding.
    @staticmethod
    def forward(ctx, x, blkdiag1, blkdiag2, bias, out_features: int):
        B, n_in = x.shape
        k, m, p = blkdiag1.shape
        q = blkdiag2.shape[1]
        xp = x if n_in == k * p else F.pad(x, (0, k * p - n_in))  # [B, k*p]
        h = torch.bmm(xp.view(B, k, p).transpose(0, 1), blkdiag1.transpose(1, 2))  # [k, B, m]
        z = _mid_to_blocks(h, B, k, m)  # [k, B, m]
        u = torch.bmm(z, blkdiag2.transpose(1, 2))  # [k, B, q]
        y = u.permute(1, 2, 0).reshape(B, q * k)  # [B, out_p]
        if out_features != q * k:
            y = y[:, :out_features]
        y = y.contiguous() if bias is None else y + bias
        ctx.save_for_backward(xp, z, blkdiag1, blkdiag2)
        ctx.n_in = n_in
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xp, z, blkdiag1, blkdiag2 = ctx.saved_tensors
        need_x, need_l, need_r, need_b = ctx.needs_input_grad[:4]
        B = xp.shape[0]
        k, m, p = blkdiag1.shape
        q = blkdiag2.shape[1]
        dx = dl = dr = db = None
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        if not (need_x or need_l or need_r):
            return dx, dl, dr, db, None
        dyp = dy if dy.shape[1] == q * k else F.pad(dy, (0, q * k - dy.shape[1]))  # [B, out_p]
        # P2ᵀ: du[l, b, s] = dy[b, s*k + l]
        du = dyp.reshape(B, q, k).permute(2, 0, 1).contiguous()  # [k, B, q]
        if need_r:
            dr = torch.bmm(du.transpose(1, 2), z)  # [k, q, m]
        if need_x or need_l:
            dh = _blocks_to_mid(torch.bmm(du, blkdiag2), B, k, m)  # [k, B, m]
            if need_l:
                dl = torch.bmm(dh.transpose(1, 2), xp.view(B, k, p).transpose(0, 1))  # [k, m, p]
            if need_x:
                dx = torch.bmm(dh, blkdiag1).transpose(0, 1).reshape(B, k * p)  # [B, k*p]
                if ctx.n_in != k * p:
                    dx = dx[:, : ctx.n_in]
        return dx, dl, dr, db, None


def _check_factors(blkdiag1, blkdiag2, bias) -> tuple[int, int, int, int]:
    for name, t in (("blkdiag1", blkdiag1), ("blkdiag2", blkdiag2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if blkdiag1.dim() != 3:
        raise ValueError(f"blkdiag1: expected 3-d [k, m, p], got shape {tuple(blkdiag1.shape)}")
    k, m, p = blkdiag1.shape
    if blkdiag2.dim() != 3 or blkdiag2.shape[0] != k or blkdiag2.shape[2] != m:
        raise ValueError(f"blkdiag2: expected shape [{k}, q, {m}] (blkdiag1 is [k, m, p]), got {tuple(blkdiag2.shape)}")
    if blkdiag2.dtype != blkdiag1.dtype or blkdiag2.device != blkdiag1.device:
        raise TypeError(
            f"blkdiag2: expected dtype {blkdiag1.dtype} on {blkdiag1.device} (as blkdiag1), "
            f"got {blkdiag2.dtype} on {blkdiag2.device}"
        )
    q = blkdiag2.shape[1]
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != blkdiag1.dtype or bias.device != blkdiag1.device:
            raise TypeError(
                f"bias: expected dtype {blkdiag1.dtype} on {blkdiag1.device} (as blkdiag1), "
                f"got {bias.dtype} on {bias.device}"
            )
    return k, p, q, m


def monarch_linear(x: Tensor, blkdiag1: Tensor, blkdiag2: Tensor, bias: Tensor | None = None,
                   out_features: int | None = None) -> Tensor:
    """``x [*, in] -> [*, out]`` through the Monarch weight of the two factors (see the module docstring).

    Differentiable in x, blkdiag1, blkdiag2 and bias (a hand-written backward of four bmm's).

    Args:
        x: ``[*, in]`` with ``in <= k*p``; any strides.
        blkdiag1: ``[k, m, p]``.
        blkdiag2: ``[k, q, m]``.
        bias: ``[out]`` or None.
        out_features: ``out <= k*q``; default ``k*q``.

    Returns:
        ``[*, out]``.

    Raises:
        TypeError, ValueError: a bad argument, named in the message.
    """
    k, p, q, m = _check_factors(blkdiag1, blkdiag2, bias)
    if out_features is None:
        out_features = k * q
    _check_int("out_features", out_features, 0)
    if out_features > k * q:
        raise ValueError(f"out_features: expected <= k*q = {k * q} (blkdiag2 is [k, q, m]), got {out_features}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] > k * p:
        raise ValueError(f"x: expected shape [*, in] with in <= k*p = {k * p}, got {tuple(x.shape)}")
    check_input(x, x.shape[-1], blkdiag1)
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])  # [B, in]
    y = MonarchFunction.apply(x2, blkdiag1, blkdiag2, bias, out_features)
    return y.reshape(*lead, out_features)


@torch.no_grad()
def monarch_project(weight: Tensor, nblocks: int) -> tuple[Tensor, Tensor]:
    """The Frobenius-nearest Monarch factors of a dense ``weight [out, in]`` (see the module docstring).

    Exact (to rounding) when ``weight`` is itself Monarch with these sizes.

    Args:
        weight: ``[out, in]``, floating point.
        nblocks: k.

    Returns:
        ``(blkdiag1 [k, m, p], blkdiag2 [k, q, m])`` in ``weight``'s dtype and device.

    Raises:
        TypeError, ValueError: a bad weight (not floating point, not 2-d, NaN or Inf) or nblocks.
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"weight: expected a floating-point torch.Tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2-d [out, in], got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError("weight: expected a tensor with data, got one on the meta device (nothing to project)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight: contains NaN or Inf; the Monarch projection (an SVD per block pair) needs finite values")
    out_f, in_f = weight.shape
    p, q, m = monarch_sizes(in_f, out_f, nblocks)
    k = nblocks
    # the SVD in at least fp32
    work = weight.to(torch.promote_types(weight.dtype, torch.float32))
    wp = F.pad(work, (0, k * p - in_f, 0, k * q - out_f))  # [out_p, in_p]
    # slices[i, l, s, t] = W[s*k + l, i*p + t]
    slices = wp.view(q, k, k, p).permute(2, 1, 0, 3)  # [k, k, q, p]
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # [k, k, q, m], [k, k, m], [k, k, m, p]
    root = s.sqrt()
    f = torch.arange(k * m, device=weight.device)
    i, l, r = f // m, f % k, f // k
    # j: the rank of f among the middle entries of its pair (i, l); r starts at ceil((i*m - l)/k) there
    j = r - torch.div(i * m - l + (k - 1), k, rounding_mode="floor")
    blkdiag1 = (root[i, l, j, None] * vh[i, l, j]).view(k, m, p)  # rows in order f = i*m + a
    blkdiag2 = (u[i, l, :, j] * root[i, l, j, None]).view(m, k, q).permute(1, 2, 0)  # columns in order f = r*k + l
    return blkdiag1.to(weight.dtype).contiguous(), blkdiag2.to(weight.dtype).contiguous()


class MonarchLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` a Monarch matrix of ``nblocks`` blocks; behaves as ``nn.Linear`` does.

    The trainable parameters are ``blkdiag1 [k, m, p]``, ``blkdiag2 [k, q, m]`` and ``bias [out]``
    (``p = ceil(in/k)``, ``q = ceil(out/k)``, ``m = min(p, q)``); the math, the cost and the
    projection are in the module docstring. ``k*m*(p + q)`` weights and multiply-adds per row.

    Initialised so that the entries of ``W`` have ``nn.Linear``'s variance ``1/(3*in)``:
    ``blkdiag1 ~ U(±1/sqrt(p))`` and ``blkdiag2 ~ U(±sqrt(3/m))``; the bias as ``nn.Linear``'s.

    Args:
        in_features, out_features: as ``nn.Linear``, both >= 1.
        nblocks: k, from 1 to ``min(in_features, out_features)``; each factor has k blocks.
            Past ``k*k > min(in, out)`` some (input block, output block) pairs share no path.
        bias: as ``nn.Linear``.
        device, dtype: as ``nn.Linear``.

    Raises:
        TypeError, ValueError: bad sizes or nblocks (the message names the argument).
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        p, q, m = monarch_sizes(in_features, out_features, nblocks)
        _check_dtype(dtype)
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        factory = {"device": device, "dtype": dtype}
        k = nblocks
        self.blkdiag1 = nn.Parameter(torch.empty(k, m, p, **factory).uniform_(-1 / math.sqrt(p), 1 / math.sqrt(p)))
        bound2 = math.sqrt(3 / m)
        self.blkdiag2 = nn.Parameter(torch.empty(k, q, m, **factory).uniform_(-bound2, bound2))
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, nblocks: int = 4) -> "MonarchLinear":
        """Project a trained ``nn.Linear`` onto the Monarch matrices of ``nblocks`` blocks.

        The factors are the Frobenius-nearest ones (a truncated SVD per block pair, see the module
        docstring); a weight that is itself Monarch comes back exactly.

        Returns:
            a MonarchLinear on the linear's device and dtype, with its bias (copied); a frozen weight or
            bias stays frozen, and the train/eval mode carries over.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``; TypeError/ValueError: a bad ``nblocks``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        blkdiag1, blkdiag2 = monarch_project(w, nblocks)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.nblocks = linear.in_features, linear.out_features, nblocks
        # a frozen weight (or bias) stays frozen, and the train/eval mode carries over, as in SparseLinear
        layer.blkdiag1 = nn.Parameter(blkdiag1, requires_grad=linear.weight.requires_grad)
        layer.blkdiag2 = nn.Parameter(blkdiag2, requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        layer.train(linear.training)
        return layer

    @property
    def num_weights(self) -> int:
        """Stored weights (both factors, padding included), ``k*m*(p + q)``."""
        return self.blkdiag1.numel() + self.blkdiag2.numel()

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``[out, in]`` tensor (differentiable in both factors)."""
        eye = torch.eye(self.in_features, dtype=self.blkdiag1.dtype, device=self.blkdiag1.device)
        return monarch_linear(eye, self.blkdiag1, self.blkdiag2, None, self.out_features).T

    @property
    def weight(self) -> Tensor:
        """``dense_weight()``: built from the factors on every access."""
        return self.dense_weight()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's dense weight and bias (frozen where these are, in the same
        train/eval mode)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.blkdiag1.device, dtype=self.blkdiag1.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        # frozen when both factors are (a weight with one trainable factor still learns); train/eval carries over
        lin.weight.requires_grad_(self.blkdiag1.requires_grad or self.blkdiag2.requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        lin.train(self.training)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        # under torch.autocast: x and the parameters in its dtype, as nn.Linear (see nn._autocast)
        return _autocast.run(self, x)

    def _run(self, x: Tensor, dt: torch.dtype | None) -> Tensor:
        b1, b2, bias = (_autocast.param(self, n, dt) for n in ("blkdiag1", "blkdiag2", "bias"))
        check_input(x, self.in_features, b1)
        lead = x.shape[:-1]
        # an explicit row count, as in autograd.csr.apply_flat
        x2 = x.reshape(lead.numel(), self.in_features)  # [B, in]
        y = MonarchFunction.apply(x2, b1, b2, bias, self.out_features)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}, weights={self.num_weights} ({self.num_weights / dense:.4f} of dense)"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # all or nothing: a refused checkpoint leaves the layer as it was (see nn._load)
        load_all_or_nothing(self, self._load_checked, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs)

    def _load_checked(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        other = [k for k in ("values", "crow", "col", "idx", "empty", "weight") if prefix + k in state_dict]
        if other:
            error_msgs.append(
                f"While loading {prefix or 'MonarchLinear'}: the checkpoint holds a sparse or dense weight "
                f"({', '.join(prefix + k for k in other)}), this layer is Monarch (blkdiag1/blkdiag2); build the "
                "layer with the checkpoint's pattern"
            )
            return
        for name in ("blkdiag1", "blkdiag2", "bias"):
            t = state_dict.get(prefix + name)
            if getattr(self, name) is None:
                continue
            want = tuple(getattr(self, name).shape)
            if t is not None and tuple(t.shape) != want:
                error_msgs.append(
                    f"While loading {prefix or 'MonarchLinear'}: the checkpoint's {name} is {list(t.shape)}, this "
                    f"layer (in_features={self.in_features}, out_features={self.out_features}, "
                    f"nblocks={self.nblocks}) has {list(want)}"
                )
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
