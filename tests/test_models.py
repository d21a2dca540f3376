"""Tests of splitlbi.models: the registry and LeNet-5."""

from __future__ import annotations

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
