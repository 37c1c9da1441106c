"""sparseops: hardware-accelerated sparse kernels for PyTorch.

Sparse layers whose sparsity turns into real speed on CPUs (C++ with AVX2/FMA and OpenMP)
and NVIDIA GPUs (Triton), with a SparseProp-style backward: dX through the sparse
transpose, dW only on the mask.

    >>> import torch, sparseops
    >>> layer = sparseops.SparseLinear(1024, 1024, sparsity=0.9)
    >>> y = layer(torch.randn(8, 1024))
"""

from . import fewbit, formats, masks, ops, patterns, reference  # noqa: F401
from . import nn  # noqa: F401
from ._cpp import available as cpp_available
from ._cpp import isa, set_isa
from . import data, dst, pruning  # noqa: F401
from .dst import SET, RigL, SRigL
from .api import densify_, sparsify_, sparsify_activations_
from .checkpoint import load_safetensors, save_safetensors
from .autoselect import explain
from .pruning import GradualPruner
from .nn import ActivationSparseLinear, MonarchLinear, SparseLinear, calibrate_
from .patterns import NM, Block, Butterfly, FanIn, Monarch, Unstructured

__version__ = "0.1.0"

__all__ = [
    "SparseLinear",
    "ActivationSparseLinear",
    "calibrate_",
    "sparsify_activations_",
    "GradualPruner",
    "RigL",
    "SET",
    "SRigL",
    "dst",
    "pruning",
    "MonarchLinear",
    "sparsify_",
    "densify_",
    "save_safetensors",
    "load_safetensors",
    "explain",
    "Unstructured",
    "NM",
    "FanIn",
    "Block",
    "Butterfly",
    "Monarch",
    "masks",
    "fewbit",
    "nn",
    "formats",
    "patterns",
    "ops",
    "reference",
    "isa",
    "set_isa",
    "cpp_available",
]
