"""Build the optimizer and learning-rate schedule that a :class:`TrainConfig` names."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from splitlbi.errors import SplitLBIError
from splitlbi.optim import SplitLBI
from splitlbi.optim.groups import param_groups
from splitlbi.train.config import OPTIMIZER_NAMES, TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "is_splitlbi"]


def is_splitlbi(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` carries a structure parameter Γ (support, sparsity, masks)."""
    return isinstance(optimizer, SplitLBI)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` over ``model``'s parameters.

    Invalid hyperparameters (rejected by the optimizer's constructor with ValueError)
    are re-raised as :class:`SplitLBIError` so the CLI prints them as one line.
    """
    name = config.optimizer
    try:
        if name == "splitlbi":
            # Named parameters let SplitLBI report support/sparsity by layer name.
            named = list(model.named_parameters())
            params: list = named
            if config.couple != "filters" or not config.couple_stem or config.lam_scale != "none":
                if config.penalty != "auto" or config.linear_penalty == "auto":
                    raise SplitLBIError(f"--couple {config.couple}, --no-couple-stem and --lam-scale choose the "
                                        f"penalties themselves: leave --penalty at auto and set --linear-penalty to "
                                        f"none, l1 or neuron")
                params = param_groups(model, couple=config.couple, stem=config.couple_stem,
                                      linear_penalty=config.linear_penalty, lam_scale=config.lam_scale,
                                      lam=config.lam)
            elif config.linear_penalty != "auto" or config.penalty != "auto":
                linear_penalty = config.penalty if config.linear_penalty == "auto" else config.linear_penalty
                # A chosen penalty is for the weights: biases and BatchNorm parameters stay uncoupled, as
                # with auto (which leaves them in the first group, as runs written before kept them).
                low = [(n, p) for n, p in named if p.dim() < 2]
                groups = ({"params": [(n, p) for n, p in named if p.dim() > 2] + (low if config.penalty == "auto"
                                                                                 else [])},
                          {"params": [(n, p) for n, p in named if p.dim() == 2], "penalty": linear_penalty},
                          {"params": low if config.penalty != "auto" else [], "penalty": "none"})
                params = [group for group in groups if group["params"]]
            return SplitLBI(params, lr=config.lr, kappa=config.kappa, nu=config.nu,
                            lam=config.lam, momentum=config.momentum, nesterov=config.nesterov,
                            weight_decay=config.weight_decay, penalty=config.penalty, update=config.update)
        parameters: List[nn.Parameter] = list(model.parameters())
        if name == "sgd":
            return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                   nesterov=config.nesterov, weight_decay=config.weight_decay)
        if name == "adam":
            return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        if name == "adagrad":
            return torch.optim.Adagrad(parameters, lr=config.lr, weight_decay=config.weight_decay)
        if name == "rmsprop":
            # --momentum defaults to 0.9 for SGD-type methods; RMSprop keeps torch's default of 0.
            return torch.optim.RMSprop(parameters, lr=config.lr, weight_decay=config.weight_decay)
        if name == "radam":
            return torch.optim.RAdam(parameters, lr=config.lr, weight_decay=config.weight_decay)
        if name == "amsgrad":
            # AMSGrad (Reddi et al. 2018): Adam with the running maximum of the second moment.
            return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay, amsgrad=True)
    except ValueError as error:
        raise SplitLBIError(f"--optimizer {name}: {error}") from None
    raise SplitLBIError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZER_NAMES)})")


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule (``scheduler.step()`` once after each epoch).

    ``step`` and ``paper``: MultiStepLR, the learning rate multiplied by ``lr_gamma`` at
    each of ``lr_milestones`` (``paper`` presets them to 80, 120 through
    :func:`~splitlbi.train.config.apply_schedule_preset`). ``cosine``: CosineAnnealingLR
    from ``lr`` towards 0 over ``epochs`` epochs: epoch ``e`` (1-based) trains with
    ``lr·(1 + cos(π(e−1)/epochs))/2``.
    """
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones),
                                                gamma=config.lr_gamma)
