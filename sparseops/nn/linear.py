"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored sparse."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..autograd import block_linear, fewbit_activation, nm_linear, sparse_linear, sparse_linear_fewbit
from ..autograd.csr import _LAYER_DTYPES
from ..fewbit.functional import check_bits, default_bits, table_bits
from ..fewbit.table import ACTIVATIONS, activation_fn
from ..formats import INDEX_DTYPE, BSRWeight, CSRWeight, ELLWeight, NMWeight
from ..formats.bsr import grid_shape
from ..masks import for_pattern
from . import _autocast
from ._load import load_all_or_nothing
from ._optim import replace_parameter
from ..masks.nm import is_nm
from ..masks.transposable import is_transposable_nm
from ..ops.repack import gather, repack
from ..patterns import NM, Block, Butterfly, FanIn, as_pattern

# crow/col are the checkpointed structure; the rest is derived and rebuilt on load
_PERSISTENT = ("crow", "col")
_DERIVED = ("row", "t_crow", "t_row", "t_perm")
# N:M: the slot positions and the empty slots are checkpointed, Wᵀ's index is rebuilt on load
_NM_PERSISTENT = ("idx", "empty")
_NM_DERIVED = ("t_crow", "t_row", "t_perm", "t_idx", "t_slot")
# fan-in (ELL): the held rows and the [rows, k] columns are checkpointed; the CSR view the kernels read
# (row pointers, COO rows, the transposed index) is rebuilt on load
_ELL_PERSISTENT = ("rows", "col")
_ELL_DERIVED = ("crow", "row", "t_crow", "t_row", "t_perm")


def _check_features(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}: expected an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name}: expected >= 0, got {n}")
    return n


def _check_dtype(dtype) -> None:
    # nn.init fails on an integer dtype with a NotImplementedError that names no argument
    dt = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dt, torch.dtype) or dt not in _LAYER_DTYPES:
        raise TypeError(f"dtype: expected torch.float32, bfloat16, float16 or float64, got {dt}")


def _check_mask(mask, out_features: int, in_features: int, device) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if mask.device.type == "meta":
        raise ValueError("mask: expected a tensor with data (cpu or cuda), got one on the meta device")
    if tuple(mask.shape) != (out_features, in_features):
        raise ValueError(f"mask: expected shape ({out_features}, {in_features}) = (out, in), got {tuple(mask.shape)}")
    return mask.to(device)


def _check_block_padding(values, fmt: BSRWeight) -> None:
    """A block checkpoint's ``values`` hold 0 outside ``[out, in]`` (the ragged edge blocks' padding): the
    kernels multiply that padding by zero-padded activations, so a NaN or inf there would reach every output
    of its rows. Raises ValueError otherwise."""
    if values is None or values.dim() != 3 or tuple(values.shape[1:]) != (fmt.block, fmt.block):
        return  # the shape check reports it
    pad = ~fmt.padding_mask().to(values.device)
    if pad.any() and bool(values[pad].ne(0).any()):
        raise ValueError("values: nonzero in the padding of a ragged edge block (the entries outside [out, in] "
                         "must be 0)")


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` sparse; behaves as ``nn.Linear`` does.

    The trainable parameter is ``values``, the stored weights (``[nnz]`` unstructured, ``[rows, k]``
    fan-in, ``[out, slots]`` N:M, ``[nblk, b, b]`` block); positions off the mask are not stored and so
    stay exactly zero through training. The index buffers ``state_dict`` round-trips are ``crow``/``col``
    (CSR, BSR), ``rows``/``col`` (fan-in) or ``idx``/``empty`` (N:M); the transposed index is rebuilt
    on load.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        sparsity: fraction of zeros in [0, 1); the weight is initialised as ``nn.Linear``
            does and then magnitude-pruned to it (unstructured; N:M and fan-in fix their own).
        mask: bool ``[out, in]``; fixes the pattern exactly (exclusive with ``sparsity``), and
            must satisfy ``pattern``.
        pattern: ``"unstructured"`` (the default), ``NM(n, m, transposable=False)`` or ``"n:m"``,
            ``FanIn(k)``, ``Block(size)`` or ``"block:32"``, or ``Butterfly(...)``. N:M is stored
            compressed (``values [out, ceil(in/m)*n]`` plus 4-bit positions, see ``formats.nm``);
            Block and Butterfly as BSR (``values [nblk, b, b]``, see ``formats.bsr``; ``sparsity``
            then counts zero blocks); unstructured as CSR (``values [nnz]``); fan-in as ELL (``values [rows, k]``,
            ``col [rows, k]`` over the ``rows`` that hold weights, see ``formats.ell``). A Butterfly
            with ``rank > 0`` adds a trainable low-rank term ``lr_u [out, r] @ lr_v [r, in]``
            (Pixelfly), initialised from the top singular pairs of the weight the mask drops.
        activation: None, or a name of ``sparseops.fewbit.ACTIVATIONS`` (torch's default
            parameters): the layer then computes ``act(x Wᵀ + b)`` in one op and saves the
            ``act_bits``-bit codes of ``x Wᵀ + b`` for backward instead of the pre-activation.
        act_bits: 1 to 4; default 2, or the exact count (1 or 2) for piecewise-linear activations.
        device, dtype: as ``nn.Linear``.

    Raises:
        TypeError, ValueError: bad sizes, sparsity, mask or pattern (the message names the argument).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity: float | None = None,
        mask: Tensor | None = None,
        pattern="unstructured",
        activation: str | None = None,
        act_bits: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._set_activation(activation, act_bits, device)
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.pattern = as_pattern(pattern)
        _check_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **factory)
        if weight.device.type == "meta":
            raise ValueError("device: a SparseLinear builds its index from a mask, which needs data; the meta device "
                             "holds none (build it on cpu or cuda)")
        # the same initialisation as nn.Linear.reset_parameters
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if mask is not None:
            mask = _check_mask(mask, out_features, in_features, weight.device)
        mask = for_pattern(self.pattern, weight, sparsity, mask)
        # values first, bias second: nn.Linear's order (weight, bias), so that an optimizer built over a fresh
        # sparsified model lines up with one whose nn.Linear's weight slot took the values (GradualPruner's swap)
        self.register_parameter("values", None)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._pack(weight, mask)

    def _set_activation(self, activation, act_bits, device) -> None:
        if activation is None:
            if act_bits is not None:
                raise ValueError("act_bits: only meaningful with an activation, got activation=None")
            self.activation, self.act_bits = None, None
            return
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected None or one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.act_bits = check_bits(default_bits(activation) if act_bits is None else act_bits, "act_bits")
        borders, levels = table_bits(activation, self.act_bits)
        # fp32 bit patterns in int32: .to(dtype) must not round the table (see nn.activation)
        where = torch.get_default_device() if device is None else device  # (made on the CPU)
        self.register_buffer("act_borders_bits", borders.to(where), persistent=False)
        self.register_buffer("act_levels_bits", levels.to(where), persistent=False)

    @property
    def _is_nm(self) -> bool:
        return isinstance(self.pattern, NM)

    @property
    def _block(self) -> int:
        """The BSR block side, or 0 for a layer that is not block-sparse."""
        p = self.pattern
        return p.size if isinstance(p, Block) else p.block if isinstance(p, Butterfly) else 0

    @property
    def _rank(self) -> int:
        return self.pattern.rank if isinstance(self.pattern, Butterfly) else 0

    @property
    def _is_ell(self) -> bool:
        return isinstance(self.pattern, FanIn)

    def _names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self._is_ell:
            return (_ELL_PERSISTENT, _ELL_DERIVED)
        return (_NM_PERSISTENT, _NM_DERIVED) if self._is_nm else (_PERSISTENT, _DERIVED)

    def _pack(self, weight: Tensor, mask: Tensor) -> None:
        w = weight.detach()
        if self._is_nm:
            p = self.pattern
            fmt, values = NMWeight.from_dense(w, mask, p.n, p.m, p.transposable)
        elif self._block:
            fmt, values = BSRWeight.from_dense(w, mask, self._block)
        elif self._is_ell:
            fmt, values = ELLWeight.from_dense(w, mask)
        else:
            fmt, values = CSRWeight.from_dense(w, mask)
        self._set_index(fmt)
        self.values = nn.Parameter(values.clone())
        if self._rank:
            self._init_low_rank(torch.where(mask, torch.zeros_like(w), w))

    def _init_low_rank(self, residual: Tensor) -> None:
        # the best rank-r approximation of what the mask drops (randomised svd: a full one of a
        # 4096 x 4096 weight takes seconds)
        r = self._rank
        out_f, in_f = residual.shape
        u = residual.new_zeros(out_f, r)
        v = residual.new_zeros(r, in_f)
        q = min(r, out_f, in_f)
        if q and not bool(torch.isfinite(residual).all()):
            raise ValueError("weight: contains NaN or Inf where the butterfly mask drops it; the low-rank term is an "
                             "SVD of those weights and needs finite values")
        if q:
            U, S, V = torch.svd_lowrank(residual.float(), q=min(q + 8, out_f, in_f), niter=2)
            root = S[:q].sqrt()
            u[:, :q] = (U[:, :q] * root).to(residual.dtype)
            v[:q] = (V[:, :q] * root).t().to(residual.dtype)
        self.lr_u = nn.Parameter(u)
        self.lr_v = nn.Parameter(v)

    def _set_index(self, fmt) -> None:
        # [out, in], checkpointed so that a weight of another shape cannot load silently; an N:M layer's adds
        # [n, m, transposable]: 1:4 and 2:8 (or 2:4 and 4:8) indexes have the same shapes, and a checkpoint
        # of one loaded into the other would put its weights on other columns
        shape = [fmt.out_features, fmt.in_features]
        if isinstance(fmt, NMWeight):
            shape += [fmt.n, fmt.m, int(fmt.transposable)]
        self.register_buffer("dense_shape", torch.tensor(shape, dtype=torch.int64, device=fmt.device))
        persistent, derived = self._names()
        src = fmt.grid if isinstance(fmt, BSRWeight) else fmt
        for name in persistent:
            self.register_buffer(name, getattr(src, name), persistent=True)
        view = fmt.csr if isinstance(fmt, ELLWeight) else src
        for name in derived:
            self.register_buffer(name, getattr(view, name), persistent=False)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: float | None = None,
        *,
        mask: Tensor | None = None,
        pattern="unstructured",
        activation: str | None = None,
        act_bits: int | None = None,
    ) -> "SparseLinear":
        """Sparsify a trained ``nn.Linear``: magnitude-prune to ``sparsity``, or keep ``mask``.

        ``activation``/``act_bits`` fuse a few-bit activation after it, as in the constructor.

        Returns:
            a SparseLinear on the linear's device and dtype, holding its weights on the mask and its bias.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``; ValueError/TypeError: bad sparsity or mask.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        pat = as_pattern(pattern)
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("linear: its weight is on the meta device, with no data to prune or pack; materialize it "
                             "first (to_empty, then load_state_dict)")
        if mask is not None:
            mask = _check_mask(mask, *w.shape, w.device)
        mask = for_pattern(pat, w, sparsity, mask)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.pattern = pat
        layer._set_activation(activation, act_bits, w.device)
        layer.register_parameter("values", None)  # before bias, as in __init__
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        layer._pack(w, mask)
        # a frozen layer stays frozen (a Pixelfly's low-rank factors too), and the mode (train / eval) carries over
        for p in (layer.values, *((layer.lr_u, layer.lr_v) if layer._rank else ())):
            p.requires_grad_(linear.weight.requires_grad)
        layer.train(linear.training)
        return layer

    @torch.no_grad()
    def update_mask_(self, mask: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-pack the layer in place onto ``mask``: the same module, a new index and new ``values``.

        Weights on both the old and the new mask keep their values; newly grown positions start at 0.
        ``values`` becomes a new Parameter (a resized one would keep autograd's record of the old
        shape while an earlier graph is alive), with the old one's ``.grad`` re-laid the same way (0 for
        grown weights) when it has one: pass the ``optimizer`` that trains it, and the new
        Parameter takes the old one's place there, with every state tensor of its shape (Adam's
        moments, SGD's momentum) following the surviving weights the same way and 0 for grown ones;
        scalars such as Adam's ``step`` are kept.

        CSR layers (unstructured, fan-in) go through :meth:`rewire_` (the C++ re-pack on CPU); N:M and
        block layers through a dense scatter/gather.

        Raises:
            TypeError, ValueError: ``mask`` is not a bool ``[out, in]`` tensor, or breaks the pattern.
        """
        mask = _check_mask(mask, self.out_features, self.in_features, self.values.device)
        old = self.format
        if self._is_nm:
            p = self.pattern
            if not (is_transposable_nm(mask, p.n, p.m) if p.transposable else is_nm(mask, p.n, p.m)):
                raise ValueError(f"mask: breaks the layer's pattern {p.name}")
            new = NMWeight.from_mask(mask, p.n, p.m, p.transposable)
        elif self._block:
            new = BSRWeight.from_mask(mask, self._block)
        else:
            if isinstance(self.pattern, FanIn):
                _fan_in_of(mask.sum(1), self.pattern, "mask: its rows")
                old = old.csr
            # the same re-pack as rewire_: keep the stored entries the mask keeps, grow the rest of it
            flat = mask.to(self.crow.device).reshape(-1)
            keys = old.row.long() * self.in_features + old.col.long()
            kept = flat[keys].nonzero().flatten()
            grown_mask = flat.clone()
            grown_mask[keys] = False
            self.rewire_(kept, grown_mask.nonzero().flatten(), optimizer)
            return
        remap = _remapper(old, new, self.in_features)
        old_param = self.values
        self._set_index(new)
        self.values = nn.Parameter(remap(old_param.detach()), requires_grad=old_param.requires_grad)
        if old_param.grad is not None:  # re-laid as the values (a call between backward and step keeps it)
            self.values.grad = remap(old_param.grad)
        if optimizer is not None:
            replace_parameter(optimizer, old_param, self.values, remap)

    @torch.no_grad()
    def prune_(self, keep: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Drop the stored weights where ``keep [nnz]`` (bool, in ``values`` order) is False, in place.

        The drop-only case of :meth:`rewire_` for unstructured layers, with no dense mask: ``values``
        and the optimizer's state tensors of its shape become their ``[keep]`` entries (a new
        Parameter, as in :meth:`update_mask_`).

        Raises:
            TypeError: the layer is not unstructured (N:M, fan-in and block patterns would break), or
                ``keep`` is not bool; ValueError: ``keep`` has the wrong shape.
        """
        if self._is_nm or self._block or isinstance(self.pattern, FanIn):
            raise TypeError(f"prune_: only unstructured layers drop freely; use update_mask_ for {self.pattern.name}")
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"keep: expected a bool torch.Tensor, got {getattr(keep, 'dtype', type(keep).__name__)}")
        if tuple(keep.shape) != (self.nnz,):
            raise ValueError(f"keep: expected shape ({self.nnz},) (one per stored weight), got {tuple(keep.shape)}")
        kept = keep.to(self.crow.device).nonzero().flatten()
        self.rewire_(kept, kept.new_zeros(0), optimizer)

    @torch.no_grad()
    def rewire_(self, kept: Tensor, grown: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the stored weights at ``kept`` and add new ones at ``grown``, re-packing the index in place.

        The mask update of dynamic sparse training without a dense mask: the C++ re-pack (CPU) merges the
        kept and grown entries row by row and builds both orientations of the index in one pass. Kept
        weights keep their values, grown ones start at 0; ``values`` becomes a new Parameter and the
        ``optimizer``'s state follows as in :meth:`update_mask_` (moments of kept weights kept, 0 for
        grown ones; Rprop's step size starts at the learning rate and Adagrad's sum at its
        ``initial_accumulator_value``, as those optimizers start any weight).

        Args:
            kept: int64 ``[nk]``, strictly ascending positions into ``values``.
            grown: int64 ``[ng]``, strictly ascending flat positions ``row * in_features + col`` of the
                new weights; none of them may be a kept one (a stored position that ``kept`` leaves out
                and ``grown`` names starts afresh at 0, with fresh optimizer state).
            optimizer: the optimizer that trains ``values``, if any.

        Raises:
            TypeError: the layer is not unstructured or fan-in, or an argument is not an int64 tensor.
            ValueError: a position out of range, out of order or grown twice; for a fan-in layer, rows that
                would not all hold the same number of weights (a row may hold none: an ablated neuron).
        """
        if self._is_nm or self._block:
            raise TypeError(f"rewire_: only unstructured and fan-in layers re-pack freely; use update_mask_ for "
                            f"{self.pattern.name}")
        dev = self.crow.device
        for name, t in (("kept", kept), ("grown", grown)):
            if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
                raise TypeError(f"{name}: expected a 1-D int64 torch.Tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
        kept, grown = kept.to(dev), grown.to(dev)
        old = self.format
        ell = isinstance(old, ELLWeight)
        if ell:
            old = old.csr
        pattern = self.pattern
        old_param = self.values
        # values and every optimizer state tensor laid out like them, re-mapped in the re-pack's merge
        # (flat, in CSR order: a fan-in layer's [rows, k] values flatten to it)
        state = optimizer.state.get(old_param, {}) if optimizer is not None else {}
        same = [v for v in state.values() if isinstance(v, Tensor) and v.shape == old_param.shape]
        grad = old_param.grad  # re-laid as well (a call between backward and step must not lose it)
        if grad is not None and grad.shape == old_param.shape:
            same.append(grad)
        # the re-pack validates the positions and builds the new index aside; nothing is replaced until the
        # fan-in check below has passed on the new row lengths
        new, src, (values, *rest) = repack(old, kept, grown, [old_param.detach().reshape(-1),
                                                              *(t.reshape(-1) for t in same)])
        shape = values.shape
        if ell:
            _fan_in_of(new.crow.long().diff(), pattern, "kept, grown: the rows would")
            new = ELLWeight.from_csr(new, "kept, grown: the rows would")
            pattern = pattern if new.k == pattern.k else FanIn(new.k)
            shape = new.values_shape
        new = new.to(dev)
        src = src.to(self.values.device)
        moved = {id(t): o.view(shape) for t, o in zip(same, rest)}
        values = values.view(shape)

        def remap(t):
            return moved[id(t)] if id(t) in moved else gather(src, [t.reshape(-1)])[0].view(shape)

        self._set_index(new)
        self.pattern = pattern
        self.values = nn.Parameter(values, requires_grad=old_param.requires_grad)
        if grad is not None:
            self.values.grad = remap(grad)
        if optimizer is not None:
            replace_parameter(optimizer, old_param, self.values, remap)

    @property
    def format(self):
        """The index as a :class:`~sparseops.formats.CSRWeight`, :class:`~sparseops.formats.NMWeight` or
        :class:`~sparseops.formats.BSRWeight` (views of the buffers)."""
        if self._is_nm:
            p = self.pattern
            return NMWeight(self.out_features, self.in_features, p.n, p.m, p.transposable, **self._index())
        if self._block:
            b = self._block
            grid = CSRWeight(*grid_shape(self.out_features, self.in_features, b), **self._index())
            return BSRWeight(self.out_features, self.in_features, b, grid)
        csr = CSRWeight(self.out_features, self.in_features, **self._index())
        return ELLWeight(int(self.col.shape[1]), self.rows, csr) if self._is_ell else csr

    def _index(self) -> dict:
        """The index tensors the ops take: a fan-in layer's as its CSR view (``col`` flat)."""
        if self._is_ell:
            return {"col": self.col.reshape(-1), **{name: getattr(self, name) for name in _ELL_DERIVED}}
        persistent, derived = self._names()
        return {name: getattr(self, name) for name in persistent + derived}

    @property
    def mask(self) -> Tensor:
        """The bool pattern ``[out, in]`` of the sparse weight (a Pixelfly's low-rank term is dense and not in it)."""
        return self.format.to_mask()

    @property
    def nnz(self) -> int:
        """Stored weights of the sparse part (N:M: the slots less the empty ones; BSR: block padding excluded)."""
        if self._block:
            return self.format.nnz
        return int(self.values.numel()) - (int(self.empty.numel()) if self._is_nm else 0)

    @property
    def sparsity(self) -> float:
        total = self.out_features * self.in_features
        return 1.0 - self.nnz / total if total else 0.0

    def dense_weight(self) -> Tensor:
        """The weight as a dense ``[out, in]`` tensor, zeros off the mask (differentiable in ``values``),
        plus the low-rank term of a Pixelfly."""
        w = self.format.to_dense(self.values)
        return w + self.lr_u @ self.lr_v if self._rank else w

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's weights (zeros off the mask) and bias (without the activation)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight().detach())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.values.requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        lin.train(self.training)
        return lin

    def _apply(self, fn, recurse=True):
        # the activation's table is a constant, never data: written again after every move (see
        # nn.activation.FewBitActivation._apply: to_empty() after a meta-device build)
        out = super()._apply(fn, recurse)
        if self.activation is not None:
            borders, levels = table_bits(self.activation, self.act_bits)
            self.act_borders_bits = borders.to(self.act_borders_bits.device)
            self.act_levels_bits = levels.to(self.act_levels_bits.device)
        return out

    def forward(self, x: Tensor) -> Tensor:
        # under torch.autocast: x and the parameters in its dtype, as nn.Linear (see nn._autocast)
        return _autocast.run(self, x)

    def _run(self, x: Tensor, dt: torch.dtype | None) -> Tensor:
        """The forward with the parameters cast to ``dt`` (autocast's dtype; None: as they are)."""
        if dt is None:
            values, bias = self.values, self.bias
        else:
            values, bias = _autocast.param(self, "values", dt), _autocast.param(self, "bias", dt)
        if self._is_nm or self._block:
            if self._is_nm:
                p = self.pattern
                y = nm_linear(x, values, self._index(), bias, self.out_features, self.in_features, p.n,
                              p.m, p.transposable)
            else:
                y = block_linear(x, values, self._index(), bias, self.out_features, self.in_features)
                if self._rank:
                    # [*, in] @ [in, r] @ [r, out]: two thin dense products
                    y = y + (x @ _autocast.param(self, "lr_v", dt).t()) @ _autocast.param(self, "lr_u", dt).t()
            if self.activation is None:
                return y
            # not fused for N:M and BSR yet: the same few-bit activation as a separate op
            return fewbit_activation(
                y, activation_fn(self.activation), self.act_borders_bits.view(torch.float32),
                self.act_levels_bits.view(torch.float32), self.act_bits,
            )
        # a fan-in layer's values [rows, k] flatten to its CSR view's order (a view, so the gradient
        # reaches them as [rows, k])
        values = values.reshape(-1) if self._is_ell else values
        if self.activation is None:
            return sparse_linear(x, values, self._index(), bias, self.out_features, self.in_features)
        return sparse_linear_fewbit(
            x, values, self._index(), bias, self.out_features, self.in_features, self.activation,
            self.act_borders_bits.view(torch.float32), self.act_levels_bits.view(torch.float32), self.act_bits,
        )

    def extra_repr(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation}, act_bits={self.act_bits}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern.name}, sparsity={self.sparsity:.4f}, nnz={self.nnz}{act}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # all or nothing: a refused checkpoint leaves the layer as it was (see nn._load)
        load_all_or_nothing(self, self._load_checked, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs, ("pattern",))

    def _kind(self) -> str:
        if self._is_nm:
            return "an N:M index (idx/empty)"
        if self._block:
            return f"a block-sparse index with {self._block}x{self._block} blocks (crow/col, values [nblk, b, b])"
        if self._is_ell:
            return "a fan-in ELL index (rows/col, values [rows, k])"
        return "a CSR index (crow/col, values [nnz])"

    def _check_kind(self, state_dict, prefix) -> str | None:
        """Why the checkpoint under ``prefix`` cannot be this layer's, judged by its keys and shapes; or None."""
        def get(key):
            return state_dict.get(prefix + key)

        values = get("values")
        keys = "crow, col, values"
        if get("idx") is not None or get("empty") is not None:
            kind, keys = "an N:M index (idx/empty)", "idx, empty"
        elif get("rows") is not None:
            if get("col") is None or values is None:
                return "rows, col and values: the checkpoint holds only part of a fan-in ELL index and its values"
            kind, keys = "a fan-in ELL index (rows/col, values [rows, k])", "rows, col, values"
        elif get("crow") is not None or get("col") is not None:
            if get("crow") is None or get("col") is None or values is None:
                return "crow, col and values: the checkpoint holds only part of a CSR/BSR index and its values"
            b = values.shape[-1] if values.dim() == 3 else 0
            kind = (f"a block-sparse index with {b}x{b} blocks (crow/col, values [nblk, b, b])" if b
                    else "a CSR index (crow/col, values [nnz])")
        elif get("blkdiag1") is not None or get("blkdiag2") is not None:
            kind, keys = "Monarch factors (blkdiag1/blkdiag2)", "blkdiag1, blkdiag2"
        elif get("weight") is not None:
            kind, keys = "a dense weight (weight)", "weight"
        else:
            return None
        csr_kind, ell_kind = "a CSR index (crow/col, values [nnz])", "a fan-in ELL index (rows/col, values [rows, k])"
        if kind != self._kind() and {kind, self._kind()} != {csr_kind, ell_kind}:
            # a fan-in layer reads CSR checkpoints (earlier versions stored fan-in as CSR; any CSR whose rows
            # all hold k or none) and an unstructured layer reads fan-in ones: the same weights, re-laid
            return (f"{keys}: the checkpoint holds {kind}, this layer is {self.pattern.name}, stored as "
                    f"{self._kind()}; build the layer with the checkpoint's pattern")
        if self._is_nm and (get("idx") is None or get("empty") is None or values is None):
            return "idx, empty and values: the checkpoint holds only part of an N:M index and its values"
        if (get("lr_u") is not None or get("lr_v") is not None) and not self._rank:
            return (f"lr_u/lr_v: the checkpoint has a low-rank term, this layer ({self.pattern.name}) has none; "
                    "build it with the checkpoint's Butterfly(rank=...)")
        return None

    def _load_checked(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        why = self._check_kind(state_dict, prefix)
        if why is not None:
            error_msgs.append(f"While loading {prefix or 'SparseLinear'}: {why}")
            return
        values = state_dict.get(prefix + "values")
        shape = state_dict.get(prefix + "dense_shape")
        got = None if shape is None else [int(v) for v in shape.reshape(-1).tolist()]
        if got is not None and got[:2] != [self.out_features, self.in_features]:
            error_msgs.append(
                f"While loading {prefix or 'SparseLinear'}: the checkpoint's weight ({prefix}dense_shape) is [out, in] = "
                f"{got[:2]}, this layer has out_features={self.out_features}, "
                f"in_features={self.in_features}"
            )
            return
        if self._is_nm and got is not None and len(got) == 5:
            # n and m must match; a transposable checkpoint is a valid plain one (the other way round, the
            # index check below refuses a mask that is not transposable)
            p = self.pattern
            if got[2:4] != [p.n, p.m]:
                theirs = f"{got[2]}:{got[3]}{'T' if got[4] else ''}"
                error_msgs.append(
                    f"While loading {prefix or 'SparseLinear'}: the checkpoint's pattern ({prefix}dense_shape) is "
                    f"{theirs}, this layer is {p.name}; build the layer with the checkpoint's pattern")
                return
        if self._is_nm:
            # checked above; a checkpoint from before the pattern was stored has [out, in] only
            state_dict = {**state_dict, prefix + "dense_shape": self.dense_shape}
            if not self._load_nm_index(state_dict, prefix, values, error_msgs):
                return
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        if self._is_ell:
            sd = self._load_ell_index(state_dict, prefix, values, error_msgs)
            if sd is not None:
                super()._load_from_state_dict(sd, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                              error_msgs)
            return
        if state_dict.get(prefix + "rows") is not None:
            # a fan-in (ELL) checkpoint into an unstructured layer: its CSR view
            try:
                ell = ELLWeight.from_rows_col(self.out_features, self.in_features, state_dict[prefix + "rows"],
                                              state_dict[prefix + "col"])
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"While loading {prefix or 'SparseLinear'} ({self.pattern.name}): {exc}")
                return
            state_dict = dict(state_dict)
            del state_dict[prefix + "rows"]
            state_dict[prefix + "crow"], state_dict[prefix + "col"] = ell.csr.crow, ell.csr.col
            if values is not None:
                values = state_dict[prefix + "values"] = values.reshape(-1)
        crow, col = state_dict.get(prefix + "crow"), state_dict.get(prefix + "col")
        b = self._block
        rows = grid_shape(self.out_features, self.in_features, b)[0] if b else self.out_features
        if crow is not None and col is not None:
            # the structure comes from the checkpoint: rebuild the index, resize values, then load
            try:
                if crow.dtype != INDEX_DTYPE or col.dtype != INDEX_DTYPE:
                    raise TypeError(f"crow/col: expected dtype {INDEX_DTYPE}, got {crow.dtype}/{col.dtype}")
                if crow.dim() != 1 or crow.numel() != rows + 1:
                    what = f"block rows, this layer has {rows} (block={b})" if b else "output rows, this layer has"
                    raise ValueError(
                        f"crow: checkpoint holds {crow.numel() - 1} {what} out_features={self.out_features}"
                    )
                vshape = (col.numel(), b, b) if b else tuple(col.shape)
                if values is not None and tuple(values.shape) != vshape:
                    raise ValueError(f"values: checkpoint holds {tuple(values.shape)} values, expected {vshape}")
                dev = self.crow.device
                if b:
                    fmt = BSRWeight.from_crow_col(self.out_features, self.in_features, b, crow.to(dev), col.to(dev))
                    _check_block_padding(values, fmt)
                else:
                    fmt = CSRWeight.from_crow_col(self.out_features, self.in_features, crow.to(dev), col.to(dev))
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"While loading {prefix or 'SparseLinear'} ({self.pattern.name}): {exc}")
                return
            self._set_index(fmt)
            vshape = (col.numel(), b, b) if b else tuple(col.shape)
            if tuple(self.values.shape) != vshape:
                self.values.data = self.values.data.new_empty(vshape)
        elif b and values is not None and tuple(values.shape) == tuple(self.values.shape):
            try:
                _check_block_padding(values, self.format)
            except ValueError as exc:
                error_msgs.append(f"While loading {prefix or 'SparseLinear'} ({self.pattern.name}): {exc}")
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _load_ell_index(self, state_dict, prefix, values, error_msgs) -> dict | None:
        """Rebuild a fan-in layer's index from the checkpoint's ``rows``/``col`` (or the ``crow``/``col`` of a
        CSR checkpoint from an earlier version, re-laid as ELL); the state dict to load from (a legacy
        one with its ``col`` and ``values`` re-shaped to ``[rows, k]`` and ``rows`` added), or None (and a
        message) when it is refused."""
        rows, crow, col = (state_dict.get(prefix + n) for n in ("rows", "crow", "col"))
        if col is None:
            return state_dict
        sd = dict(state_dict)
        try:
            dev = self.rows.device
            if rows is not None:
                fmt = ELLWeight.from_rows_col(self.out_features, self.in_features, rows.to(dev), col.to(dev))
            else:
                if crow.dtype != INDEX_DTYPE or col.dtype != INDEX_DTYPE:
                    raise TypeError(f"crow/col: expected dtype {INDEX_DTYPE}, got {crow.dtype}/{col.dtype}")
                if crow.dim() != 1 or crow.numel() != self.out_features + 1:
                    raise ValueError(f"crow: checkpoint holds {crow.numel() - 1} output rows, this layer has "
                                     f"out_features={self.out_features}")
                _fan_in_of(crow.long().diff(), self.pattern, "crow: the checkpoint's rows")
                if values is not None and tuple(values.shape) != tuple(col.shape):
                    raise ValueError(f"values: checkpoint holds {tuple(values.shape)} values, expected {tuple(col.shape)}")
                csr = CSRWeight.from_crow_col(self.out_features, self.in_features, crow.to(dev), col.to(dev))
                fmt = ELLWeight.from_csr(csr, "crow: the checkpoint's rows")
                del sd[prefix + "crow"]
                sd[prefix + "rows"] = fmt.rows
                sd[prefix + "col"] = fmt.col
                if values is not None:
                    sd[prefix + "values"] = values.reshape(fmt.values_shape)
            vals = sd.get(prefix + "values")
            if vals is not None and tuple(vals.shape) != fmt.values_shape:
                raise ValueError(f"values: checkpoint holds {tuple(vals.shape)}, expected {fmt.values_shape} (rows, k)")
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"While loading {prefix or 'SparseLinear'} ({self.pattern.name}): {exc}")
            return None
        self._set_index(fmt)
        if fmt.k != self.pattern.k:
            self.pattern = FanIn(fmt.k)
        if tuple(self.values.shape) != fmt.values_shape:
            self.values.data = self.values.data.new_empty(fmt.values_shape)
        return sd

    def _load_nm_index(self, state_dict, prefix, values, error_msgs) -> bool:
        """Rebuild the index from the checkpoint's ``idx``/``empty``; False (and a message) when it is refused."""
        idx, empty = state_dict.get(prefix + "idx"), state_dict.get(prefix + "empty")
        if idx is None or empty is None:
            return True
        p = self.pattern
        try:
            dev = self.idx.device
            fmt = NMWeight.from_idx(
                self.out_features, self.in_features, p.n, p.m, idx.to(dev), empty.to(dev), p.transposable
            )
            if values is not None and tuple(values.shape) != tuple(self.values.shape):
                raise ValueError(f"values: checkpoint holds {tuple(values.shape)}, expected {tuple(self.values.shape)}")
            if values is not None and fmt.empty.numel() and bool(values.reshape(-1)[fmt.empty.to(values.device)].ne(0).any()):
                raise ValueError("values: nonzero at an empty slot (a slot that holds no weight must be 0)")
        except (TypeError, ValueError) as exc:
            error_msgs.append(f"While loading {prefix or 'SparseLinear'} ({p.name}): {exc}")
            return False
        self._set_index(fmt)
        return True


def _fan_in_of(counts: Tensor, pattern: FanIn, what: str) -> FanIn:
    """The fan-in pattern of rows holding ``counts`` weights: every row the same k, or none (an ablated
    neuron, SRigL). ValueError naming ``what`` otherwise."""
    held = counts[counts > 0]
    if held.numel() == 0:
        raise ValueError(f"{what} hold no weight at all (this layer is {pattern.name})")
    k = int(held[0])
    if not bool((held == k).all()):
        raise ValueError(f"{what} hold {sorted(set(held.tolist()))[:6]} weights; the rows of a fan-in layer all "
                         f"hold the same number, or none (this layer is {pattern.name})")
    return pattern if k == pattern.k else FanIn(k)


def _remapper(old, new, in_features: int):
    """``f(t)``: a tensor laid out like ``old``'s values (N:M, BSR), re-laid on ``new``'s positions (0 where new)."""
    return lambda t: new.gather(old.to_dense(t))
