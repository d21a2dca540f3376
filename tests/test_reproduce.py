"""``splitlbi reproduce``: every figure and the table at the smoke scale, resuming, recipes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, read_rows
from splitlbi.errors import SplitLBIError
from splitlbi.experiments.recipes import FIGURES, load_recipe, parse_override, scales_of
from splitlbi.experiments.reproduce import reproduce, sweep_settings
from splitlbi.experiments.workspace import JOB_FILE, Workspace, config_settings
from splitlbi.train.config import TrainConfig


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> dict:
    """One smoke-scale reproduction of every figure and the table (a few minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("reproduce")
    lines: list = []
    files = reproduce(["all"], "smoke", out, data_dir=str(shared_data_dir), device="cpu", progress=False,
                      log=lines.append)
    return {"out": out, "files": files, "lines": lines, "data": shared_data_dir}


def _runs(out: Path) -> dict:
    return {path.name: json.loads((path / JOB_FILE).read_text()) for path in (out / "runs").iterdir()
            if (path / JOB_FILE).is_file()}


def test_every_figure_and_the_table_is_drawn(smoke: dict) -> None:
    figures = smoke["out"] / "figures"
    for name in FIGURES:
        if name == "table1":
            assert (figures / "table1.md").read_text().count("|") > 10
            assert len(read_rows(figures / "table1.csv")) == 3
            continue
        for suffix in (".png", ".pdf", ".csv"):
            path = figures / f"{name}{suffix}"
            assert path.is_file() and path.stat().st_size > 100, path
        assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (figures / "fig1_filters.png").is_file()
    assert (figures / "fig2.npz").is_file()
    assert smoke["lines"][-1].startswith("done in")


def test_fig1_and_table1_train_on_mnists_official_split(smoke: dict) -> None:
    """The LeNet-5 recipes read MNIST's 60,000 training images (the smoke scale takes the first 1,024 of them and
    256 of the 10,000 test images), not the test set split in two; Figure 1 has both runs' filter images."""
    out = smoke["out"]
    configs = [json.loads((run / "config.json").read_text()) for run in (out / "runs").iterdir()
               if (run / "config.json").is_file()]
    fig1 = [config for config in configs if config["dataset"] == "mnist"]
    table1 = [json.loads((run / "config.json").read_text()) for run in sorted((out / "table1").glob("*/seed0"))]
    assert sorted(config["optimizer"] for config in fig1) == ["sgd", "splitlbi"] and len(table1) == 3
    for config in fig1 + table1:
        assert config["train_split"] is None and config["dataset_description"].startswith("MNIST official split")
        assert (config["train_size"], config["test_size"]) == (1024, 256)
    for name in ("fig1_filters.csv", "fig1_filters_sgd.csv"):
        rows = read_rows(out / "figures" / name)
        assert rows and len(rows) % 120 == 0 and {row["filter"] for row in rows} == {str(f) for f in range(120)}


def test_fig4_csv_holds_the_mean_over_seeds_of_the_runs(smoke: dict) -> None:
    """The plotted numbers are exactly the runs' metrics: the mean and std over seeds, per setting."""
    out = smoke["out"]
    recipe = load_recipe("fig4", "smoke")
    rows = read_rows(out / "figures" / "fig4.csv")
    base = recipe.train_config()
    kappa, nu = sweep_settings(recipe)["kappa"][0]
    series = f"κ={kappa:g} (ν={nu:g})"
    plotted = [r for r in rows if r["series"] == series and r["panel"].startswith("non-zeros")]
    assert len(plotted) == base.epochs
    runs = [path for path, job in _runs(out).items() if job["spec"].get("config", {}).get("kappa") == kappa
            and job["spec"]["config"].get("nu") == nu and job["spec"]["config"]["optimizer"] == "splitlbi"
            and job["spec"]["config"]["model"] == base.model and job["spec"]["config"]["penalty"] == "auto"]
    assert len(runs) == len(recipe.seeds)
    per_seed = [[float(r["gamma_nonzero_share"]) * 100 for r in read_rows(out / "runs" / run / "metrics.csv")] for run in runs]
    for epoch, row in enumerate(plotted):
        values = [curve[epoch] for curve in per_seed]
        assert float(row["y"]) == pytest.approx(statistics.fmean(values), rel=1e-5, abs=1e-6)
        assert float(row["y_std"]) == pytest.approx(statistics.stdev(values), rel=1e-4, abs=1e-6)
        assert int(row["n"]) == len(recipe.seeds)


def test_sweep_settings_share_the_initialization_within_a_seed(smoke: dict) -> None:
    out = smoke["out"]
    inits: dict = {}
    for name, job in _runs(out).items():
        config = job["spec"].get("config")
        if job["spec"]["kind"] != "train" or config["model"] != "resnet20" or config["optimizer"] != "splitlbi":
            continue
        inits.setdefault(config["seed"], []).append(torch.load(out / "runs" / name / "init.pt"))
    assert set(inits) == {0, 1}
    for states in inits.values():
        assert len(states) >= 3
        for state in states[1:]:
            assert all(torch.equal(state[key], states[0][key]) for key in state)
    assert not torch.equal(inits[0][0]["conv1.weight"], inits[1][0]["conv1.weight"])


def test_fig5_table_compares_the_methods_at_the_same_sparsity(smoke: dict) -> None:
    rows = read_rows(smoke["out"] / "figures" / "fig5_table.csv")
    group = {r["method"]: r for r in rows if r["penalty"] == "group"}
    assert {"splitlbi_lottery", "sgd_lottery", "network_slimming", "soft_filter_pruning", "scratch_e", "scratch_b",
            "sgd_dense", "splitlbi_dense"} <= set(group)
    # SGD (Lottery) and Scratch-E/B use SplitLBI's per-layer counts: the same filters and parameters kept.
    for method in ("sgd_lottery", "scratch_e", "scratch_b"):
        assert group[method]["filters_kept"] == group["splitlbi_lottery"]["filters_kept"]
        assert group[method]["params"] == group["splitlbi_lottery"]["params"]
    assert float(group["sgd_dense"]["params_share"]) == 1.0
    assert float(group["splitlbi_lottery"]["params_share"]) < 1.0
    weights = {r["method"]: r for r in rows if r["penalty"] == "l1"}
    assert weights["sgd_lottery"]["weights_kept"] == weights["splitlbi_lottery"]["weights_kept"]
    assert (smoke["out"] / "figures" / "fig5_table.md").read_text().count("\n") == len(rows) + 2


def _without_seconds(path: Path) -> list:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in read_rows(path)]


def test_a_second_reproduce_skips_finished_runs_and_an_interrupted_one_resumes(smoke: dict) -> None:
    out = smoke["out"]
    figure = (out / "figures" / "fig7.csv").read_text()
    runs = _runs(out)
    train_run = next(name for name, job in runs.items() if job["spec"]["kind"] == "train"
                     and job["spec"]["config"]["optimizer"] == "splitlbi" and job["spec"]["config"]["seed"] == 0
                     and job["spec"]["config"]["penalty"] == "auto" and job["spec"]["config"]["model"] == "resnet20"
                     and job["spec"]["config"]["kappa"] == 1.0 and job["spec"]["config"]["nu"] == 1.0)
    finetune = next(name for name, job in runs.items() if job["spec"].get("mode") == "finetune")
    # A killed training run: no job.json, last.pt at epoch 1 (the later epochs' files still there).
    run_dir = out / "runs" / train_run
    metrics_before = _without_seconds(run_dir / "metrics.csv")
    (run_dir / JOB_FILE).unlink()
    shutil.copyfile(run_dir / "checkpoints" / "epoch_0001.pt", run_dir / "checkpoints" / "last.pt")
    # A killed retraining: no job.json (it cannot resume and is redone).
    (out / "runs" / finetune / JOB_FILE).unlink()
    lines: list = []
    reproduce(["fig7"], "smoke", out, data_dir=str(smoke["data"]), device="cpu", progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "resnet20-splitlbi-k1-nu1-seed0: resuming" in text
    assert "redone (was interrupted)" in text
    assert text.count(": trained in") == 0  # nothing else ran again
    assert _without_seconds(run_dir / "metrics.csv") == metrics_before  # bitwise the same run on CPU
    assert (out / "figures" / "fig7.csv").read_text() == figure
    assert "runs 1 redone (was interrupted), 1 resumed, " in lines[-1]


def test_workspace_names_runs_by_their_settings(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, data_dir="/somewhere", progress=False, log=None)
    a = TrainConfig(model="resnet20", optimizer="sgd", nu=5.0)
    b = TrainConfig(model="resnet20", optimizer="sgd", nu=50.0, data_dir="/elsewhere", progress=False)
    spec = lambda config: {"kind": "train", "config": config_settings(ws.config(config))}  # noqa: E731
    assert ws.run_dir("x", spec(a)) == ws.run_dir("x", spec(b))  # ν means nothing to SGD; data folder neither
    c = TrainConfig(model="resnet20", optimizer="splitlbi", nu=5.0)
    d = TrainConfig(model="resnet20", optimizer="splitlbi", nu=50.0)
    assert ws.run_dir("x", spec(c)) != ws.run_dir("x", spec(d))


def test_recipes_exist_for_every_figure_with_three_scales() -> None:
    for name in FIGURES:
        assert scales_of(name) == ["smoke", "cpu", "paper"], name
        for scale in ("smoke", "cpu", "paper"):
            recipe = load_recipe(name, scale)
            config = recipe.train_config()
            assert config.epochs >= 1
            if scale == "paper" and name not in ("fig1", "table1"):
                assert config.dataset == "cifar10"
            if scale == "cpu" and name not in ("fig1",):
                assert (config.dataset, config.pad_to) == ("fashion-mnist", 32) or name == "table1"


def test_recipe_overrides_and_errors(tmp_path: Path) -> None:
    assert parse_override("sweep.kappa=[1, 2]") == ("sweep", "kappa", [1, 2])
    assert parse_override("train.model=vgg16_bn") == ("train", "model", "vgg16_bn")
    assert load_recipe("fig4", "paper", overrides=["train.model=vgg16_bn"]).train_config().model == "vgg16_bn"
    with pytest.raises(SplitLBIError, match="SECTION.KEY=VALUE"):
        parse_override("epochs=3")
    with pytest.raises(SplitLBIError, match="no scale 'huge'"):
        load_recipe("fig4", "huge")
    with pytest.raises(SplitLBIError, match="unknown training setting"):
        load_recipe("fig4", "smoke", overrides=["train.epoch=3"]).train_config()
    with pytest.raises(SplitLBIError, match="epochs"):
        load_recipe("fig4", "smoke", overrides=["train.epochs=0"]).train_config()
    bad = tmp_path / "bad.toml"
    bad.write_text("[smoke\n")
    with pytest.raises(SplitLBIError, match="not valid TOML"):
        load_recipe("fig4", "smoke", path=bad)
    with pytest.raises(SplitLBIError, match="unknown figure"):
        reproduce(["fig9"], "smoke", tmp_path / "out", log=None)
    with pytest.raises(SplitLBIError, match="sweep"):
        sweep_settings(load_recipe("fig4", "smoke", overrides=["sweep.kappa=[]"]))


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "SPLITLBI_OFFLINE": "1"}
    for arguments, fragment in ((["fig9"], "unknown figure"), (["fig4", "--scale", "huge"], "no scale 'huge'"),
                                (["fig4", "--set", "nonsense"], "SECTION.KEY=VALUE")):
        result = subprocess.run([sys.executable, "-m", "splitlbi", "reproduce", *arguments, "--out",
                                 str(tmp_path / "out")], capture_output=True, text=True, env=env)
        assert_one_line_error(result, fragment)


def test_reuse_copies_a_finished_run_with_the_same_settings(tmp_path: Path, shared_data_dir: Path) -> None:
    from splitlbi.train.run import run_training

    recipe = load_recipe("fig1", "smoke")
    config = recipe.train_config(optimizer="sgd", data_dir=str(shared_data_dir), progress=False)
    elsewhere = run_training(config, tmp_path / "my-sgd-run", log=None)
    other = run_training(dataclasses.replace(config, lr=0.01), tmp_path / "other-lr", log=None)
    lines: list = []
    reproduce(["fig1"], "smoke", tmp_path / "out", data_dir=str(shared_data_dir), device="cpu", progress=False,
              reuse=[elsewhere, other], log=lines.append)
    text = "\n".join(lines)
    assert f"lenet5-sgd-seed0: copying the matching run {elsewhere}" in text
    assert "other-lr" not in text
    assert "1 reused, 1 trained" in lines[-1]
    copied = next((tmp_path / "out" / "runs").glob("lenet5-sgd-seed0-*"))
    assert (copied / "metrics.csv").read_text() == (elsewhere / "metrics.csv").read_text()
    with pytest.raises(SplitLBIError, match="not a run directory"):
        reproduce(["fig1"], "smoke", tmp_path / "out", reuse=[tmp_path], log=None)


def test_a_job_another_process_is_running_is_waited_for(tmp_path: Path) -> None:
    import fcntl
    import threading
    import time

    lines: list = []
    ws = Workspace(tmp_path, progress=False, log=lines.append)
    config = TrainConfig(model="lenet5", dataset="digits", epochs=1, optimizer="sgd", device="cpu")
    run_dir = ws.run_dir("run", {"kind": "train", "config": config_settings(ws.config(config))})
    run_dir.parent.mkdir(parents=True)
    with open(run_dir.with_name(run_dir.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # what a second reproduce on the same --out holds
        worker = threading.Thread(target=ws.train, args=(config, "run"))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not run_dir.exists()
        assert any(line.startswith("waiting for another process") for line in lines)
    worker.join(timeout=120)  # released: the job runs
    assert (run_dir / JOB_FILE).is_file()
