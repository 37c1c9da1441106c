"""Data-parallel training of a sparsified MLP with DDP or FSDP2 (``fully_shard``), launched by torchrun.

    torchrun --nproc_per_node=2 examples/train_distributed.py                        # DDP, unstructured 90%
    torchrun --nproc_per_node=2 examples/train_distributed.py --pattern 2:4 --fsdp   # FSDP2, 2:4
    torchrun --nproc_per_node=2 examples/train_distributed.py --pattern block:8 --sparsity 0.5

Every rank builds the same model from the same seed and calls ``sparseops.sparsify_`` on it; magnitude
pruning is deterministic, so every rank gets the same masks without any communication, and
:func:`check_same_structure` verifies that before training (it raises on a mismatch). FSDP2 needs the
same seed in any case: ``fully_shard`` keeps each rank's own shard of its own initial weights and
broadcasts nothing, and it leaves buffers (the sparse index) as they are on each rank. DDP broadcasts
rank 0's parameters and buffers once when it wraps the model; the index never changes while training,
so the per-step buffer broadcast is turned off.

The task is ``sparseops.data.synthetic_classification``; each step draws a global batch (the same
generator on every rank) and rank ``r`` trains on the ``r``-th slice of it. The loss is the mean over the
local slice, and DDP and FSDP2 average gradients over ranks, so with equal slices a step is the step one
process takes on the whole global batch. CPU runs use the gloo backend, CUDA runs nccl (one GPU a rank).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn

import sparseops


def build_model(pattern: str, sparsity: float | None, *, features: int, hidden: int, classes: int,
                seed: int = 0) -> nn.Module:
    """``features -> hidden -> classes`` (ReLU) from ``seed``, both linear layers sparsified.

    ``sparsity`` applies to the unstructured and block patterns; N:M fixes its own (pass None).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    return sparseops.sparsify_(model, sparsity, pattern=pattern)


def structure(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer of every SparseLinear (the stored index, both orientations) by qualified name."""
    return {f"{name}.{b}": t for name, mod in model.named_modules() if isinstance(mod, sparseops.SparseLinear)
            for b, t in mod.named_buffers(recurse=False)}


def check_same_structure(model: nn.Module) -> None:
    """Raise RuntimeError unless every rank holds the same sparse index (a collective: call it on all ranks)."""
    mine = {k: (tuple(t.shape), str(t.dtype), hashlib.sha256(t.detach().cpu().contiguous().clone().view(torch.uint8)
                                                             .numpy().tobytes()).hexdigest())
            for k, t in structure(model).items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    differ = sorted({k for other in every for k in set(mine) | set(other) if other.get(k) != mine.get(k)})
    if differ:
        raise RuntimeError(
            f"rank {dist.get_rank()}: the sparse index differs between ranks in {differ}; build the model from the "
            "same seed on every rank (or load one checkpoint) before sparsify_, and make masks from the same data"
        )


def wrap(model: nn.Module, fsdp: bool, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with one ``fully_shard`` per SparseLinear and one at the root."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for mod in model.modules():
            if isinstance(mod, sparseops.SparseLinear):
                fully_shard(mod, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    ddp = nn.parallel.DistributedDataParallel
    # the index buffers never change while training: broadcast them at wrap time only
    # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=ids, **no_sync)


def batches(steps: int, batch: int, *, features: int, classes: int, seed: int = 1):
    """``steps`` global batches ``(x [batch, features], y [batch])``, the same on every rank."""
    x, y = sparseops.data.synthetic_classification(max(4 * batch, 1024), features, classes, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        yield x[idx], y[idx]


def train(model: nn.Module, data, *, lr: float, rank: int = 0, world: int = 1,
          device: torch.device = torch.device("cpu")) -> list[float]:
    """AdamW on rank ``rank``'s slice of each global batch; the global mean loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for x, y in data:
        if x.shape[0] % world:
            raise ValueError(f"batch: {x.shape[0]} rows do not split evenly over {world} ranks")
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank, plain tensors on CPU, keys as without the wrapper
    (FSDP2's sharded DTensors are gathered: a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}


def run(args, rank: int, world: int, device: torch.device) -> dict:
    """Build, check, wrap and train one model; what a rank ends with (losses, state dict, masks)."""
    model = build_model(args.pattern, args.sparsity, features=args.features, hidden=args.hidden,
                        classes=args.classes, seed=args.seed).to(device)
    before = {k: t.clone().cpu() for k, t in structure(model).items()}
    if dist.is_initialized():
        check_same_structure(model)
        model = wrap(model, args.fsdp, device)
    data = batches(args.steps, args.batch, features=args.features, classes=args.classes, seed=args.seed + 1)
    losses = train(model, data, lr=args.lr, rank=rank, world=world, device=device)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # what this rank holds of each parameter: FSDP2 keeps a dim-0 shard (a DTensor), DDP the whole tensor
    local = {n: tuple(p.to_local().shape if hasattr(p, "to_local") else p.shape) for n, p in inner.named_parameters()}
    masks = {name: mod.mask.cpu() for name, mod in inner.named_modules() if isinstance(mod, sparseops.SparseLinear)}
    if dist.is_initialized():
        state = full_state_dict(model)
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"losses": losses, "state_dict": state, "masks": masks, "local_shapes": local, "structure_before": before,
            "structure_after": {k: t.clone().cpu() for k, t in structure(inner).items()}}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="unstructured", help='"unstructured", "2:4" (any "n:m"), "block:8", ...')
    ap.add_argument("--sparsity", type=float, default=None,
                    help="unstructured and block patterns (default 0.9 and 0.5); N:M fixes its own")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: one GPU a rank (nccl) if CUDA is available, else CPU (gloo)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64, help="the global batch, split evenly over the ranks")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads a rank (default: cores / ranks)")
    ap.add_argument("--save", default=None, help="a directory: each rank writes rank<r>.pt (losses, state, masks)")
    return ap


def default_sparsity(args) -> None:
    pat = sparseops.patterns.as_pattern(args.pattern)
    if args.sparsity is None and isinstance(pat, (sparseops.Unstructured, sparseops.Block)):
        args.sparsity = 0.5 if isinstance(pat, sparseops.Block) else 0.9


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    default_sparsity(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # the ranks on one machine share its cores
        per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(args.threads or max(1, per_rank))
    # launched by torchrun (which sets MASTER_ADDR/PORT, RANK, WORLD_SIZE): make the process group, unless
    # a caller already made one and keeps it
    own_group = "MASTER_ADDR" in os.environ and not dist.is_initialized()
    if own_group:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        r = run(args, rank, world, device)
        if rank == 0:
            kind = f"{'FSDP2' if args.fsdp else 'DDP'} on {world} rank(s)" if dist.is_initialized() else "one process"
            print(f"{kind}, {device.type}, pattern {args.pattern}, global batch {args.batch}, {args.steps} AdamW steps")
            for i in range(0, len(r["losses"]), max(1, len(r["losses"]) // 10)):
                print(f"step {i:4d}  loss {r['losses'][i]:.4f}")
            same = "; sparse index identical on all ranks" if dist.is_initialized() else ""
            print(f"final loss {r['losses'][-1]:.4f}{same}")
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            torch.save(r, os.path.join(args.save, f"rank{rank}.pt"))
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
