"""A training run on disk: create or resume a run directory, train epoch by epoch, checkpoint.

Layout of a run directory (all writes atomic or append-then-fsync, so a run killed at
any moment can be resumed with ``--resume`` and finishes with the same weights)::

    config.json                  settings, dataset facts, model, versions (see read_run_config)
    metrics.csv                  one row per epoch, METRICS_COLUMNS
    path.csv                     one row per epoch x layer x filter, PATH_COLUMNS; epoch 0 = init
                                 (runs written before v_norm existed have the first six columns)
    init.pt                      the initial model state_dict (for lottery retraining)
    checkpoints/epoch_XXXX.pt    every --save-every epochs and the final epoch
    checkpoints/last.pt          always the latest epoch (epoch 0 right after creation)
    masks/epoch_XXXX.pt          SplitLBI runs: optimizer.masks() (support of Γ) per epoch
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

import splitlbi
from splitlbi.data import canonical_dataset_name, load_dataset
from splitlbi.data.augment import augment_generator, train_transform
from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model, is_model, list_models
from splitlbi.train import distributed
from splitlbi.train.config import RESUME_OVERRIDABLE_FIELDS, TrainConfig, resolve_device, validate_config
from splitlbi.train.loop import NonFiniteError, epoch_generator, evaluate, train_one_epoch
from splitlbi.train.rundir import (
    LOCK_FILE, RunHistory, check_not_busy, holds_run_dirs, is_empty_run_dir, lock_run_dir, csv_epochs, epoch_from_name, newest_valid_checkpoint, remove_stale_temporaries,
    restore_table, set_aside, validate_checkpoint,
)
from splitlbi.optim import SplitLBI
from splitlbi.optim import penalties as _penalties
from splitlbi.train.optimizers import build_optimizer, build_scheduler
from splitlbi.utils.io import atomic_torch_save, atomic_write_text, fsync_directory

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "PATH_FILE", "INIT_FILE", "CHECKPOINT_DIR", "LAST_CHECKPOINT", "MASK_DIR",
    "METRICS_COLUMNS", "PATH_COLUMNS",
    "run_training", "read_run_config", "read_train_config", "list_checkpoints", "load_checkpoint",
    "load_masks", "load_model_from_run", "filter_path_rows",
]

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
PATH_FILE = "path.csv"
INIT_FILE = "init.pt"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
MASK_DIR = "masks"
RUN_FORMAT = 1

METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                   "sparse_test_acc", "sparsity", "epoch_seconds")
PATH_COLUMNS = ("epoch", "layer", "filter", "w_norm", "gamma_norm", "in_support", "v_norm")

EpochCallback = Callable[[int, Dict[str, Any]], None]


def epoch_file_name(epoch: int) -> str:
    """``epoch_0007.pt``: the file name of epoch ``epoch`` under checkpoints/ and masks/."""
    return f"epoch_{epoch:04d}.pt"


# --------------------------------------------------------------------------- reading runs


def read_run_config(run_dir: PathLike) -> Dict[str, Any]:
    """The parsed ``config.json`` of a run: one flat dict.

    Keys: every :class:`TrainConfig` field (``model`` is the model name, ``dataset`` the
    dataset name, ``optimizer``, ``lr``, ``kappa``, ``nu``, ``seed``, ``epochs``, ...);
    the dataset facts ``num_classes``, ``in_channels`` (with ``model``: the arguments of
    ``create_model``), ``image_size``, ``mean``, ``std``, ``train_size``, ``test_size``,
    ``dataset_description``; and ``format``, ``versions`` (splitlbi, torch, numpy,
    python), ``created``, ``resumed`` (one entry per resume), ``world_size`` (processes
    that trained it under torchrun; absent in runs made before it was recorded: 1).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise SplitLBIError(f"{run_dir} is not a splitlbi run directory (no {CONFIG_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or not UTF-8
        raise SplitLBIError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict):
        raise SplitLBIError(f"{path} is not a run's config (a JSON {type(info).__name__}, not an object)")
    return info


def read_train_config(run_dir: PathLike) -> TrainConfig:
    """The :class:`TrainConfig` a run was started with (epochs as extended by resumes)."""
    return _train_config_from_info(read_run_config(run_dir))


# Settings whose default changed after runs were written without them: such runs used these values.
_DEFAULTS_OF_OLDER_RUNS = {"linear_penalty": "auto"}


def _train_config_from_info(info: Dict[str, Any]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({**_DEFAULTS_OF_OLDER_RUNS, **{key: value for key, value in info.items() if key in names}})


def list_checkpoints(run_dir: PathLike) -> Dict[int, Path]:
    """Epoch -> path of each kept ``checkpoints/epoch_XXXX.pt``, in epoch order."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("epoch_*.pt"):
        try:
            found[int(path.stem.split("_", 1)[1])] = path
        except ValueError:
            continue
    return dict(sorted(found.items()))


def _torch_load(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        raise SplitLBIError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise SplitLBIError(f"cannot read {path}: {str(error) or type(error).__name__} "
                            f"(a damaged or truncated file?)") from None


def load_checkpoint(run_dir: PathLike, epoch: Optional[int] = None, map_location: Any = "cpu") -> Dict[str, Any]:
    """A checkpoint dict: ``epoch``, ``model``, ``optimizer``, ``scheduler``, ``rng``, ``format``.

    ``epoch=None`` loads ``checkpoints/last.pt``; otherwise ``checkpoints/epoch_XXXX.pt``
    (only epochs kept by ``--save-every``, plus the final one, exist).
    """
    name = LAST_CHECKPOINT if epoch is None else epoch_file_name(epoch)
    path = Path(run_dir) / CHECKPOINT_DIR / name
    checkpoint = _torch_load(path, map_location)
    if not isinstance(checkpoint, dict) or not {"epoch", "model"} <= checkpoint.keys():
        raise SplitLBIError(f"{path} is not a training checkpoint (no 'epoch' and 'model' entries)")
    return checkpoint


def load_masks(run_dir: PathLike, epoch: int) -> Dict[str, Tensor]:
    """Support of Γ at the end of ``epoch`` (SplitLBI runs): param name -> BoolTensor shaped like W."""
    return _torch_load(Path(run_dir) / MASK_DIR / epoch_file_name(epoch), "cpu")


def load_model_from_run(run_dir: PathLike, weights: Union[int, str] = "last", map_location: Any = "cpu") -> nn.Module:
    """Recreate a run's model from ``config.json`` and load weights into it.

    Args:
        weights: ``"last"`` (latest checkpoint), ``"init"`` (``init.pt``) or an epoch
            number with a kept checkpoint.
    """
    info = read_run_config(run_dir)
    model = create_model(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"])
    if weights == "init":
        state = _torch_load(Path(run_dir) / INIT_FILE, map_location)
    elif weights == "last":
        state = load_checkpoint(run_dir, None, map_location)["model"]
    elif isinstance(weights, int):
        state = load_checkpoint(run_dir, weights, map_location)["model"]
    else:
        raise SplitLBIError(f"weights must be 'last', 'init' or an epoch number, got {weights!r}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise SplitLBIError(f"the weights ({weights}) in {run_dir} do not fit its {info['model']}: "
                            f"{' '.join(str(error).split())[:300]}") from None
    return model.to(map_location) if map_location is not None else model


# --------------------------------------------------------------------------- data and model


class _Data(NamedTuple):
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: Sequence[float]
    std: Sequence[float]
    facts: Dict[str, Any]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _load_data(config: TrainConfig, device: torch.device) -> _Data:
    splits = load_dataset(config.dataset, config.data_dir, train_split=config.train_split, pad_to=config.pad_to)
    train_images, train_labels = splits.train.images[:config.limit_train], splits.train.labels[:config.limit_train]
    test_images, test_labels = splits.test.images[:config.limit_test], splits.test.labels[:config.limit_test]
    facts = {
        "num_classes": int(splits.num_classes),
        "in_channels": int(splits.in_channels),
        "image_size": _jsonable(splits.image_size),
        "mean": _jsonable(splits.mean),
        "std": _jsonable(splits.std),
        "train_size": int(train_images.shape[0]),
        "test_size": int(test_images.shape[0]),
        "dataset_description": splits.description,
    }
    return _Data(train_images.to(device), train_labels.to(device), test_images.to(device), test_labels.to(device),
                 splits.mean, splits.std, facts)


def _check_model_name(name: str) -> None:
    if not is_model(name):
        raise SplitLBIError(f"unknown model {name!r} (choose from {', '.join(list_models())})")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed)
    random.seed(seed)


def _rng_state() -> Dict[str, Any]:
    numpy_state: Any = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # Stored as plain tensors/numbers so checkpoints load with weights_only=True.
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; be lenient in case a serializer turned them into lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


# --------------------------------------------------------------------------- rows


def _layer_name(parameter_name: str) -> str:
    return parameter_name[: -len(".weight")] if parameter_name.endswith(".weight") else parameter_name


def _number(value: Optional[float], spec: str = ".6g") -> str:
    return "" if value is None else format(value, spec)


def filter_path_rows(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> List[List[str]]:
    """The path.csv rows of one epoch: ``[epoch, layer, filter, w_norm, gamma_norm, in_support, v_norm]``.

    SplitLBI: every coupled parameter, with the ℓ2 norms of each output filter of W and
    of Γ, whether the filter is in the support of Γ, and ``v_norm``, the norm of the
    filter's ``V`` that the penalty compares with ``λ`` (ℓ2 for group/neuron, the largest
    ``|V|`` of the row for l1; ``v_norm / λ`` is the path score of
    :meth:`SplitLBI.path_scores`, written with 9 digits so it reads back exactly in
    float32). Other optimizers: the weights of conv (4-D) and linear (2-D) layers, with
    the Γ and V columns empty.
    """
    rows: List[List[str]] = []
    if isinstance(optimizer, SplitLBI):
        weight_norms = optimizer.filter_norms("weight")
        gamma_norms = optimizer.filter_norms("gamma")
        support = optimizer.filter_support()
        v_norms = {c.name: _penalties.filter_dual_norms(c.v, c.penalty) for c in optimizer.named_coupled()}
        for name, norms in weight_norms.items():
            layer = _layer_name(name)
            columns = zip(norms.tolist(), gamma_norms[name].tolist(), support[name].tolist(), v_norms[name].tolist())
            rows.extend([str(epoch), layer, str(index), _number(w), _number(g), str(int(s)), _number(v, ".9g")]
                        for index, (w, g, s, v) in enumerate(columns))
    else:
        for name, parameter in model.named_parameters():
            if parameter.dim() not in (2, 4):
                continue
            norms = parameter.detach().flatten(1).norm(dim=1).tolist()
            layer = _layer_name(name)
            rows.extend([str(epoch), layer, str(index), _number(w), "", "", ""] for index, w in enumerate(norms))
    return rows


def _metrics_row(metrics: Dict[str, Any]) -> List[str]:
    return [str(metrics["epoch"]), _number(metrics["lr"]), _number(metrics["train_loss"]),
            _number(metrics["train_acc"], ".4f"), _number(metrics["test_loss"]), _number(metrics["test_acc"], ".4f"),
            _number(metrics["sparse_test_acc"], ".4f"), _number(metrics["sparsity"]),
            _number(metrics["epoch_seconds"], ".3f")]


def _append_rows(path: Path, rows: Iterable[Sequence[str]]) -> str:
    """Append ``rows`` to the CSV file at ``path`` (fsynced); return the text appended."""
    # Values never contain commas or quotes (numbers, module names), so plain joins are valid CSV.
    text = "".join(",".join(row) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return text


def _file_columns(path: Path, default: Sequence[str]) -> Sequence[str]:
    """The columns of a CSV file's header line; ``default`` when it has none (new or empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline().strip()
    except (FileNotFoundError, UnicodeDecodeError):  # missing or damaged: rebuilt or refused by the caller
        return default
    return tuple(first.split(",")) if first else default


def _truncate_rows_after(path: Path, epoch: int, columns: Sequence[str]) -> None:
    """Keep the header and the complete rows of epochs <= ``epoch``: undo a crash's half-epoch."""
    header = ",".join(columns)
    try:
        lines = path.read_text(encoding="utf-8").split("\n") if path.exists() else [""]
    except UnicodeDecodeError:
        raise SplitLBIError(f"{path} is not UTF-8 text; restore it or start a new run") from None
    # The piece after the last newline is empty, or a row cut short by a crash: dropped.
    complete = lines[:-1]
    kept = [header]
    for line in complete[1:]:
        try:
            row_epoch = int(line.split(",", 1)[0])
        except ValueError:
            continue
        if row_epoch <= epoch and line.count(",") == len(columns) - 1:
            kept.append(line)
    atomic_write_text(path, "\n".join(kept) + "\n")


def _restore_rows(path: Path, saved: Optional[str], first: int, last: int, columns: Sequence[str],
                  say: Callable[[str], None]) -> str:
    """Bring the CSV file at ``path`` back to epoch ``last`` on resume; return its text.

    From the checkpoint's copy ``saved`` (rebuilding lost rows) unless there is none
    (older checkpoints) or the file keeps an older, narrower header (a run written before
    a column was added, e.g. path.csv's v_norm): then the file's own rows after ``last``
    are dropped and its rows ``first..last`` must all be there.
    """
    if saved is not None:
        saved_columns = saved.split("\n", 1)[0].split(",")
        on_disk = list(_file_columns(path, saved_columns))
        older = on_disk != saved_columns and on_disk == saved_columns[:len(on_disk)]
        if not older:
            restore_table(path, saved, say)
            return saved
    # A run written before path.csv had v_norm keeps its six columns.
    _truncate_rows_after(path, last, _file_columns(path, columns))
    return _require_rows(path, first, last)


def _require_rows(path: Path, first: int, last: int) -> str:
    """The text of ``path`` if it has rows for every epoch ``first..last``; else refuse.

    For checkpoints of older versions, which hold no history to rebuild the file from.
    """
    text = path.read_text(encoding="utf-8")
    missing = sorted(set(range(first, last + 1)) - set(csv_epochs(text)))
    if missing:
        raise SplitLBIError(f"{path} lacks the rows of epoch(s) {', '.join(map(str, missing[:5]))}"
                            f"{' ...' if len(missing) > 5 else ''} and the checkpoint (from an older splitlbi) holds "
                            f"no copy to rebuild it from; restore the file or start a new run")
    return text


# --------------------------------------------------------------------------- run directory


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise SplitLBIError(f"--out {run_dir} exists and is not a directory")
    if distributed.is_main_process():  # under torchrun the other ranks would see rank 0's own lock
        check_not_busy(run_dir)  # a writer at work there: name it rather than what it has written so far
    if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise SplitLBIError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                            f"or choose another --out")
    if run_dir.exists() and not is_empty_run_dir(run_dir):
        raise SplitLBIError(f"--out {run_dir} exists and is not empty; choose a new or empty directory")


def open_run_dir(run_dir: Path, *, new: bool, say: Callable[[str], None]) -> None:
    """Take ``run_dir`` for writing: its lock (:func:`~splitlbi.train.rundir.lock_run_dir`,
    held until the enclosing command returns), the stale temporaries of killed writes
    removed, and for a new run the check that it is empty. Under torchrun only rank 0
    (the writer) does this."""
    if not distributed.is_main_process():
        return
    had_lock_file = (run_dir / LOCK_FILE).exists()
    # The lock first: a second writer learns who holds the directory, not what is in it.
    lock_run_dir(run_dir, create=new)
    removed = remove_stale_temporaries(run_dir)
    if removed:
        say(f"removed {len(removed)} temporary file(s) left by an interrupted write in {run_dir}")
    if new:
        try:
            _check_new_run_dir(run_dir)
        except SplitLBIError:
            if not had_lock_file:  # leave someone else's folder as it was
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
            raise


def _merge_resume_config(run_dir: Path, stored: TrainConfig, requested: Optional[TrainConfig]) -> TrainConfig:
    if requested is None:
        return stored
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUME_OVERRIDABLE_FIELDS and getattr(requested, f.name) != getattr(stored, f.name)]
    if changed:
        options = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise SplitLBIError(f"cannot change {options} when resuming {run_dir}: its {CONFIG_FILE} fixes them "
                            f"(only {', '.join(sorted(RESUME_OVERRIDABLE_FIELDS))} may change)")
    return dataclasses.replace(stored, **{name: getattr(requested, name) for name in RESUME_OVERRIDABLE_FIELDS})


def _versions() -> Dict[str, str]:
    return {"splitlbi": splitlbi.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_info(config: TrainConfig, facts: Dict[str, Any]) -> Dict[str, Any]:
    # Flat on purpose: readers (plots) get model/num_classes/in_channels/image_size/mean/std
    # and the hyperparameters without knowing any nesting.
    return {"format": RUN_FORMAT, **config.to_dict(), **facts, "versions": _versions(), "created": _now(),
            "resumed": []}


def _write_json(path: Path, value: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _save_checkpoint(run_dir: Path, state: Dict[str, Any], keep_epoch_file: bool) -> None:
    directory = run_dir / CHECKPOINT_DIR
    last = directory / LAST_CHECKPOINT
    if not keep_epoch_file:
        atomic_torch_save(state, last)
        return
    epoch_path = directory / epoch_file_name(state["epoch"])
    atomic_torch_save(state, epoch_path)
    # last.pt becomes a second name of the same file (no second copy on disk), swapped in atomically.
    temporary = directory / f".{LAST_CHECKPOINT}.link.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(epoch_path, temporary)
    except OSError:  # file systems without hard links
        shutil.copyfile(epoch_path, temporary)
    os.replace(temporary, last)
    fsync_directory(directory)


def _remove_epoch_files_after(directory: Path, epoch: int) -> None:
    for path in directory.glob("epoch_*.pt"):
        try:
            if int(path.stem.split("_", 1)[1]) > epoch:
                path.unlink()
        except ValueError:
            continue


def _summary_line(metrics: Dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {metrics['epoch']:>3}/{epochs}", f"lr {metrics['lr']:.4g}",
             f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:6.2f}%",
             f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:6.2f}%"]
    if metrics["sparsity"] is not None:
        parts.append(f"sparse acc {metrics['sparse_test_acc']:6.2f}%")
        parts.append(f"sparsity {100.0 * metrics['sparsity']:6.2f}%")
    parts.append(f"{metrics['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def _check_same_dataset(run_dir: Path, stored: Dict[str, Any], current: Dict[str, Any]) -> None:
    # A different dataset would silently break "same weights as an uninterrupted run".
    for key in ("num_classes", "in_channels", "train_size", "test_size"):
        if key in stored and stored[key] != current[key]:
            raise SplitLBIError(f"the dataset differs from the one {run_dir} was trained on "
                                f"({key}: {stored[key]} then, {current[key]} now)")


def run_training(
    config: Optional[TrainConfig],
    out_dir: PathLike,
    resume: bool = False,
    *,
    log: Optional[Callable[[str], None]] = print,
    on_epoch_end: Optional[EpochCallback] = None,
) -> Path:
    """Train a model as ``config`` says, writing a run directory at ``out_dir``; return its path.

    Args:
        config: the run's settings. With ``resume=True`` it may be ``None`` (use the
            stored ``config.json``); otherwise it must equal the stored settings except
            for ``RESUME_OVERRIDABLE_FIELDS`` (e.g. a larger ``epochs`` extends the run).
        out_dir: the run directory; for a new run it must not exist or be empty.
        resume: continue the run in ``out_dir`` from ``checkpoints/last.pt``. The result
            is bitwise identical (on CPU) to an uninterrupted run.
        log: receives the human-readable progress lines (``None``: silent).
        on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` after each epoch's files
            and checkpoint are written; ``metrics`` has the metrics.csv columns as keys.

    Under ``torchrun`` (``WORLD_SIZE > 1``, or a process group the caller initialized)
    every process calls this with the same arguments: the model trains in
    DistributedDataParallel with ``config.batch_size`` images per process, rank 0 alone
    writes the run directory and calls ``log`` and ``on_epoch_end``, and every rank
    resumes from ``checkpoints/last.pt`` (see docs/distributed.md).

    Raises:
        SplitLBIError: invalid settings, unusable run directory, missing or corrupt data.
    """
    try:
        run_dir = _run_training(config, out_dir, resume, log=log, on_epoch_end=on_epoch_end)
    except BaseException:
        distributed.shutdown(success=False)
        raise
    distributed.shutdown()  # only a process group that run_training itself created
    return run_dir


def _silent(line: str) -> None:
    pass


def _check_speed_options(config: TrainConfig, context: distributed.DistributedContext, device: torch.device,
                         say: Callable[[str], None]) -> None:
    if config.amp:
        if device.type != "cuda":
            raise SplitLBIError(f"--amp needs CUDA (bfloat16 autocast; on the CPU it is slower than float32), "
                                f"but this run is on {device}")
        if not torch.cuda.is_bf16_supported():
            raise SplitLBIError(f"--amp: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if config.sync_bn:
        if context.enabled and device.type != "cuda":
            raise SplitLBIError("--sync-bn needs CUDA devices: SyncBatchNorm does not run on the CPU")
        if not context.enabled:
            say("note: --sync-bn has no effect in a single process (it matters under torchrun)")


def _check_same_world(run_dir: Path, stored: Dict[str, Any], config: TrainConfig,
                      context: distributed.DistributedContext) -> None:
    world_size = int(stored.get("world_size", 1))
    if world_size != context.world_size:
        raise SplitLBIError(f"{run_dir} was trained by {world_size} process(es) and is being resumed by "
                            f"{context.world_size}: use the same number (the global batch is --batch-size "
                            f"x processes)")
    if config.schedule == "cosine" and config.epochs != stored["epochs"]:
        raise SplitLBIError(f"cannot change --epochs of a --schedule cosine run ({stored['epochs']} -> "
                            f"{config.epochs}): the learning rate anneals over the planned epochs")


@holds_run_dirs  # the run directory's lock is held until training returns or fails
def _run_training(
    config: Optional[TrainConfig],
    out_dir: PathLike,
    resume: bool,
    *,
    log: Optional[Callable[[str], None]],
    on_epoch_end: Optional[EpochCallback],
) -> Path:
    say = log if log is not None else _silent
    run_dir = Path(out_dir)
    if resume:
        if not run_dir.is_dir():
            raise SplitLBIError(f"--resume {run_dir}: no such directory")
        open_run_dir(run_dir, new=False, say=say)
        info = read_run_config(run_dir)
        for command in ("retrain", "baseline"):  # masks/penalties outside TrainConfig: a resume would drop them
            if command in info:
                raise SplitLBIError(f"--resume {run_dir}: this run was written by 'splitlbi {command}', which "
                                    f"cannot be resumed; run 'splitlbi {command}' again")
        config = _merge_resume_config(run_dir, _train_config_from_info(info), config)
    else:
        if config is None:
            raise SplitLBIError("a new run needs a TrainConfig")
        _check_new_run_dir(run_dir)
    validate_config(config)
    _check_model_name(config.model)
    canonical_dataset_name(config.dataset)  # unknown names fail before any file is written
    if not resume:
        open_run_dir(run_dir, new=True, say=say)
    # Under torchrun: join the process group (every rank has passed the checks above
    # before any rank writes: the first collective below waits for all of them).
    context, device = distributed.setup(config.device, resolve_device)
    if not context.is_main:
        say = _silent
    _check_speed_options(config, context, device, say)
    autocast_dtype = torch.bfloat16 if config.amp else None
    memory_format = torch.channels_last if config.channels_last else None

    # Each node's first process loads (and, if need be, downloads) first, then the others.
    data: Optional[_Data] = None
    with distributed.agreement(context):
        if context.local_rank == 0:
            data = _load_data(config, device)
    with distributed.agreement(context):
        if data is None:
            data = _load_data(config, device)
    _seed_everything(config.seed)
    # `model` is the plain module throughout: the optimizer (layer names), checkpoints,
    # init.pt and path.csv use it; DDP and torch.compile only wrap it for the forward.
    model = create_model(config.model, num_classes=data.facts["num_classes"],
                         in_channels=data.facts["in_channels"])
    if config.sync_bn and context.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if context.rank > 0:
        # Same initial weights on every rank (seeded above), then distinct dropout streams.
        _seed_everything(distributed.rank_seed(config.seed, context.rank))
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    # The structure parameter Γ exists only under SplitLBI; baselines leave its columns empty.
    lbi = optimizer if isinstance(optimizer, SplitLBI) else None

    # The text of metrics.csv and path.csv so far (rank 0), saved in each checkpoint.
    history: Optional[RunHistory] = None
    restart = False
    if resume:
        _check_same_dataset(run_dir, info, data.facts)
        _check_same_world(run_dir, info, config, context)
        resumed, rejected = _load_newest_valid_checkpoint(run_dir, config, model, context, say)
        if resumed is None:
            restart = True
        else:
            optimizer, scheduler, start_epoch, history = resumed
            if config.epochs < start_epoch:
                raise SplitLBIError(f"--epochs {config.epochs} is below the {start_epoch} epochs {run_dir} already has")
            lbi = optimizer if isinstance(optimizer, SplitLBI) else None
            with distributed.agreement(context):
                if context.is_main:
                    set_aside(rejected)
                    # Rows, masks and epoch checkpoints written after the checkpoint belong
                    # to an epoch that will be redone; rows before it must all be there.
                    history = RunHistory(
                        _restore_rows(run_dir / METRICS_FILE, history.metrics if history else None, 1, start_epoch,
                                      METRICS_COLUMNS, say),
                        _restore_rows(run_dir / PATH_FILE, history.path if history else None, 0, start_epoch,
                                      PATH_COLUMNS, say))
                    _remove_epoch_files_after(run_dir / MASK_DIR, start_epoch)
                    _remove_epoch_files_after(run_dir / CHECKPOINT_DIR, start_epoch)
                    info.update(config.to_dict())
                    info.setdefault("resumed", []).append({"from_epoch": start_epoch, "at": _now(),
                                                           "versions": _versions()})
                    _write_json(run_dir / CONFIG_FILE, info)
            say(f"resuming {run_dir} from epoch {start_epoch}/{config.epochs}")
    if not resume or restart:
        rng_states = distributed.all_gather_objects(context, _rng_state())
        with distributed.agreement(context):
            if context.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                if restart:  # killed before its first checkpoint: the same run again from its config.json
                    set_aside(rejected)
                    _remove_epoch_files_after(run_dir / MASK_DIR, 0)
                    _remove_epoch_files_after(run_dir / CHECKPOINT_DIR, 0)
                    info.update(config.to_dict())
                    info.setdefault("resumed", []).append({"from_epoch": 0, "at": _now(), "versions": _versions()})
                    _write_json(run_dir / CONFIG_FILE, info)
                else:
                    _write_json(run_dir / CONFIG_FILE, {**_run_info(config, data.facts),
                                                        "world_size": context.world_size})
                atomic_torch_save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
                                  run_dir / INIT_FILE)
                history = RunHistory(",".join(METRICS_COLUMNS) + "\n", ",".join(PATH_COLUMNS) + "\n")
                atomic_write_text(run_dir / METRICS_FILE, history.metrics)
                atomic_write_text(run_dir / PATH_FILE, history.path)
                history.path += _append_rows(run_dir / PATH_FILE, filter_path_rows(model, optimizer, 0))
                (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
                if lbi is not None:
                    (run_dir / MASK_DIR).mkdir(exist_ok=True)
                # An epoch-0 checkpoint makes a run killed during its first epoch resumable.
                _save_checkpoint(run_dir, _checkpoint_state(0, model, optimizer, scheduler, rng_states, history),
                                 keep_epoch_file=False)
        start_epoch = 0
        say(f"run directory: {run_dir}" if not restart else
            f"no usable checkpoint in {run_dir}: restarting it from epoch 0 (its config.json and initial weights)")

    train_model = distributed.wrap_model(model, context)
    eval_model = model
    if config.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model) if context.enabled else train_model
    where = f"device {device}"
    if context.enabled:
        where = (f"{context.world_size} processes on {device.type} (global batch "
                 f"{config.batch_size * context.world_size} = {config.batch_size} x {context.world_size})")
    say(f"{config.model} on {config.dataset} ({data.facts['train_size']} train / "
        f"{data.facts['test_size']} test images), optimizer {config.optimizer}, {where}")
    if start_epoch >= config.epochs:
        say(f"nothing to do: {run_dir} already has {start_epoch} epochs")
        return run_dir

    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            train = train_one_epoch(train_model, optimizer, data.train_images, data.train_labels,
                                batch_size=config.batch_size, mean=data.mean, std=data.std,
                                generator=epoch_generator(config.seed, epoch),
                                transform=train_transform(config.augment, data.mean, data.std,
                                                          augment_generator(config.seed, epoch)),
                                progress=None if config.progress and context.is_main else False,
                                description=f"epoch {epoch}/{config.epochs}", shard=context.shard,
                                autocast_dtype=autocast_dtype, memory_format=memory_format,
                                nonfinite=config.nonfinite)
        except NonFiniteError as error:
            # Nothing of this epoch was written: last.pt still holds the last good epoch.
            raise SplitLBIError(f"training stopped at {error}; {CHECKPOINT_DIR}/{LAST_CHECKPOINT} keeps epoch "
                                f"{epoch - 1}, the last good one (lower --lr or --kappa, or resume with "
                                f"--nonfinite skip to leave such batches out)") from None
        if train.skipped:
            say(f"warning: epoch {epoch}: skipped {train.skipped} batch(es) whose loss was not finite")
        distributed.broadcast_buffers(context, model)
        # Every rank evaluates its share of the test set; the results are summed over ranks.
        evaluation = dict(batch_size=config.eval_batch_size, mean=data.mean, std=data.std, shard=context.shard,
                          autocast_dtype=autocast_dtype, memory_format=memory_format)
        test = evaluate(eval_model, data.test_images, data.test_labels, **evaluation)
        if not math.isfinite(test.loss) and data.test_images.shape[0] > 0:
            # Finite weights whose outputs overflow: the run has diverged all the same.
            raise SplitLBIError(f"training stopped at epoch {epoch}/{config.epochs}, after its last step: the test "
                                f"loss is not finite (nan or inf); {CHECKPOINT_DIR}/{LAST_CHECKPOINT} keeps epoch "
                                f"{epoch - 1}, the last good one (lower --lr or --kappa)")
        sparse_accuracy = sparsity = None
        if lbi is not None:
            with lbi.sparse_model():
                sparse_accuracy = evaluate(eval_model, data.test_images, data.test_labels, **evaluation).accuracy
            sparsity = float(lbi.sparsity().overall)
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, "train_loss": train.loss, "train_acc": train.accuracy,
                   "test_loss": test.loss, "test_acc": test.accuracy, "sparse_test_acc": sparse_accuracy,
                   "sparsity": sparsity, "epoch_seconds": time.perf_counter() - started}

        # DDP averages the gradients; SplitLBI's V and Γ are functions of them and of
        # state that started equal, so the ranks agree with no communication of their own.
        # Checked once per epoch (cheap); a difference would mean a non-deterministic op.
        diverged = distributed.check_in_sync(context, model, optimizer)
        if diverged:
            say(f"warning: after epoch {epoch} the processes differ in {len(diverged)} tensor(s) "
                f"({', '.join(diverged[:3])}); continuing from rank 0's values")
            distributed.resynchronize(context, model, optimizer)
        rng_states = distributed.all_gather_objects(context, _rng_state())

        with distributed.agreement(context):
            if context.is_main:
                history.metrics += _append_rows(run_dir / METRICS_FILE, [_metrics_row(metrics)])
                path_width = len(_file_columns(run_dir / PATH_FILE, PATH_COLUMNS))
                history.path += _append_rows(run_dir / PATH_FILE,
                                             [row[:path_width] for row in filter_path_rows(model, optimizer, epoch)])
                if lbi is not None:
                    atomic_torch_save(lbi.masks(), run_dir / MASK_DIR / epoch_file_name(epoch))
                # The checkpoint comes last: once it exists, everything of this epoch is on disk.
                keep = epoch % config.save_every == 0 or epoch == config.epochs
                _save_checkpoint(run_dir, _checkpoint_state(epoch, model, optimizer, scheduler, rng_states, history),
                                 keep_epoch_file=keep)
                say(_summary_line(metrics, config.epochs))
                if on_epoch_end is not None:
                    on_epoch_end(epoch, metrics)
    return run_dir


def _load_newest_valid_checkpoint(
    run_dir: Path, config: TrainConfig, model: nn.Module, context: distributed.DistributedContext,
    say: Callable[[str], None],
) -> Tuple[Optional[Tuple[torch.optim.Optimizer, Any, int, Optional[RunHistory]]], List[Path]]:
    """Load the newest checkpoint of ``run_dir`` that passes validation into ``model``, new
    optimizer and scheduler and the RNGs: ``((optimizer, scheduler, epoch, history),
    rejected files)``. With none usable: ``(None, rejected)``, the model and RNGs as they
    were (a freshly seeded run), ready to restart from epoch 0."""
    pristine = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    rng_before = _rng_state()
    chosen: Dict[str, Any] = {}

    def accept(checkpoint: Dict[str, Any], path: Path) -> None:
        epoch = validate_checkpoint(checkpoint, pristine,
                                    epoch=None if path.name == LAST_CHECKPOINT else epoch_from_name(path))
        if not isinstance(checkpoint["scheduler"], dict) or "last_epoch" not in checkpoint["scheduler"]:
            raise ValueError("its 'scheduler' is not a scheduler state_dict")
        # Fresh optimizer and scheduler per try: a rejected file leaves nothing half-loaded behind.
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        model.load_state_dict(checkpoint["model"])
        # Each rank continues its own RNG stream (older and one-process checkpoints: "rng").
        _restore_rng_state(checkpoint.get("rng_ranks", [checkpoint["rng"]] * context.world_size)[context.rank])
        chosen.update(optimizer=optimizer, scheduler=scheduler, epoch=epoch)

    found, rejected = newest_valid_checkpoint(run_dir, accept, say=say if context.is_main else _silent)
    if found is None:
        model.load_state_dict(pristine)
        _restore_rng_state(rng_before)
        return None, rejected
    path, checkpoint = found
    if rejected:
        say(f"resuming from {CHECKPOINT_DIR}/{path.name}, the newest valid checkpoint")
    history = RunHistory.from_state(checkpoint.get("history"))
    return (chosen["optimizer"], chosen["scheduler"], chosen["epoch"], history), rejected


def _checkpoint_state(epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, rng_states: List[Dict[str, Any]],
                      history: Optional[RunHistory] = None) -> Dict[str, Any]:
    """``rng_states``: each rank's :func:`_rng_state` (one entry in one process);
    ``history``: metrics.csv and path.csv up to ``epoch``, for a resume to rebuild them."""
    state = {"format": RUN_FORMAT, "epoch": epoch, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states[0]}
    if len(rng_states) > 1:
        state["rng_ranks"] = rng_states
    if history is not None:
        state["history"] = history.state()
    return state
