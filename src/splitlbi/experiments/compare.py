"""``splitlbi compare``: the paper's Table 1, SplitLBI against SGD and adaptive optimizers.

One model on one dataset is trained with each optimizer *variant* (:data:`VARIANTS`)
for each seed. Every (variant, seed) is an ordinary run directory
``OUT/<variant>/seed<k>`` written by :func:`splitlbi.train.run_training` (so
``splitlbi plot`` and ``splitlbi train --resume`` work on it). Re-running the same
command skips the finished runs and resumes the interrupted ones from their last
checkpoint, so a long comparison can be stopped and continued at will. Runs with the
same seed start from the same initialization, whatever the variant.

At the end ``OUT/table.csv`` and ``OUT/table.md`` get one row per variant: the test
accuracy (percent) after the last epoch ("final") and the highest over all epochs
("best"), mean and standard deviation over the seeds (sample standard deviation, n-1;
empty for a single seed), and for SplitLBI after the last epoch the test accuracy of the
sparse model (W projected onto the support of Γ, no fine-tuning; ``sparse_test_acc`` in
``metrics.csv``), the share of non-zeros of Γ (the paper's "sparsity",
``gamma_nonzero_share``; 0.25 = 25% non-zero) and, with ``layer``, how many of that
layer's filters are in the support of Γ (``path.csv``). ``OUT/runs.csv`` has the same
numbers per run (variant, seed), for reporting each seed.

Variants (names as in the paper's Table 1):

=================  ==========  ========  ========  ==============================
name               optimizer   momentum  weight    learning rate
                                         decay
=================  ==========  ========  ========  ==============================
splitlbi-naive     splitlbi    0         0         ``--lr``
splitlbi-mom       splitlbi    0.9       0         ``--lr``
splitlbi-mom-wd    splitlbi    0.9       ``--wd``  ``--lr``
sgd-naive          sgd         0         0         ``--lr``
sgd-mom            sgd         0.9       0         ``--lr``
sgd-mom-wd         sgd         0.9       ``--wd``  ``--lr``
sgd-nesterov       sgd         0.9 (N)   0         ``--lr``
adam               adam        -         0         ``--adaptive-lr`` or 1e-3
adamw              adamw       -         1e-2      ``--adaptive-lr`` or 1e-3
adagrad            adagrad     -         0         ``--adaptive-lr`` or 1e-2
rmsprop            rmsprop     -         0         ``--adaptive-lr`` or 1e-3
radam              radam       -         0         ``--adaptive-lr`` or 1e-3
amsgrad            amsgrad     -         0         ``--adaptive-lr`` or 1e-3
=================  ==========  ========  ========  ==============================

``--wd`` is ``--weight-decay`` (default 1e-4); AdamW keeps torch's default decoupled
decay 1e-2 (with 0 it would be Adam). RMSprop runs at 1e-3 (Tieleman and Hinton's
value, the default of Keras and TensorFlow), not torch's default 1e-2, which is ten times
the step of the other adaptive methods here. The learning-rate schedule (``--lr-milestones``,
``--lr-gamma``), epochs, batch size, augmentation and data are shared by all variants;
``--kappa``, ``--nu``, ``--lam`` and ``--penalty`` apply to the SplitLBI variants alone: the
baselines' runs store TrainConfig's defaults for them, so they do not depend on these.

>>> rows = compare("runs/table1", ["splitlbi-mom", "sgd-mom"], seeds=[0, 1],
...                model="lenet5", dataset="digits", epochs=5)     # doctest: +SKIP
>>> rows[0]["final_test_acc_mean"]                                  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from splitlbi.errors import SplitLBIError
from splitlbi.train.config import SPLITLBI_ONLY_FIELDS, TrainConfig, validate_config
from splitlbi.train.run import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    read_run_config,
)
from splitlbi.train.rundir import check_same_settings, read_train_config, train_or_resume
from splitlbi.train.runfiles import iter_path, path_layers, read_metrics
from splitlbi.utils.io import atomic_write_text

__all__ = [
    "VARIANTS", "VARIANT_NAMES", "DEFAULT_WEIGHT_DECAY", "TABLE_COLUMNS", "RUN_COLUMNS", "Variant",
    "variant_config", "run_dir_for", "compare", "summarize", "format_csv", "format_runs_csv", "format_markdown",
    "write_tables",
]

PathLike = Union[str, "Path"]
Log = Optional[Callable[[str], None]]

#: Weight decay of the ``-wd`` variants unless ``--weight-decay`` says otherwise.
DEFAULT_WEIGHT_DECAY = 1e-4
TABLE_CSV = "table.csv"
TABLE_MD = "table.md"
RUNS_CSV = "runs.csv"
#: Columns of ``table.csv`` (accuracies in percent, the share of non-zeros of Γ a fraction
#: as in metrics.csv; the filter columns are empty without ``layer`` and for baselines).
TABLE_COLUMNS = ("optimizer", "lr", "seeds", "final_test_acc_mean", "final_test_acc_std",
                 "best_test_acc_mean", "best_test_acc_std", "final_sparse_test_acc_mean",
                 "final_sparse_test_acc_std", "final_gamma_nonzero_share_mean", "final_gamma_nonzero_share_std",
                 "filters_layer", "filters_selected_mean", "filters_selected_std", "filters_total")
#: Columns of ``runs.csv``: one row per (variant, seed), the per-run numbers behind the table.
RUN_COLUMNS = ("optimizer", "seed", "lr", "final_test_acc", "best_test_acc", "final_sparse_test_acc",
               "final_gamma_nonzero_share", "filters_layer", "filters_selected", "filters_total", "run_dir")

# Settings that each variant fixes; ``compare(**settings)`` may not set them.
_VARIANT_FIELDS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "seed")
# Stand-in for "the --weight-decay value" in the variant table.
_WD = "wd"


@dataclass(frozen=True)
class Variant:
    """One row of Table 1: an optimizer with fixed momentum/weight-decay/learning-rate rules.

    ``weight_decay`` is a number or ``"wd"`` (the comparison's ``--weight-decay``);
    ``adaptive_lr`` is the default learning rate of an adaptive method (``None``: the
    variant uses the shared ``--lr``).
    """

    name: str
    optimizer: str
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: Union[float, str] = 0.0
    adaptive_lr: Optional[float] = None

    @property
    def is_splitlbi(self) -> bool:
        return self.optimizer == "splitlbi"


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant("splitlbi-naive", "splitlbi"),
    Variant("splitlbi-mom", "splitlbi", momentum=0.9),
    Variant("splitlbi-mom-wd", "splitlbi", momentum=0.9, weight_decay=_WD),
    Variant("sgd-naive", "sgd"),
    Variant("sgd-mom", "sgd", momentum=0.9),
    Variant("sgd-mom-wd", "sgd", momentum=0.9, weight_decay=_WD),
    Variant("sgd-nesterov", "sgd", momentum=0.9, nesterov=True),
    Variant("adam", "adam", adaptive_lr=1e-3),
    Variant("adamw", "adamw", weight_decay=1e-2, adaptive_lr=1e-3),
    Variant("adagrad", "adagrad", adaptive_lr=1e-2),
    Variant("rmsprop", "rmsprop", adaptive_lr=1e-3),
    Variant("radam", "radam", adaptive_lr=1e-3),
    Variant("amsgrad", "amsgrad", adaptive_lr=1e-3),
)}
VARIANT_NAMES = tuple(VARIANTS)


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise SplitLBIError(f"unknown optimizer variant {name!r} (choose from {', '.join(VARIANT_NAMES)})") from None


def variant_config(base: TrainConfig, name: str, seed: int, *, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                   adaptive_lr: Optional[float] = None) -> TrainConfig:
    """The TrainConfig of variant ``name`` with ``seed``: ``base`` with the variant's optimizer settings.

    ``base.lr`` is the learning rate of the SGD and SplitLBI variants; the adaptive
    ones use ``adaptive_lr`` when given, else their own default. The baselines get
    TrainConfig's defaults for the settings only SplitLBI reads (κ, ν, λ, penalties), so
    their runs do not depend on the SplitLBI settings of the comparison.
    """
    variant = _variant(name)
    if not variant.is_splitlbi:
        defaults = TrainConfig()
        base = dataclasses.replace(base, **{field: getattr(defaults, field) for field in SPLITLBI_ONLY_FIELDS})
    if variant.adaptive_lr is not None:
        lr = adaptive_lr if adaptive_lr is not None else variant.adaptive_lr
    else:
        lr = base.lr
    decay = weight_decay if variant.weight_decay == _WD else float(variant.weight_decay)
    return dataclasses.replace(base, optimizer=variant.optimizer, lr=lr, momentum=variant.momentum,
                               nesterov=variant.nesterov, weight_decay=decay, seed=seed)


def run_dir_for(out_dir: PathLike, name: str, seed: int) -> Path:
    """``OUT/<variant>/seed<k>``: where run (variant, seed) of a comparison lives."""
    return Path(out_dir) / name / f"seed{seed}"


# --------------------------------------------------------------------------- one run


def _float(text: Optional[str]) -> Optional[float]:
    return None if text is None or text == "" else float(text)


def _filters_selected(run_dir: Path, layer: str, epoch: int) -> Optional[Dict[str, int]]:
    """How many of ``layer``'s filters are in the support of Γ at ``epoch`` (None: no Γ logged)."""
    flags = [row.in_support for row in iter_path(run_dir, layer=layer, epoch=epoch)]
    if not flags:
        raise SplitLBIError(f"{run_dir}: layer {layer!r} has no rows for epoch {epoch} in path.csv "
                            f"(layers: {', '.join(path_layers(run_dir))})")
    if any(flag is None for flag in flags):
        return None
    return {"filters_selected": sum(flags), "filters_total": len(flags)}


def _run_result(run_dir: Path, epochs: int, layer: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Final/best test accuracy, final sparse-model accuracy and share of non-zeros of Γ over epochs
    1..``epochs``, and the filters of ``layer`` in the support of Γ at the end; None if incomplete."""
    rows = [row for row in read_metrics(run_dir) if int(row["epoch"]) <= epochs]
    if not rows or int(rows[-1]["epoch"]) != epochs:
        return None
    final = rows[-1]
    result = {"run_dir": str(run_dir), "epochs": epochs, "final_test_acc": float(final["test_acc"]),
              "best_test_acc": max(float(row["test_acc"]) for row in rows),
              "final_sparse_test_acc": _float(final.get("sparse_test_acc")),
              "final_gamma_nonzero_share": _float(final.get("gamma_nonzero_share")),
              "filters_layer": layer, "filters_selected": None, "filters_total": None}
    if layer is not None and result["final_gamma_nonzero_share"] is not None:
        result.update(_filters_selected(run_dir, layer, epochs) or {})
    return result


# --------------------------------------------------------------------------- table


def _mean_std(values: Sequence[float]) -> tuple:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(out_dir: PathLike, variants: Sequence[str], seeds: Sequence[int], epochs: int,
              layer: Optional[str] = None) -> List[Dict[str, Any]]:
    """The table rows of a comparison from its run directories (runs short of ``epochs`` left out).

    Each row has the :data:`TABLE_COLUMNS` (``seeds`` = number of runs averaged) and
    ``runs``: the per-seed results (``seed``, ``run_dir``, ``final_test_acc``,
    ``best_test_acc``, ``final_sparse_test_acc``, ``final_gamma_nonzero_share``,
    ``filters_selected``, ``filters_total``). The SplitLBI-only columns stay empty for
    the baselines; the filter columns need ``layer``.
    """
    rows = []
    for name in variants:
        variant = _variant(name)
        runs, lr = [], None
        for seed in seeds:
            run_dir = run_dir_for(out_dir, name, seed)
            if not (run_dir / METRICS_FILE).is_file():
                continue
            result = _run_result(run_dir, epochs, layer if variant.is_splitlbi else None)
            if result is None:
                continue
            if lr is None:
                lr = float(read_run_config(run_dir)["lr"])
            runs.append({"seed": seed, "lr": lr, **result})
        row = {"optimizer": name, "lr": lr, "seeds": len(runs), "filters_layer": None, "filters_total": None,
               "runs": runs}
        columns = ["final_test_acc", "best_test_acc"]
        if variant.is_splitlbi:
            columns += ["final_sparse_test_acc", "final_gamma_nonzero_share", "filters_selected"]
            totals = {run["filters_total"] for run in runs if run["filters_total"] is not None}
            if totals:
                row.update(filters_layer=layer, filters_total=max(totals))
        for column in ("final_test_acc", "best_test_acc", "final_sparse_test_acc", "final_gamma_nonzero_share",
                       "filters_selected"):
            values = [run[column] for run in runs if run.get(column) is not None] if column in columns else []
            row[f"{column}_mean"], row[f"{column}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec) if isinstance(value, float) else str(value)


def format_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """``table.csv``: :data:`TABLE_COLUMNS`, numbers with 6 significant digits, empty for missing."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[column], ".6g") for column in TABLE_COLUMNS])
    return buffer.getvalue()


def format_runs_csv(rows: Sequence[Dict[str, Any]], out_dir: PathLike) -> str:
    """``runs.csv``: :data:`RUN_COLUMNS`, one row per finished run, ``run_dir`` relative to ``out_dir``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RUN_COLUMNS)
    for row in rows:
        for run in row["runs"]:
            cells = {**run, "optimizer": row["optimizer"],
                     "run_dir": Path(run["run_dir"]).relative_to(out_dir).as_posix()}
            writer.writerow([_cell(cells.get(column), ".6g") for column in RUN_COLUMNS])
    return buffer.getvalue()


def _plus_minus(mean: Optional[float], std: Optional[float], scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def format_markdown(rows: Sequence[Dict[str, Any]], caption: str = "") -> str:
    """``table.md``: mean ± std per variant; ``caption`` (the setting) as a line above.

    The SplitLBI rows add the sparse model's accuracy, the share of non-zeros of Γ and,
    when counted, the filters of one layer in the support of Γ (``–`` for baselines).
    """
    layer = next((row["filters_layer"] for row in rows if row["filters_layer"]), None)
    lines = [caption, ""] if caption else []
    header = ("| optimizer | lr | seeds | final test acc (%) | best test acc (%) | sparse model acc (%) "
              "| non-zeros of Γ (%) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if layer:
        header += f" {layer} filters selected |"
        rule += "---:|"
    lines += [header, rule]
    for row in rows:
        line = (f"| {row['optimizer']} | {_cell(row['lr'], 'g')} | {row['seeds']} | "
                f"{_plus_minus(row['final_test_acc_mean'], row['final_test_acc_std'])} | "
                f"{_plus_minus(row['best_test_acc_mean'], row['best_test_acc_std'])} | "
                f"{_plus_minus(row['final_sparse_test_acc_mean'], row['final_sparse_test_acc_std'])} | "
                f"{_plus_minus(row['final_gamma_nonzero_share_mean'], row['final_gamma_nonzero_share_std'], 100.0)} |")
        if layer:
            selected = _plus_minus(row["filters_selected_mean"], row["filters_selected_std"], digits=1)
            total = row["filters_total"]
            line += f" {selected}{'' if total is None else f' / {total}'} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _caption(rows: Sequence[Dict[str, Any]], base: TrainConfig, seeds: Sequence[int], weight_decay: float) -> str:
    described = next((run["run_dir"] for row in rows for run in row["runs"]), None)
    data = base.dataset
    if described is not None:
        info = read_run_config(described)
        data = f"{info.get('dataset_description', data)} ({info.get('train_size')} train / " \
               f"{info.get('test_size')} test images used)"
    parts = [f"{base.model} on {data}", f"{base.epochs} epoch{'s' if base.epochs != 1 else ''}",
             f"batch {base.batch_size}"]
    if base.lr_milestones:
        parts.append(f"lr ×{base.lr_gamma:g} after epochs {', '.join(map(str, base.lr_milestones))}")
    if base.augment != "none":
        parts.append(f"augmentation {base.augment}")
    if any(row["optimizer"].endswith("-wd") for row in rows):
        parts.append(f"weight decay {weight_decay:g} (-wd rows)")
    lam = "the coupling's" if base.lam is None else f"{base.lam:g}"
    parts.append(f"SplitLBI κ={base.kappa:g} ν={base.nu:g} λ={lam}")
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "Test accuracy, mean ± std over seeds: " + "; ".join(parts) + "."


def write_tables(out_dir: PathLike, rows: Sequence[Dict[str, Any]], caption: str = "") -> str:
    """Write ``table.csv``, ``table.md`` and ``runs.csv`` into ``out_dir``; return the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(rows, caption)
    atomic_write_text(out / TABLE_CSV, format_csv(rows))
    atomic_write_text(out / TABLE_MD, markdown)
    atomic_write_text(out / RUNS_CSV, format_runs_csv(rows, out))
    return markdown


# --------------------------------------------------------------------------- the comparison


def _base_config(settings: Dict[str, Any]) -> TrainConfig:
    fixed = sorted(set(settings) & set(_VARIANT_FIELDS) - {"lr"})
    if fixed:
        raise SplitLBIError(f"{', '.join(fixed)} are set by each optimizer variant, not for the whole comparison")
    # None means "the TrainConfig default" (what the command line passes for options not given).
    settings = {key: value for key, value in settings.items() if value is not None}
    return TrainConfig.from_dict(settings)


def compare(
    out_dir: PathLike,
    variants: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    adaptive_lr: Optional[float] = None,
    layer: Optional[str] = None,
    train: bool = True,
    log: Log = print,
    epoch_log: Log = None,
    **settings: Any,
) -> List[Dict[str, Any]]:
    """Train every (variant, seed) into ``out_dir`` (or continue), write the tables, return the rows.

    Args:
        out_dir: the comparison's folder: ``<variant>/seed<k>`` run directories,
            ``table.csv`` and ``table.md``.
        variants: names from :data:`VARIANT_NAMES` (default: all), in table order.
        seeds: one run per seed and variant; the same seed gives the same initialization.
        weight_decay: weight decay of ``splitlbi-mom-wd`` and ``sgd-mom-wd``.
        adaptive_lr: learning rate of the adaptive methods (default: their own, 1e-3;
            AdaGrad 1e-2).
        layer: count this layer's filters in the support of Γ at the end of the SplitLBI
            runs (e.g. ``conv3``, LeNet-5's c5); ``None``: no filter column.
        train: ``False`` only reads the runs that are already finished and writes the tables.
        log: gets one progress line per run and the markdown table (``None``: silent).
        epoch_log: gets ``run_training``'s per-epoch lines (default: none).
        **settings: :class:`TrainConfig` fields shared by all runs (``model``, ``dataset``,
            ``data_dir``, ``train_split``, ``pad_to``, ``augment``, ``epochs``,
            ``batch_size``, ``lr`` for SGD/SplitLBI, ``lr_milestones``, ``kappa``, ``nu``,
            ``device``, ...). ``optimizer``, ``momentum``, ``nesterov``, ``weight_decay``
            and ``seed`` are the variants' to set.

    Returns:
        One dict per variant, see :func:`summarize`.
    """
    say = log if log is not None else (lambda line: None)
    names = list(VARIANT_NAMES if variants is None else [variants] if isinstance(variants, str) else variants)
    if not names:
        raise SplitLBIError("no optimizer variants to compare")
    for name in names:
        _variant(name)
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise SplitLBIError(f"optimizer variants listed twice: {', '.join(twice)}")
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SplitLBIError(f"--seeds must be distinct integers >= 0, got {seeds}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise SplitLBIError(f"--weight-decay must be >= 0, got {weight_decay}")
    if adaptive_lr is not None and not (math.isfinite(adaptive_lr) and adaptive_lr > 0):
        raise SplitLBIError(f"--adaptive-lr must be > 0, got {adaptive_lr}")
    settings.setdefault("save_every", None)
    base = _base_config(settings)
    if settings.get("save_every") is None:
        # Keep only the final epoch's checkpoint (and last.pt): dozens of runs x every epoch adds up.
        base = dataclasses.replace(base, save_every=base.epochs)
    configs = {(name, seed): variant_config(base, name, seed, weight_decay=weight_decay, adaptive_lr=adaptive_lr)
               for name in names for seed in seeds}
    for config in configs.values():  # every setting checked before the first run starts
        validate_config(config)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SplitLBIError(f"--out {out} exists and is not a directory")
    if (out / CONFIG_FILE).exists():
        raise SplitLBIError(f"--out {out} is a run directory (it has {CONFIG_FILE}); a comparison needs a folder "
                            f"of its own for its runs and tables")
    total = len(configs)
    actions: Dict[str, int] = {}
    started_all = time.perf_counter()
    # Settings that differ from an existing run's fail now, not after hours of other runs
    # (and never mix into a table).
    for (name, seed), config in configs.items():
        run_dir = run_dir_for(out, name, seed)
        if (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
            if config.optimizer != "splitlbi":
                # A baseline run stored with other κ, ν, ... (all runs before they got the defaults) is the
                # same run: keep its values so that it is still skipped or resumed.
                stored = read_train_config(run_dir)
                config = configs[(name, seed)] = dataclasses.replace(
                    config, **{field: getattr(stored, field) for field in SPLITLBI_ONLY_FIELDS})
            check_same_settings(run_dir, config)
    if train:
        for index, ((name, seed), config) in enumerate(configs.items(), start=1):
            run_dir = run_dir_for(out, name, seed)
            prefix = f"[{index:>{len(str(total))}}/{total}] {name} seed {seed}"
            started = time.perf_counter()
            action = train_or_resume(config, run_dir, log=epoch_log)
            actions[action] = actions.get(action, 0) + 1
            result = _run_result(run_dir, config.epochs, layer if config.optimizer == "splitlbi" else None)
            if result is None:  # cannot happen after a completed run_training; be explicit anyway
                raise SplitLBIError(f"{run_dir}: metrics.csv has no row for epoch {config.epochs}")
            what = ("finished before, skipped" if action == "finished"
                    else f"{action} in {time.perf_counter() - started:.1f}s")
            line = (f"{prefix}: {what}; test acc final {result['final_test_acc']:.2f}% "
                    f"best {result['best_test_acc']:.2f}%")
            if result["final_gamma_nonzero_share"] is not None:
                line += (f", sparse model {result['final_sparse_test_acc']:.2f}%, "
                         f"Gamma non-zeros {100.0 * result['final_gamma_nonzero_share']:.2f}%")
            if result["filters_selected"] is not None:
                line += f", {layer} filters selected {result['filters_selected']}/{result['filters_total']}"
            say(line)
    rows = summarize(out, names, seeds, base.epochs, layer)
    markdown = write_tables(out, rows, _caption(rows, base, seeds, weight_decay))
    if train:
        counts = ", ".join(f"{count} {action}" for action, count in actions.items())
        say(f"{total} runs ({counts}) in {time.perf_counter() - started_all:.1f}s; "
            f"tables: {out / TABLE_MD}, {out / TABLE_CSV}")
    else:
        missing = total - sum(row["seeds"] for row in rows)
        say(f"tables from the finished runs ({missing} of {total} not finished): {out / TABLE_MD}, {out / TABLE_CSV}")
    say("")
    say(markdown.rstrip("\n"))
    return rows
