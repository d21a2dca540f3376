"""Tests of the model zoo: CIFAR ResNets, ResNet-50 for CIFAR, VGG-16-BN, ImageNet ResNets, AlexNet.

Parameter counts are the published ones (BN weights/biases and linear biases
included), for 3 input channels and 10 classes (CIFAR models) or 1000 (ImageNet).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitlbi
from splitlbi.models import create_model, list_models
from splitlbi.models.resnet_cifar import CifarResNet, PadShortcut

# name: (classes of the reference config, reference parameter count, input side for tests)
CIFAR_MODELS = {
    "resnet20": (10, 269_722),
    "resnet32": (10, 464_154),
    "resnet44": (10, 658_586),
    "resnet56": (10, 853_018),
    "resnet110": (10, 1_727_962),
    "resnet50_cifar": (10, 23_520_842),
    "vgg16_bn": (10, 14_728_266),
}
IMAGENET_MODELS = {
    "resnet18": (1000, 11_689_512),
    "resnet50": (1000, 25_557_032),
    "alexnet": (1000, 61_100_840),
}
ALL_MODELS = {**CIFAR_MODELS, **IMAGENET_MODELS}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _built(name: str, in_channels: int) -> nn.Module:
    """One model per (name, channels) for read-only tests (eval mode, never trained)."""
    return create_model(name, num_classes=ALL_MODELS[name][0], in_channels=in_channels).eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_list_models_contains_the_zoo() -> None:
    names = set(list_models())
    assert set(ALL_MODELS) <= names
    assert "lenet5" in names


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_parameter_count(name: str) -> None:
    classes, expected = ALL_MODELS[name]
    model = _built(name, 3)
    assert _count(model) == expected
    # The 1-channel variant differs only by the stem conv's input channels.
    gray = _built(name, 1)
    stem = _first_conv(model)
    assert _first_conv(gray).in_channels == 1
    per_input_channel = stem.out_channels * math.prod(stem.kernel_size)
    assert _count(model) - _count(gray) == 2 * per_input_channel
    assert model.state_dict().keys() == gray.state_dict().keys()


@pytest.mark.parametrize("name", list(CIFAR_MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_cifar_output_shape(name: str, channels: int) -> None:
    with torch.no_grad():
        out = _built(name, channels)(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(IMAGENET_MODELS))
def test_imagenet_output_shape(name: str) -> None:
    with torch.no_grad():
        out = _built(name, 3)(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def _train_step(model: nn.Module, x: torch.Tensor, classes: int) -> None:
    """One SplitLBI step: the loss is finite, every conv/linear weight moves, and the
    conv weights are coupled with a Γ (group penalty)."""
    model.train()
    opt = splitlbi.SplitLBI(model.named_parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() > 1}
    y = torch.arange(x.shape[0]) % classes
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    moved = [name for name, old in before.items() if not torch.equal(old, after[name])]
    assert moved == list(before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    coupled = {c.name: c.penalty for c in opt.named_coupled()}
    first_conv = next(name for name, p in model.named_parameters() if p.dim() == 4)
    assert coupled[first_conv] == "group"


@pytest.mark.parametrize("name", list(CIFAR_MODELS))
def test_cifar_training_step(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=1)  # Fashion-MNIST padded to 32x32
    _train_step(model, torch.randn(2, 1, 32, 32), 10)


# AlexNet is left out: its 61M parameters make a SplitLBI step take ~4 s and ~1 GB
# (W, grad, momentum and V); its forward pass is tested above.
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_resnet_training_step(name: str) -> None:
    model = create_model(name, num_classes=1000, in_channels=3)
    _train_step(model, torch.randn(2, 3, 64, 64), 1000)


def test_create_model_resnet56_one_channel() -> None:
    model = create_model("resnet56", num_classes=10, in_channels=1)
    assert isinstance(model, CifarResNet) and model.depth == 56
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------- CIFAR ResNets
def test_cifar_resnet_layer_names() -> None:
    names = [name for name, _ in _built("resnet20", 3).named_parameters()]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert names[-2:] == ["fc.weight", "fc.bias"]
    convs = [n for n in names if n.endswith("conv1.weight") or n.endswith("conv2.weight")]
    assert len(convs) == 1 + 2 * 9  # stem + 9 blocks of 2 convs, + fc = 20 layers
    assert "layer1.0.conv1.weight" in names and "layer3.2.bn2.bias" in names
    assert not any("shortcut" in n for n in names)  # option A has no parameters
    model = _built("resnet20", 3)
    assert model.layer3[0].conv1.weight.shape == (64, 32, 3, 3)
    assert model.fc.in_features == 64


def test_cifar_resnet_option_b() -> None:
    model = create_model("resnet20", num_classes=10, in_channels=3, shortcut="b")
    # Two projections (16->32 and 32->64): 1x1 conv + BN each.
    assert _count(model) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64) == 272_474
    assert model.layer2[0].shortcut[0].weight.shape == (32, 16, 1, 1)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)


def test_pad_shortcut() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet50_cifar_stem() -> None:
    model = _built("resnet50_cifar", 3)
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.in_features == 2048
    assert model.layer2[0].downsample[0].weight.shape == (512, 256, 1, 1)


# ------------------------------------------------------------------------ VGG
def test_vgg16_bn_layout() -> None:
    model = _built("vgg16_bn", 3)
    convs = model.conv_names()
    assert len(convs) == 13 and convs[:3] == ["features.0", "features.3", "features.7"]
    assert model.features[0].weight.shape == (64, 3, 3, 3)
    assert isinstance(model.features[1], nn.BatchNorm2d)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 512
    no_bias = create_model("vgg16_bn", num_classes=10, in_channels=3, conv_bias=False)
    assert _count(no_bias) == 14_728_266 - 4_224  # Network Slimming's bias-free convs
    with torch.no_grad():  # other input sizes work thanks to the adaptive pool
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# ----------------------------------------------------------- ImageNet models
@pytest.mark.parametrize(
    "name, keys",
    [
        ("resnet18", ["conv1.weight", "bn1.running_var", "layer1.1.conv2.weight", "layer2.0.downsample.0.weight",
                      "layer4.1.bn2.bias", "fc.weight"]),
        ("resnet50", ["layer1.0.downsample.1.weight", "layer3.5.conv3.weight", "layer4.2.bn3.bias", "fc.bias"]),
        ("alexnet", ["features.0.weight", "features.10.bias", "classifier.1.weight", "classifier.6.bias"]),
    ],
)
def test_torchvision_parameter_names(name: str, keys: list[str]) -> None:
    state = _built(name, 3).state_dict()
    assert set(keys) <= set(state)


def test_imagenet_resnet_details() -> None:
    r18, r50 = _built("resnet18", 3), _built("resnet50", 3)
    assert r18.conv1.weight.shape == (64, 3, 7, 7) and r18.conv1.stride == (2, 2)
    assert isinstance(r18.maxpool, nn.MaxPool2d)
    assert r18.layer1[0].downsample is None and r18.fc.in_features == 512
    block = r50.layer2[0]  # v1.5: stride on the 3x3 conv
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert r50.fc.in_features == 2048
    assert torch.equal(r50.bn1.weight, torch.ones(64)) and not r50.bn1.bias.any()
    # Kaiming-normal fan_out: std of conv1 ≈ sqrt(2 / (64 * 7 * 7)).
    assert r50.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)
    zero = create_model("resnet18", num_classes=1000, in_channels=3, zero_init_residual=True)
    assert not zero.layer1[0].bn2.weight.any()


def test_alexnet_layout() -> None:
    model = _built("alexnet", 3)
    assert model.features[0].weight.shape == (64, 3, 11, 11) and model.features[0].stride == (4, 4)
    assert model.classifier[1].in_features == 9216 and model.classifier[6].out_features == 1000
    assert isinstance(model.classifier[0], nn.Dropout)
