"""Kill-and-resume stress test: kill a small training run at many moments, resume it, and
check that it ends bitwise equal to an uninterrupted run.

    python scripts/kill_resume_stress.py --kills 20 --out /tmp/kill-resume

Each trial starts ``splitlbi train`` (LeNet-5 on the bundled digits, a few epochs) and
kills it with SIGKILL, then runs ``splitlbi train --resume`` to the end (or, when the kill
came before ``config.json`` existed, the same ``splitlbi train --out`` again). Trials
alternate between two kinds of kill:

* ``write``: in the middle of the k-th file write of the run (k spread over every write:
  ``config.json``, ``init.pt``, the CSV headers, the epoch-0 checkpoint (before the first
  checkpoint exists), each epoch's ``metrics.csv``/``path.csv`` appends, mask files and
  checkpoints): half of the bytes are written (to the atomic write's temporary file, or
  appended to the CSV file), then the process kills itself.
* ``timer``: SIGKILL from outside after a random delay within the uninterrupted run's
  wall time (start-up included).

A trial passes when the final ``checkpoints/last.pt`` (model, optimizer state, scheduler,
epoch), ``metrics.csv`` (all columns but ``epoch_seconds``), ``path.csv`` and every
``masks/epoch_XXXX.pt`` are bitwise equal to the uninterrupted run's, and no temporary
file is left. The last line is ``N/N bitwise equal`` (exit status 0) or names the trials
that differ (exit status 1).
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
from typing import Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]

# Runs `splitlbi ARGS` with file writes counted; dies in the middle of write KILL_AT_EVENT.
CHILD = r"""
import io, os, signal, sys
from pathlib import Path
from splitlbi.utils import io as atomic
from splitlbi.train import rundir
from splitlbi.cli import train as train_command
from splitlbi.cli.main import ArgumentParser, report_error
from splitlbi.errors import SplitLBIError

def main(argv):
    # `splitlbi train` as cli.main runs it; only the other subcommands stay unloaded (faster start).
    parser = ArgumentParser(prog="splitlbi")
    train_command.add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        namespace = parser.parse_args(argv)
        return int(namespace.func(namespace) or 0)
    except SplitLBIError as error:
        report_error(error)
        return 2

kill_at = int(os.environ.get("KILL_AT_EVENT", "0"))
count = [0]

def due():
    count[0] += 1
    return count[0] == kill_at

def die():
    os.kill(os.getpid(), signal.SIGKILL)

original_write = atomic._atomic_write
def _atomic_write(path, write):
    if due():
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        destination = Path(path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(destination.parent / f".{destination.name}.killed.tmp", "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        die()
    return original_write(path, write)
atomic._atomic_write = _atomic_write

original_append = rundir.append_rows
def append_rows(path, rows):
    rows = [list(row) for row in rows]
    if due():
        text = "".join(",".join(row) + "\n" for row in rows)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text[: len(text) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        die()
    return original_append(path, rows)
rundir.append_rows = append_rows  # looked up at call time by rundir's writers

status = main(sys.argv[1:])
if os.environ.get("COUNT_FILE"):
    Path(os.environ["COUNT_FILE"]).write_text(str(count[0]))
sys.exit(status)
"""


def train_args(out: Path, epochs: int) -> List[str]:
    return ["train", "--model", "lenet5", "--dataset", "digits", "--limit-train", "256", "--limit-test", "128",
            "--batch-size", "64", "--epochs", str(epochs), "--lr", "0.05", "--lr-milestones", "2", "--kappa", "1",
            "--nu", "10", "--save-every", "2", "--no-progress", "--device", "cpu", "--out", str(out)]


def environment(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def child(args: List[str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=environment(**extra))


def finish(run_dir: Path, epochs: int) -> Tuple[int, str]:
    """Bring a killed run to its end: --resume, or a fresh start if it never wrote config.json."""
    if (run_dir / "config.json").is_file():
        args, how = ["train", "--resume", str(run_dir), "--no-progress"], "resumed"
    else:
        args, how = train_args(run_dir, epochs), "started again (killed before config.json)"
    process = child(args)
    _, err = process.communicate(timeout=600)
    if process.returncode != 0:
        last_line = (err.strip().splitlines() or ["no message"])[-1]
        return process.returncode, f"{how}, failed with exit status {process.returncode}: {last_line}"
    return 0, how


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


def differences(reference: Path, run_dir: Path) -> List[str]:
    """What differs between two finished runs (empty: bitwise equal)."""
    found = []
    ref_last = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    # Not "history": it holds epoch_seconds, which differ between any two runs.
    for key in ("epoch", "model", "optimizer", "scheduler", "rng"):
        if not same_tensors(ref_last.get(key), last.get(key)):
            found.append(f"last.pt {key}")
    if metrics_without_seconds(reference / "metrics.csv") != metrics_without_seconds(run_dir / "metrics.csv"):
        found.append("metrics.csv")
    if (reference / "path.csv").read_bytes() != (run_dir / "path.csv").read_bytes():
        found.append("path.csv")
    ref_masks = sorted(p.name for p in (reference / "masks").glob("*.pt"))
    masks = sorted(p.name for p in (run_dir / "masks").glob("*.pt"))
    if ref_masks != masks:
        found.append("mask files")
    else:
        for name in masks:
            if not same_tensors(torch.load(reference / "masks" / name, weights_only=True),
                                torch.load(run_dir / "masks" / name, weights_only=True)):
                found.append(f"masks/{name}")
    left = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp")]
    if left:
        found.append(f"temporary files left: {left}")
    return found


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="number of killed-and-resumed runs (default: 20)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the small run (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="working folder (replaced)")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rng = random.Random(args.seed)

    reference = args.out / "reference"
    started = time.perf_counter()
    process = child(train_args(reference, args.epochs), COUNT_FILE=str(args.out / "events.txt"))
    _, err = process.communicate(timeout=600)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        print(f"the uninterrupted run failed: {err}", file=sys.stderr)
        return 1
    events = int((args.out / "events.txt").read_text())
    print(f"reference: {args.epochs} epochs, {events} file writes, {wall:.1f}s wall (start-up included)")

    write_trials = [t for t in range(args.kills) if t % 2 == 0]
    # The write kills are spread over every write of the run: the first (config.json), the
    # epoch-0 checkpoint (before the first checkpoint exists), ..., the final checkpoint.
    spread = {t: 1 + round(i * (events - 1) / max(len(write_trials) - 1, 1)) for i, t in enumerate(write_trials)}
    equal = 0
    failed = []
    for trial in range(args.kills):
        run_dir = args.out / f"trial{trial:02d}"
        if trial in spread:
            kill = f"write {spread[trial]}/{events}"
            process = child(train_args(run_dir, args.epochs), KILL_AT_EVENT=str(spread[trial]))
            process.communicate(timeout=600)
        else:
            delay = rng.uniform(0.0, wall)
            kill = f"timer {delay:.2f}s"
            process = child(train_args(run_dir, args.epochs))
            try:
                process.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.communicate()
        killed = process.returncode == -signal.SIGKILL
        present = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) if run_dir.is_dir() else []
        state = f"killed, checkpoints {present or 'none'}" if killed else "finished before the kill"
        status, how = finish(run_dir, args.epochs)
        found = differences(reference, run_dir) if status == 0 else [how]
        verdict = "bitwise equal" if not found else "DIFFERENT: " + ", ".join(found)
        print(f"trial {trial:2d}: {kill:<16} {state}; {how}: {verdict}", flush=True)
        if found:
            failed.append(trial)
        else:
            equal += 1
    print(f"{equal}/{args.kills} bitwise equal" + (f" (different: trials {failed})" if failed else ""))
    return 0 if equal == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
