"""Tests of splitlbi.models: the registry and LeNet-5."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from splitlbi.errors import DataError, SplitLBIError
from splitlbi.models import LeNet5, create_model, is_model, list_models, register_model
from splitlbi.models import registry


def test_lenet5_parameter_counts() -> None:
    model = create_model("lenet5")
    assert isinstance(model, LeNet5)
    per_layer = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in model.named_children()
    }
    assert per_layer == {"conv1": 156, "conv2": 2416, "conv3": 48120, "fc1": 10164, "fc2": 850}
    assert sum(p.numel() for p in model.parameters()) == 61706
    assert "conv3.weight" in dict(model.named_parameters())
    assert model.conv3.weight.shape == (120, 16, 5, 5)


@pytest.mark.parametrize("size", [28, 32])
def test_lenet5_output_shape(size: int) -> None:
    model = create_model("LeNet5", num_classes=7, in_channels=3)
    assert model(torch.randn(4, 3, size, size)).shape == (4, 7)


def test_lenet5_conv3_is_one_by_one_on_28x28() -> None:
    model = create_model("lenet5")
    seen = {}

    def record_shape(module: nn.Module, inputs, output: torch.Tensor) -> None:
        seen["shape"] = output.shape

    model.conv3.register_forward_hook(record_shape)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen["shape"] == (2, 120, 1, 1)


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(SplitLBIError, match="unknown model 'lenet6'.*lenet5") as info:
        create_model("lenet6")
    assert not isinstance(info.value, DataError)
    assert "lenet5" in list_models() and is_model("lenet5") and not is_model("lenet6")


def test_bad_num_classes() -> None:
    with pytest.raises(SplitLBIError, match="num_classes"):
        create_model("lenet5", num_classes=0)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_model_factories", dict(registry._model_factories))

    @register_model(name="Tiny_Test_Net")
    def tiny(num_classes: int = 10, in_channels: int = 1, width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.Linear(width, num_classes))

    assert "tiny_test_net" in list_models()
    model = create_model("tiny_test_net", num_classes=3, width=5)
    assert model[1].out_features == 5 and model[2].out_features == 3

    def other(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(other, name="lenet5")


# --------------------------------------------------------------------------- your own model (issue 22)

_USER_MODULE = '''
from torch import nn
from splitlbi.models import register_model


def plain(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


def timm_style(num_classes=10, in_chans=3):
    return plain(num_classes, in_chans)


def fixed():
    return plain(10, 3)


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(4, num_classes)


@register_model
def user_registered_net(num_classes=10, in_channels=1):
    return plain(num_classes, in_channels)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of the user's in the current directory, which is not on sys.path (as for the
    ``splitlbi`` console script)."""
    import sys

    name = f"user_nets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setattr(registry, "_model_factories", dict(registry._model_factories))
    yield name
    sys.modules.pop(name, None)


def test_a_model_by_import_path(user_module: str) -> None:
    model = create_model(f"{user_module}:plain", num_classes=3, in_channels=2)
    assert model[0].in_channels == 2 and model[-1].out_features == 3
    assert is_model(f"{user_module}:plain") and not is_model(f"{user_module}:nothing")
    assert create_model(f"{user_module}:timm_style", 5, 1)[0].in_channels == 1  # in_chans, timm's name
    assert create_model(f"{user_module}:Net", 4).fc.out_features == 4  # a class; no in_channels to give
    assert registry.model_module("user_registered_net") == user_module  # what config.json records
    assert registry.model_module("lenet5") is None
    cases = [(f"{user_module}:fixed", "first conv reads 3 channels, the data has 1"),
             ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
             (f"{user_module}:nothing", "has no attribute 'nothing'"),
             ("lenet6", "package.module:factory")]
    for name, message in cases:
        with pytest.raises(SplitLBIError, match=re.escape(message)):
            create_model(name, num_classes=10, in_channels=1)


def test_list_models_filters_as_timm() -> None:
    assert list_models("resnet*") == [name for name in list_models() if name.startswith("resnet")]
    assert "resnet20" in list_models("resnet*") and "lenet5" not in list_models("resnet*")
    assert list_models(["lenet*", "vgg*"]) == ["lenet5", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert "resnet18" not in list_models(module="resnet_cifar") and "resnet20" in list_models(module="resnet_cifar")
    assert "resnet110" not in list_models("resnet*", exclude_filters="resnet1*")
    assert list_models(pretrained=True) == []


def test_in_chans_is_in_channels() -> None:
    assert create_model("lenet5", in_chans=3).conv1.in_channels == 3
    with pytest.raises(SplitLBIError, match="in_chans is timm's name"):
        create_model("lenet5", in_channels=1, in_chans=3)
