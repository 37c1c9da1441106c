"""Memory of few-bit GELU: saved activation bytes and the peak of one training step, CPU.

    python bench/memory_fewbit.py [--width 2048] [--batch 2048] [--layers 4]

The model is ``layers`` x (Linear(width, width) -> GELU), trained with SGD on an MSE loss.
Two figures per variant (torch's nn.GELU, and FewBitGELU at 1-4 bits):

- saved: the bytes autograd keeps for backward, split into what the activations keep
  and what the linears keep (``torch.autograd.graph.saved_tensors_hooks``, storages counted
  once, the parameters not counted);
- peak: the most bytes allocated during one forward+backward+step and alive at once, on top
  of what was alive before it (the weights and their gradients), from the allocator timeline
  of ``torch.profiler`` (``profile_memory=True``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import sparseops


def make_model(width: int, layers: int, act) -> nn.Sequential:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), act()]
    return nn.Sequential(*mods)


def saved_bytes(model: nn.Sequential, x: torch.Tensor) -> tuple[int, int]:
    """(bytes saved by the activations, bytes saved by everything else) for one forward."""
    by_module: dict[int, tuple[bool, int]] = {}
    current = {"act": False}
    # the weights a linear saves are the parameters themselves, not activation memory
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() in params:
            return t
        by_module.setdefault(t.untyped_storage().data_ptr(), (current["act"], t.untyped_storage().nbytes()))
        return t

    hooks = []
    for m in model:
        is_act = not isinstance(m, nn.Linear)
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, a=is_act: current.__setitem__("act", a)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for h in hooks:
        h.remove()
    act = sum(n for a, n in by_module.values() if a)
    other = sum(n for a, n in by_module.values() if not a)
    return act, other


def peak_step_bytes(model: nn.Sequential, x: torch.Tensor, target: torch.Tensor) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()

    step()  # the gradients exist from here on, as in any training loop after its first step
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    # NOTE: _memory_profile is the (private) allocator timeline behind export_memory_timeline;
    # it is used here, in a benchmark script, because torch has no public cpu peak counter.
    from torch.profiler._memory_profiler import Action

    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.width)
    target = torch.randn(args.batch, args.width)
    variants = [("torch nn.GELU", nn.GELU)] + [
        (f"FewBitGELU bits={b}", lambda b=b: sparseops.nn.FewBitGELU(bits=b)) for b in (1, 2, 3, 4)
    ]
    mb = 1 / 2**20
    print(f"{args.layers} x (Linear({args.width}, {args.width}) -> GELU), batch {args.batch}, fp32, CPU")
    print()
    print("| variant | activations save MiB | linears save MiB | total saved MiB | activation saving | "
          "peak step MiB (3 runs) | median peak vs torch |")
    print("|---|---|---|---|---|---|---|")
    base_act = base_peak = None
    for name, act in variants:
        model = make_model(args.width, args.layers, act)
        a, o = saved_bytes(model, x.requires_grad_(False))
        # NOTE: the same step's peak differs by one 16 MiB tensor between runs (the allocator
        # timeline orders near-simultaneous frees and allocations differently), so three runs
        # are shown as their range and compared by their medians
        peaks = sorted(peak_step_bytes(model, x, target) for _ in range(3))
        base_act = base_act or a
        base_peak = base_peak or peaks[1]
        print(f"| {name} | {a * mb:.1f} | {o * mb:.1f} | {(a + o) * mb:.1f} | {base_act / a:.1f}x | "
              f"{peaks[0] * mb:.1f}–{peaks[-1] * mb:.1f} | {peaks[1] / base_peak:.3f} |")


if __name__ == "__main__":
    main()
