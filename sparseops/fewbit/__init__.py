"""Few-bit activation gradients (Few-Bit Backward, Novikov et al. 2023).

A pointwise activation ``f`` keeps its input only to compute ``f'(x)`` in backward. Here it
keeps a b-bit code instead: the interval of ``x`` under an optimal piecewise-constant
approximation ``q`` of ``f'`` with ``2^b`` levels. Backward is ``grad_in = grad_out * q(x)``;
the forward is exact.

- Tables: :func:`optimal_table` (the exact DP), :func:`get_table` (shipped tables for 12
  smooth activations at 1-4 bits; the piecewise-linear ones are exact), :func:`exact_table`.
- Functional: ``sparseops.fewbit.gelu(x, bits=2)``, ``silu``, ``relu``, ... one per activation.
- :func:`convert_` swaps a model's torch activation modules for ``sparseops.nn.FewBit*``.

The math is in ``docs/fewbit.md``.
"""

from __future__ import annotations

from .table import (  # noqa: F401
    ACTIVATIONS,
    Table,
    activation_fn,
    approximation_error,
    derivative,
    exact_table,
    get_table,
    optimal_table,
)

# the functional api and convert_ sit above the autograd layer, while the tables above sit below
# the ops (which read them). importing them here eagerly would make every op import pull in
# autograd and nn, so they load on first use.
_FUNCTIONAL = (
    "gelu", "silu", "tanh", "sigmoid", "softplus", "elu", "selu", "celu", "mish", "logsigmoid", "hardswish",
    "softsign", "relu", "leaky_relu", "relu6", "hardtanh", "hardsigmoid", "activation", "convert_",
)

__all__ = [
    "ACTIVATIONS", "Table", "activation_fn", "approximation_error", "derivative", "exact_table", "get_table",
    "optimal_table", *_FUNCTIONAL,
]


def __getattr__(name: str):
    if name in _FUNCTIONAL:
        from . import functional

        value = getattr(functional, name)
        globals()[name] = value  # later lookups skip this hook: it sat on every call's path
        return value
    raise AttributeError(f"module 'sparseops.fewbit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FUNCTIONAL))
