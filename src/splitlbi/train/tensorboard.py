"""TensorBoard event files of a training run (``splitlbi train --tensorboard``).

An optional view: ``metrics.csv`` and ``path.csv`` stay the source of truth, and this
writes the same numbers, once per epoch, into ``RUN_DIR/tensorboard/`` for
``tensorboard --logdir runs/``. Needs the ``tensorboard`` extra
(``pip install "splitlbi[tensorboard]"``).

Tags (step = epoch):

* ``loss/train``, ``loss/test``, ``accuracy/train``, ``accuracy/test``,
  ``accuracy/sparse_test`` (SplitLBI), ``lr``, ``epoch_seconds``;
* ``gamma_nonzero_share/overall`` and ``gamma_nonzero_share/<parameter>`` (SplitLBI):
  the share of non-zeros of Γ, as in metrics.csv;
* ``filters_selected/<layer>`` (SplitLBI): share of the layer's filters in the support
  of Γ;
* histograms ``filter_norms_W/<layer>`` and (SplitLBI) ``filter_norms_Gamma/<layer>``:
  the ℓ2 norm of each output filter, the distribution behind path.csv's ``w_norm`` and
  ``gamma_norm`` (conv and linear weights for the other optimizers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError

__all__ = ["TENSORBOARD_DIR", "TensorBoardLogger", "require_tensorboard", "scalar_tags"]

#: Sub-directory of the run directory that holds the event files.
TENSORBOARD_DIR = "tensorboard"

#: metrics.csv column -> TensorBoard scalar tag.
_METRIC_TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "train_acc": "accuracy/train",
                "test_acc": "accuracy/test", "sparse_test_acc": "accuracy/sparse_test",
                "gamma_nonzero_share": "gamma_nonzero_share/overall", "lr": "lr",
                "epoch_seconds": "epoch_seconds"}


def scalar_tags(metrics: Mapping[str, Any]) -> Dict[str, float]:
    """The scalar tags of one epoch's metrics (the metrics.csv columns); empty cells
    (``None``: no Γ in a baseline run) are left out."""
    return {tag: float(metrics[column]) for column, tag in _METRIC_TAGS.items()
            if metrics.get(column) is not None}


def require_tensorboard() -> None:
    """Raise :class:`SplitLBIError` (one line: how to install it) when the tensorboard
    package is missing; checked before a run directory is written."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise SplitLBIError("--tensorboard needs the tensorboard package: pip install \"splitlbi[tensorboard]\" "
                            "(or pip install tensorboard)") from None


def _layer(parameter_name: str) -> str:
    return parameter_name[: -len(".weight")] if parameter_name.endswith(".weight") else parameter_name


class TensorBoardLogger:
    """Writes one run's per-epoch scalars and filter-norm histograms (see the module docstring).

    Args:
        log_dir: where the event files go (``RUN_DIR/tensorboard``); a resumed run adds
            a new event file next to the old ones and TensorBoard shows them as one.
    """

    def __init__(self, log_dir: Union[str, "os.PathLike[str]"]) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any], model: nn.Module,
                  optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Write epoch ``epoch``: ``metrics`` (metrics.csv columns), per-layer shares of
        non-zeros of Γ and selected filters, and filter-norm histograms."""
        from splitlbi.optim import SplitLBI

        writer = self._writer
        for tag, value in scalar_tags(metrics).items():
            writer.add_scalar(tag, value, epoch)
        if isinstance(optimizer, SplitLBI):
            for name, share in optimizer.nonzero_share().layers.items():
                writer.add_scalar(f"gamma_nonzero_share/{name}", share, epoch)
            for name, selected in optimizer.filter_support().items():
                writer.add_scalar(f"filters_selected/{_layer(name)}", selected.float().mean().item(), epoch)
            for which, label in (("weight", "W"), ("gamma", "Gamma")):
                for name, norms in optimizer.filter_norms(which).items():
                    self._histogram(f"filter_norms_{label}/{_layer(name)}", norms, epoch)
        else:
            for name, parameter in model.named_parameters():
                if parameter.dim() in (2, 4):
                    self._histogram(f"filter_norms_W/{_layer(name)}",
                                    parameter.detach().flatten(1).norm(dim=1), epoch)
        writer.flush()

    def _histogram(self, tag: str, values: Tensor, epoch: int) -> None:
        self._writer.add_histogram(tag, values.detach().float().cpu(), epoch)

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
