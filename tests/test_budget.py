"""Path scores, budget masks (``splitlbi masks --macs/--params``) and PathImportance with Torch-Pruning."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tp = pytest.importorskip("torch_pruning")

from splitlbi.cli.main import main  # noqa: E402
from splitlbi.errors import SplitLBIError  # noqa: E402
from splitlbi.models import create_model  # noqa: E402
from splitlbi.optim import SplitLBI  # noqa: E402
from splitlbi.prune import (  # noqa: E402
    PathImportance, budget_masks, channel_groups, compact_model, path_scores, prepare_torch_pruning, read_mask_file,
)
from splitlbi.train import (  # noqa: E402
    TrainConfig, load_checkpoint, load_masks, load_model_from_run, read_train_config, run_training,
)
from splitlbi.train.optimizers import build_optimizer  # noqa: E402
from helpers import assert_one_line_error, read_rows  # noqa: E402

# Tiny runs with a small nu and lam: Γ is neither empty nor full after a few steps. The LeNet run also
# couples its linear layers (l1), so path scores of neurons are read too.
LENET = TrainConfig(dataset="digits", epochs=2, batch_size=64, limit_train=256, limit_test=64, lr=0.1, kappa=1.0,
                    nu=10.0, lam=0.01, linear_penalty="auto", progress=False, device="cpu")
RESNET = TrainConfig(model="resnet20", dataset="digits", pad_to=32, epochs=1, batch_size=32, limit_train=64,
                     limit_test=32, lr=0.1, kappa=1.0, nu=10.0, lam=0.01, progress=False, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(config: TrainConfig, directory: Path) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Path(run_training(config, directory, log=None))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(LENET, tmp_path_factory.mktemp("budget") / "lenet")


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(RESNET, tmp_path_factory.mktemp("budget") / "resnet20")


def run_cli(args: List[str], capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse errors exit
        status = exit_.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, captured.out, captured.err)


def _optimizer_at(run_dir: Path, epoch: int, model: Optional[nn.Module] = None) -> SplitLBI:
    """The run's optimizer as it was at the end of ``epoch`` (from its checkpoint)."""
    model = load_model_from_run(run_dir, epoch) if model is None else model
    optimizer = build_optimizer(read_train_config(run_dir), model)
    optimizer.load_state_dict(load_checkpoint(run_dir, epoch)["optimizer"])
    return optimizer


def _compacted_fractions(run_dir: Path, mask_file: Path, shape) -> Dict[str, float]:
    masks = read_mask_file(mask_file)["masks"]
    model = load_model_from_run(run_dir).eval()
    _, report = compact_model(model, masks, torch.randn(1, *shape), measure=False)
    return {"macs": report.macs_after / report.macs_before, "params": report.params_after / report.params_before}


# --------------------------------------------------------------------------- path scores


@pytest.mark.parametrize("penalty", ["group", "neuron", "l1"])
def test_optimizer_path_scores_pass_one_exactly_on_the_support(penalty: str):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 12, 3, bias=False) if penalty == "group" else nn.Linear(20, 12, bias=False)
    x = torch.randn(16, 3, 8, 8) if penalty == "group" else torch.randn(16, 20)
    opt = SplitLBI(layer.named_parameters(), lr=0.5, nu=1.0, lam=0.05, penalty=penalty)
    before = opt.path_scores()["weight"]
    assert before.shape == (12,) and torch.all(before == 0)  # V starts at zero: nothing is close
    for _ in range(6):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
        scores, support = opt.path_scores()["weight"], opt.filter_support()["weight"]
        assert torch.equal(scores > 1, support)
    assert support.any() and bool((scores > 0).all())


def test_path_scores_from_run_dir_equal_the_live_optimizer(lenet_run: Path, tmp_path: Path):
    for epoch in (1, 2):
        live = _optimizer_at(lenet_run, epoch).path_scores()
        stored = path_scores(lenet_run, epoch)
        assert set(stored) == set(live) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight", "fc2.weight"}
        support = {name: mask.flatten(1).any(1) for name, mask in load_masks(lenet_run, epoch).items()}
        for name, scores in stored.items():
            torch.testing.assert_close(scores, live[name].float(), rtol=1e-6, atol=0)
            assert torch.equal(scores > 1, support[name]), name  # the support is exactly score > 1
        # A non-trivial path: some filters in, some out.
        flat = torch.cat(list(stored.values()))
        assert 0 < int((flat > 1).sum()) < flat.numel()
    # Ranking below 1: the order filters are selected in. Epoch 0: V = 0, all scores 0.
    assert all(torch.all(s == 0) for s in path_scores(lenet_run, 0).values())
    header = next(csv.reader((lenet_run / "path.csv").open()))
    assert header[-1] == "v_norm"

    # A run written before path.csv had v_norm: the scores come from the checkpoint's optimizer state.
    old = tmp_path / "old"
    shutil.copytree(lenet_run, old)
    rows = list(csv.reader((old / "path.csv").open()))
    with (old / "path.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(row[:6] for row in rows)
    fallback = path_scores(old, 2)
    for name, scores in path_scores(lenet_run, 2).items():
        torch.testing.assert_close(fallback[name], scores, rtol=1e-6, atol=0)
    # ... and without the checkpoint either: a one-line error naming what is missing.
    (old / "checkpoints" / "epoch_0001.pt").unlink()
    with pytest.raises(SplitLBIError, match=r"no path scores for epoch 1: path.csv has no v_norm column"):
        path_scores(old, 1)


def test_resume_keeps_an_old_path_csv_readable(tmp_path: Path):
    import dataclasses

    first = dataclasses.replace(LENET, epochs=1, limit_train=64)
    run = _train(first, tmp_path / "run")
    rows = list(csv.reader((run / "path.csv").open()))
    with (run / "path.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(row[:6] for row in rows)
    run_training(dataclasses.replace(first, epochs=2), run, resume=True, log=None)
    resumed = read_rows(run / "path.csv")
    assert list(resumed[0]) == ["epoch", "layer", "filter", "w_norm", "gamma_norm", "in_support"]
    assert {row["epoch"] for row in resumed} == {"0", "1", "2"}
    assert path_scores(run, 2)  # falls back to checkpoints/epoch_0002.pt


# --------------------------------------------------------------------------- budget masks


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_cli_budget_masks_lenet(lenet_run: Path, tmp_path: Path, capsys, kind: str):
    out = tmp_path / f"{kind}.pt"
    result = run_cli(["masks", lenet_run, "--epoch", 2, f"--{kind}", 0.5, "--out", out], capsys)
    assert result.returncode == 0, result.stderr
    assert "achieved" in result.stdout and "points" in result.stdout
    content = read_mask_file(out)
    assert content["kind"] == "budget" and content["epoch"] == 2
    fraction = _compacted_fractions(lenet_run, out, (1, 28, 28))[kind]
    assert 0.48 <= fraction <= 0.50, fraction
    if kind == "macs":  # retrain and compact take the file like any mask file
        pruned = run_cli(["retrain", lenet_run, "--epoch", 2, "--mode", "prune", "--masks", out,
                          "--out", tmp_path / "pruned"], capsys)
        assert pruned.returncode == 0, pruned.stderr
        compacted = run_cli(["compact", lenet_run, "--epoch", 2, "--masks", out, "--out", tmp_path / "c.pt",
                             "--repeats", 1], capsys)
        assert compacted.returncode == 0, compacted.stderr
        assert f"({100 * fraction:.1f}%)" in compacted.stdout


@pytest.mark.parametrize("kind, ranking", [("macs", "global"), ("params", "global"), ("macs", "uniform")])
def test_cli_budget_masks_resnet20(resnet_run: Path, tmp_path: Path, capsys, kind: str, ranking: str):
    out = tmp_path / f"{kind}.pt"
    result = run_cli(["masks", resnet_run, "--epoch", 1, f"--{kind}", 0.5, "--ranking", ranking, "--out", out],
                     capsys)
    assert result.returncode == 0, result.stderr
    fraction = _compacted_fractions(resnet_run, out, (1, 32, 32))[kind]
    assert 0.48 <= fraction <= 0.50, fraction
    masks = read_mask_file(out)["masks"]
    assert all(mask.flatten(1).any(1).any() for mask in masks.values())  # no conv loses all its filters


def test_budget_masks_follow_the_scores_and_measure_what_they_claim():
    torch.manual_seed(0)
    model = create_model("vgg16_bn", num_classes=10, in_channels=3)
    x = torch.randn(1, 3, 32, 32)
    convs = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    scores = {name: torch.rand(m.out_channels) for name, m in convs.items()}
    result = budget_masks(model, x, scores, macs=0.4, normalize="none")
    assert result.reached and 0.38 <= result.macs_fraction <= 0.40
    _, report = compact_model(model, result.masks, x, measure=False)
    assert report.macs_after / report.macs_before == pytest.approx(result.macs_fraction)
    # Global ranking without normalization: what goes scores below what stays, up to the few groups that
    # the window filling skipped or added (a layer's first kept filter may be protected by min_channels).
    removed = torch.cat([scores[n][~m.flatten(1).any(1)] for n, m in result.masks.items()])
    kept = torch.cat([scores[n][m.flatten(1).any(1)] for n, m in result.masks.items()])
    assert float((kept < removed.max()).float().mean()) < 0.05
    # Uniform: every conv loses about the same share of its filters.
    uniform = budget_masks(model, x, scores, macs=0.4, ranking="uniform")
    shares = [1 - float(m.flatten(1).any(1).float().mean()) for m in uniform.masks.values()]
    assert uniform.reached and max(shares) - min(shares) < 0.1


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_residual_coupled_channels_are_kept_or_removed_whole(shortcut: str):
    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=10, in_channels=3, shortcut=shortcut)
    x = torch.randn(1, 3, 32, 32)
    groups = channel_groups(model, x)
    assert sum(len(g.filters) for g in groups) == sum(m.out_channels for m in model.modules()
                                                       if isinstance(m, nn.Conv2d))
    stem = next(g for g in groups if ("conv1.weight", 3) in g.filters)
    if shortcut == "A":  # the stem channel, the stage-2 channel the pad shortcut copies it into, and stage 3's
        assert {("layer1.2.conv2.weight", 3), ("layer2.0.conv2.weight", 3 + 8),
                ("layer3.2.conv2.weight", 3 + 8 + 16)} <= set(stem.filters)
    else:
        assert ("layer1.2.conv2.weight", 3) in stem.filters and len(stem.filters) == 4
    # Scores that disagree inside the coupled groups: high in one member, low in the others.
    scores = {f"{n}.weight": torch.rand(m.out_channels) * 0.1 for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d)}
    scores["layer1.1.conv2.weight"][3] = 10.0  # aggregate max: channel 3 of stream 1 must stay whole
    result = budget_masks(model, x, scores, macs=0.5, normalize="none")
    assert result.reached
    removed_groups = 0
    for group in groups:
        states = {bool(result.masks[name][f].any()) for name, f in group.filters}
        assert len(states) == 1, group.filters  # all kept or all removed
        removed_groups += states == {False}
    assert removed_groups > 0
    assert all(bool(result.masks[name][f].all()) for name, f in stem.filters)


def test_every_conv_keeps_a_filter_even_at_a_tiny_budget():
    model = create_model("lenet5", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 28, 28)
    scores = {f"{n}.weight": torch.rand(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    result = budget_masks(model, x, scores, macs=0.01)
    assert not result.reached and "NOT REACHED" in "\n".join(result.lines())
    assert all(int(m.flatten(1).any(1).sum()) >= 1 for m in result.masks.values())
    assert budget_masks(model, x, scores, params=1.0).params_fraction == 1.0


def test_budget_masks_accept_a_torch_pruning_importance():
    torch.manual_seed(0)
    model = create_model("resnet56", num_classes=10, in_channels=3)
    result = budget_masks(model, torch.randn(1, 3, 32, 32), tp.importance.GroupMagnitudeImportance(p=1),
                          params=0.5)
    assert result.reached and 0.48 <= result.params_fraction <= 0.50


def test_budget_masks_score_gradient_importances_with_the_model_gradients():
    # budget_masks works on a copy of the model; Taylor importance (|weight x gradient|) needs the
    # gradients to travel with it: a filter given a huge gradient is kept, whichever filter it is.
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    x = torch.randn(16, 1, 28, 28)
    conv_name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    for boosted in (0, conv.out_channels - 1):
        model.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 10, (16,))).backward()
        conv.weight.grad[boosted] = 1e6 * conv.weight[boosted].sign()
        result = budget_masks(model, x, tp.importance.TaylorImportance(), macs=0.5, ranking="uniform")
        kept = result.masks[f"{conv_name}.weight"].flatten(1).any(1)
        assert result.reached and 0 < int(kept.sum()) < conv.out_channels
        assert bool(kept[boosted])


def test_budget_and_cli_errors(lenet_run: Path, tmp_path: Path, capsys):
    model = create_model("lenet5", num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 28, 28)
    scores = {"conv1.weight": torch.rand(6)}
    with pytest.raises(SplitLBIError, match="exactly one of macs= and params="):
        budget_masks(model, x, scores, macs=0.5, params=0.5)
    with pytest.raises(SplitLBIError, match=r"macs=1.5 must be a fraction in \(0, 1\]"):
        budget_masks(model, x, scores, macs=1.5)
    with pytest.raises(SplitLBIError, match="none of the model's conv weights"):
        budget_masks(model, x, {"conv9.weight": torch.rand(3)}, macs=0.5)
    like = tmp_path / "like.pt"
    assert run_cli(["masks", lenet_run, "--epoch", 2, "--out", like], capsys).returncode == 0
    cases = [
        (["--epoch", 2, "--macs", 1.5], "--macs must be a fraction in (0, 1]"),
        (["--epoch", 2, "--params", 0], "--params must be a fraction in (0, 1]"),
        (["--macs", 0.5, "--like", like], "does not combine with --like"),
        (["--epoch", 2, "--macs", 0.5, "--params", 0.5], "not allowed with argument --macs"),
        (["--macs", 0.5], "--macs needs --epoch K"),
        (["--epoch", 2, "--ranking", "uniform"], "--ranking is for budget masks"),
        (["--epoch", 9, "--macs", 0.5], "no path scores for epoch 9"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli(["masks", lenet_run, *args, "--out", tmp_path / "x.pt"], capsys), fragment)
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- PathImportance


def _classifier(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _trained_optimizer(model: nn.Module, x: torch.Tensor, steps: int = 2) -> SplitLBI:
    opt = SplitLBI(model.named_parameters(), lr=0.1, nu=1.0, lam=0.01)
    y = torch.arange(x.shape[0]) % 10
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16_bn", "resnet18"])
def test_path_importance_with_meta_pruner(name: str):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3)
    x = torch.randn(4, 3, 32, 32)
    importance = PathImportance(_trained_optimizer(model, x))
    pruners = prepare_torch_pruning(model)
    model.eval()
    with torch.no_grad():
        reference = model(x)  # prepare_torch_pruning changes no output
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    macs_before, _ = tp.utils.count_ops_and_params(model, x[:1])
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=importance, pruning_ratio=0.5, global_pruning=False,
                                  ignored_layers=[_classifier(model)], customized_pruners=pruners)
    pruner.step()
    with torch.no_grad():
        out = model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    pruned = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(pruned[n] == convs[n] - int(convs[n] * 0.5) for n in convs)  # the target ratio, every layer
    macs_after, _ = tp.utils.count_ops_and_params(model, x[:1])
    assert macs_after < 0.35 * macs_before


def test_path_importance_ranks_by_the_normalized_path_score(lenet_run: Path):
    torch.manual_seed(0)
    model = create_model("vgg16_bn", num_classes=10, in_channels=3)
    x = torch.randn(4, 3, 32, 32)
    opt = _trained_optimizer(model, x)
    importance = PathImportance(opt, normalize="mean")
    scores = {n: s / s.mean() for n, s in opt.path_scores().items()}
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=importance, pruning_ratio=0.3, global_pruning=True,
                                  ignored_layers=[_classifier(model)])
    threshold_kept, threshold_removed = float("inf"), -float("inf")
    for group in pruner.step(interactive=True):
        conv = group[0].dep.target.module
        name = next(n for n, m in model.named_modules() if m is conv)
        removed = torch.tensor(sorted(group[0].idxs))
        kept = torch.ones(conv.out_channels, dtype=torch.bool)
        kept[removed] = False
        values = scores[f"{name}.weight"].double()
        threshold_removed = max(threshold_removed, float(values[removed].max()))
        threshold_kept = min(threshold_kept, float(values[kept].min()))
        group.prune()
    assert threshold_removed <= threshold_kept  # one threshold across layers
    # From a run directory and epoch (layers matched by name): the same channels as from the live optimizer.
    kept = {}
    for source in ("run", "live"):
        lenet = load_model_from_run(lenet_run, 2)
        importance = PathImportance(lenet_run, epoch=2) if source == "run" else PathImportance(_optimizer_at(
            lenet_run, 2, lenet))
        tp.pruner.MetaPruner(lenet, torch.randn(1, 1, 28, 28), importance=importance, pruning_ratio=0.5,
                             global_pruning=True, ignored_layers=[lenet.fc2]).step()
        kept[source] = [m.weight.shape[0] for m in lenet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kept["run"] == kept["live"] and kept["run"] != [6, 16, 120, 84, 10]
    with pytest.raises(SplitLBIError, match="give the epoch"):
        PathImportance(lenet_run)


# --------------------------------------------------------------------------- one ranking (issue 22)


def _mobile_net() -> nn.Module:
    """BatchNorm, a depthwise conv and a residual add: the channel groups a budget must respect."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.expand, self.bn1 = nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c)
            self.dw, self.bn2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False), nn.BatchNorm2d(2 * c)
            self.project, self.bn3 = nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = F.relu(self.bn2(self.dw(F.relu(self.bn1(self.expand(x))))))
            return x + self.bn3(self.project(y))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.block1, self.block2 = Block(8), Block(8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.block2(self.block1(F.relu(self.bn(self.conv(x)))))
            return self.fc(x.mean(dim=(2, 3)))

    return Net()


@pytest.mark.parametrize("name, couple", [("resnet20", "filters"), ("mobile", "filters"), ("mobile", "bn"),
                                          ("mobile", "both")])
def test_a_path_importance_ranks_as_its_scores_given_as_a_dict(name: str, couple: str):
    """budget_masks(PathImportance(opt)) and budget_masks(opt.path_scores()) are one ranking (the
    importance route normalized the per-group scores a second time: different masks on residual
    networks), whatever carries Γ and also for an optimizer given unnamed parameters."""
    import splitlbi

    model = create_model("resnet20", num_classes=10, in_channels=1) if name == "resnet20" else _mobile_net()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    groups = splitlbi.param_groups(model, couple=couple)
    unnamed = [{**group, "params": [p for _, p in group["params"]]} for group in groups]
    opt = SplitLBI(unnamed, lr=0.1, nu=1.0, lam=0.01)
    y = torch.arange(16) % 10
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with pytest.raises(SplitLBIError, match="name_parameters"):
        budget_masks(model, x[:1], opt.path_scores(), macs=0.5)  # keyed param0, ...: said so
    by_dict = budget_masks(model, x[:1], opt.name_parameters(model).path_scores(), macs=0.5)
    by_importance = budget_masks(model, x[:1], PathImportance(opt), macs=0.5)
    assert by_dict.reached and by_importance.normalize == by_dict.normalize == "mean"
    assert by_dict.kept_channels == by_importance.kept_channels
    assert all(torch.equal(by_dict.masks[k], by_importance.masks[k]) for k in by_dict.masks)
    with pytest.raises(SplitLBIError, match="PathImportance was built with normalize='mean'"):
        budget_masks(model, x[:1], PathImportance(opt), macs=0.5, normalize="max")
    if couple != "filters":
        # With Torch-Pruning's own pruners the BatchNorm scales' scores count too: every group is scored.
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
        importance = PathImportance(opt)
        conv = model.conv
        scored = importance(graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(8))))
        assert scored is not None and torch.isfinite(scored).all()


def test_results_and_reports_print_readably(tmp_path: Path):
    from splitlbi.prune import save_mask_file

    model = create_model("lenet5", num_classes=10, in_channels=1)
    scores = {f"{n}.weight": torch.rand(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    result = budget_masks(model, torch.randn(1, 1, 28, 28), scores, macs=0.5)
    assert str(result).splitlines() == result.lines() and "achieved MACs" in str(result)
    # a mask file from Python needs no model name: the network itself checks the masks
    path = save_mask_file(tmp_path / "m.pt", result.masks, model=model)
    assert read_mask_file(path)["model"] is None
    with pytest.raises(SplitLBIError, match="do not fit the model"):
        save_mask_file(tmp_path / "bad.pt", {"conv9.weight": torch.ones(3, dtype=torch.bool)}, model=model)
