"""The defaults give a useful path: the README's optimizer snippet, run as written, and
``splitlbi train`` with every default end with Γ neither empty nor full and a sparse
model close to the dense one (issue: "defaults that give a useful path at all")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from splitlbi.data import load_dataset
from splitlbi.models import create_model
from splitlbi.train.config import TrainConfig
from splitlbi.train.loop import evaluate

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    """The Python block of the README's "The optimizer in your own loop" section."""
    section = README.read_text(encoding="utf-8").split("## The optimizer in your own loop", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under 'The optimizer in your own loop'"
    return match.group(1)


def _digits():
    splits = load_dataset("digits")
    mean, std = splits.mean, splits.std

    def normalize(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

    return (normalize(splits.train.images), splits.train.labels,
            normalize(splits.test.images), splits.test.labels)


def test_readme_snippet_gives_a_useful_path() -> None:
    """The snippet's own lines on LeNet-5 and digits, 20 passes over the data (batch 128,
    as ``splitlbi train``'s defaults): Γ between 10% and 90% non-zeros at the end and the
    sparse model within 3 points of the dense one."""
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = _digits()
    order = torch.Generator().manual_seed(0)

    def loader():  # 20 epochs of shuffled batches, as one iterable
        for _ in range(TrainConfig().epochs):
            permutation = torch.randperm(train_x.shape[0], generator=order)
            for start in range(0, train_x.shape[0], 128):
                index = permutation[start:start + 128]
                yield train_x[index], train_y[index]

    accuracies = []

    def accuracy(model: torch.nn.Module) -> None:
        model.eval()
        with torch.no_grad():
            accuracies.append(100.0 * (model(test_x).argmax(1) == test_y).float().mean().item())
        model.train()

    namespace = {"MyConvNet": lambda: create_model("lenet5"), "loader": loader(), "evaluate": accuracy,
                 "print": lambda *args: None}
    exec(compile(readme_snippet(), str(README), "exec"), namespace)
    opt, model = namespace["opt"], namespace["model"]
    accuracy(model)  # dense
    sparse_accuracy, dense_accuracy = accuracies
    share = opt.nonzero_share().overall
    assert 0.10 <= share <= 0.90, f"non-zeros of Γ {share:.1%}"
    assert dense_accuracy > 80.0, dense_accuracy
    assert sparse_accuracy >= dense_accuracy - 3.0, (sparse_accuracy, dense_accuracy)


def test_splitlbi_train_with_every_default_gives_a_useful_path(tmp_path: Path, capsys) -> None:
    """``splitlbi train`` with no option (LeNet-5 on digits, 20 epochs): the last epoch has
    Γ between 10% and 90% non-zeros and the sparse model within 3 points of the dense one,
    and nothing warns (enough steps for ν, no coupled layer left empty)."""
    from splitlbi.cli.main import main

    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    header, *rows = (tmp_path / "run" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    last = dict(zip(header.split(","), rows[-1].split(",")))
    share = float(last.get("gamma_nonzero_share", last.get("sparsity")))
    dense, sparse = float(last["test_acc"]), float(last["sparse_test_acc"])
    assert len(rows) == TrainConfig().epochs
    assert 0.10 <= share <= 0.90, f"non-zeros of Γ {share:.1%}"
    assert dense > 80.0, dense
    assert sparse >= dense - 3.0, (sparse, dense)
