"""SplitLBI optimizer, its functional core and penalties."""

from .functional import multi_tensor_splitlbi, splitlbi_update
from .penalties import PENALTIES, gamma_from_v, prox, resolve_penalty
from .splitlbi import Coupled, NonzeroShare, SplitLBI, Sparsity

__all__ = [
    "SplitLBI", "NonzeroShare", "Sparsity", "Coupled", "splitlbi_update", "multi_tensor_splitlbi",
    "PENALTIES", "prox", "gamma_from_v", "resolve_penalty",
]
