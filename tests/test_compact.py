"""Real compaction (splitlbi.prune.compact) and ``splitlbi compact``."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")

from splitlbi.errors import SplitLBIError  # noqa: E402
from splitlbi.models import create_model  # noqa: E402
from splitlbi.prune.compact import apply_filter_masks, compact_model, mask_network, unselected_filters  # noqa: E402
from helpers import assert_one_line_error


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so that a forgotten BN channel shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)


def _random_masks(model: nn.Module, generator: torch.Generator, drop: float = 0.4) -> Dict[str, torch.Tensor]:
    """Whole-filter masks dropping about ``drop`` of the filters of each conv (never all); fc all-True."""
    masks = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() == 4:
            n = parameter.shape[0]
            keep = torch.rand(n, generator=generator) >= drop
            keep[int(torch.randint(n, (1,), generator=generator))] = True
            masks[name] = keep.view(-1, 1, 1, 1).expand_as(parameter).clone()
        elif parameter.dim() == 2:
            masks[name] = torch.ones_like(parameter, dtype=torch.bool)
    return masks


def _convs(model: nn.Module) -> Dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _setup(name: str, in_channels: int, seed: int = 0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=in_channels, **kwargs).eval()
    _randomize_bn(model, generator)
    masks = _random_masks(model, generator)
    x = torch.randn(4, in_channels, 32, 32, generator=generator)
    return model, masks, x


@pytest.mark.parametrize("name, in_channels, kwargs", [
    ("resnet20", 3, {}),
    ("resnet56", 1, {}),
    ("vgg16_bn", 3, {}),
    ("resnet20", 3, {"shortcut": "B"}),
])
def test_compact_equals_masked_model(name, in_channels, kwargs):
    model, masks, x = _setup(name, in_channels, **kwargs)
    original = copy.deepcopy(model.state_dict())
    compact, report = compact_model(model, masks, x[:1], measure=False)
    # The input model is untouched.
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())

    masked = mask_network(model, masks, x[:1]).model.eval()
    compact.eval()
    with torch.no_grad():
        difference = (compact(x) - masked(x)).abs().max().item()
    assert difference <= 1e-4
    # Removing filters changed the function of the unmasked model, not of the masked one.
    with torch.no_grad():
        assert (model(x) - masked(x)).abs().max().item() > 1e-3

    params = sum(p.numel() for p in compact.parameters())
    assert report.params_after == params < report.params_before == sum(p.numel() for p in model.parameters())
    assert report.macs_after < report.macs_before

    # A selected filter is never removed.
    unselected = unselected_filters(model, masks)
    compact_convs = _convs(compact)
    for conv_name, conv in _convs(model).items():
        selected = conv.out_channels - len(unselected[conv_name])
        assert compact_convs[conv_name].out_channels >= selected, conv_name
        assert report.kept_channels[conv_name] == compact_convs[conv_name].out_channels
        assert report.selected_channels[conv_name] == selected
    # Removable groups not coupled by residual additions lose exactly their unselected filters.
    for group in report.groups:
        if len(group.convs) == 1 and group.skipped is None:
            conv_name = group.convs[0]
            assert compact_convs[conv_name].out_channels == report.selected_channels[conv_name]


def test_residual_groups_keep_channels_selected_in_any_member():
    model, masks, x = _setup("resnet20", 3, seed=1, shortcut="B")
    # Make the coupled 32-channel stage share some unselected channels: unselect 0..9 in every member.
    coupled = ["layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer2.0.shortcut.0"]
    for conv_name in coupled:
        mask = masks[f"{conv_name}.weight"]
        mask[:10] = False
        mask[10:] = True
    masks["layer2.1.conv2.weight"][3] = True  # channel 3 is selected in one member only
    compact, report = compact_model(model, masks, x[:1], measure=False)
    groups = [g for g in report.groups if "layer2.0.conv2" in g.convs]
    assert len(groups) == 1 and set(coupled) <= set(groups[0].convs)
    group = groups[0]
    assert group.skipped is None and group.removed == 9
    for conv_name in coupled:
        assert dict(compact.named_modules())[conv_name].out_channels == 32 - 9
    masked = mask_network(model, masks, x[:1]).model.eval()
    with torch.no_grad():
        assert (compact.eval()(x) - masked(x)).abs().max().item() <= 1e-4


def _set_stream_masks(model: nn.Module, masks, members, unselected) -> None:
    for conv_name in members:
        mask = masks[f"{conv_name}.weight"]
        mask[:] = True
        mask[sorted(unselected)] = False


def test_option_a_resnet_streams_are_pruned_through_the_pad_shortcuts():
    from splitlbi.prune.compact import IndexShortcut

    model, masks, x = _setup("resnet20", 3, seed=2)
    streams = {1: ["conv1"] + [f"layer1.{i}.conv2" for i in range(3)],
               2: [f"layer2.{i}.conv2" for i in range(3)],
               3: [f"layer3.{i}.conv2" for i in range(3)]}
    # Stream 2 = pad(8) + stream 1 (16) + pad(8); stream 3 = pad(16) + stream 2 (32) + pad(16).
    _set_stream_masks(model, masks, streams[1], range(4))
    # 0-7 pad, 8-11 fed by removed stream-1 channels 0-3: removable; 12 fed by channel 4 (kept): kept.
    _set_stream_masks(model, masks, streams[2], [*range(13), 30, 31])
    # 16-20 fed by removed stream-2 channels 0-4: removable; 28 fed by stream-2 channel 12 (kept): kept.
    _set_stream_masks(model, masks, streams[3], [16, 17, 18, 19, 20, 28])
    masks["layer2.1.conv2.weight"][31] = True  # selected in one member only: kept

    compact, report = compact_model(model, masks, x[:1], measure=True, latency_repeats=2)
    assert not report.skipped_groups
    modules = dict(compact.named_modules())
    for stream, width in ((1, 12), (2, 32 - 13), (3, 64 - 5)):
        for conv_name in streams[stream]:
            assert modules[conv_name].out_channels == width, (conv_name, width)
    assert compact.fc.in_features == 59
    assert isinstance(compact.layer2[0].shortcut, IndexShortcut)
    assert isinstance(compact.layer3[0].shortcut, IndexShortcut)
    masked = mask_network(model, masks, x[:1]).model.eval()
    with torch.no_grad():
        assert (compact.eval()(x) - masked(x)).abs().max().item() <= 1e-4
    text = "\n".join(report.lines())
    assert "params" in text and "MACs" in text and "latency" in text
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0


class _PadAdd(nn.Module):
    """A toy with a channel zero-pad on a residual add that torch-pruning cannot map."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.a(x))
        y = torch.relu(self.b(x) + nn.functional.pad(x, (0, 0, 0, 0, 4, 4)))
        y = torch.relu(self.c(y))
        return self.fc(y.mean((2, 3)))


def test_unsafe_group_is_skipped_and_reported():
    model = _PadAdd().eval()
    masks = _random_masks(model, torch.Generator().manual_seed(0), drop=0.5)
    x = torch.randn(2, 3, 16, 16)
    compact, report = compact_model(model, masks, x[:1], measure=False)
    skipped = report.skipped_groups
    assert skipped and all(g.removed == 0 for g in skipped)
    assert any("skipped" in line for line in report.lines())
    masked = mask_network(model, masks, x[:1]).model
    with torch.no_grad():
        assert (compact(x) - masked(x)).abs().max().item() <= 1e-4
    assert compact.c.out_channels == report.selected_channels["c"] < 16


def test_layer_without_selected_filters_keeps_one_zeroed_channel():
    model = create_model("lenet5", num_classes=10, in_channels=1).eval()
    masks = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() > 1}
    x = torch.randn(2, 1, 28, 28)
    compact, report = compact_model(model, masks, x[:1], measure=False)
    assert [m.out_channels for m in _convs(compact).values()] == [1, 1, 1]
    masked = mask_network(model, masks, x[:1]).model
    with torch.no_grad():
        assert torch.allclose(compact(x), masked(x), atol=1e-5)
    assert any("no selected filter" in line for line in report.lines())


def test_wrong_masks_are_rejected():
    model = create_model("resnet20", num_classes=10, in_channels=3)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(SplitLBIError, match="no parameter 'conv9.weight'"):
        compact_model(model, {"conv9.weight": torch.ones(3, 3, dtype=torch.bool)}, x, measure=False)
    with pytest.raises(SplitLBIError, match="conv1.weight"):
        compact_model(model, {"conv1.weight": torch.ones(16, 1, 3, 3, dtype=torch.bool)}, x, measure=False)


# --------------------------------------------------------------------------- command line


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPLITLBI_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "splitlbi", "compact", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from splitlbi.train import TrainConfig, run_training

    directory = tmp_path_factory.mktemp("compact") / "run"
    config = TrainConfig(dataset="digits", epochs=2, limit_train=256, limit_test=128, progress=False, device="cpu")
    return Path(run_training(config, directory))


def _masked_reference(run_dir: Path, masks: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    from splitlbi.train import load_model_from_run

    model = load_model_from_run(run_dir, weights=2).eval()
    with torch.no_grad():
        return mask_network(model, masks, x[:1]).model(x)


def test_cli_compacts_a_run(tiny_run: Path, tmp_path: Path):
    from splitlbi.train import load_masks

    out = tmp_path / "m.pt"
    # After two tiny epochs the support of Γ may still be empty, which compact refuses unless allowed.
    result = _run_cli(str(tiny_run), "--epoch", "2", "--out", str(out), "--repeats", "3", "--allow-empty-mask")
    assert result.returncode == 0, result.stderr
    for word in ("params", "MACs", "latency", "->"):
        assert word in result.stdout
    compact = torch.load(out, weights_only=False).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert (compact(x) - _masked_reference(tiny_run, load_masks(tiny_run, 2), x)).abs().max().item() <= 1e-4
    # The module, the torch.export program and the state_dict; no temporary file left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt2", "m.state_dict.pt"]


def test_cli_with_a_mask_file(tiny_run: Path, tmp_path: Path):
    from splitlbi.train import load_model_from_run

    model = load_model_from_run(tiny_run, weights=2)
    masks = _random_masks(model, torch.Generator().manual_seed(3))
    mask_file = tmp_path / "masks.pt"
    torch.save({"masks": masks}, mask_file)
    out = tmp_path / "m.pt"
    result = _run_cli(str(tiny_run), "--epoch", "2", "--out", str(out), "--masks", str(mask_file), "--repeats", "2")
    assert result.returncode == 0, result.stderr
    compact = torch.load(out, weights_only=False).eval()
    kept = [m.out_channels for m in compact.modules() if isinstance(m, nn.Conv2d)]
    assert kept == [int(masks[f"conv{i}.weight"].flatten(1).any(1).sum()) for i in (1, 2, 3)]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert (compact(x) - _masked_reference(tiny_run, masks, x)).abs().max().item() <= 1e-4


def test_cli_errors(tiny_run: Path, tmp_path: Path):
    out = tmp_path / "m.pt"
    assert_one_line_error(_run_cli(str(tiny_run), "--epoch", "7", "--out", str(out)),
                           "epoch 7", "available epochs: 1, 2")
    wrong = create_model("resnet20", num_classes=10, in_channels=1)
    mask_file = tmp_path / "wrong.pt"
    torch.save({"masks": _random_masks(wrong, torch.Generator().manual_seed(0))}, mask_file)
    assert_one_line_error(_run_cli(str(tiny_run), "--epoch", "2", "--out", str(out), "--masks", str(mask_file)),
                           "masks do not fit the model", "conv1.weight")
    assert not out.exists()
