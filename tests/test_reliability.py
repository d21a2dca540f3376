"""Issue 11, "runs that survive anything": one test per numbered item of the issue.

1. one writer per run directory     5. one-line errors instead of tracebacks
2. non-finite losses stop the run   6. no silent acceptance
3. resume from any valid checkpoint 7. no temporary files left behind
4. no lost history on resume        8. the SplitLBI Python API validates
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn.functional as F

from splitlbi import SplitLBI
from splitlbi.cli.main import main
from splitlbi.errors import SplitLBIError
from splitlbi.experiments.recipes import load_recipe
from splitlbi.models import create_model
from splitlbi.prune import retrain, save_mask_file
from splitlbi.train import TrainConfig, load_checkpoint, run_training, train_one_epoch
from splitlbi.train.loop import NonFiniteError
from splitlbi.train.rundir import LOCK_FILE, RunDirBusyError, RunDirLock, lock_run_dir, holds_run_dirs
from splitlbi.utils.io import atomic_torch_save
from helpers import assert_one_line_error, read_rows

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}

# Two batches per epoch on the bundled digits: a run takes about a second.
TINY = TrainConfig(dataset="digits", epochs=3, batch_size=64, limit_train=128, limit_test=64, lr=0.05,
                   lr_milestones=(2,), save_every=1, progress=False)
TINY_ARGS = ["--dataset", "digits", "--limit-train", "128", "--limit-test", "64", "--batch-size", "64",
             "--no-progress"]


def splitlbi(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitlbi", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def in_process(args: List[str], capsys: pytest.CaptureFixture) -> tuple:
    """``splitlbi ARGS`` in this process: (exit status, stderr lines)."""
    status = main(args)
    return status, capsys.readouterr().err.strip().splitlines()


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert a["epoch"] == b["epoch"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, b["optimizer"]["state"][index][key]), (index, key)


def without_seconds(path: Path) -> List[dict]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in read_rows(path)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY trained in one go: the reference of the resume tests."""
    return run_training(TINY, tmp_path_factory.mktemp("straight") / "run", log=None)


@pytest.fixture
def two_epochs(tmp_path: Path) -> Path:
    """TINY stopped after epoch 2 (as if killed there): resuming it must reach ``straight``."""
    return run_training(dataclasses.replace(TINY, epochs=2), tmp_path / "run", log=None)


# --- 1. one writer per run directory ------------------------------------------------------


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that holds ``directory``'s lock until killed."""
    script = ("import sys, time; from splitlbi.train.rundir import RunDirLock; "
              f"RunDirLock({str(directory)!r}).acquire(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_1_a_second_writer_gets_one_line_naming_the_directory_and_holder(two_epochs: Path, tmp_path: Path) -> None:
    holder = _hold_lock(two_epochs)
    try:
        resumed = splitlbi("train", "--resume", str(two_epochs), "--epochs", "3")
        assert_one_line_error(resumed, str(two_epochs), f"pid {holder.pid}", "in use")
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        second = _hold_lock(fresh)
        try:
            started = splitlbi("train", *TINY_ARGS, "--out", str(fresh))
            assert_one_line_error(started, str(fresh), f"pid {second.pid}")
            baseline = splitlbi("baseline", "sfp", *TINY_ARGS[:-1], "--epochs", "1", "--out", str(fresh))
            assert_one_line_error(baseline, str(fresh), f"pid {second.pid}")
        finally:
            second.kill()
            second.wait()
        assert not (fresh / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock with the process
        holder.wait()
    rows_before = len(read_rows(two_epochs / "metrics.csv"))
    assert rows_before == 2
    run_training(dataclasses.replace(TINY, epochs=3), two_epochs, resume=True, log=None)
    assert [row["epoch"] for row in read_rows(two_epochs / "metrics.csv")] == ["1", "2", "3"]


def test_1_the_lock_is_reentrant_in_a_process_and_exclusive_across(tmp_path: Path) -> None:
    @holds_run_dirs
    def outer() -> None:
        lock_run_dir(tmp_path / "run")
        lock_run_dir(tmp_path / "run")  # a baseline calling retrain on its own output
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())

    outer()
    holder = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunDirLock(tmp_path / "run"):  # free again once the holder is gone
        pass


# --- 2. non-finite losses -----------------------------------------------------------------


def test_2_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    result = splitlbi("train", *TINY_ARGS, "--epochs", "2", "--lr", "1e6", "--out", str(run_dir))
    # The first epoch's weights overflow on the test images, the second's loss is nan.
    assert_one_line_error(result, "epoch 1/2", "step", "not finite", "last.pt keeps epoch 0")
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["epoch"] == 0
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint["model"].values())
    assert read_rows(run_dir / "metrics.csv") == []


def test_2_train_one_epoch_stops_or_skips_the_bad_batch() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (96,))
    calls = []

    def nan_on_second_batch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = F.cross_entropy(logits, targets)
        return loss * math.nan if len(calls) == 2 else loss

    def fresh() -> tuple:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        return model, SplitLBI(model.named_parameters(), lr=0.1)

    model, optimizer = fresh()
    with pytest.raises(NonFiniteError, match="step 2 of 3") as raised:
        train_one_epoch(model, optimizer, images, labels, batch_size=32, mean=[0.5], std=[0.5],
                        loss_function=nan_on_second_batch, progress=False, description="epoch 1/1")
    assert raised.value.step == 2
    calls.clear()
    model, optimizer = fresh()
    result = train_one_epoch(model, optimizer, images, labels, batch_size=32, mean=[0.5], std=[0.5],
                             loss_function=nan_on_second_batch, progress=False, nonfinite="skip")
    assert result.skipped == 1 and math.isfinite(result.loss)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- 3. resume from the newest valid checkpoint -----------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "init.pt", "other model", "missing",
                                    "nan weights"])
def test_3_a_damaged_last_pt_falls_back_to_the_newest_valid_epoch_file(
        damage: str, straight: Path, two_epochs: Path) -> None:
    last = two_epochs / "checkpoints" / "last.pt"
    good = last.read_bytes()
    last.unlink()  # last.pt is a hard link of epoch_0002.pt: damage only the name last.pt
    if damage == "truncated":
        last.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "init.pt":
        last.write_bytes((two_epochs / "init.pt").read_bytes())
    elif damage == "other model":
        other = load_checkpoint(two_epochs, 2)
        other["model"] = create_model("resnet20", num_classes=10, in_channels=1).state_dict()
        torch.save(other, last)
    elif damage == "nan weights":
        bad = load_checkpoint(two_epochs, 2)
        next(iter(bad["model"].values())).fill_(math.nan)
        torch.save(bad, last)
    lines: List[str] = []
    run_training(dataclasses.replace(TINY, epochs=3), two_epochs, resume=True, log=lines.append)
    if damage != "missing":
        assert any(line.startswith("skipping checkpoints/last.pt") for line in lines), lines
        assert (two_epochs / "checkpoints" / "last.pt.rejected").is_file()
        assert any("resuming from checkpoints/epoch_0002.pt" in line for line in lines), lines
    assert_same_weights(straight, two_epochs)
    assert without_seconds(two_epochs / "metrics.csv") == without_seconds(straight / "metrics.csv")
    assert (two_epochs / "path.csv").read_text() == (straight / "path.csv").read_text()


def test_3_a_run_killed_before_its_first_checkpoint_restarts_on_resume(straight: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    # What a kill leaves right after config.json was written: no init.pt, no checkpoint.
    (run_dir / "config.json").write_text((straight / "config.json").read_text())
    assert splitlbi("train", "--resume", str(run_dir)).returncode == 0
    assert_same_weights(straight, run_dir)
    assert without_seconds(run_dir / "metrics.csv") == without_seconds(straight / "metrics.csv")
    assert (run_dir / "init.pt").is_file()


def test_3_every_checkpoint_damaged_restarts_from_epoch_zero(straight: Path, two_epochs: Path) -> None:
    for path in (two_epochs / "checkpoints").glob("*.pt"):
        path.unlink()
        path.write_bytes(b"not a checkpoint")
    lines: List[str] = []
    run_training(dataclasses.replace(TINY, epochs=3), two_epochs, resume=True, log=lines.append)
    assert any("restarting it from epoch 0" in line for line in lines), lines
    assert_same_weights(straight, two_epochs)


# --- 4. no lost history -----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["metrics.csv deleted", "metrics.csv last row cut", "path.csv deleted",
                                  "path.csv rows of epoch 1 lost"])
def test_4_resume_rebuilds_lost_rows_from_the_checkpoint(loss: str, straight: Path, two_epochs: Path) -> None:
    metrics, path = two_epochs / "metrics.csv", two_epochs / "path.csv"
    if loss == "metrics.csv deleted":
        metrics.unlink()
    elif loss == "metrics.csv last row cut":
        metrics.write_text(metrics.read_text()[:-20])
    elif loss == "path.csv deleted":
        path.unlink()
    else:
        path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                if not line.startswith("1,")))
    lines: List[str] = []
    run_training(dataclasses.replace(TINY, epochs=3), two_epochs, resume=True, log=lines.append)
    assert any(line.startswith("rebuilt ") for line in lines), lines
    assert without_seconds(metrics) == without_seconds(straight / "metrics.csv")
    assert path.read_text() == (straight / "path.csv").read_text()


def test_4_without_a_saved_history_missing_rows_are_refused(two_epochs: Path) -> None:
    # A checkpoint of an older version: no history inside it.
    for path in [two_epochs / "checkpoints" / "last.pt", *(two_epochs / "checkpoints").glob("epoch_*.pt")]:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint.pop("history")
        path.unlink()
        atomic_torch_save(checkpoint, path)
    (two_epochs / "metrics.csv").write_text((two_epochs / "metrics.csv").read_text().split("\n", 1)[0] + "\n")
    with pytest.raises(SplitLBIError, match="lacks the rows of epoch"):
        run_training(dataclasses.replace(TINY, epochs=3), two_epochs, resume=True, log=None)


# --- 5. one line, never a traceback -------------------------------------------------------


def test_5_user_mistakes_are_one_line_with_exit_code_2(
        two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = {}
    cases["out in /proc"] = (["train", *TINY_ARGS, "--out", "/proc/splitlbi-x"], "/proc/splitlbi-x")
    cases["masks --out in /proc"] = (["masks", str(two_epochs), "--epoch", "1", "--out", "/proc/x/m.pt"], "/proc/x")
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    cases["config.json a list"] = (["train", "--resume", str(listed)], "not a run's config")
    typed = tmp_path / "typed"
    typed.mkdir()
    (typed / "config.json").write_text(json.dumps({**json.loads((two_epochs / "config.json").read_text()),
                                                   "epochs": "6"}))
    cases["epochs a string"] = (["train", "--resume", str(typed)], "epochs must be an integer")
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes('title = "caf\xe9"\n'.encode("latin-1"))
    cases["recipe not UTF-8"] = (["reproduce", "fig4", "--recipe", str(recipe), "--out", str(tmp_path / "r")],
                                 "latin1.toml")
    cases["--set epochs=abc"] = (["reproduce", "fig4", "--scale", "smoke", "--set", "train.epochs=abc",
                                  "--out", str(tmp_path / "r")], "train.epochs")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('figure = "fig4"\n[smoke.train]\nepochs = 2\nlr = "fast"\n[smoke.sweep]\nkappa = [1]\nnu = [1]\n')
    cases["recipe value of the wrong type"] = (["reproduce", "fig4", "--scale", "smoke", "--recipe", str(wrong),
                                                "--out", str(tmp_path / "r")], "lr must be a number")
    for name, (args, fragment) in cases.items():
        status, lines = in_process(args, capsys)
        assert status == 2, name
        assert len(lines) == 1 and lines[0].startswith("splitlbi: error: "), (name, lines)
        assert fragment in lines[0], (name, lines)

    (two_epochs / "metrics.csv").write_bytes(b"epoch,lr\n1,\xff\xfe\n")
    from splitlbi.plots.curves import read_metrics
    with pytest.raises(SplitLBIError, match="metrics.csv"):
        read_metrics(two_epochs)

    script = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize_subnetworks.py"), str(tmp_path), "5"],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert script.returncode == 2 and "Traceback" not in script.stderr
    assert len(script.stderr.strip().splitlines()) == 1, script.stderr


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_5_a_read_only_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        status, lines = in_process(["train", *TINY_ARGS, "--out", str(folder / "run")], capsys)
    finally:
        folder.chmod(0o700)
    assert status == 2 and len(lines) == 1 and str(folder) in lines[0]


# --- 6. no silent acceptance -------------------------------------------------------------


def test_6_unknown_recipe_tables_keys_and_penalties_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SplitLBIError, match="--set bogus.epochs: unknown table 'bogus'"):
        load_recipe("fig4", "smoke", overrides=["bogus.epochs=3"])
    recipe = tmp_path / "typo.toml"
    recipe.write_text('figure = "fig4"\n[smoke.train]\nepochs = 2\n[smoke.sweep]\nkappa = [1]\nnu = [1]\nnus = [2]\n')
    with pytest.raises(SplitLBIError, match="unknown key 'nus'"):
        load_recipe("fig4", "smoke", path=recipe)
    with pytest.raises(SplitLBIError, match="--penalty 'bogus'"):
        run_training(dataclasses.replace(TINY, optimizer="sgd", penalty="bogus"), tmp_path / "sgd", log=None)
    assert not (tmp_path / "sgd").exists()


def test_6_an_empty_mask_is_an_error_unless_allowed(
        two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = create_model("lenet5", num_classes=10, in_channels=1)
    empty = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() > 1}
    mask_file = save_mask_file(tmp_path / "empty.pt", empty, model="lenet5")
    with pytest.raises(SplitLBIError, match="keep no weight"):
        retrain(two_epochs, tmp_path / "lottery", mode="lottery", masks=mask_file, epochs=1, log=None)
    assert not (tmp_path / "lottery").exists()
    status, lines = in_process(["compact", str(two_epochs), "--epoch", "2", "--masks", str(mask_file),
                                "--out", str(tmp_path / "c.pt")], capsys)
    assert status == 2 and "--allow-empty-mask" in lines[0]
    retrain(two_epochs, tmp_path / "allowed", mode="lottery", masks=mask_file, epochs=1, log=None,
            allow_empty_mask=True)
    assert len(read_rows(tmp_path / "allowed" / "metrics.csv")) == 1


# --- 7. no temporary files left behind -----------------------------------------------------


def test_7_stale_temporaries_are_removed_when_a_run_directory_is_opened(two_epochs: Path, tmp_path: Path) -> None:
    stale = [two_epochs / ".config.json.k2j3.tmp", two_epochs / "checkpoints" / ".epoch_0003.pt.a8d1.tmp",
             two_epochs / "checkpoints" / ".last.pt.link.tmp", two_epochs / "masks" / ".epoch_0003.pt.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    run_training(dataclasses.replace(TINY, epochs=3), two_epochs, resume=True, log=None)
    assert not [path for path in stale if path.exists()]
    assert not list(two_epochs.rglob("*.tmp"))
    # A new run killed while writing its first file: only a temporary is there; starting again works.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".config.json.zz.tmp").write_text("{")
    run_training(dataclasses.replace(TINY, epochs=1), fresh, log=None)
    assert not list(fresh.rglob("*.tmp"))


# --- 8. the Python API -------------------------------------------------------------------


def test_8_splitlbi_validates_hyperparameters_parameters_and_state_dicts() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    for bad in [dict(lr=math.inf), dict(kappa=math.inf), dict(nu=math.inf), dict(lam=math.inf),
                dict(weight_decay=math.inf), dict(kappa="1"), dict(lr=math.nan), dict(momentum=True)]:
        with pytest.raises(ValueError, match=f"Invalid {next(iter(bad))}"):
            SplitLBI(model.parameters(), **{"lr": 0.1, **bad})
    weight = model[0].weight
    with pytest.raises(ValueError, match="0.weight appears twice"):
        SplitLBI([("0.weight", weight), ("0.weight", weight)], lr=0.1)

    optimizer = SplitLBI(model.named_parameters(), lr=0.1)
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    SplitLBI(model.named_parameters(), lr=0.1).load_state_dict(state)  # its own state: fine

    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match="not a SplitLBI state"):
        SplitLBI(model.named_parameters(), lr=0.1).load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        SplitLBI(model.named_parameters(), lr=0.1).load_state_dict({"foo": 1})
    wider = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    target = SplitLBI(wider.named_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="parameter 0.weight: momentum_buffer has shape"):
        target.load_state_dict(state)
    assert not target.state  # nothing loaded
    without_v = optimizer.state_dict()
    del without_v["state"][0]["v"]
    with pytest.raises(ValueError, match="parameter 0.weight has no 'v'"):
        SplitLBI(model.named_parameters(), lr=0.1).load_state_dict(without_v)


# --- the kill-and-resume stress test (docs/reliability.md) ------------------------------


@pytest.mark.slow
def test_killed_and_resumed_runs_end_bitwise_equal(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "kill_resume_stress.py"), "--kills", "20",
                             "--out", str(tmp_path / "stress")], capture_output=True, text=True, timeout=3600, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "20/20 bitwise equal"
