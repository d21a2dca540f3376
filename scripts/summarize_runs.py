"""Print a markdown table of finished runs: final accuracies, non-zeros of Γ, filters kept per layer.

    python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from splitlbi.errors import SplitLBIError
from splitlbi.train.run import read_run_config
from splitlbi.train.runfiles import iter_path, read_metrics


def summarize(run: Path) -> dict:
    config = read_run_config(run)
    metrics = read_metrics(run)  # runs written before a column rename are upgraded there
    if not metrics:
        raise SplitLBIError(f"{run} has not finished an epoch yet")
    last = metrics[-1]
    final_epoch, selected, total = -1, Counter(), Counter()
    for row in iter_path(run):
        if row.epoch > final_epoch:  # filters kept at the last epoch of path.csv
            final_epoch, selected, total = row.epoch, Counter(), Counter()
        if row.epoch == final_epoch:
            total[row.layer] += 1
            selected[row.layer] += bool(row.in_support)
    has_gamma = last["gamma_nonzero_share"] != ""
    seconds = sum(float(m["epoch_seconds"]) for m in metrics)
    return {
        "run": run.name,
        "optimizer": config["optimizer"],
        "epochs": last["epoch"],
        "dense": float(last["test_acc"]),
        "best": max(float(m["test_acc"]) for m in metrics),
        "sparse": float(last["sparse_test_acc"]) if has_gamma else None,
        "gamma_nonzero_share": float(last["gamma_nonzero_share"]) if has_gamma else None,
        "filters": {k: f"{selected[k]}/{total[k]}" for k in total} if has_gamma else None,
        "seconds_per_epoch": seconds / len(metrics),
    }


def main(paths: list[str]) -> int:
    print("| run | optimizer | epochs | test acc (final) | test acc (best) | sparse model acc | Γ non-zeros "
          "| filters/neurons selected | s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        s = summarize(Path(path))
        sparse = f"{s['sparse']:.2f}" if s["sparse"] is not None else "–"
        nonzeros = f"{100 * s['gamma_nonzero_share']:.1f}%" if s["gamma_nonzero_share"] is not None else "–"
        filters = ", ".join(f"{k} {v}" for k, v in s["filters"].items()) if s["filters"] else "–"
        print(f"| {s['run']} | {s['optimizer']} | {s['epochs']} | {s['dense']:.2f} | {s['best']:.2f} | {sparse} "
              f"| {nonzeros} | {filters} | {s['seconds_per_epoch']:.1f} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SplitLBIError as error:  # not a run directory, or one without an epoch yet
        print(f"summarize_runs.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
