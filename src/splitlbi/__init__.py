"""splitlbi: Split Linearized Bregman Iteration (DessiLBI) for PyTorch.

Train deep networks with :class:`SplitLBI` and read structural sparsity off the
solution path of its structure parameter Γ.
"""

from .optim import NonzeroShare, SplitLBI, Sparsity
from .optim.groups import param_groups

__version__ = "0.1.0"

__all__ = ["SplitLBI", "NonzeroShare", "Sparsity", "param_groups", "__version__"]
