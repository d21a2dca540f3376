"""One owner of a run directory (``train.rundir``) and one epoch loop (``train.loop.run_epochs``):
the settings rule for resuming, skip / resume / train, and the loop's checks for retraining."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from splitlbi.errors import SplitLBIError
from splitlbi.experiments.workspace import Workspace, config_settings
from splitlbi.models import create_model
from splitlbi.prune.retrain import retrain
from splitlbi.train import TrainConfig, load_checkpoint, run_training
from splitlbi.train.rundir import (
    METRICS_COLUMNS, completed_epochs, remove_unstarted_run, train_or_resume,
)

# LeNet-5 on 128 of the bundled digits: 2 batches per epoch, no files needed.
SMALL = dict(model="lenet5", dataset="digits", batch_size=64, limit_train=128, limit_test=64, lr=0.05,
             device="cpu", progress=False, optimizer="sgd", epochs=2)


class Stop(Exception):
    pass


def _interrupted_after_epoch_one(config: TrainConfig, run_dir: Path) -> None:
    def stop(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_training(config, run_dir, log=None, on_epoch_end=stop)
    assert completed_epochs(run_dir) == 1


def test_train_or_resume_resumes_then_skips(tmp_path: Path) -> None:
    config = TrainConfig(**SMALL)
    run_dir = tmp_path / "run"
    _interrupted_after_epoch_one(config, run_dir)
    assert train_or_resume(config, run_dir) == "resumed"
    assert completed_epochs(run_dir) == 2
    before = (run_dir / "metrics.csv").read_text()
    assert train_or_resume(config, run_dir) == "finished"
    assert (run_dir / "metrics.csv").read_text() == before


def test_an_sgd_run_stored_with_other_kappa_resumes_as_the_same_run(tmp_path: Path) -> None:
    """κ, ν, λ and the coupling mean nothing to SGD: the workspace, ``train_or_resume`` and ``compare``
    treat an SGD run stored with other SplitLBI-only values as the run asked for."""
    stored = TrainConfig(**SMALL, kappa=2.0)
    requested = dataclasses.replace(stored, kappa=1.0)
    ws = Workspace(tmp_path / "ws", progress=False, log=None)
    run_dir = ws.run_dir("sgd", {"kind": "train", "config": config_settings(ws.config(requested))})
    assert run_dir == ws.run_dir("sgd", {"kind": "train", "config": config_settings(ws.config(stored))})
    _interrupted_after_epoch_one(ws.config(stored), run_dir)
    assert train_or_resume(requested, run_dir) == "resumed"
    assert completed_epochs(run_dir) == 2
    assert ws.train(requested, "sgd") == run_dir  # finished: found, nothing trained again
    # An SGD setting still counts: another learning rate is another run.
    with pytest.raises(SplitLBIError, match="other settings"):
        train_or_resume(dataclasses.replace(stored, lr=stored.lr * 2), run_dir)


def test_a_run_killed_before_its_first_checkpoint_is_trained_anew(tmp_path: Path) -> None:
    config = TrainConfig(**dict(SMALL, epochs=1))
    run_dir = tmp_path / "run"
    run_training(config, run_dir, log=None)
    # What a kill before the epoch-0 checkpoint leaves: the files of a new run, no checkpoint, no rows.
    for path in (run_dir / "checkpoints").iterdir():
        path.unlink()
    (run_dir / "metrics.csv").write_text(",".join(METRICS_COLUMNS) + "\n")
    assert train_or_resume(config, run_dir) == "trained"
    assert completed_epochs(run_dir) == 1
    # A folder holding anything else is left as it is.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "notes.txt").write_text("mine")
    assert not remove_unstarted_run(other)
    assert sorted(path.name for path in other.iterdir()) == ["config.json", "notes.txt"]


def test_retraining_stops_on_a_diverging_loss_like_training(tmp_path: Path) -> None:
    """Retraining runs through the epoch loop of ``splitlbi train``: the same non-finite check."""
    source = run_training(TrainConfig(**dict(SMALL, epochs=1)), tmp_path / "source", log=None)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    everything = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() > 1}
    out = tmp_path / "lottery"
    with pytest.raises(SplitLBIError, match=r"training stopped at lottery epoch 1/1, .*not finite.*"
                                            r"checkpoints/last.pt keeps epoch 0, the last good one \(lower --lr\)"):
        retrain(source, out, mode="lottery", masks=everything, epochs=1, lr=1e38, log=None)
    assert load_checkpoint(out)["epoch"] == 0
    assert (out / "metrics.csv").read_text() == ",".join(METRICS_COLUMNS) + "\n"


def test_train_or_resume_falls_back_from_a_damaged_last_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(**SMALL, save_every=1)
    run_dir = tmp_path / "run"
    _interrupted_after_epoch_one(config, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    last.unlink()  # a hard link to epoch_0001.pt, which stays whole
    last.write_bytes(b"not a checkpoint")
    lines: list = []
    assert train_or_resume(config, run_dir, log=lines.append) == "resumed"
    assert any(line.startswith("skipping checkpoints/last.pt") for line in lines)
    assert any("resuming" in line and "from epoch 1/2" in line for line in lines)
    assert completed_epochs(run_dir) == 2
