"""Figure 1 plots: filter-norm paths and activation-maximization filter images.

The run directories are written here in the trainer's format with small fake data,
so these tests do not depend on the trainer.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from torch import nn

from splitlbi.errors import SplitLBIError
from splitlbi.cli import figures as plots_cli
from splitlbi.plots.filters import (
    activation_maximization,
    checkpoint_epochs,
    filter_activations,
    grid_shape,
    plot_filter_grid,
    plot_filter_visualizations,
    plot_selected_filters,
    selected_and_unselected,
    shared_contrast,
)
from splitlbi.plots.path import make_filter_path_figure, plot_filter_paths, read_filter_paths
from splitlbi.plots.style import (
    NOT_SELECTED_COLOR,
    SELECTED_COLOR,
    UNKNOWN_SUPPORT_COLOR,
    run_label,
)

NUM_FILTERS = 12
SELECTED = np.array([i % 3 == 0 for i in range(NUM_FILTERS)])  # 4 of 12


@pytest.fixture
def one_thread():
    """One intra-op thread: the CPU is shared, and OpenMP spinning under contention is slow."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_run(
    run_dir: Path,
    optimizer: str = "splitlbi",
    epochs: int = 4,
    num_filters: int = NUM_FILTERS,
    selected: Optional[np.ndarray] = SELECTED,
    flag_style: str = "01",
    checkpoint_epochs_: tuple[int, ...] = (),
) -> Path:
    """A run directory in the trainer's format: config.json, path.csv, checkpoints/."""
    run_dir.mkdir(parents=True)
    config = {
        "model": "lenet5", "dataset": "mnist", "optimizer": optimizer, "num_classes": 10,
        "in_channels": 1, "image_size": 28, "mean": [0.1307], "std": [0.3081],
        "kappa": 1.0, "nu": 100.0, "epochs": epochs,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    has_gamma = optimizer == "splitlbi"
    with (run_dir / "path.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "layer", "filter", "w_norm", "gamma_norm", "in_support"])
        for epoch in range(epochs + 1):
            for layer, count in (("conv1", 6), ("conv3", num_filters)):
                for f in range(count):
                    norm = 0.5 + 0.1 * epoch * (1 + f % 3)
                    if not has_gamma:
                        writer.writerow([epoch, layer, f, norm, "", ""])
                        continue
                    # the support grows: selected filters enter at the last epoch
                    flag = bool(selected[f % len(selected)]) and epoch == epochs
                    cell = int(flag) if flag_style == "01" else str(flag)
                    writer.writerow([epoch, layer, f, norm, norm if flag else 0.0, cell])
    if checkpoint_epochs_:
        from splitlbi.models import create_model

        torch.manual_seed(0)
        model = create_model("lenet5", num_classes=10, in_channels=1)
        (run_dir / "checkpoints").mkdir()
        for epoch in checkpoint_epochs_:
            with torch.no_grad():  # a different model per epoch, like training would give
                for p in model.parameters():
                    p.mul_(1.05)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            if epoch == 0:
                torch.save(state, run_dir / "init.pt")
            else:
                torch.save({"model": state, "epoch": epoch}, run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt")
    return run_dir


def line_colors(ax) -> dict[int, str]:
    """Filter index → colour of its path line (lines carry gid 'filter<f>')."""
    return {
        int(line.get_gid()[len("filter"):]): to_hex(line.get_color())
        for line in ax.get_lines()
        if line.get_gid() and line.get_gid().startswith("filter")
    }


# --------------------------------------------------------------------------- #
# Filter paths
# --------------------------------------------------------------------------- #


def test_read_filter_paths_pivots_rows_and_reads_final_support(tmp_path):
    paths = read_filter_paths(write_run(tmp_path / "lbi"), "conv3")
    assert paths.epochs.tolist() == [0, 1, 2, 3, 4]
    assert paths.norms.shape == (5, NUM_FILTERS)
    assert paths.final_support.tolist() == SELECTED.tolist()
    sgd = read_filter_paths(write_run(tmp_path / "sgd", optimizer="sgd"), "conv3")
    assert sgd.final_support is None


def test_in_support_accepts_true_false(tmp_path):
    paths = read_filter_paths(write_run(tmp_path / "lbi", flag_style="TrueFalse"), "conv3")
    assert paths.final_support.tolist() == SELECTED.tolist()


def test_path_plot_colours_by_final_support_and_sgd_borrows_it(tmp_path):
    lbi = write_run(tmp_path / "lbi")
    sgd = write_run(tmp_path / "sgd", optimizer="sgd")
    out = plot_filter_paths([lbi, sgd], "conv3", tmp_path / "fig" / "fig1.png", pdf=True)
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.with_suffix(".pdf").is_file()

    fig = make_filter_path_figure([lbi, sgd], "conv3")
    lbi_ax, sgd_ax = fig.axes[:2]
    assert lbi_ax.get_title() == "SplitLBI (κ=1, ν=100)"
    assert sgd_ax.get_title() == "SGD"
    expected = {f: SELECTED_COLOR if SELECTED[f] else NOT_SELECTED_COLOR for f in range(NUM_FILTERS)}
    assert line_colors(lbi_ax) == expected
    assert line_colors(sgd_ax) == expected  # SGD coloured by SplitLBI's Γ
    n_blue = sum(c == SELECTED_COLOR for c in line_colors(lbi_ax).values())
    assert n_blue == SELECTED.sum() == 4
    legend = [t.get_text() for t in lbi_ax.get_legend().get_texts()]
    assert legend == ["selected by Γ (4/12)", "not selected"]
    assert lbi_ax.get_xlabel() == "epoch"


def test_path_plot_filter_count_mismatch_is_an_error(tmp_path):
    lbi = write_run(tmp_path / "lbi", num_filters=12)
    sgd = write_run(tmp_path / "sgd", optimizer="sgd", num_filters=10)
    with pytest.raises(SplitLBIError, match="cannot compare"):
        make_filter_path_figure([lbi, sgd], "conv3")


def test_path_plot_of_sgd_alone_is_grey(tmp_path):
    sgd = write_run(tmp_path / "sgd", optimizer="sgd")
    fig = make_filter_path_figure([sgd], "conv3")
    assert set(line_colors(fig.axes[0]).values()) == {UNKNOWN_SUPPORT_COLOR}
    assert "no SplitLBI run" in fig.axes[0].get_legend().get_title().get_text()


def test_path_plot_unknown_layer_lists_layers(tmp_path):
    lbi = write_run(tmp_path / "lbi")
    with pytest.raises(SplitLBIError, match=r"'conv9'.*layers present: conv1, conv3"):
        plot_filter_paths([lbi], "conv9", tmp_path / "x.png")


def test_path_plot_without_path_csv_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SplitLBIError, match="no path.csv"):
        plot_filter_paths([tmp_path / "empty"], "conv3", tmp_path / "x.png")
    with pytest.raises(SplitLBIError, match="does not exist"):
        plot_filter_paths([tmp_path / "missing"], "conv3", tmp_path / "x.png")


def test_run_label():
    assert run_label({"optimizer": "splitlbi", "kappa": 10, "nu": 0.5}) == "SplitLBI (κ=10, ν=0.5)"
    assert run_label({"optimizer": "sgd", "kappa": 1}) == "SGD"


# --------------------------------------------------------------------------- #
# Activation maximization
# --------------------------------------------------------------------------- #


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def test_activation_maximization_raises_activation_within_norm_ball(one_thread):
    torch.manual_seed(0)
    model = TinyNet().train()
    start = activation_maximization(model, "conv2", (1, 8, 8), steps=0, seed=3)
    found = activation_maximization(model, "conv2", (1, 8, 8), steps=60, radius=4.0, seed=3)
    assert found.shape == (5, 1, 8, 8)
    assert (filter_activations(model, "conv2", found) > filter_activations(model, "conv2", start)).all()
    assert (found.flatten(1).norm(dim=1) <= 4.0 + 1e-4).all()
    # the model is left as it was
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    # seeded: same result twice
    again = activation_maximization(model, "conv2", (1, 8, 8), steps=60, radius=4.0, seed=3)
    assert torch.equal(found, again)


def test_activation_maximization_on_lenet5_conv3(one_thread):
    from splitlbi.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    filters = [0, 5, 119]
    start = activation_maximization(model, "conv3", (1, 28, 28), steps=0, filters=filters)
    found = activation_maximization(model, "conv3", (1, 28, 28), steps=30, filters=filters)
    assert found.shape == (3, 1, 28, 28)
    gain = filter_activations(model, "conv3", found, filters) - filter_activations(model, "conv3", start, filters)
    assert (gain > 0).all()
    assert (found.flatten(1).norm(dim=1) <= 28.0 + 1e-3).all()  # default radius sqrt(784)


def test_activation_maximization_starts_where_a_trained_net_responds(one_thread):
    """A trained LeNet-5 has conv1 biases near -2: from faint noise no ReLU is on, the gradient is exactly zero
    and the ascent never moves (what the Figure 1 images showed before); from noise on the ball it does."""
    from splitlbi.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    with torch.no_grad():
        model.conv1.weight.mul_(4.0)  # ‖w‖ ≈ 2, as after training at lr 0.1
        model.conv1.bias.fill_(-2.0)
    filters = [0, 1, 2]
    faint = activation_maximization(model, "conv3", (1, 28, 28), steps=0, filters=filters, start=0.1)
    dead = filter_activations(model, "conv3", faint, filters)
    moved = activation_maximization(model, "conv3", (1, 28, 28), steps=20, filters=filters, start=0.1, blur_sigma=0)
    assert torch.equal(filter_activations(model, "conv3", moved, filters), dead)  # stuck: zero gradient
    found = activation_maximization(model, "conv3", (1, 28, 28), steps=20, filters=filters)
    assert (filter_activations(model, "conv3", found, filters) > dead + 0.1).all()


def test_activation_maximization_unknown_layer():
    with pytest.raises(SplitLBIError, match="conv1, conv2, head"):
        activation_maximization(TinyNet(), "conv7", (1, 8, 8), steps=1)


# --------------------------------------------------------------------------- #
# Filter images
# --------------------------------------------------------------------------- #


def test_grid_shape():
    assert grid_shape(120) == (10, 12)
    assert grid_shape(24) == (4, 6)
    rows, cols = grid_shape(7)
    assert rows * cols >= 7


def test_filter_grid_frames_by_support():
    images = {20: torch.randn(6, 1, 5, 5), 40: torch.randn(6, 1, 5, 5)}
    support = np.array([True, False, True, False, False, False])
    fig = plot_filter_grid(images, support=support)
    # Two epoch blocks, then the colour scale of the per-image contrast stretch.
    assert [ax.get_title() for ax in fig.axes[:2]] == ["epoch 20", "epoch 40"]
    assert len(fig.axes) == 3 and "per image" in fig.axes[2].get_ylabel()
    frames = {p.get_gid(): to_hex(p.get_edgecolor()) for p in fig.axes[0].patches}
    assert frames == {f"frame{f}": SELECTED_COLOR if support[f] else NOT_SELECTED_COLOR for f in range(6)}
    grey = plot_filter_grid(images, support=None)
    assert {to_hex(p.get_edgecolor()) for p in grey.axes[1].patches} == {UNKNOWN_SUPPORT_COLOR}


def test_filters_plot_from_lenet5_checkpoints(tmp_path, one_thread):
    lbi = write_run(tmp_path / "lbi", num_filters=120, checkpoint_epochs_=(0, 2, 4))
    assert list(checkpoint_epochs(lbi)) == [0, 2, 4]
    out = plot_filter_visualizations(lbi, "conv3", [0, 4], tmp_path / "f.png", steps=5, num_filters=12)
    assert out.is_file() and out.stat().st_size > 5_000

    sgd = write_run(tmp_path / "sgd", optimizer="sgd", num_filters=120, checkpoint_epochs_=(2,))
    out = plot_filter_visualizations(
        sgd, "conv3", [2], tmp_path / "g.png", steps=2, num_filters=6, support_from=lbi
    )
    assert out.is_file()


def test_selected_and_unselected_takes_half_of_each_selected_first():
    support = np.array([False, True, False, True, True, False, False])
    assert selected_and_unselected(support, 4) == [1, 3, 0, 2]
    assert selected_and_unselected(np.array([True, False]), 6) == [0, 1]
    assert selected_and_unselected(np.array([True, True, True, False]), 4) == [0, 1, 2, 3]


def test_shared_contrast_fades_filters_that_do_not_respond():
    images = [torch.randn(3, 1, 6, 6), torch.randn(3, 1, 6, 6)]
    gains = [np.array([2.0, 0.0, 1e-6]), np.array([4.0, 1.0, -3.0])]
    tiles = shared_contrast(images, gains)
    assert [t.shape for t in tiles] == [(3, 6, 6, 3)] * 2
    assert np.allclose(tiles[0][1], 0.5) and np.allclose(tiles[1][2], 0.5)  # no gain (or a loss): flat grey
    assert np.abs(tiles[0][2] - 0.5).max() < 1e-3
    assert np.abs(tiles[1][0] - 0.5).max() > 0.3  # the largest gain uses the whole range


def test_selected_filters_figure_and_csv(tmp_path, one_thread):
    """Figure 1's filter images: own and shared contrast per epoch, frames by the support at that epoch, ‖W_f‖ per
    tile; the CSV has every filter with its norm (from the checkpoint), support and gain."""
    lbi = write_run(tmp_path / "lbi", num_filters=120, checkpoint_epochs_=(2, 4))
    with torch.no_grad():  # filters 1, 2, 4, 5, ... (unselected in write_run) driven to zero at epoch 4
        state = torch.load(lbi / "checkpoints" / "epoch_0004.pt")
        weight = state["model"]["conv3.weight"]
        weight[torch.as_tensor(~np.array([f % 3 == 0 for f in range(120)]))] *= 1e-6
        torch.save(state, lbi / "checkpoints" / "epoch_0004.pt")
    out = plot_selected_filters(lbi, "conv3", [2, 4], tmp_path / "sel.png", per_group=3, steps=5)
    assert out.is_file() and out.stat().st_size > 5_000
    rows = list(csv.DictReader((tmp_path / "sel.csv").open()))
    assert len(rows) == 2 * 120 and rows[0].keys() >= {"epoch", "filter", "w_norm", "in_support", "activation_gain"}
    at4 = {int(r["filter"]): r for r in rows if r["epoch"] == "4"}
    weight = torch.load(lbi / "checkpoints" / "epoch_0004.pt")["model"]["conv3.weight"]
    assert float(at4[7]["w_norm"]) == pytest.approx(float(weight[7].norm()), rel=1e-4)
    assert at4[3]["in_support"] == "1" and at4[4]["in_support"] == "0"  # write_run: support only at the last epoch
    assert {r["in_support"] for r in rows if r["epoch"] == "2"} == {"0"}
    assert sorted(int(f) for f, r in at4.items() if r["shown"] == "1") == [0, 1, 2, 3, 4, 6]
    gains = {f: float(r["activation_gain"]) for f, r in at4.items()}
    assert max(abs(gains[f]) for f in (1, 2, 4)) < 1e-3 * min(gains[f] for f in (0, 3, 6))

    # The SGD run of the same init: its own norms, the SplitLBI run's support.
    sgd = write_run(tmp_path / "sgd", optimizer="sgd", num_filters=120, checkpoint_epochs_=(4,))
    plot_selected_filters(sgd, "conv3", [4], tmp_path / "sgd.png", per_group=2, steps=2, support_from=lbi)
    sgd_rows = list(csv.DictReader((tmp_path / "sgd.csv").open()))
    assert [r["in_support"] for r in sgd_rows[:4]] == ["1", "0", "0", "1"]
    with pytest.raises(SplitLBIError, match="--support-from"):
        plot_selected_filters(sgd, "conv3", [4], tmp_path / "x.png", steps=1)


def test_filters_plot_missing_epoch_lists_available(tmp_path):
    lbi = write_run(tmp_path / "lbi", num_filters=120, checkpoint_epochs_=(0, 2, 4))
    with pytest.raises(SplitLBIError, match=r"epoch 3; available epochs: 0, 2, 4"):
        plot_filter_visualizations(lbi, "conv3", [3], tmp_path / "f.png", steps=1)


def test_filters_plot_unknown_layer(tmp_path):
    lbi = write_run(tmp_path / "lbi", num_filters=120, checkpoint_epochs_=(2,))
    with pytest.raises(SplitLBIError, match="no layer 'conv9'"):
        plot_filter_visualizations(lbi, "conv9", [2], tmp_path / "f.png", steps=1)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitlbi")
    plots_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_plot_path_and_filters(tmp_path, one_thread, capsys):
    lbi = write_run(tmp_path / "lbi", num_filters=120, checkpoint_epochs_=(0, 4))
    sgd = write_run(tmp_path / "sgd", optimizer="sgd", num_filters=120)
    args = make_parser().parse_args(
        ["plot", "path", str(lbi), str(sgd), "--layer", "conv3", "--out", str(tmp_path / "p.png"), "--pdf"]
    )
    assert args.func(args) == 0
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p.pdf").is_file()

    args = make_parser().parse_args(
        ["plot", "filters", str(lbi), "--layer", "conv3", "--epochs", "0", "4",
         "--out", str(tmp_path / "f.png"), "--steps", "2", "--filters", "4"]
    )
    assert args.func(args) == 0
    assert (tmp_path / "f.png").is_file()
    assert "wrote" in capsys.readouterr().out

    args = make_parser().parse_args(
        ["plot", "filters", str(lbi), "--layer", "conv3", "--epochs", "4", "--per-group", "2",
         "--out", str(tmp_path / "s.png"), "--steps", "2"]
    )
    assert args.func(args) == 0
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s.csv").is_file()
    with pytest.raises(SystemExit):  # one or the other
        make_parser().parse_args(["plot", "filters", str(lbi), "--layer", "conv3", "--epochs", "4", "--per-group",
                                  "2", "--filters", "3", "--out", "x.png"])


def test_cli_plot_requires_a_subcommand():
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["plot"])
    assert exc.value.code == 2
