"""Tests of ``splitlbi compare`` (Table 1 runs and tables) and a smoke run of benchmarks/bench_train.py."""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from splitlbi.cli.main import main
from splitlbi.experiments.compare import (
    RUN_COLUMNS,
    TABLE_COLUMNS,
    VARIANT_NAMES,
    compare,
    run_dir_for,
    variant_config,
)
from splitlbi.models import create_model, is_model
from splitlbi.train import TrainConfig, build_optimizer, run_training
from helpers import read_rows

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["splitlbi-mom", "sgd-mom"]
SEEDS = [0, 1]
# LeNet-5 on 256 of the bundled digits: 4 batches per epoch, no files needed.
SMALL = ["--model", "lenet5", "--dataset", "digits", "--batch-size", "64", "--limit-train", "256",
         "--limit-test", "128", "--lr", "0.05", "--device", "cpu", "--no-progress"]
SMALL_SETTINGS = dict(model="lenet5", dataset="digits", batch_size=64, limit_train=256, limit_test=128, lr=0.05,
                      device="cpu", progress=False)


def close(text: str, value: float) -> bool:
    return float(text) == pytest.approx(value, rel=1e-5, abs=1e-9)


def test_compare_writes_tables_that_match_the_runs_and_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "table1"
    argv = ["compare", *SMALL, "--optimizers", *VARIANTS, "--seeds", *map(str, SEEDS), "--epochs", "1",
            "--layer", "conv3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("] ") >= 4 and "[1/4] splitlbi-mom seed 0: trained" in printed
    assert "| optimizer |" in printed  # the markdown table is printed at the end

    table = read_rows(out / "table.csv")
    assert list(table[0].keys()) == list(TABLE_COLUMNS)
    assert [row["optimizer"] for row in table] == VARIANTS
    for row in table:
        metrics = [read_rows(run_dir_for(out, row["optimizer"], seed) / "metrics.csv") for seed in SEEDS]
        assert all(len(rows) == 1 for rows in metrics)
        final = [float(rows[-1]["test_acc"]) for rows in metrics]
        best = [max(float(r["test_acc"]) for r in rows) for rows in metrics]
        assert row["seeds"] == "2" and close(row["lr"], 0.05)
        assert close(row["final_test_acc_mean"], statistics.fmean(final))
        assert close(row["final_test_acc_std"], statistics.stdev(final))
        assert close(row["best_test_acc_mean"], statistics.fmean(best))
        assert close(row["best_test_acc_std"], statistics.stdev(best))
        if row["optimizer"].startswith("splitlbi"):
            shares = [float(rows[-1]["gamma_nonzero_share"]) for rows in metrics]
            assert close(row["final_gamma_nonzero_share_mean"], statistics.fmean(shares))
            assert close(row["final_gamma_nonzero_share_std"], statistics.stdev(shares))
            sparse = [float(rows[-1]["sparse_test_acc"]) for rows in metrics]
            assert close(row["final_sparse_test_acc_mean"], statistics.fmean(sparse))
            # Filters of conv3 in the support of Γ at the last epoch, counted from each run's path.csv.
            selected = [sum(r["in_support"] == "1" for r in read_rows(run_dir_for(out, row["optimizer"], seed)
                                                                       / "path.csv")
                            if r["layer"] == "conv3" and r["epoch"] == "1") for seed in SEEDS]
            assert close(row["filters_selected_mean"], statistics.fmean(selected))
            assert row["filters_layer"] == "conv3" and row["filters_total"] == "120"
        else:
            for column in ("final_gamma_nonzero_share_mean", "final_sparse_test_acc_mean", "filters_selected_mean",
                           "filters_layer", "filters_total"):
                assert row[column] == ""
    markdown = (out / "table.md").read_text()
    for name in VARIANTS:
        assert f"| {name} | 0.05 | 2 |" in markdown
    assert "conv3 filters selected |" in markdown
    lines = [line for line in markdown.splitlines() if line.startswith("| splitlbi-mom")]
    assert f"{float(table[0]['final_test_acc_mean']):.2f} ± {float(table[0]['final_test_acc_std']):.2f}" in lines[0]
    assert lines[0].endswith(f"{float(table[0]['filters_selected_mean']):.1f} ± "
                             f"{float(table[0]['filters_selected_std']):.1f} / 120 |")
    # runs.csv: the per-seed numbers behind each mean.
    per_run = read_rows(out / "runs.csv")
    assert list(per_run[0].keys()) == list(RUN_COLUMNS)
    assert [(r["optimizer"], r["seed"]) for r in per_run] == [(n, str(s)) for n in VARIANTS for s in SEEDS]
    assert statistics.fmean(float(r["final_test_acc"]) for r in per_run[:2]) == pytest.approx(
        float(table[0]["final_test_acc_mean"]), rel=1e-5)
    assert per_run[0]["run_dir"] == "splitlbi-mom/seed0" and per_run[2]["filters_selected"] == ""

    # Re-running skips every finished run: nothing is rewritten.
    watched = [run_dir_for(out, name, seed) / part for name in VARIANTS for seed in SEEDS
               for part in ("metrics.csv", "checkpoints/last.pt")]
    before = {path: path.stat().st_mtime_ns for path in watched}
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == 4
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    assert read_rows(out / "table.csv") == table

    # Other settings into the same folder: one line, exit 2, before anything is trained.
    changed = [arg if arg != "0.05" else "0.01" for arg in argv]
    assert main(changed) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("splitlbi: error: ") and "other settings" in error
    assert {path: path.stat().st_mtime_ns for path in watched} == before


def test_compare_resumes_an_interrupted_run(tmp_path):
    out = tmp_path / "table1"
    base = TrainConfig(**SMALL_SETTINGS, epochs=2, save_every=2)
    config = variant_config(base, "sgd-mom", 0)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_training(config, run_dir_for(out, "sgd-mom", 0), log=None, on_epoch_end=stop_after_first)
    lines: List[str] = []
    rows = compare(out, ["sgd-mom"], [0], log=lines.append, epochs=2, **SMALL_SETTINGS)
    assert any("sgd-mom seed 0: resumed" in line for line in lines)
    metrics = read_rows(run_dir_for(out, "sgd-mom", 0) / "metrics.csv")
    assert [row["epoch"] for row in metrics] == ["1", "2"]
    assert rows[0]["seeds"] == 1 and rows[0]["final_test_acc_std"] is None
    assert rows[0]["final_test_acc_mean"] == pytest.approx(float(metrics[-1]["test_acc"]))
    csv_row = read_rows(out / "table.csv")[0]
    assert csv_row["final_test_acc_std"] == "" and csv_row["seeds"] == "1"


def test_baselines_do_not_depend_on_the_splitlbi_settings(tmp_path):
    base = TrainConfig(**SMALL_SETTINGS, epochs=1, nu=50.0, lam=2.0, kappa=3.0)
    defaults = TrainConfig()
    sgd = variant_config(base, "sgd-mom", 0)
    assert (sgd.kappa, sgd.nu, sgd.lam, sgd.penalty) == (defaults.kappa, defaults.nu, defaults.lam, defaults.penalty)
    assert variant_config(base, "splitlbi-mom", 0).nu == 50.0
    # A baseline run stored with other κ, ν (as compare made them before) is still the finished run: skipped.
    old = dataclasses.replace(sgd, nu=50.0, lam=2.0, kappa=3.0)
    run_training(old, run_dir_for(tmp_path, "sgd-mom", 0), log=None)
    lines: List[str] = []
    rows = compare(tmp_path, ["sgd-mom"], [0], log=lines.append, epochs=1, nu=9.0, **SMALL_SETTINGS)
    assert any("sgd-mom seed 0: finished before, skipped" in line for line in lines) and rows[0]["seeds"] == 1


def test_unknown_variant_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", "--optimizers", "sgd-mom", "adamax", "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("splitlbi: error: unknown optimizer variant 'adamax'")
    assert not (tmp_path / "x").exists()


def test_variant_settings():
    base = TrainConfig(lr=0.2)
    assert {name for name in VARIANT_NAMES} == {
        "splitlbi-naive", "splitlbi-mom", "splitlbi-mom-wd", "sgd-naive", "sgd-mom", "sgd-mom-wd", "sgd-nesterov",
        "adam", "adamw", "adagrad", "rmsprop", "radam", "amsgrad"}
    naive = variant_config(base, "splitlbi-naive", 3)
    assert (naive.optimizer, naive.momentum, naive.weight_decay, naive.lr, naive.seed) == ("splitlbi", 0.0, 0.0, 0.2, 3)
    wd = variant_config(base, "sgd-mom-wd", 0, weight_decay=5e-4)
    assert (wd.optimizer, wd.momentum, wd.weight_decay) == ("sgd", 0.9, 5e-4)
    assert variant_config(base, "splitlbi-mom-wd", 0).weight_decay == 1e-4
    assert variant_config(base, "sgd-nesterov", 0).nesterov
    assert variant_config(base, "adam", 0).lr == 1e-3
    assert variant_config(base, "adagrad", 0).lr == 1e-2
    assert variant_config(base, "rmsprop", 0).lr == 1e-3
    rmsprop = build_optimizer(variant_config(base, "rmsprop", 0), create_model("lenet5"))
    assert isinstance(rmsprop, torch.optim.RMSprop) and rmsprop.defaults["momentum"] == 0
    assert variant_config(base, "radam", 0, adaptive_lr=3e-4).lr == 3e-4
    amsgrad = build_optimizer(variant_config(base, "amsgrad", 0), create_model("lenet5"))
    assert isinstance(amsgrad, torch.optim.Adam) and amsgrad.defaults["amsgrad"] is True


def test_bench_train_smoke(shared_data_dir):
    if not is_model("resnet20"):
        pytest.skip("resnet20 is not registered (CIFAR models not present)")
    command = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--subset", "256", "--models", "resnet20",
               "--epochs", "1", "--device", "cpu", "--threads", "1", "--data-dir", str(shared_data_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| cpu")]
    assert [row.split(" | ")[2] for row in rows] == ["SGD, on-device", "SplitLBI, on-device", "SGD, textbook"]
    assert "SplitLBI/SGD epoch time" in result.stdout and "textbook/on-device" in result.stdout
