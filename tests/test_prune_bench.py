"""``splitlbi reproduce prune-bench``: the pruning benchmark at a MACs budget (smoke scale), its recipes."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import read_rows
from splitlbi.errors import SplitLBIError
from splitlbi.experiments.prune_bench import CSV_COLUMNS, METHODS, bench_settings, model_config, schedule_after
from splitlbi.experiments.recipes import load_recipe, scales_of
from splitlbi.experiments.reproduce import reproduce
from splitlbi.train.config import TrainConfig


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> dict:
    """One smoke-scale benchmark (every method, tiny subsets; about a minute on 2 idle cores)."""
    out = tmp_path_factory.mktemp("prune-bench")
    lines: list = []
    files = reproduce(["prune-bench"], "smoke", out, data_dir=str(shared_data_dir), device="cpu", progress=False,
                      log=lines.append)
    return {"out": out, "files": files, "lines": lines, "data": shared_data_dir,
            "rows": read_rows(out / "figures" / "prune_bench.csv")}


def _number(text: str):
    return None if text == "" else float(text)


def test_every_method_runs_on_every_model_at_the_budget(bench: dict) -> None:
    rows = bench["rows"]
    assert list(rows[0]) == list(CSV_COLUMNS)
    recipe = load_recipe("prune-bench", "smoke")
    settings = bench_settings(recipe)
    for model in settings.models:
        mine = [r for r in rows if r["model"] == model]
        trained = {r["method"] for r in mine if r["test_acc"] != "" and r["default_variant"] == "1"}
        expected = set(METHODS) - ({"bn_scale"} if model == "lenet5" else set())  # LeNet-5 has no BatchNorm
        assert trained == expected | {"sgd_dense"}, model
        for row in mine:
            assert int(row["epochs_trained"]) == settings.train_epochs + settings.finetune_epochs
            if row["test_acc"] != "":
                assert 0.0 <= float(row["test_acc"]) <= 100.0
    for row in rows:
        if row["method"] == "sgd_dense":
            assert float(row["macs_share"]) == 1.0
            continue
        # Every mask comes from budget_masks, measured on the compacted network: at most the target, within
        # 2 points. SFP's keep ratio is chosen on the init; its last mask lands near the target, not under it.
        target, share = float(row["target_macs"]), float(row["macs_share"])
        if row["method"] == "sfp":
            assert abs(share - target) <= 0.03, row
        else:
            assert target - 0.02 <= share <= target + 1e-9, row
    assert "bn_scale: lenet5 has no BatchNorm, skipped" in bench["lines"]


def test_splitlbi_rows_record_k_epochs_saved_and_every_variant(bench: dict) -> None:
    settings = bench_settings(load_recipe("prune-bench", "smoke"))
    rows = [r for r in bench["rows"] if r["method"].startswith("splitlbi")]
    for model in settings.models:
        variants = {(int(r["K"]), r["normalize"]) for r in rows if r["model"] == model
                    and r["method"] == "splitlbi_finetune"}
        assert variants == {(k, n) for k in settings.k for n in settings.normalize}
    for row in rows:
        k = int(row["K"])
        assert int(row["epochs_saved"]) == settings.train_epochs - k
        # K dense epochs, the rest on the sub-network.
        total = settings.train_epochs + settings.finetune_epochs
        assert float(row["train_cost"]) == pytest.approx(k + (total - k) * float(row["macs_share"]), rel=1e-4)
        if row["method"] == "splitlbi_finetune":
            assert _number(row["sparse_acc_before_finetune"]) is not None
        if row["default_variant"] == "0":  # variant_budgets = []: pruned and evaluated, not trained
            assert row["test_acc"] == ""


def test_methods_share_the_initialization_of_their_seed(bench: dict) -> None:
    runs = bench["out"] / "runs"

    def init(prefix: str) -> dict:
        [run] = [p for p in runs.iterdir() if re.fullmatch(re.escape(prefix) + r"-[0-9a-f]{8}", p.name)]
        return torch.load(run / "init.pt", weights_only=True)

    for model in ("resnet20", "lenet5"):
        reference = init(f"{model}-sgd-seed0")
        for other in (f"{model}-splitlbi-k1-nu1-seed0", f"{model}-group-norm-0.0001-seed0"):
            state = init(other)
            assert all(torch.equal(reference[k], state[k]) for k in reference), other


def test_files_plot_summary_and_a_second_call_skips_every_run(bench: dict) -> None:
    figures = bench["out"] / "figures"
    assert (figures / "prune_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (figures / "prune_bench.md").read_text()
    assert summary.count("Goal at 50% of the MACs") == 2 and "| SplitLBI path (F-epoch K) |" in summary
    lines: list = []
    reproduce(["prune-bench"], "smoke", bench["out"], data_dir=str(bench["data"]), device="cpu", progress=False,
              log=lines.append)
    assert not [line for line in lines if ": trained in" in line or ": running" in line]
    assert read_rows(figures / "prune_bench.csv") == bench["rows"]


def test_report_only_writes_the_finished_runs_and_runs_nothing(bench: dict, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(bench["out"], out)
    [lottery] = [p for p in (out / "runs").iterdir() if p.name.startswith("lenet5-splitlbi")
                 and p.name.endswith(tuple("0123456789abcdef")) and "-lottery-" in p.name]
    shutil.rmtree(lottery)  # as if the benchmark had been stopped before this run finished
    lines: list = []
    reproduce(["prune-bench"], "smoke", out, data_dir=str(bench["data"]), device="cpu", progress=False,
              overrides=["bench.report_only=true"], log=lines.append)
    assert not [line for line in lines if ": trained in" in line or ": running" in line]
    assert any("report only:" in line and "lottery" in line for line in lines)
    rows = read_rows(out / "figures" / "prune_bench.csv")
    missing = [r for r in bench["rows"] if r["model"] == "lenet5" and r["method"] == "splitlbi_lottery"]
    assert len(missing) == 1 and rows == [r for r in bench["rows"] if r not in missing]


def test_recipe_scales_validate() -> None:
    assert scales_of("prune-bench") == ["smoke", "cpu", "paper", "resnet"]
    for scale in ("smoke", "cpu", "paper", "resnet"):
        recipe = load_recipe("prune-bench", scale)
        settings = bench_settings(recipe)
        for model in settings.models:
            config = model_config(recipe, model)
            assert config.epochs >= 1
            if scale == "paper":
                assert config.dataset == "cifar10"
        if scale != "smoke":
            assert len(recipe.seeds) >= 3
            assert {0.5, 0.3333333} <= set(settings.budgets)
    cpu = bench_settings(load_recipe("prune-bench", "cpu"))  # budgets per model: a table
    assert cpu.model_budgets["lenet5"] == [0.6666667, 0.5, 0.3333333, 0.25]
    assert cpu.model_budgets["resnet20"] == [0.5, 0.3333333] and cpu.budgets == cpu.model_budgets["lenet5"]
    paper = bench_settings(load_recipe("prune-bench", "paper"))
    assert paper.models == ["resnet56", "vgg16_bn"]
    assert set(load_recipe("prune-bench", "cpu").sections["model"]) == {"resnet20", "lenet5"}
    assert cpu.goal_margin == 0.5 and bench_settings(load_recipe("prune-bench", "resnet")).goal_margin == 0.3


def test_goal_line_reads_the_margin_of_the_scale() -> None:
    from splitlbi.experiments.prune_bench import goal_line

    rows = [{"method": "sgd_dense", "target_macs": 1.0, "default_variant": 1, "test_acc": 92.4},
            {"method": "splitlbi_finetune", "target_macs": 0.5, "default_variant": 1, "test_acc": 92.0},
            {"method": "l1", "target_macs": 0.5, "default_variant": 1, "test_acc": 91.8}]
    assert "-0.40 points: met, goal >= -0.5" in goal_line(rows, 0.5)
    assert "-0.40 points: not met, goal >= -0.3" in goal_line(rows, 0.5, margin=0.3)
    assert "+0.20 points: met" in goal_line(rows, 0.5, margin=0.3)


def test_bad_bench_settings_are_one_line_errors() -> None:
    for override, message in (("bench.budgets=[1.5]", "budgets"), ("bench.k=[9]", "k must"),
                              ("bench.normalize=['median']", "normalize"), ("bench.models=['vgg']", "models"),
                              ("bench.methods=['magic']", "unknown methods"),
                              ("bench.variant_budgets=[0.25]", "variant_budgets"),
                              ("bench.budgets={lenet5=[0.5]}", "must name every model"),
                              ("bench.budgets={lenet5=[0.5],resnet20=[0]}", "budgets must be"),
                              ("bench.goal_margin=-1", "goal_margin")):
        with pytest.raises(SplitLBIError, match=message):
            bench_settings(load_recipe("prune-bench", "smoke", overrides=[override]))


def test_schedule_after_continues_the_step_schedule_and_steps_once_at_e() -> None:
    config = TrainConfig(lr=0.1, lr_milestones=(4,), lr_gamma=0.1)
    # SplitLBI pruned after K = 2 of E = 6: lr 0.1 until epoch 4, 0.01 until 6, then fine-tuning at 0.001.
    assert schedule_after(config, 2, 6) == {"lr": 0.1, "lr_milestones": [2, 4], "lr_gamma": 0.1}
    after = schedule_after(config, 5, 6)
    assert after["lr"] == pytest.approx(0.01) and after["lr_milestones"] == [1]
    # Fine-tuning after E: the schedule's next step.
    assert schedule_after(config, 6, 6)["lr"] == pytest.approx(0.001)
    assert schedule_after(config, 6, 6)["lr_milestones"] == []
    assert schedule_after(dataclasses.replace(config, lr_milestones=()), 6, 6)["lr"] == pytest.approx(0.01)
