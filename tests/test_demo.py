"""``splitlbi demo``: the real demo end to end in a subprocess, plus its output-folder rules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from splitlbi.cli.main import main as cli_main
from splitlbi.errors import SplitLBIError
from splitlbi.experiments.demo import (
    DEMO_EPOCHS,
    demo_configs,
    format_summary,
    prepare_out_dir,
    run_demo,
    visualized_epochs,
)
from splitlbi.train import read_train_config


def _run_cli(args, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SPLITLBI_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "splitlbi", *args], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """The real demo (default settings) run once through the command line."""
    cwd = tmp_path_factory.mktemp("demo")
    result = _run_cli(["demo", "--out", "out", "--no-progress"], cwd, timeout=170)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return {"out": cwd / "out", "stdout": result.stdout, "stderr": result.stderr}


def _summary_numbers(text: str) -> Dict[str, float]:
    patterns = {
        "sgd": r"SGD dense test accuracy:\s+([\d.]+)%",
        "dense": r"SplitLBI dense test accuracy:\s+([\d.]+)%",
        "sparse": r"SplitLBI sparse test accuracy:\s+([\d.]+)%",
        "selected": r"conv3 filters selected:\s+(\d+) of 120",
        "nonzeros": r"non-zeros of Gamma:\s+([\d.]+)% of the coupled weights",
        "seconds": r"wall time:\s+([\d.]+) s",
    }
    numbers = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, text)
        assert match, f"summary lacks {key!r}:\n{text}"
        numbers[key] = float(match.group(1))
    return numbers


def _assert_real_image(path: Path, min_height: int, min_width: int) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 10_000, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_height and image.shape[1] >= min_width, image.shape
    pixels = image[..., :3].reshape(-1, 3)
    assert not np.all(pixels == pixels[0]), f"{path} is a blank image"
    # Lines/tiles in both support colours: blue (selected) and red (not selected) pixels.
    red, blue = pixels[:, 0], pixels[:, 2]
    assert np.count_nonzero(blue - red > 0.3) > 200, f"{path}: no blue"
    assert np.count_nonzero(red - blue > 0.3) > 200, f"{path}: no red"


# --------------------------------------------------------------------------- the real demo


def test_demo_summary_is_meaningful(demo: Dict[str, object]) -> None:
    out = demo["out"]
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert demo["stdout"] == text  # --no-progress prints the summary and nothing else
    numbers = _summary_numbers(text)
    assert numbers["dense"] > 90 and numbers["sgd"] > 90, numbers
    assert numbers["sparse"] > numbers["dense"] - 5, numbers  # the sparse model works without fine-tuning
    assert 10 <= numbers["selected"] <= 100, numbers  # a real choice among the 120 filters
    assert 0 < numbers["nonzeros"] < 100, numbers
    assert 0 < numbers["seconds"] < 150, numbers


def test_demo_figures(demo: Dict[str, object]) -> None:
    _assert_real_image(demo["out"] / "filter_paths.png", 300, 800)  # two panels side by side
    _assert_real_image(demo["out"] / "conv3_filters.png", 300, 800)  # three epochs side by side


def test_demo_runs_are_normal_run_directories_with_one_init(demo: Dict[str, object]) -> None:
    out = demo["out"]
    lbi, sgd = read_train_config(out / "splitlbi"), read_train_config(out / "sgd")
    assert (lbi.optimizer, sgd.optimizer) == ("splitlbi", "sgd")
    assert (lbi.model, lbi.dataset, lbi.epochs) == ("lenet5", "digits", DEMO_EPOCHS)
    init_lbi = torch.load(out / "splitlbi" / "init.pt", weights_only=True)
    init_sgd = torch.load(out / "sgd" / "init.pt", weights_only=True)
    assert init_lbi.keys() == init_sgd.keys()
    assert all(torch.equal(init_lbi[key], init_sgd[key]) for key in init_lbi)
    for run in ("splitlbi", "sgd"):
        rows = (out / run / "metrics.csv").read_text().strip().splitlines()
        assert len(rows) == DEMO_EPOCHS + 1
        assert (out / run / "checkpoints" / "last.pt").is_file()


# --------------------------------------------------------------------------- settings and output folder


def test_demo_configs_differ_only_in_the_optimizer() -> None:
    configs = demo_configs(24, progress=False)
    assert set(configs) == {"splitlbi", "sgd"}
    lbi, sgd = configs["splitlbi"].to_dict(), configs["sgd"].to_dict()
    assert {key for key in lbi if lbi[key] != sgd[key]} == {"optimizer"}
    assert lbi["lr_milestones"] == [17] and lbi["device"] == "cpu"
    assert visualized_epochs(configs["splitlbi"]) == [4, 12, 24]
    assert visualized_epochs(demo_configs(1)["splitlbi"]) == [1]
    assert visualized_epochs(demo_configs(5)["splitlbi"]) == [1, 2, 5]
    with pytest.raises(SplitLBIError):
        demo_configs(0)


def test_refuses_a_folder_with_other_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert cli_main(["demo", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("splitlbi: error: ") and "notes.txt" in error[0]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    # A folder named like a demo run that is no run directory is not the demo's either.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sgd").mkdir()
    (tmp_path / "other" / "sgd" / "data.bin").write_bytes(b"x")
    with pytest.raises(SplitLBIError, match="sgd"):
        prepare_out_dir(tmp_path / "other")
    assert (tmp_path / "other" / "sgd" / "data.bin").exists()


def test_bad_epochs_is_a_one_line_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_rerun_replaces_its_own_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_demo(out, epochs=1, progress=False)
    assert set(p.name for p in out.iterdir()) == {"splitlbi", "sgd", "filter_paths.png", "conv3_filters.png",
                                                   "summary.txt"}
    (out / "summary.txt").unlink()  # as if the first demo had been cut short
    second = run_demo(out, epochs=2, progress=False)
    assert read_train_config(out / "splitlbi").epochs == 2
    assert (out / "summary.txt").read_text(encoding="utf-8") == format_summary(second)
    for key in ("sgd_test_acc", "splitlbi_test_acc", "splitlbi_sparse_test_acc", "gamma_nonzero_share", "wall_seconds"):
        assert isinstance(second[key], float)
    assert second["conv3_filters"] == 120 and 0 <= second["conv3_selected"] <= 120
    assert first["epochs"] == 1 and second["epochs"] == 2
