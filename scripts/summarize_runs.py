"""Print a markdown table of finished runs: final accuracies, non-zeros of Γ, filters kept per layer.

    python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path


def summarize(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    # Runs written before the rename call the share of non-zeros of Γ "sparsity".
    metrics = [{"gamma_nonzero_share" if key == "sparsity" else key: value for key, value in row.items()}
               for row in csv.DictReader((run / "metrics.csv").open())]
    last = metrics[-1]
    rows = list(csv.DictReader((run / "path.csv").open()))
    final_epoch = max(int(r["epoch"]) for r in rows)
    selected, total = Counter(), Counter()
    for r in rows:
        if int(r["epoch"]) == final_epoch:
            total[r["layer"]] += 1
            selected[r["layer"]] += r["in_support"] in ("1", "True")
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


def main(paths: list[str]) -> None:
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


if __name__ == "__main__":
    main(sys.argv[1:])
