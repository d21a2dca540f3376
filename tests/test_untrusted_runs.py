"""Issue 24: run directories are untrusted input.

1. no code execution from any file a command or public loader reads (a malicious pickle
   planted in every file);
2. integrity: content digests in .pt files, config.json checked against the checkpoints;
3. every interrupted command (retrain, baseline, compare, reproduce --reuse) finishes
   equal when the same command is typed again;
4. one line and exit status 2 for the failures the issue lists (disk full included).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import numpy as np
import pytest
import torch

from splitlbi import SplitLBI
from splitlbi.cli.main import main
from splitlbi.errors import SplitLBIError
from splitlbi.experiments.recipes import load_recipe, recipe_path, scales_of, FIGURES
from splitlbi.experiments.reproduce import check_figure_settings
from splitlbi.models import create_model
from splitlbi.plots.filters import load_model_at, load_state_dict_at
from splitlbi.prune import load_mask_file, load_run_masks, read_mask_file, save_mask_file
from splitlbi.prune.budget import path_scores
from splitlbi.train import TrainConfig, load_checkpoint, load_masks, load_model_from_run, run_training
from splitlbi.train.rundir import (
    newest_valid_checkpoint, read_or_rebuild_run_config, read_run_config, torch_load,
)
from splitlbi.utils.io import DIGEST_PREFIX, atomic_torch_save, load_torch_file
from helpers import assert_one_line_error, read_rows

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from kill_points import KillPoints  # noqa: E402  (scripts/, shared with the stress script)
from kill_resume_stress import run_differences  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
# Two batches per epoch on the bundled digits; nu and lam small enough that Γ has a support by epoch 2.
TINY = TrainConfig(dataset="digits", epochs=2, batch_size=64, limit_train=128, limit_test=64, lr=0.05, nu=0.1,
                   lam=0.1, save_every=1, progress=False, device="cpu")
DIGITS = ["--dataset", "digits", "--limit-train", "128", "--limit-test", "64", "--batch-size", "64"]
QUIET = ["--no-progress", "--device", "cpu"]


def in_process(args: List[str], capsys: pytest.CaptureFixture) -> tuple:
    """``splitlbi ARGS`` in this process: (exit status, stderr lines)."""
    try:
        status = main([str(arg) for arg in args])
    except SystemExit as error:  # argparse's errors exit
        status = error.code
    return status, capsys.readouterr().err.strip().splitlines()


def files_of(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` but the lock (which holds the pid of the last writer)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished SplitLBI run (2 epochs, every checkpoint kept)."""
    return run_training(TINY, tmp_path_factory.mktemp("runs") / "lbi", log=None)


@pytest.fixture
def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# --------------------------------------------------------------------------- 1. no code execution


class Payload:
    """Unpickled by anything but ``weights_only``, it writes a marker file (and nothing else)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant(path: Path, marker: Path, digest: bool) -> None:
    """Replace ``path`` by a pickle that would run code: a checkpoint-shaped dict holding a Payload,
    with a valid content digest (written as splitlbi writes) or without (a plain torch.save)."""
    payload = Payload(marker)
    content = {"epoch": 2, "model": {"conv1.weight": payload}, "masks": {"conv1.weight": payload},
               "optimizer": payload, "scheduler": {"last_epoch": 2}, "rng": payload}
    path.unlink(missing_ok=True)  # last.pt is a hard link of an epoch file
    if digest:
        atomic_torch_save(content, path)
    else:
        torch.save(content, path)


def plant_everywhere(root: Path, marker: Path, *, text_files: bool = False) -> List[Path]:
    """Plant a Payload in every .pt file under ``root`` (and in every other file with ``text_files``)."""
    planted = []
    for index, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")):
        if path.suffix == ".pt" or text_files:
            plant(path, marker, digest=index % 2 == 0)
            planted.append(path)
    return planted


def test_the_only_torch_load_is_the_checked_one() -> None:
    """Every unpickling in the package goes through utils.io.load_torch_file (weights_only=True)."""
    calls = []
    for path in (REPO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "pickle"):
                keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                calls.append((str(path.relative_to(REPO)), node.func.value.id, keywords.get("weights_only")))
    assert calls == [("src/splitlbi/utils/io.py", "torch", True)], calls


@pytest.mark.parametrize("digest", [True, False], ids=["with digest", "legacy"])
def test_no_public_loader_runs_code_from_a_file(digest: bool, copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    mask_file = tmp_path / "masks.pt"
    save_mask_file(mask_file, load_masks(copy, 2), model="lenet5")
    for path in [*copy.rglob("*.pt"), mask_file]:
        plant(path, marker, digest)
    (copy / "path.csv").write_text((copy / "path.csv").read_text().split("\n", 1)[0] + "\n")  # scores: checkpoints
    config = read_run_config(copy)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    loaders: Dict[str, Callable[[], object]] = {
        "load_torch_file": lambda: load_torch_file(copy / "checkpoints" / "last.pt"),
        "rundir.torch_load": lambda: torch_load(copy / "init.pt", "cpu"),
        "load_checkpoint": lambda: load_checkpoint(copy),
        "load_checkpoint(epoch)": lambda: load_checkpoint(copy, 1),
        "load_masks": lambda: load_masks(copy, 2),
        "load_model_from_run(last)": lambda: load_model_from_run(copy),
        "load_model_from_run(init)": lambda: load_model_from_run(copy, "init"),
        "load_model_from_run(epoch)": lambda: load_model_from_run(copy, 2),
        "load_run_masks": lambda: load_run_masks(copy, 2),
        "read_mask_file": lambda: read_mask_file(mask_file),
        "load_mask_file": lambda: load_mask_file(mask_file, model),
        "plots.filters.load_state_dict_at(init)": lambda: load_state_dict_at(copy, 0),
        "plots.filters.load_model_at": lambda: load_model_at(copy, 2, config),
        "prune.budget.path_scores": lambda: path_scores(copy, 2),
    }
    for name, load in loaders.items():
        with pytest.raises(SplitLBIError, match="more than tensors and plain values|content digest"):
            load()
        assert not marker.exists(), name
    found, rejected = newest_valid_checkpoint(copy, lambda checkpoint, path: None, say=lambda line: None)
    assert found is None and len(rejected) == 3
    (copy / "config.json").unlink()
    with pytest.raises(SplitLBIError, match="no config.json"):
        read_or_rebuild_run_config(copy, say=lambda line: None)
    assert not marker.exists()


def _recipe_for(run: Path, figure: str, tmp_path: Path) -> Path:
    """A recipe whose one SplitLBI run has exactly the settings of ``run`` (for --reuse)."""
    config = read_run_config(run)
    train = {key: config[key] for key in ("model", "dataset", "limit_train", "limit_test", "batch_size", "epochs",
                                          "lr", "kappa", "nu", "lam", "save_every")}
    lines = [f'figure = "{figure}"', "[smoke.train]"] + [f"{key} = {json.dumps(value)}" for key, value in train.items()]
    path = tmp_path / f"{figure}.toml"
    path.write_text("\n".join(lines + ["[smoke.run]", "seeds = [0]"]) + "\n")
    return path


@pytest.mark.parametrize("text_files", [False, True], ids=["every .pt file", "every file"])
def test_no_command_runs_code_from_a_run_directory(text_files: bool, run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    out = tmp_path / "out"
    # Run directories written by the other commands, and a comparison and a reproduction, made while clean.
    retrained, sfp, compared, reproduced = (tmp_path / name for name in ("ft", "sfp", "compare", "reproduce"))
    retrain = ["retrain", run, "--epoch", "2", "--mode", "finetune", "--epochs", "1", *QUIET]
    baseline = ["baseline", "sfp", *DIGITS, "--epochs", "1", *QUIET]
    compare = ["compare", *DIGITS, "--optimizers", "sgd-mom", "--seeds", "0", "--epochs", "1", *QUIET]
    recipe = _recipe_for(run, "fig8", tmp_path)
    reproduce = ["reproduce", "fig8", "--recipe", recipe, *QUIET]
    for args in (retrain + ["--out", retrained], baseline + ["--out", sfp], compare + ["--out", compared],
                 reproduce + ["--out", reproduced]):
        assert in_process(args, capsys)[0] == 0, args
    for job in (reproduced / "runs").glob("*/job.json"):
        job.unlink()  # the rerun must look into the runs, not skip them
    poisoned = Path(shutil.copytree(run, tmp_path / "poisoned"))
    mask_file = tmp_path / "evil_masks.pt"
    save_mask_file(mask_file, load_masks(run, 2), model="lenet5")
    for root in (poisoned, retrained, sfp, compared, reproduced):
        plant_everywhere(root, marker, text_files=text_files)
    plant(mask_file, marker, digest=True)
    reads_a_planted_file = ["masks", poisoned, "--epoch", "2", "--out", out / "m1.pt"]
    commands = [
        reads_a_planted_file,
        [*retrain[:1], poisoned, *retrain[2:], "--out", out / "finetune"],
        ["retrain", poisoned, "--epoch", "2", "--mode", "lottery", "--epochs", "1", *QUIET, "--out", out / "lottery"],
        ["retrain", poisoned, "--epoch", "2", "--mode", "prune", *QUIET, "--out", out / "prune"],
        ["retrain", run, "--mode", "lottery", "--masks", mask_file, "--epochs", "1", *QUIET, "--out", out / "masks"],
        [*retrain, "--out", retrained],  # continuing a run of its own
        ["baseline", "scratch-e", "--masks", mask_file, *DIGITS, "--epochs", "1", *QUIET, "--out", out / "scratch"],
        [*baseline, "--out", sfp],
        [*compare, "--out", compared],
        [*reproduce, "--out", reproduced],
        [*reproduce, "--reuse", poisoned, "--out", out / "reproduce-reuse"],
        ["masks", poisoned, "--like", mask_file, "--out", out / "m2.pt"],
        ["masks", run, "--like", mask_file, "--out", out / "m3.pt"],
        ["masks", poisoned, "--epoch", "2", "--macs", "0.5", "--out", out / "m4.pt"],
        ["compact", poisoned, "--epoch", "2", "--no-accuracy", "--repeats", "1", "--out", out / "c1"],
        ["compact", run, "--epoch", "2", "--masks", mask_file, "--no-accuracy", "--repeats", "1", "--out", out / "c2"],
        ["plot", "filters", poisoned, "--layer", "conv3", "--epochs", "0", "2", "--steps", "1", "--out", out / "f.png"],
        ["plot", "filters", run, "--layer", "conv3", "--epochs", "2", "--steps", "1", "--support-from", poisoned,
         "--out", out / "g.png"],
        ["plot", "path", poisoned, "--layer", "conv3", "--out", out / "p.png"],
        ["train", "--resume", poisoned],  # last: it starts the run again, writing over the planted files
    ]
    for args in commands:
        status, lines = in_process(args, capsys)
        assert status in (0, 2), (args, lines)
        assert status == 0 or len(lines) == 1, (args, lines)
        assert not marker.exists(), args
        if args is reads_a_planted_file and not text_files:  # a load that cannot go around the file says why
            assert status == 2 and "holds more than tensors and plain values" in lines[0], lines


def test_reproduce_fig1_reuse_of_a_run_with_one_planted_epoch_file(run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The issue's repro path: a run whose last.pt is sound (it is reused as finished) and
    whose epoch_0001.pt, which fig1's filter pictures load, holds code (with a valid digest)."""
    marker = tmp_path / "MARKER"
    poisoned = Path(shutil.copytree(run, tmp_path / "poisoned"))
    plant(poisoned / "checkpoints" / "epoch_0001.pt", marker, digest=True)
    recipe = _recipe_for(run, "fig1", tmp_path)
    recipe.write_text(recipe.read_text() + "[smoke.fig1]\nlayer = \"conv3\"\nsteps = 1\n")
    status, lines = in_process(["reproduce", "fig1", "--recipe", recipe, "--reuse", poisoned, *QUIET,
                                "--out", tmp_path / "r"], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "epoch_0001.pt" in lines[0] and "holds more than tensors and plain values" in lines[0], lines
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. integrity


def flip_a_weight_byte(path: Path) -> None:
    """Flip one bit in the middle of the file's largest tensor record (its data, not the archive's structure)."""
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    data[start + record.file_size // 2] ^= 0x10
    path.unlink()
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_named_and_falls_back_like_a_truncated_file(run: Path, copy: Path) -> None:
    assert (copy / "checkpoints" / "last.pt").read_bytes()[-80:].startswith(DIGEST_PREFIX)
    flip_a_weight_byte(copy / "checkpoints" / "last.pt")
    flip_a_weight_byte(copy / "init.pt")
    flip_a_weight_byte(copy / "masks" / "epoch_0001.pt")
    torch.load(copy / "checkpoints" / "last.pt", weights_only=True)  # torch alone does not notice
    with pytest.raises(SplitLBIError, match=r"init.pt: its content digest does not match"):
        load_model_from_run(copy, "init")
    with pytest.raises(SplitLBIError, match=r"epoch_0001.pt: its content digest does not match"):
        load_run_masks(copy, 1)
    lines: List[str] = []
    run_training(dataclasses.replace(TINY, epochs=2), copy, resume=True, log=lines.append)
    assert "skipping checkpoints/last.pt: its content digest does not match" in lines[0], lines
    assert any("resuming from checkpoints/epoch_0002.pt" in line for line in lines), lines
    assert any(line.startswith("rebuilt init.pt from the run's seed (its content digest") for line in lines), lines
    assert any("masks/epoch_0001.pt is damaged" in line for line in lines), lines
    assert (copy / "checkpoints" / "last.pt.rejected").is_file()
    assert torch.equal(load_model_from_run(copy, "init").conv1.weight, load_model_from_run(run, "init").conv1.weight)
    (copy / "masks" / "epoch_0001.pt").write_bytes((run / "masks" / "epoch_0001.pt").read_bytes())  # restored by hand
    assert run_differences(run, copy) == []  # last.pt too: linked to epoch_0002.pt again


def test_files_written_before_digests_still_load(run: Path, copy: Path) -> None:
    for path in copy.rglob("*.pt"):
        content = torch.load(path, weights_only=True)
        path.unlink()
        torch.save(content, path)  # no digest: as written by older versions
    assert load_checkpoint(copy)["epoch"] == 2 and load_run_masks(copy, 2)
    run_training(dataclasses.replace(TINY, epochs=3), copy, resume=True, log=None)
    assert load_checkpoint(copy)["epoch"] == 3


def _edit_config(run_dir: Path, **changes: object) -> None:
    path = run_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("edit", ["model", "lr", "seed", "lr on a legacy checkpoint", "model on a legacy checkpoint"])
def test_an_edited_config_json_is_refused_on_resume_and_nothing_changes(
        edit: str, copy: Path, capsys: pytest.CaptureFixture) -> None:
    if "legacy" in edit:  # checkpoints of older versions hold no copy of config.json
        for path in copy.glob("checkpoints/*.pt"):
            checkpoint = torch.load(path, weights_only=True)
            del checkpoint["history"]["config_json"]
            path.unlink()
            atomic_torch_save(checkpoint, path)
    key = edit.split()[0]
    _edit_config(copy, **{key: {"model": "resnet20", "lr": 0.5, "seed": 7}[key]})
    before = files_of(copy)
    status, lines = in_process(["train", "--resume", copy, "--epochs", "3"], capsys)
    assert status == 2 and len(lines) == 1, lines
    expected = {"model": "model 'lenet5' then, 'resnet20' now", "lr": "lr 0.05 then, 0.5 now",
                "seed": "seed 0 then, 7 now", "lr on a legacy checkpoint": "initial_lr 0.05, config.json gives 0.5",
                "model on a legacy checkpoint": "its weights are not of this model"}[edit]
    assert expected in lines[0] and "nothing was changed" in lines[0], lines
    assert files_of(copy) == before


def test_a_deleted_config_json_is_rebuilt_from_the_checkpoint(run: Path, copy: Path) -> None:
    (copy / "config.json").unlink()
    lines: List[str] = []
    run_training(None, copy, resume=True, log=lines.append)
    assert lines[0] == "rebuilt config.json from checkpoints/last.pt (the file was missing)"
    assert read_run_config(copy)["model"] == "lenet5"


# --------------------------------------------------------------------------- 3. interrupted commands


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of a write (KillPoints leaves the half-written file)."""


def _die() -> None:
    raise Killed


@contextlib.contextmanager
def kill_points(event: int) -> Iterator[KillPoints]:
    points = KillPoints(event, _die)
    try:
        yield points
    finally:
        points.uninstall()


def count_writes(args: List[object]) -> int:
    with kill_points(0) as points:
        assert main([str(arg) for arg in args]) == 0
    return points.count


def killed_then_typed_again(args: List[object], event: int) -> None:
    """``splitlbi ARGS`` killed in the middle of write ``event``, then the same command again."""
    with kill_points(event), pytest.raises(Killed):
        main([str(arg) for arg in args])
    assert main([str(arg) for arg in args]) == 0


def test_an_interrupted_retrain_finishes_equal_when_typed_again(run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    retrain = ["retrain", run, "--epoch", "2", "--mode", "finetune", "--epochs", "2", "--save-every", "1", *QUIET]
    writes = count_writes([*retrain, "--out", tmp_path / "reference"])
    # The loop of the issue is gone: both ways of 'splitlbi train' send the user to the command they typed.
    with kill_points(6), pytest.raises(Killed):
        main([str(arg) for arg in [*retrain, "--out", tmp_path / "loop"]])
    for args in (["train", "--resume", tmp_path / "loop"], ["train", *DIGITS, *QUIET, "--out", tmp_path / "loop"]):
        status, lines = in_process(args, capsys)
        assert status == 2 and len(lines) == 1, lines
        assert "run the same 'splitlbi retrain' command again to continue it" in lines[0], lines
    assert in_process([*retrain, "--out", tmp_path / "loop"], capsys)[0] == 0
    assert run_differences(tmp_path / "reference", tmp_path / "loop") == []
    # The moments: config.json (nothing else yet), the first checkpoint (the run's files but
    # no checkpoint), the last checkpoint (the epoch before it kept).
    for event in (1, 6, writes):
        out = tmp_path / f"killed{event}"
        killed_then_typed_again([*retrain, "--out", out], event)
        assert run_differences(tmp_path / "reference", out) == [], event
        assert not list(out.rglob("*.tmp"))
    # A user who deleted config.json meanwhile: it is rebuilt from the checkpoint.
    (out / "config.json").unlink()
    assert main([str(arg) for arg in [*retrain, "--epochs", "3", "--out", out]]) == 0
    assert [row["epoch"] for row in read_rows(out / "metrics.csv")] == ["1", "2", "3"]


def test_an_interrupted_baseline_finishes_equal_when_typed_again(tmp_path: Path) -> None:
    sfp = ["baseline", "sfp", *DIGITS, "--epochs", "2", *QUIET]
    writes = count_writes([*sfp, "--out", tmp_path / "reference"])
    # The last write, mask.pt: killed after the last epoch, it has no epoch left whose pruning
    # step would give the mask again (the other moments are retrain's: one code path).
    killed_then_typed_again([*sfp, "--out", tmp_path / "killed"], writes)
    assert run_differences(tmp_path / "reference", tmp_path / "killed") == []


def test_an_interrupted_compare_finishes_equal_when_typed_again(tmp_path: Path) -> None:
    compare = ["compare", *DIGITS, "--optimizers", "splitlbi-mom", "--seeds", "0", "--epochs", "2", *QUIET]
    writes = count_writes([*compare, "--out", tmp_path / "reference"])
    killed_then_typed_again([*compare, "--out", tmp_path / "killed"], writes // 2)
    seed0 = Path("splitlbi-mom") / "seed0"
    assert run_differences(tmp_path / "reference" / seed0, tmp_path / "killed" / seed0) == []
    assert (tmp_path / "reference" / "table.csv").read_text() == (tmp_path / "killed" / "table.csv").read_text()


def test_reproduce_reuse_killed_between_its_copy_and_its_rename(run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe_for(run, "fig8", tmp_path)
    reproduce = ["reproduce", "fig8", "--recipe", recipe, "--reuse", run, *QUIET]
    with kill_points(3), pytest.raises(Killed):  # the third file copied
        main([str(arg) for arg in [*reproduce, "--out", tmp_path / "r"]])
    assert list((tmp_path / "r" / "runs").glob("*.partial"))
    assert in_process([*reproduce, "--out", tmp_path / "r"], capsys)[0] == 0
    [copied] = [path for path in (tmp_path / "r" / "runs").iterdir() if path.is_dir()]
    assert run_differences(run, copied) == []
    assert not list((tmp_path / "r" / "runs").glob("*.partial")) and not list((tmp_path / "r").rglob("*.lock"))


# --------------------------------------------------------------------------- 4. one line, exit status 2


def _limited(limit: int) -> Callable[[], None]:
    def preexec() -> None:  # a child with a file-size limit: writes beyond it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_is_one_line_naming_the_folder_and_the_space_and_the_run_resumes(
        run: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    args = ["train", *DIGITS, "--epochs", "2", "--lr", "0.05", "--nu", "0.1", "--lam", "0.1", *QUIET, "--out", str(out)]
    # Room for init.pt, the CSV files and the masks, not for a checkpoint with its optimizer state.
    limit = (run / "init.pt").stat().st_size + 20_000
    result = subprocess.run([sys.executable, "-m", "splitlbi", *args], capture_output=True, text=True, timeout=300,
                            env=ENV, preexec_fn=_limited(limit))
    assert_one_line_error(result, f"cannot write epoch_0001.pt in {out / 'checkpoints'}:", "needs about",
                          "file-size limit")
    assert not list(out.rglob("*.tmp"))
    run_training(None, out, resume=True, log=None)  # space again: it resumes
    assert run_differences(run, out) == []


def test_no_space_left_names_the_folder_and_keeps_the_old_file(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from splitlbi.utils import io as atomic

    target = tmp_path / "checkpoints" / "last.pt"
    atomic_torch_save({"weights": torch.zeros(1000)}, target)
    before = target.read_bytes()
    written = []

    def full_disk(self: object, data: object) -> int:  # the disk fills up after 2 kB
        written.append(len(memoryview(data).cast("B")))
        if sum(written) > 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)  # type: ignore[attr-defined]

    monkeypatch.setattr(atomic._DigestWriter, "write", full_disk)
    # torch.save wraps the OSError in a RuntimeError of its own: the cause is found behind it.
    with pytest.raises(atomic.NoSpaceError, match=rf"cannot write last.pt in {re.escape(str(target.parent))}: no space "
                                                   r"left on device; it needs about [89]\.\d kB") as raised:
        atomic_torch_save({"weights": torch.zeros(1000), "more": torch.ones(1000)}, target)
    assert len(str(raised.value).splitlines()) == 1
    assert target.read_bytes() == before and not list(target.parent.glob(".*.tmp"))


def test_the_listed_mistakes_are_one_line_with_exit_status_2(run: Path, copy: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    lenet = [*DIGITS, *QUIET, "--epochs", "1"]
    cases = {
        "train --seed 2**32": (["train", *lenet, "--seed", "4294967296", "--out", out], "--seed"),
        "retrain --seed 2**32": (["retrain", run, "--epoch", "2", "--mode", "prune", "--seed", "4294967296",
                                  "--out", out], "--seed"),
        "baseline --seed 2**32": (["baseline", "sfp", *lenet, "--seed", "4294967296", "--out", out], "--seed"),
        "plot filters --seed 2**64": (["plot", "filters", run, "--layer", "conv3", "--epochs", "1", "--seed",
                                       str(2**64), "--out", tmp_path / "f.png"], "--seed"),
        "--device cuda:huge": (["train", *lenet, "--device", "cuda:99999999999999999999", "--out", out], "--device"),
        "--pad-to 100000": (["train", *lenet, "--pad-to", "100000", "--out", out], "pad_to"),
        "--pad-to huge": (["train", *lenet, "--pad-to", "99999999999999999999", "--out", out], "pad_to"),
        "sgd --lr 1e300": (["train", *lenet, "--optimizer", "sgd", "--lr", "1e300", "--out", out], "--lr"),
        "adam --lr 1e300": (["train", *lenet, "--optimizer", "adam", "--lr", "1e300", "--out", out], "--lr"),
        "retrain --lr 1e300": (["retrain", run, "--epoch", "2", "--mode", "finetune", "--lr", "1e300", *QUIET,
                                "--out", out], "--lr"),
        "alexnet on digits": (["train", *lenet, "--model", "alexnet", "--out", out], "does not run on the 28x28 images"),
        "vgg16_bn on digits": (["train", *lenet, "--model", "vgg16_bn", "--out", out], "does not run on the 28x28 images"),
        "--set lr_milestones=5": (["reproduce", "fig4", "--set", "train.lr_milestones=5", "--out", out],
                                  "lr_milestones must be a list of integers"),
        "--set lr_milestones=[x]": (["reproduce", "fig4", "--set", 'train.lr_milestones=["x"]', "--out", out],
                                    "lr_milestones must be a list of integers"),
        "--sparsity-lambda nan": (["baseline", "slimming", "--model", "resnet20", *lenet, "--sparsity-lambda", "nan",
                                   "--out", out], "--sparsity-lambda"),
        "--out ''": (["train", *lenet, "--out", ""], "--out"),
        "compare --out RUN_DIR": (["compare", *lenet, "--optimizers", "sgd-mom", "--seeds", "0", "--out", run],
                                  "is a run directory"),
    }
    for name, (args, fragment) in cases.items():
        status, lines = in_process(args, capsys)
        assert status == 2 and len(lines) == 1 and lines[0].startswith("splitlbi: error: "), (name, lines)
        assert fragment in lines[0], (name, lines)
        assert not Path(out).exists(), name
    # The same model mistake on resume (config.json says alexnet): one line, nothing changed.
    edited = Path(shutil.copytree(run, tmp_path / "alexnet"))
    _edit_config(edited, model="alexnet")
    before = files_of(edited)
    status, lines = in_process(["train", "--resume", edited], capsys)
    assert status == 2 and len(lines) == 1 and "does not run on the 28x28 images" in lines[0]
    assert files_of(edited) == before


@pytest.mark.parametrize("key, value, fragment", [
    ("world_size", "two", "world_size must be an integer >= 1"),
    ("seed", 2**32, "--seed must be an integer from 0 to 4294967295"),
    ("num_classes", "ten", "num_classes must be an integer >= 1"),
    ("image_size", "big", "image_size must be an integer >= 1 or [height, width]"),
    ("model", None, "has no 'model'"),
    ("in_channels", None, "has no 'in_channels'"),
])
def test_a_config_json_with_values_of_the_wrong_kind_is_one_line(
        key: str, value: object, fragment: str, copy: Path, capsys: pytest.CaptureFixture) -> None:
    config = json.loads((copy / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    for args in (["train", "--resume", copy], ["masks", copy, "--epoch", "1", "--out", copy / "m.pt"]):
        status, lines = in_process(args, capsys)
        if key == "seed" and args[0] == "masks":
            assert status == 0  # the seed plays no part in reading a run
            continue
        assert status == 2 and len(lines) == 1 and fragment in lines[0], (args, lines)


def test_damaged_path_csv_and_scheduler_state(run: Path, copy: Path, capsys: pytest.CaptureFixture) -> None:
    with open(copy / "path.csv", "a") as handle:
        handle.write("2,conv3,999999999,0.5,0.5,1,0.5\n")
    status, lines = in_process(["plot", "path", copy, "--layer", "conv3", "--out", copy / "p.png"], capsys)
    assert status == 2 and "filters 0 to 999999999" in lines[0]
    last = copy / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["scheduler"]["last_epoch"] = "x"
    last.unlink()
    atomic_torch_save(checkpoint, last)
    logged: List[str] = []
    run_training(None, copy, resume=True, log=logged.append)
    assert "skipping checkpoints/last.pt: its scheduler is at epoch 'x'" in logged[0]


def test_unknown_recipe_entries_and_scales_are_errors(tmp_path: Path) -> None:
    base = recipe_path("fig4").read_text()
    path = tmp_path / "recipe.toml"
    for text, fragment in (("bogus_first = 2\n" + base, "unknown entry 'bogus_first'"),  # before the tables
                           (base + "[paperr.train]\nepochs = 2\n", "unknown scale [paperr]")):
        path.write_text(text)
        with pytest.raises(SplitLBIError, match=re.escape(fragment)):
            load_recipe("fig4", "smoke", path=path)


def test_figure_settings_are_checked_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for figure in FIGURES:  # every bundled recipe passes
        for scale in scales_of(figure):
            check_figure_settings(load_recipe(figure, scale))
    out = tmp_path / "r"
    for figure, setting, fragment in (("fig1", "fig1.layer='conv9'", "layer 'conv9'"),
                                      ("fig1", "fig1.steps=-1", "steps must be >= 0"),
                                      ("fig5", "subnet.epochs=[99]", "epochs must be epochs K from 1"),
                                      ("fig7", "subnet.finetune_from=[0]", "finetune_from must be epochs K"),
                                      ("fig5", "subnet.baselines=['pruning']", "unknown baselines")):
        status, lines = in_process(["reproduce", figure, "--set", setting, "--out", out], capsys)
        assert status == 2 and fragment in lines[0], (setting, lines)
        assert not out.exists()


def test_smaller_items_of_the_issue(run: Path, copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # masks/epoch_K.pt of another model, and a mask file with nan ("keep") values.
    other = {name: torch.ones_like(p, dtype=torch.bool)
             for name, p in create_model("resnet20", num_classes=10, in_channels=1).named_parameters() if p.dim() > 1}
    (copy / "masks" / "epoch_0001.pt").unlink()
    atomic_torch_save(other, copy / "masks" / "epoch_0001.pt")
    status, lines = in_process(["masks", copy, "--epoch", "1", "--out", tmp_path / "m.pt"], capsys)
    assert status == 2 and "the run's model is lenet5" in lines[0], lines
    masks = {name: mask.float() for name, mask in load_masks(run, 2).items()}
    next(iter(masks.values()))[0] = float("nan")
    atomic_torch_save({"masks": masks, "model": "lenet5"}, tmp_path / "nan.pt")
    status, lines = in_process(["retrain", run, "--mode", "lottery", "--masks", tmp_path / "nan.pt", *QUIET,
                                "--out", tmp_path / "nan"], capsys)
    assert status == 2 and "values other than 0 and 1" in lines[0], lines
    # A refused reproduction leaves no job lock.
    out = tmp_path / "refused"
    (out / "runs").mkdir(parents=True)
    recipe = _recipe_for(run, "fig8", tmp_path)
    status, _ = in_process(["reproduce", "fig8", "--recipe", recipe, "--reuse", run, *QUIET, "--out", out], capsys)
    assert status == 0
    _edit_config(next(p for p in (out / "runs").iterdir() if p.is_dir()), lr=0.5)  # refused on the rerun
    for job in (out / "runs").glob("*/job.json"):
        job.unlink()
    status, lines = in_process(["reproduce", "fig8", "--recipe", recipe, *QUIET, "--out", out], capsys)
    assert status == 2 and len(lines) == 1 and "trained with other settings" in lines[0], lines
    assert not list((out / "runs").glob("*.lock"))
    # SplitLBI: fused="no" is refused; NumPy and tensor learning rates are taken as torch.optim takes them.
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="Invalid fused: 'no'"):
        SplitLBI(model.parameters(), lr=0.1, fused="no")
    for lr in (np.float32(0.1), torch.tensor(0.1)):
        assert SplitLBI(model.parameters(), lr=lr).param_groups[0]["lr"] == pytest.approx(0.1)


def test_a_figure_write_killed_halfway_leaves_no_temporary_after_the_rerun(tmp_path: Path) -> None:
    """reproduce killed inside a figure's atomic write: the rerun's figure removes that temporary,
    not one that a reproduction sharing the folder is writing now."""
    import os
    import time

    from splitlbi.experiments.reproduce import remove_stale_figure_temporaries

    stale, live, figure = tmp_path / ".fig7.csv.killed.tmp", tmp_path / ".fig7.csv.abc.tmp", tmp_path / "fig7.csv"
    for path in (stale, live, figure):
        path.write_text("x")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    os.utime(figure, (time.time() - 60, time.time() - 60))
    assert remove_stale_figure_temporaries(tmp_path, time.time() - 30) == [stale]
    assert live.exists() and figure.exists() and not stale.exists()
