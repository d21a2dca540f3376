"""What filters respond to, by activation maximization (Figure 1, filter images).

Activation maximization (Erhan et al., 2009) looks for the input image that excites
a filter most: starting from faint noise, gradient ascent on the image raises the
spatial mean of the filter's output channel. The image is kept in an ℓ2 ball of
fixed radius (in normalized input space), else the ascent just scales it up.

All filters of a layer are optimized at once as one batch: image f only feeds the
objective of filter f, so the batch objective Σ_f mean(act_f(x_f)) has independent
gradients per image and one forward/backward serves every filter. The forward pass
stops at the layer (a hook raises), so the rest of the network costs nothing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.plots.path import read_filter_paths, read_run_config
from splitlbi.train.progress import progress_bar
from splitlbi.train.runfiles import iter_path
from splitlbi.utils.io import atomic_write_csv
from splitlbi.plots.style import (
    FULL_WIDTH,
    NOT_SELECTED_COLOR,
    SELECTED_COLOR,
    UNKNOWN_SUPPORT_COLOR,
    paper_style,
    run_label,
    save_figure,
    support_color,
)

_CHECKPOINT_NAME = re.compile(r"^epoch_(\d+)\.pt$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class _StopForward(Exception):
    """Raised by the layer hook: nothing after the layer is needed."""


# --------------------------------------------------------------------------- #
# Activation maximization
# --------------------------------------------------------------------------- #


def get_layer(model: nn.Module, layer_name: str) -> nn.Module:
    """The submodule ``layer_name`` of ``model``; the error lists the conv/linear layers."""
    try:
        return model.get_submodule(layer_name)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise SplitLBIError(
            f"model has no layer {layer_name!r}; conv/linear layers: {', '.join(names)}"
        ) from None


def num_filters_of(layer: nn.Module) -> int:
    """Number of output filters/neurons of a conv or linear layer."""
    for attr in ("out_channels", "out_features"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 2:
        return int(weight.shape[0])
    raise SplitLBIError(f"layer {type(layer).__name__} has no output filters to visualize")


def _own_filter_activation(output: Tensor, filter_ids: Tensor) -> Tensor:
    """Activation of filter ``filter_ids[i]`` on image i: spatial mean of its channel."""
    picked = output[torch.arange(len(filter_ids), device=output.device), filter_ids]
    return picked.flatten(1).mean(1) if picked.dim() > 1 else picked


def _layer_output(model: nn.Module, layer: nn.Module, images: Tensor) -> Tensor:
    """Run ``model`` on ``images`` up to ``layer`` and return the layer's (pre-activation) output."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        captured.append(output)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        model(images)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise SplitLBIError("the layer was not reached by the model's forward pass")
    return captured[0]


def filter_activations(
    model: nn.Module, layer_name: str, images: Tensor, filters: Optional[Sequence[int]] = None
) -> Tensor:
    """Mean activation of filter ``filters[i]`` (default i) on ``images[i]``, shape [n]."""
    layer = get_layer(model, layer_name)
    filter_ids = torch.as_tensor(
        list(filters) if filters is not None else range(len(images)), dtype=torch.long
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _own_filter_activation(_layer_output(model, layer, images), filter_ids)
    finally:
        model.train(was_training)


def project_to_ball_(images: Tensor, radius: float) -> Tensor:
    """In place: scale every image whose ℓ2 norm exceeds ``radius`` back onto the ball."""
    norms = images.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (radius / norms).clamp(max=1.0)
    images.mul_(scale.view(-1, *([1] * (images.dim() - 1))))
    return images


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Depthwise Gaussian blur of ``[N, C, H, W]`` images (kernel radius 2σ, reflect padding)."""
    radius = max(1, int(round(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = torch.nn.functional.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = torch.nn.functional.conv2d(padded, horizontal, groups=channels)
    return torch.nn.functional.conv2d(out, vertical, groups=channels)


def activation_maximization(
    model: nn.Module,
    layer_module_name: str,
    image_shape: Sequence[int],
    steps: int = 200,
    lr: float = 0.1,
    radius: Optional[float] = None,
    seed: int = 0,
    filters: Optional[Sequence[int]] = None,
    blur_sigma: float = 0.5,
    blur_every: int = 8,
    progress: Optional[bool] = False,
    description: Optional[str] = None,
    start: float = 1.0,
) -> Tensor:
    """Input images that maximize each filter of a layer, shape [n_filters, C, H, W].

    Projected gradient ascent from seeded noise: each image moves by ``lr · radius``
    (decaying linearly to 0) along its own normalized gradient, then is projected onto
    the ℓ2 ball of ``radius``. The normalized step treats every filter alike however
    large its gradient, and unlike Adam's sign-like steps it does not saturate every
    pixel into salt-and-pepper noise.
    ``radius`` defaults to sqrt(C·H·W), the norm of an image whose normalized pixels
    have unit RMS, i.e. the size of a typical input. ``filters`` restricts the search
    to some filter indices (default: all). The model is left as it was (mode and
    parameter gradients untouched).
    Every ``blur_every`` steps the images are smoothed by a Gaussian of ``blur_sigma``
    pixels (Yosinski et al. 2015): without such a prior the ascent through max-pooling
    favours high-frequency patterns that look like noise. ``blur_sigma=0`` disables it.
    ``progress``: a bar over the ascent steps on a terminal (see
    :func:`splitlbi.train.progress.progress_bar`). ``start``: the starting noise's norm as a
    fraction of ``radius``.
    """
    if steps < 0:
        raise SplitLBIError(f"steps must be >= 0, got {steps}")
    layer = get_layer(model, layer_module_name)
    filter_ids = torch.as_tensor(
        list(filters) if filters is not None else range(num_filters_of(layer)), dtype=torch.long
    )
    shape = tuple(int(s) for s in image_shape)
    if radius is None:
        radius = math.sqrt(math.prod(shape))
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(filter_ids), *shape), generator=generator, dtype=dtype)
    # Start on the ball (``start`` = 1): fainter noise leaves every ReLU below a negative bias
    # off in a trained net, the gradient is then exactly zero and the ascent never starts
    # (LeNet-5 trained at lr 0.1 has conv1 biases near -2: at 10% of the radius no unit is on).
    noise_norms = noise.flatten(1).norm(dim=1).view(-1, *([1] * len(shape)))
    images = (start * radius * noise / noise_norms).to(device).requires_grad_(True)
    filter_ids = filter_ids.to(device)

    was_training = model.training
    model.eval()  # BatchNorm/Dropout in inference mode: filters see single images
    try:
        for step in progress_bar(range(steps), description=description, enabled=progress, unit="step"):
            # linearly decaying step: big moves first, then settle on the best point of the ball
            step_size = lr * radius * (1.0 - step / steps)
            activation = _own_filter_activation(_layer_output(model, layer, images), filter_ids)
            # autograd.grad: only the images' gradient; model parameters' .grad stay as they were
            (grad,) = torch.autograd.grad(activation.sum(), images)
            with torch.no_grad():
                grad_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                images.add_(grad / grad_norm.view(-1, *([1] * len(shape))), alpha=step_size)
                if blur_sigma > 0 and blur_every > 0 and (step + 1) % blur_every == 0 and step + 1 < steps:
                    images.copy_(gaussian_blur(images, blur_sigma))
                project_to_ball_(images, radius)
    finally:
        model.train(was_training)
    return images.detach()


# --------------------------------------------------------------------------- #
# Run directories: model and checkpoints
# --------------------------------------------------------------------------- #


def checkpoint_epochs(run_dir: Path) -> dict[int, Path]:
    """Epoch → checkpoint file of a run: ``checkpoints/epoch_XXXX.pt``, and 0 → ``init.pt``."""
    run_dir = Path(run_dir)
    found: dict[int, Path] = {}
    for init in (run_dir / "init.pt", run_dir / "checkpoints" / "init.pt"):
        if init.is_file():
            found[0] = init
            break
    checkpoint_dir = run_dir / "checkpoints"
    if checkpoint_dir.is_dir():
        for file in checkpoint_dir.iterdir():
            match = _CHECKPOINT_NAME.match(file.name)
            if match:
                found[int(match.group(1))] = file
    return dict(sorted(found.items()))


def load_state_dict_at(run_dir: Path, epoch: int) -> dict[str, Tensor]:
    """The model state_dict of a run at ``epoch`` (0 = initialization)."""
    available = checkpoint_epochs(run_dir)
    if epoch not in available:
        listed = ", ".join(str(e) for e in available) or "none"
        raise SplitLBIError(f"{run_dir}: no checkpoint for epoch {epoch}; available epochs: {listed}")
    from splitlbi.utils.io import load_torch_file  # late, like create_model below

    # weights_only (through load_torch_file): a run directory from elsewhere cannot run code here.
    checkpoint = load_torch_file(available[epoch])
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise SplitLBIError(f"{available[epoch]}: no model state_dict in checkpoint")
    return {_strip_wrapper_prefix(key): value for key, value in state.items()}


def _strip_wrapper_prefix(key: str) -> str:
    """Undo the key prefixes of DataParallel ("module.") and torch.compile ("_orig_mod.")."""
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """A fresh model of the architecture recorded in a run's config."""
    from splitlbi.models import create_model  # late: keeps plotting importable without models

    try:
        return create_model(
            config["model"],
            num_classes=int(config["num_classes"]),
            in_channels=int(config["in_channels"]),
        )
    except KeyError as exc:
        raise SplitLBIError(f"config.json lacks {exc} needed to rebuild the model") from None


def image_shape_of(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the run's inputs from ``in_channels`` and ``image_size`` (int or [H, W])."""
    try:
        size = config["image_size"]
        height, width = (size, size) if isinstance(size, (int, float)) else size
        return int(config["in_channels"]), int(height), int(width)
    except (KeyError, TypeError, ValueError):
        raise SplitLBIError("config.json needs 'in_channels' and 'image_size' for the input shape") from None


def load_model_at(run_dir: Path, epoch: int, config: Mapping[str, Any]) -> nn.Module:
    """The run's model with the weights of ``epoch``, in eval mode."""
    state = load_state_dict_at(run_dir, epoch)
    model = build_model(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1].strip()
        raise SplitLBIError(f"epoch {epoch} checkpoint does not fit model {config['model']!r}: {first_line}") from None
    if result.missing_keys:
        raise SplitLBIError(
            f"epoch {epoch} checkpoint lacks weights of model {config['model']!r}: "
            f"{', '.join(result.missing_keys[:5])}"
        )
    return model.eval()


# --------------------------------------------------------------------------- #
# Figure
# --------------------------------------------------------------------------- #


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) for n tiles, about square, preferring a full last row (120 → 10×12)."""
    if n <= 0:
        return 1, 1
    base = math.ceil(math.sqrt(n))
    best = min(
        range(base, max(base, int(1.5 * math.sqrt(n))) + 1),
        key=lambda cols: (math.ceil(n / cols) * cols - n, cols),
    )
    return math.ceil(n / best), best


def to_display(images: Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> np.ndarray:
    """[n, C, H, W] normalized images → [n, H, W, 3] floats in [0, 1] for imshow.

    Undo the input normalization, then stretch each image's 1st–99th percentile to the
    full range: the maximizing images are not in the data range, only their pattern
    matters, and a plain min–max lets a few extreme pixels grey out the rest.
    """
    images = images.detach().float().cpu()
    channels = images.shape[1]
    if std is not None:
        images = images * torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    if mean is not None:
        images = images + torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    flat = images.flatten(1)
    low = torch.quantile(flat, 0.01, dim=1).view(-1, 1, 1, 1)
    high = torch.quantile(flat, 0.99, dim=1).view(-1, 1, 1, 1)
    images = ((images - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)
    images = images.permute(0, 2, 3, 1).numpy()
    if channels == 1:
        images = np.repeat(images, 3, axis=3)
    return images[..., :3]


def _mosaic(tiles: np.ndarray, rows: int, cols: int, gap: int) -> np.ndarray:
    """Tiles [n, H, W, 3] on a white canvas, row-major, ``gap`` pixels apart."""
    n, height, width, _ = tiles.shape
    canvas = np.ones((rows * (height + gap) + gap, cols * (width + gap) + gap, 3))
    for k in range(n):
        top = gap + (k // cols) * (height + gap)
        left = gap + (k % cols) * (width + gap)
        canvas[top:top + height, left:left + width] = tiles[k]
    return canvas


def plot_filter_grid(
    images_by_epoch: Mapping[int, Tensor],
    support: Optional[np.ndarray] = None,
    filter_ids: Optional[Sequence[int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    title: Optional[str] = None,
    note: Optional[str] = None,
) -> Figure:
    """One block per epoch, side by side, with the filters' images in a grid.

    Each image is framed by the support of Γ: blue selected, red not, grey if
    ``support`` is None. ``filter_ids[k]`` is the filter of image k (default k);
    frames have ``gid`` ``frame<filter>``.
    """
    if not images_by_epoch:
        raise SplitLBIError("no epoch to plot")
    first = next(iter(images_by_epoch.values()))
    n_tiles = first.shape[0]
    filter_ids = list(filter_ids) if filter_ids is not None else list(range(n_tiles))
    rows, cols = grid_shape(n_tiles)
    height, width = first.shape[-2:]
    gap = max(2, height // 5)  # room for the frame line between neighbours

    n_blocks = len(images_by_epoch)
    # At least 3 inches per epoch block (0.5 inch per tile of a 6 x 6 grid), even if the
    # figure gets wider than a page: tiles squeezed into a page width are unreadable.
    block_width = max(FULL_WIDTH / n_blocks, 3.0)
    with paper_style():
        fig = Figure(
            figsize=(block_width * n_blocks, block_width * rows / cols + 0.65),
            layout="constrained",
        )
        axes = fig.subplots(1, n_blocks, squeeze=False)[0]
        for ax, (epoch, images) in zip(axes, images_by_epoch.items()):
            ax.imshow(_mosaic(to_display(images, mean, std), rows, cols, gap), interpolation="nearest")
            for k, f in enumerate(filter_ids):
                selected = None if support is None else bool(support[f])
                top = gap + (k // cols) * (height + gap) - 0.5
                left = gap + (k % cols) * (width + gap) - 0.5
                ax.add_patch(Rectangle(
                    (left, top), width, height, fill=False, linewidth=1.0,
                    edgecolor=support_color(selected), gid=f"frame{f}",
                ))
            ax.set_title(f"epoch {epoch}")
            ax.set_axis_off()
        if support is None:
            handles = [Patch(facecolor="none", edgecolor=UNKNOWN_SUPPORT_COLOR, label="support of Γ unknown")]
        else:
            n_selected = int(np.asarray(support).sum())
            handles = [
                Patch(facecolor="none", edgecolor=SELECTED_COLOR,
                      label=f"selected by Γ ({n_selected}/{len(support)})"),
                Patch(facecolor="none", edgecolor=NOT_SELECTED_COLOR, label="not selected"),
            ]
        if note:
            handles.append(Patch(facecolor="none", edgecolor="none", label=note))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), handlelength=1.0)
        # The colour scale: each image is stretched on its own (see to_display), so the bar
        # names percentiles of that image's pixels, not absolute input values.
        scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap="gray")
        bar = fig.colorbar(scale, ax=list(axes), location="right", shrink=0.8, aspect=25, pad=0.01)
        bar.set_ticks([0.0, 1.0], labels=["1st pct.", "99th pct."])
        bar.set_label("pixel value, per image")
        if title:
            fig.suptitle(title)
    return fig


def resolve_support(
    run_dir: Path, layer: str, support_from: Optional[Path] = None
) -> tuple[Optional[np.ndarray], Optional[str]]:
    """The final support of Γ for framing filters, and a note on where it came from.

    An explicit ``support_from`` run wins; else the run's own Γ (from path.csv); else
    None (grey frames), e.g. an SGD run shown alone.
    """
    if support_from is not None:
        paths = read_filter_paths(Path(support_from), layer)
        if paths.final_support is None:
            raise SplitLBIError(f"{support_from}: path.csv has no support of Γ (in_support is empty)")
        config = read_run_config(Path(support_from))
        source = run_label(config) if config else Path(support_from).name
        return paths.final_support, f"frames: Γ of {source}"
    try:
        paths = read_filter_paths(Path(run_dir), layer)
    except SplitLBIError:
        return None, None  # no path.csv or layer not logged: frames stay grey
    return paths.final_support, None


def _run_to_visualize(run_dir: Path, epochs: Sequence[int]) -> tuple[Path, dict[str, Any], tuple[int, int, int]]:
    """The run directory, its config and input shape; one-line errors for a missing run or no epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SplitLBIError(f"run directory {run_dir} does not exist")
    if not epochs:
        raise SplitLBIError("give at least one epoch (--epochs)")
    config = read_run_config(run_dir, required=True)
    return run_dir, config, image_shape_of(config)


def _model_at(run_dir: Path, epoch: int, config: Mapping[str, Any], layer: str,
              support: Optional[np.ndarray]) -> tuple[nn.Module, int]:
    """The model at ``epoch`` and its number of ``layer`` filters, which must match ``support`` (when given)."""
    model = load_model_at(run_dir, epoch, config)
    total = num_filters_of(get_layer(model, layer))
    if support is not None and len(support) != total:
        raise SplitLBIError(f"layer {layer!r} has {total} filters but the support of Γ has {len(support)}")
    return model, total


def plot_filter_visualizations(
    run_dir: Path,
    layer: str,
    epochs: Sequence[int],
    out: Path,
    steps: int = 200,
    num_filters: Optional[int] = None,
    support_from: Optional[Path] = None,
    lr: float = 0.1,
    seed: int = 0,
    title: Optional[str] = None,
    pdf: bool = False,
    progress: Optional[bool] = False,
) -> Path:
    """Activation-maximization images of ``layer``'s filters at ``epochs``, saved to ``out``.

    ``num_filters`` shows only the first N filters (by index). The same seed is used at
    every epoch so that differences between blocks come from the weights alone.
    ``progress``: one bar per epoch over the ascent steps, on a terminal.
    """
    run_dir, config, shape = _run_to_visualize(run_dir, epochs)
    support, note = resolve_support(run_dir, layer, support_from)

    images_by_epoch: dict[int, Tensor] = {}
    filter_ids: list[int] = []
    for epoch in epochs:
        model, total = _model_at(run_dir, int(epoch), config, layer, support)
        filter_ids = list(range(total if num_filters is None else min(num_filters, total)))
        images_by_epoch[int(epoch)] = activation_maximization(
            model, layer, shape, steps=steps, lr=lr, seed=seed, filters=filter_ids, progress=progress,
            description=f"{layer} epoch {epoch}",
        )

    if support is None and note is None:
        note = "no Γ in this run (use --support-from)"
    label = run_label(config) if config else run_dir.name
    fig = plot_filter_grid(
        images_by_epoch, support=support, filter_ids=filter_ids,
        mean=config.get("mean"), std=config.get("std"),
        title=title if title is not None else f"{label}: {layer}",
        note=note,
    )
    return save_figure(fig, out, pdf=pdf)


# --------------------------------------------------------------------------- #
# Selected against unselected filters (Figure 1 of the paper, filter images)
# --------------------------------------------------------------------------- #

#: Columns of the CSV written next to :func:`plot_selected_filters`'s figure, one row per
#: (epoch, filter) of the layer (every filter, not only those drawn).
SELECTED_FILTERS_COLUMNS = ("epoch", "filter", "w_norm", "in_support", "selected_at_end", "shown",
                            "activation", "activation_gain")


def selected_and_unselected(support: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` filter indices: half selected, half not (lowest indices), selected first."""
    support = np.asarray(support, dtype=bool)
    selected = [int(f) for f in np.flatnonzero(support)]
    unselected = [int(f) for f in np.flatnonzero(~support)]
    half = count // 2
    take_selected = min(len(selected), max(half, count - len(unselected)))
    take_unselected = min(len(unselected), count - take_selected)
    return selected[:take_selected] + unselected[:take_unselected]


def filter_weight_norms(model: nn.Module, layer_name: str) -> np.ndarray:
    """ℓ2 norm of each output filter's weights ‖W_f‖ (what path.csv's ``w_norm`` holds)."""
    weight = get_layer(model, layer_name).weight.detach()
    return weight.flatten(1).norm(dim=1).cpu().numpy()


def activation_gains(model: nn.Module, layer_name: str, images: Tensor, filters: Sequence[int]) -> tuple:
    """(activation, gain) per image: filter ``filters[i]``'s mean activation on ``images[i]``, and that
    minus its activation on the blank image (all zeros in normalized input space).

    The gain says how strongly a filter responds to the best input of a fixed norm; a
    filter whose weights are ≈ 0 has a gain ≈ 0 whatever its image looks like.
    """
    activation = filter_activations(model, layer_name, images, filters)
    blank = filter_activations(model, layer_name, torch.zeros_like(images), filters)
    return activation.cpu().numpy(), (activation - blank).cpu().numpy()


def support_at_epoch(run_dir: Path, layer: str, epoch: int) -> Optional[np.ndarray]:
    """Whether each filter of ``layer`` is in the support of Γ at ``epoch`` (path.csv); None without Γ."""
    rows = sorted((row.filter, row.in_support) for row in iter_path(Path(run_dir), layer=layer, epoch=epoch))
    if not rows:
        raise SplitLBIError(f"{run_dir}: path.csv has no rows of layer {layer!r} at epoch {epoch}")
    if any(flag is None for _, flag in rows):
        return None
    return np.array([bool(flag) for _, flag in rows])


def shared_contrast(images: Sequence[Tensor], gains: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Tiles [n, H, W, 3] in [0, 1] on ONE grey scale for all blocks: image f times its gain.

    Each image (normalized input space, 0 = the blank image) is weighted by its filter's
    activation gain over the largest gain of all blocks, then every tile is mapped with
    the same range (±99th percentile of |value| over all tiles) to grey 0.5 ± 0.5. A
    filter that barely responds shows as flat grey whatever its own-contrast pattern.
    """
    largest = max(float(np.max(np.clip(g, 0.0, None))) for g in gains) if gains else 0.0
    weighted = [img.detach().float().cpu().numpy()[:, 0] * (np.clip(g, 0.0, None) / max(largest, 1e-12))
                .reshape(-1, 1, 1) for img, g in zip(images, gains)]
    scale = max(float(np.quantile(np.abs(np.concatenate([w.ravel() for w in weighted])), 0.99)), 1e-12)
    return [np.repeat(np.clip(0.5 + 0.5 * w / scale, 0.0, 1.0)[..., None], 3, axis=3) for w in weighted]


def _tile_block(ax: Any, tiles: np.ndarray, filter_ids: Sequence[int], support: Optional[np.ndarray],
                norms: np.ndarray, cols: int) -> None:
    """Tiles in a grid with a frame (support colour) and ‖W_f‖ above each."""
    n, height, width, _ = tiles.shape
    rows = math.ceil(n / cols)
    gap, label = max(2, height // 5), max(6, height // 3)  # room for the frame and the norm text
    canvas = np.ones((rows * (height + gap + label) + gap, cols * (width + gap) + gap, 3))
    for k, f in enumerate(filter_ids):
        top = gap + label + (k // cols) * (height + gap + label)
        left = gap + (k % cols) * (width + gap)
        canvas[top:top + height, left:left + width] = tiles[k]
        color = support_color(None if support is None else bool(support[f]))
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, linewidth=1.0,
                               edgecolor=color, gid=f"frame{f}"))
        ax.text(left + width / 2, top - 1.5, f"{norms[f]:.2f}", ha="center", va="bottom", fontsize=4.5,
                color=color, gid=f"norm{f}")
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()


def plot_filter_contrasts(
    images_by_epoch: Mapping[int, Tensor],
    gains_by_epoch: Mapping[int, np.ndarray],
    norms_by_epoch: Mapping[int, np.ndarray],
    supports_by_epoch: Mapping[int, Optional[np.ndarray]],
    filter_ids: Sequence[int],
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    title: Optional[str] = None,
    note: Optional[str] = None,
) -> Figure:
    """One row per epoch, two blocks each: every filter at its own contrast, and all at one shared contrast.

    ``images_by_epoch[e][k]`` and ``gains_by_epoch[e][k]`` belong to filter
    ``filter_ids[k]``; ``norms_by_epoch[e][f]`` and ``supports_by_epoch[e][f]`` are
    indexed by filter. Frames: blue in the support of Γ at that epoch, red not, grey
    unknown; above each tile ‖W_f‖ at that epoch. Frames and norm texts have ``gid``
    ``frame<f>`` / ``norm<f>``.
    """
    epochs = list(images_by_epoch)
    if not epochs:
        raise SplitLBIError("no epoch to plot")
    n_tiles = len(filter_ids)
    cols = min(n_tiles, 12 if n_tiles > 12 else n_tiles)
    rows = math.ceil(n_tiles / cols)
    own = [to_display(images_by_epoch[e], mean, std) for e in epochs]
    shared = shared_contrast([images_by_epoch[e] for e in epochs], [gains_by_epoch[e] for e in epochs])
    block_width = FULL_WIDTH / 2
    with paper_style():
        fig = Figure(figsize=(FULL_WIDTH, len(epochs) * (block_width * rows * 1.3 / cols + 0.3) + 0.6),
                     layout="constrained")
        axes = fig.subplots(len(epochs), 2, squeeze=False)
        for row, epoch in enumerate(epochs):
            support = supports_by_epoch.get(epoch)
            for col, (tiles, what) in enumerate(((own[row], "own contrast"), (shared[row], "shared contrast"))):
                ax = axes[row, col]
                _tile_block(ax, tiles, filter_ids, support, norms_by_epoch[epoch], cols)
                in_support = "" if support is None else f", {int(support.sum())}/{len(support)} in support"
                ax.set_title(f"epoch {epoch}: {what}{in_support}")
        handles = [Patch(facecolor="none", edgecolor=SELECTED_COLOR, label="in the support of Γ at that epoch"),
                   Patch(facecolor="none", edgecolor=NOT_SELECTED_COLOR, label="not in the support")]
        if all(supports_by_epoch.get(e) is None for e in epochs):
            handles = [Patch(facecolor="none", edgecolor=UNKNOWN_SUPPORT_COLOR, label="support of Γ unknown")]
        handles.append(Patch(facecolor="none", edgecolor="none", label="number above a tile: ‖W_f‖"))
        if note:
            handles.append(Patch(facecolor="none", edgecolor="none", label=note))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2), handlelength=1.0)
        if title:
            fig.suptitle(title)
    return fig


def plot_selected_filters(
    run_dir: Path,
    layer: str,
    epochs: Sequence[int],
    out: Path,
    *,
    per_group: int = 12,
    support_from: Optional[Path] = None,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    title: Optional[str] = None,
    pdf: bool = False,
    progress: Optional[bool] = False,
) -> Path:
    """Activation maximization of ``per_group`` selected and ``per_group`` unselected filters at ``epochs``.

    Which filters are "selected" is the support of Γ at the last epoch of ``support_from``
    (default: the run itself; an SGD run needs a SplitLBI run with the same
    initialization). Each row of the figure is an epoch, drawn twice: every image at its
    own contrast (the pattern, however weak the filter) and all images at one shared
    contrast weighted by the filter's activation gain (:func:`shared_contrast`), where
    filters that barely respond fade to grey. Frames are the support at that epoch; each
    tile carries ‖W_f‖. Every filter of the layer is optimized (one batch), and
    ``out.with_suffix(".csv")`` gets :data:`SELECTED_FILTERS_COLUMNS` for all of them.
    Returns the PNG path.
    """
    if per_group < 1:
        raise SplitLBIError(f"per_group must be >= 1, got {per_group}")
    run_dir, config, shape = _run_to_visualize(run_dir, epochs)
    support_run = Path(support_from) if support_from is not None else run_dir
    final_support, _ = resolve_support(run_dir, layer, support_from)
    if final_support is None:
        raise SplitLBIError(f"{run_dir} has no support of Γ to tell selected filters from the others; "
                            "give a SplitLBI run with the same initialization (--support-from)")
    images, gains, activations, norms, supports = {}, {}, {}, {}, {}
    for epoch in epochs:
        model, total = _model_at(run_dir, int(epoch), config, layer, final_support)
        everything = list(range(total))
        images[epoch] = activation_maximization(model, layer, shape, steps=steps, lr=lr, seed=seed,
                                                filters=everything, progress=progress,
                                                description=f"{layer} epoch {epoch}")
        activations[epoch], gains[epoch] = activation_gains(model, layer, images[epoch], everything)
        norms[epoch] = filter_weight_norms(model, layer)
        supports[epoch] = support_at_epoch(support_run, layer, int(epoch))
    shown = selected_and_unselected(final_support, 2 * per_group)
    n_selected = int(final_support[shown].sum())
    label = run_label(config) if config else run_dir.name
    source = "" if support_from is None else f"; Γ of {run_label(read_run_config(support_run)) or support_run.name}"
    fig = plot_filter_contrasts(
        {e: images[e][shown] for e in epochs}, {e: gains[e][shown] for e in epochs}, norms, supports, shown,
        mean=config.get("mean"), std=config.get("std"),
        title=title if title is not None else f"{label}: what {layer} filters respond to (activation maximization)",
        note=f"shown: {n_selected} filters selected at the end, {len(shown) - n_selected} not (lowest indices){source}",
    )
    rows = [[int(e), f, f"{norms[e][f]:.6g}", "" if supports[e] is None else int(supports[e][f]),
             int(final_support[f]), int(f in shown), f"{activations[e][f]:.6g}", f"{gains[e][f]:.6g}"]
            for e in epochs for f in range(len(final_support))]
    atomic_write_csv(Path(out).with_suffix(".csv"), list(SELECTED_FILTERS_COLUMNS), rows)
    return save_figure(fig, out, pdf=pdf)
