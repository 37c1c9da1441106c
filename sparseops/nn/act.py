"""ActivationSparseLinear: a linear layer that skips the weight columns whose input is inactive right now.

Weight sparsity skips weights that are zero forever; activation sparsity skips, per call, the inputs
that are zero or small (TEAL, CHESS, R-Sparse). Decoding is memory-bound, so each skipped input is a
skipped read of one column of W: the layer stores W transposed (``weight`` is an ``[out, in]``
parameter whose memory is ``Wᵀ [in, out]``, so ``weight.t()`` is contiguous and column j of W is one
contiguous row).

Modes (the sparsifier ``s``; an input is active when ``|v| > threshold``):

- ``"relu"``: ``v = relu(x)``, threshold 0: exact zeros. For an input that is already a ReLU (or ReLU²)
  output this changes nothing in forward (ReLU is idempotent) nor in backward (the upstream ReLU's
  derivative is zero exactly where this one's is).
- ``"tensor"`` (TEAL): one magnitude threshold for the whole tensor, calibrated so that a target
  fraction of inputs is zeroed.
- ``"channel"`` (CHESS): one threshold per input channel, each calibrated to the same target.
- ``"topk"``: per row, keep the ``round((1 - sparsity) * in)`` inputs of largest magnitude.

A NaN input is inactive in every mode (``|nan| > threshold`` is false): it is skipped like a zero, so the
output is ``s(x) Wᵀ + b`` with the NaN read as 0 (in ``topk`` mode it ranks below every input, so a
row still keeps its k largest), where a dense layer's output would be NaN. Check
the inputs (``torch.isnan``) where a NaN must surface.

``threshold`` is a registered buffer: 0-d in ``relu``/``tensor``/``topk`` mode (``topk`` does not use
it), ``[in]`` in ``channel`` mode. Until calibrated it is 0, so only exact zeros are skipped and the
output equals the dense layer's.

In training the layer is ``y = s(x) Wᵀ + b`` with the true derivative: ``dx = (dy W) ⊙ mask``, computed
on the active inputs only, and ``dW = dyᵀ s(x)`` through s(x)'s nonzeros (see ``autograd.act``). In relu
mode on eager CPU what backward keeps of the input is its 1-bit mask and its nonzeros (``autograd.saved``),
the mask being the 1-bit ReLU codes of the layer that made the input when it has them.

Weight sparsity composes: ``from_dense`` of a :class:`~sparseops.SparseLinear` keeps it as ``sparse``.
At decode on CPU in fp32, without gradients (inference), an unstructured, fan-in or N:M weight runs
``ops.act.csr_dds``, which skips both: it reads, for each input some row activates, only the stored
weights of that input's column of W (the transposed CSR the layer keeps for its input gradient, with
a cached copy of the values in that order, rebuilt after any versioned edit of the values; an edit
through ``.data`` is not seen, see ``_transposed_values``). Otherwise (training, CUDA, other dtypes, block-sparse
weights, more than ``ops.act.GEMV_MAX_ROWS`` rows) the SparseLinear runs on ``s(x)``: the weight
sparsity's saving only.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from ..autograd import act_linear, check_input
from ..autograd.saved import relu_sparse, relu_sparse_input
from ..reference.act import act_mask
from ..patterns import check_sparsity
from . import _autocast
from ._load import load_marks, refused, restore, snapshot
from .linear import SparseLinear, _check_dtype, _check_features

MODES = ("relu", "tensor", "channel", "topk")


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


class ActivationSparseLinear(nn.Module):
    """``y = s(x) Wᵀ + b``, reading only the columns of W whose input ``s`` keeps.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (same initialisation).
        sparsity: target fraction of inputs to drop, in [0, 1): what :meth:`calibrate` aims for, and
            the dropped share per row in ``topk`` mode.
        mode: ``"relu"``, ``"tensor"``, ``"channel"`` or ``"topk"`` (see the module docstring).

    Raises:
        TypeError, ValueError: bad sizes, sparsity or mode (the message names the argument).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float = 0.5,
                 mode: str = "tensor", device=None, dtype=None):
        super().__init__()
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        _check_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        # [out, in] with Wᵀ's memory: weight.t() is contiguous
        weight = torch.empty(in_features, out_features, **factory).t()
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight = nn.Parameter(weight)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.sparse = None
        self._calibrating = False
        self.sparsity = check_sparsity(sparsity)
        self.set_mode(mode)
        self._register_load_guard()

    @classmethod
    def from_dense(cls, linear: nn.Module, sparsity: float = 0.5, mode: str = "tensor") -> "ActivationSparseLinear":
        """Wrap a trained ``nn.Linear`` (its weight copied into the transposed layout) or a
        :class:`~sparseops.SparseLinear` (kept as is, as ``self.sparse``). Call :meth:`calibrate` next
        (``relu`` and ``topk`` need no calibration).

        Raises:
            TypeError: ``linear`` is neither; ValueError: bad sparsity or mode.
        """
        if not isinstance(linear, (nn.Linear, SparseLinear)):
            raise TypeError(f"linear: expected an nn.Linear or a SparseLinear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer._calibrating = False
        layer.sparsity = check_sparsity(sparsity)
        if isinstance(linear, SparseLinear):
            layer.register_parameter("weight", None)
            layer.register_parameter("bias", None)
            layer.sparse = linear
            device = linear.values.device
        else:
            w = linear.weight.detach()
            # a frozen layer stays frozen
            layer.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=linear.weight.requires_grad)
            layer.bias = None if linear.bias is None else nn.Parameter(
                linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
            layer.sparse = None
            device = w.device
        layer.set_mode(mode, device=device)
        layer._register_load_guard()
        layer.train(linear.training)
        return layer

    def _apply(self, fn, recurse=True):
        # the threshold is never narrower than float32 through .to(dtype) / .half() / .bfloat16(): the
        # kernels compare 16-bit inputs in float32, and a threshold rounded to bf16 would move (0.67335 ->
        # 0.671875); it follows a cast to float64 (an fp64 layer compares in fp64) and the device
        thr = self.threshold
        out = super()._apply(fn, recurse)
        new = self.threshold
        if new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
            self.threshold = thr.to(device=new.device, dtype=torch.float32)
        return out

    def set_mode(self, mode: str, sparsity: float | None = None, *, device=None) -> None:
        """Change the sparsifier (and the target sparsity); the threshold resets to 0 (uncalibrated)."""
        mode = _check_mode(mode)  # both checked before either is set
        sparsity = self.sparsity if sparsity is None else check_sparsity(sparsity)
        self.mode, self.sparsity = mode, sparsity
        ref = self.weight if self.weight is not None else self.sparse.values
        if device is None:
            device = ref.device
        shape = (self.in_features,) if mode == "channel" else ()
        # float32, or float64 for a float64 layer (which compares in float64), as _apply keeps it
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        self.register_buffer("threshold", torch.zeros(shape, dtype=dtype, device=device))

    @property
    def keep(self) -> int:
        """Inputs a row keeps in ``topk`` mode."""
        return self.in_features - int(round(self.sparsity * self.in_features))

    def _sparsifier(self, x: Tensor) -> tuple[Tensor, Tensor, bool]:
        """``(x', threshold, relu)`` such that ``s(x) = act_mask(x', threshold, relu)``."""
        if self.mode == "topk":
            k = self.keep
            if k >= self.in_features:
                return x, self.threshold.new_full((), -1.0), False
            keep = torch.zeros_like(x, dtype=torch.bool)
            if k > 0:
                # NaN ranks below every input (torch.topk would rank it above): it is inactive anyway, and
                # must not take the place of one the row keeps
                mag = x.detach().abs().nan_to_num(nan=-1.0, posinf=math.inf)
                keep.scatter_(-1, mag.topk(k, dim=-1).indices, True)
            # what top-k drops is zero in x', and x' is active exactly where nonzero
            return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), self.threshold, False
        return x, self.threshold, self.mode == "relu"

    def forward(self, x: Tensor) -> Tensor:
        # under torch.autocast: x and the parameters in its dtype, as nn.Linear (see nn._autocast)
        return _autocast.run(self, x)

    def _inner(self, x: Tensor, dt: torch.dtype | None) -> Tensor:
        # the wrapped SparseLinear through its own forward (its hooks run: RigL records there), under the
        # caller's autocast again, which it applies itself
        if dt is None:
            return self.sparse(x)
        with torch.autocast(x.device.type, dtype=dt):
            return self.sparse(x)

    def _run(self, x: Tensor, dt: torch.dtype | None) -> Tensor:
        weight, bias = _autocast.param(self, "weight", dt), _autocast.param(self, "bias", dt)
        if self.sparse is None:
            check_input(x, self.in_features, weight)
        else:  # the wrapped layer casts its own values: checked here against the dtype they will have
            v = self.sparse.values
            check_input(x, self.in_features, v if dt is None else v.new_empty(0, dtype=_autocast.cast_dtype(v, dt)))
        if self._calibrating:
            # a copy: the model may change its input in place later, or the batches share one buffer
            self._seen.append(x.detach().reshape(-1, self.in_features).clone())
            return self._inner(x, dt) if self.sparse is not None else nn.functional.linear(x, weight, bias)
        x, thr, relu = self._sparsifier(x)
        if self.sparse is not None:
            if self._skips_both(x):
                return self._sparse_act_forward(x, thr, relu)
            trains = torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.sparse.parameters()))
            if relu and trains and x.device.type == "cpu" and not torch.compiler.is_compiling():
                # s(x) >= 0 with exact zeros: s and the SparseLinear keep only its packed mask (the ReLU's own
                # 1-bit codes when x came from one) and, for the weight gradient, its nonzeros (autograd.saved)
                xs, codes = relu_sparse(x, float(thr))
                with relu_sparse_input(xs, codes):
                    return self._inner(xs, dt)
            return self._inner(act_mask(x, thr, relu)[0], dt)
        return act_linear(x, weight.t(), bias, thr, relu)

    # ---- weight- and activation-sparse inference: both sparsities skipped ----

    def _skips_both(self, x: Tensor) -> bool:
        """Whether this call takes the kernel that skips both the weight's zeros and the inactive inputs:
        an unstructured, fan-in or N:M fp32 weight without a fused activation, at decode (up to
        ``ops.act.GEMV_MAX_ROWS`` rows) on eager CPU with the C++ extension, with nothing to differentiate."""
        from ..ops.act import GEMV_MAX_ROWS

        from .._cpp import _C

        sp = self.sparse
        if sp._block or sp.activation is not None or x.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        # the kernel is fp32 C++; in other dtypes its reference would build a dense Wᵀ every call
        if _C is None or x.dtype != torch.float32 or sp.values.dtype != torch.float32:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in sp.parameters())):
            return False
        # this path does not call the wrapped layer: where hooks on it (or global module hooks) are to run,
        # the layer's own forward does
        mm = nn.modules.module
        if (sp._forward_hooks or sp._forward_pre_hooks or mm._global_forward_hooks
                or mm._global_forward_pre_hooks):
            return False
        # values made under torch.inference_mode() have no version counter to key the cached Wᵀ order on
        if sp.values.is_inference():
            return False
        return x.numel() <= GEMV_MAX_ROWS * self.in_features

    def _transposed_values(self) -> Tensor:
        """The stored weights in the order of Wᵀ's CSR (``values[t_perm]``), kept between calls and
        rebuilt when the values or the index change (an optimizer step, a mask update, ``.to()``,
        ``load_state_dict``, any in-place edit under ``torch.no_grad()``). An in-place edit through
        ``values.data`` is not seen: torch gives ``.data`` a version counter of its own, so nothing tells
        the edit apart from no edit short of reading every value; edit the Parameter itself under
        ``torch.no_grad()``. This copy of the values is the memory the two-way skip costs: 4 bytes a
        stored weight in fp32."""
        sp = self.sparse
        v = sp.values.detach()
        key = (v.data_ptr(), v._version, v.dtype, sp.t_perm.data_ptr(), sp.t_perm.numel())
        cache = getattr(self, "_tv_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, v.reshape(-1)[sp.t_perm.long()].contiguous())
            self._tv_cache = cache
        return cache[1]

    def _sparse_act_forward(self, x: Tensor, thr: Tensor, relu: bool) -> Tensor:
        from ..ops import act as act_ops

        sp = self.sparse
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        b = None if sp.bias is None else sp.bias.detach()
        y = act_ops.csr_dds(x2, sp.t_crow, sp.t_row, self._transposed_values(), b, thr, relu, self.out_features)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def calibrate(self, samples) -> float:
        """Set ``threshold`` so that ``sparsity`` of the inputs in ``samples`` are dropped.

        ``tensor``: the ``sparsity``-quantile of ``|x|`` over all entries; ``channel``: over each input
        channel's entries. ``relu`` and ``topk`` have nothing to calibrate.

        Args:
            samples: ``[N, in]`` (or ``[..., in]``) inputs of this layer, or an iterable of them.

        Returns:
            the fraction of entries of ``samples`` the calibrated layer drops.

        Raises:
            TypeError, ValueError: samples that are not tensors, have the wrong width, or are empty.
        """
        if isinstance(samples, Tensor):
            samples = [samples]
        try:
            samples = list(samples)
        except TypeError:
            raise TypeError(f"samples: expected a tensor [N, {self.in_features}] or an iterable of them, got "
                            f"{type(samples).__name__}") from None
        parts = []
        for i, s in enumerate(samples):
            if not isinstance(s, Tensor):
                raise TypeError(f"samples: expected tensors of shape [N, {self.in_features}], got {type(s).__name__}")
            if not s.is_floating_point():
                raise TypeError(f"samples: expected floating-point tensors, got {s.dtype} (item {i})")
            if s.dim() == 0 or s.shape[-1] != self.in_features:
                raise ValueError(f"samples: expected last dimension in_features={self.in_features}, got shape "
                                 f"{tuple(s.shape)} (item {i})")
            if bool(torch.isnan(s).any()):
                raise ValueError(f"samples: contain NaN (item {i}); a threshold calibrated on them means nothing")
            parts.append(s.detach().reshape(-1, self.in_features).to(self.threshold.device))
        a = torch.cat(parts) if parts else None
        if a is None or a.shape[0] == 0:
            raise ValueError("samples: calibration needs at least one row of inputs, got none")
        # ranked in the threshold's dtype (fp32; fp64 for an fp64 layer, which compares in fp64)
        v = (torch.relu(a) if self.mode == "relu" else a).abs().to(self.threshold.dtype)
        if self.mode in ("tensor", "channel"):
            if self.mode == "tensor":
                k = int(round(self.sparsity * v.numel()))
                thr = v.new_zeros(()) if k == 0 else v.flatten().kthvalue(k).values
            else:
                k = int(round(self.sparsity * v.shape[0]))
                thr = v.new_zeros(self.in_features) if k == 0 else v.kthvalue(k, dim=0).values
            self.threshold.copy_(thr)
        return self.measure(a)

    @torch.no_grad()
    def measure(self, x: Tensor) -> float:
        """The fraction of the entries of ``x [..., in]`` this layer drops now."""
        check_input(x, self.in_features, self.weight if self.sparse is None else self.sparse.values)
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.numel() == 0:
            return 0.0
        xs, thr, relu = self._sparsifier(x2)
        return 1.0 - act_mask(xs, thr, relu)[1].float().mean().item()

    @torch.no_grad()
    def union_density(self, x: Tensor) -> float:
        """The fraction of W's columns a call on ``x [..., in]`` reads: inputs active in at least one row
        (BlockFFN's chunk-level sparsity; per-row density for a single row)."""
        check_input(x, self.in_features, self.weight if self.sparse is None else self.sparse.values)
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.numel() == 0:
            return 0.0
        xs, thr, relu = self._sparsifier(x2)
        return act_mask(xs, thr, relu)[1].any(0).float().mean().item()

    def to_dense(self) -> nn.Module:
        """The wrapped layer without the sparsifier: an ``nn.Linear`` with the same weights, or the
        ``SparseLinear`` it wraps."""
        if self.sparse is not None:
            return self.sparse
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        lin.train(self.training)
        return lin

    def get_extra_state(self) -> dict:
        # the sparsifier travels with the checkpoint: loading restores mode and sparsity first, so the
        # threshold buffer has the shape the checkpoint's has
        return {"mode": self.mode, "sparsity": self.sparsity}

    def set_extra_state(self, state) -> None:
        # applied by _load_from_state_dict before the buffers load (see there)
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # all or nothing over this layer and the SparseLinear it wraps, which loads after it: the post-hook
        # (_undo_failed_load) restores both when the checkpoint was refused by then (see nn._load)
        snaps = [(self, snapshot(self, ("mode", "sparsity")))]
        if self.sparse is not None:
            snaps.append((self.sparse, snapshot(self.sparse)))
        self.__dict__["_load_guard"] = (load_marks(error_msgs), snaps)
        wrapped = any(k.startswith(prefix + "sparse.") for k in state_dict)
        if wrapped != (self.sparse is not None) and (wrapped or prefix + "weight" in state_dict):
            have = "a SparseLinear (sparse.*)" if wrapped else "a dense weight (weight)"
            mine = "wraps a SparseLinear" if self.sparse is not None else "holds a dense weight"
            error_msgs.append(f"While loading {prefix or 'ActivationSparseLinear'}: the checkpoint holds {have}, this "
                              f"layer {mine}; build it the way the checkpoint's was")
            return
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and not (isinstance(extra, dict) and extra.get("mode") in MODES):
            error_msgs.append(f"{prefix}_extra_state: expected {{'mode': one of {MODES}, 'sparsity': float}}, "
                              f"got {extra!r}")
            return
        if extra is not None:
            try:
                sparsity = check_sparsity(extra.get("sparsity"))
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"{prefix}_extra_state: {exc}")
                return
            if (extra["mode"], sparsity) != (self.mode, self.sparsity):
                self.set_mode(extra["mode"], sparsity, device=self.threshold.device)
        thr = state_dict.get(prefix + "threshold")
        if isinstance(thr, Tensor) and thr.is_floating_point() and torch.finfo(thr.dtype).bits < 32:
            # a 16-bit checkpoint's threshold is widened (a load with assign=True would take its dtype)
            state_dict = {**state_dict, prefix + "threshold": thr.float()}
        if isinstance(thr, Tensor) and tuple(thr.shape) != tuple(self.threshold.shape):
            error_msgs.append(
                f"{prefix}threshold: the checkpoint's has shape {tuple(thr.shape)}, this layer's mode "
                f"{self.mode!r} needs {tuple(self.threshold.shape)} (set_mode to the checkpoint's mode first)")
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "threshold"}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        w = self.weight
        if w is not None and w.dim() == 2 and not w.t().is_contiguous():
            # load_state_dict(assign=True) took the checkpoint's tensor as it is (row-major [out, in]): the
            # decode kernel reads Wᵀ's rows, and through a strided W it ran 4-12x slower; lay it out again
            self.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)

    def _register_load_guard(self) -> None:
        self.register_load_state_dict_post_hook(_undo_failed_load)

    def extra_repr(self) -> str:
        weight = "sparse" if self.sparse is not None else "dense"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={(self.bias is not None) if self.sparse is None else self.sparse.bias is not None}, "
                f"mode={self.mode}, sparsity={self.sparsity}, weight={weight}")


def _undo_failed_load(module: "ActivationSparseLinear", incompatible_keys) -> None:
    guard = module.__dict__.pop("_load_guard", None)
    if guard is not None and refused(guard[0]):
        for m, snap in guard[1]:
            restore(m, snap)


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable, sparsity: float | None = None, mode: str | None = None) -> dict:
    """Calibrate every :class:`ActivationSparseLinear` of ``model`` on ``batches``, in place.

    The batches run through the model once with every such layer computing its dense product (as TEAL
    calibrates, on the dense model's activations), each layer records its inputs, and then each sets
    its threshold from them (:meth:`ActivationSparseLinear.calibrate`). They run in eval mode (dropout
    off, norm layers' running statistics untouched); every module's training flag is put back after.

    Args:
        model: a module containing ActivationSparseLinear layers.
        batches: an iterable of model inputs (a tensor, a tuple of positional args, or a dict of kwargs).
        sparsity, mode: when given, set on every layer first (a mode change resets its threshold).

    Returns:
        ``{module name: the sparsity it reaches on the calibration inputs}``.

    Raises:
        TypeError: ``model`` is not an nn.Module; ValueError: no such layer, no batches, a layer that saw no
            input rows, bad sparsity/mode. On any error every layer is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if sparsity is not None:
        check_sparsity(sparsity)
    if mode is not None:
        _check_mode(mode)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ActivationSparseLinear)}
    if not layers:
        raise ValueError("model: has no ActivationSparseLinear to calibrate (see sparseops.sparsify_activations_)")
    # record first, change nothing until every layer has inputs: an error leaves every layer as it was (the
    # recording pass computes each layer's dense product, which does not depend on mode or threshold)
    for m in layers.values():
        m._seen = []
        m._calibrating = True
    # in eval mode (dropout off, a norm layer's running statistics left as they are), each module's own
    # training flag put back after
    training = {m: m.training for m in model.modules()}
    model.eval()
    n = 0
    try:
        for batch in batches:
            _run(model, batch)
            n += 1
    finally:
        for m, flag in training.items():
            m.training = flag
        seen = {}
        for name, m in layers.items():
            m._calibrating = False
            seen[name] = m.__dict__.pop("_seen", [])
    if n == 0:
        raise ValueError("batches: calibration needs at least one batch, got none")
    for name, s in seen.items():
        if sum(t.shape[0] for t in s) == 0:
            raise ValueError(f"batches: layer {name!r} saw no input rows in {n} batch(es) (empty batches, or a layer "
                             "the batches do not reach)")
        # calibrate's one refusal of recorded inputs, checked for every layer before any is changed
        if any(bool(torch.isnan(t).any()) for t in s):
            raise ValueError(f"batches: layer {name!r} saw NaN in its inputs; a threshold calibrated on them means "
                             "nothing")
    for m in layers.values():
        if mode is not None or sparsity is not None:
            m.set_mode(mode or m.mode, sparsity)
    return {name: m.calibrate(seen[name]) for name, m in layers.items()}
