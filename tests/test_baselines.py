"""Tests of splitlbi.prune.baselines and ``splitlbi baseline``: Network Slimming, Soft Filter
Pruning, Scratch-E and Scratch-B on tiny runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.prune import MASK_FILE, read_mask_file
from splitlbi.prune.baselines import scratch, scratch_b_epochs, slimming, soft_filter_pruning
from splitlbi.prune.compact import compact_model, count_macs_params
from splitlbi.train import TrainConfig, list_checkpoints, load_checkpoint
from helpers import assert_one_line_error, read_rows

# ResNet-20 (has BatchNorm) on 32x32-padded digits; LeNet-5 (no BatchNorm) for sfp / scratch.
RESNET = TrainConfig(model="resnet20", dataset="digits", pad_to=32, optimizer="sgd", epochs=1, batch_size=64,
                     limit_train=128, limit_test=64, lr=0.1, progress=False)
LENET = TrainConfig(dataset="digits", optimizer="sgd", epochs=2, batch_size=64, limit_train=256, limit_test=128,
                    lr=0.05, progress=False)
KEEP = 0.5


def cli(*arguments: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitlbi", *map(str, arguments)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_mask_holds(state: dict, masks: dict) -> None:
    for name, mask in masks.items():
        assert torch.all(state[name][~mask] == 0), name


def bn_scales_mean(run_dir: Path) -> float:
    state = load_checkpoint(run_dir)["model"]
    model = create_model("resnet20", num_classes=10, in_channels=1)
    names = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return float(torch.cat([state[name].abs().flatten() for name in names]).mean())


@pytest.fixture(scope="module")
def sfp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return soft_filter_pruning(LENET, tmp_path_factory.mktemp("baselines") / "sfp", keep=KEEP, log=None)


# --- network slimming -----------------------------------------------------------------


def test_slimming_penalizes_bn_scales_and_keeps_the_mask(tmp_path: Path) -> None:
    plain = slimming(RESNET, tmp_path / "plain", keep=KEEP, sparsity_lambda=0.0, log=None)
    out = slimming(RESNET, tmp_path / "slim", keep=KEEP, sparsity_lambda=0.05, log=None)
    # The L1 penalty shrinks the BN scales (same seed, same data, same init).
    assert torch.equal(torch.load(tmp_path / "plain_sparse" / "init.pt", weights_only=True)["conv1.weight"],
                       torch.load(tmp_path / "slim_sparse" / "init.pt", weights_only=True)["conv1.weight"])
    assert bn_scales_mean(tmp_path / "slim_sparse") < bn_scales_mean(tmp_path / "plain_sparse") - 1e-3
    # The mask keeps exactly the requested share of BN channels (filters of the convs feeding them).
    masks = read_mask_file(out / MASK_FILE)["masks"]
    model = create_model("resnet20", num_classes=10, in_channels=1)
    convs = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    kept = sum(int(masks[name].flatten(1).all(1).sum()) for name in convs)
    total = sum(masks[name].shape[0] for name in convs)
    assert total == 688 and kept == round(KEEP * total)
    # Among the channels of one BN, kept ones have larger |γ| (the global threshold).
    sparse_state = load_checkpoint(tmp_path / "slim_sparse")["model"]
    gamma, kept_filters = sparse_state["bn1.weight"].abs(), masks["conv1.weight"].flatten(1).all(1)
    if kept_filters.any() and (~kept_filters).any():
        assert gamma[kept_filters].min() >= gamma[~kept_filters].max()
    # BN affine of a dropped channel is masked too; fine-tuning keeps every masked weight exactly zero.
    assert torch.equal(masks["bn1.weight"], kept_filters)
    final = load_checkpoint(out)["model"]
    assert load_checkpoint(out)["epoch"] == 1
    assert_mask_holds(final, masks)
    assert not torch.equal(final["conv1.weight"], sparse_state["conv1.weight"] * masks["conv1.weight"])
    info = json.loads((out / "config.json").read_text())
    assert info["baseline"]["name"] == "slimming" and info["retrain"]["mode"] == "finetune"
    assert plain.exists()


# --- soft filter pruning --------------------------------------------------------------


def test_sfp_zeroes_the_requested_share_of_filters(sfp_run: Path) -> None:
    state = load_checkpoint(sfp_run)["model"]
    masks = read_mask_file(sfp_run / MASK_FILE)["masks"]
    assert set(masks) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    for name, mask in masks.items():
        filters = state[name].shape[0]
        norms = state[name].flatten(1).norm(dim=1)
        zero = norms == 0
        assert int(zero.sum()) == filters - round(KEEP * filters), name
        assert torch.equal(zero, ~mask.flatten(1).all(1)), name  # the saved mask is the zeroed set
    rows = read_rows(sfp_run / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    # Soft pruning: the weights (zeroed ones included) keep training between the zeroings.
    assert not torch.equal(load_checkpoint(sfp_run, 1)["model"]["conv3.weight"], state["conv3.weight"])


def test_sfp_on_a_batchnorm_net_zeroes_the_bn_channel_of_each_dropped_filter(tmp_path: Path) -> None:
    """The dropped channels output exactly zero (BN γ and β zeroed too), as in the pruned network."""
    run = soft_filter_pruning(RESNET, tmp_path / "sfp", keep=KEEP, log=None)
    state = load_checkpoint(run)["model"]
    masks = read_mask_file(run / MASK_FILE)["masks"]
    dropped = ~masks["layer1.0.conv1.weight"].flatten(1).all(1)
    assert int(dropped.sum()) == 8
    assert torch.all(state["layer1.0.bn1.weight"][dropped] == 0)
    assert torch.all(state["layer1.0.bn1.bias"][dropped] == 0)
    assert torch.all(state["layer1.0.bn1.weight"][~dropped] != 0)


# --- scratch --------------------------------------------------------------------------


def test_scratch_e_trains_the_masked_net_from_a_fresh_init(sfp_run: Path, tmp_path: Path) -> None:
    out = scratch(LENET, tmp_path / "e", masks=sfp_run / MASK_FILE, budget="E", log=None)
    masks = read_mask_file(sfp_run / MASK_FILE)["masks"]
    init = torch.load(out / "init.pt", weights_only=True)
    source_init = torch.load(sfp_run / "init.pt", weights_only=True)
    assert_mask_holds(init, masks)
    for name, mask in masks.items():
        assert not torch.equal(init[name], source_init[name] * mask), name
    final = load_checkpoint(out)["model"]
    assert_mask_holds(final, masks)
    assert list(list_checkpoints(out)) == [1, 2]
    # LeNet's convs have biases: a dropped filter's bias is masked too.
    assert torch.all(final["conv3.bias"][~masks["conv3.weight"].flatten(1).all(1)] == 0)


def test_scratch_b_epochs_follow_the_macs_ratio(sfp_run: Path, tmp_path: Path) -> None:
    masks = read_mask_file(sfp_run / MASK_FILE)["masks"]
    model = create_model("lenet5", num_classes=10, in_channels=1)
    example = torch.zeros(1, 1, 28, 28)
    dense, _ = count_macs_params(model, example)
    compact, _ = compact_model(model, masks, example, measure=False)
    pruned, _ = count_macs_params(compact, example)
    assert pruned < dense
    expected = round(LENET.epochs * dense / pruned)
    assert scratch_b_epochs(model, masks, LENET.epochs, example) == (expected, dense, pruned)
    out = scratch(LENET, tmp_path / "b", masks=sfp_run / MASK_FILE, budget="B", log=None)
    info = json.loads((out / "config.json").read_text())
    assert info["baseline"]["epochs"] == expected and info["epochs"] == expected
    assert len(read_rows(out / "metrics.csv")) == expected
    assert_mask_holds(load_checkpoint(out)["model"], masks)


# --- errors and command line ------------------------------------------------------------


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match="BatchNorm"):
        slimming(LENET, tmp_path / "s", keep=KEEP, log=None)
    with pytest.raises(SplitLBIError, match="--masks"):
        scratch(LENET, tmp_path / "e", masks=None, log=None)
    with pytest.raises(SplitLBIError, match="--keep"):
        soft_filter_pruning(LENET, tmp_path / "f", keep=1.5, log=None)
    assert not any(tmp_path.iterdir())


def test_cli(sfp_run: Path, tmp_path: Path) -> None:
    tiny = ("--limit-train", 64, "--limit-test", 64, "--epochs", 1, "--batch-size", 64, "--device", "cpu")
    assert_one_line_error(cli("baseline", "slimming", "--out", "s", *tiny, cwd=tmp_path), "BatchNorm")
    assert_one_line_error(cli("baseline", "scratch-b", "--out", "b", *tiny, cwd=tmp_path), "--masks")
    result = cli("baseline", "scratch-e", "--masks", sfp_run / MASK_FILE, "--out", "e", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(list_checkpoints(tmp_path / "e")) == [1]
    assert not (tmp_path / "s").exists() and not (tmp_path / "b").exists()
