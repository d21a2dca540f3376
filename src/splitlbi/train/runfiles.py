"""Reading the record of a run directory: ``metrics.csv`` (one row per epoch) and
``path.csv`` (one row per epoch, layer and filter).

The one reader for everything that looks at runs after (or while) they train: the
figures, ``splitlbi compare``, ``splitlbi reproduce`` and the scripts. Runs written by
older versions are read here, in one place: metrics columns renamed since
(:func:`splitlbi.train.run.upgrade_metrics_row`), ``path.csv`` without ``gamma_norm`` or
``v_norm``, support flags written as ``0/1`` or ``True/False``. Writing these files is the
training side's (:mod:`splitlbi.train.rundir`, the owner of a run directory).

>>> rows = read_metrics("runs/lenet")                     # doctest: +SKIP
>>> rows[-1]["test_acc"], rows[-1]["gamma_nonzero_share"]  # doctest: +SKIP
('98.9', '0.2513')
>>> [row.filter for row in iter_path("runs/lenet", layer="conv3", epoch=10) if row.in_support]  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from splitlbi.errors import SplitLBIError
from splitlbi.train.run import METRICS_FILE, PATH_FILE, upgrade_metrics_row

__all__ = [
    "PathRow", "PATH_REQUIRED_COLUMNS", "read_metrics", "read_metric_columns", "iter_path", "read_path",
    "path_layers", "path_columns", "parse_support_flag",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Columns every ``path.csv`` has had; ``gamma_norm`` and ``v_norm`` came later (and are
#: empty for runs without Γ).
PATH_REQUIRED_COLUMNS = ("epoch", "layer", "filter", "w_norm", "in_support")
_TRUE_FLAGS = {"1", "1.0", "true", "t", "yes"}
_FALSE_FLAGS = {"0", "0.0", "false", "f", "no"}


class PathRow(NamedTuple):
    """One row of ``path.csv``: filter ``filter`` of ``layer`` at ``epoch`` (0 = initialization).

    ``in_support`` is None (and ``gamma_norm``/``v_norm`` are None) for a run without Γ;
    ``v_norm`` is also None in runs written before it was logged.
    """

    epoch: int
    layer: str
    filter: int
    w_norm: float
    gamma_norm: Optional[float]
    in_support: Optional[bool]
    v_norm: Optional[float]


# --------------------------------------------------------------------------- metrics.csv


def read_metrics(run_dir: PathLike) -> List[Dict[str, str]]:
    """The rows of ``metrics.csv``, one per finished epoch in order, as ``{column: text}``.

    Old column names are replaced by the current ones (``sparsity`` ->
    ``gamma_nonzero_share``). A run that has not finished an epoch gives ``[]``.
    Raises :class:`SplitLBIError` (one line) when there is no ``metrics.csv`` or it cannot
    be read.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise SplitLBIError(f"{run_dir} has no {METRICS_FILE} (not a run directory?)")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [upgrade_metrics_row(row) for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError) as error:
        raise SplitLBIError(f"cannot read {path}: {' '.join(str(error).split())}") from None


def _number(text: Optional[str]) -> float:
    return float(text) if text not in (None, "") else math.nan


def read_metric_columns(run_dir: PathLike) -> Dict[str, List[float]]:
    """``metrics.csv`` as ``{column: values by epoch}`` (floats; missing cells are NaN).

    Raises :class:`SplitLBIError` when the run has no epoch yet or a cell is not a number.
    """
    rows = read_metrics(run_dir)
    path = Path(run_dir) / METRICS_FILE
    if not rows:
        raise SplitLBIError(f"{path} has no epochs yet")
    try:
        return {column: [_number(row.get(column)) for row in rows] for column in rows[0]}
    except ValueError as error:
        raise SplitLBIError(f"cannot read {path}: {' '.join(str(error).split())}") from None


# --------------------------------------------------------------------------- path.csv


def parse_support_flag(text: str) -> Optional[bool]:
    """An ``in_support`` cell as a bool: 0/1 or True/False; empty means "no Γ" (None)."""
    flag = text.strip().lower()
    if not flag:
        return None
    if flag in _TRUE_FLAGS:
        return True
    if flag in _FALSE_FLAGS:
        return False
    raise SplitLBIError(f"in_support value {text!r} is neither 0/1 nor True/False")


def _path_file(run_dir: PathLike) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SplitLBIError(f"run directory {run_dir} does not exist")
    path = run_dir / PATH_FILE
    if not path.is_file():
        raise SplitLBIError(f"{run_dir}: no {PATH_FILE} (was the run trained with path logging?)")
    return path


def _optional_number(text: Optional[str]) -> Optional[float]:
    return None if text is None or text == "" else float(text)


def iter_path(run_dir: PathLike, *, layer: Optional[str] = None, epoch: Optional[int] = None) -> Iterator[PathRow]:
    """The rows of ``path.csv`` in file order, only those of ``layer`` and/or ``epoch`` when given.

    A generator (``path.csv`` of a large network over many epochs is big): the file is
    opened at the first ``next``. Raises :class:`SplitLBIError` when the run directory or
    its ``path.csv`` is missing, a required column is absent, or a cell does not parse.
    """
    path = _path_file(run_dir)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in PATH_REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise SplitLBIError(f"{path}: missing column(s) {', '.join(missing)}")
        try:
            for row in reader:
                if layer is not None and row["layer"] != layer:
                    continue
                row_epoch = int(float(row["epoch"]))
                if epoch is not None and row_epoch != epoch:
                    continue
                yield PathRow(row_epoch, row["layer"], int(float(row["filter"])), float(row["w_norm"]),
                              _optional_number(row.get("gamma_norm")), parse_support_flag(row["in_support"] or ""),
                              _optional_number(row.get("v_norm")))
        except (ValueError, TypeError) as error:
            raise SplitLBIError(f"{path}, line {reader.line_num}: {error}") from None
        except UnicodeDecodeError as error:
            raise SplitLBIError(f"cannot read {path}: {error}") from None


def read_path(run_dir: PathLike, *, layer: Optional[str] = None, epoch: Optional[int] = None) -> List[PathRow]:
    """:func:`iter_path` as a list."""
    return list(iter_path(run_dir, layer=layer, epoch=epoch))


def path_layers(run_dir: PathLike) -> List[str]:
    """The layers in ``path.csv``, in the order they first appear."""
    layers: Dict[str, None] = {}
    with _path_file(run_dir).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            layers.setdefault(row.get("layer") or "", None)
    return list(layers)


def path_columns(run_dir: PathLike) -> Tuple[str, ...]:
    """The header of ``path.csv`` (older runs lack ``gamma_norm`` and/or ``v_norm``)."""
    with _path_file(run_dir).open(newline="", encoding="utf-8") as handle:
        return tuple(next(csv.reader(handle), []))
