"""What SplitLBI couples by default, the names it gives, and the warnings a user sees (issue 22):
Γ still empty, a coupled layer empty while others are not, too few steps for ν, nothing
coupled; each once per run, in Python and on the command line."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitlbi
from splitlbi import SplitLBI
from splitlbi.errors import SplitLBIWarning
from splitlbi.models import create_model
from splitlbi.optim import diagnostics

from helpers import cli_environment

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("make", [lambda: create_model("lenet5"), _bn_net])
def test_the_default_couples_what_the_command_line_couples_with_filters(make) -> None:
    """A flat parameter list knows no BatchNorm: its default couples the conv filters, as
    ``splitlbi train --couple filters`` does (``param_groups(model)`` gives a BatchNorm network
    the BatchNorm coupling)."""
    model = make()
    expected = {name for group in splitlbi.param_groups(model, couple="filters", stem=True) if group["penalty"] != "none"
                for name, _ in group["params"]}
    for params in (model.named_parameters(), model.parameters()):
        opt = SplitLBI(params, lr=0.05)
        coupled = {id(c.param) for c in opt.named_coupled()}
        assert coupled == {id(p) for name, p in model.named_parameters() if name in expected}
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert id(last.weight) not in coupled  # the output layer stays uncoupled
    # the old rule is one argument away: lasso on every linear weight
    auto = SplitLBI(model.parameters(), lr=0.05, penalty="auto")
    assert id(last.weight) in {id(c.param) for c in auto.named_coupled()}


def test_plain_parameters_get_the_models_names() -> None:
    model = create_model("lenet5")
    opt = SplitLBI(model.parameters(), lr=0.05)
    assert [c.name for c in opt.named_coupled()] == ["param0", "param2", "param4"]  # nothing to go by yet
    x = torch.randn(4, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SplitLBIWarning)  # Γ is empty before any step
        with opt.sparse_model(model, x[:1]):
            pass
    assert list(opt.support()) == ["conv1.weight", "conv2.weight", "conv3.weight"]
    assert set(opt.nonzero_share().layers) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    assert list(SplitLBI(model.parameters(), lr=0.05).name_parameters(model).path_scores()) == list(opt.support())
    # names given by the user are kept
    named = SplitLBI([("a", model.conv1.weight)], lr=0.05).name_parameters(model)
    assert [c.name for c in named.named_coupled()] == ["a"]
    assert "_found_names" not in str(opt.state_dict())


def test_nothing_coupled_is_a_warning() -> None:
    with pytest.warns(SplitLBIWarning, match="no parameter carries Γ"):
        SplitLBI(nn.Linear(4, 2).parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitLBIWarning)
        SplitLBI(nn.Linear(4, 2).parameters(), lr=0.1, penalty="l1")


def _steps(model: nn.Module, opt: SplitLBI, n: int) -> torch.Tensor:
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return x


def test_empty_gamma_warns_once_with_the_nu_that_would_act() -> None:
    model = _bn_net()
    opt = SplitLBI(splitlbi.param_groups(model), lr=0.05, nu=50.0)
    x = _steps(model, opt, 3)
    top = max(float(s.max()) for s in opt.path_scores().values())
    assert 0 < top < 1
    with pytest.warns(SplitLBIWarning, match="Γ is still empty") as record:
        with opt.sparse_model(model, x[:1]):
            pass
    message = str(record[0].message)
    assert f"ν = {50 * top:.3g} would have let that filter enter by now" in message
    assert record[0].filename == __file__  # points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitLBIWarning)
        with opt.sparse_model(model, x[:1]):  # once per optimizer
            pass


def test_a_coupled_layer_with_an_empty_support_warns_naming_it() -> None:
    model = _bn_net()
    opt = SplitLBI(splitlbi.param_groups(model, couple="filters", stem=True), lr=0.05)
    x = _steps(model, opt, 1)
    first, second = model[0].weight, model[3].weight
    with torch.no_grad():  # the first conv's filters in the support, none of the second's
        opt.state[first]["v"].fill_(1.0)
        opt.state[second]["v"].mul_(0.0)
    assert diagnostics.empty_layers(opt) == (["3.weight"], 1.0)
    with pytest.warns(SplitLBIWarning, match=r"no filter of 3\.weight is in the support of Γ, while 100% of"):
        with opt.sparse_model():
            pass
    with torch.no_grad():
        opt.state[second]["v"].fill_(1.0)
    assert diagnostics.empty_layers(opt) == ([], 0.0) and diagnostics.empty_gamma_message(opt) is None


def test_steps_message_follows_the_two_time_scales() -> None:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.5, 0.25]).view(2, 1, 1, 1))  # filter norms 0.5 and 0.25
    opt = SplitLBI(conv.parameters(), lr=0.1, nu=2.0, lam=1.0)
    # the first filter enters after λν/(α‖W‖) = 1·2/(0.1·0.5) = 40 steps; decay ν/(κα) = 20 steps
    assert diagnostics.entry_steps(0.5, 0.1, 2.0, 1.0) == pytest.approx(40.0)
    assert diagnostics.decay_steps(0.1, 1.0, 2.0) == pytest.approx(20.0)
    assert diagnostics.steps_message(opt, 40) is None
    message = diagnostics.steps_message(opt, 30)
    assert "ν = 2 is too large for this run's 30 steps" in message and "40 for the largest now" in message
    assert "ν ≤ 1.5 would act" in message  # 30 · 0.1 · 0.5 / 1
    slow = SplitLBI(conv.parameters(), lr=0.1, nu=2.0, lam=0.1)  # enters after 4 steps, decays in 20
    assert "ν ≤ 1 would act" in diagnostics.steps_message(slow, 10)  # 10 · κα
    assert math.isinf(diagnostics.entry_steps(0.0, 0.1, 2.0, 1.0))


def test_command_line_warns_once_per_run(tmp_path: Path) -> None:
    """A short run with a large ν: the steps warning before the first step and Γ still empty
    at the end, each one line on stderr, once (two epochs)."""
    result = subprocess.run([sys.executable, "-m", "splitlbi", "train", "--dataset", "digits", "--limit-train", "64",
                             "--limit-test", "32", "--batch-size", "32", "--epochs", "2", "--nu", "100",
                             "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=cli_environment(), timeout=600)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("splitlbi: warning:")]
    assert len(lines) == 2, result.stderr
    assert "ν = 100 is too large for this run's 4 steps" in lines[0]
    assert "Γ is still empty" in lines[1]
    assert "Traceback" not in result.stderr


def test_retraining_prints_no_sparse_or_gamma_columns() -> None:
    from splitlbi.train.loop import summary_line

    metrics = {"epoch": 1, "lr": 0.1, "train_loss": 0.5, "train_acc": 80.0, "test_loss": 0.6, "test_acc": 75.0,
               "sparse_test_acc": 75.0, "gamma_nonzero_share": 0.4, "epoch_seconds": 1.0}
    sgd = summary_line(metrics, 3, splitlbi=False)
    assert "sparse acc" not in sgd and "Gamma" not in sgd and "mask keeps  40.00% of the weights" in sgd
    dense = summary_line({**metrics, "sparse_test_acc": None, "gamma_nonzero_share": None}, 3, splitlbi=False)
    assert "mask" not in dense and "sparse" not in dense
    assert "sparse acc" in summary_line(metrics, 3) and "Gamma non-zeros" in summary_line(metrics, 3)


def test_the_kernel_build_says_where_it_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from splitlbi.optim import _cpu_kernel

    monkeypatch.setattr(_cpu_kernel, "_build", lambda compiler, target: None)
    _cpu_kernel.build_with_notice("c++", tmp_path / "fused_step_x" / "fused_step.so")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "compiling the fused CPU step" in err[0] and str(tmp_path / "fused_step_x") in err[0]
    assert err[1].startswith("splitlbi: compiled the fused CPU step in ")

    def fail(compiler, target):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_cpu_kernel, "_build", fail)
    with pytest.raises(RuntimeError):
        _cpu_kernel.build_with_notice("c++", tmp_path / "y" / "fused_step.so")
    assert "did not build" in capsys.readouterr().err
