"""What makes CPU training fastest here: threads per process, channels-last, ``--compile``,
and two processes side by side.

Each setting runs ``splitlbi train`` (ResNet-20 by default, Fashion-MNIST at 28x28, the
first ``--images`` training images, batch 128) for two epochs and reads the second
epoch's ``epoch_seconds`` from ``metrics.csv`` (the first pays for ``--compile`` and
warm-up). A "2 x" setting starts two such runs at once with one thread each and reports
their combined throughput. Throughput is training images per second of wall time,
evaluation of 1,000 test images included; the ratio column is against the plain
one-process, all-threads run measured in the same invocation.

    python benchmarks/bench_cpu_setup.py --data-dir DATA_DIR --out OUT
    python benchmarks/bench_cpu_setup.py --model lenet5 --images 20000 --data-dir DATA_DIR --out OUT
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

SETTINGS: Dict[str, Dict[str, object]] = {
    # name: (processes, threads per process, extra train flags)
    "1 process, all threads": {"processes": 1, "threads": None, "flags": []},
    "1 process, all threads, channels-last": {"processes": 1, "threads": None, "flags": ["--channels-last"]},
    "1 process, all threads, --compile": {"processes": 1, "threads": None, "flags": ["--compile"]},
    "1 process, all threads, --compile, channels-last": {"processes": 1, "threads": None,
                                                         "flags": ["--compile", "--channels-last"]},
    "2 x (1 process, 1 thread)": {"processes": 2, "threads": 1, "flags": []},
    "2 x (1 process, 1 thread, --compile)": {"processes": 2, "threads": 1, "flags": ["--compile"]},
    "2 x (1 process, 1 thread, --compile, channels-last)": {"processes": 2, "threads": 1,
                                                            "flags": ["--compile", "--channels-last"]},
}


def run_setting(name: str, setting: Dict[str, object], args: argparse.Namespace, out: Path) -> float:
    """Training images per second of wall time (all processes together) for one setting."""
    procs: List[subprocess.Popen] = []
    dirs: List[Path] = []
    for k in range(int(setting["processes"])):  # type: ignore[arg-type]
        run_dir = out / f"{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}-{k}"
        dirs.append(run_dir)
        env = dict(os.environ)
        if setting["threads"] is not None:
            env["OMP_NUM_THREADS"] = str(setting["threads"])
        command = [sys.executable, "-m", "splitlbi", "train", "--model", args.model, "--dataset", args.dataset,
                   "--limit-train", str(args.images), "--limit-test", "1000", "--epochs", "2",
                   "--batch-size", "128", "--lr", "0.1", "--optimizer", args.optimizer, "--seed", str(k),
                   "--no-progress", "--out", str(run_dir), *setting["flags"]]  # type: ignore[misc]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{name}: splitlbi train failed (exit {proc.returncode})")
    from splitlbi.train.runfiles import read_metrics

    # Side by side, the processes overlap: their images add up over the slowest one's time.
    seconds = max(float(read_metrics(d)[-1]["epoch_seconds"]) for d in dirs)
    return len(dirs) * args.images / seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--optimizer", default="splitlbi", choices=("splitlbi", "sgd"))
    parser.add_argument("--images", type=int, default=12800, help="training images per epoch (default: 12800)")
    parser.add_argument("--data-dir", default=os.environ.get("SPLITLBI_DATA"))
    parser.add_argument("--out", required=True, help="folder for the temporary run directories")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# {args.model} on {args.dataset}, {args.optimizer}, {args.images} images/epoch, batch 128; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs")
    results = {}
    for name in args.settings:
        results[name] = run_setting(name, SETTINGS[name], args, out)
        base = results.get("1 process, all threads")
        ratio = f"{results[name] / base:.2f}x" if base else "-"
        print(f"{name:<55} {results[name]:8.0f} images/s  {ratio}", flush=True)


if __name__ == "__main__":
    main()
