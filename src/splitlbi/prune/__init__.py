"""Sparse sub-networks from a run: masks (support of Γ, magnitude masks) and retraining with a fixed mask."""

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

__all__ = [
    "MaskSparsity", "apply_masks_", "available_mask_epochs", "is_filter_structured", "load_mask_file",
    "load_run_masks", "magnitude_masks_like", "mask_sparsity", "read_mask_file", "save_mask_file",
    "validate_masks", "MASK_FILE", "RETRAIN_MODES", "MaskedSGD", "retrain",
]
