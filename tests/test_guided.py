"""Figure 2 building block: first conv block, guided-backprop responses, and the grid plot.

Tiny CPU models and images: every test runs in well under a second or two.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.plots.guided import first_conv_block, guided_backprop_responses, plot_guided_backprop


pytestmark = pytest.mark.usefixtures("one_thread")


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not the identity
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.bias.uniform_(-0.1, 0.1)
    return model


def images(n: int = 2, channels: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def plain_gradient(block: nn.Module, x: torch.Tensor, f: int) -> torch.Tensor:
    """Ordinary autograd gradient of filter f's response (spatial mean after BN and ReLU)."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(block(x)[:, f].mean((1, 2)).sum(), x)
    return grad


# --------------------------------------------------------------------------- #
# first_conv_block
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "name, channels, size, conv_name, bn_name",
    [
        ("resnet20", 1, 32, "conv1", "bn1"),
        ("lenet5", 1, 32, "conv1", None),
        ("vgg16_bn", 3, 32, "features.0", "features.1"),
        ("resnet18", 3, 64, "conv1", "bn1"),
    ],
)
def test_first_conv_block_shares_the_model_modules(name, channels, size, conv_name, bn_name):
    model = create_model(name, num_classes=10, in_channels=channels)
    model.train()
    block = first_conv_block(model, images(1, channels, size))
    assert isinstance(block, nn.Sequential)
    assert block[0] is model.get_submodule(conv_name)
    if bn_name is None:
        assert len(block) == 2
    else:
        assert len(block) == 3 and block[1] is model.get_submodule(bn_name)
    assert isinstance(block[-1], nn.ReLU)
    assert not block.training
    assert model.training  # modules outside the block keep their mode


def test_first_conv_block_follows_forward_order_not_definition_order():
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3)
            self.late_bn = nn.BatchNorm2d(4)
            self.early = nn.Conv2d(1, 4, 3)
            self.early_bn = nn.BatchNorm2d(4)

        def forward(self, x):
            x = torch.relu(self.early_bn(self.early(x)))
            return self.late_bn(self.late(x))

    model = Backwards()
    block = first_conv_block(model, images(1, 1, 8))
    assert block[0] is model.early and block[1] is model.early_bn


def test_model_without_conv_is_a_clear_error():
    with pytest.raises(SplitLBIError, match="no Conv2d"):
        first_conv_block(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), torch.randn(1, 1, 4, 4))


# --------------------------------------------------------------------------- #
# guided_backprop_responses
# --------------------------------------------------------------------------- #


def test_responses_shape_finite_nonzero_and_model_untouched():
    model = resnet20().train()
    x = images(3)
    responses = guided_backprop_responses(model, x, [0, 5, 15])
    assert responses.shape == (3, 3, 1, 32, 32)
    assert torch.isfinite(responses).all()
    assert (responses.flatten(2).abs().amax(2) > 0).all()  # every (image, filter) responds
    assert model.training and model.bn1.training  # modes restored
    assert all(p.grad is None for p in model.parameters())


def test_lenet5_responses():
    model = create_model("lenet5", num_classes=10, in_channels=1)
    responses = guided_backprop_responses(model, images(2), [0, 1])
    assert responses.shape == (2, 2, 1, 32, 32)
    assert torch.isfinite(responses).all() and responses.abs().sum() > 0


def test_responses_are_the_gradient_through_the_relu_gate():
    """One ReLU and a mean on top: the guided gradient is the plain gradient through the
    ReLU's gate, i.e. zero wherever the channel is off — and differs per filter."""
    model = resnet20().eval()
    x = images(2)
    block = first_conv_block(model, x[:1])
    responses = guided_backprop_responses(model, x, [2, 7])
    for k, f in enumerate([2, 7]):
        assert torch.allclose(responses[:, k], plain_gradient(block, x, f), atol=1e-7)
    assert not torch.allclose(responses[:, 0], responses[:, 1])

    # The response without the ReLU gate (all pixels) is different: the gate matters.
    conv, bn = model.conv1, model.bn1
    x_grad = x.clone().requires_grad_(True)
    (ungated,) = torch.autograd.grad(bn(conv(x_grad))[:, 2].mean((1, 2)).sum(), x_grad)
    assert not torch.allclose(responses[:, 0], ungated, atol=1e-6)


def test_filter_with_zero_weights_or_always_off_has_zero_response():
    model = resnet20().eval()
    with torch.no_grad():
        model.conv1.weight[3] = 0
        model.bn1.bias[3] = -1.0
        model.bn1.bias[4] = -1e4  # weights kept, but BN pushes the channel below 0 everywhere
    responses = guided_backprop_responses(model, images(2), [3, 4, 5])
    assert responses[:, 0].abs().max() == 0
    assert responses[:, 1].abs().max() == 0
    assert responses[:, 2].abs().max() > 0


@pytest.mark.parametrize(
    "filters, match",
    [([16], "filters: index 16 out of range"), ([-1], "filters: index -1"), ([], "filters is empty"),
     (["a"], "filters must be integer")],
)
def test_bad_filter_index_is_a_clear_error(filters, match):
    with pytest.raises(SplitLBIError, match=match):
        guided_backprop_responses(resnet20(), images(1), filters)


def test_images_with_wrong_channels_is_a_clear_error():
    with pytest.raises(SplitLBIError, match=r"cannot run on input of shape \(1, 3, 32, 32\).*channels"):
        guided_backprop_responses(resnet20(), images(1, channels=3), [0])


# --------------------------------------------------------------------------- #
# plot_guided_backprop
# --------------------------------------------------------------------------- #


def test_plot_writes_png_pdf_csv_npz(tmp_path: Path):
    model = resnet20()
    x = images(2)
    filters = [0, 3, 8]
    responses = {}
    for method in ("SGD", "SplitLBI (κ=10)", "SplitLBI (κ=1)"):
        for epoch in (0, 20):
            with torch.no_grad():
                model.conv1.weight.add_(0.01)  # a different model per key
            responses[(method, epoch)] = guided_backprop_responses(model, x, filters)

    paths = plot_guided_backprop(responses, x, tmp_path / "fig2.png", title="Figure 2", filters=filters)
    assert [p.name for p in paths] == ["fig2.png", "fig2.pdf", "fig2.csv", "fig2.npz"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)

    with open(paths[2], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["method", "epoch", "image", "filter", "mean_abs", "max_abs"]
    keys = [(r["method"], int(r["epoch"]), int(r["image"]), int(r["filter"])) for r in rows]
    expected = [(m, e, i, f) for (m, e) in responses for i in range(2) for f in filters]
    assert keys == expected
    first = rows[len(filters) + 1]  # SGD, epoch 0, image 1, filter 3
    value = responses[("SGD", 0)][1, 1].abs()
    assert float(first["mean_abs"]) == pytest.approx(value.mean().item(), rel=1e-5)
    assert float(first["max_abs"]) == pytest.approx(value.max().item(), rel=1e-5)

    stored = np.load(paths[3])
    np.testing.assert_array_equal(stored["SplitLBI (κ=1)|20"], responses[("SplitLBI (κ=1)", 20)].numpy())
    np.testing.assert_array_equal(stored["filters"], filters)
    assert stored["images"].shape == (2, 1, 32, 32)


def test_plot_rejects_mismatched_inputs(tmp_path: Path):
    x = images(2)
    good = torch.zeros(2, 3, 1, 32, 32)
    with pytest.raises(SplitLBIError, match="same shape"):
        plot_guided_backprop({("SGD", 0): good, ("SGD", 1): good[:, :2]}, x, tmp_path / "a.png")
    with pytest.raises(SplitLBIError, match="do not match"):
        plot_guided_backprop({("SGD", 0): good}, images(3), tmp_path / "a.png")
    with pytest.raises(SplitLBIError, match="image: index 5"):
        plot_guided_backprop({("SGD", 0): good}, x, tmp_path / "a.png", image=5)
    with pytest.raises(SplitLBIError, match="empty"):
        plot_guided_backprop({}, x, tmp_path / "a.png")
