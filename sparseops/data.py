"""A synthetic classification task for demonstrations and tests: labels from a random teacher MLP."""

from __future__ import annotations

import torch


def synthetic_classification(n_samples: int, n_features: int = 512, n_classes: int = 10, *, hidden: int = 256,
                             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, n_features], y [n])``: Gaussian inputs labelled by a random two-layer ReLU teacher.

    The same ``seed`` gives the same teacher, so train and test sets drawn with different ``n_samples``
    but one seed share it only if drawn in one call: draw once and split.

    Raises:
        ValueError: a size below 1 (``n_classes`` below 2).
    """
    for name, v, lo in (("n_samples", n_samples, 1), ("n_features", n_features, 1), ("n_classes", n_classes, 2),
                        ("hidden", hidden, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n_features, hidden, generator=g) / n_features**0.5
    w2 = torch.randn(hidden, n_classes, generator=g) / hidden**0.5
    x = torch.randn(n_samples, n_features, generator=g)
    y = (torch.relu(x @ w1) @ w2).argmax(1)
    return x, y
