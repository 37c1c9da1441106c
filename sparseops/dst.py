"""Dynamic sparse training at a constant parameter budget: SET, RigL and SRigL on SparseLinear layers.

Every ``update_every`` optimizer steps each targeted layer drops a fraction of its stored weights and
grows as many elsewhere, so its nonzero count never changes; the layer is re-packed in place
(:meth:`SparseLinear.rewire_`: the same module, a new index, no dense mask) and the optimizer's state
follows: the moments of surviving weights are kept, grown weights start at 0 with fresh state (zero moments;
Rprop's step size at the learning rate and Adagrad's sum at its initial value, as those optimizers start a weight).

- **SET** (Mocanu et al. 2018): drop the smallest magnitudes, grow uniformly at random.
- **RigL** (Evci et al. 2020): drop the smallest magnitudes, grow where the *dense* gradient is largest.
  That gradient is computed only at update steps: the step before an update arms a forward hook for
  one step, which keeps the layer's input x and hooks its output for the gradient dy (every call of the
  layer in that step: a layer used twice, or micro-batches accumulated before the optimizer step, sum;
  their x and dy are all held until the update), and the update forms ``dyᵀ x`` [out, in] once: one dense GEMM and one dense ``[out, in]`` buffer per layer per update, the
  cost of a dense layer's weight gradient, paid every ``update_every`` steps and never in between.
- **SRigL** (Lasby et al. 2024): RigL under a constant fan-in (``FanIn(k)`` layers), with neuron
  ablation; see :class:`SRigL`.

The index work of an update (ranking the stored magnitudes, choosing the grown positions, re-packing
both orientations of the index, re-mapping the optimizer's state) runs in C++ on CPU
(``csrc/dst.cpp``) and costs less than a training step; ``bench/bench_dst.py`` measures it.

The drop fraction anneals with a cosine from ``drop_fraction`` at step 0 to 0 at ``end_step`` (RigL's
schedule); without ``end_step`` it stays constant. Call ``step()`` after every optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .nn import SparseLinear
from .nn._optim import check_holds
from .ops.repack import count_off_kept, sample_off, top_abs, top_abs_rows
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
            and mod.values.requires_grad  # a frozen layer keeps its weights: none would train where it grew
            and (filter_fn is None or filter_fn(mod, fqn))
        ]
        if not self.names:
            kind = "FanIn" if self.constant_fan_in else "unstructured"
            raise ValueError(f"model: has no {kind} SparseLinear to train (sparsify_ it first)")
        check_holds(optimizer, {f"{fqn}.values": model.get_submodule(fqn).values for fqn in self.names})
        self.step_count = 0
        self._hooks: list = []
        self._seen: dict[str, list] = {}
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
            calls = self._seen.setdefault(fqn, [])

            # every call of the layer in the step (a layer used twice, micro-batches accumulated before the
            # optimizer step) keeps its input and, when backward reaches it, its output's gradient: the
            # dense gradient is the sum over the calls
            # (a call without a gradient, e.g. under no_grad, keeps nothing; a second backward through the same
            # graph, retain_graph, adds to its dy)
            def fwd(m, args, out, _calls=calls, _mod=mod):
                # a deepcopy of the model copies this hook with it: the copy's calls are not this model's
                if m is not _mod or not out.requires_grad:
                    return
                call = {"x": args[0].detach().reshape(-1, m.in_features)}
                _calls.append(call)

                def grad_hook(g, _m=m, _c=call):
                    g = g.detach().reshape(-1, _m.out_features)
                    _c["dy"] = g if "dy" not in _c else _c["dy"] + g

                out.register_hook(grad_hook)

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
        """Advance one optimizer step; update the masks when due. Returns whether it did.

        When the update raises (e.g. RigL found no recorded gradient), nothing has changed: no layer is
        re-packed, the step is not counted, and the hooks are armed again for the same update.
        """
        t = self.step_count + 1
        updated = False
        if self._updates_at(t):
            self._disarm()
            try:
                self.update(self.fraction_at(t))
            except BaseException:
                self._seen = {}  # the retry records its own step: none of this one's records are reused
                self._rearm()  # step_count unchanged: armed for this same update
                raise
            self._seen = {}
            updated = True
        self.step_count = t
        self._rearm()
        return updated

    def _dense_grad(self, fqn: str) -> Tensor:
        seen = self._seen.get(fqn, [])
        calls = [c for c in seen if "dy" in c]
        if not calls:
            why = ("its forward ran but backward never reached its output" if seen else
                   "its forward hook never saw a call with a gradient: if the forward ran through torch.compile(model), "
                   "the compiled graph skips hooks added after it was compiled (compile in place with model.compile() "
                   "instead)")
            raise RuntimeError(
                f"{type(self).__name__}: no gradient was recorded for layer {fqn!r} in the step before this "
                f"update ({why}); call step() after every optimizer step, and run forward and backward in between")
        # sum over the calls of dyᵀx: one GEMM over the calls' rows stacked (a single call: no copy)
        dy = calls[0]["dy"] if len(calls) == 1 else torch.cat([c["dy"] for c in calls])
        x = calls[0]["x"] if len(calls) == 1 else torch.cat([c["x"] for c in calls])
        return dy.t().to(torch.float32) @ x.to(torch.float32)  # [out, in]

    # ---- one update ----

    @torch.no_grad()
    def update(self, fraction: float) -> None:
        """Drop ``fraction`` (in [0, 1]) of every targeted layer's weights and grow as many (see the
        subclasses). Every layer's new index is chosen before any layer is re-packed, so an error leaves
        them all as they were."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction: expected a float in [0, 1], got {fraction!r}")
        plans = []
        for fqn in self.names:
            mod = self.model.get_submodule(fqn)
            if not mod.values.requires_grad:  # frozen since: its dropped weights would be lost, grown ones never train
                continue
            plans.append((mod, self._plan(fqn, mod, fraction)))
        for mod, plan in plans:
            if plan is not None:
                # step() runs after the optimizer's step: the gradient is spent, and re-laying it with the
                # values (rewire_ keeps a gradient for calls between backward and step) would cost ~8% more
                mod.values.grad = None
                mod.rewire_(*plan, self.optimizer)

    def _plan(self, fqn: str, mod: SparseLinear, fraction: float):
        """(kept positions into ``values``, grown flat positions), or None for no change."""
        fmt = mod.format
        nnz = fmt.nnz
        n = min(int(round(fraction * nnz)), mod.out_features * mod.in_features - nnz)
        if n <= 0:
            return None
        kept = top_abs(mod.values.detach().reshape(1, -1), nnz - n)
        if self.grows_by_gradient:
            grown = top_abs(self._dense_grad(fqn), n, exclude=fmt)  # never a stored position
        else:
            grown = sample_off(fmt, n, self.generator)
        return kept, grown

    def state_dict(self) -> dict:
        """The step count and, with a ``generator``, its state (SET's draws then resume as they would have)."""
        state = {"step_count": self.step_count}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._apply_state(self._check_state(state))

    def _check_state(self, state) -> dict:
        # everything is checked before anything is set: a refused state leaves this object as it was
        if not isinstance(state, dict) or "step_count" not in state:
            raise ValueError(f"state: expected a dict from state_dict() with 'step_count', got {state!r:.200}")
        sc = state["step_count"]
        if isinstance(sc, bool) or not isinstance(sc, int) or sc < 0:
            raise ValueError(f"state['step_count']: expected an int >= 0, got {sc!r}")
        checked = {"step_count": sc}
        g = state.get("generator")
        if g is not None and self.generator is not None:
            if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8:
                raise ValueError(f"state['generator']: expected a generator state (uint8 tensor), got {g!r:.100}")
            checked["generator"] = g
        return checked

    def _apply_state(self, checked: dict) -> None:
        if "generator" in checked:
            self.generator.set_state(checked["generator"])
        self.step_count = checked["step_count"]
        self._seen = {}
        self._rearm()  # the hooks follow the step count: armed when the next step updates


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
    """RigL under a constant fan-in, with neuron ablation (Lasby et al. 2024), on ``FanIn(k)`` layers.

    An update of a layer with ``nnz`` weights and drop fraction f:

    1. **Drop** the ``round(f * nnz)`` smallest magnitudes of the layer (one ranking for the whole layer).
    2. **Ablate** (unless ``ablation`` is 0 or the layer is in ``no_ablation``): a weight is *salient* when
       it survived the drop or is among the layer's ``round(f * nnz)`` largest dense-gradient magnitudes
       (RigL's growth candidates, stored or not). A row with fewer than ``max(1, int(ablation * k0))``
       salient weights is ablated: all its weights are dropped. ``k0`` is the fan-in the layer had when
       SRigL was built (its ``pattern.k``, in the state dict with the budget); at least
       ``ceil(budget / in_features)`` rows stay active (the most salient ones).
    3. **Re-balance**: the budget (the layer's nnz when SRigL was built) is spread over the ``a`` active
       rows: the fan-in becomes ``k = min(in_features, budget // a)``, so the layer holds ``a * k <= budget``
       weights (exactly the budget while no row is ablated). A row that kept more than k keeps its k
       largest.
    4. **Grow** every active row back to k where the dense gradient is largest, among the positions the
       row did not hold (then, if those run out, among the ones just dropped: those keep their values
       and optimizer state, as any position on both the old and the new mask).

    Ablation is decided afresh at every update, so an ablated row whose gradient grows comes back. The
    layer's pattern becomes ``FanIn(k)``; its ablated rows are empty (output = bias) and checkpoints load
    back into a ``FanIn`` layer of any k.

    Args:
        ablation: the minimum share of ``k0`` a row's salient weights must reach to stay active
            (``gamma_sal`` of the paper, 0.3 there); 0 turns ablation off (then every row keeps exactly k0).
        no_ablation: fqns of targeted layers whose rows are never ablated, e.g. a classifier head.
        The rest as :class:`SET`.
    """

    constant_fan_in = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, update_every: int = 100,
                 drop_fraction: float = 0.3, *, end_step: int | None = None, filter_fn=None,
                 generator: torch.Generator | None = None, ablation: float = 0.3, no_ablation=()):
        if isinstance(ablation, bool) or not isinstance(ablation, (int, float)) or not 0 <= ablation <= 1:
            raise ValueError(f"ablation: expected a float in [0, 1], got {ablation!r}")
        if isinstance(no_ablation, str):
            raise TypeError("no_ablation: expected a collection of module names, got a str")
        try:
            no_ab = set(no_ablation)
        except TypeError:
            raise TypeError(f"no_ablation: expected a collection of module names, got {type(no_ablation).__name__}") from None
        super().__init__(model, optimizer, update_every, drop_fraction, end_step=end_step, filter_fn=filter_fn,
                         generator=generator)
        self.ablation = float(ablation)
        self.no_ablation = no_ab
        unknown = sorted(self.no_ablation - set(self.names))
        if unknown:
            self._disarm()  # the base class may have hooked the model already
            raise ValueError(f"no_ablation: {unknown} are not among the layers SRigL trains ({self.names})")
        self.budgets = {fqn: self.model.get_submodule(fqn).nnz for fqn in self.names}
        self.fan_ins = {fqn: self.model.get_submodule(fqn).pattern.k for fqn in self.names}

    def ablated(self, fqn: str) -> Tensor:
        """The indices of the rows of layer ``fqn`` that are ablated (hold no weight) now."""
        mod = self.model.get_submodule(fqn)
        return (mod.crow.long().diff() == 0).nonzero().flatten()

    def _plan(self, fqn: str, mod: SparseLinear, fraction: float):
        out_f, in_f = mod.out_features, mod.in_features
        fmt = mod.format.csr  # the CSR view of the fan-in (ELL) index; values [rows, k] flatten to its order
        values = mod.values.detach().reshape(-1)
        nnz, budget = fmt.nnz, self.budgets[fqn]
        n = int(round(fraction * nnz))
        if n <= 0 or nnz == 0:
            return None
        grad = self._dense_grad(fqn)
        rows = fmt.row
        kept = top_abs(values.reshape(1, -1), nnz - n).to(rows.device)
        crow = fmt.crow.long().to(rows.device)
        # per row, how many of its weights are kept: kept and the rows are both ascending, so a search of
        # the row starts (out + 1 of them) rather than a gather and a bincount over every kept weight
        counts = torch.searchsorted(kept, crow).diff()
        keep = torch.zeros(nnz, dtype=torch.bool, device=rows.device)
        keep[kept] = True
        active = torch.ones(out_f, dtype=torch.bool, device=rows.device)
        if self.ablation > 0 and fqn not in self.no_ablation:
            k0 = self.fan_ins[fqn]
            cand = top_abs(grad, n).to(rows.device)  # RigL's growth candidates, stored or not
            salient = counts + count_off_kept(fmt, keep, cand).to(rows.device)
            active = salient >= max(1, int(self.ablation * k0))
            least = -(-budget // in_f)  # rows needed to hold the budget at a fan-in of at most in_features
            if int(active.sum()) < least:
                order = torch.sort(salient, descending=True, stable=True).indices
                active = torch.zeros_like(active)
                active[order[:least]] = True
        k = min(in_f, budget // int(active.sum()))
        changed = False
        if not bool(active.all()):
            kept = kept[active[rows[kept].long()]]
            changed = True
        if bool((counts > k).any()):  # the fan-in fell (ablated rows came back): keep each row's k largest
            kept = _largest_per_row(kept, rows.long(), values, k)
            changed = True
        if changed:
            counts = torch.searchsorted(kept, crow).diff()
            keep = torch.zeros(nnz, dtype=torch.bool, device=rows.device)
            keep[kept] = True
        need = torch.where(active, k - counts, torch.zeros_like(counts))
        grown = top_abs_rows(grad, fmt, keep, need).to(rows.device)
        # a row short of free positions takes back some it just dropped: those are not new weights, they
        # keep their values and optimizer state (as any position on both the old and the new mask)
        held = fmt.crow.long().diff().to(need.device)
        if bool((need > in_f - held).any()):
            old_keys = rows.long() * in_f + fmt.col.long()  # ascending
            at = torch.searchsorted(old_keys, grown).clamp_max(max(nnz - 1, 0))
            back = old_keys[at] == grown
            kept = torch.sort(torch.cat([kept, at[back]])).values
            grown = grown[~back]
        return kept, grown

    def state_dict(self) -> dict:
        return {**super().state_dict(), "budgets": dict(self.budgets), "fan_ins": dict(self.fan_ins)}

    def _check_state(self, state) -> dict:
        checked = super()._check_state(state)
        for key, low in (("budgets", 1), ("fan_ins", 1)):
            if key not in state:
                continue
            d = state[key]
            if not isinstance(d, dict) or set(d) != set(self.names):
                got = sorted(d) if isinstance(d, dict) else type(d).__name__
                raise ValueError(f"state['{key}']: expected one entry for each layer SRigL trains {self.names}, "
                                 f"got {got}")
            bad = {k: v for k, v in d.items() if isinstance(v, bool) or not isinstance(v, int) or v < low}
            if bad:
                raise ValueError(f"state['{key}']: expected ints >= {low}, got {bad}")
            checked[key] = dict(d)
        return checked

    def _apply_state(self, checked: dict) -> None:
        super()._apply_state(checked)
        self.budgets = checked.get("budgets", self.budgets)
        self.fan_ins = checked.get("fan_ins", self.fan_ins)


def _largest_per_row(kept: Tensor, rows: Tensor, values: Tensor, k: int) -> Tensor:
    """The positions of ``kept`` (ascending) that are among the ``k`` largest ``|values|`` of their row
    (ties to the lower position)."""
    order = torch.sort(values.abs().float()[kept], descending=True, stable=True).indices
    order = order[torch.sort(rows[kept][order], stable=True).indices]  # by row, then by magnitude
    r = rows[kept][order]
    rank = torch.arange(r.numel(), device=r.device) - torch.searchsorted(r, r)
    return kept[order[rank < k]].sort().values
