"""What the first conv layer's filters respond to, by guided backpropagation (Figure 2).

The paper's Figure 2 shows, for one input image, the *filter response gradients* of
the first conv layer at several epochs of SGD and SplitLBI (κ=10, κ=1): for each
filter, the gradient of its response w.r.t. the input image by guided backpropagation
(Springenberg et al. 2014), computed with captum's ``GuidedBackprop``.

The response of filter ``f`` is the spatial mean of channel ``f`` after the conv, its
BatchNorm (if any) and a ReLU: :func:`first_conv_block` cuts these modules out of the
model, so the rest of the network (and its own ReLUs) play no part. With one ReLU and
a mean on top, the upstream gradient reaching the ReLU is positive, so guided
backpropagation here equals the plain gradient of the response: the filter's kernel
summed over the pixels where the channel is active. A filter with zero weights, or
one inactive everywhere on the image, has an all-zero response.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.plots.filters import grid_shape
from splitlbi.plots.style import COLUMN_WIDTH, FULL_WIDTH, method_color, paper_style, save_figure
from splitlbi.utils.io import atomic_write_csv

__all__ = ["first_conv_block", "guided_backprop_responses", "plot_guided_backprop"]


# --------------------------------------------------------------------------- #
# First conv block and its guided-backprop responses
# --------------------------------------------------------------------------- #


def _first_conv_and_bn(model: nn.Module, example: Tensor) -> tuple[nn.Conv2d, Optional[nn.BatchNorm2d]]:
    """The first Conv2d run by ``model`` on ``example`` and the BatchNorm2d that takes its
    output directly (traced with forward hooks: module order need not be forward order)."""
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise SplitLBIError(f"model {type(model).__name__} has no Conv2d layer to visualize")
    first: list[tuple[nn.Conv2d, Tensor]] = []  # (conv, its output), first call only
    found: list[nn.BatchNorm2d] = []

    def conv_hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        if not first:
            first.append((module, output))  # keeps the output alive for the identity test

    def bn_hook(module: nn.Module, inputs: tuple, _output: Tensor) -> None:
        if first and not found and inputs and inputs[0] is first[0][1]:
            found.append(module)

    handles = [conv.register_forward_hook(conv_hook) for conv in convs]
    handles += [m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = {module: module.training for module in model.modules()}
    reference = next(model.parameters(), None)
    if reference is not None:
        example = example.to(reference.device)
    try:
        model.eval()  # no BatchNorm statistics update from the tracing pass
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:  # e.g. images with the wrong number of channels
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SplitLBIError(
            f"model {type(model).__name__} cannot run on input of shape {tuple(example.shape)}: {message}"
        ) from None
    finally:
        for module, training in was_training.items():
            module.training = training
        for handle in handles:
            handle.remove()
    if not first:
        raise SplitLBIError(f"the forward pass of model {type(model).__name__} ran none of its Conv2d layers")
    return first[0][0], (found[0] if found else None)


def first_conv_block(model: nn.Module, example: Tensor) -> nn.Module:
    """``nn.Sequential(conv, bn, ReLU)`` of the first conv layer that ``model`` runs on
    ``example`` (``bn`` only if a BatchNorm2d takes the conv output directly).

    The conv and BN are the model's own modules (shared, not copied), so the block
    follows the weights loaded into the model; they are put in eval mode so BN uses
    its running statistics. ``example``: any input the model accepts, e.g. one image.
    """
    conv, bn = _first_conv_and_bn(model, example)
    layers: list[nn.Module] = [conv] + ([bn] if bn is not None else []) + [nn.ReLU()]
    return nn.Sequential(*layers).eval()


class _ChannelMeans(nn.Module):
    """``block(x)`` averaged over space, shape [N, channels]: captum's ``target=f`` then
    picks the response of filter f."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x).mean((2, 3))


def _check_filters(filters: Sequence[int], num_filters: int) -> list[int]:
    """``filters`` as a list of ints in ``[0, num_filters)``, else a one-line SplitLBIError."""
    try:
        indices = [int(f) for f in filters]
    except (TypeError, ValueError):
        raise SplitLBIError(f"filters must be integer filter indices, got {filters!r}") from None
    if not indices:
        raise SplitLBIError("filters is empty: give at least one filter index")
    bad = [f for f in indices if not 0 <= f < num_filters]
    if bad:
        raise SplitLBIError(
            f"filters: index {bad[0]} out of range, the first conv layer has {num_filters} filters "
            f"(0..{num_filters - 1})"
        )
    return indices


def guided_backprop_responses(model: nn.Module, images: Tensor, filters: Sequence[int]) -> Tensor:
    """Guided-backprop gradient of each filter's response w.r.t. each image, shape
    [len(images), len(filters), C, H, W] (float32, on the CPU).

    The response of filter f is the spatial mean of channel f of the first conv layer
    after its BatchNorm and ReLU (:func:`first_conv_block`). The model is left as it
    was: module modes restored, parameter gradients untouched.
    """
    from captum.attr import GuidedBackprop  # late: ``import splitlbi.plots`` must not need captum

    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise SplitLBIError(f"images must be a [N, C, H, W] tensor, got {shape}")
    if len(images) == 0:
        raise SplitLBIError("images is empty: give at least one image")
    was_training = {module: module.training for module in model.modules()}
    try:
        block = first_conv_block(model, images[:1])
        conv = block[0]
        if images.shape[1] != conv.in_channels:
            raise SplitLBIError(
                f"images have {images.shape[1]} channels but the first conv layer takes {conv.in_channels}"
            )
        indices = _check_filters(filters, conv.out_channels)
        inputs = images.detach().to(device=conv.weight.device, dtype=conv.weight.dtype)
        inputs = inputs.clone().requires_grad_(True)  # a leaf of our own: the caller's tensor is untouched
        attribution = GuidedBackprop(_ChannelMeans(block))
        responses = []
        with warnings.catch_warnings():
            # captum warns on every call that it sets (and later removes) ReLU hooks
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            for f in indices:
                responses.append(attribution.attribute(inputs, target=f).detach().float().cpu())
    finally:
        for module, training in was_training.items():
            module.training = training
    return torch.stack(responses, dim=1)


# --------------------------------------------------------------------------- #
# Figure
# --------------------------------------------------------------------------- #


def _normalize_tile(tile: np.ndarray) -> np.ndarray:
    """[C, H, W] → [H, W, 3] in [0, 1] by the tile's own min/max (RGB for 3 channels, else
    grey from the channel mean); a constant tile, e.g. a zero response, is mid-grey."""
    tile = tile.mean(0, keepdims=True) if tile.shape[0] != 3 else tile
    low, high = float(tile.min()), float(tile.max())
    scaled = (tile - low) / (high - low) if high > low else np.full_like(tile, 0.5)
    scaled = np.transpose(scaled, (1, 2, 0))
    return np.repeat(scaled, 3, axis=2) if scaled.shape[2] == 1 else scaled


def _mosaic(tiles: Sequence[np.ndarray], rows: int, cols: int, gap: int) -> np.ndarray:
    """[H, W, 3] tiles on a white canvas, row-major, ``gap`` pixels apart."""
    height, width = tiles[0].shape[:2]
    canvas = np.ones((rows * (height + gap) - gap, cols * (width + gap) - gap, 3))
    for k, tile in enumerate(tiles):
        top, left = (k // cols) * (height + gap), (k % cols) * (width + gap)
        canvas[top:top + height, left:left + width] = tile
    return canvas


def _check_responses(responses: Mapping[tuple[str, int], Tensor], images: Tensor) -> tuple[int, ...]:
    """The common shape of all responses; a one-line SplitLBIError if they do not fit."""
    if not responses:
        raise SplitLBIError("responses is empty: give at least one (method, epoch) entry")
    shapes = set()
    for key, value in responses.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise SplitLBIError(f"responses keys must be (method label, epoch) pairs, got {key!r}")
        if not isinstance(value, Tensor) or value.dim() != 5:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise SplitLBIError(f"responses[{key!r}] must be a [images, filters, C, H, W] tensor, got {shape}")
        shapes.add(tuple(value.shape))
    if len(shapes) > 1:
        raise SplitLBIError(f"responses must all have the same shape (same images and filters), got {sorted(shapes)}")
    shape = shapes.pop()
    if images.dim() != 4 or tuple(images.shape) != (shape[0], *shape[2:]):
        raise SplitLBIError(
            f"images {tuple(images.shape)} do not match the responses {shape}: "
            f"expected [{shape[0]}, {', '.join(str(s) for s in shape[2:])}]"
        )
    return shape


def _label_color(label: str) -> str:
    """Colour of a row label like "SplitLBI (κ=10)": the colour of its method name."""
    return method_color(label.split("(")[0])


def _wrap_label(label: str) -> str:
    """ "SplitLBI (κ=10)" → "SplitLBI\n(κ=10)": a row label must fit the height of its row."""
    name, _, rest = label.partition(" (")
    return f"{name}\n({rest}" if rest else label


def make_guided_backprop_figure(
    responses: Mapping[tuple[str, int], Tensor],
    images: Tensor,
    *,
    image: int = 0,
    title: Optional[str] = None,
) -> Figure:
    """The figure of :func:`plot_guided_backprop`, not saved."""
    shape = _check_responses(responses, images)
    if not 0 <= image < shape[0]:
        raise SplitLBIError(f"image: index {image} out of range for {shape[0]} image(s)")
    methods = list(dict.fromkeys(str(method) for method, _ in responses))
    epochs = list(dict.fromkeys(int(epoch) for _, epoch in responses))
    num_filters, height, width = shape[1], shape[3], shape[4]
    rows, cols = grid_shape(num_filters)
    gap = max(1, round(min(height, width) / 8))

    columns = 1 + len(epochs)
    fig_width = COLUMN_WIDTH if columns <= 4 else FULL_WIDTH
    label_width = 0.35  # inches for the method labels on the left
    cell_width = min((fig_width - label_width) / columns, 1.4)
    mosaic_aspect = (rows * (height + gap) - gap) / (cols * (width + gap) - gap)
    cell_height = cell_width * mosaic_aspect
    with paper_style():
        fig = Figure(
            figsize=(label_width + cell_width * columns, cell_height * len(methods) + 0.45 + (0.2 if title else 0)),
            layout="constrained",
        )
        grid = fig.add_gridspec(len(methods), columns)
        input_ax = fig.add_subplot(grid[:, 0])
        input_ax.imshow(_normalize_tile(images[image].detach().float().cpu().numpy()), interpolation="nearest")
        input_ax.set_title("input")
        input_ax.set_axis_off()
        for row, method in enumerate(methods):
            for column, epoch in enumerate(epochs, start=1):
                ax = fig.add_subplot(grid[row, column])
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if row == 0:
                    ax.set_title(f"epoch {epoch}")
                if column == 1:
                    ax.set_ylabel(_wrap_label(method), color=_label_color(method), fontsize=7)
                value = responses.get((method, epoch))
                if value is None:  # this method has no checkpoint at this epoch
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="0.5")
                    continue
                tiles = [_normalize_tile(tile) for tile in value[image].detach().float().cpu().numpy()]
                ax.imshow(_mosaic(tiles, rows, cols, gap), interpolation="nearest")
        if title:
            fig.suptitle(title)
    return fig


def _output_paths(out: Path) -> tuple[Path, Path, Path, Path]:
    """(png, pdf, csv, npz) paths from ``out`` (its .png/.pdf suffix, if any, replaced)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    png, pdf, csv_path, npz_path = (stem.with_name(stem.name + suffix) for suffix in (".png", ".pdf", ".csv", ".npz"))
    return png, pdf, csv_path, npz_path


def plot_guided_backprop(
    responses: Mapping[tuple[str, int], Tensor],
    images: Tensor,
    out: Path,
    *,
    title: Optional[str] = None,
    image: int = 0,
    filters: Optional[Sequence[int]] = None,
) -> list[Path]:
    """Figure 2 grid: the input image, then one row per method label (in insertion
    order) and one column per epoch, each cell the filters' responses on ``images[image]``.

    ``responses[(method label, epoch)]`` is :func:`guided_backprop_responses` for the
    same images and filters; a missing (method, epoch) pair shows "n/a". Each tile is
    stretched by its own min/max, since only the pattern of a gradient matters.
    ``filters`` are the filter indices of the responses, for the CSV (default 0, 1, ...).
    Writes ``out`` as PNG and PDF, ``<stem>.csv`` (method, epoch, image, filter,
    mean_abs, max_abs for every image and filter) and ``<stem>.npz`` (the full arrays
    keyed "method|epoch", plus "images" and "filters"), and returns the four paths.
    """
    shape = _check_responses(responses, images)
    filter_ids = list(range(shape[1])) if filters is None else [int(f) for f in filters]
    if len(filter_ids) != shape[1]:
        raise SplitLBIError(f"filters has {len(filter_ids)} indices but the responses have {shape[1]} filters")
    png, pdf, csv_path, npz_path = _output_paths(out)
    fig = make_guided_backprop_figure(responses, images, image=image, title=title)
    save_figure(fig, png, pdf=True)

    arrays = {
        f"{method}|{int(epoch)}": value.detach().float().cpu().numpy() for (method, epoch), value in responses.items()
    }
    rows = []
    for (method, epoch), value in responses.items():
        magnitude = np.abs(arrays[f"{method}|{int(epoch)}"]).reshape(shape[0], shape[1], -1)
        rows.extend([method, int(epoch), i, f, f"{magnitude[i, k].mean():.6g}", f"{magnitude[i, k].max():.6g}"]
                    for i in range(shape[0]) for k, f in enumerate(filter_ids))
    atomic_write_csv(csv_path, ["method", "epoch", "image", "filter", "mean_abs", "max_abs"], rows)
    np.savez_compressed(
        npz_path, images=images.detach().float().cpu().numpy(), filters=np.asarray(filter_ids), **arrays
    )
    return [png, pdf, csv_path, npz_path]
