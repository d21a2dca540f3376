"""scripts/lenet_results.sh at smoke scale: Table 1's LeNet-5 column and Figure 1 on MNIST's official split.

The script behind docs/results.md's MNIST numbers runs here end to end on the first 512 training and 256 test
images of the official 60,000 / 10,000 split, 2 epochs, one seed and three of the thirteen variants (the
environment variables the script documents), so its official-split path cannot rot unnoticed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_rows

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lenet_results.sh"
VARIANTS = ["splitlbi-mom-wd", "sgd-mom-wd", "adam"]


def _official_split(data_dir: Path) -> Path:
    raw = data_dir / "mnist" / "raw"
    if not (raw / "train-images-idx3-ubyte.gz").is_file():
        reason = f"MNIST's training files are not in {raw}"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return data_dir


def _run_script(data_dir: Path, runs: Path, figures: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "FIGURES": str(figures), "EPOCHS": "2", "MILESTONE": "1",
           "SAVE_EVERY": "1", "SEEDS": "0", "VARIANTS": " ".join(VARIANTS), "FIG_EPOCHS": "1 2", "AM_STEPS": "3",
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = ["bash", str(SCRIPT), str(data_dir), str(runs), "--limit-train", "512", "--limit-test", "256"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_lenet_results_script_runs_on_the_official_split(shared_data_dir: Path, tmp_path: Path) -> None:
    data_dir = _official_split(shared_data_dir)
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    result = _run_script(data_dir, runs, figures)
    assert result.returncode == 0, result.stderr[-3000:]

    # The runs train on the official training set (no --train-split), all from the same initialization.
    lbi, sgd = runs / "splitlbi-mom-wd" / "seed0", runs / "sgd-mom-wd" / "seed0"
    for run in (lbi, sgd, runs / "adam" / "seed0"):
        config = json.loads((run / "config.json").read_text())
        assert config["train_split"] is None and "official split" in config["dataset_description"]
        assert (config["train_size"], config["test_size"], config["epochs"]) == (512, 256, 2)
    assert torch.equal(torch.load(lbi / "init.pt")["conv3.weight"], torch.load(sgd / "init.pt")["conv3.weight"])

    # Table 1: one row per variant, the SplitLBI row with its sparse model and c5 filters; per-seed rows too.
    table = read_rows(figures / "lenet5_mnist_table1.csv")
    assert [row["optimizer"] for row in table] == VARIANTS
    assert table[0]["filters_layer"] == "conv3" and table[0]["filters_total"] == "120"
    assert float(table[0]["final_sparse_test_acc_mean"]) >= 0 and table[1]["final_sparse_test_acc_mean"] == ""
    assert "conv3 filters selected" in (figures / "lenet5_mnist_table1.md").read_text()
    per_seed = read_rows(figures / "lenet5_mnist_table1_runs.csv")
    assert [(row["optimizer"], row["seed"]) for row in per_seed] == [(name, "0") for name in VARIANTS]

    # Figure 1: the paths over the whole run and the filter images of both runs, each with its CSV.
    for name in ("fig1_paths_mnist.png", "fig1_filters_mnist_splitlbi.png", "fig1_filters_mnist_sgd.png"):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("fig1_filters_mnist_splitlbi.csv", "fig1_filters_mnist_sgd.csv"):
        rows = read_rows(figures / name)
        assert sorted({row["epoch"] for row in rows}) == ["1", "2"] and len(rows) == 2 * 120

    # Re-running trains nothing.
    again = _run_script(data_dir, runs, figures)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished before, skipped") == len(VARIANTS)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_lenet_results_script_runs_all_thirteen_variants_by_default(tmp_path: Path) -> None:
    # PYTHON=echo prints the `splitlbi compare` call instead of running it (the script then stops at the
    # missing table): the default variant list, written over two lines, must reach compare whole.
    env = {**os.environ, "PYTHON": "echo", "FIGURES": str(tmp_path / "figures")}
    env.pop("VARIANTS", None)
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "data"), str(tmp_path / "runs")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    call = result.stdout.split("--optimizers", 1)[1].split("--", 1)[0].split()
    assert call == ["splitlbi-naive", "splitlbi-mom", "splitlbi-mom-wd", "sgd-naive", "sgd-mom", "sgd-mom-wd",
                    "sgd-nesterov", "adam", "adamw", "adagrad", "rmsprop", "radam", "amsgrad"]
