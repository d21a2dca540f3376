"""The settings of one training run, their validation, and device resolution."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Tuple

import torch

from splitlbi.errors import SplitLBIError

__all__ = [
    "OPTIMIZER_NAMES",
    "RESUME_OVERRIDABLE_FIELDS",
    "TrainConfig",
    "validate_config",
    "resolve_device",
]

#: Optimizers that ``splitlbi train --optimizer`` accepts; all but the first are baselines.
OPTIMIZER_NAMES: Tuple[str, ...] = ("splitlbi", "sgd", "adam", "adamw", "adagrad", "rmsprop", "radam")

#: Settings that may differ when a run is resumed: none of them changes the weights.
#: ``device`` can change them in the last bits, but moving a run to another machine is a
#: legitimate reason to resume, so it is allowed.
RESUME_OVERRIDABLE_FIELDS = frozenset({"epochs", "progress", "device", "eval_batch_size", "save_every", "data_dir"})

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``splitlbi train`` parses its arguments into this.

    The defaults are those of the command line. SplitLBI-only settings (``kappa``, ``nu``,
    ``lam``, ``penalty``) are ignored by the baseline optimizers; ``momentum`` and
    ``nesterov`` apply to ``splitlbi`` and ``sgd`` only.
    """

    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_split: Optional[int] = None
    pad_to: Optional[int] = None
    optimizer: str = "splitlbi"
    lr: float = 0.1
    kappa: float = 1.0
    nu: float = 100.0
    lam: float = 1.0
    penalty: str = "auto"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 128
    lr_milestones: Tuple[int, ...] = field(default_factory=tuple)
    lr_gamma: float = 0.1
    seed: int = 0
    device: str = "auto"
    save_every: int = 1
    eval_batch_size: int = 1000
    progress: bool = True
    # Subsample the data (first N images); meant for tests and quick trials.
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep one canonical type so configs compare equal.
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict."""
        values = dataclasses.asdict(self)
        values["lr_milestones"] = list(self.lr_milestones)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SplitLBIError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**dict(values))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SplitLBIError(message)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`SplitLBIError` with a one-line message for the first invalid setting.

    Model and dataset names are checked where they are used (model creation, dataset
    loading) so that the lists of names stay in one place.
    """
    _require(config.optimizer in OPTIMIZER_NAMES,
             f"unknown optimizer {config.optimizer!r} (choose from {', '.join(OPTIMIZER_NAMES)})")
    for name in ("lr", "kappa", "nu", "lam", "momentum", "weight_decay", "lr_gamma"):
        _require(_is_finite_number(getattr(config, name)), f"--{name.replace('_', '-')} must be a finite number")
    _require(config.lr > 0, f"--lr must be > 0, got {config.lr}")
    _require(config.kappa > 0, f"--kappa must be > 0, got {config.kappa}")
    _require(config.nu > 0, f"--nu must be > 0, got {config.nu}")
    _require(config.lam >= 0, f"--lam must be >= 0, got {config.lam}")
    _require(0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}")
    _require(config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}")
    _require(config.lr_gamma > 0, f"--lr-gamma must be > 0, got {config.lr_gamma}")
    _require(config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}")
    _require(config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}")
    _require(config.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {config.eval_batch_size}")
    _require(config.save_every >= 1, f"--save-every must be >= 1, got {config.save_every}")
    _require(all(m >= 1 for m in config.lr_milestones),
             f"--lr-milestones must be epochs >= 1, got {list(config.lr_milestones)}")
    _require(list(config.lr_milestones) == sorted(set(config.lr_milestones)),
             f"--lr-milestones must be increasing, got {list(config.lr_milestones)}")
    for name in ("train_split", "pad_to", "limit_train", "limit_test"):
        value = getattr(config, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _require(isinstance(config.seed, int) and config.seed >= 0, f"--seed must be an integer >= 0, got {config.seed}")
    _require(bool(_DEVICE_PATTERN.match(config.device)),
             f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")


def resolve_device(name: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a usable :class:`torch.device`, or raise SplitLBIError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SplitLBIError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SplitLBIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) found")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SplitLBIError(f"--device {name}: MPS is not available on this machine")
    return device
