"""What a ReLU MLP block keeps for backward: torch against sparseops' fused ReLU and activation-sparse layer, CPU.

    python bench/memory_relu.py [--width 4096] [--hidden 16384] [--batch 256] [--zeros 0.9]

The block is ``Linear(width, hidden) -> ReLU -> Linear(hidden, width)``, the MLP of the activation-sparsity
issue, with the first layer's bias shifted so that a fraction ``zeros`` of the ReLU's outputs are 0:

- torch: ``nn.Linear``, ``nn.ReLU``, ``nn.Linear``. The ReLU's output is saved once (by the ReLU and by the
  second linear: one tensor);
- sparseops: ``SparseLinear(..., activation="relu", act_bits=1)`` (90% sparse weight, the ReLU fused: it saves
  its 1-bit codes, not its pre-activation) then ``ActivationSparseLinear(mode="relu")``, which saves its input
  as that same 1-bit mask (the first layer's codes tensor itself) plus the values of the nonzeros;
- the same with the second layer a 90%-sparse ``SparseLinear`` under the activation-sparse one (its input
  kept the same way).

Printed: the bytes autograd keeps for backward (``saved_tensors_hooks``, storages counted once, parameters and
buffers not counted), in total and per batch row, and the two models' outputs' largest difference (the same
weights, so only the first layer's sparsity separates them: it is applied to both).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sparseops


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    keep = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        p = t.untyped_storage().data_ptr()
        if p not in keep:
            seen.setdefault(p, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return sum(seen.values()), y


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--zeros", type=float, default=0.9)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(args.width, args.hidden), nn.Linear(args.hidden, args.width)
    x = torch.randn(args.batch, args.width, requires_grad=True)
    sparse1 = sparseops.SparseLinear.from_dense(fc1, sparsity=0.9, activation="relu", act_bits=1)
    with torch.no_grad():
        # the same (pruned) weights in both models, and a bias that zeroes the wanted share of the hidden units
        fc1.weight.copy_(sparse1.dense_weight())
        z = x @ fc1.weight.t()
        shift = torch.quantile(z.flatten()[:1_000_000], args.zeros)
        fc1.bias.copy_(-shift.expand_as(fc1.bias))
        sparse1.bias.copy_(fc1.bias)
    plain = nn.Sequential(fc1, nn.ReLU(), fc2)
    ours = nn.Sequential(sparse1, sparseops.ActivationSparseLinear.from_dense(fc2, mode="relu"))
    sparse2 = sparseops.SparseLinear.from_dense(fc2, sparsity=0.9)
    both = nn.Sequential(sparse1, sparseops.ActivationSparseLinear.from_dense(sparse2, mode="relu"))
    b_plain, y_plain = saved_bytes(plain, x)
    b_ours, y_ours = saved_bytes(ours, x)
    b_both, _ = saved_bytes(both, x)
    zeros = float((torch.relu(x.detach() @ fc1.weight.t() + fc1.bias) == 0).float().mean())
    print(f"block {args.width}->{args.hidden}->{args.width}, batch {args.batch}, fp32, hidden zeros {zeros:.3f}")
    # both keep the block's input (the first linear's dW needs it); the rest is the hidden activation
    x_bytes = x.numel() * x.element_size()
    print("| model | saved MiB | of which hidden MiB | hidden bytes / element | torch / this (all, hidden) |")
    print("|---|---|---|---|---|")
    for name, b in (("torch (Linear, ReLU, Linear)", b_plain), ("sparseops (fused ReLU, activation-sparse)", b_ours),
                    ("sparseops, second layer a 90% SparseLinear too", b_both)):
        h = b - x_bytes
        print(f"| {name} | {b / 2**20:.2f} | {h / 2**20:.2f} | {h / (args.batch * args.hidden):.3f} | "
              f"{b_plain / b:.2f}x, {(b_plain - x_bytes) / h:.2f}x |")
    print(f"largest output difference: {float((y_plain - y_ours).detach().abs().max()):.2e}")


if __name__ == "__main__":
    main()
