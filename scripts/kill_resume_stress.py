"""Kill-and-resume stress test: kill small runs of several commands at many moments, finish
each with the command the user would type, and check that it ends bitwise equal to an
uninterrupted run.

    python scripts/kill_resume_stress.py --kills 20 --out /tmp/kill-resume                 # train
    python scripts/kill_resume_stress.py --commands train retrain baseline reproduce \\
        --kills 8 --out /tmp/kill-resume                                                  # every command

The commands (LeNet-5 on the bundled digits, a few epochs each):

* ``train``: ``splitlbi train``, finished with ``splitlbi train --resume`` (or the same
  ``splitlbi train --out`` when the kill came before ``config.json`` existed);
* ``retrain``: ``splitlbi retrain SOURCE --epoch 2 --mode finetune`` of a SplitLBI run
  trained once beforehand, finished by typing the same command again;
* ``baseline``: ``splitlbi baseline sfp`` (soft filter pruning: its weights are changed
  after every epoch), finished by typing the same command again;
* ``reproduce``: ``splitlbi reproduce fig7 --recipe R --reuse SGD_RUN`` with a small
  recipe (a SplitLBI run, the SGD run copied in by ``--reuse``, lottery and fine-tuning
  retrainings, mask files, the figure), finished by typing the same command again.

Each trial starts the command and kills it with SIGKILL. Trials alternate between two
kinds of kill:

* ``write``: in the middle of the k-th write of the command (k spread over every write:
  each atomic file write, each ``metrics.csv``/``path.csv`` append, and for reproduce
  each file copied by ``--reuse``; see ``kill_points.py``): half of the bytes are written (to the atomic write's
  temporary file, appended to the CSV file, or copied), then the process kills itself.
* ``timer``: SIGKILL from outside after a random delay within the uninterrupted run's
  wall time (start-up included).

A trial passes when every run directory the command writes has the uninterrupted run's
``checkpoints/last.pt`` (model, optimizer state, scheduler, RNG states), ``metrics.csv``
(all columns but ``epoch_seconds``), ``path.csv``, mask files (``masks/epoch_XXXX.pt``,
``mask.pt``, reproduce's ``masks/``), bitwise, and no temporary file (``*.tmp``,
``*.partial``) or job lock is left. The last line is ``N/N bitwise equal`` (exit status
0) or names the trials that differ (exit status 1).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]

# Runs `splitlbi ARGS` with its writes counted; dies in the middle of write KILL_AT_EVENT (kill_points.py).
CHILD = r"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, os.environ["KILL_POINTS_DIR"])
from kill_points import KillPoints
from splitlbi.cli.main import main

points = KillPoints(int(os.environ.get("KILL_AT_EVENT", "0")), lambda: os.kill(os.getpid(), signal.SIGKILL))
status = main(sys.argv[1:])
if os.environ.get("COUNT_FILE"):
    Path(os.environ["COUNT_FILE"]).write_text(str(points.count))
sys.exit(status)
"""

DIGITS = ["--dataset", "digits", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64"]
QUIET = ["--no-progress", "--device", "cpu"]
# SplitLBI settings whose support of Gamma is not empty after two epochs of this small run.
SOURCE_LBI = ["--lr", "0.05", "--kappa", "1", "--nu", "0.1", "--lam", "0.1"]

# fig7 at the size of the runs above: a SplitLBI and an SGD run, the lottery retraining of
# the support at K = 2 (and SGD's lottery like it), fine-tuning from epoch 2.
RECIPE = """figure = "fig7"
title = "kill-and-resume stress recipe"

[smoke.train]
model = "lenet5"
dataset = "digits"
limit_train = 256
limit_test = 128
batch_size = 64
epochs = 3
lr = 0.05
lr_milestones = [2]
kappa = 1.0
nu = 0.1
lam = 0.1
save_every = 1

[smoke.run]
seeds = [0]

[smoke.subnet]
epochs = [2]
finetune_from = [2]
finetune_epochs = 2
retrain_epochs = 2
"""


def train_args(out: Path, epochs: int) -> List[str]:
    return ["train", "--model", "lenet5", *DIGITS, "--epochs", str(epochs), "--lr", "0.05", "--lr-milestones", "2",
            "--kappa", "1", "--nu", "10", "--save-every", "2", *QUIET, "--out", str(out)]


def environment(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["KILL_POINTS_DIR"] = str(Path(__file__).resolve().parent)
    env.update(extra)
    return env


def child(args: List[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=environment(**extra))


def run_to_end(args: List[str], how: str, **extra: str) -> Tuple[int, str]:
    process = child(args, **extra)
    _, err = process.communicate(timeout=1800)
    if process.returncode != 0:
        last_line = (err.strip().splitlines() or ["no message"])[-1]
        return process.returncode, f"{how}, failed with exit status {process.returncode}: {last_line}"
    return 0, how


class Command:
    """One command of the stress test: how to start it into a trial folder, how the user
    finishes it after a kill, and which run directories it writes."""

    def __init__(self, name: str, epochs: int) -> None:
        self.name = name
        self.epochs = epochs
        self.source: Optional[Path] = None  # retrain's source run, reproduce's recipe folder

    def setup(self, work: Path) -> None:
        """Whatever the trials read and never write (trained once, uninterrupted)."""
        if self.name == "retrain":
            self.source = work / "source"
            status, how = run_to_end(["train", "--model", "lenet5", *DIGITS, *SOURCE_LBI, "--epochs", "2",
                                      *QUIET, "--out", str(self.source)], "source run")
            if status:
                raise SystemExit(how)
        elif self.name == "reproduce":
            self.source = work / "reproduce-inputs"
            self.source.mkdir()
            (self.source / "recipe.toml").write_text(RECIPE)
            # A `splitlbi train` run with the recipe's SGD settings: reproduce copies it in (--reuse).
            status, how = run_to_end(["train", "--model", "lenet5", *DIGITS, "--optimizer", "sgd", "--epochs", "3",
                                      "--lr", "0.05", "--lr-milestones", "2", "--kappa", "1", "--nu", "0.1",
                                      "--lam", "0.1", *QUIET, "--out", str(self.source / "sgd")], "SGD run")
            if status:
                raise SystemExit(how)

    def args(self, trial: Path) -> List[str]:
        if self.name == "train":
            return train_args(trial, self.epochs)
        if self.name == "retrain":
            return ["retrain", str(self.source), "--epoch", "2", "--mode", "finetune", "--epochs", str(self.epochs),
                    "--lr", "0.02", "--lr-milestones", "2", "--save-every", "2", *QUIET, "--out", str(trial)]
        if self.name == "baseline":
            return ["baseline", "sfp", "--keep", "0.5", "--model", "lenet5", *DIGITS, "--epochs", str(self.epochs),
                    "--lr", "0.05", "--lr-milestones", "2", "--save-every", "2", *QUIET, "--out", str(trial)]
        assert self.source is not None
        return ["reproduce", "fig7", "--recipe", str(self.source / "recipe.toml"), "--scale", "smoke",
                "--reuse", str(self.source / "sgd"), *QUIET, "--out", str(trial)]

    def finish(self, trial: Path) -> Tuple[int, str]:
        """Bring a killed trial to its end the way a user would."""
        if self.name != "train":
            return run_to_end(self.args(trial), "the same command again")
        if (trial / "config.json").is_file():
            return run_to_end(["train", "--resume", str(trial), "--no-progress"], "resumed")
        return run_to_end(self.args(trial), "started again (killed before config.json)")

    def run_dirs(self, root: Path) -> List[Path]:
        """The run directories under ``root`` (a trial folder) to compare, relative to it."""
        if self.name != "reproduce":
            return [Path(".")]
        return sorted(path.relative_to(root) for path in (root / "runs").iterdir() if path.is_dir())


def metrics_without_seconds(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(handle)]


def same_tensors(first: object, second: object) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(
            same_tensors(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return isinstance(second, (list, tuple)) and len(first) == len(second) and all(
            same_tensors(a, b) for a, b in zip(first, second))
    return first == second


def load(path: Path) -> object:
    content = torch.load(path, weights_only=True)
    if isinstance(content, dict) and "masks" in content:
        content.pop("source", None)  # a mask file's record of where it was made: the trial's own folder for sfp
    return content


def run_differences(reference: Path, run_dir: Path) -> List[str]:
    """What differs between two finished run directories (empty: bitwise equal)."""
    found = []
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        return [f"{run_dir.name}: no checkpoints/last.pt"]
    ref_last, last = load(reference / "checkpoints" / "last.pt"), load(run_dir / "checkpoints" / "last.pt")
    # Not "history": it holds epoch_seconds, which differ between any two runs.
    for key in ("epoch", "model", "optimizer", "scheduler", "rng"):
        if not same_tensors(ref_last.get(key), last.get(key)):
            found.append(f"last.pt {key}")
    if metrics_without_seconds(reference / "metrics.csv") != metrics_without_seconds(run_dir / "metrics.csv"):
        found.append("metrics.csv")
    if (reference / "path.csv").read_bytes() != (run_dir / "path.csv").read_bytes():
        found.append("path.csv")
    found += file_differences(reference, run_dir, ["masks/*.pt", "mask.pt"])
    return found


def file_differences(reference: Path, root: Path, patterns: List[str]) -> List[str]:
    """Tensor files matching ``patterns`` that are missing or differ."""
    found = []
    for pattern in patterns:
        names = sorted(str(p.relative_to(reference)) for p in reference.glob(pattern))
        if names != sorted(str(p.relative_to(root)) for p in root.glob(pattern)):
            found.append(f"files {pattern}")
            continue
        found += [name for name in names if not same_tensors(load(reference / name), load(root / name))]
    return found


def differences(command: Command, reference: Path, trial: Path) -> List[str]:
    """What differs between the uninterrupted run and a finished trial (empty: bitwise equal)."""
    found = []
    expected = command.run_dirs(reference)
    if command.name == "reproduce" and command.run_dirs(trial) != expected:
        return [f"run directories {[str(p) for p in command.run_dirs(trial)]}"]
    for relative in expected:
        found += [f"{relative}: {what}" if str(relative) != "." else what
                  for what in run_differences(reference / relative, trial / relative)]
    if command.name == "reproduce":
        found += file_differences(reference, trial, ["masks/*.pt"])
        for table in sorted(p.name for p in (reference / "figures").glob("*.csv")):
            if (reference / "figures" / table).read_bytes() != (trial / "figures" / table).read_bytes():
                found.append(f"figures/{table}")
    left = [str(p.relative_to(trial)) for p in trial.rglob("*") if p.name.endswith((".tmp", ".partial"))
            or (p.suffix == ".lock" and p.parent.name == "runs")]
    if left:
        found.append(f"left behind: {left}")
    return found


def stress(command: Command, work: Path, kills: int, rng: random.Random, say: Callable[[str], None]) -> Tuple[int, int]:
    """Run the trials of one command; return (bitwise equal, trials)."""
    work.mkdir(parents=True)
    command.setup(work)
    reference = work / "reference"
    started = time.perf_counter()
    status, how = run_to_end(command.args(reference), "reference", COUNT_FILE=str(work / "events.txt"))
    wall = time.perf_counter() - started
    if status:
        raise SystemExit(f"the uninterrupted {command.name} failed: {how}")
    events = int((work / "events.txt").read_text())
    say(f"{command.name}: reference {events} writes, {wall:.1f}s wall (start-up included)")

    write_trials = [t for t in range(kills) if t % 2 == 0]
    # The write kills are spread over every write: the first, ..., the last (a single one: the middle write).
    if len(write_trials) == 1:
        spread = {write_trials[0]: (events + 1) // 2}
    else:
        spread = {t: 1 + round(i * (events - 1) / (len(write_trials) - 1)) for i, t in enumerate(write_trials)}
    equal = 0
    failed = []
    for trial in range(kills):
        trial_dir = work / f"trial{trial:02d}"
        if trial in spread:
            kill = f"write {spread[trial]}/{events}"
            process = child(command.args(trial_dir), KILL_AT_EVENT=str(spread[trial]))
            process.communicate(timeout=1800)
        else:
            delay = rng.uniform(0.0, wall)
            kill = f"timer {delay:.2f}s"
            process = child(command.args(trial_dir))
            try:
                process.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.communicate()
        killed = process.returncode == -signal.SIGKILL
        state = "killed" if killed else "finished before the kill"
        status, how = command.finish(trial_dir)
        found = differences(command, reference, trial_dir) if status == 0 else [how]
        verdict = "bitwise equal" if not found else "DIFFERENT: " + ", ".join(found)
        say(f"{command.name} trial {trial:2d}: {kill:<16} {state}; {how}: {verdict}")
        if found:
            failed.append(trial)
        else:
            equal += 1
    say(f"{command.name}: {equal}/{kills} bitwise equal" + (f" (different: trials {failed})" if failed else ""))
    return equal, kills


COMMANDS = ("train", "retrain", "baseline", "reproduce")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=["train"],
                        help="commands to stress (default: train)")
    parser.add_argument("--kills", type=int, default=20, help="killed-and-finished runs per command (default: 20)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the small runs (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="working folder (replaced)")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    total_equal = total = 0
    for name in args.commands:
        equal, trials = stress(Command(name, args.epochs), args.out / name, args.kills, rng,
                               lambda line: print(line, flush=True))
        total_equal += equal
        total += trials
    print(f"{time.perf_counter() - started:.0f}s in all")
    print(f"{total_equal}/{total} bitwise equal")
    return 0 if total_equal == total else 1


if __name__ == "__main__":
    sys.exit(main())
