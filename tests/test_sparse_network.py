"""The sparse model is the network a user gets: what SplitLBI reports as its sparse model is the
network ``compact`` builds from the support of Γ, whether the filters or the BatchNorm scales
carry Γ; folding, BatchNorm recalibration, the parameter groups, and the option-A ResNets under
plain Torch-Pruning."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from splitlbi import SplitLBI
from splitlbi.models import create_model
from splitlbi.models.structure import conv_batchnorms, output_layer, stem_conv
from splitlbi.optim.groups import param_groups
from splitlbi.prune.channels import filter_masks, filter_scores
from splitlbi.prune.compact import compact_model, mask_network
from splitlbi.train.loop import recalibrate_batchnorm

MODELS = [("lenet5", 28), ("resnet20", 28), ("resnet56", 16), ("vgg16_bn", 32)]


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1, generator=generator)
                module.running_var.uniform_(0.5, 2, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)


def _optimizer_with_support(model: nn.Module, couple: str, generator: torch.Generator) -> SplitLBI:
    """A SplitLBI optimizer whose V puts about 60 % of the coupled filters/channels in the support."""
    optimizer = SplitLBI(param_groups(model, couple=couple), lr=0.1)
    for coupled in optimizer.named_coupled():
        entering = torch.rand(coupled.param.shape[0], generator=generator) < 0.6
        shape = (-1,) + (1,) * (coupled.param.dim() - 1)
        direction = torch.randn(coupled.param.shape, generator=generator)
        direction = direction / direction.reshape(direction.shape[0], -1).norm(dim=1).view(shape)
        optimizer.state[coupled.param]["v"] = direction * (0.5 + 1.5 * entering.float()).view(shape)  # λ = 1
    return optimizer


@pytest.mark.parametrize("name, size", MODELS)
@pytest.mark.parametrize("couple", ["filters", "bn"])
def test_sparse_model_is_the_compact_network(name: str, size: int, couple: str) -> None:
    generator = torch.Generator().manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).eval()
    _randomize_batchnorm(model, generator)
    optimizer = _optimizer_with_support(model, couple, generator)
    x = torch.randn(4, 1, size, size, generator=generator)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        dense = model(x)
    compact, report = compact_model(model, optimizer.masks_by_module(model), x[:1], measure=False)
    assert report.macs_after < report.macs_before
    with optimizer.sparse_model(model, x[:1]) as masks, torch.no_grad():
        sparse = model(x)
    assert set(masks) == {c.name for c in optimizer.named_coupled()}
    with torch.no_grad():
        assert (sparse - compact.eval()(x)).abs().max().item() <= 1e-4
        assert (sparse - dense).abs().max().item() > 1e-3  # the sparse model is another function
        assert torch.equal(model(x), dense)  # restored exactly
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_sparse_model_without_a_model_projects_the_weights() -> None:
    generator = torch.Generator().manual_seed(1)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    optimizer = _optimizer_with_support(model, "filters", generator)
    weight = model.conv3.weight.detach().clone()
    with optimizer.sparse_model() as masks:
        assert torch.equal(model.conv3.weight, weight * masks["conv3.weight"])
    assert torch.equal(model.conv3.weight, weight)
    with pytest.raises(ValueError, match="example_input"):
        with optimizer.sparse_model(model):
            pass


@pytest.mark.parametrize("name, size", [("lenet5", 28), ("resnet20", 28)])
def test_folding_keeps_the_function_of_channels_already_at_their_constant(name: str, size: int) -> None:
    # Channels whose filters (no BatchNorm) or BatchNorm scales are already zero emit a constant:
    # removing them with folding changes nothing for a linear consumer and little for a padded
    # conv (only at the border); removing them without folding drops the constants.
    generator = torch.Generator().manual_seed(2)
    model = create_model(name, num_classes=10, in_channels=1).eval()
    _randomize_batchnorm(model, generator)
    norms = conv_batchnorms(model)
    modules = dict(model.named_modules())
    masks = {}
    with torch.no_grad():
        for conv_name, module in modules.items():
            if isinstance(module, nn.Conv2d):
                keep = torch.rand(module.out_channels, generator=generator) > 0.4
                keep[0] = True
                masks[f"{conv_name}.weight"] = keep.view(-1, 1, 1, 1).expand_as(module.weight).clone()
                if conv_name in norms:
                    modules[norms[conv_name]].weight[~keep] = 0
                else:
                    module.weight[~keep] = 0
    x = torch.randn(8, 1, size, size, generator=generator)
    with torch.no_grad():
        dense = model(x)
        folded = compact_model(model, masks, x[:1], measure=False)[0].eval()(x)
        dropped = compact_model(model, masks, x[:1], measure=False, fold=False)[0].eval()(x)
    error_folded = (folded - dense).abs().max().item()
    error_dropped = (dropped - dense).abs().max().item()
    assert error_folded < error_dropped
    if name == "lenet5":  # convs with biases and no padding, then linear layers: exact
        assert error_folded <= 1e-4


def test_recalibration_gives_the_statistics_of_the_images() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].running_mean.fill_(5.0)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    mean, std = [0.5], [0.25]
    assert recalibrate_batchnorm(model, images, mean=mean, std=std, batch_size=16) == 1
    assert not model.training
    with torch.no_grad():
        outputs = model[0]((images.float() / 255 - 0.5) / 0.25)
    expected = outputs.mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert model[1].momentum == 0.1  # restored


def test_filter_masks_and_scores_from_batchnorm_entries() -> None:
    model = create_model("resnet20", num_classes=10, in_channels=1)
    channels = torch.tensor([True, False] * 8)
    masks = filter_masks(model, {"layer1.0.bn1.weight": channels})
    assert masks["layer1.0.conv1.weight"].shape == model.layer1[0].conv1.weight.shape
    assert torch.equal(masks["layer1.0.conv1.weight"].flatten(1).any(1), channels)
    # Both coupled: a filter is kept only where both keep it.
    both = filter_masks(model, {"layer1.0.bn1.weight": channels,
                                "layer1.0.conv1.weight": torch.zeros_like(model.layer1[0].conv1.weight,
                                                                          dtype=torch.bool)})
    assert not both["layer1.0.conv1.weight"].any()
    scores = filter_scores(model, {"layer1.0.bn1.weight": torch.full((16,), 2.0),
                                   "layer1.0.conv1.weight": torch.arange(16.0)})
    assert torch.equal(scores["layer1.0.conv1.weight"], torch.minimum(torch.arange(16.0), torch.full((16,), 2.0)))
    assert "layer1.0.bn1.weight" not in scores


def test_param_groups_couple_what_they_say() -> None:
    model = create_model("resnet20", num_classes=10, in_channels=1)
    assert stem_conv(model) == "conv1" and output_layer(model) == "fc"
    assert conv_batchnorms(model) == conv_batchnorms(model, torch.randn(1, 1, 28, 28))

    def coupled(groups):
        return {name: group["penalty"] for group in groups for name, _ in group["params"]
                if group["penalty"] != "none"}

    filters = coupled(param_groups(model))
    assert set(filters) == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bn = coupled(param_groups(model, couple="bn", stem=False))
    assert "bn1.weight" not in bn and "layer3.2.bn2.weight" in bn and set(bn.values()) == {"l1"}
    assert not any(name.endswith("conv1.weight") and "layer" in name for name in bn)
    both = coupled(param_groups(model, couple="both"))
    assert "layer2.0.conv1.weight" in both and "layer2.0.bn1.weight" in both
    scaled = param_groups(model, lam_scale="norm", lam=2.0)
    stem_group = next(g for g in scaled if g["params"][0][0] == "conv1.weight")
    assert stem_group["lam"] == pytest.approx(2.0 * float(model.conv1.weight.detach().flatten(1).norm(dim=1).median()))
    # Every parameter exactly once; the classifier never coupled.
    for groups in (param_groups(model), param_groups(model, couple="both", linear_penalty="l1")):
        names = [name for group in groups for name, _ in group["params"]]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert "fc.weight" not in coupled(groups)
    with pytest.raises(ValueError, match="couple"):
        param_groups(model, couple="channels")


def test_lenet5_has_no_batchnorm_so_bn_coupling_keeps_its_filters() -> None:
    model = create_model("lenet5", num_classes=10, in_channels=1)
    groups = param_groups(model, couple="bn")
    coupled = {name for group in groups if group["penalty"] != "none" for name, _ in group["params"]}
    assert coupled == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_option_a_resnet_under_plain_torch_pruning_fails_naming_the_fix() -> None:
    tp = pytest.importorskip("torch_pruning")
    from splitlbi.prune import prepare_torch_pruning

    x = torch.randn(1, 1, 28, 28)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                         ignored_layers=[model.fc]).step()
    with pytest.raises(RuntimeError, match="prepare_torch_pruning"):
        model(x)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                         ignored_layers=[model.fc], customized_pruners=prepare_torch_pruning(model)).step()
    assert model(x).shape == (1, 10)


def test_training_records_the_compact_network_and_its_recalibration(tmp_path: Path) -> None:
    from splitlbi.train import TrainConfig, load_masks, load_model_from_run, run_training
    from splitlbi.train.loop import evaluate

    run_dir = tmp_path / "run"
    config = TrainConfig(model="resnet20", dataset="digits", epochs=2, limit_train=256, limit_test=128,
                         lr=0.1, nu=1.0, couple="bn", couple_stem=False, recalibrate_bn=128, progress=False,
                         device="cpu")
    run_training(config, run_dir)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert all(row["sparse_recal_test_acc"] and row["sparse_macs_share"] for row in rows)
    info = __import__("json").loads((run_dir / "config.json").read_text())
    assert info["couple"] == "bn" and info["couple_stem"] is False
    # The recorded sparse accuracy is the compact network's, rebuilt from the saved masks.
    from splitlbi.data import load_dataset, normalize

    model = load_model_from_run(run_dir, weights=2).eval()
    masks = load_masks(run_dir, 2)
    assert any(name.endswith("bn2.weight") for name in masks)
    splits = load_dataset("digits")
    images = splits.test.images[:128]
    mean, std = info["mean"], info["std"]
    compact, report = compact_model(model, masks, normalize(images[:1], mean, std), measure=False)
    accuracy = evaluate(compact, images, splits.test.labels[:128], mean=mean, std=std).accuracy
    assert float(rows[-1]["sparse_test_acc"]) == pytest.approx(accuracy, abs=1e-3)
    assert float(rows[-1]["sparse_macs_share"]) == pytest.approx(report.macs_after / report.macs_before, abs=1e-5)


def test_resnet_path_recipe_runs_at_smoke_scale(tmp_path: Path, shared_data_dir: Path) -> None:
    from splitlbi.experiments.recipes import load_recipe
    from splitlbi.experiments.reproduce import reproduce

    lines: list = []
    out = tmp_path / "reproduce"
    files = reproduce(["resnet-path"], "smoke", out, data_dir=str(shared_data_dir), device="cpu", progress=False,
                      log=lines.append)
    names = {path.name for path in files}
    assert {"resnet-path.png", "resnet-path.csv", "resnet-path.md", "resnet-path_runs.csv"} <= names
    recipe = load_recipe("resnet-path", "smoke")
    rows = list(csv.DictReader(open(out / "figures" / "resnet-path_runs.csv")))
    candidates = recipe.sections["study"]["candidates"]
    epochs = recipe.train_config().epochs
    assert len(rows) == len(candidates) * epochs * len(recipe.seeds)
    for row in rows:
        splitlbi = row["candidate"] != "sgd"
        assert bool(row["sparse_macs_share"]) == splitlbi and bool(row["sparse_recal_test_acc"]) == splitlbi
    summary = (out / "figures" / "resnet-path.md").read_text()
    assert all(f"`{name}`" in summary for name in candidates if name != "sgd") and "Goal:" in summary
    # A second call trains nothing: every run is found.
    again: list = []
    reproduce(["resnet-path"], "smoke", out, data_dir=str(shared_data_dir), device="cpu", progress=False,
              log=again.append)
    assert not any("training" in line for line in again)
