"""Sparse sub-networks from a run: masks (support of Γ, magnitude masks, masks at a MACs or
parameter budget from path scores), retraining with a fixed mask, Torch-Pruning interoperability,
compaction (``compact_model``, ``mask_network``, ``CompactReport``) and the deployable files
(``save_compact``)."""

from splitlbi.prune.masks import (
    MaskSparsity,
    apply_masks_,
    available_mask_epochs,
    is_filter_structured,
    load_mask_file,
    load_run_masks,
    magnitude_masks_like,
    mask_sparsity,
    read_mask_file,
    save_mask_file,
    validate_masks,
)
from splitlbi.prune.retrain import MASK_FILE, RETRAIN_MODES, MaskedSGD, retrain

# Budget masks and PathImportance need torch_pruning (a dependency): imported on first use,
# so that `import splitlbi.prune` stays light.
_LAZY = {
    "BudgetResult": "splitlbi.prune.budget", "ChannelGroup": "splitlbi.prune.budget",
    "budget_masks": "splitlbi.prune.budget", "channel_groups": "splitlbi.prune.budget",
    "path_scores": "splitlbi.prune.budget",
    "PathImportance": "splitlbi.prune.importance", "IndexShortcutPruner": "splitlbi.prune.importance",
    "prepare_torch_pruning": "splitlbi.prune.importance", "normalize_scores": "splitlbi.prune.budget",
    "IndexShortcut": "splitlbi.prune.compact", "compact_model": "splitlbi.prune.compact",
    "CompactReport": "splitlbi.prune.compact", "mask_network": "splitlbi.prune.compact",
    "save_compact": "splitlbi.prune.export", "InputNormalization": "splitlbi.prune.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'splitlbi.prune' has no attribute {name!r}")

__all__ = [
    "MaskSparsity", "apply_masks_", "available_mask_epochs", "is_filter_structured", "load_mask_file",
    "load_run_masks", "magnitude_masks_like", "mask_sparsity", "read_mask_file", "save_mask_file",
    "validate_masks", "MASK_FILE", "RETRAIN_MODES", "MaskedSGD", "retrain", *_LAZY,
]
