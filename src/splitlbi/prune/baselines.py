"""The pruning baselines of Fig 5: Network Slimming, Soft Filter Pruning, Scratch-E, Scratch-B.

Each trains with SGD (momentum, weight decay, step schedule as ``splitlbi train``) on the
data a :class:`~splitlbi.train.TrainConfig` describes and writes an ordinary run
directory (config.json with a ``baseline`` entry, init.pt, metrics.csv, path.csv,
checkpoints/, ``mask.pt``: the mask file of the pruned architecture).

* :func:`slimming` (Liu et al. 2017): train from the model's init (seeded by
  ``config.seed``) with an L1 penalty ``λ·Σ|γ|`` on every BatchNorm scale (``λ·sign(γ)``
  is added to their gradients before each step); then keep the ``keep`` share of the
  BN channels with the largest ``|γ|`` (one global threshold; every BN keeps at least
  its largest channel, the total kept is exactly ``round(keep·channels)``); the filters
  of the convs feeding those BNs form the mask; fine-tune the sparsity-trained weights
  with the mask fixed (:func:`splitlbi.prune.retrain` ``mode="finetune"``). Two run
  directories: the sparsity training (``sparse_out``, default ``<out>_sparse``) and the
  fine-tuned result ``out``.
* :func:`soft_filter_pruning` (He et al. 2018): after every epoch, zero in each conv
  layer the filters with the smallest ℓ2 norms, keeping ``round(keep·filters)`` (≥ 1),
  together with the affine weight and bias of their BatchNorm channel (so the channel
  outputs exactly zero, as in the pruned network; zeroing the conv weights alone leaves
  the channel at the constant ``β − γμ/σ`` of running statistics gathered before the
  zeroing, which cost a ResNet-20 on Fashion-MNIST nearly all its accuracy); zeroed
  filters keep training. Metrics and checkpoints are of the pruned model (the zeroing
  comes before the evaluation); the last zeroed set is the mask.
* :func:`scratch` (Liu et al. 2019): train the masked network (the architecture of a
  mask file) from a fresh random initialization drawn with seed ``config.seed + 1``
  (so it differs from a run trained with ``--seed``), ``config.epochs`` epochs
  (Scratch-E) or ``round(epochs · dense MACs / pruned MACs)`` (Scratch-B), the MACs
  counted by :func:`splitlbi.prune.compact.count_macs_params` on the dense model and on
  :func:`splitlbi.prune.compact.compact_model` 's compact one (filters really removed).

Masks of whole filters are widened into *architecture masks* before training (slimming
fine-tuning, scratch): the conv bias of a dropped filter and the affine weight and bias
of its BatchNorm channel are masked too, so the dropped channel emits exactly zero, as if
removed (the convention of :func:`splitlbi.prune.compact.apply_filter_masks`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from splitlbi.data import canonical_dataset_name
from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.prune.compact import _bn_after, apply_filter_masks, compact_model, count_macs_params
from splitlbi.prune.masks import Masks, apply_masks_, check_not_empty, load_mask_file, mask_sparsity, save_mask_file
from splitlbi.prune.retrain import MASK_FILE, MaskedSGD, ensure_mask_file, retrain
from splitlbi.train import run as run_module
from splitlbi.train import rundir
from splitlbi.train.config import TrainConfig, model_kwargs, resolve_device, validate_config
from splitlbi.train.loop import run_epochs
from splitlbi.train.optimizers import build_scheduler
from splitlbi.train.rundir import holds_run_dirs, lock_run_dir

__all__ = ["BASELINES", "slimming", "soft_filter_pruning", "sparsity_training", "scratch", "scratch_b_epochs",
           "slimming_masks", "smallest_filter_masks", "architecture_masks"]

PathLike = Union[str, "os.PathLike[str]"]
BASELINES: Tuple[str, ...] = ("slimming", "sfp", "scratch-e", "scratch-b")
Say = Callable[[str], None]
#: ``regularizer(model, example_input)`` -> a function called before every optimizer step.
Regularizer = Callable[[nn.Module, Tensor], Callable[[], None]]


class _PenalizedMaskedSGD(MaskedSGD):
    """:class:`MaskedSGD` that first adds ``lam·sign(p)`` to the gradients of ``l1_params`` (L1 penalty)
    and calls ``regularize()`` (which may add any penalty's gradient, e.g. Torch-Pruning's
    ``GroupNormPruner.regularize``)."""

    def __init__(self, params: Iterable[nn.Parameter], masks: Mapping[nn.Parameter, Tensor],
                 l1_params: Iterable[nn.Parameter] = (), lam: float = 0.0,
                 regularize: Optional[Callable[[], None]] = None, **kwargs: Any) -> None:
        super().__init__(params, masks, **kwargs)
        self._l1 = list(l1_params)
        self._lam = float(lam)
        self._regularize = regularize

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        if self._regularize is not None:
            self._regularize()
        if self._lam:
            for parameter in self._l1:
                if parameter.grad is not None:
                    parameter.grad.add_(torch.sign(parameter), alpha=self._lam)
        return super().step(closure)


def _check_keep(keep: float) -> None:
    if not 0.0 < keep <= 1.0:
        raise SplitLBIError(f"--keep must be in (0, 1], got {keep}")


def _convs_with_bn(model: nn.Module, example: Tensor) -> Dict[str, nn.BatchNorm2d]:
    return _bn_after(model, example.to(next(model.parameters()).device))


def architecture_masks(model: nn.Module, masks: Mapping[str, Tensor], example: Tensor) -> Masks:
    """``masks`` plus, for each dropped whole filter of a conv, its bias and its BatchNorm channel's weight and bias."""
    out: Masks = {name: mask.to("cpu", torch.bool) for name, mask in masks.items()}
    bns = _convs_with_bn(model, example)
    modules = dict(model.named_modules())
    bn_names = {id(module): name for name, module in modules.items()}
    for name, module in modules.items():
        mask = out.get(f"{name}.weight")
        if not isinstance(module, nn.Conv2d) or mask is None:
            continue
        kept = mask.flatten(1).any(1)
        if module.bias is not None:
            out[f"{name}.bias"] = out.get(f"{name}.bias", torch.ones_like(kept)) & kept
        bn = bns.get(name)
        if bn is not None and bn.affine:
            prefix = bn_names[id(bn)]
            for suffix in ("weight", "bias"):
                out[f"{prefix}.{suffix}"] = out.get(f"{prefix}.{suffix}", torch.ones_like(kept)) & kept
    return out


def slimming_masks(model: nn.Module, keep: float, example: Tensor) -> Masks:
    """Filter masks of the convs feeding a BatchNorm: keep the ``keep`` share of BN channels with the largest |γ|."""
    _check_keep(keep)
    bns = _convs_with_bn(model, example)
    if not bns:
        raise SplitLBIError("network slimming needs BatchNorm layers after the convs; the model has none")
    names = sorted(bns, key=list(dict(model.named_modules())).index)
    scales = [bns[name].weight.detach().abs().cpu().double() for name in names]
    total = sum(s.numel() for s in scales)
    count = max(len(names), min(total, round(keep * total)))
    chosen = [torch.zeros(s.numel(), dtype=torch.bool) for s in scales]
    for layer, s in enumerate(scales):  # every BN keeps its largest channel
        chosen[layer][int(torch.argmax(s))] = True
    flat = torch.cat(scales)
    taken = torch.cat(chosen)
    flat[taken] = float("inf")  # already kept: sort them first
    order = torch.sort(flat, descending=True, stable=True).indices[:count]
    taken[order] = True
    masks: Masks = {}
    start = 0
    for name, s in zip(names, scales):
        kept = taken[start:start + s.numel()]
        start += s.numel()
        weight = dict(model.named_parameters())[f"{name}.weight"]
        masks[f"{name}.weight"] = kept.view(-1, *([1] * (weight.dim() - 1))).expand(weight.shape).clone()
    return masks


def smallest_filter_masks(model: nn.Module, keep: float) -> Masks:
    """Per conv layer, keep the ``round(keep·filters)`` (≥ 1) filters with the largest ℓ2 norms."""
    _check_keep(keep)
    masks: Masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            weight = module.weight.detach().cpu().double()
            count = max(1, round(keep * weight.shape[0]))
            norms = weight.flatten(1).norm(dim=1)
            mask = torch.zeros(weight.shape, dtype=torch.bool)
            mask[torch.sort(norms, descending=True, stable=True).indices[:count]] = True
            masks[f"{name}.weight"] = mask
    return masks


def _new_run(config: TrainConfig, out: Path, info: Dict[str, Any], *, init_seed: int, masks: Optional[Masks],
             l1_bn: float = 0.0, regularizer: Optional[Regularizer] = None,
             after_epoch: Optional[Callable[[nn.Module, int], Optional[float]]] = None, say: Say,
             ) -> Tuple[Path, nn.Module]:
    """Train ``config.epochs`` epochs of SGD into a new run directory (through
    :func:`splitlbi.train.loop.run_epochs`, the epoch loop of ``splitlbi train``).

    ``masks`` are held fixed (MaskedSGD; widened by :func:`architecture_masks`); ``l1_bn``:
    L1 penalty on the BatchNorm scales; ``regularizer(model, example)`` returns a function
    called after each backward pass, before the step (it adds a penalty's gradient);
    ``after_epoch(model, epoch)`` may change the weights after each epoch (before evaluation)
    and returns the share of weights its masks keep, for the metrics.
    Returns ``(out, model)``.
    """
    dev = resolve_device(config.device)
    data = run_module._load_data(config, dev)
    run_module._seed_everything(init_seed)
    model = create_model(config.model, num_classes=data.facts["num_classes"],
                         in_channels=data.facts["in_channels"], **model_kwargs(config.widths)).to(dev)
    example = data.train_images[:1].float()
    arch: Masks = {}
    if masks is not None:
        arch = architecture_masks(model, masks, example)
        apply_masks_(model, arch)
    bn_scales = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    if l1_bn and not bn_scales:
        raise SplitLBIError(f"network slimming needs BatchNorm layers; model {config.model} has none")
    run_module.check_model_fits(model, data, config)
    run_module._seed_everything(config.seed)
    parameters = dict(model.named_parameters())

    def build() -> Tuple[torch.optim.Optimizer, Any]:
        optimizer = _PenalizedMaskedSGD(
            model.parameters(), {parameters[n]: m.to(device=dev, dtype=parameters[n].dtype) for n, m in arch.items()},
            l1_params=bn_scales, lam=l1_bn, regularize=regularizer(model, example) if regularizer else None,
            lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            nesterov=config.nesterov)
        return optimizer, build_scheduler(config, optimizer)

    kept = mask_sparsity(masks).overall if masks else None
    optimizer, scheduler, start_epoch, history = rundir.start_or_continue(
        out, {**rundir.run_info(config, data.facts), "world_size": 1, "baseline": info}, config, model, build,
        say=say)
    if masks is not None:
        ensure_mask_file(out / MASK_FILE, arch, model=config.model, source=info.get("masks"), kind=info["name"])
    say(f"run directory: {out}")
    run_epochs(out, model, optimizer, scheduler, data, config, start_epoch=start_epoch, history=history, say=say,
               description=info["name"], kept=kept, after_epoch=after_epoch, resumable=False)
    return out, model


def _prepare(config: TrainConfig, outs: Iterable[Path]) -> TrainConfig:
    config = dataclasses.replace(config, optimizer="sgd", sync_bn=False, amp=False, compile=False, tensorboard=False)
    validate_config(config)
    run_module._check_model_name(config.model)
    canonical_dataset_name(config.dataset)
    for out in outs:
        # New, or this baseline's own run to continue (slimming's result is a retrain it amends).
        rundir.check_can_write(out, ("baseline", "retrain"))
    return config


def _say(log: Optional[Say]) -> Say:
    return log if log is not None else (lambda line: None)


@holds_run_dirs
def slimming(config: TrainConfig, out_dir: PathLike, *, keep: float, sparsity_lambda: float = 1e-4,
             finetune_epochs: Optional[int] = None, finetune_lr: Optional[float] = None,
             sparse_out: Optional[PathLike] = None, log: Optional[Say] = print) -> Path:
    """Network Slimming; returns the fine-tuned run directory ``out_dir`` (see the module doc)."""
    say = _say(log)
    _check_keep(keep)
    if not (isinstance(sparsity_lambda, (int, float)) and math.isfinite(sparsity_lambda) and sparsity_lambda >= 0):
        raise SplitLBIError(f"--sparsity-lambda must be a finite number >= 0, got {sparsity_lambda}")
    out = Path(out_dir)
    sparse = Path(sparse_out) if sparse_out is not None else out.with_name(out.name + "_sparse")
    config = _prepare(dataclasses.replace(config, save_every=config.epochs), [out, sparse])
    lock_run_dir(out)  # for the whole job: the fine-tuning below writes it, then its config.json is amended
    small = run_module._load_data(dataclasses.replace(config, limit_train=1, limit_test=1), torch.device("cpu"))
    probe = create_model(config.model, num_classes=small.facts["num_classes"], in_channels=small.facts["in_channels"])
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.modules()):
        raise SplitLBIError(f"network slimming needs BatchNorm layers; model {config.model} has none")
    info = {"name": "slimming", "keep": keep, "sparsity_lambda": sparsity_lambda, "stage": "sparsity training"}
    say(f"slimming: sparsity training ({config.epochs} epochs, λ = {sparsity_lambda:g} on the BN scales)")
    _, model = _new_run(config, sparse, info, init_seed=config.seed, masks=None, l1_bn=sparsity_lambda, say=say)
    example = small.train_images[:1].float()
    masks = slimming_masks(model, keep, example)
    arch = architecture_masks(model, masks, example)
    mask_path = sparse / "slimming_mask.pt"
    ensure_mask_file(mask_path, arch, model=config.model, epoch=config.epochs, source=sparse, kind="slimming")
    sparsity = mask_sparsity(masks)
    say(f"slimming: kept {sum(sparsity.filters_kept.values())}/{sum(sparsity.filters_total.values())} BN channels; "
        f"fine-tuning")
    retrain(sparse, out, mode="finetune", epoch=config.epochs, masks=mask_path,
            epochs=finetune_epochs if finetune_epochs is not None else config.epochs,
            lr=finetune_lr if finetune_lr is not None else config.lr, lr_milestones=config.lr_milestones,
            lr_gamma=config.lr_gamma, batch_size=config.batch_size, momentum=config.momentum,
            weight_decay=config.weight_decay, seed=config.seed, device=config.device, progress=config.progress,
            log=say)
    stored = rundir.read_run_config(out)
    stored["baseline"] = {**info, "stage": "fine-tuned", "sparse_run": str(sparse)}
    rundir.write_json(out / rundir.CONFIG_FILE, stored)
    return out


@holds_run_dirs
def sparsity_training(config: TrainConfig, out_dir: PathLike, *, bn_l1: float = 0.0,
                      regularizer: Optional[Regularizer] = None, name: str = "sparsity",
                      log: Optional[Say] = print) -> Path:
    """Train ``config.epochs`` epochs of SGD from the model's init (seeded by ``config.seed``, as
    ``splitlbi train`` draws it) with a sparsity penalty; return the run directory.

    ``bn_l1``: Network Slimming's ``λ·Σ|γ|`` on the BatchNorm scales (what :func:`slimming`
    trains with); ``regularizer(model, example)``: any other penalty, returning a function
    that adds its gradient before each step (e.g. DepGraph's group-norm regularization,
    ``torch_pruning.pruner.GroupNormPruner(...).regularize``). Pruning and fine-tuning are
    left to the caller (e.g. a budget mask and :func:`splitlbi.prune.retrain`).
    """
    say = _say(log)
    out = Path(out_dir)
    config = _prepare(config, [out])
    info = {"name": name, "bn_l1": bn_l1, "regularizer": getattr(regularizer, "__name__", None),
            "stage": "sparsity training"}
    _new_run(config, out, info, init_seed=config.seed, masks=None, l1_bn=bn_l1, regularizer=regularizer, say=say)
    return out


@holds_run_dirs
def soft_filter_pruning(config: TrainConfig, out_dir: PathLike, *, keep: float,
                        log: Optional[Say] = print) -> Path:
    """Soft Filter Pruning; returns the run directory (see the module doc)."""
    say = _say(log)
    _check_keep(keep)
    out = Path(out_dir)
    config = _prepare(config, [out])

    example = run_module._load_data(dataclasses.replace(config, limit_train=1, limit_test=1),
                                    torch.device("cpu")).train_images[:1].float()

    last: Dict[str, Masks] = {}

    def zero_smallest(model: nn.Module, epoch: int) -> Optional[float]:
        masks = smallest_filter_masks(model, keep)
        apply_filter_masks(model, masks, example.to(next(model.parameters()).device))
        last["masks"] = masks
        return mask_sparsity(masks).overall if masks else None

    info = {"name": "sfp", "keep": keep}
    _, model = _new_run(config, out, info, init_seed=config.seed, masks=None, after_epoch=zero_smallest, say=say)
    if "masks" not in last:
        # Continued after its last epoch: the zeroing is idempotent, so the last epoch's set comes back.
        zero_smallest(model, config.epochs)
    ensure_mask_file(out / MASK_FILE, last["masks"], model=config.model, epoch=config.epochs, source=out, kind="sfp")
    return out


def scratch_b_epochs(model: nn.Module, masks: Mapping[str, Tensor], epochs: int, example: Tensor,
                     ) -> Tuple[int, int, int]:
    """``(epochs_B, dense MACs, pruned MACs)``: ``round(epochs · dense / pruned)`` (≥ 1), MACs of the compact model."""
    dense, _ = count_macs_params(model, example)
    compact, _ = compact_model(model, masks, example, measure=False)
    pruned, _ = count_macs_params(compact, example)
    return max(1, round(epochs * dense / max(pruned, 1))), dense, pruned


@holds_run_dirs
def scratch(config: TrainConfig, out_dir: PathLike, *, masks: Optional[PathLike], budget: str = "E",
            log: Optional[Say] = print, allow_empty_mask: bool = False) -> Path:
    """Scratch-E (``budget="E"``) or Scratch-B (``"B"``); returns the run directory (see the module doc)."""
    say = _say(log)
    if masks is None:
        raise SplitLBIError(f"scratch-{budget.lower()} needs --masks FILE (the pruned architecture)")
    if budget not in ("E", "B"):
        raise SplitLBIError(f"unknown scratch budget {budget!r} (E or B)")
    out = Path(out_dir)
    config = _prepare(config, [out])
    info: Dict[str, Any] = {"name": f"scratch-{budget.lower()}", "masks": str(masks), "init_seed": config.seed + 1,
                            "epochs_e": config.epochs}
    data = run_module._load_data(dataclasses.replace(config, limit_train=1, limit_test=1), torch.device("cpu"))
    probe = create_model(config.model, num_classes=data.facts["num_classes"], in_channels=data.facts["in_channels"],
                         **model_kwargs(config.widths))
    mask_dict = load_mask_file(masks, probe)
    check_not_empty(mask_dict, f"the masks in {masks}", allow_empty_mask)
    if budget == "B":
        example = data.train_images[:1].float()
        conv_masks = {n: m for n, m in mask_dict.items() if m.dim() == 4}
        epochs_b, dense, pruned = scratch_b_epochs(probe, conv_masks, config.epochs, example)
        info.update(epochs=epochs_b, dense_macs=dense, pruned_macs=pruned, flops="compact model MACs")
        say(f"scratch-b: dense {dense} MACs, pruned {pruned} MACs: {config.epochs} × {dense / pruned:.3f} "
            f"→ {epochs_b} epochs")
        config = dataclasses.replace(config, epochs=epochs_b)
    else:
        info["epochs"] = config.epochs
    config = dataclasses.replace(config, save_every=min(config.save_every, config.epochs))
    _new_run(config, out, info, init_seed=config.seed + 1, masks=mask_dict, say=say)
    return out
