"""The growing benchmark behind docs/growing.md: a network grown along the SplitLBI path against
(a) the same family at its standard width trained for the same epochs, (b) a uniformly narrowed
network of the grown network's MACs, (c) the standard network pruned by its own path to the grown
network's MACs (``splitlbi masks --macs``) and fine-tuned (``splitlbi retrain --mode finetune``).

    python scripts/grow_bench.py --data-dir DATA_DIR --out OUT            (LeNet-5, Fashion-MNIST, 3 seeds)

Every network trains with SplitLBI and the same settings (``--epochs``, learning rate and schedule,
κ, ν, λ, batch); the grown one starts at ``--widths`` and grows by the rule (``--check-every``,
``--tau``, ``--grow-ratio``, caps = the standard widths). Per seed and network it records the final
test accuracy, the MACs and parameters of the final network, and the training compute Σ epochs ×
MACs of the network trained (the pruned network: the standard run's, plus its fine-tuning epochs ×
the compacted network's MACs), and the CPU and wall seconds of each job. Rerunning skips finished
jobs and resumes interrupted training runs. Writes OUT/grow_bench.csv (one row per seed and
network), OUT/summary.md (per seed, means ± std, the goal) and OUT/figures/grow_bench.png/.pdf/.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from splitlbi.cli.main import main as splitlbi_main
from splitlbi.grow import (
    GrowthRule, grow_network, input_shape, layout_of_config, network_cost, read_stages, training_compute,
    uniform_widths,
)
from splitlbi.plots.growth import GrowthBaseline, plot_growth
from splitlbi.prune.compact import count_macs_params
from splitlbi.prune.masks import read_mask_file
from splitlbi.train import TrainConfig
from splitlbi.train.rundir import read_run_config, train_or_resume
from splitlbi.train.runfiles import read_metrics
from splitlbi.models import create_model
from splitlbi.utils.io import atomic_write_csv, atomic_write_text

COLUMNS = ("seed", "network", "widths", "test_acc", "macs", "params", "macs_share", "epochs", "train_compute",
           "compute_share", "cpu_seconds", "wall_seconds")
NETWORKS = ("grown", "standard", "narrow", "pruned")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the folder with fashion-mnist/raw/")
    parser.add_argument("--out", type=Path, required=True, help="working folder (rerunning continues it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-milestones", type=int, nargs="*", default=[15])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--nu", type=float, default=10.0)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--widths", type=int, nargs="+", default=[3, 8, 60], help="where the grown network starts")
    parser.add_argument("--check-every", type=int, default=2)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--grow-ratio", type=float, default=1.1)
    parser.add_argument("--new-filters", default="matched", choices=("matched", "drawn"))
    parser.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning of the pruned network")
    parser.add_argument("--finetune-lr", type=float, default=0.005, help="(default: the schedule's last lr)")
    parser.add_argument("--jobs", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                        help="train only these networks and write no summary (to run them in processes side by "
                             "side: 'narrow' needs 'grown' finished, 'pruned' needs 'standard'); default: all, "
                             "then the summary")
    return parser.parse_args(argv)


class Clock:
    """CPU and wall seconds of one job (this process's CPU time: the jobs run in it one by one)."""

    def __enter__(self) -> "Clock":
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def finished_epochs(run_dir: Path) -> int:
    try:
        return len(read_metrics(run_dir))
    except Exception:  # not started
        return 0


def cli(*args: str) -> None:
    status = splitlbi_main([str(arg) for arg in args])
    if status:
        raise SystemExit(f"splitlbi {args[0]} failed (exit status {status})")


def kept_widths(mask_file: Path, convs: Sequence[Sequence[str]]) -> List[int]:
    """Widths of the compacted network: the filters each group's first conv keeps in the mask file."""
    masks = read_mask_file(mask_file)["masks"]
    return [int(masks[f"{group[0]}.weight"].flatten(1).any(dim=1).sum()) for group in convs]


def run_seed(args: argparse.Namespace, seed: int) -> List[Dict[str, object]]:
    out = args.out / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "times.json"  # one per seed: seeds may run in separate processes side by side
    times: Dict[str, Dict[str, float]] = json.loads(times_file.read_text()) if times_file.is_file() else {}
    base = TrainConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, limit_train=args.limit_train,
                       limit_test=args.limit_test, epochs=args.epochs, lr=args.lr, lr_milestones=tuple(args.lr_milestones),
                       batch_size=args.batch_size, momentum=0.9, weight_decay=args.weight_decay, kappa=1.0, nu=args.nu,
                       lam=args.lam, linear_penalty="none", seed=seed, save_every=args.epochs, progress=False,
                       device="cpu")
    rule = GrowthRule(check_every=args.check_every, tau=args.tau, ratio=args.grow_ratio, init=args.new_filters)
    layout = layout_of_config(dataclasses.replace(base, widths=tuple(args.widths)))
    log = lambda line: print(f"[seed {seed}] {line}", flush=True)  # noqa: E731

    def timed(name: str, job) -> None:
        """Run ``job``, adding its seconds to the job's total (an interrupted job's runs add up;
        a finished one only checks that it is)."""
        if name not in args.jobs:
            return
        with Clock() as clock:
            job()
        if times_file.is_file():  # another process may have added its job's times meanwhile
            times.update({key: value for key, value in json.loads(times_file.read_text()).items() if key != name})
        total = times.setdefault(name, {"cpu": 0.0, "wall": 0.0})
        total["cpu"] += clock.cpu
        total["wall"] += clock.wall
        atomic_write_text(times_file, json.dumps(times, indent=2))

    # The grown network.
    grow_dir = out / "grown"

    def grow() -> None:
        if finished_epochs(grow_dir) == args.epochs:
            return
        started = (grow_dir / "config.json").is_file()
        if grow_dir.is_dir() and not started:
            shutil.rmtree(grow_dir)  # killed before it wrote anything to keep
        grow_network(dataclasses.replace(base, widths=tuple(args.widths)), rule, grow_dir, resume=started, log=log)

    timed("grown", grow)
    info = read_run_config(grow_dir)
    shape = input_shape(info)
    grown = read_stages(grow_dir)[-1]
    grown_widths = list(grown["widths"].values())

    def cost(widths: Sequence[int]):
        return network_cost(args.model, info["num_classes"], info["in_channels"], shape, widths)

    standard_macs, standard_params = cost(layout.standard)

    # (a) the standard width, same epochs.
    standard_dir = out / "standard"
    timed("standard", lambda: train_or_resume(base, standard_dir, log=log))

    # (b) uniformly narrowed to the grown network's MACs.
    example = torch.zeros(1, *shape)
    narrow_widths = list(uniform_widths(
        lambda widths: create_model(args.model, num_classes=info["num_classes"], in_channels=info["in_channels"],
                                    widths=list(widths)),
        layout.standard, grown["macs"], lambda network: count_macs_params(network, example)[0]))
    narrow_dir = out / "narrow"
    timed("narrow", lambda: train_or_resume(dataclasses.replace(base, widths=tuple(narrow_widths)), narrow_dir,
                                             log=log))

    # (c) the standard network pruned by its own path to the grown network's MACs, then fine-tuned.
    fraction = grown["macs"] / standard_macs
    mask_file = out / "pruned_masks.pt"
    pruned_dir = out / "pruned"

    def prune() -> None:
        if not mask_file.is_file():
            cli("masks", standard_dir, "--epoch", args.epochs, "--macs", f"{fraction:.6f}", "--out", mask_file)
        if finished_epochs(pruned_dir) != args.finetune_epochs:
            shutil.rmtree(pruned_dir, ignore_errors=True)  # retraining runs do not resume: start it again
            cli("retrain", standard_dir, "--epoch", args.epochs, "--mode", "finetune", "--masks", mask_file,
                "--epochs", args.finetune_epochs, "--lr", args.finetune_lr, "--momentum", 0.9, "--weight-decay",
                args.weight_decay, "--seed", seed, "--device", "cpu", "--no-progress", "--out", pruned_dir)

    timed("pruned", prune)
    if set(args.jobs) != set(NETWORKS):
        return []
    pruned_widths = kept_widths(mask_file, [layout.convs(g) for g in range(len(layout.groups))])

    def final_accuracy(run_dir: Path) -> float:
        return float(read_metrics(run_dir)[-1]["test_acc"])

    rows = []
    entries = [
        ("grown", grown_widths, final_accuracy(grow_dir), training_compute(grow_dir), args.epochs),
        ("standard", list(layout.standard), final_accuracy(standard_dir), args.epochs * standard_macs, args.epochs),
        ("narrow", narrow_widths, final_accuracy(narrow_dir), args.epochs * cost(narrow_widths)[0], args.epochs),
        ("pruned", pruned_widths, final_accuracy(pruned_dir),
         args.epochs * standard_macs + args.finetune_epochs * cost(pruned_widths)[0],
         args.epochs + args.finetune_epochs),
    ]
    for name, widths, accuracy, compute, epochs in entries:
        macs, params = cost(widths)
        clock = times.get(name, {})
        rows.append({"seed": seed, "network": name, "widths": " ".join(map(str, widths)), "test_acc": accuracy,
                     "macs": macs, "params": params, "macs_share": macs / standard_macs, "epochs": epochs,
                     "train_compute": compute, "compute_share": compute / (args.epochs * standard_macs),
                     "cpu_seconds": clock.get("cpu", ""), "wall_seconds": clock.get("wall", "")})
    return rows


def mean_std(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 \
        else f"{values[0]:.2f}"


def summarize(args: argparse.Namespace, rows: List[Dict[str, object]]) -> str:
    by = {name: [r for r in rows if r["network"] == name] for name in NETWORKS}
    mean = {name: {key: statistics.fmean(float(r[key]) for r in by[name])
                   for key in ("test_acc", "macs", "params", "train_compute", "macs_share", "compute_share")}
            for name in NETWORKS}
    lines = [f"# Growing {args.model} on {args.dataset} ({len(args.seeds)} seeds)", "",
             "| seed | network | widths | test acc (%) | MACs | MACs / standard | params | training compute / standard "
             "| CPU s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = f"{r['cpu_seconds']:.0f}" if r["cpu_seconds"] != "" else ""
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] != "" else ""
        lines.append(f"| {r['seed']} | {r['network']} | {r['widths']} | {r['test_acc']:.2f} | {r['macs']:,} | "
                     f"{100 * r['macs_share']:.1f}% | {r['params']:,} | {100 * r['compute_share']:.1f}% | {cpu} | {wall} |")
    lines += ["", "| network | test acc (%), mean ± std | MACs / standard | params | training compute / standard |",
              "|---|---|---|---|---|"]
    for name in NETWORKS:
        lines.append(f"| {name} | {mean_std([float(r['test_acc']) for r in by[name]])} | "
                     f"{100 * mean[name]['macs_share']:.1f}% | {mean[name]['params']:,.0f} | "
                     f"{100 * mean[name]['compute_share']:.1f}% |")
    grown, standard, narrow = mean["grown"], mean["standard"], mean["narrow"]
    goals = [
        ("within 0.3 points of the standard network's accuracy", grown["test_acc"] >= standard["test_acc"] - 0.3,
         f"{grown['test_acc']:.2f} vs {standard['test_acc']:.2f} ({grown['test_acc'] - standard['test_acc']:+.2f})"),
        ("at <= 60 % of its MACs", grown["macs_share"] <= 0.6, f"{100 * grown['macs_share']:.1f}%"),
        ("above the uniformly narrowed network of the same MACs", grown["test_acc"] > narrow["test_acc"],
         f"{grown['test_acc']:.2f} vs {narrow['test_acc']:.2f} at {100 * narrow['macs_share']:.1f}% MACs"),
        ("with less training compute than the standard network", grown["train_compute"] < standard["train_compute"],
         f"{100 * grown['compute_share']:.1f}% of it"),
    ]
    lines += ["", "Goal (means of the seeds):", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {what}: {detail}" for what, ok, detail in goals]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows: List[Dict[str, object]] = []
    for seed in args.seeds:
        rows.extend(run_seed(args, seed))
    if set(args.jobs) != set(NETWORKS):
        return 0
    atomic_write_csv(args.out / "grow_bench.csv", COLUMNS, [[row[c] for c in COLUMNS] for row in rows])
    summary = summarize(args, rows)
    atomic_write_text(args.out / "summary.md", summary)
    baselines = [GrowthBaseline(label, [float(r["macs"]) for r in rows if r["network"] == name],
                                [float(r["test_acc"]) for r in rows if r["network"] == name])
                 for name, label in (("standard", "standard width"), ("narrow", "narrow (uniform, same MACs)"),
                                     ("pruned", "pruned (path, same MACs) + fine-tuning"))]
    plot_growth([args.out / f"seed{seed}" / "grown" for seed in args.seeds], args.out / "figures" / "grow_bench.png",
                baselines=baselines)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
