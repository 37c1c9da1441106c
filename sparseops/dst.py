"""Dynamic sparse training at a constant parameter budget: SET, RigL and SRigL on SparseLinear layers.

Every ``update_every`` optimizer steps each targeted layer drops a fraction of its stored weights and
grows as many elsewhere, so its nonzero count never changes; the layer is re-packed in place
(:meth:`SparseLinear.update_mask_`) and the optimizer's state follows: the moments of surviving
weights are kept, grown weights start at 0 with zero moments.

- **SET** (Mocanu et al. 2018): drop the smallest magnitudes, grow uniformly at random.
- **RigL** (Evci et al. 2020): drop the smallest magnitudes, grow where the *dense* gradient is largest.
  That gradient is computed only at update steps: the step before an update arms a forward hook for
  one step, which keeps the layer's input x and hooks its output for the gradient dy, and the update forms
  ``dyᵀ x`` [out, in] once: one dense GEMM and one dense ``[out, in]`` buffer per layer per update, the
  cost of a dense layer's weight gradient, paid every ``update_every`` steps and never in between.
- **SRigL** (Lasby et al. 2024): RigL under a constant fan-in (every output row keeps exactly k
  weights: drop and grow row by row). Layers must use ``FanIn(k)``. SRigL's neuron ablation (rows
  with too few salient weights are removed and their budget spread over the others) is not
  implemented yet.

The drop fraction anneals with a cosine from ``drop_fraction`` at step 0 to 0 at ``end_step`` (RigL's
schedule); without ``end_step`` it stays constant. Call ``step()`` after every optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .masks.magnitude import _keep_largest
from .nn import SparseLinear
from .patterns import FanIn, Unstructured


class _DynamicSparse:
    grows_by_gradient = False
    constant_fan_in = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, update_every: int = 100,
                 drop_fraction: float = 0.3, *, end_step: int | None = None, filter_fn=None,
                 generator: torch.Generator | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every: expected an int >= 1, got {update_every!r}")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 < drop_fraction < 1:
            raise ValueError(f"drop_fraction: expected a float in (0, 1), got {drop_fraction!r}")
        if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int) or end_step < 1):
            raise ValueError(f"end_step: expected None or an int >= 1, got {end_step!r}")
        self.model, self.optimizer = model, optimizer
        self.update_every, self.drop_fraction, self.end_step = update_every, float(drop_fraction), end_step
        self.generator = generator
        want = FanIn if self.constant_fan_in else Unstructured
        self.names = [
            fqn for fqn, mod in model.named_modules()
            if isinstance(mod, SparseLinear) and isinstance(mod.pattern, want) and mod.activation is None
            and (filter_fn is None or filter_fn(mod, fqn))
        ]
        if not self.names:
            kind = "FanIn" if self.constant_fan_in else "unstructured"
            raise ValueError(f"model: has no {kind} SparseLinear to train (sparsify_ it first)")
        self.step_count = 0
        self._hooks: list = []
        self._seen: dict[str, dict] = {}
        self._rearm()

    # ---- schedule ----

    def fraction_at(self, step: int) -> float:
        """The drop fraction of an update at ``step``: cosine-annealed to 0 at ``end_step``."""
        if self.end_step is None:
            return self.drop_fraction
        if step >= self.end_step:
            return 0.0
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.end_step))

    def _updates_at(self, step: int) -> bool:
        return step % self.update_every == 0 and (self.end_step is None or step < self.end_step)

    # ---- the dense gradient, at update steps only ----

    def _arm(self) -> None:
        for fqn in self.names:
            mod = self.model.get_submodule(fqn)
            rec = self._seen.setdefault(fqn, {})

            def fwd(m, args, out, _rec=rec):
                _rec["x"] = args[0].detach().reshape(-1, m.in_features)
                if out.requires_grad:
                    # the layer's output gradient, when backward reaches it
                    out.register_hook(lambda g, _m=m: _rec.__setitem__("dy", g.detach().reshape(-1, _m.out_features)))

            self._hooks.append(mod.register_forward_hook(fwd))

    def _disarm(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _rearm(self) -> None:
        # record the coming step when it ends in an update (RigL); otherwise record nothing
        self._disarm()
        if self.grows_by_gradient and self._updates_at(self.step_count + 1):
            self._arm()

    def step(self) -> bool:
        """Advance one optimizer step; update the masks when due. Returns whether it did."""
        t = self.step_count = self.step_count + 1
        updated = False
        if self._updates_at(t):
            self._disarm()
            self.update(self.fraction_at(t))
            self._seen = {}
            updated = True
        self._rearm()
        return updated

    def _dense_grad(self, fqn: str) -> Tensor:
        rec = self._seen.get(fqn, {})
        if "x" not in rec or "dy" not in rec:
            raise RuntimeError(
                f"{type(self).__name__}: no gradient was recorded for layer {fqn!r} in the step before this "
                "update; call step() after every optimizer step, and run forward and backward in between")
        return rec["dy"].t().to(torch.float32) @ rec["x"].to(torch.float32)  # [out, in]

    # ---- one update ----

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        """Drop ``fraction`` of every targeted layer's weights and grow as many (see the subclasses)."""
        for fqn in self.names:
            mod = self.model.get_submodule(fqn)
            fmt = mod.format
            keys = fmt.row.long() * mod.in_features + fmt.col.long()  # the stored positions, flat
            new = self._new_mask(fqn, mod, keys, mod.values.detach(), fraction)
            if new is not None:
                mod.update_mask_(new, self.optimizer)

    def _new_mask(self, fqn: str, mod: SparseLinear, keys: Tensor, values: Tensor, fraction: float):
        numel = mod.out_features * mod.in_features
        nnz = keys.numel()
        n = min(int(round(fraction * nnz)), numel - nnz)
        if n <= 0:
            return None
        kept = keys[_top_n(values.abs().float(), nnz - n)]
        old = torch.zeros(numel, dtype=torch.bool, device=keys.device)
        old[keys] = True
        if self.grows_by_gradient:
            score = self._dense_grad(fqn).abs().flatten()
            score[keys] = -1.0  # never a stored position
            grown = _top_n(score, n).nonzero().flatten()
        else:
            grown = _random_off(old, n, self.generator)
        new = torch.zeros_like(old)
        new[kept] = True
        new[grown] = True
        return new.view(mod.out_features, mod.in_features)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._seen = {}
        self._rearm()


class SET(_DynamicSparse):
    """Sparse Evolutionary Training: drop the smallest magnitudes, regrow uniformly at random.

    Args:
        model: a model with unstructured :class:`~sparseops.SparseLinear` layers.
        optimizer: its optimizer (kept consistent across re-packs).
        update_every: steps between mask updates; drop_fraction: the share of each layer's weights
            replaced at an update (annealed to 0 at ``end_step`` with a cosine when given).
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects layers; generator: for the random growth.
    """


class RigL(_DynamicSparse):
    """Rigged Lottery: drop the smallest magnitudes, grow where the dense gradient is largest.

    The dense gradient ``dyᵀ x`` is formed only for the step before each update (see the module
    docstring for its cost). Arguments as :class:`SET`.
    """

    grows_by_gradient = True


class SRigL(RigL):
    """RigL under a constant fan-in: each output row drops its ``round(fraction * k)`` smallest weights
    and grows as many where the dense gradient is largest, so every row keeps exactly k (``FanIn(k)``
    layers). Without SRigL's neuron ablation (see the module docstring)."""

    constant_fan_in = True

    def _new_mask(self, fqn: str, mod: SparseLinear, keys: Tensor, values: Tensor, fraction: float):
        out_f, in_f = mod.out_features, mod.in_features
        old = mod.mask
        k = int(old[0].sum()) if out_f else 0
        n = min(int(round(fraction * k)), in_f - k)
        if n <= 0 or k == 0:
            return None
        w = mod.format.to_dense(values)
        mag = torch.where(old, w.abs().double() + 1.0, 0.0)
        kept = torch.zeros_like(old).scatter_(1, torch.topk(mag, k - n, dim=1).indices, True)
        cand = torch.where(old, -1.0, self._dense_grad(fqn).abs().double() + 1.0)
        grown = torch.zeros_like(old).scatter_(1, torch.topk(cand, n, dim=1).indices, True)
        return kept | grown


def _top_n(scores: Tensor, n: int) -> Tensor:
    """Bool mask of the ``n`` largest of a 1-D ``scores``, ties to the lower index (as
    ``masks.magnitude``), without a top-k over all of it: a sampled quantile bounds the n-th largest
    from below, and the exact selection runs on the entries above the bound (about n of them).
    NOTE: 16M scores, 2 threads: a full top-k 470 ms, this ~60 ms."""
    N = scores.numel()
    if n <= 0 or n >= N or N < (1 << 16):
        return _keep_largest(scores, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = scores[torch.randint(N, (1 << 15,), generator=g).to(scores.device)]
    q = max(0.0, 1.0 - n / N - 0.02)
    bound = torch.quantile(sample.double(), q).to(scores.dtype)
    cand = (scores >= bound).nonzero().flatten()
    if cand.numel() < n:  # the sample missed: the exact way
        return _keep_largest(scores, n)
    keep = torch.zeros(N, dtype=torch.bool, device=scores.device)
    keep[cand[_keep_largest(scores[cand], n)]] = True
    return keep


def _random_off(old: Tensor, n: int, generator) -> Tensor:
    """``n`` distinct flat positions where ``old`` is False, uniformly at random, by rejection
    (no random number per position: 16M of them took 160 ms)."""
    N = old.numel()
    chosen = torch.empty(0, dtype=torch.long, device=old.device)
    while chosen.numel() < n:
        draw = torch.randint(N, (2 * (n - chosen.numel()) + 64,), generator=generator).to(old.device)
        chosen = torch.unique(torch.cat([chosen, draw[~old[draw]]]))
    pick = torch.randperm(chosen.numel(), generator=generator)[:n].to(old.device)
    return chosen[pick]
