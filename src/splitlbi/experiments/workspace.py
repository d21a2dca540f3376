"""A reproduction's folder of runs: each job runs once, is found again by its settings, and resumes.

A :class:`Workspace` owns ``OUT/runs/``. Every job (a training run, a retraining, a
baseline) gets a directory named ``<label>-<hash>``, where the hash covers every setting
that changes the result (not the data folder, the device or the progress bar). So a
second ``splitlbi reproduce`` with the same recipe finds the finished runs and skips
them, two figures that need the same run share it, and a changed setting makes a new
run instead of silently reusing an old one.

A job is finished when its directory holds ``job.json`` (written atomically after the job
returned). An interrupted training run resumes from its last checkpoint (bitwise the
same result on CPU) under the one rule of :func:`splitlbi.train.rundir.train_or_resume`
(the settings it was stored with must be the requested ones); an interrupted retraining
or baseline, which cannot resume, is deleted and started again. The run directories,
the job files and the locks are :mod:`splitlbi.train.rundir`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model, is_model
from splitlbi.train.config import RESUME_OVERRIDABLE_FIELDS, SPLITLBI_ONLY_FIELDS, TrainConfig
from splitlbi.train.optimizers import resolve_coupling
from splitlbi.train.rundir import (
    CHECKPOINT_DIR, CONFIG_FILE, JOB_FILE, LAST_CHECKPOINT, LOCK_FILE, changed_settings, job_done,
    job_lock, mark_job_done, read_train_config, train_or_resume,
)

__all__ = ["JOB_FILE", "Workspace", "job_hash", "config_settings"]

RUNS_DIR = "runs"
MASKS_DIR = "masks"
# Settings that do not change what a run computes (the hash ignores them).
_NOT_HASHED = frozenset(RESUME_OVERRIDABLE_FIELDS - {"epochs"})
# Settings that only SplitLBI reads: an SGD run is the same run whatever they say.
_SPLITLBI_ONLY = SPLITLBI_ONLY_FIELDS
# Settings added after runs were hashed: left out at these values (their defaults) so those runs keep their names.
_HASHED_UNLESS = {"update": "paper", "couple": "filters", "couple_stem": True, "lam_scale": "none", "widths": []}

Log = Optional[Callable[[str], None]]
PathLike = Union[str, Path]


def config_settings(config: TrainConfig) -> Dict[str, Any]:
    """The fields of ``config`` that define a run's result (JSON-ready)."""
    values = config.to_dict()
    ignored = _NOT_HASHED if config.optimizer == "splitlbi" else _NOT_HASHED | _SPLITLBI_ONLY
    return {name: values[name] for name in sorted(values)
            if name not in ignored and not (name in _HASHED_UNLESS and values[name] == _HASHED_UNLESS[name])}


def job_hash(spec: Mapping[str, Any]) -> str:
    """Eight hex digits identifying a job's settings."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _safe_label(label: str) -> str:
    allowed = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    return allowed.strip("-") or "run"


class Workspace:
    """The run directories of one reproduction under ``out/runs`` (see the module doc).

    Args:
        out: the reproduction's folder (created).
        data_dir, device, progress: applied to every training config.
        log: gets one line per job (``None``: silent); ``epoch_log`` the per-epoch lines.
        reuse: run directories trained elsewhere (``splitlbi train``); a training job whose
            settings equal one of them copies it in instead of training again.
    """

    def __init__(self, out: Path, *, data_dir: Optional[str] = None, device: str = "auto",
                 progress: bool = True, log: Log = print, epoch_log: Log = None,
                 reuse: Sequence[PathLike] = ()) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise SplitLBIError(f"--out {self.out} exists and is not a directory")
        self.data_dir, self.device, self.progress = data_dir, device, progress
        self.say = log if log is not None else (lambda line: None)
        self.epoch_log = epoch_log
        self.counts: Dict[str, int] = {}
        self.reuse: List[Tuple[TrainConfig, Path]] = []
        for folder in reuse:
            folder = Path(folder)
            if not (folder / CONFIG_FILE).is_file() or not (folder / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
                raise SplitLBIError(f"--reuse {folder} is not a run directory with a checkpoint")
            self.reuse.append((read_train_config(folder), folder))

    # ----------------------------------------------------------------- plumbing
    def config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with this workspace's data folder, device and progress setting, and its coupling
        made concrete for its model (``couple="auto"`` and friends, as the run will store them)."""
        config = dataclasses.replace(config, data_dir=self.data_dir if self.data_dir is not None else config.data_dir,
                                     device=self.device, progress=self.progress)
        if config.optimizer == "splitlbi" and is_model(config.model):
            config = resolve_coupling(config, create_model(config.model))
        return config

    def run_dir(self, label: str, spec: Mapping[str, Any]) -> Path:
        """Where the job with these settings lives."""
        return self.out / RUNS_DIR / f"{_safe_label(label)}-{job_hash(spec)}"

    def _count(self, action: str) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1

    def _finish(self, run_dir: Path, spec: Mapping[str, Any], label: str, started: float, action: str) -> Path:
        mark_job_done(run_dir, {"label": label, "spec": spec})
        self._count(action)
        self.say(f"{label}: {action} in {time.perf_counter() - started:.0f}s ({run_dir})")
        return run_dir

    def _finished(self, run_dir: Path, label: str) -> bool:
        if job_done(run_dir):
            self._count("skipped")
            self.say(f"{label}: finished before, skipped ({run_dir})")
            return True
        return False

    # ----------------------------------------------------------------- jobs
    def train(self, config: TrainConfig, label: str, wait: bool = True) -> Optional[Path]:
        """A ``run_training`` run of ``config``; resumed from its last checkpoint if interrupted.

        ``wait=False``: when another process is training this run now, return None at once
        instead of waiting for it (two reproductions sharing an ``--out`` then split the work)."""
        config = self.config(config)
        spec = {"kind": "train", "config": config_settings(config)}
        run_dir = self.run_dir(label, spec)
        if self._finished(run_dir, label):
            return run_dir
        with job_lock(run_dir, self.say, wait=wait) as held:
            if not held:
                self.say(f"{label}: another process is training it, later")
                return None
            if self._finished(run_dir, label):  # finished by another process meanwhile
                return run_dir
            return self._train(config, spec, run_dir, label)

    def _train(self, config: TrainConfig, spec: Dict[str, Any], run_dir: Path, label: str) -> Path:
        started = time.perf_counter()
        # The job's settings (epochs included), under the rule for resuming too (train_or_resume:
        # an SGD run's κ and ν as well), so that the copy is then found finished.
        reusable = [folder for stored, folder in self.reuse
                    if config_settings(stored) == spec["config"] and not changed_settings(stored, config)]
        copied = False
        if reusable and not run_dir.exists():
            self.say(f"{label}: copying the matching run {reusable[0]}")
            partial = run_dir.with_name(run_dir.name + ".partial")
            if partial.exists():  # a copy interrupted before its rename (we hold the job's lock)
                shutil.rmtree(partial)
            shutil.copytree(reusable[0], partial, ignore=shutil.ignore_patterns(LOCK_FILE))
            os.replace(partial, run_dir)
            copied = True

        def announce(step: str) -> None:
            if step == "resume":
                self.say(f"{label}: resuming ({run_dir})")
            else:
                self.say(f"{label}: training {config.model} on {config.dataset}, {config.epochs} epochs ({run_dir})")

        done = train_or_resume(config, run_dir, log=self.epoch_log, on_start=announce)
        action = "reused" if copied else {"finished": "resumed"}.get(done, done)
        return self._finish(run_dir, spec, label, started, action)

    def job(self, label: str, spec: Mapping[str, Any], make: Callable[[Path], Any]) -> Path:
        """A job that cannot resume: ``make(run_dir)`` writes ``run_dir``; a partial one is redone."""
        run_dir = self.run_dir(label, spec)
        if self._finished(run_dir, label):
            return run_dir
        with job_lock(run_dir, self.say):
            if self._finished(run_dir, label):
                return run_dir
            return self._job(label, spec, make, run_dir)

    def _job(self, label: str, spec: Mapping[str, Any], make: Callable[[Path], Any], run_dir: Path) -> Path:
        started = time.perf_counter()
        action = "trained"
        if run_dir.exists():
            shutil.rmtree(run_dir)
            action = "redone (was interrupted)"
        self.say(f"{label}: running ({run_dir})")
        make(run_dir)
        if not (run_dir / CONFIG_FILE).is_file():
            raise SplitLBIError(f"job {label} wrote no {CONFIG_FILE} in {run_dir}")
        return self._finish(run_dir, spec, label, started, action)

    def file(self, name: str, make: Callable[[Path], Any]) -> Path:
        """A small derived file (masks) under ``out/masks``; made once."""
        path = self.out / MASKS_DIR / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
        return path

    def summary(self) -> str:
        """``"3 trained, 2 skipped"``: what this workspace did so far."""
        return ", ".join(f"{count} {action}" for action, count in sorted(self.counts.items())) or "nothing to run"
