"""What a new user meets in the first hour (issue 12): progress bars on a terminal only,
every option in ``--help``, per-optimizer learning rates, the share of non-zeros of Γ
under an unmistakable name (old run directories still read), TensorBoard event files,
and a compacted network that deploys as a ``torch.export`` program without splitlbi."""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import List

import pytest
import torch
from torch import nn

from splitlbi.cli import main as cli_main
from helpers import read_rows

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16",
         "--eval-batch-size", "16", "--epochs", "1", "--device", "cpu"]
BAR = re.compile(rb"\d+%\|.*\| *\d+/\d+ \[")  # tqdm's "  40%|████   | 2/5 [" part


def _environment() -> dict:
    # The child imports splitlbi from this checkout even where it is not installed.
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "SPLITLBI_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run_in_pseudo_terminal(arguments: List[str], cwd: Path) -> bytes:
    """Run ``python -m splitlbi ARGUMENTS`` with stdout and stderr on a pseudo-terminal of
    no reported size (as under ``docker exec -t`` or ``script``); return all it wrote."""
    pid, descriptor = pty.fork()
    if pid == 0:  # the child: its stdin/stdout/stderr are the pseudo-terminal
        try:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "splitlbi", *arguments], _environment())
        finally:
            os._exit(127)
    output = bytearray()
    while True:
        try:
            chunk = os.read(descriptor, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output.extend(chunk)
    os.close(descriptor)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(output).decode(errors="replace")
    return bytes(output)


# --------------------------------------------------------------------------- 1. progress


def test_train_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    output = _run_in_pseudo_terminal(["train", *QUICK, "--out", "run"], tmp_path)
    assert BAR.search(output), output
    assert b"epoch 1/1" in output and b"batch/s" in output  # the training bar, by epoch
    assert b"epoch 1/1 test" in output  # and the evaluation bar
    assert b"acc=" in output and b"loss=" in output  # running loss and accuracy in the postfix
    assert re.search(rb"epoch +1/1 +lr", output)  # the one summary line per epoch stays


def test_no_bar_with_no_progress_or_into_a_pipe(tmp_path: Path) -> None:
    quiet = _run_in_pseudo_terminal(["train", *QUICK, "--out", "quiet", "--no-progress"], tmp_path)
    assert not BAR.search(quiet) and b"batch/s" not in quiet, quiet
    assert re.search(rb"epoch +1/1 +lr", quiet)
    piped = subprocess.run([sys.executable, "-m", "splitlbi", "train", *QUICK, "--out", "piped"], cwd=tmp_path,
                           env=_environment(), capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert not BAR.search(piped.stdout + piped.stderr) and b"batch/s" not in piped.stderr, piped.stderr
    assert re.search(rb"epoch +1/1 +lr", piped.stdout)


def test_progress_bar_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitlbi.train.progress import progress_bar, progress_enabled

    class Terminal:
        def isatty(self) -> bool:
            return True

    assert not progress_enabled(None, open(os.devnull, "w"))
    assert progress_enabled(None, Terminal()) and progress_enabled(True, Terminal())
    assert not progress_enabled(False, Terminal())
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert progress_bar(range(3), enabled=True).disable  # not a terminal: silent even when enabled


def test_every_long_subcommand_has_no_progress() -> None:
    parser = cli_main.build_parser()
    for command in (["train"], ["compare"], ["reproduce"], ["demo"], ["retrain"], ["baseline"], ["compact"],
                    ["plot", "filters"]):
        sub = parser
        for word in command:
            sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[word]
        assert "--no-progress" in sub.format_help(), command


# --------------------------------------------------------------------------- 2. options and errors


def _train_parser():
    parser = cli_main.build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["train"]


def test_train_help_lists_every_option_the_recipes_and_scripts_use() -> None:
    from splitlbi.train import TrainConfig
    import dataclasses

    text = _train_parser().format_help()
    for action in _train_parser()._actions:
        for option in action.option_strings:
            assert option in text, option  # nothing hidden (argparse.SUPPRESS)
    # Recipes set TrainConfig fields; each has its option ("progress" is --no-progress).
    for field in dataclasses.fields(TrainConfig):
        option = "--no-progress" if field.name == "progress" else "--" + field.name.replace("_", "-")
        assert option in text, option
    # Every option of a `splitlbi train` line in scripts/ is documented in train --help.
    for script in sorted((REPO / "scripts").glob("*.sh")):
        joined = script.read_text().replace("\\\n", " ")
        for line in joined.splitlines():
            if "splitlbi train" in line:
                for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line.split("splitlbi train", 1)[1]):
                    assert option in text, (script.name, option)


def test_unknown_option_points_to_the_subcommand_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli_main.main(["train", "--no-such-option", "1"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "unrecognized arguments: --no-such-option 1" in error and "see 'splitlbi train --help'" in error
    with pytest.raises(SystemExit):
        cli_main.main(["plot", "path", "RUN", "--layer", "conv3", "--out", "x.png", "--colour"])
    assert "see 'splitlbi plot path --help'" in capsys.readouterr().err


# --------------------------------------------------------------------------- 4. per-optimizer lr


def test_adam_without_lr_gets_its_own_default_and_learns(tmp_path: Path) -> None:
    """`--optimizer adam` without --lr: Adam's 1e-3, not SGD's 0.1 (which leaves it at chance
    level on digits), and LeNet-5 reaches what SGD reaches in the same epochs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--dataset", "digits", "--limit-train", "640", "--batch-size", "32", "--epochs", "4",
                  "--device", "cpu", "--no-progress"]
        assert cli_main.main(["train", *common, "--optimizer", "adam", "--out", str(tmp_path / "adam")]) == 0
        # SGD with the demo's learning rate for LeNet-5 on digits.
        assert cli_main.main(["train", *common, "--optimizer", "sgd", "--lr", "0.05",
                              "--out", str(tmp_path / "sgd")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "adam" / "config.json").read_text())["lr"] == pytest.approx(1e-3)
    adam = float(read_rows(tmp_path / "adam" / "metrics.csv")[-1]["test_acc"])
    sgd = float(read_rows(tmp_path / "sgd" / "metrics.csv")[-1]["test_acc"])
    assert sgd > 50, sgd  # the reference learned
    assert adam >= sgd - 3, (adam, sgd)


def test_default_learning_rates() -> None:
    from splitlbi.train import TrainConfig
    from splitlbi.train.config import apply_schedule_preset

    assert TrainConfig().lr == 0.05 and TrainConfig(optimizer="sgd").lr == 0.05  # docs/defaults.md
    assert TrainConfig(optimizer="adam").lr == 1e-3 and TrainConfig(optimizer="adagrad").lr == 1e-2
    assert TrainConfig(optimizer="adam", lr=0.01).lr == 0.01
    # The paper's preset lr (0.1) is SGD's: an adaptive optimizer keeps its own.
    assert apply_schedule_preset(TrainConfig(optimizer="adam", schedule="paper")).lr == 1e-3
    assert apply_schedule_preset(TrainConfig(schedule="paper", lr=0.5), keep={"lr"}).lr == 0.5


# --------------------------------------------------------------------------- 3. non-zeros of Γ


def test_nonzero_share_and_the_deprecated_sparsity() -> None:
    from splitlbi import NonzeroShare, SplitLBI, Sparsity

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = SplitLBI(model.named_parameters(), lr=0.1, nu=1.0, lam=0.01)
    model(torch.randn(8, 1, 8, 8)).square().mean().backward()
    opt.step()
    share = opt.nonzero_share()
    assert isinstance(share, NonzeroShare) and Sparsity is NonzeroShare
    support = opt.support()
    assert share.overall == pytest.approx(sum(int(m.sum()) for m in support.values())
                                          / sum(m.numel() for m in support.values()))
    with pytest.warns(DeprecationWarning, match="nonzero_share"):
        assert opt.sparsity() == share


def _old_style(run_dir: Path) -> None:
    """Rewrite a run's metrics.csv header as runs before the rename had it (`sparsity`)."""
    path = run_dir / "metrics.csv"
    lines = path.read_text().split("\n")
    lines[0] = lines[0].replace("gamma_nonzero_share", "sparsity")
    path.write_text("\n".join(lines))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SplitLBI run (with --tensorboard) and an SGD run of LeNet-5, two epochs on a little digits."""
    from splitlbi.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = dict(dataset="digits", epochs=2, limit_train=128, limit_test=96, batch_size=32, lr=0.05, nu=0.5,
                        lam=0.5, progress=False, device="cpu")
        tensorboard = _has_tensorboard()
        lbi = run_training(TrainConfig(**settings, tensorboard=tensorboard), root / "lbi", log=None)
        sgd = run_training(TrainConfig(**settings, optimizer="sgd", tensorboard=tensorboard), root / "sgd", log=None)
    finally:
        torch.set_num_threads(threads)
    return {"lbi": Path(lbi), "sgd": Path(sgd), "tensorboard": tensorboard}


def test_metrics_name_the_share_of_nonzeros(tiny_runs: dict) -> None:
    from splitlbi.train import METRICS_COLUMNS

    assert "gamma_nonzero_share" in METRICS_COLUMNS and "sparsity" not in METRICS_COLUMNS
    rows = read_rows(tiny_runs["lbi"] / "metrics.csv")
    assert list(rows[0]) == list(METRICS_COLUMNS)
    assert all(0.0 <= float(row["gamma_nonzero_share"]) <= 1.0 for row in rows)


def test_old_run_directories_are_still_read(tiny_runs: dict, tmp_path: Path) -> None:
    import shutil

    from splitlbi.experiments.compare import _run_result
    from splitlbi.plots.curves import read_metrics

    old = tmp_path / "old"
    shutil.copytree(tiny_runs["lbi"], old)
    _old_style(old)
    new_metrics = read_metrics(tiny_runs["lbi"])
    assert read_metrics(old)["gamma_nonzero_share"] == new_metrics["gamma_nonzero_share"]
    assert _run_result(old, 2)["final_gamma_nonzero_share"] == pytest.approx(new_metrics["gamma_nonzero_share"][-1])
    script = subprocess.run([sys.executable, str(REPO / "scripts" / "summarize_runs.py"), str(old),
                             str(tiny_runs["lbi"])], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0, script.stderr
    table = [line for line in script.stdout.splitlines() if line.startswith("| old") or line.startswith("| lbi")]
    assert len(table) == 2 and table[0].split("|")[7] == table[1].split("|")[7]  # same Γ non-zeros cell
    assert "Γ non-zeros" in script.stdout.splitlines()[0]


# --------------------------------------------------------------------------- 7. TensorBoard


def _has_tensorboard() -> bool:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def test_tensorboard_event_files_read_back(tiny_runs: dict) -> None:
    if not tiny_runs["tensorboard"]:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("the tensorboard extra is part of .[test]: install it on CI")
        pytest.skip("tensorboard is not installed (pip install 'splitlbi[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, has_gamma in (("lbi", True), ("sgd", False)):
        run_dir = tiny_runs[name]
        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        scalars, histograms = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
        for tag in ("loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr"):
            assert tag in scalars, (name, tag)
        assert "filter_norms_W/conv3" in histograms
        rows = read_rows(run_dir / "metrics.csv")
        test_acc = events.Scalars("accuracy/test")
        assert [event.step for event in test_acc] == [1, 2]
        assert [event.value for event in test_acc] == pytest.approx([float(r["test_acc"]) for r in rows], abs=1e-3)
        if has_gamma:
            share = events.Scalars("gamma_nonzero_share/overall")
            assert [e.value for e in share] == pytest.approx([float(r["gamma_nonzero_share"]) for r in rows])
            for tag in ("accuracy/sparse_test", "gamma_nonzero_share/conv3.weight", "filters_selected/conv3"):
                assert tag in scalars, tag
            assert "filter_norms_Gamma/conv3" in histograms
        else:
            assert not any(tag.startswith(("gamma_nonzero_share", "filters_selected")) for tag in scalars)
            assert "accuracy/sparse_test" not in scalars


# --------------------------------------------------------------------------- 6. deployable compact network

_FRESH_INTERPRETER = textwrap.dedent("""
    import importlib.abc, sys

    class NoSplitLBI(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "splitlbi" or name.startswith("splitlbi."):
                raise ImportError("splitlbi must not be needed to run the exported program")
            return None

    sys.meta_path.insert(0, NoSplitLBI())
    import torch
    program = torch.export.load(sys.argv[1])
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(program.module()(inputs), sys.argv[3])
    print("splitlbi imported:", any(name.split(".")[0] == "splitlbi" for name in sys.modules))
""")


def _run_exported(program: Path, inputs: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Outputs of the .pt2 ``program`` on ``inputs``, computed by a fresh interpreter that
    cannot import splitlbi."""
    torch.save(inputs, tmp_path / "inputs.pt")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", _FRESH_INTERPRETER, str(program), str(tmp_path / "inputs.pt"),
                             str(tmp_path / "outputs.pt")], capture_output=True, text=True, timeout=300,
                            env={**environment, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "splitlbi imported: False" in result.stdout
    return torch.load(tmp_path / "outputs.pt", weights_only=True)


def _random_filter_masks(model: nn.Module, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, parameter in model.named_parameters():
        if parameter.dim() == 4:
            keep = torch.rand(parameter.shape[0], generator=generator) < 0.5
            keep[0] = True
            masks[name] = keep.view(-1, 1, 1, 1).expand_as(parameter).clone()
    return masks


def test_compact_writes_a_program_that_runs_without_splitlbi(tiny_runs: dict, tmp_path: Path) -> None:
    from splitlbi.prune.compact import mask_network
    from splitlbi.train import load_model_from_run

    model = load_model_from_run(tiny_runs["lbi"], weights=2).eval()
    masks = _random_filter_masks(model, seed=4)
    torch.save({"masks": masks}, tmp_path / "masks.pt")
    result = subprocess.run([sys.executable, "-m", "splitlbi", "compact", str(tiny_runs["lbi"]), "--epoch", "2",
                             "--masks", str(tmp_path / "masks.pt"), "--out", str(tmp_path / "lenet5-compact.pt"),
                             "--repeats", "2", "--no-progress"],
                            capture_output=True, text=True, env=_environment(), timeout=300)
    assert result.returncode == 0, result.stderr
    written = {p.name for p in tmp_path.iterdir()}
    assert {"lenet5-compact.pt2", "lenet5-compact.state_dict.pt", "lenet5-compact.pt"} <= written
    # The report: parameters, MACs, latency and the test accuracy, equal for masked and compact.
    accuracy = re.search(r"test acc ([\d.]+)% \(masked\) -> ([\d.]+)% \(compact\)", result.stdout)
    assert accuracy and accuracy.group(1) == accuracy.group(2), result.stdout
    for word in ("params", "MACs", "latency"):
        assert word in result.stdout

    inputs = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # not the export's batch size
    with torch.no_grad():
        expected = mask_network(model, masks, inputs[:1]).model(inputs)
    assert (_run_exported(tmp_path / "lenet5-compact.pt2", inputs, tmp_path) - expected).abs().max() <= 1e-4
    state = torch.load(tmp_path / "lenet5-compact.state_dict.pt", weights_only=True)
    assert state["conv3.weight"].shape[0] == int(masks["conv3.weight"].flatten(1).any(1).sum())


def test_option_a_resnet_with_index_shortcuts_exports(tmp_path: Path) -> None:
    from splitlbi.models.resnet_cifar import CifarResNet
    from splitlbi.prune.compact import IndexShortcut, compact_model, mask_network
    from splitlbi.prune.export import save_compact

    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    masks = _random_filter_masks(model, seed=1)
    inputs = torch.randn(3, 1, 16, 16)
    compact, _ = compact_model(model, masks, inputs[:1], measure=False)
    assert any(isinstance(module, IndexShortcut) for module in compact.modules())
    paths = save_compact(compact, inputs, tmp_path / "resnet8")
    # Loaded in this process (the LeNet-5 test above runs a program in a fresh interpreter).
    program = torch.export.load(paths["program"])
    assert not any(type(node.target).__module__.startswith("splitlbi") for node in program.graph.nodes)
    with torch.no_grad():
        expected = mask_network(model, masks, inputs[:1]).model(inputs)
        assert (program.module()(inputs) - expected).abs().max() <= 1e-4


# --------------------------------------------------------------------------- 8. small things


def test_pretrained_weights_are_a_clear_error() -> None:
    from splitlbi.errors import SplitLBIError
    from splitlbi.models import create_model

    with pytest.raises(SplitLBIError, match="no pretrained weights"):
        create_model("resnet20", pretrained=True)
    assert isinstance(create_model("lenet5", pretrained=False), nn.Module)


def test_foreach_must_be_a_bool_or_none() -> None:
    from splitlbi import SplitLBI

    parameter = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="foreach"):
        SplitLBI([parameter], lr=0.1, foreach="yes")
    SplitLBI([parameter], lr=0.1, foreach=False)


def test_filter_path_panels_share_one_y_scale(tiny_runs: dict, tmp_path: Path) -> None:
    import shutil

    from splitlbi.plots.path import make_filter_path_figure

    figure = make_filter_path_figure([tiny_runs["lbi"], tiny_runs["sgd"]], "conv3")
    first, second = figure.axes[:2]
    assert first.get_ylim() == second.get_ylim()
    # The shared scale holds every line of every panel, whichever run is drawn first (it once froze
    # to the first panel's range and cut off the larger norms of the second).
    larger = Path(shutil.copytree(tiny_runs["sgd"], tmp_path / "sgd-larger"))
    with open(larger / "path.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # norms 10x those of the SplitLBI run's panel
        row["w_norm"] = str(10 * float(row["w_norm"]))
    with open(larger / "path.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for order in ((tiny_runs["lbi"], larger), (larger, tiny_runs["lbi"])):
        axes = make_filter_path_figure(list(order), "conv3").axes[:2]
        highest = max(max(line.get_ydata()) for ax in axes for line in ax.get_lines())
        assert axes[0].get_ylim()[0] == 0 and axes[0].get_ylim()[1] >= highest


def test_demo_output_is_ignored_by_git() -> None:
    ignored = (REPO / ".gitignore").read_text().split()
    assert "splitlbi-demo/" in ignored
