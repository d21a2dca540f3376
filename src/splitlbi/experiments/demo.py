"""``splitlbi demo``: Figure 1 in about half a minute, offline, on a CPU.

LeNet-5 is trained on the digits bundled with scikit-learn (8x8 scans upsampled to
28x28, 1437 train / 360 test images, no download) twice from the same initialization
(same seed): once with SplitLBI and once with SGD. Both are ordinary run directories
(``DIR/splitlbi``, ``DIR/sgd``; ``splitlbi plot`` and ``--resume`` work on them). Then:

- ``DIR/filter_paths.png``: the ℓ2 norm of each of the 120 filters of ``conv3`` (the
  paper's C5) over epochs, SplitLBI left and SGD right, both coloured by the final
  support of SplitLBI's Γ (blue selected, red not): the paper's Figure 1 paths;
- ``DIR/conv3_filters.png``: activation-maximization images (Erhan et al. 2009) of a
  few selected and a few unselected conv3 filters of the SplitLBI run at the first,
  middle and last kept epoch, framed by the support of Γ;
- ``DIR/summary.txt`` (also printed): dense test accuracy of both runs, the test
  accuracy of SplitLBI's sparse model (W projected onto the support of Γ, no
  fine-tuning), the conv3 filters selected, the share of non-zeros of Γ and the wall time.

Hyperparameters (:data:`DEMO_SETTINGS`), shared by both runs where they apply:
``lr 0.05``, ``momentum 0.9``, ``batch 32``, no weight decay, ``24 epochs`` with the
learning rate ×0.1 after 70% of them (epoch 17), seed 0, CPU; SplitLBI ``κ = 1``,
``ν = 3``, ``λ = 1``, default penalties (group lasso on conv filters, lasso on linear
weights).

Why ``ν = 3`` (the paper uses ~100 on MNIST): one ``λ`` serves every layer, and a
conv3 filter (400 weights) reaches the group threshold ‖V_f‖ > λ long before a single
fc weight reaches |V_ij| > λ. With a weak coupling (ν ≥ 10) SplitLBI's support holds
most of conv3 but almost none of fc1 after the few hundred steps this small dataset
gives, and the sparse model (fc1 zeroed) is at chance. A strong coupling keeps ``W``
close to ``Γ``: unimportant filters are pulled to zero and never enter, while the
filters and weights the loss needs are pushed into the support. With ν = 3 (seeds
0–9 tried) the dense model reaches 97–99% test accuracy like SGD, the sparse model
is within about one point of it, and 54–80 of the 120 conv3 filters are selected;
the support stops growing after about 12 epochs, and the sparse model catches up
with the dense one by about epoch 14 (with ``--epochs`` much below 20 it is not there yet). ν ≤ 2 is too strong: on some seeds
the network is pulled to zero before anything enters and stays at chance; ν ≥ 5
leaves the sparse model a few points below the dense one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from splitlbi.errors import SplitLBIError
from splitlbi.train import TrainConfig, read_run_config, run_training
from splitlbi.train.run import load_masks

__all__ = [
    "DEMO_SETTINGS", "DEMO_EPOCHS", "LAYER", "run_demo", "demo_configs", "format_summary",
]

PathLike = Union[str, "Path"]

#: Epochs of both runs unless ``--epochs`` says otherwise.
DEMO_EPOCHS = 24
#: The layer of Figure 1: LeNet-5's C5, 120 filters.
LAYER = "conv3"
#: Settings shared by the SplitLBI and SGD runs (see the module docstring).
DEMO_SETTINGS: Dict[str, Any] = dict(
    model="lenet5", dataset="digits", lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=32,
    kappa=1.0, nu=3.0, lam=1.0, penalty="auto", seed=0, device="cpu",
)
#: CPU threads for the demo: LeNet-5 on batches of 32 gains nothing from more, one
#: thread is not slowed down by other busy processes (several threads wait on each
#: other there), and the numbers do not depend on the machine's core count.
DEMO_THREADS = 1
#: Share of the epochs after which the learning rate drops ×0.1.
LR_DROP_AT = 0.7

#: Activation maximization: filters shown (half selected, half not) and ascent steps.
VIS_FILTERS = 36
VIS_STEPS = 100

# What a demo directory holds; a directory holding nothing else may be overwritten.
RUN_NAMES = ("splitlbi", "sgd")
PATHS_PNG = "filter_paths.png"
FILTERS_PNG = "conv3_filters.png"
SUMMARY_FILE = "summary.txt"
OUTPUT_NAMES = frozenset(RUN_NAMES + (PATHS_PNG, FILTERS_PNG, SUMMARY_FILE))


# --------------------------------------------------------------------------- settings


def demo_configs(epochs: int = DEMO_EPOCHS, progress: bool = True) -> Dict[str, TrainConfig]:
    """The :class:`TrainConfig` of each demo run: ``{"splitlbi": ..., "sgd": ...}``.

    Checkpoints are kept every ``epochs // 6`` epochs (and at the last), enough for the
    filter images at the first, middle and last kept epoch.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise SplitLBIError(f"--epochs must be >= 1, got {epochs}")
    drop = int(round(LR_DROP_AT * epochs))
    milestones = (drop,) if 1 <= drop < epochs else ()
    base = TrainConfig(**DEMO_SETTINGS, epochs=epochs, lr_milestones=milestones,
                       save_every=max(1, epochs // 6), progress=progress)
    return {name: dataclasses.replace(base, optimizer=name) for name in RUN_NAMES}


def visualized_epochs(config: TrainConfig) -> List[int]:
    """First, middle and last epoch with a kept checkpoint (``save_every`` multiples and the last)."""
    kept = sorted({e for e in range(1, config.epochs + 1) if e % config.save_every == 0} | {config.epochs})
    middle = min(kept, key=lambda e: (abs(e - config.epochs / 2), e))
    return sorted({kept[0], middle, kept[-1]})


# --------------------------------------------------------------------------- output folder


def _is_run_dir_or_empty(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or not any(path.iterdir()))


def prepare_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` ready for a demo: create it, or clear a previous demo's output.

    A directory that holds only what a demo writes (its two run directories, the two
    PNGs, summary.txt; also a run cut short) is cleared and redone; one holding anything
    else is refused, so that the demo never deletes files it did not write.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise SplitLBIError(f"--out {out_dir} exists and is not a directory")
    if not out_dir.exists():
        return
    entries = list(out_dir.iterdir())
    foreign = [entry.name for entry in entries
               if entry.name not in OUTPUT_NAMES or (entry.name in RUN_NAMES and not _is_run_dir_or_empty(entry))]
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "")
        raise SplitLBIError(f"--out {out_dir} is not empty and does not look like a previous demo's output "
                            f"(it holds {shown}); choose a new or empty directory")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --------------------------------------------------------------------------- figures


def plot_demo_filters(run_dir: Path, out: Path, epochs: Sequence[int], *, num_filters: int = VIS_FILTERS,
                      steps: int = VIS_STEPS, progress: Optional[bool] = False) -> Path:
    """Activation-maximization images of selected and unselected conv3 filters at ``epochs``
    (``progress``: a bar per epoch on a terminal)."""
    from splitlbi.plots.filters import (activation_maximization, image_shape_of, load_model_at,
                                        plot_filter_grid, selected_and_unselected)
    from splitlbi.plots.path import read_filter_paths
    from splitlbi.plots.style import run_label, save_figure

    config = read_run_config(run_dir)
    support = read_filter_paths(run_dir, LAYER).final_support
    if support is None:
        raise SplitLBIError(f"{run_dir} has no support of Γ to choose filters by")
    filter_ids = selected_and_unselected(support, num_filters)
    shape = image_shape_of(config)
    images = {int(epoch): activation_maximization(load_model_at(run_dir, int(epoch), config), LAYER, shape,
                                                  steps=steps, filters=filter_ids, progress=progress,
                                                  description=f"{LAYER} epoch {epoch}")
              for epoch in epochs}
    n_selected = int(support[filter_ids].sum())
    figure = plot_filter_grid(
        images, support=support, filter_ids=filter_ids, mean=config.get("mean"), std=config.get("std"),
        title=f"{run_label(config)}: what {LAYER} filters respond to (activation maximization)",
        note=f"shown: {n_selected} selected, {len(filter_ids) - n_selected} not",
    )
    return save_figure(figure, out)


# --------------------------------------------------------------------------- summary


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}%"


def format_summary(summary: Dict[str, Any]) -> str:
    """The text of ``summary.txt`` for the dict :func:`run_demo` returns."""
    hyper = summary["settings"]
    milestones = hyper["lr_milestones"]
    schedule = f" (x0.1 after epoch {milestones[0]})" if milestones else ""
    lines = [
        f"splitlbi demo: LeNet-5 on digits ({summary['train_size']} train / {summary['test_size']} test images), "
        f"{summary['epochs']} epochs, same initialization (seed {hyper['seed']}) for both runs",
        f"settings: lr {hyper['lr']:g}{schedule}, momentum {hyper['momentum']:g}, batch size "
        f"{hyper['batch_size']}; SplitLBI kappa {hyper['kappa']:g}, nu {hyper['nu']:g}, lambda {hyper['lam']:g}",
        "",
        f"SGD dense test accuracy:       {_percent(summary['sgd_test_acc'])}",
        f"SplitLBI dense test accuracy:  {_percent(summary['splitlbi_test_acc'])}",
        f"SplitLBI sparse test accuracy: {_percent(summary['splitlbi_sparse_test_acc'])}"
        "  (W projected onto the support of Gamma, no fine-tuning)",
        f"conv3 filters selected:        {summary['conv3_selected']} of {summary['conv3_filters']}",
        f"non-zeros of Gamma:            {100.0 * summary['gamma_nonzero_share']:.2f}% of the coupled weights",
        f"wall time:                     {summary['wall_seconds']:.1f} s",
        "",
        f"runs:    {summary['splitlbi_dir']}  {summary['sgd_dir']}",
        f"figures: {summary['filter_paths_png']}  {summary['filters_png']}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the demo


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(out_dir: PathLike = "splitlbi-demo", epochs: int = DEMO_EPOCHS, progress: bool = True,
             log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train the two runs, draw the figures, write ``summary.txt``; return the summary numbers.

    Args:
        out_dir: output folder; created, or cleared if it holds a previous demo's output
            only (anything else there is an error).
        epochs: epochs of each run.
        progress: print a line per run and epoch (and tqdm bars on a terminal).
        log: where the lines go (default ``print`` when ``progress``, else nowhere).

    Returns:
        ``sgd_test_acc``, ``splitlbi_test_acc``, ``splitlbi_sparse_test_acc`` (percent),
        ``conv3_selected``, ``conv3_filters``, ``gamma_nonzero_share`` (share of non-zeros of Γ,
        0..1), ``wall_seconds``, ``epochs``, ``train_size``, ``test_size``, ``settings``
        (the shared hyperparameters) and the paths ``out_dir``, ``splitlbi_dir``,
        ``sgd_dir``, ``filter_paths_png``, ``filters_png``, ``summary_txt``.
    """
    with _torch_threads(DEMO_THREADS):
        return _run_demo(Path(out_dir), epochs, progress, log)


def _run_demo(out: Path, epochs: int, progress: bool, log: Optional[Callable[[str], None]]) -> Dict[str, Any]:
    from splitlbi.plots.path import plot_filter_paths

    started = time.perf_counter()
    say = log if log is not None else (print if progress else (lambda line: None))
    configs = demo_configs(epochs, progress=progress)
    prepare_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    final: Dict[str, Dict[str, Any]] = {}
    for index, (name, config) in enumerate(configs.items(), start=1):
        say(f"[{index}/{len(configs) + 1}] training LeNet-5 with {'SplitLBI' if name == 'splitlbi' else 'SGD'} "
            f"for {config.epochs} epochs -> {out / name}")
        prefix = f"  {name:>8}: "
        run_training(config, out / name, log=lambda line: say(prefix + line),
                     on_epoch_end=lambda epoch, metrics, name=name: final.__setitem__(name, metrics))

    lbi_dir, sgd_dir = out / "splitlbi", out / "sgd"
    say(f"[{len(configs) + 1}/{len(configs) + 1}] drawing the filter paths and filter images")
    paths_png = plot_filter_paths([lbi_dir, sgd_dir], LAYER, out / PATHS_PNG,
                                  title=f"LeNet-5 {LAYER} on digits: filter norms along training")
    lbi_config = configs["splitlbi"]
    filters_png = plot_demo_filters(lbi_dir, out / FILTERS_PNG, visualized_epochs(lbi_config), progress=progress)

    masks = load_masks(lbi_dir, lbi_config.epochs)
    conv3 = masks[f"{LAYER}.weight"]
    info = read_run_config(lbi_dir)
    summary: Dict[str, Any] = {
        "sgd_test_acc": float(final["sgd"]["test_acc"]),
        "splitlbi_test_acc": float(final["splitlbi"]["test_acc"]),
        "splitlbi_sparse_test_acc": float(final["splitlbi"]["sparse_test_acc"]),
        "conv3_selected": int(conv3.flatten(1).any(dim=1).sum()),
        "conv3_filters": int(conv3.shape[0]),
        "gamma_nonzero_share": float(final["splitlbi"]["gamma_nonzero_share"]),
        "epochs": lbi_config.epochs,
        "train_size": int(info["train_size"]),
        "test_size": int(info["test_size"]),
        "settings": {key: getattr(lbi_config, key) for key in
                     ("lr", "momentum", "batch_size", "kappa", "nu", "lam", "seed", "lr_milestones")},
        "out_dir": out, "splitlbi_dir": lbi_dir, "sgd_dir": sgd_dir,
        "filter_paths_png": paths_png, "filters_png": filters_png, "summary_txt": out / SUMMARY_FILE,
    }
    summary["wall_seconds"] = time.perf_counter() - started
    text = format_summary(summary)
    (out / SUMMARY_FILE).write_text(text, encoding="utf-8")
    return summary
