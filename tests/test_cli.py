"""Tests of the ``splitlbi`` command line: ``train``, resume, one-line errors, subcommand hooks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from splitlbi.cli import main as cli_main
from splitlbi.train import TrainConfig, load_checkpoint, read_run_config, read_train_config
from helpers import assert_one_line_error

QUICK = ["--dataset", "digits", "--limit-train", "128", "--limit-test", "64", "--batch-size", "64", "--no-progress"]


def run_cli(args: List[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SPLITLBI_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "splitlbi", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=environment, timeout=120)


# --- errors in a real process ------------------------------------------------------------


def test_negative_kappa(tmp_path: Path) -> None:
    assert_one_line_error(run_cli(["train", "--kappa", "-1", "--out", "run", *QUICK], tmp_path), "--kappa")
    assert not (tmp_path / "run").exists()


def test_unknown_model(tmp_path: Path) -> None:
    assert_one_line_error(run_cli(["train", "--model", "resnet9000", *QUICK], tmp_path), "unknown model")


def test_missing_data_dir_offline(tmp_path: Path) -> None:
    result = run_cli(["train", "--dataset", "mnist", "--data-dir", "/nonexistent", "--out", "run"], tmp_path)
    assert_one_line_error(result, "mnist")
    assert not (tmp_path / "run").exists()


def test_corrupt_data_file(shared_data_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "data" / "mnist" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(shared_data_dir / "mnist" / "raw" / name, raw / name)
    images = raw / "t10k-images-idx3-ubyte.gz"
    data = bytearray(images.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damage the middle of the stream
    images.write_bytes(bytes(data))
    result = run_cli(["train", "--dataset", "mnist", "--train-split", "8000", "--data-dir", "data",
                      "--out", "run"], tmp_path)
    assert_one_line_error(result)


def test_existing_run_without_resume_and_argparse_errors(tmp_path: Path) -> None:
    # One process makes a run; the refusals are checked in-process below to save start-ups.
    result = run_cli(["train", "--epochs", "1", "--out", "run", *QUICK], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stdout
    assert_one_line_error(run_cli(["train", "--out", "run", *QUICK], tmp_path), "--resume run")
    assert_one_line_error(run_cli(["train", "--epochs", "many"], tmp_path), "--epochs")


# --- in-process ---------------------------------------------------------------------------


def main_in_process(args: List[str], capsys: pytest.CaptureFixture) -> tuple:
    try:
        status = cli_main.main(args)
    except SystemExit as exit_:  # argparse exits by itself
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("args, fragment", [
    (["train", "--lr", "0"], "--lr"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--optimizer", "lion"], "--optimizer"),
    (["train", "--resume", "nowhere"], "no such directory"),
    (["train", "--out", "a", "--resume", "b"], "not allowed with"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_errors_are_one_line(args: List[str], fragment: str, capsys: pytest.CaptureFixture,
                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status, _, err = main_in_process([*args, *QUICK] if args[:1] == ["train"] else args, capsys)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("splitlbi: error: ") and fragment in err


def test_train_then_resume_with_more_epochs(capsys: pytest.CaptureFixture, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "--epochs", "1", "--out", "run", "--optimizer", "sgd", "--lr", "0.05",
            "--lr-milestones", "2,3", "--seed", "3", *QUICK]
    status, out, _ = main_in_process(args, capsys)
    assert status == 0 and "done: run" in out
    config = read_train_config("run")
    assert config == TrainConfig(optimizer="sgd", lr=0.05, lr_milestones=(2, 3), seed=3, epochs=1,
                                 dataset="digits", limit_train=128, limit_test=64, batch_size=64, progress=False)

    # Repeating an unchanged setting is fine; changing one is not.
    status, out, _ = main_in_process(["train", "--resume", "run", "--epochs", "2", "--seed", "3"], capsys)
    assert status == 0 and "resuming run from epoch 1/2" in out
    assert load_checkpoint("run")["epoch"] == 2 and read_run_config("run")["epochs"] == 2
    status, _, err = main_in_process(["train", "--resume", "run", "--epochs", "3", "--lr", "1"], capsys)
    assert status == 2 and "--lr" in err


def test_optional_subcommands_are_registered_when_present(capsys: pytest.CaptureFixture) -> None:
    parser = cli_main.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert "train" in choices
    for module_name, command in (("splitlbi.cli.figures", "plot"), ("splitlbi.cli.demo", "demo")):
        try:
            __import__(module_name)
        except ModuleNotFoundError:
            continue
        assert command in choices
    assert cli_main._load_optional("splitlbi.no_such_module.cli") is None
    assert capsys.readouterr().err == ""  # an absent optional module is silent


def test_python_dash_m_help() -> None:
    result = subprocess.run([sys.executable, "-m", "splitlbi", "train", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--resume RUN_DIR" in result.stdout and "--limit-train N" in result.stdout
