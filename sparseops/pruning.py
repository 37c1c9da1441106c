"""Gradual magnitude pruning ("To prune or not to prune", Zhu & Gupta 2017) on sparseops layers.

The zero fraction of the targeted linear weights follows the cubic schedule

    s(t) = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3        for t0 <= t <= t1,

``s_i`` before ``t0`` and ``s_f`` after ``t1``, re-pruned by magnitude every ``every`` steps (and at
``t1``). The training loop calls :meth:`GradualPruner.step` after each optimizer step.

- A dense ``nn.Linear`` is pruned by a mask the pruner keeps and re-applies after every step (the
  optimizer may move a pruned weight; the pruner sets it back to 0).
- Once the schedule reaches ``convert_at`` (0.8 by default: on the project's CPU the CSR layer beats
  ``nn.Linear`` from about there on, see the README's table), the layer is swapped for a
  :class:`~sparseops.SparseLinear` on its mask, and later prunes re-pack it in place
  (:meth:`SparseLinear.update_mask_`).

The optimizer: a swap replaces the layer's ``weight`` Parameter by the SparseLinear's ``values`` (and
its ``bias`` by the new layer's). Pass the optimizer to the pruner and it edits the param groups and
moves the state for you: the moments of ``weight`` are gathered on the mask, the bias's move as they
are, and in-place re-packs re-map them to the surviving weights (0 for none grown: pruning only
drops). Without it, build a new optimizer over ``model.parameters()`` after any step that reports a
layer (``step()`` returns the names of the layers whose Parameters were replaced: swapped, or re-packed,
which also makes new ``values``).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .api import _shared_weights
from .masks import global_magnitude, magnitude
from .masks.magnitude import _n_keep
from .nn import SparseLinear
from .nn._optim import check_holds, replace_parameter
from .ops.repack import top_abs
from .patterns import Unstructured, check_sparsity


def cubic_sparsity(step: int, final_sparsity: float, start_step: int, end_step: int,
                   initial_sparsity: float = 0.0) -> float:
    """The schedule's sparsity at ``step`` (see the module docstring)."""
    if step <= start_step:
        return initial_sparsity
    if step >= end_step:
        return final_sparsity
    frac = (step - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


def _linear_targets(model: nn.Module, filter_fn) -> list[tuple[str, nn.Module]]:
    out = []
    for fqn, mod in model.named_modules():
        ok = type(mod) is nn.Linear or (isinstance(mod, SparseLinear) and isinstance(mod.pattern, Unstructured))
        if ok and (filter_fn is None or filter_fn(mod, fqn)):
            out.append((fqn, mod))
    return out


class GradualPruner:
    """Prune the linear layers of ``model`` to ``final_sparsity`` on the cubic schedule.

    Args:
        model: the model; its ``nn.Linear`` layers and unstructured ``SparseLinear`` layers (those for
            which ``filter_fn(module, fqn)`` is True) are pruned.
        final_sparsity: ``s_f`` in [0, 1).
        start_step, end_step: ``t0 < t1``; ``step()`` counts optimizer steps from 0.
        every: re-prune every this many steps between ``t0`` and ``t1``.
        initial_sparsity: ``s_i`` (default 0).
        optimizer: the model's optimizer, kept consistent across swaps and re-packs (see above).
        scope: ``"layer"`` (each layer to ``s(t)``) or ``"global"`` (one magnitude threshold across
            the layers; each keeps at least one weight).
        convert_at: swap a dense layer for a SparseLinear once ``s(t) >= convert_at``; None never swaps. A
            layer whose weight is shared (tied to another module, or the module registered at two places)
            is never swapped, which would untie it: it stays dense and is pruned by its mask.

    Raises:
        TypeError, ValueError: bad arguments (named in the message), or no layer to prune.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, every: int = 100,
                 *, initial_sparsity: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
                 scope: str = "layer", filter_fn=None, convert_at: float | None = 0.8):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.final_sparsity = check_sparsity(final_sparsity, "final_sparsity")
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity: expected at most final_sparsity={self.final_sparsity} (pruning only "
                             f"drops weights), got {self.initial_sparsity}")
        for name, v in (("start_step", start_step), ("end_step", end_step), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if start_step < 0 or end_step <= start_step:
            raise ValueError(f"end_step: expected 0 <= start_step < end_step, got {start_step} and {end_step}")
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
        if convert_at is not None:
            check_sparsity(convert_at, "convert_at")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.scope, self.convert_at = scope, convert_at
        self.names = [fqn for fqn, _ in _linear_targets(model, filter_fn)]
        if not self.names:
            raise ValueError("model: has no nn.Linear or unstructured SparseLinear to prune")
        if optimizer is not None:
            targets = {}
            for fqn in self.names:
                mod = model.get_submodule(fqn)
                sparse = isinstance(mod, SparseLinear)
                targets[f"{fqn}.values" if sparse else f"{fqn}.weight"] = mod.values if sparse else mod.weight
            check_holds(optimizer, targets)
        # dense layers a swap would untie (the weight shared with another module, e.g. an lm_head tied to
        # the embedding, or the module registered at two places): pruned in place by their mask, never swapped
        shared = _shared_weights(model)
        self._keep_dense = {fqn for fqn in self.names
                            if type(mod := model.get_submodule(fqn)) is nn.Linear and id(mod.weight) in shared}
        self.masks: dict[str, Tensor] = {}  # the dense layers' masks
        self.step_count = 0
        self.sparsity = self.initial_sparsity if start_step == 0 else 0.0

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.final_sparsity, self.start_step, self.end_step, self.initial_sparsity)

    def _prune_now(self, t: int) -> bool:
        if t < self.start_step or t > self.end_step:
            return False
        return (t - self.start_step) % self.every == 0 or t == self.end_step

    def step(self) -> list[str]:
        """Advance one optimizer step: re-prune when the schedule says so, re-apply the dense masks.

        Returns:
            the names of the layers whose Parameters this step replaced (swapped for a SparseLinear, or
            re-packed); usually none. Without an ``optimizer`` given to the pruner, rebuild yours then.
        """
        t = self.step_count + 1
        swapped = []
        if self._prune_now(t):
            swapped = self._prune(self.sparsity_at(t))
        self.step_count = t
        with torch.no_grad():
            for fqn, mask in self.masks.items():
                self.model.get_submodule(fqn).weight.mul_(mask)
        return swapped

    @torch.no_grad()
    def _prune(self, s: float) -> list[str]:
        self.sparsity = s
        layers = [(fqn, self.model.get_submodule(fqn)) for fqn in self.names]
        # candidates: a dense layer's entries on its mask, a SparseLinear's stored values (never the
        # positions off its mask: pruning only drops); each layer keeps numel - round(s * numel)
        # ranked by |w| in float32 (sparseops.ops.repack.top_abs: C++ on CPU), ties to the lower index
        scores, on, sizes, held = [], [], [], []
        for fqn, mod in layers:
            if isinstance(mod, SparseLinear):
                scores.append(mod.values.detach().flatten())
                on.append(None)
            else:
                scores.append(mod.weight.detach().flatten())
                on.append(self.masks.get(fqn))
            sizes.append(mod.in_features * mod.out_features)
            # what can be kept: a layer already sparser than s (a SparseLinear built sparser) keeps all it holds
            held.append(scores[-1].numel() if on[-1] is None else int(on[-1].sum()))

        def keep_largest(sc: list, masks: list, k: int) -> Tensor:
            flat = torch.cat([t.to(torch.float32) for t in sc]) if len(sc) > 1 else sc[0].to(torch.float32)
            elig = None
            if any(m is not None for m in masks):
                elig = torch.cat([torch.ones(t.numel(), dtype=torch.bool, device=t.device) if m is None
                                  else m.flatten() for t, m in zip(sc, masks)])
                elig = elig.view(1, -1)
            keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            keep[top_abs(flat.view(1, -1), k, eligible=elig).to(flat.device)] = True
            return keep

        if self.scope == "global":
            keep_all = keep_largest(scores, on, min(_n_keep(sum(sizes), s), sum(held)))
            keeps, start = [], 0
            for sc, m in zip(scores, on):
                kp = keep_all[start:start + sc.numel()].clone()
                if sc.numel() and not kp.any():
                    # no layer is pruned to nothing: keep its largest weight (on its mask)
                    kp[top_abs(sc.view(1, -1), 1, eligible=None if m is None else m.view(1, -1)).to(kp.device)] = True
                keeps.append(kp)
                start += sc.numel()
        else:
            keeps = [keep_largest([sc], [m], min(_n_keep(n, s), h)) for sc, m, n, h in zip(scores, on, sizes, held)]
        swapped = []
        for (fqn, mod), keep in zip(layers, keeps):
            if isinstance(mod, SparseLinear):
                mod.values.grad = None  # spent: step() runs after the optimizer's (see dst.update)
                mod.prune_(keep, self.optimizer)
                swapped.append(fqn)
                continue
            mask = keep.view(mod.out_features, mod.in_features)
            if self.convert_at is not None and s >= self.convert_at and fqn not in self._keep_dense:
                self._swap(fqn, mod, mask)
                swapped.append(fqn)
            else:
                self.masks[fqn] = mask
                mod.weight.mul_(mask)
        return swapped

    def _swap(self, fqn: str, lin: nn.Linear, mask: Tensor) -> None:
        layer = SparseLinear.from_dense(lin, mask=mask)
        if self.optimizer is not None:
            # CSR order is row-major, the order of a boolean index
            replace_parameter(self.optimizer, lin.weight, layer.values, lambda t: t[mask])
            if lin.bias is not None:
                replace_parameter(self.optimizer, lin.bias, layer.bias)
        parent, _, child = fqn.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        self.masks.pop(fqn, None)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "sparsity": self.sparsity,
                "masks": {k: v.clone() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        # everything is checked before anything is set: a refused state leaves the pruner as it was
        if not isinstance(state, dict) or not {"step_count", "sparsity", "masks"} <= set(state):
            raise ValueError("state: expected a dict from state_dict() with 'step_count', 'sparsity' and 'masks'")
        sc, sp, masks = state["step_count"], state["sparsity"], state["masks"]
        if isinstance(sc, bool) or not isinstance(sc, int) or sc < 0:
            raise ValueError(f"state['step_count']: expected an int >= 0, got {sc!r}")
        sp = check_sparsity(sp, "state['sparsity']")
        if not isinstance(masks, dict):
            raise ValueError(f"state['masks']: expected a dict of layer name -> bool mask, got {type(masks).__name__}")
        for k, v in masks.items():
            mod = self.model.get_submodule(k) if k in self.names else None
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"state['masks']: {k!r} is not a dense nn.Linear this pruner prunes")
            if not isinstance(v, Tensor) or v.dtype != torch.bool or v.shape != mod.weight.shape:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"state['masks'][{k!r}]: expected a bool tensor of shape {tuple(mod.weight.shape)}, "
                                 f"got {got}")
        self.step_count, self.sparsity = sc, sp
        self.masks = {k: v.clone().to(self.model.get_submodule(k).weight.device) for k, v in masks.items()}


class IterativeMagnitudePruning:
    """Iterative magnitude pruning with rewinding (the lottery ticket procedure).

    Train, prune the smallest surviving weights, rewind every parameter to an early snapshot, keep the
    mask, train again::

        imp = IterativeMagnitudePruning(model)          # snapshot now (rewind to init), or:
        ...train k steps...; imp.snapshot()              # rewind to step k (Frankle et al., 2020)
        for s in imp.schedule(final_sparsity=0.9, rounds=4):
            ...train...
            model = imp.prune_and_rewind(s)              # then build a fresh optimizer
            optimizer = torch.optim.SGD(model.parameters(), lr=...)

    Each round ranks the magnitudes of the *trained* weights on the current mask (``scope`` as in
    :class:`GradualPruner`), then rewinds all parameters of the model to the snapshot and makes each
    targeted layer a :class:`~sparseops.SparseLinear` holding its snapshot weights on the new mask.

    Args:
        model: the model; ``nn.Linear`` and unstructured ``SparseLinear`` layers are targeted (those for
            which ``filter_fn(module, fqn)`` is True).
        scope: ``"global"`` (the lottery-ticket default) or ``"layer"``.
    """

    def __init__(self, model: nn.Module, *, scope: str = "global", filter_fn=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope: expected 'layer' or 'global', got {scope!r}")
        self.model, self.scope = model, scope
        # a round rebuilds each layer as a new SparseLinear, which would untie a shared weight (an lm_head
        # tied to the embedding, a module at two places): those stay as they are, as sparsify_ leaves them
        shared = _shared_weights(model)
        targets = _linear_targets(model, filter_fn)
        tied = [fqn for fqn, mod in targets if id(mod.values if isinstance(mod, SparseLinear) else mod.weight) in shared]
        if tied:
            warnings.warn(f"IterativeMagnitudePruning: left {', '.join(tied)} out: the weight is shared, and a "
                          "pruned copy would untie it; untie it first to prune it", stacklevel=2)
        self.names = [fqn for fqn, _ in targets if fqn not in tied]
        if not self.names:
            raise ValueError("model: has no nn.Linear or unstructured SparseLinear to prune")
        self.snapshot()

    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember the model's parameters now: the point :meth:`prune_and_rewind` goes back to."""
        self._weights, self._biases = {}, {}
        for fqn in self.names:
            mod = self.model.get_submodule(fqn)
            w = mod.dense_weight() if isinstance(mod, SparseLinear) else mod.weight
            self._weights[fqn] = w.detach().clone()
            self._biases[fqn] = None if mod.bias is None else mod.bias.detach().clone()
        # every other parameter (norms, embeddings, ...) rewinds too; a model that is itself the
        # targeted layer has none
        prefixes = tuple(f"{fqn}." for fqn in self.names)
        self._others = {} if "" in self.names else {
            name: p.detach().clone() for name, p in self.model.named_parameters() if not name.startswith(prefixes)
        }

    def state_dict(self) -> dict:
        """The rewind point (the snapshot: each targeted layer's dense weight and bias, every other
        parameter) and the targeted layer names, for resuming a run of rounds from a checkpoint: save it
        next to the model's own state_dict, then ``load_state_dict`` on a pruner over the restored model."""
        return {"names": list(self.names), "scope": self.scope,
                "weights": {k: v.clone() for k, v in self._weights.items()},
                "biases": {k: None if v is None else v.clone() for k, v in self._biases.items()},
                "others": {k: v.clone() for k, v in self._others.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the rewind point of :meth:`state_dict`. The model's layers may be dense or already
        pruned (SparseLinear); the names and shapes must match. A refused state leaves the pruner as it was.

        Raises:
            ValueError: a state that is not one of this pruner's (other layers, shapes or keys).
        """
        keys = {"names", "scope", "weights", "biases", "others"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"state: expected a dict from state_dict() with {sorted(keys)}")
        if list(state["names"]) != self.names:
            raise ValueError(f"state['names']: expected this pruner's layers {self.names}, got {state['names']}")
        if state["scope"] not in ("layer", "global"):
            raise ValueError(f"state['scope']: expected 'layer' or 'global', got {state['scope']!r}")
        weights, biases, others = state["weights"], state["biases"], state["others"]
        for fqn in self.names:
            mod = self.model.get_submodule(fqn)
            shape = (mod.out_features, mod.in_features)
            w = weights.get(fqn) if isinstance(weights, dict) else None
            dtype = (mod.values if isinstance(mod, SparseLinear) else mod.weight).dtype
            if not isinstance(w, Tensor) or tuple(w.shape) != shape or w.dtype != dtype:
                got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(f"state['weights'][{fqn!r}]: expected a {dtype} tensor of shape {shape} (the "
                                 f"layer's), got {got}")
            b = biases.get(fqn, ...) if isinstance(biases, dict) else ...
            if (b is None) != (mod.bias is None) or (b is not None and (
                    not isinstance(b, Tensor) or tuple(b.shape) != (shape[0],) or b.dtype != mod.bias.dtype)):
                want = ("None (the layer has no bias)" if mod.bias is None
                        else f"a {mod.bias.dtype} tensor of shape ({shape[0]},)")
                raise ValueError(f"state['biases'][{fqn!r}]: expected {want}")
        prefixes = tuple(f"{fqn}." for fqn in self.names)
        params = {} if "" in self.names else {
            name: p for name, p in self.model.named_parameters() if not name.startswith(prefixes)}
        if not isinstance(others, dict) or set(others) != set(params):
            raise ValueError(f"state['others']: expected the model's other parameters {sorted(params)}, got "
                             f"{sorted(others) if isinstance(others, dict) else type(others).__name__}")
        for name, p in params.items():
            o = others[name]
            if not isinstance(o, Tensor) or o.shape != p.shape:
                raise ValueError(f"state['others'][{name!r}]: expected a tensor of shape {tuple(p.shape)}")
        # everything is built before anything is set (a copy that fails leaves the pruner as it was)
        dev = {fqn: next(self.model.get_submodule(fqn).parameters()).device for fqn in self.names}
        new_w = {k: weights[k].detach().to(dev[k], copy=True) for k in self.names}
        new_b = {k: None if biases[k] is None else biases[k].detach().to(dev[k], copy=True) for k in self.names}
        new_o = {k: others[k].detach().to(params[k].device, copy=True) for k in params}
        self.scope, self._weights, self._biases, self._others = state["scope"], new_w, new_b, new_o

    @staticmethod
    def schedule(final_sparsity: float, rounds: int) -> list[float]:
        """Per-round sparsities that remove the same fraction of the survivors each round:
        ``1 - (1 - final) ** (r / rounds)`` for ``r = 1 .. rounds``."""
        s = check_sparsity(final_sparsity, "final_sparsity")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: expected an int >= 1, got {rounds!r}")
        return [1.0 - (1.0 - s) ** (r / rounds) for r in range(1, rounds + 1)]

    @torch.no_grad()
    def prune_and_rewind(self, sparsity: float) -> nn.Module:
        """Prune the targeted layers to ``sparsity`` by trained magnitude, then rewind.

        Returns:
            the model (or the replacement, if the model itself is a targeted layer). Its targeted layers
            are new SparseLinear modules: build a new optimizer over ``model.parameters()``.
        """
        s = check_sparsity(sparsity)
        layers = [(fqn, self.model.get_submodule(fqn)) for fqn in self.names]
        scores = []
        for _, mod in layers:
            if isinstance(mod, SparseLinear):
                w, on = mod.format.to_dense(mod.values.detach()), mod.format.to_mask()
                scores.append((w.abs().double() + 1.0) * on)
            else:
                scores.append(mod.weight.detach().abs().double() + 1.0)
        masks = global_magnitude(scores, s) if self.scope == "global" else [magnitude(sc, s) for sc in scores]
        # a round prunes, never grows: a layer already sparser than asked keeps its mask (off-mask
        # positions score 0, but the count alone would keep some to reach it)
        masks = [m & mod.format.to_mask() if isinstance(mod, SparseLinear) else m for (_, mod), m in zip(layers, masks)]
        for name, p in self.model.named_parameters():
            if name in self._others:
                p.copy_(self._others[name])
        for (fqn, mod), mask in zip(layers, masks):
            w0 = self._weights[fqn]
            lin = nn.Linear(w0.shape[1], w0.shape[0], bias=self._biases[fqn] is not None, device=w0.device,
                            dtype=w0.dtype)
            lin.weight.copy_(w0)
            if lin.bias is not None:
                lin.bias.copy_(self._biases[fqn])
            # what the layer was besides its weights: frozen or not, its mode, a fused activation
            sparse = isinstance(mod, SparseLinear)
            lin.weight.requires_grad_((mod.values if sparse else mod.weight).requires_grad)
            if lin.bias is not None and mod.bias is not None:
                lin.bias.requires_grad_(mod.bias.requires_grad)
            lin.train(mod.training)
            act = {"activation": mod.activation, "act_bits": mod.act_bits} if sparse else {}
            layer = SparseLinear.from_dense(lin, mask=mask, **act)
            if fqn == "":
                self.model = layer
            else:
                parent, _, child = fqn.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        return self.model
