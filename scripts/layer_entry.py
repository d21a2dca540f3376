"""When each coupled layer of a SplitLBI run enters the support of Γ, beside the median norm of its
filters at initialization (docs/defaults.md: why layers enter in the order of their initial norms).

    python scripts/layer_entry.py RUN_DIR [--epochs 1 2 4 6]

Prints, per coupled layer (path.csv's layers, in network order): the median ℓ2 norm of its
filters (or |BatchNorm scale|) at epoch 0, the first epoch with any member in the support, and
the share of members in the support at the epochs asked for.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from splitlbi.train.runfiles import iter_path


def layer_entry(run_dir: Path, epochs: Sequence[int]) -> List[str]:
    norms: Dict[str, List[float]] = {}
    support: Dict[str, Dict[int, List[int]]] = {}
    for row in iter_path(run_dir):
        if row.epoch == 0:
            norms.setdefault(row.layer, []).append(row.w_norm)
        if row.in_support is not None:
            support.setdefault(row.layer, {}).setdefault(row.epoch, []).append(int(row.in_support))
    lines = [f"{'layer':<18} {'median |W| at 0':>15} {'first in':>8} " + " ".join(f"{'ep ' + str(e):>7}" for e in epochs)]
    for layer, initial in norms.items():
        by_epoch = support.get(layer, {})
        entered = [e for e in sorted(by_epoch) if e > 0 and any(by_epoch[e])]
        shares = [f"{100.0 * sum(by_epoch[e]) / len(by_epoch[e]):6.0f}%" if e in by_epoch else f"{'-':>7}"
                  for e in epochs]
        lines.append(f"{layer:<18} {statistics.median(initial):15.3f} {entered[0] if entered else '-':>8} "
                     + " ".join(shares))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 6])
    args = parser.parse_args(argv)
    print("\n".join(layer_entry(args.run_dir, args.epochs)))


if __name__ == "__main__":
    main()
