"""Tests of splitlbi.train: the epoch loop, run directories, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.train import (
    METRICS_COLUMNS,
    PATH_COLUMNS,
    TrainConfig,
    epoch_generator,
    evaluate,
    list_checkpoints,
    load_checkpoint,
    load_masks,
    load_model_from_run,
    read_run_config,
    read_train_config,
    run_training,
    train_one_epoch,
)
from splitlbi.train import run as run_module
from splitlbi.utils.io import atomic_torch_save, atomic_write_text
from helpers import read_rows

LENET_FILTERS = {"conv1": 6, "conv2": 16, "conv3": 120, "fc1": 84, "fc2": 10}

# Small and fast: 4 batches per epoch on the embedded digits set.
SMALL = TrainConfig(dataset="digits", epochs=3, batch_size=64, limit_train=256, limit_test=128,
                    lr=0.05, lr_milestones=(2,), save_every=2, progress=False)


def header(path: Path) -> List[str]:
    return path.read_text().split("\n", 1)[0].split(",")


def assert_same_tensors(first: Dict[str, torch.Tensor], second: Dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def assert_same_state(run_a: Path, run_b: Path) -> None:
    a, b = load_checkpoint(run_a), load_checkpoint(run_b)
    assert a["epoch"] == b["epoch"]
    assert_same_tensors(a["model"], b["model"])
    for index, state in a["optimizer"]["state"].items():
        assert_same_tensors(state, b["optimizer"]["state"][index])
    assert a["scheduler"] == b["scheduler"]


def without_seconds(path: Path) -> List[Dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in read_rows(path)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMALL trained for 3 epochs in one go: the reference for every resume test."""
    return run_training(SMALL, tmp_path_factory.mktemp("straight") / "run", log=None)


# --- the loop --------------------------------------------------------------------------


def test_epoch_generator_depends_only_on_seed_and_epoch() -> None:
    first = torch.randperm(100, generator=epoch_generator(0, 3))
    assert torch.equal(first, torch.randperm(100, generator=epoch_generator(0, 3)))
    assert not torch.equal(first, torch.randperm(100, generator=epoch_generator(0, 4)))
    assert not torch.equal(first, torch.randperm(100, generator=epoch_generator(1, 3)))


def test_train_one_epoch_and_evaluate_average_over_samples() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5")
    images = torch.randint(0, 256, (70, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (70,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the loss is that of a fixed model
    mean, std = (0.5,), (0.25,)
    trained = train_one_epoch(model, optimizer, images, labels, batch_size=32, mean=mean, std=std,
                              generator=epoch_generator(0, 1), progress=False)
    evaluated = evaluate(model, images, labels, batch_size=7, mean=mean, std=std)
    # Uneven batches (32, 32, 6) weighted by size give the full-data mean; no dropout/BN in LeNet.
    assert trained.loss == pytest.approx(evaluated.loss, rel=1e-5)
    assert trained.accuracy == pytest.approx(evaluated.accuracy)
    assert 0.0 <= evaluated.accuracy <= 100.0


# --- run directory -----------------------------------------------------------------------


def test_mnist_run_writes_all_files(shared_data_dir: Path, tmp_path: Path) -> None:
    # linear_penalty auto: the linear layers carry Γ too, so path.csv has rows for every layer.
    config = TrainConfig(dataset="mnist", data_dir=str(shared_data_dir), train_split=8000, epochs=2,
                         limit_train=512, limit_test=256, progress=False, linear_penalty="auto")
    run_dir = run_training(config, tmp_path / "run", log=None)

    info = read_run_config(run_dir)
    assert info["model"] == "lenet5" and info["dataset"] == "mnist" and info["optimizer"] == "splitlbi"
    assert (info["num_classes"], info["in_channels"], info["image_size"]) == (10, 1, 28)
    assert len(info["mean"]) == len(info["std"]) == 1
    assert (info["train_size"], info["test_size"], info["train_split"]) == (512, 256, 8000)
    assert {"splitlbi", "torch", "python"} <= info["versions"].keys()
    assert read_train_config(run_dir) == config

    assert header(run_dir / "metrics.csv") == list(METRICS_COLUMNS)
    metrics = read_rows(run_dir / "metrics.csv")
    assert [int(row["epoch"]) for row in metrics] == [1, 2]
    for row in metrics:
        # sparse_recal_test_acc stays empty without --recalibrate-bn
        assert all(row[column] != "" for column in METRICS_COLUMNS if column != "sparse_recal_test_acc")
        assert row["sparse_recal_test_acc"] == ""
        assert 0 < float(row["sparse_macs_share"]) <= 1
        assert 0 <= float(row["test_acc"]) <= 100 and 0 <= float(row["sparse_test_acc"]) <= 100
        assert 0 <= float(row["gamma_nonzero_share"]) <= 1

    assert header(run_dir / "path.csv") == list(PATH_COLUMNS)
    path_rows = read_rows(run_dir / "path.csv")
    assert len(path_rows) == 3 * sum(LENET_FILTERS.values())  # epochs 0, 1, 2
    for epoch in range(3):
        for layer, filters in LENET_FILTERS.items():
            rows = [r for r in path_rows if r["epoch"] == str(epoch) and r["layer"] == layer]
            assert [int(r["filter"]) for r in rows] == list(range(filters))
            assert all(r["in_support"] in ("0", "1") and r["gamma_norm"] != "" for r in rows)
    initial = [r for r in path_rows if r["epoch"] == "0"]
    assert all(r["in_support"] == "0" and float(r["gamma_norm"]) == 0 for r in initial)  # Γ starts at 0

    init_model = load_model_from_run(run_dir, "init")
    conv1_norms = init_model.conv1.weight.detach().flatten(1).norm(dim=1)
    logged = torch.tensor([float(r["w_norm"]) for r in initial if r["layer"] == "conv1"])
    assert torch.allclose(conv1_norms, logged, rtol=1e-5)

    assert sorted(list_checkpoints(run_dir)) == [1, 2]
    assert load_checkpoint(run_dir)["epoch"] == 2
    masks = load_masks(run_dir, 2)
    assert set(masks) == {f"{layer}.weight" for layer in LENET_FILTERS}
    assert masks["conv3.weight"].dtype == torch.bool and masks["conv3.weight"].shape == (120, 16, 5, 5)
    assert (run_dir / "masks" / "epoch_0001.pt").is_file()
    final = load_model_from_run(run_dir)
    assert not torch.equal(final.conv1.weight, init_model.conv1.weight)


def test_sgd_baseline_leaves_gamma_columns_empty(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, optimizer="sgd", epochs=1)
    run_dir = run_training(config, tmp_path / "sgd", log=None)
    metrics = read_rows(run_dir / "metrics.csv")
    assert header(run_dir / "metrics.csv") == list(METRICS_COLUMNS)
    assert len(metrics) == 1
    assert metrics[0]["sparse_test_acc"] == "" and metrics[0]["gamma_nonzero_share"] == ""
    assert metrics[0]["test_acc"] != ""
    path_rows = read_rows(run_dir / "path.csv")
    assert header(run_dir / "path.csv") == list(PATH_COLUMNS)
    assert len(path_rows) == 2 * sum(LENET_FILTERS.values())
    assert {r["layer"] for r in path_rows} == set(LENET_FILTERS)
    assert all(r["gamma_norm"] == "" and r["in_support"] == "" and r["w_norm"] != "" for r in path_rows)
    assert not (run_dir / "masks").exists()
    assert (run_dir / "init.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()


def test_linear_penalty_none_leaves_the_linear_layers_uncoupled(tmp_path: Path) -> None:
    run_dir = run_training(dataclasses.replace(SMALL, epochs=1, linear_penalty="none"), tmp_path / "run", log=None)
    masks = load_masks(run_dir, 1)
    assert set(masks) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    layers = {row["layer"] for row in read_rows(run_dir / "path.csv")}
    assert layers == {"conv1", "conv2", "conv3"}
    assert read_run_config(run_dir)["linear_penalty"] == "none"


def test_a_chosen_penalty_couples_the_weights_only() -> None:
    """--penalty l1 (weight sparsity) couples conv and linear weights; biases and BN stay uncoupled."""
    from splitlbi.train.optimizers import build_optimizer

    model = create_model("resnet20", num_classes=10, in_channels=1)
    optimizer = build_optimizer(dataclasses.replace(SMALL, model="resnet20", penalty="l1", linear_penalty="auto"),
                                model)
    coupled = {c.name for c in optimizer.named_coupled()}
    assert coupled == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert [g["penalty"] for g in optimizer.param_groups] == ["l1", "l1", "none"]
    # auto + a linear penalty keeps the two groups that runs written before had (their checkpoints resume).
    optimizer = build_optimizer(dataclasses.replace(SMALL, model="resnet20", linear_penalty="none"), model)
    assert [g["penalty"] for g in optimizer.param_groups] == ["auto", "none"]


def test_save_every_thins_epoch_checkpoints_but_keeps_the_last(straight_run: Path) -> None:
    assert sorted(list_checkpoints(straight_run)) == [2, 3]  # save_every=2, 3 epochs
    assert load_checkpoint(straight_run)["epoch"] == 3
    assert sorted(p.name for p in (straight_run / "masks").iterdir()) == [
        "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert [row["lr"] for row in read_rows(straight_run / "metrics.csv")] == ["0.05", "0.05", "0.005"]


# --- resume ------------------------------------------------------------------------------


def test_resume_equals_uninterrupted_run(straight_run: Path, tmp_path: Path) -> None:
    run_dir = run_training(dataclasses.replace(SMALL, epochs=2), tmp_path / "run", log=None)
    run_training(dataclasses.replace(SMALL, epochs=3), run_dir, resume=True, log=None)
    assert_same_state(straight_run, run_dir)
    assert without_seconds(run_dir / "metrics.csv") == without_seconds(straight_run / "metrics.csv")
    assert (run_dir / "path.csv").read_text() == (straight_run / "path.csv").read_text()
    assert read_run_config(run_dir)["epochs"] == 3
    assert [entry["from_epoch"] for entry in read_run_config(run_dir)["resumed"]] == [2]


def test_killed_process_resumes_to_the_same_weights(straight_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    # A separate process trains and dies hard right after epoch 2's checkpoint.
    script = textwrap.dedent(f"""
        import os, dataclasses
        from splitlbi.train import TrainConfig, run_training
        config = TrainConfig(**{dataclasses.asdict(SMALL)!r})
        def die(epoch, metrics):
            if epoch == 2:
                os._exit(17)
        run_training(config, {str(run_dir)!r}, log=None, on_epoch_end=die)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 17, result.stderr
    assert load_checkpoint(run_dir)["epoch"] == 2

    # Also as if it had died later, halfway through epoch 3's files: rows and a mask of
    # epoch 3 exist, one row is cut short, but no epoch-3 checkpoint.
    with (run_dir / "metrics.csv").open("a") as handle:
        handle.write("3,0.005,2.1,20.0,2.0,20.0,10.0,0,1.0\n3,0.00")
    with (run_dir / "path.csv").open("a") as handle:
        handle.write("3,conv1,0,0.5,0,0\n3,conv1,1,0.")
    atomic_torch_save({}, run_dir / "masks" / "epoch_0003.pt")

    result = subprocess.run([sys.executable, "-m", "splitlbi", "train", "--resume", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_same_state(straight_run, run_dir)
    assert without_seconds(run_dir / "metrics.csv") == without_seconds(straight_run / "metrics.csv")
    assert (run_dir / "path.csv").read_text() == (straight_run / "path.csv").read_text()
    assert_same_tensors(load_masks(run_dir, 3), load_masks(straight_run, 3))


def test_run_killed_in_its_first_epoch_resumes_from_epoch_zero(
        straight_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_training(SMALL, tmp_path / "run", log=None)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 0
    run_training(None, tmp_path / "run", resume=True, log=None)
    assert_same_state(straight_run, tmp_path / "run")


def test_resume_of_a_finished_run_does_nothing(straight_run: Path) -> None:
    before = (straight_run / "metrics.csv").read_text()
    run_training(None, straight_run, resume=True, log=None)
    assert (straight_run / "metrics.csv").read_text() == before


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(kappa=-1.0), "--kappa"),
    (dict(lr=0.0), "--lr"),
    (dict(epochs=0), "--epochs"),
    (dict(momentum=1.5), "--momentum"),
    (dict(lr_milestones=(5, 2)), "--lr-milestones"),
    (dict(model="nosuchnet"), "unknown model"),
    (dict(dataset="nosuchdata"), "unknown dataset"),
    (dict(optimizer="nosuchopt"), "unknown optimizer"),
    (dict(device="gpu"), "--device"),
    (dict(nesterov=True, momentum=0.0), "nesterov"),
    (dict(penalty="ridge"), "penalty"),
])
def test_invalid_settings_raise_before_writing(change: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match=message):
        run_training(dataclasses.replace(SMALL, **change), tmp_path / "run", log=None)
    assert not (tmp_path / "run" / "config.json").exists()


def test_existing_run_needs_resume(straight_run: Path) -> None:
    with pytest.raises(SplitLBIError, match="--resume"):
        run_training(SMALL, straight_run, log=None)


def test_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SplitLBIError, match="not empty"):
        run_training(SMALL, tmp_path, log=None)


def test_resume_needs_a_run_and_restarts_one_without_checkpoint(straight_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match="no such directory"):
        run_training(None, tmp_path / "missing", resume=True, log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SplitLBIError, match="config.json"):
        run_training(None, tmp_path / "empty", resume=True, log=None)
    # Killed after config.json, before its first checkpoint: --resume starts it again (issue 11).
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((straight_run / "config.json").read_text())
    run_training(None, tmp_path / "half", resume=True, log=None)
    assert_same_state(straight_run, tmp_path / "half")


def test_resume_refuses_changed_settings(straight_run: Path) -> None:
    with pytest.raises(SplitLBIError, match="--lr"):
        run_training(dataclasses.replace(SMALL, lr=0.2, epochs=4), straight_run, resume=True, log=None)
    with pytest.raises(SplitLBIError, match="below"):
        run_training(dataclasses.replace(SMALL, epochs=1), straight_run, resume=True, log=None)


# --- atomic files ------------------------------------------------------------------------


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot save")

    checkpoint = tmp_path / "state.pt"
    atomic_torch_save({"x": torch.ones(2)}, checkpoint)
    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Unpicklable()}, checkpoint)
    assert torch.equal(torch.load(checkpoint)["x"], torch.ones(2))  # the old file survives
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file.txt", "state.pt", "sub"]
