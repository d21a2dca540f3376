"""Tests of splitlbi.prune and ``splitlbi masks`` / ``splitlbi retrain``: masks of Γ's
support, magnitude masks (SGD Lottery), prune / finetune / lottery retraining."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.prune import (
    MASK_FILE,
    apply_masks_,
    is_filter_structured,
    load_mask_file,
    load_run_masks,
    magnitude_masks_like,
    mask_sparsity,
    read_mask_file,
    retrain,
    save_mask_file,
)
from splitlbi.train import (
    TrainConfig,
    build_optimizer,
    evaluate,
    list_checkpoints,
    load_checkpoint,
    load_model_from_run,
    read_train_config,
    run_training,
)
from splitlbi.train import run as run_module
from helpers import assert_one_line_error, read_rows

# Tiny SplitLBI run whose support at epoch 3 keeps all conv filters and a few linear weights
# (fc1 ~4%, fc2 ~20%); checkpoints of epochs 2 and 3 are kept, not epoch 1.
LBI = TrainConfig(dataset="digits", epochs=3, batch_size=64, limit_train=256, limit_test=128, lr=0.1, kappa=1.0,
                  nu=10.0, lam=0.01, save_every=2, progress=False, linear_penalty="auto")  # fc layers carry Γ too
SGD = dataclasses.replace(LBI, optimizer="sgd", lr=0.05, epochs=2)
RETRAIN = dict(epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-3, log=None)


@pytest.fixture(scope="module")
def lbi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_training(LBI, tmp_path_factory.mktemp("prune") / "lbi", log=None)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_training(SGD, tmp_path_factory.mktemp("prune") / "sgd", log=None)


def cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitlbi", *map(str, arguments)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def lenet() -> torch.nn.Module:
    return create_model("lenet5", num_classes=10, in_channels=1)


def assert_mask_holds(state: dict, masks: dict) -> None:
    for name, mask in masks.items():
        assert torch.all(state[name][~mask] == 0), name


# --- masks ----------------------------------------------------------------------------


def test_run_masks_are_a_nontrivial_support(lbi_run: Path) -> None:
    masks = load_run_masks(lbi_run, 3)
    sparsity = mask_sparsity(masks)
    assert 0.0 < sparsity.overall < 1.0
    assert 0.0 < sparsity.layers["fc1.weight"] < 1.0
    assert sparsity.filters_total["conv3.weight"] == 120
    assert is_filter_structured(masks["conv3.weight"])


def test_mask_file_roundtrip_and_apply(lbi_run: Path, tmp_path: Path) -> None:
    masks = load_run_masks(lbi_run, 3)
    path = save_mask_file(tmp_path / "m.pt", masks, model="lenet5", epoch=3, source=lbi_run)
    content = read_mask_file(path)
    assert content["model"] == "lenet5" and content["epoch"] == 3
    assert content["shapes"]["fc1.weight"] == [84, 120]
    model = load_model_from_run(lbi_run, 3)
    loaded = load_mask_file(path, model)
    apply_masks_(model, loaded)
    assert_mask_holds(dict(model.named_parameters()), masks)


def test_wrong_model_masks_name_the_parameter(tmp_path: Path) -> None:
    other = create_model("resnet20", num_classes=10, in_channels=1)
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in other.named_parameters() if p.dim() > 1}
    path = save_mask_file(tmp_path / "other.pt", masks, model="resnet20")
    first = next(iter(masks))
    with pytest.raises(SplitLBIError, match=first):
        load_mask_file(path, lenet())
    # Same names, another shape.
    reshaped = {"fc1.weight": torch.ones(84, 100, dtype=torch.bool)}
    save_mask_file(tmp_path / "shape.pt", reshaped, model="lenet5")
    with pytest.raises(SplitLBIError, match="fc1.weight"):
        load_mask_file(tmp_path / "shape.pt", lenet())


def test_magnitude_masks_keep_the_same_count_per_layer() -> None:
    torch.manual_seed(0)
    state = {name: p.detach() for name, p in lenet().named_parameters()}
    reference = {
        "conv2.weight": torch.zeros(16, 6, 5, 5, dtype=torch.bool),
        "fc1.weight": torch.rand(84, 120) < 0.1,
    }
    reference["conv2.weight"][[1, 4, 9]] = True
    masks = magnitude_masks_like(state, reference)
    conv = masks["conv2.weight"]
    assert is_filter_structured(conv) and int(conv.flatten(1).all(1).sum()) == 3
    norms = state["conv2.weight"].flatten(1).norm(dim=1)
    assert set(conv.flatten(1).all(1).nonzero().flatten().tolist()) == set(norms.topk(3).indices.tolist())
    assert int(masks["fc1.weight"].sum()) == int(reference["fc1.weight"].sum())
    kept = state["fc1.weight"].abs()[masks["fc1.weight"]]
    dropped = state["fc1.weight"].abs()[~masks["fc1.weight"]]
    assert kept.min() >= dropped.max()


def test_magnitude_masks_mirror_a_run_mask(lbi_run: Path, sgd_run: Path) -> None:
    reference = load_run_masks(lbi_run, 3)
    masks = magnitude_masks_like(load_checkpoint(sgd_run)["model"], reference)
    assert masks.keys() == reference.keys()
    for name, mask in masks.items():
        assert int(mask.sum()) == int(reference[name].sum()), name
        if name.startswith("conv"):
            assert is_filter_structured(mask)


# --- retraining -----------------------------------------------------------------------


def test_prune_equals_sparse_model_of_the_checkpoint(lbi_run: Path, tmp_path: Path) -> None:
    out = retrain(lbi_run, tmp_path / "prune", mode="prune", epoch=3, log=None)
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "0"
    # The reference: SplitLBI's own sparse_model() at the checkpoint of epoch 3.
    config = read_train_config(lbi_run)
    model = load_model_from_run(lbi_run, 3)
    optimizer = build_optimizer(config, model)
    optimizer.load_state_dict(load_checkpoint(lbi_run, 3)["optimizer"])
    data = run_module._load_data(config, torch.device("cpu"))
    with optimizer.sparse_model():
        expected = evaluate(model, data.test_images, data.test_labels, mean=data.mean, std=data.std)
    pruned = load_model_from_run(out, "last")
    got = evaluate(pruned, data.test_images, data.test_labels, mean=data.mean, std=data.std)
    assert abs(got.accuracy - expected.accuracy) <= 1e-6
    assert abs(got.loss - expected.loss) <= 1e-6
    assert abs(float(rows[0]["test_acc"]) - expected.accuracy) <= 1e-4


@pytest.mark.parametrize("mode", ["finetune", "lottery"])
def test_retraining_keeps_the_mask(lbi_run: Path, tmp_path: Path, mode: str) -> None:
    out = retrain(lbi_run, tmp_path / mode, mode=mode, epoch=3, **RETRAIN)
    masks = load_run_masks(lbi_run, 3)
    start = torch.load(out / "init.pt", weights_only=True)
    expected_start = load_checkpoint(lbi_run, 3)["model"] if mode == "finetune" else \
        torch.load(lbi_run / "init.pt", weights_only=True)
    final = load_checkpoint(out)["model"]
    assert load_checkpoint(out)["epoch"] == 2
    assert_mask_holds(start, masks)
    assert_mask_holds(final, masks)
    for name, mask in masks.items():
        assert torch.equal(start[name], expected_start[name] * mask), name
        assert not torch.equal(final[name][mask], start[name][mask]), f"{name} did not train"
    assert [row["epoch"] for row in read_rows(out / "metrics.csv")] == ["1", "2"]
    assert read_mask_file(out / MASK_FILE)["masks"].keys() == masks.keys()
    with pytest.raises(SplitLBIError, match="written by 'splitlbi retrain'"):
        run_training(None, out, resume=True)  # a plain resume would train without the mask


def test_retrain_errors(lbi_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match="kept epochs: 2, 3"):
        retrain(lbi_run, tmp_path / "a", mode="finetune", epoch=1, log=None)
    with pytest.raises(SplitLBIError, match="epochs with masks: 1, 2, 3"):
        retrain(lbi_run, tmp_path / "b", mode="lottery", epoch=9, log=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- command line ---------------------------------------------------------------------


def test_cli_masks_like_and_lottery(lbi_run: Path, sgd_run: Path, tmp_path: Path) -> None:
    result = cli("masks", lbi_run, "--epoch", 3, "--out", "lbi.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "conv3.weight" in result.stdout and "120/120" in result.stdout and "overall" in result.stdout
    result = cli("masks", sgd_run, "--like", "lbi.pt", "--out", "sgd.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    reference, magnitude = read_mask_file(tmp_path / "lbi.pt"), read_mask_file(tmp_path / "sgd.pt")
    assert reference["epoch"] == 3 and magnitude["kind"] == "magnitude"
    for name, mask in reference["masks"].items():
        assert int(magnitude["masks"][name].sum()) == int(mask.sum())
    result = cli("retrain", sgd_run, "--mode", "lottery", "--masks", "sgd.pt", "--epochs", 1, "--lr", 0.05,
                 "--out", "lot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_mask_holds(load_checkpoint(tmp_path / "lot")["model"], magnitude["masks"])
    assert list(list_checkpoints(tmp_path / "lot")) == [1]


def test_cli_one_line_errors(lbi_run: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli("masks", lbi_run, "--epoch", 7, cwd=tmp_path), "epoch 7", "1, 2, 3")
    assert_one_line_error(cli("retrain", lbi_run, "--epoch", 1, "--mode", "prune", "--out", "x", cwd=tmp_path),
                          "2, 3")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    assert_one_line_error(cli("retrain", lbi_run, "--epoch", 3, "--mode", "finetune", "--masks", "corrupt.pt",
                              "--out", "y", cwd=tmp_path), "corrupt.pt")
    other = create_model("resnet20", num_classes=10, in_channels=1)
    save_mask_file(tmp_path / "other.pt", {n: torch.ones_like(p, dtype=torch.bool)
                                           for n, p in other.named_parameters() if p.dim() > 1}, model="resnet20")
    assert_one_line_error(cli("retrain", lbi_run, "--epoch", 3, "--mode", "finetune", "--masks", "other.pt",
                              "--out", "z", cwd=tmp_path), "conv1.weight")
    # A corrupt masks/epoch file of the run itself.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "init.pt"):
        (damaged / name).write_bytes((lbi_run / name).read_bytes())
    (damaged / "masks").mkdir()
    (damaged / "masks" / "epoch_0002.pt").write_bytes(b"\x00garbage")
    assert_one_line_error(cli("masks", damaged, "--epoch", 2, cwd=tmp_path), "epoch_0002.pt")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
