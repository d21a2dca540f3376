"""Evaluate or retrain a sparse sub-network with its mask held fixed.

Three modes (SPEC.md, Fig 5 and Fig 7):

* ``prune``: ``W_K`` (the checkpoint of epoch ``K``) projected onto the mask, evaluated
  without any training (the "sparse model" of the path).
* ``finetune`` ("F-epoch K"): start from ``W_K`` masked and train with SGD, mask fixed.
* ``lottery``: reset to the run's ``init.pt``, apply the mask, train with SGD, mask fixed.

The mask is the support of Γ at epoch ``K`` (``masks/epoch_XXXX.pt``) unless a mask file
is given (e.g. magnitude masks for *SGD (Lottery)*). Training uses :class:`MaskedSGD`:
masked gradients are zeroed before each step and the mask is re-applied after it, so
masked weights stay exactly zero whatever momentum or weight decay do.

The result is an ordinary run directory (config.json with a ``retrain`` entry, init.pt =
the masked starting weights, metrics.csv, path.csv, checkpoints/, and ``mask.pt``, the
mask file used). An interrupted retraining continues when the same command is given
again (same source, mode, epoch, mask and settings; a larger ``epochs`` extends it) and
ends as an uninterrupted one would (:func:`splitlbi.train.rundir.start_or_continue`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from splitlbi.data import canonical_dataset_name, normalize
from splitlbi.errors import SplitLBIError
from splitlbi.prune.masks import (
    Masks, apply_masks_, check_not_empty, load_mask_file, load_run_masks, mask_sparsity, read_mask_file,
    save_mask_file, validate_masks,
)
from splitlbi.train import run as run_module
from splitlbi.train import rundir
from splitlbi.train.config import resolve_device, validate_config
from splitlbi.train.loop import evaluate, run_epochs
from splitlbi.train.optimizers import build_scheduler
from splitlbi.train.rundir import INIT_FILE, holds_run_dirs, list_checkpoints, load_checkpoint, read_run_config

__all__ = ["RETRAIN_MODES", "MASK_FILE", "MaskedSGD", "retrain", "ensure_mask_file"]

PathLike = Union[str, "os.PathLike[str]"]

RETRAIN_MODES: Tuple[str, ...] = ("prune", "finetune", "lottery")
#: The mask file a retraining run directory keeps (the mask it was trained with).
MASK_FILE = "mask.pt"


class MaskedSGD(torch.optim.SGD):
    """SGD whose masked weights stay exactly zero.

    ``masks`` maps each parameter (the tensor object) to its bool mask. Each
    :meth:`step` zeroes the masked gradient entries, takes the SGD step (momentum,
    weight decay, Nesterov as usual) and multiplies the weights by their mask again.
    """

    def __init__(self, params: Iterable[nn.Parameter], masks: Mapping[nn.Parameter, Tensor], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._masks = [(parameter, mask) for parameter, mask in masks.items()]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        for parameter, mask in self._masks:
            if parameter.grad is not None:
                parameter.grad.mul_(mask)
        loss = super().step(closure)
        for parameter, mask in self._masks:
            parameter.mul_(mask)
        return loss


def _checkpoint_epochs_text(run_dir: Path) -> str:
    epochs = list(list_checkpoints(run_dir))
    return ", ".join(map(str, epochs)) if epochs else "none"


def ensure_mask_file(path: Path, masks: Mapping[str, Tensor], **details: Any) -> None:
    """Write the mask file ``path`` (:func:`save_mask_file`) unless it already holds exactly
    ``masks``: a continued run keeps the file it wrote, a missing or damaged one is written."""
    try:
        saved = read_mask_file(path)["masks"]
    except SplitLBIError:
        saved = None
    if saved is not None and saved.keys() == masks.keys() and all(
            torch.equal(saved[name], mask.to("cpu", torch.bool)) for name, mask in masks.items()):
        return
    save_mask_file(path, masks, **details)


@holds_run_dirs
def retrain(
    run_dir: PathLike,
    out_dir: PathLike,
    *,
    mode: str,
    epoch: Optional[int] = None,
    masks: Union[None, PathLike, Mapping[str, Tensor]] = None,
    epochs: int = 20,
    lr: float = 0.01,
    lr_milestones: Sequence[int] = (),
    lr_gamma: float = 0.1,
    batch_size: Optional[int] = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    save_every: Optional[int] = None,
    progress: bool = False,
    allow_empty_mask: bool = False,
    log: Optional[Callable[[str], None]] = print,
) -> Path:
    """Evaluate (``mode="prune"``) or retrain (``"finetune"``, ``"lottery"``) a masked
    sub-network of the run in ``run_dir``; write a new run directory at ``out_dir``.

    Args:
        epoch: ``K``: the epoch whose support of Γ is the mask (unless ``masks`` is given)
            and, for ``prune``/``finetune``, whose checkpoint gives the weights (it must
            have been kept by ``--save-every``). ``lottery`` with ``masks`` needs no epoch.
        masks: a mask file path or a ``{name: bool mask}`` dict overriding the mask source.
        epochs, lr, ...: the SGD retraining settings (``prune`` ignores them); the data
            settings (dataset, limits, split, padding, augmentation) are the run's.
        batch_size: default: the run's.
        allow_empty_mask: accept a mask that keeps no weight (refused by default).

    Returns:
        ``out_dir`` as a Path.
    """
    say = log if log is not None else (lambda line: None)
    run_dir, out = Path(run_dir), Path(out_dir)
    if mode not in RETRAIN_MODES:
        raise SplitLBIError(f"unknown retrain mode {mode!r} (choose from {', '.join(RETRAIN_MODES)})")
    if epoch is None and (masks is None or mode != "lottery"):
        raise SplitLBIError(f"--mode {mode} needs --epoch" + ("" if mode != "lottery" else " or --masks"))
    info = read_run_config(run_dir)
    source = rundir.train_config_from_info(info)
    model = rundir.create_run_model(info)

    # The mask.
    if masks is None:
        mask_dict: Masks = load_run_masks(run_dir, epoch)  # type: ignore[arg-type]
        validate_masks(mask_dict, model, where=f"the masks of {run_dir} epoch {epoch}")
        mask_source = f"{run_dir} epoch {epoch}"
    elif isinstance(masks, Mapping):
        mask_dict = {name: mask.to("cpu", torch.bool) for name, mask in masks.items()}
        validate_masks(mask_dict, model)
        mask_source = "given masks"
    else:
        mask_dict = load_mask_file(masks, model)
        mask_source = str(masks)

    check_not_empty(mask_dict, f"the masks ({mask_source})", allow_empty_mask)

    # The starting weights.
    if mode in ("prune", "finetune"):
        if epoch not in list_checkpoints(run_dir):
            raise SplitLBIError(f"{run_dir} kept no checkpoint of epoch {epoch} (--mode {mode} starts from W_{epoch}); "
                                f"kept epochs: {_checkpoint_epochs_text(run_dir)}")
        state = load_checkpoint(run_dir, epoch)["model"]
    else:
        state = rundir.torch_load(run_dir / INIT_FILE, "cpu")
    model.load_state_dict(state)

    config = dataclasses.replace(
        source, optimizer="sgd", lr=lr, momentum=momentum, nesterov=False, weight_decay=weight_decay,
        epochs=epochs if mode != "prune" else 0, batch_size=source.batch_size if batch_size is None else batch_size,
        lr_milestones=tuple(lr_milestones), lr_gamma=lr_gamma, schedule="step", seed=seed, device=device,
        save_every=save_every if save_every is not None else max(epochs, 1), progress=progress,
        sync_bn=False, amp=False, compile=False, tensorboard=False)
    validate_config(dataclasses.replace(config, epochs=max(config.epochs, 1)))
    canonical_dataset_name(config.dataset)
    rundir.check_can_write(out, ("retrain",))

    dev = resolve_device(device)
    data = run_module._load_data(config, dev)
    rundir.check_same_dataset(run_dir, info, data.facts)
    run_module._seed_everything(seed)
    model = model.to(dev)
    run_module.check_model_fits(model, data, config)
    apply_masks_(model, mask_dict)
    parameters = dict(model.named_parameters())
    device_masks = {parameters[name]: mask.to(device=dev, dtype=parameters[name].dtype)
                    for name, mask in mask_dict.items()}

    def build() -> Tuple[torch.optim.Optimizer, Any]:
        optimizer = MaskedSGD(model.parameters(), device_masks, lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
        return optimizer, build_scheduler(config, optimizer)

    kept = mask_sparsity(mask_dict).overall
    retrain_info = {"mode": mode, "source": str(run_dir), "epoch": epoch, "masks": mask_source,
                    "kept": kept, "source_optimizer": source.optimizer}
    optimizer, scheduler, start_epoch, history = rundir.start_or_continue(
        out, {**rundir.run_info(config, data.facts), "world_size": 1, "retrain": retrain_info}, config, model,
        build, say=say)
    ensure_mask_file(out / MASK_FILE, mask_dict, model=info["model"], epoch=epoch, source=run_dir)
    say(f"run directory: {out}")
    say(f"{mode}: {info['model']} from {run_dir} ({'init' if mode == 'lottery' else f'epoch {epoch}'}), "
        f"mask {mask_source}, {100.0 * kept:.2f}% of the masked weights kept")

    if mode == "prune":
        if 0 in rundir.csv_epochs(history.metrics):
            say(f"{out} holds the pruned model's evaluation already")
            return out
        # The network a user gets: the filters outside the mask removed for real (compact_model).
        from splitlbi.prune.compact import compact_model

        started = time.perf_counter()
        filters = {name: mask for name, mask in mask_dict.items() if mask.dim() == 4}
        example = normalize(data.test_images[:1], data.mean, data.std).cpu()
        compact, _ = compact_model(model.cpu(), filters, example, measure=False)
        model.to(dev)
        test = evaluate(compact.to(dev), data.test_images, data.test_labels, batch_size=config.eval_batch_size,
                        mean=data.mean, std=data.std)
        metrics = {"epoch": 0, "lr": None, "train_loss": None, "train_acc": None, "test_loss": test.loss,
                   "test_acc": test.accuracy, "sparse_test_acc": test.accuracy, "gamma_nonzero_share": kept,
                   "epoch_seconds": time.perf_counter() - started}
        rundir.write_epoch(out, history, metrics, model, optimizer, scheduler, [rundir.rng_state()], keep=True)
        say(f"pruned model (no training): test loss {test.loss:.4f} acc {test.accuracy:6.2f}%")
        return out

    run_epochs(out, model, optimizer, scheduler, data, config, start_epoch=start_epoch, history=history, say=say,
               description=mode, kept=kept, resumable=False)
    return out
