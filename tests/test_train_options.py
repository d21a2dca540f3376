"""Tests of the training options --schedule, --amp, --channels-last, --compile and --sync-bn."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import List

import pytest
import torch

from splitlbi.cli.main import build_parser, main
from splitlbi.cli.train import config_from_arguments
from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.train import TrainConfig, build_optimizer, build_scheduler, load_checkpoint, run_training
from splitlbi.train import run as run_module
from splitlbi.train.config import PAPER_SCHEDULE, apply_schedule_preset, validate_config
from splitlbi.train.distributed import DistributedContext
from helpers import read_rows

TINY = TrainConfig(dataset="digits", epochs=1, batch_size=32, limit_train=256, limit_test=128, lr=0.05,
                   device="cpu", progress=False)


def parse(*arguments: str) -> TrainConfig:
    return config_from_arguments(build_parser().parse_args(["train", *arguments]))


# --- --schedule --------------------------------------------------------------------------


def test_cosine_schedule_anneals_per_epoch_and_fixes_its_length(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, schedule="cosine", epochs=4, lr=0.1, limit_train=64, limit_test=32)
    run_dir = run_training(config, tmp_path / "run", log=None)
    logged = [float(row["lr"]) for row in read_rows(run_dir / "metrics.csv")]
    expected = [0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)]
    assert logged == pytest.approx(expected, rel=1e-5)  # 0.1, 0.0854, 0.05, 0.0146
    assert load_checkpoint(run_dir)["scheduler"]["T_max"] == 4  # the scheduler state is checkpointed
    with pytest.raises(SplitLBIError, match="cosine"):
        run_training(dataclasses.replace(config, epochs=6), run_dir, resume=True, log=None)
    with pytest.raises(SplitLBIError, match="--lr-milestones"):
        validate_config(dataclasses.replace(config, lr_milestones=(2,)))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_paper_schedule_preset_and_its_milestones() -> None:
    config = parse("--schedule", "paper")
    assert (config.epochs, config.lr, config.lr_milestones, config.lr_gamma, config.batch_size) == \
        (160, 0.1, (80, 120), 0.1, 128)
    assert {key: getattr(config, key) for key in PAPER_SCHEDULE} == dict(PAPER_SCHEDULE)
    optimizer = build_optimizer(config, create_model("lenet5"))
    scheduler = build_scheduler(config, optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(scheduler.milestones) == {80: 1, 120: 1} and scheduler.gamma == 0.1
    lrs = []
    for _ in range(config.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    # Epoch e (1-based) trains with lrs[e - 1]: 0.1 up to 80, 0.01 up to 120, then 0.001.
    assert lrs[:80] == pytest.approx([0.1] * 80)
    assert lrs[80:120] == pytest.approx([0.01] * 40)
    assert lrs[120:] == pytest.approx([0.001] * 40)
    # Options given on the command line win over the preset; the rest still comes from it.
    config = parse("--schedule", "paper", "--epochs", "40", "--lr", "0.05", "--lr-milestones", "20", "30",
                   "--batch-size", "64")
    assert (config.epochs, config.lr, config.lr_milestones, config.batch_size) == (40, 0.05, (20, 30), 64)
    assert parse("--schedule", "paper", "--epochs", "40").lr_milestones == (80, 120)
    # Without --schedule paper nothing is preset; in Python the preset is explicit.
    assert parse().epochs == TrainConfig().epochs and parse("--schedule", "cosine").lr_milestones == ()
    assert apply_schedule_preset(TrainConfig(schedule="paper")).epochs == 160
    assert apply_schedule_preset(TrainConfig(epochs=7)).epochs == 7


# --- --channels-last, --amp, --compile, --sync-bn ------------------------------------------


def test_speed_flags_parse_into_the_config() -> None:
    config = parse("--channels-last", "--compile", "--amp", "--sync-bn")
    assert (config.channels_last, config.compile, config.amp, config.sync_bn) == (True, True, True, True)
    config = parse()
    assert (config.channels_last, config.compile, config.amp, config.sync_bn) == (False, False, False, False)


def test_channels_last_trains_like_the_default_layout(tmp_path: Path) -> None:
    plain = run_training(TINY, tmp_path / "plain", log=None)
    channels_last = run_training(dataclasses.replace(TINY, channels_last=True), tmp_path / "cl", log=None)
    for a, b in zip(read_rows(plain / "metrics.csv"), read_rows(channels_last / "metrics.csv")):
        for column in ("train_loss", "train_acc", "test_loss", "test_acc", "sparse_test_acc"):
            assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-4), column
    weights = load_checkpoint(channels_last)["model"]
    assert weights["conv2.weight"].is_contiguous(memory_format=torch.channels_last)
    for name, tensor in load_checkpoint(plain)["model"].items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5)
    # A layout choice only: it may change when resuming.
    run_training(dataclasses.replace(TINY, epochs=2), channels_last, resume=True, log=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_amp_on_the_cpu_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SplitLBIError, match="--amp needs CUDA"):
        run_training(dataclasses.replace(TINY, amp=True), tmp_path / "run", log=None)
    assert not (tmp_path / "run").exists()
    assert main(["train", "--amp", "--dataset", "digits", "--out", str(tmp_path / "cli")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("splitlbi: error: --amp needs CUDA")


def test_sync_bn_needs_cuda_under_torchrun_and_is_a_no_op_alone() -> None:
    two_cpus = DistributedContext(rank=0, world_size=2)
    with pytest.raises(SplitLBIError, match="--sync-bn needs CUDA"):
        run_module._check_speed_options(dataclasses.replace(TINY, sync_bn=True), two_cpus, torch.device("cpu"),
                                        print)
    notes: List[str] = []
    run_module._check_speed_options(dataclasses.replace(TINY, sync_bn=True), DistributedContext(),
                                    torch.device("cpu"), notes.append)
    assert notes and "no effect" in notes[0]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's machinery
def test_compile_keeps_plain_names_everywhere(tmp_path: Path) -> None:
    # ~10-20 s on a 2-core CPU, most of it compiling; sizes chosen so that no batch
    # shape repeats a compilation (128 = 2 x 64, one evaluation batch).
    config = dataclasses.replace(TINY, batch_size=64, limit_train=128, limit_test=64, eval_batch_size=64)
    plain = run_training(config, tmp_path / "plain", log=None)
    compiled = run_training(dataclasses.replace(config, compile=True), tmp_path / "compiled", log=None)
    checkpoint = load_checkpoint(compiled)
    assert list(checkpoint["model"]) == list(load_checkpoint(plain)["model"])
    assert not any("_orig_mod" in key for key in checkpoint["model"])
    assert set(torch.load(compiled / "init.pt", weights_only=True)) == set(checkpoint["model"])
    layers = [(row["epoch"], row["layer"], row["filter"]) for row in read_rows(compiled / "path.csv")]
    assert layers == [(row["epoch"], row["layer"], row["filter"]) for row in read_rows(plain / "path.csv")]
    for a, b in zip(read_rows(plain / "metrics.csv"), read_rows(compiled / "metrics.csv")):
        assert float(a["test_acc"]) == pytest.approx(float(b["test_acc"]), abs=1.0)
