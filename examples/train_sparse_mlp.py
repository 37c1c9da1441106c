"""Train one MLP four ways on CPU and compare: dense, RigL at 90% from scratch, SRigL (constant fan-in at
90%, neuron ablation on) from scratch, and gradual pruning to 90%.

    python examples/train_sparse_mlp.py                 # the README's table (a few minutes on 2 cores)
    python examples/train_sparse_mlp.py --steps 20 --width 256   # a smoke run

The task is ``sparseops.data.synthetic_classification`` (labels from a random ReLU teacher). The MLP is
``in → width → width → classes`` with ReLUs; the two hidden layers are the sparse ones (the 10-wide
head stays dense in every run). Each run happens in its own process, so its peak resident memory
(``ru_maxrss``) is its own. Step time is the median over the last quarter of the run, when the sparse
runs are sparse (gradual pruning swaps its layers for SparseLinear at 80%). ``update ms`` is the median
time of the hook's ``step()`` at the steps where it changed the masks (a DST update or a prune), measured
inside the training loop.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def run(kind: str, args) -> dict:
    import torch
    from torch import nn

    import sparseops

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x, y = sparseops.data.synthetic_classification(args.train + 4096, args.features, args.classes, seed=1)
    xtr, ytr, xte, yte = x[: args.train], y[: args.train], x[args.train:], y[args.train:]
    model = nn.Sequential(nn.Linear(args.features, args.width), nn.ReLU(), nn.Linear(args.width, args.width),
                          nn.ReLU(), nn.Linear(args.width, args.classes))
    hidden = lambda mod, fqn: fqn in ("0", "2")  # noqa: E731
    if kind == "rigl":
        sparseops.sparsify_(model, 0.9, filter_fn=hidden)
    elif kind == "srigl":  # 10% of each hidden layer's inputs per output
        for fqn in ("0", "2"):
            lin = model.get_submodule(fqn)
            model[int(fqn)] = sparseops.SparseLinear.from_dense(lin, pattern=sparseops.FanIn(max(1, lin.in_features // 10)))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    hook = None
    if kind in ("rigl", "srigl"):
        cls = sparseops.RigL if kind == "rigl" else sparseops.SRigL
        hook = cls(model, opt, update_every=max(1, args.steps // 20), drop_fraction=0.3,
                   end_step=int(0.75 * args.steps))
    elif kind == "gradual":
        hook = sparseops.GradualPruner(model, 0.9, start_step=int(0.1 * args.steps), end_step=int(0.5 * args.steps),
                                       every=max(1, args.steps // 40), optimizer=opt, filter_fn=hidden)
    g = torch.Generator().manual_seed(2)
    times, updates = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, args.train, (args.batch,), generator=g)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if hook is not None:
            t0 = time.perf_counter()
            before = getattr(hook, "sparsity", None)
            changed = hook.step()
            if kind == "gradual":  # it pruned when its schedule moved (it may also have swapped layers)
                changed = bool(changed) or hook.sparsity != before
            if changed:
                updates.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    tail = sorted(times[-max(1, len(times) // 4):])
    nz = [m.sparsity if isinstance(m, sparseops.SparseLinear) else (m.weight == 0).float().mean().item()
          for m in (model[0], model[2])]
    upd = sorted(updates)
    return {"run": kind, "accuracy": acc, "wall_s": wall, "step_ms": 1e3 * tail[len(tail) // 2],
            "update_ms": 1e3 * upd[len(upd) // 2] if upd else float("nan"), "updates": len(upd),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "hidden_sparsity": sum(nz) / 2}


def _child(kind, args, q):
    q.put(run(kind, args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--train", type=int, default=32768)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for kind in ("dense", "rigl", "srigl", "gradual"):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(kind, args, q))
        p.start()
        rows.append(q.get())
        p.join()
    dense_ms = rows[0]["step_ms"]
    print(f"MLP {args.features}→{args.width}→{args.width}→{args.classes}, batch {args.batch}, {args.steps} Adam steps, "
          f"{args.threads} threads")
    print("| run | hidden sparsity | test accuracy | wall s | step ms (last quarter) | dense/step | updates "
          "| update ms (median) | update/step | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        upd = "-" if not r["updates"] else f"{r['update_ms']:.1f} | {r['update_ms'] / r['step_ms']:.2f}"
        upd = "- | -" if upd == "-" else upd
        print(f"| {r['run']} | {r['hidden_sparsity']:.2f} | {r['accuracy']:.3f} | {r['wall_s']:.1f} | {r['step_ms']:.1f} "
              f"| {dense_ms / r['step_ms']:.2f} | {r['updates']} | {upd} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
