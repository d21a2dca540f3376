"""Table of scripts/subnetworks_demo.sh: accuracy, filters/weights kept, parameters and MACs per method.

    python scripts/summarize_subnetworks.py RUNS_DIR K
"""
import sys
from pathlib import Path

from splitlbi.errors import SplitLBIError
from splitlbi.experiments.reproduce import mask_facts
from splitlbi.train.run import read_run_config
from splitlbi.train.runfiles import read_metric_columns


def summarize(runs: Path, k: str) -> None:
    rows = [("SGD (dense)", "sgd", None), ("SplitLBI (dense W at epoch 10)", "splitlbi", None),
            (f"SplitLBI early stop K={k} + lottery retraining", "splitlbi-lottery", "mask.pt"),
            ("SGD (Lottery), same per-layer sparsity", "sgd-lottery", "mask.pt"),
            ("Network Slimming, same share of filters", "slimming", "mask.pt"),
            ("Scratch-E, SplitLBI's architecture", "scratch-e", "mask.pt")]
    info = read_run_config(runs / "splitlbi")
    size = info["image_size"]
    shape = [info["in_channels"], *([size] * 2 if isinstance(size, int) else size)]
    print("| method | filters kept | weights kept | parameters | MACs | test acc. (%) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, folder, mask in rows:
        if not (runs / folder / "metrics.csv").is_file():
            print(f"| {name} | | | | | not run |")
            continue
        accuracy = read_metric_columns(runs / folder)["test_acc"][-1]
        if mask is None:
            facts = mask_facts(None, shape, info)
        else:
            facts = mask_facts(runs / folder / mask, shape, info)
        print(f"| {name} | {100 * facts['filters_kept']:.1f}% | {100 * facts['weights_kept']:.1f}% | "
              f"{facts['params'] / 1e3:.1f}k ({100 * facts['params_share']:.1f}%) | "
              f"{facts['macs'] / 1e6:.2f}M ({100 * facts['macs_share']:.1f}%) | {accuracy:.2f} |")


def main(argv: list) -> int:
    if len(argv) != 2:
        print("usage: python scripts/summarize_subnetworks.py RUNS_DIR K", file=sys.stderr)
        return 2
    try:
        summarize(Path(argv[0]), argv[1])
    except (SplitLBIError, OSError) as error:  # a folder without the runs of subnetworks_demo.sh
        print(f"summarize_subnetworks.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
