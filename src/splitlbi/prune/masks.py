"""Masks of sparse sub-networks: the support of Γ at an epoch, mask files, magnitude masks.

A *mask* is ``{parameter name: bool tensor shaped like the parameter}``; True = kept. A
*mask file* (``splitlbi masks``) is a ``torch.save``-d dict::

    {"masks": {name: BoolTensor}, "model": model name, "shapes": {name: [sizes]},
     "epoch": K or None, "source": run directory, "kind": "splitlbi" | "magnitude"}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.train.run import MASK_DIR, epoch_file_name, read_run_config
from splitlbi.models import create_model
from splitlbi.utils.io import DamagedFileError, atomic_torch_save, load_torch_file

__all__ = [
    "Masks", "MaskSparsity", "available_mask_epochs", "load_run_masks", "save_mask_file", "load_mask_file",
    "read_mask_file", "validate_masks", "apply_masks_", "mask_sparsity", "is_filter_structured",
    "magnitude_masks_like", "check_not_empty",
]

PathLike = Union[str, "os.PathLike[str]"]
Masks = Dict[str, Tensor]


class MaskSparsity(NamedTuple):
    """Share of weights kept (1.0 = dense), overall and per parameter; filters kept per parameter."""

    overall: float
    layers: Dict[str, float]
    filters_kept: Dict[str, int]
    filters_total: Dict[str, int]


def _epochs_in(directory: Path) -> list:
    found = []
    for path in directory.glob("epoch_*.pt"):
        try:
            found.append(int(path.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(found)


def available_mask_epochs(run_dir: PathLike) -> list:
    """The epochs with a ``masks/epoch_XXXX.pt`` in a run directory, ascending."""
    return _epochs_in(Path(run_dir) / MASK_DIR)


def _check_mask_dict(masks: Any, where: str) -> Masks:
    if not isinstance(masks, dict) or not masks or not all(
            isinstance(name, str) and isinstance(mask, Tensor) for name, mask in masks.items()):
        raise SplitLBIError(f"{where} does not hold masks (a dict of parameter name -> tensor)")
    for name, mask in masks.items():
        # A number other than 0 and 1 (a nan, a score) is no mask: bool() would read it as "keep".
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise SplitLBIError(f"{where}: the mask of {name!r} holds values other than 0 and 1 "
                                f"(nan or a score?); a mask is True/False (or 1/0) per weight")
    return {name: mask.to(torch.bool) for name, mask in masks.items()}


def load_run_masks(run_dir: PathLike, epoch: int) -> Masks:
    """Support of Γ at the end of ``epoch`` of a SplitLBI run (``masks/epoch_XXXX.pt``).

    Raises SplitLBIError (one line) when the run has no masks for that epoch (listing the
    epochs it has) or the file is damaged.
    """
    run_dir = Path(run_dir)
    info = read_run_config(run_dir)  # a clear error for a directory that is no run at all
    path = run_dir / MASK_DIR / epoch_file_name(epoch)
    if not path.is_file():
        epochs = available_mask_epochs(run_dir)
        have = ", ".join(map(str, epochs)) if epochs else "none (not a SplitLBI run?)"
        raise SplitLBIError(f"{run_dir} has no masks for epoch {epoch}; epochs with masks: {have}")
    masks = _check_mask_dict(load_torch_file(path), str(path))
    model = create_model(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"])
    validate_masks(masks, model, where=f"the masks in {path} (the run's model is {info['model']})")
    return masks


def save_mask_file(path: PathLike, masks: Mapping[str, Tensor], *, model: Union[str, nn.Module, None] = None,
                   epoch: Optional[int] = None, source: Optional[PathLike] = None, kind: str = "splitlbi") -> Path:
    """Write a mask file (atomically); return its path.

    Args:
        masks: parameter name -> bool mask shaped like the parameter (e.g.
            ``budget_masks(...).masks``, ``opt.masks_by_module(model)``).
        model: the model's name as a run records it (``"lenet5"``, ``"mymodels:make_net"``),
            or the network itself (then the masks are checked against it first); optional.
        epoch, source, kind: where the masks come from, recorded in the file.
    """
    if isinstance(model, nn.Module):
        validate_masks(masks, model)
        model = None  # a module has no name a later command could compare; the shapes are recorded
    masks = {name: mask.detach().to("cpu", torch.bool).clone() for name, mask in masks.items()}
    content = {"masks": masks, "model": model, "shapes": {name: list(mask.shape) for name, mask in masks.items()},
               "epoch": epoch, "source": None if source is None else str(source), "kind": kind}
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(content, path)
    return path


def read_mask_file(path: PathLike) -> Dict[str, Any]:
    """The whole content of a mask file (not checked against any model)."""
    path = Path(path)
    if not path.is_file():
        raise SplitLBIError(f"mask file {path} does not exist")
    try:
        content = load_torch_file(path)
    except DamagedFileError as error:
        raise SplitLBIError(f"cannot read mask file {path}: {error.reason}") from None
    if not isinstance(content, dict) or "masks" not in content:
        raise SplitLBIError(f"{path} is not a splitlbi mask file (no 'masks' entry)")
    content["masks"] = _check_mask_dict(content["masks"], str(path))
    return content


def validate_masks(masks: Mapping[str, Tensor], model: nn.Module, where: str = "masks") -> None:
    """Raise SplitLBIError naming the first mask whose parameter ``model`` lacks or shapes differently."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in parameters:
            raise SplitLBIError(f"{where} do not fit the model: it has no parameter {name!r} "
                                f"(mask from another model?)")
        if tuple(mask.shape) != tuple(parameters[name].shape):
            raise SplitLBIError(f"{where} do not fit the model: parameter {name!r} has shape "
                                f"{list(parameters[name].shape)}, the mask {list(mask.shape)} "
                                f"(mask from another model?)")


def load_mask_file(path: PathLike, model: nn.Module) -> Masks:
    """The masks of a mask file, checked against ``model``'s parameter names and shapes."""
    masks = read_mask_file(path)["masks"]
    validate_masks(masks, model, where=f"the masks in {path}")
    return masks


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Zero, in place, every weight of ``model`` outside its mask; return ``model``."""
    parameters = dict(model.named_parameters())
    validate_masks(masks, model)
    for name, mask in masks.items():
        parameter = parameters[name]
        parameter.mul_(mask.to(device=parameter.device, dtype=parameter.dtype))
    return model


def mask_sparsity(masks: Mapping[str, Tensor]) -> MaskSparsity:
    """Share of weights kept, overall and per parameter, and filters (output rows) with any weight kept."""
    layers, kept_filters, total_filters = {}, {}, {}
    kept = total = 0
    for name, mask in masks.items():
        count = int(mask.sum())
        layers[name] = count / mask.numel() if mask.numel() else 0.0
        kept += count
        total += mask.numel()
        rows = mask.reshape(mask.shape[0], -1) if mask.dim() >= 1 else mask.reshape(1, -1)
        kept_filters[name] = int(rows.any(dim=1).sum())
        total_filters[name] = int(rows.shape[0])
    return MaskSparsity(kept / total if total else 0.0, layers, kept_filters, total_filters)


def check_not_empty(masks: Mapping[str, Tensor], where: str, allow_empty: bool = False) -> None:
    """Refuse masks that keep no weight at all (a network whose output ignores its input):
    :class:`SplitLBIError` unless ``allow_empty``. ``where`` names the masks in the message."""
    if not allow_empty and masks and mask_sparsity(masks).overall == 0.0:
        raise SplitLBIError(f"{where} keep no weight at all (an empty support: the network's output would not "
                            f"depend on its input); choose a later epoch or pass --allow-empty-mask")


def is_filter_structured(mask: Tensor) -> bool:
    """Whether each output filter (first dimension) of a ≥2-D mask is entirely kept or entirely dropped."""
    if mask.dim() < 2:
        return False
    rows = mask.reshape(mask.shape[0], -1)
    return bool(torch.all(rows.all(dim=1) | ~rows.any(dim=1)))


def magnitude_masks_like(state_dict: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Masks:
    """Magnitude masks of ``state_dict``'s weights with the same per-layer count kept as ``reference``.

    For each parameter of ``reference``: a filter-structured reference mask (see
    :func:`is_filter_structured`) gives a mask keeping the same number of whole filters,
    those with the largest ℓ2 norms; any other gives one keeping the same number of
    weights, those with the largest ``|w|``. This is *SGD (Lottery)*'s pruning step.
    """
    masks: Masks = {}
    for name, ref in reference.items():
        if name not in state_dict:
            raise SplitLBIError(f"the weights have no parameter {name!r} that the reference masks name "
                                f"(masks from another model?)")
        weight = state_dict[name].detach().to("cpu", torch.float64)
        if tuple(weight.shape) != tuple(ref.shape):
            raise SplitLBIError(f"parameter {name!r} has shape {list(weight.shape)}, the reference mask "
                                f"{list(ref.shape)} (masks from another model?)")
        ref = ref.to(torch.bool)
        mask = torch.zeros(weight.shape, dtype=torch.bool)
        if is_filter_structured(ref):
            count = int(ref.reshape(ref.shape[0], -1).all(dim=1).sum())
            norms = weight.reshape(weight.shape[0], -1).norm(dim=1)
            # Stable sort: ties broken by filter index, so the result is deterministic.
            keep = torch.sort(norms, descending=True, stable=True).indices[:count]
            mask[keep] = True
        else:
            count = int(ref.sum())
            keep = torch.sort(weight.abs().flatten(), descending=True, stable=True).indices[:count]
            mask.view(-1)[keep] = True
        masks[name] = mask
    return masks
