"""The settings of one training run, their validation, and device resolution."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Optional, Tuple

import torch

from splitlbi.data.augment import AUGMENTATIONS
from splitlbi.errors import SplitLBIError
from splitlbi.optim.functional import UPDATES
from splitlbi.optim.groups import COUPLING_LAM, COUPLINGS, LAM_SCALES
from splitlbi.optim.penalties import PENALTIES

__all__ = [
    "model_kwargs",
    "AUGMENTATIONS",
    "COUPLING_LAM",
    "DEFAULT_LR",
    "NONFINITE_CHOICES",
    "OPTIMIZER_NAMES",
    "PAPER_SCHEDULE",
    "RESUME_OVERRIDABLE_FIELDS",
    "MAX_SEED",
    "FLOAT32_MAX",
    "SCHEDULES",
    "SPLITLBI_ONLY_FIELDS",
    "apply_schedule_preset",
    "check_setting_types",
    "TrainConfig",
    "validate_config",
    "resolve_device",
]

#: Optimizers that ``splitlbi train --optimizer`` accepts; all but the first are baselines.
OPTIMIZER_NAMES: Tuple[str, ...] = ("splitlbi", "sgd", "adam", "adamw", "adagrad", "rmsprop", "radam",
                                     "amsgrad")

#: The learning rate each optimizer gets when none is given (``--lr`` omitted, or
#: ``TrainConfig(lr=None)``): 0.05 for the SGD-type methods (docs/defaults.md), torch's
#: own defaults for the adaptive ones. Adam at 0.05 or 0.1 diverges on LeNet-5.
DEFAULT_LR: Mapping[str, float] = {"splitlbi": 0.05, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "adagrad": 1e-2,
                                   "rmsprop": 1e-2, "radam": 1e-3, "amsgrad": 1e-3}

#: Settings that may differ when a run is resumed: none of them changes the weights.
#: ``device`` can change them in the last bits, but moving a run to another machine is a
#: legitimate reason to resume, so it is allowed.
RESUME_OVERRIDABLE_FIELDS = frozenset({"epochs", "progress", "device", "eval_batch_size", "save_every", "data_dir",
                                       "channels_last", "compile", "nonfinite", "tensorboard", "recalibrate_bn"})

#: Settings that only SplitLBI reads: a baseline run is the same run whatever they say.
SPLITLBI_ONLY_FIELDS = frozenset({"kappa", "nu", "lam", "penalty", "linear_penalty", "update", "couple",
                                  "couple_stem", "lam_scale"})

#: ``--nonfinite``: a batch whose loss is nan or inf stops the run (``stop``; the last
#: good checkpoint stays last.pt) or is left out (``skip``, as torch.amp.GradScaler does).
#: May change on resume: it changes nothing while every loss is finite.
NONFINITE_CHOICES: Tuple[str, ...] = ("stop", "skip")

#: Learning-rate schedules of ``--schedule``: ``step`` (MultiStepLR at --lr-milestones),
#: ``paper`` (the paper's preset, PAPER_SCHEDULE, then stepped like ``step``) and
#: ``cosine`` (CosineAnnealingLR from --lr to 0 over --epochs, stepped per epoch).
SCHEDULES: Tuple[str, ...] = ("step", "paper", "cosine")

#: The schedule of the paper's CIFAR-10 experiments: 160 epochs, lr 0.1, x0.1 at epochs
#: 80 and 120, batch 128. ``--schedule paper`` fills in the values the command line did
#: not give (see :func:`apply_schedule_preset`).
PAPER_SCHEDULE: Mapping[str, Any] = {"epochs": 160, "lr": 0.1, "lr_milestones": (80, 120), "lr_gamma": 0.1,
                                     "batch_size": 128}

# A device index of more than 4 digits is no device (and overflows torch's parser).
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,4})?)$")

#: The largest seed: NumPy's ``np.random.seed`` takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1

#: The largest float32: a hyperparameter above it overflows in the optimizer's float32 step.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``splitlbi train`` parses its arguments into this.

    The defaults are those of the command line. SplitLBI-only settings (``kappa``, ``nu``,
    ``lam``, ``penalty``, ``linear_penalty``, ``update``) are ignored by the baseline optimizers; ``momentum`` and
    ``nesterov`` apply to ``splitlbi`` and ``sgd`` only.
    """

    model: str = "lenet5"
    # The model's widths (filters per conv or per stage, its factory's ``widths``); empty: the
    # model's standard network. Runs written before the field existed used the standard one.
    widths: Tuple[int, ...] = field(default_factory=tuple)
    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_split: Optional[int] = None
    pad_to: Optional[int] = None
    # On-device training augmentation, one of AUGMENTATIONS ("crop-flip": pad 4, random crop, flip).
    augment: str = "none"
    optimizer: str = "splitlbi"
    # lr, nu and linear_penalty: chosen so that every default gives a useful path (docs/defaults.md).
    # lr None: DEFAULT_LR[optimizer], filled in by __post_init__ (so config.json holds a number).
    lr: Optional[float] = None
    kappa: float = 1.0
    nu: float = 3.0
    # None: the coupling's own default (COUPLING_LAM), filled in with the coupling (resolve_coupling).
    lam: Optional[float] = None
    penalty: str = "auto"
    linear_penalty: str = "none"
    # SplitLBI's update, one of UPDATES: "paper" (the reference) or "release" (the release code's
    # variant, SplitLBI(update="release")). Runs written before the field existed used "paper".
    update: str = "paper"
    # What carries Γ in the conv layers: "auto" (the BatchNorm scales in a network whose convs have
    # BatchNorm, the filters otherwise; docs/defaults.md) or one of splitlbi.optim.groups.COUPLINGS;
    # whether the stem conv does (None: not when BatchNorm scales carry Γ, else yes); λ per conv layer
    # (LAM_SCALES). A run resolves "auto" and the Nones before writing config.json (resolve_coupling);
    # runs written before these fields existed coupled every filter with one λ.
    couple: str = "auto"
    couple_stem: Optional[bool] = None
    lam_scale: str = "none"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 128
    lr_milestones: Tuple[int, ...] = field(default_factory=tuple)
    lr_gamma: float = 0.1
    # One of SCHEDULES; "paper" presets are applied by apply_schedule_preset (the CLI does it).
    schedule: str = "step"
    seed: int = 0
    device: str = "auto"
    save_every: int = 1
    eval_batch_size: int = 1000
    progress: bool = True
    # Also write TensorBoard event files to RUN_DIR/tensorboard (splitlbi.train.tensorboard).
    tensorboard: bool = False
    # Speed and scale (docs/distributed.md): SyncBatchNorm under torchrun, bfloat16 autocast
    # on CUDA, channels-last memory format, torch.compile of the model.
    sync_bn: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    # Subsample the data (first N images); meant for tests and quick trials.
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    # What a non-finite training loss does: one of NONFINITE_CHOICES.
    nonfinite: str = "stop"
    # The sparse model is also evaluated with BatchNorm statistics recalibrated on this many
    # training images (0: not); metrics.csv's sparse_recal_test_acc.
    recalibrate_bn: int = 0

    def __post_init__(self) -> None:
        # JSON gives lists; keep one canonical type so configs compare equal.
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        self.widths = tuple(self.widths)
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.optimizer, DEFAULT_LR["splitlbi"])
        if self.lam is None and self.couple in COUPLING_LAM:
            self.lam = COUPLING_LAM[self.couple]

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict."""
        values = dataclasses.asdict(self)
        values["lr_milestones"] = list(self.lr_milestones)
        values["widths"] = list(self.widths)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SplitLBIError(f"unknown training setting(s): {', '.join(unknown)}")
        check_setting_types(values)
        return cls(**dict(values))


def model_kwargs(widths: Iterable[int]) -> dict:
    """The extra ``create_model`` arguments of a run's ``widths`` (a TrainConfig's or a
    config.json's): ``{"widths": [...]}``, or none for the model's standard network."""
    widths = list(widths or ())
    return {"widths": widths} if widths else {}


def _kind(default: Any) -> Tuple[type, ...]:
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, tuple):
        return (list, tuple)
    return (type(default),)


#: Settings whose default is None, and the type of their value otherwise.
_OPTIONAL_TYPES = {"data_dir": (str,), "train_split": (int,), "pad_to": (int,), "limit_train": (int,),
                   "limit_test": (int,), "lam": (int, float), "couple_stem": (bool,)}


def check_setting_types(values: Mapping[str, Any]) -> None:
    """Raise :class:`SplitLBIError` naming the first setting whose value has the wrong type
    (``"epochs": "6"`` in a config.json or recipe); unknown names are left to the caller."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in fields(TrainConfig)}
    for name, value in values.items():
        if name not in defaults:
            continue
        if name in _OPTIONAL_TYPES:
            kinds: Tuple[type, ...] = _OPTIONAL_TYPES[name]
            ok = value is None or (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)))
        else:
            # lr defaults to None (DEFAULT_LR by optimizer) but, once given, is a number.
            kinds = (int, float) if name == "lr" else _kind(defaults[name])
            ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
            if ok and name in ("lr_milestones", "widths"):
                ok = all(isinstance(m, int) and not isinstance(m, bool) for m in value)
        if not ok:
            expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                        list: "a list of integers", tuple: "a list of integers"}[
                kinds[-1] if kinds != (int, float) else float]
            raise SplitLBIError(f"setting {name} must be {expected}"
                                f"{' or none' if name in _OPTIONAL_TYPES else ''}, got {value!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SplitLBIError(message)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def apply_schedule_preset(config: TrainConfig, keep: Iterable[str] = ()) -> TrainConfig:
    """``config`` with its ``--schedule`` preset filled in: for ``schedule="paper"`` the
    PAPER_SCHEDULE values, except for the fields named in ``keep`` (the ones the user
    gave explicitly, which win); other schedules have no preset and come back unchanged.

    >>> apply_schedule_preset(TrainConfig(schedule="paper", epochs=40), keep={"epochs"}).lr_milestones
    (80, 120)
    """
    if config.schedule != "paper":
        return config
    kept = set(keep)
    preset = {name: value for name, value in PAPER_SCHEDULE.items() if name not in kept}
    if "lr" in preset and config.optimizer not in ("splitlbi", "sgd"):
        # The paper's lr 0.1 is SGD's and SplitLBI's; an adaptive method keeps its own default.
        preset["lr"] = DEFAULT_LR.get(config.optimizer, preset["lr"])
    return dataclasses.replace(config, **preset)


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`SplitLBIError` with a one-line message for the first invalid setting.

    Model and dataset names are checked where they are used (model creation, dataset
    loading) so that the lists of names stay in one place.
    """
    check_setting_types(dataclasses.asdict(config))
    _require(config.penalty in PENALTIES,
             f"unknown --penalty {config.penalty!r} (choose from {', '.join(PENALTIES)})")
    _require(config.linear_penalty in ("auto", "l1", "neuron", "none"),
             f"unknown --linear-penalty {config.linear_penalty!r} (choose from auto, l1, neuron, none)")
    _require(config.update in UPDATES, f"unknown --update {config.update!r} (choose from {', '.join(UPDATES)})")
    _require(config.couple in ("auto",) + COUPLINGS,
             f"unknown --couple {config.couple!r} (choose from auto, {', '.join(COUPLINGS)})")
    _require(config.lam is not None or config.couple == "auto", "--lam must be a finite number")
    _require(config.lam_scale in LAM_SCALES,
             f"unknown --lam-scale {config.lam_scale!r} (choose from {', '.join(LAM_SCALES)})")
    _require(config.update == "paper" or (config.couple in ("auto", "filters") and config.couple_stem is not False
                                          and config.lam_scale == "none"),
             "--update release runs with the paper's grouping only (--couple filters, the stem coupled, "
             "--lam-scale none)")
    _require(config.nonfinite in NONFINITE_CHOICES,
             f"unknown --nonfinite {config.nonfinite!r} (choose from {', '.join(NONFINITE_CHOICES)})")
    _require(config.augment in AUGMENTATIONS,
             f"unknown augmentation {config.augment!r} (choose from {', '.join(AUGMENTATIONS)})")
    _require(config.optimizer in OPTIMIZER_NAMES,
             f"unknown optimizer {config.optimizer!r} (choose from {', '.join(OPTIMIZER_NAMES)})")
    for name in ("lr", "kappa", "nu", "lam", "momentum", "weight_decay", "lr_gamma"):
        if name == "lam" and config.lam is None:
            continue  # "auto": the coupling's default, checked above
        _require(_is_finite_number(getattr(config, name)), f"--{name.replace('_', '-')} must be a finite number")
    _require(config.lr > 0, f"--lr must be > 0, got {config.lr}")
    _require(config.kappa > 0, f"--kappa must be > 0, got {config.kappa}")
    _require(config.nu > 0, f"--nu must be > 0, got {config.nu}")
    _require(config.lam is None or config.lam >= 0, f"--lam must be >= 0, got {config.lam}")
    _require(0 <= config.momentum < 1, f"--momentum must be in [0, 1), got {config.momentum}")
    _require(config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}")
    _require(config.lr_gamma > 0, f"--lr-gamma must be > 0, got {config.lr_gamma}")
    _require(config.recalibrate_bn >= 0, f"--recalibrate-bn must be >= 0 images, got {config.recalibrate_bn}")
    _require(config.couple_stem in (None, True, False), f"couple_stem must be true, false or none, got "
                                                         f"{config.couple_stem!r}")
    for name in ("sync_bn", "amp", "channels_last", "compile", "tensorboard"):
        _require(isinstance(getattr(config, name), bool), f"{name} must be True or False, got {getattr(config, name)!r}")
    _require(config.schedule in SCHEDULES,
             f"unknown schedule {config.schedule!r} (choose from {', '.join(SCHEDULES)})")
    _require(not (config.schedule == "cosine" and config.lr_milestones),
             "--lr-milestones has no effect with --schedule cosine (it anneals over --epochs); drop one of them")
    _require(config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}")
    _require(config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}")
    _require(config.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {config.eval_batch_size}")
    _require(config.save_every >= 1, f"--save-every must be >= 1, got {config.save_every}")
    _require(all(m >= 1 for m in config.lr_milestones),
             f"--lr-milestones must be epochs >= 1, got {list(config.lr_milestones)}")
    _require(list(config.lr_milestones) == sorted(set(config.lr_milestones)),
             f"--lr-milestones must be increasing, got {list(config.lr_milestones)}")
    _require(all(w >= 1 for w in config.widths), f"--widths must be positive integers, got {list(config.widths)}")
    for name in ("train_split", "pad_to", "limit_train", "limit_test"):
        value = getattr(config, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _require(isinstance(config.seed, int) and 0 <= config.seed <= MAX_SEED,
             f"--seed must be an integer from 0 to {MAX_SEED} (2**32 - 1, NumPy's limit), got {config.seed}")
    _require(bool(_DEVICE_PATTERN.match(config.device)),
             f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    for name in ("lr", "kappa", "nu", "lam", "weight_decay"):
        if getattr(config, name) is None:  # lam None: the coupling's own default
            continue
        _require(abs(getattr(config, name)) <= FLOAT32_MAX,
                 f"--{name.replace('_', '-')} must be at most {FLOAT32_MAX:.4g} (float32), got {getattr(config, name)}")


def resolve_device(name: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a usable :class:`torch.device`, or raise SplitLBIError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not _DEVICE_PATTERN.match(name):
        raise SplitLBIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SplitLBIError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SplitLBIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) found")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SplitLBIError(f"--device {name}: MPS is not available on this machine")
    return device
