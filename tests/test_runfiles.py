"""``splitlbi.train.runfiles``: the one reader of metrics.csv and path.csv, old formats included.

The files are written by hand in the formats runs have had over time, so these tests run
in well under a second; runs written by real training are read in test_first_hour.py,
test_plots.py and test_budget.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from splitlbi.errors import SplitLBIError
from splitlbi.plots.curves import layer_filter_share
from splitlbi.plots.curves import read_metrics as plots_read_metrics
from splitlbi.train.runfiles import (
    PathRow,
    iter_path,
    path_columns,
    path_layers,
    read_metric_columns,
    read_metrics,
    read_path,
)

NEW_METRICS = ("epoch,lr,train_loss,train_acc,test_loss,test_acc,sparse_test_acc,gamma_nonzero_share,epoch_seconds\n"
               "1,0.1,0.9,70.0,0.8,75.5,60.25,0.5,1.5\n"
               "2,0.1,0.5,85.0,0.4,88.0,80.0,0.25,1.25\n")
# Before the rename the share of non-zeros of Γ was called "sparsity"; an SGD run leaves it empty.
OLD_SGD_METRICS = ("epoch,lr,train_loss,train_acc,test_loss,test_acc,sparse_test_acc,sparsity,epoch_seconds\n"
                   "1,0.1,0.9,70.0,0.8,75.5,,,1.5\n")


def _run(tmp_path: Path, name: str, **files: str) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    for file_name, text in files.items():
        (run_dir / file_name.replace("_", ".")).write_text(text, encoding="utf-8")
    return run_dir


def test_metrics_rows_are_dicts_and_old_column_names_are_upgraded(tmp_path: Path) -> None:
    new = _run(tmp_path, "new", metrics_csv=NEW_METRICS)
    old = _run(tmp_path, "old", metrics_csv=OLD_SGD_METRICS)
    rows = read_metrics(new)
    assert [row["epoch"] for row in rows] == ["1", "2"] and rows[1]["gamma_nonzero_share"] == "0.25"
    [old_row] = read_metrics(old)
    assert "sparsity" not in old_row and old_row["gamma_nonzero_share"] == ""

    columns = read_metric_columns(new)
    assert columns["test_acc"] == [75.5, 88.0] and columns["gamma_nonzero_share"] == [0.5, 0.25]
    assert math.isnan(read_metric_columns(old)["gamma_nonzero_share"][0])  # empty cell: NaN
    assert plots_read_metrics(new) == columns  # the figures read through the same function


def test_metrics_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match="has no metrics.csv"):
        read_metrics(tmp_path)
    header_only = _run(tmp_path, "started", metrics_csv=NEW_METRICS.splitlines()[0] + "\n")
    assert read_metrics(header_only) == []  # no epoch finished yet
    with pytest.raises(SplitLBIError, match="has no epochs yet"):
        read_metric_columns(header_only)
    not_a_number = _run(tmp_path, "bad", metrics_csv="epoch,test_acc\n1,high\n")
    with pytest.raises(SplitLBIError, match=r"cannot read .*metrics.csv: could not convert"):
        read_metric_columns(not_a_number)
    (header_only / "metrics.csv").write_bytes(b"epoch,lr\n1,\xff\n")
    with pytest.raises(SplitLBIError, match="cannot read .*metrics.csv"):
        read_metrics(header_only)


# path.csv as written today (7 columns), before v_norm (6), and with True/False flags by hand.
PATH_7 = ("epoch,layer,filter,w_norm,gamma_norm,in_support,v_norm\n"
          "0,conv1,0,0.5,0.0,0,0.0\n0,conv1,1,0.5,0.0,0,0.0\n0,fc1,0,0.2,0.0,0,0.0\n"
          "1,conv1,0,0.75,0.5,1,1.5\n1,conv1,1,0.25,0.0,0,0.5\n1,fc1,0,0.3,0.0,0,0.25\n")
PATH_6_TRUE_FALSE = ("epoch,layer,filter,w_norm,gamma_norm,in_support\n"
                     "0,conv1,0,0.5,0.0,False\n1,conv1,0,0.75,0.5,True\n")
PATH_SGD = "epoch,layer,filter,w_norm,gamma_norm,in_support,v_norm\n0,conv1,0,0.5,,,\n1,conv1,0,0.9,,,\n"


def test_path_rows_are_typed_and_filtered(tmp_path: Path) -> None:
    run = _run(tmp_path, "lbi", path_csv=PATH_7)
    rows = read_path(run)
    assert len(rows) == 6 and rows[3] == PathRow(1, "conv1", 0, 0.75, 0.5, True, 1.5)
    assert [(row.layer, row.filter) for row in iter_path(run, epoch=1) if row.in_support] == [("conv1", 0)]
    assert [row.epoch for row in iter_path(run, layer="fc1")] == [0, 1]
    assert read_path(run, layer="conv9") == []
    assert path_layers(run) == ["conv1", "fc1"]
    assert path_columns(run)[-1] == "v_norm"
    assert layer_filter_share(run) == {"conv1": {0: 0.0, 1: 0.5}, "fc1": {0: 0.0, 1: 0.0}}

    old = _run(tmp_path, "old", path_csv=PATH_6_TRUE_FALSE)
    assert [(row.in_support, row.v_norm) for row in iter_path(old)] == [(False, None), (True, None)]
    assert "v_norm" not in path_columns(old)

    sgd = _run(tmp_path, "sgd", path_csv=PATH_SGD)
    assert all(row.in_support is None and row.gamma_norm is None for row in iter_path(sgd))
    assert layer_filter_share(sgd) == {}  # no Γ, no support to count


def test_path_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match="does not exist"):
        read_path(tmp_path / "missing")
    with pytest.raises(SplitLBIError, match="no path.csv"):
        read_path(tmp_path)
    no_flags = _run(tmp_path, "columns", path_csv="epoch,layer,filter,w_norm\n0,conv1,0,0.5\n")
    with pytest.raises(SplitLBIError, match="missing column.s. in_support"):
        read_path(no_flags)
    bad = _run(tmp_path, "bad", path_csv=PATH_7.replace("1,conv1,1,0.25", "1,conv1,1,big"))
    with pytest.raises(SplitLBIError, match=r"path.csv, line 6: could not convert"):
        read_path(bad)
    assert len(read_path(bad, layer="fc1")) == 2  # rows of other layers are not parsed
    odd_flag = _run(tmp_path, "flag", path_csv=PATH_6_TRUE_FALSE.replace("True", "maybe"))
    with pytest.raises(SplitLBIError, match="in_support value 'maybe'"):
        read_path(odd_flag)
