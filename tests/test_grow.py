"""Growing networks along the path (issue 23): widths, widening, state, the rule, runs, resume, errors."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitlbi import SplitLBI
from splitlbi.cli.main import main
from splitlbi.errors import SplitLBIError
from splitlbi.grow import (
    GrowthRule, LayerCheck, check_growth, grow_network, layout_of, load_grown_model, read_checks, read_stages,
    selected_filters, stages_of, training_compute, uniform_widths, widen_model, widen_optimizer_state,
)
from splitlbi.models import create_model
from splitlbi.prune.compact import count_macs_params
from splitlbi.train import TrainConfig, load_checkpoint, run_training
from helpers import read_rows

pytestmark = pytest.mark.usefixtures("one_thread")

# (model, its arguments, input channels, side, starting widths, widened widths)
FAMILIES = [
    ("lenet5", {}, 1, 28, (3, 8, 40), (5, 9, 60)),
    ("vgg11_bn", {}, 3, 32, (4, 5, 6, 7, 8, 9, 10, 11), (5, 5, 8, 7, 9, 12, 10, 13)),
    ("resnet20", {}, 3, 32, (8, 10, 12), (10, 11, 16)),  # option A: the streams move
    ("resnet20", {}, 3, 32, (8, 10, 12), (12, 12, 12)),
    ("resnet20", {"shortcut": "B"}, 3, 32, (8, 10, 12), (14, 11, 13)),
    ("resnet32", {}, 3, 32, (4, 8, 8), (8, 8, 9)),
]
FAMILY_IDS = ["lenet5", "vgg11_bn", "resnet20-A", "resnet20-A-equal", "resnet20-B", "resnet32-A"]


def _family(name: str, kwargs: dict, channels: int, widths: Sequence[int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=channels, widths=list(widths), **kwargs)


def _builder(name: str, kwargs: dict, channels: int):
    return lambda widths: create_model(name, num_classes=10, in_channels=channels, widths=list(widths), **kwargs)


def _trained(model: nn.Module, channels: int, side: int, steps: int = 3) -> SplitLBI:
    """A few SplitLBI steps (V, momentum and BN statistics that are not their initial values)."""
    optimizer = SplitLBI(model.named_parameters(), lr=0.1, nu=1.0, lam=0.05)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        images = torch.randn(16, channels, side, side, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return optimizer


# --------------------------------------------------------------------------- widths in the factories


def test_default_widths_keep_todays_networks() -> None:
    for name, standard in (("lenet5", [6, 16, 120]), ("resnet20", [16, 32, 64]),
                           ("vgg16_bn", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512])):
        torch.manual_seed(0)
        plain = create_model(name, num_classes=10, in_channels=3)
        torch.manual_seed(0)
        explicit = create_model(name, num_classes=10, in_channels=3, widths=standard)
        assert list(plain.state_dict()) == list(explicit.state_dict())
        for key, value in plain.state_dict().items():
            assert torch.equal(value, explicit.state_dict()[key]), key
    narrow = create_model("lenet5", widths=(3, 8, 60))
    assert narrow.conv2.weight.shape == (8, 3, 5, 5) and narrow.fc1.weight.shape == (84, 60)


@pytest.mark.parametrize("name, widths, message", [
    ("lenet5", (3, 8), "widths of lenet5 must be 3 positive integers"),
    ("lenet5", (3, 0, 8), "widths of lenet5 must be 3 positive integers"),
    ("vgg16_bn", (8,) * 12, "widths of vgg16_bn must be 13 positive integers"),
    ("resnet20", (32, 16, 64), "must not decrease from stage to stage"),
])
def test_bad_widths_are_one_line_errors(name: str, widths: tuple, message: str) -> None:
    with pytest.raises(SplitLBIError, match=message):
        create_model(name, num_classes=10, in_channels=3, widths=widths)


# --------------------------------------------------------------------------- widening keeps the function


@pytest.mark.parametrize("name, kwargs, channels, side, old, new", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_widening_keeps_the_function(name: str, kwargs: dict, channels: int, side: int, old: tuple, new: tuple,
                                     mode: str) -> None:
    model = _family(name, kwargs, channels, old)
    _trained(model, channels, side)
    widened = widen_model(model, _builder(name, kwargs, channels), new, seed=3).model
    assert layout_of(widened).widths(widened) == tuple(new)
    images = torch.randn(8, channels, side, side, generator=torch.Generator().manual_seed(2))
    getattr(model, mode)()
    getattr(widened, mode)()
    with torch.no_grad():
        before, after = model(images), widened(images)
    assert before.abs().max() > 0.01  # a real output, not zeros
    assert (before - after).abs().max().item() <= 1e-5


def test_widening_keeps_the_old_weights_and_draws_new_filters() -> None:
    model = _family("lenet5", {}, 1, (3, 8, 40))
    widened = widen_model(model, _builder("lenet5", {}, 1), (4, 8, 40), seed=0).model
    assert torch.equal(widened.conv1.weight[:3], model.conv1.weight)
    assert widened.conv1.weight[3].abs().sum() > 0  # the new filter is drawn, not zero
    assert torch.equal(widened.conv2.weight[:, :3], model.conv2.weight)
    assert torch.all(widened.conv2.weight[:, 3] == 0)  # ... and nothing reads it yet
    again = widen_model(model, _builder("lenet5", {}, 1), (4, 8, 40), seed=0).model
    assert torch.equal(again.conv1.weight, widened.conv1.weight)  # the draw depends on the seed only
    state = torch.get_rng_state()
    widen_model(model, _builder("lenet5", {}, 1), (4, 8, 40), seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone


def test_new_filters_start_at_the_median_norm_of_their_layer_or_as_drawn() -> None:
    model = _family("lenet5", {}, 1, (3, 8, 40))
    _trained(model, 1, 28, steps=5)
    build = _builder("lenet5", {}, 1)
    matched = widen_model(model, build, (5, 10, 40), seed=4).model
    drawn = widen_model(model, build, (5, 10, 40), seed=4, init="drawn").model
    for conv, old in (("conv1", 3), ("conv2", 8)):
        median = getattr(model, conv).weight.detach().flatten(1).norm(dim=1).median()
        new_matched = getattr(matched, conv).weight.detach()[old:].flatten(1)
        new_drawn = getattr(drawn, conv).weight.detach()[old:].flatten(1)
        assert torch.allclose(new_matched.norm(dim=1), median.expand(new_matched.shape[0]), rtol=1e-5)
        assert not torch.allclose(new_drawn.norm(dim=1), median.expand(new_drawn.shape[0]), rtol=1e-2)
        # the same draw, only scaled
        assert torch.allclose(new_matched / new_matched.norm(dim=1, keepdim=True),
                              new_drawn / new_drawn.norm(dim=1, keepdim=True), atol=1e-6)
    with pytest.raises(SplitLBIError, match="init of new filters must be one of matched, drawn"):
        widen_model(model, build, (5, 10, 40), seed=4, init="copied")


def test_a_new_residual_channel_is_zero_where_it_is_written() -> None:
    model = _family("resnet20", {"shortcut": "B"}, 3, (8, 10, 12))
    widened = widen_model(model, _builder("resnet20", {"shortcut": "B"}, 3), (9, 10, 12), seed=0).model
    for norm in (widened.bn1, widened.layer1[0].bn2, widened.layer1[2].bn2):
        assert norm.weight[8] == 0 and norm.bias[8] == 0
    assert widened.layer1[0].bn1.weight[8] == 1  # a block's inner channel is silenced by its reader instead
    assert torch.all(widened.layer1[0].conv2.weight[:, 8] == 0)


@pytest.mark.parametrize("old, new, message", [
    ((3, 8, 40), (2, 8, 40), "cannot remove filters: conv1 3 -> 2"),
    ((3, 8, 40), (3, 8), "expected 3 widths"),
])
def test_widening_refuses_bad_widths(old: tuple, new: tuple, message: str) -> None:
    with pytest.raises(SplitLBIError, match=message):
        widen_model(_family("lenet5", {}, 1, old), _builder("lenet5", {}, 1), new, seed=0)
    with pytest.raises(SplitLBIError, match="each stage at most the next one"):
        widen_model(_family("resnet20", {}, 3, (8, 10, 12)), _builder("resnet20", {}, 3), (11, 10, 12), seed=0)


# --------------------------------------------------------------------------- the optimizer state carried over


def _old_part(tensor: torch.Tensor, positions) -> torch.Tensor:
    """The entries of a widened tensor at the places its old entries went to."""
    for dim, where in enumerate(positions):
        if where is not None:
            tensor = tensor.index_select(dim, where)
    return tensor


@pytest.mark.parametrize("name, kwargs, channels, side, old, new", FAMILIES[:3] + FAMILIES[4:5],
                         ids=FAMILY_IDS[:3] + FAMILY_IDS[4:5])
def test_old_filters_keep_weights_momentum_and_v_new_ones_start_at_zero(name: str, kwargs: dict, channels: int,
                                                                       side: int, old: tuple, new: tuple) -> None:
    model = _family(name, kwargs, channels, old)
    optimizer = _trained(model, channels, side)
    widening = widen_model(model, _builder(name, kwargs, channels), new, seed=0)
    widened = widening.model
    target = SplitLBI(widened.named_parameters(), lr=0.1, nu=1.0, lam=0.05)
    target.load_state_dict(widen_optimizer_state(optimizer.state_dict(), widening, dict(widened.named_parameters())))
    before, after = dict(model.named_parameters()), dict(widened.named_parameters())
    checked = 0
    for key, positions in widening.positions.items():
        if key not in after:  # a buffer (BN statistics)
            continue
        for state_key in ("momentum_buffer", "v"):
            if state_key not in optimizer.state[before[key]]:
                continue
            old_value, new_value = optimizer.state[before[key]][state_key], target.state[after[key]][state_key]
            assert torch.equal(_old_part(new_value, positions), old_value), (key, state_key)  # kept at their places
            assert torch.count_nonzero(new_value) == torch.count_nonzero(old_value), (key, state_key)  # rest zero
            checked += 1
        assert torch.equal(_old_part(after[key].detach(), positions), before[key].detach()), key
    assert checked > 0
    # Γ of the old filters is unchanged; the new filters are outside its support.
    old_support, new_support = optimizer.filter_support(), target.filter_support()
    layout = layout_of(model)
    for group in range(len(old)):
        for conv in layout.convs(group):
            key = f"{conv}.weight"
            positions = widening.positions[key][0]
            assert torch.equal(new_support[key][positions], old_support[key]), key
            assert int(new_support[key].sum()) == int(old_support[key].sum()), key
    assert sum(int(s.sum()) for s in old_support.values()) > 0  # the test had a support to keep


# --------------------------------------------------------------------------- the rule


def test_grown_width_by_ratio_count_and_cap() -> None:
    assert GrowthRule(ratio=1.1).grown_width(10, 100) == 11
    assert GrowthRule(ratio=1.1).grown_width(3, 100) == 4  # ceil(3.3)
    assert GrowthRule(ratio=1.01).grown_width(5, 100) == 6  # at least one filter
    assert GrowthRule(count=4).grown_width(10, 100) == 14
    assert GrowthRule(count=4).grown_width(10, 12) == 12
    assert GrowthRule().grown_width(16, 16) == 16


def test_checks_come_every_check_every_epochs_before_the_end() -> None:
    rule = GrowthRule(check_every=3)
    assert [e for e in range(0, 11) if rule.is_check(e, 10)] == [3, 6, 9]
    assert [e for e in range(0, 10) if GrowthRule(check_every=3).is_check(e, 9)] == [3, 6]
    assert [e for e in range(0, 11) if GrowthRule(check_every=3, until=6).is_check(e, 10)] == [3, 6]
    assert rule.next_check(0, 10) == 3 and rule.next_check(3, 10) == 6 and rule.next_check(9, 10) is None


def _with_support(model: nn.Module, selected: Dict[str, int]) -> SplitLBI:
    """A SplitLBI whose support of Γ holds the first ``selected[conv]`` filters of each conv."""
    optimizer = SplitLBI(model.named_parameters(), lr=0.1, lam=1.0)
    for name, parameter in model.named_parameters():
        if parameter.dim() == 4:
            v = torch.zeros_like(parameter)
            v[: selected.get(name.rsplit(".", 1)[0], 0)] = 2.0  # ‖V_g‖ > λ: in the support
            optimizer.state[parameter]["v"] = v
    return optimizer


def test_the_rule_grows_the_full_layers_only() -> None:
    model = _family("lenet5", {}, 1, (5, 10, 40))
    layout = layout_of(model)
    optimizer = _with_support(model, {"conv1": 4, "conv2": 7, "conv3": 40})
    assert int(selected_filters(optimizer, "conv2").sum()) == 7
    checks = check_growth(layout, optimizer, (5, 10, 40), GrowthRule(tau=0.8, ratio=1.5), caps=(6, 16, 50))
    assert checks == [LayerCheck("conv1", 5, 4, 5, 6),       # 80% >= tau: ceil(7.5) = 8, capped at 6
                      LayerCheck("conv2", 10, 7, 10, 10),    # 70% < tau
                      LayerCheck("conv3", 40, 40, 40, 50)]   # 100%: ceil(60) capped at 50
    assert checks[0].share == pytest.approx(0.8) and checks[0].grew and not checks[1].grew
    assert selected_filters(optimizer, "conv9") is None  # nothing of it carries Γ


@pytest.mark.parametrize("couple, expected", [("filters", [3, 2]), ("bn", [1, 4]), ("both", [1, 2])])
def test_selected_filters_read_what_carries_gamma(couple: str, expected: List[int]) -> None:
    from splitlbi.train.optimizers import build_optimizer

    model = _family("vgg11_bn", {}, 3, (4, 5, 6, 7, 8, 9, 10, 11))
    config = TrainConfig(model="vgg11_bn", couple=couple, couple_stem=True, lam=1.0, linear_penalty="none", lr=0.1)
    optimizer = build_optimizer(config, model)
    chosen = {"features.0.weight": [0, 1, 2], "features.1.weight": [0], "features.4.weight": [0, 1],
              "features.5.weight": [0, 1, 2, 3]}  # conv 1 and its BN, conv 2 and its BN
    parameters = dict(model.named_parameters())
    for name, filters in chosen.items():
        if any(c.name == name for c in optimizer.named_coupled()):
            v = torch.zeros_like(parameters[name])
            v[filters] = 2.0
            optimizer.state[parameters[name]]["v"] = v
    layout = layout_of(model)
    counts = [int(selected_filters(optimizer, conv, layout.norm_of(conv)).sum())
              for conv in ("features.0", "features.4")]
    assert counts == expected
    assert layout.norm_of("features.4") == "features.5" and layout.norm_of("nothing") is None


def test_an_option_a_resnet_stage_never_outgrows_the_next() -> None:
    model = _family("resnet20", {}, 3, (10, 11, 40))
    layout = layout_of(model)
    optimizer = _with_support(model, {name: 64 for name, m in model.named_modules() if isinstance(m, nn.Conv2d)})
    checks = check_growth(layout, optimizer, (10, 11, 40), GrowthRule(count=4), caps=(16, 32, 64))
    assert [c.new_width for c in checks] == [14, 15, 44]
    assert [c.selected for c in checks] == [70, 66, 240]  # a stage counts the filters of all its convs
    checks = check_growth(layout, optimizer, (10, 11, 40), GrowthRule(count=4), caps=(16, 11, 64))
    assert [c.new_width for c in checks] == [11, 11, 44]  # stage 1 held at stage 2's width


def test_stages_follow_the_checks() -> None:
    def check(epoch_widths):
        return [LayerCheck(f"g{i}", w, w, w, n) for i, (w, n) in enumerate(epoch_widths)]

    checks = {2: check([(3, 4), (8, 8)]), 4: check([(4, 5), (8, 9)]), 6: check([(5, 5), (9, 9)])}
    assert [tuple(s) for s in stages_of((3, 8), checks, 10)] == [(0, 1, 2, (3, 8)), (1, 3, 4, (4, 8)),
                                                                 (2, 5, 10, (5, 9))]
    assert [tuple(s) for s in stages_of((3, 8), checks, 4)] == [(0, 1, 2, (3, 8)), (1, 3, 4, (4, 8))]
    assert [tuple(s) for s in stages_of((3, 8), {}, 0)] == [(0, 1, 0, (3, 8))]


def test_uniform_widths_meet_a_macs_target() -> None:
    example = torch.zeros(1, 1, 28, 28)

    def macs(model: nn.Module) -> int:
        return count_macs_params(model, example)[0]

    build = _builder("lenet5", {}, 1)
    standard = macs(build((6, 16, 120)))
    widths = uniform_widths(build, (6, 16, 120), standard // 2, macs)
    assert abs(macs(build(widths)) - standard // 2) < 0.1 * standard
    assert all(a <= b for a, b in zip(widths, (6, 16, 120)))
    assert uniform_widths(build, (6, 16, 120), standard, macs) == (6, 16, 120)


# --------------------------------------------------------------------------- runs and resume


# Four batches per epoch on the bundled digits; a small λ fills the support within an epoch.
TINY = TrainConfig(model="lenet5", widths=(2, 4, 20), dataset="digits", epochs=5, batch_size=64, limit_train=256,
                   limit_test=128, lr=0.1, nu=1.0, lam=0.01, save_every=1, progress=False, device="cpu")
RULE = GrowthRule(check_every=1, ratio=1.5, until=3)


def _comparable(run_dir: Path) -> dict:
    """Everything of a finished grow run that a resume must reproduce (not the epoch times)."""
    last = load_checkpoint(run_dir)
    metrics = [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in read_rows(run_dir / "metrics.csv")]
    masks = {path.name: torch.load(path, weights_only=True) for path in sorted((run_dir / "masks").glob("*.pt"))}
    return {"last": {key: last[key] for key in ("epoch", "model", "optimizer", "scheduler", "rng")},
            "metrics": metrics, "path": (run_dir / "path.csv").read_text(),
            "checks": (run_dir / "checks.csv").read_text(),
            "stages": [{k: v for k, v in row.items()} for row in read_rows(run_dir / "stages.csv")],
            "masks": masks}


def _same(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(_same(first[k], second[k])
                                                                                for k in first)
    if isinstance(first, (list, tuple)):
        return len(first) == len(second) and all(_same(a, b) for a, b in zip(first, second))
    return first == second


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("grow") / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare with it (module fixtures come before one_thread)
    try:
        grow_network(TINY, RULE, run_dir, log=None)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_a_grow_run_records_its_stages(straight: Path) -> None:
    checks = read_checks(straight)
    assert sorted(checks) == [1, 2, 3]  # until=3
    assert any(c.grew for c in checks[1])
    stages = read_stages(straight)
    assert stages[0]["first_epoch"] == 1 and stages[-1]["last_epoch"] == TINY.epochs
    assert stages[0]["widths"] == {"conv1": 2, "conv2": 4, "conv3": 20}
    assert len(stages) >= 2 and stages[-1]["macs"] > stages[0]["macs"]
    for stage in stages:
        assert stage["test_acc"] is not None
        assert (stage["macs"], stage["params"]) == count_macs_params(
            create_model("lenet5", widths=list(stage["widths"].values())), torch.zeros(1, 1, 28, 28))
    assert training_compute(straight) == sum((s["last_epoch"] - s["first_epoch"] + 1) * s["macs"] for s in stages)
    # every epoch's checkpoint and masks at that epoch's widths
    model = load_grown_model(straight)
    assert layout_of(model).widths(model) == tuple(stages[-1]["widths"].values())
    assert load_checkpoint(straight, 1)["model"]["conv1.weight"].shape[0] == 2
    path_rows = read_rows(straight / "path.csv")
    assert {int(r["filter"]) for r in path_rows if r["layer"] == "conv1" and r["epoch"] == "5"} == \
        set(range(stages[-1]["widths"]["conv1"]))


class _Killed(Exception):
    """Stands in for a kill: raised in the middle of the run."""


def _resume_equals_straight(straight: Path, run_dir: Path) -> None:
    grow_network(None, None, run_dir, resume=True, log=None)
    assert _same(_comparable(straight), _comparable(run_dir))


@pytest.mark.parametrize("where", ["after-epoch-2", "in-check-after-epoch-2", "in-widening", "in-a-checkpoint-write",
                                   "in-a-checks-row", "in-epoch-4"])
def test_a_run_stopped_anywhere_resumes_to_the_uninterrupted_result(where: str, straight: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from splitlbi.grow import run as grow_run
    from splitlbi.train import rundir
    from splitlbi.utils import io

    run_dir = tmp_path / "killed"
    calls = {"n": 0}

    def on_epoch_end(epoch: int, metrics: dict) -> None:
        if where == "after-epoch-2" and epoch == 2:
            raise _Killed
        if where == "in-epoch-4" and epoch == 3:
            monkeypatch.setattr(rundir, "append_rows", _fail_on_metrics(rundir.append_rows))

    def _fail_on_metrics(original):
        def append_rows(path, rows):
            if Path(path).name == "metrics.csv":
                raise _Killed
            return original(path, rows)
        return append_rows

    if where == "in-check-after-epoch-2":
        original_check = grow_run.check_growth

        def check_growth(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise _Killed
            return original_check(*args, **kwargs)
        monkeypatch.setattr(grow_run, "check_growth", check_growth)
    if where == "in-widening":
        def widen(*args, **kwargs):
            raise _Killed
        monkeypatch.setattr(grow_run, "_widen", widen)
    if where == "in-a-checkpoint-write":
        original_write = io._atomic_write

        def atomic_write(path, write, *rest):
            calls["n"] += 1
            if calls["n"] == 9:  # a few epochs in: half a temporary file, then the kill
                with open(Path(path).parent / f".{Path(path).name}.killed.tmp", "wb") as handle:
                    handle.write(b"half")
                raise _Killed
            return original_write(path, write, *rest)
        monkeypatch.setattr(io, "_atomic_write", atomic_write)
    if where == "in-a-checks-row":
        original_append = rundir.append_rows

        def append_rows(path, rows):
            if Path(path).name == "checks.csv" and calls["n"] == 0:
                calls["n"] += 1
                rows = list(rows)
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(",".join(rows[0])[:5])  # a row cut short
                raise _Killed
            return original_append(path, rows)
        monkeypatch.setattr(rundir, "append_rows", append_rows)

    with pytest.raises(_Killed):
        grow_network(TINY, RULE, run_dir, log=None, on_epoch_end=on_epoch_end)
    monkeypatch.undo()
    _resume_equals_straight(straight, run_dir)
    assert not list(run_dir.rglob("*.tmp"))


def test_a_resume_with_checks_lost_is_refused(straight: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(_Killed):
        grow_network(TINY, RULE, run_dir, log=None, on_epoch_end=lambda epoch, m: _raise() if epoch == 3 else None)
    (run_dir / "checks.csv").write_text(",".join(("epoch", "group", "width", "selected", "filters", "share",
                                                  "new_width")) + "\n")
    with pytest.raises(SplitLBIError, match="checks.csv leads to widths conv1=2 conv2=4 conv3=20 but the checkpoint"):
        grow_network(None, None, run_dir, resume=True, log=None)


def _raise() -> None:
    raise _Killed


# --------------------------------------------------------------------------- bad input


TINY_ARGS = ["--dataset", "digits", "--limit-train", "64", "--limit-test", "32", "--batch-size", "64", "--epochs", "2",
             "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--widths", "2", "4", "20", "--tau", "1.5"], "--tau must be a share in (0, 1], got 1.5"),
    (["--widths", "2", "4", "20", "--grow-ratio", "1"], "--grow-ratio must be a number > 1, got 1.0"),
    (["--widths", "2", "4", "20", "--max-widths", "6", "16"], "--max-widths needs 3 numbers (conv1, conv2, conv3)"),
    (["--widths", "8", "4", "20"], "the starting widths exceed the caps (conv1 8 > 6)"),
    (["--widths", "2", "4"], "widths of lenet5 must be 3 positive integers"),
    ([], "give the starting widths with --widths"),
    (["--model", "resnet18", "--widths", "8", "8", "8"], "model resnet18 has no width settings"),
    (["--model", "nonet", "--widths", "8"], "unknown model 'nonet'"),
    (["--widths", "2", "4", "20", "--grow-ratio", "1.2", "--grow-count", "3"], "not allowed with argument"),
    (["--widths", "2", "4", "20", "--optimizer", "sgd"], "unrecognized arguments: --optimizer"),
    (["--widths", "2", "4", "20", "--check-every", "0"], "must be a positive integer"),
    (["--widths", "2", "4", "20", "--new-filters", "copied"], "argument --new-filters: invalid choice"),
])
def test_bad_grow_options_are_one_line_errors(args: List[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    try:
        status = main(["grow", *TINY_ARGS, *args, "--out", str(tmp_path / "run")])
    except SystemExit as exit_:  # argparse's own errors (one line through cli.main's parser)
        status = exit_.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("splitlbi: error: ")
    assert message in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_resume_errors_are_one_line(straight: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_dir = tmp_path / "trained"
    run_training(dataclasses.replace(TINY, widths=(), epochs=1), train_dir, log=None)
    cases = [
        (["grow", "--resume", str(train_dir)], "not a 'splitlbi grow' run"),
        (["train", "--resume", str(straight)], "continue it with 'splitlbi grow --resume"),
        (["grow", "--resume", str(straight), "--tau", "0.5"], "cannot change the growth rule (tau)"),
        (["grow", "--resume", str(straight), "--lr", "0.3"], "cannot change --lr"),
        (["grow", "--resume", str(tmp_path / "none")], "no such directory"),
    ]
    for args, message in cases:
        status = main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and message in lines[0], (args, lines)


def test_the_command_line_grows_and_resumes_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = ["grow", "--dataset", "digits", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
            "--epochs", "3", "--lr", "0.1", "--nu", "1", "--lam", "0.01", "--widths", "2", "4", "20",
            "--check-every", "1", "--grow-count", "2", "--max-widths", "4", "8", "40", "--no-progress", "--out",
            str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "check after epoch 1: conv1 2/2 selected (100%) -> 4" in text and "final widths" in text
    info = json_load(out / "config.json")
    assert info["widths"] == [2, 4, 20] and info["grow"]["count"] == 2 and info["grow"]["max_widths"] == [4, 8, 40]
    assert main(["grow", "--resume", str(out), "--no-progress"]) == 0
    assert read_stages(out)[-1]["last_epoch"] == 3


def json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_train_accepts_widths(tmp_path: Path) -> None:
    run_training(dataclasses.replace(TINY, epochs=1, widths=(3, 8, 30)), tmp_path / "narrow", log=None)
    model = load_checkpoint(tmp_path / "narrow")["model"]
    assert model["conv3.weight"].shape == (30, 8, 5, 5)
    from splitlbi.train.run import load_model_from_run

    assert load_model_from_run(tmp_path / "narrow").fc1.in_features == 30


# --------------------------------------------------------------------------- real kills (slow)


GROW_ARGS = ["grow", "--dataset", "digits", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
             "--epochs", "5", "--lr", "0.1", "--nu", "1", "--lam", "0.01", "--widths", "2", "4", "20",
             "--check-every", "1", "--grow-ratio", "1.5", "--grow-until", "3", "--save-every", "1", "--device", "cpu",
             "--no-progress"]


@pytest.mark.slow
def test_a_grow_run_killed_at_random_moments_resumes_bitwise_equal(tmp_path: Path) -> None:
    """SIGKILL ``splitlbi grow`` at random moments of its run (start-up, epochs, checks,
    widening, writes), resume it, and compare everything with an uninterrupted run."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def splitlbi(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "splitlbi", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)

    reference = tmp_path / "reference"
    started = time.perf_counter()
    assert splitlbi(*GROW_ARGS, "--out", str(reference)).wait(timeout=900) == 0
    wall = time.perf_counter() - started
    rng = random.Random(0)
    for trial in range(8):
        run_dir = tmp_path / f"trial{trial}"
        process = splitlbi(*GROW_ARGS, "--out", str(run_dir))
        try:
            process.wait(timeout=rng.uniform(0.2, 1.0) * wall)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        if (run_dir / "config.json").is_file():
            resume = splitlbi("grow", "--resume", str(run_dir), "--no-progress")
        else:  # killed before it wrote its settings: start it again
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            resume = splitlbi(*GROW_ARGS, "--out", str(run_dir))
        _, err = resume.communicate(timeout=900)
        assert resume.returncode == 0, err
        assert _same(_comparable(reference), _comparable(run_dir)), f"trial {trial}"
        assert not list(run_dir.rglob("*.tmp"))


def test_the_growth_figure_has_widths_and_accuracy_against_macs(straight: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    from splitlbi.plots.growth import GrowthBaseline, plot_growth

    out = tmp_path / "fig" / "grow.png"
    paths = plot_growth([straight, straight], out, baselines=[GrowthBaseline("standard width", [423038.0] * 2,
                                                                             [50.0, 52.0])])
    assert [p.suffix for p in paths] == [".png", ".pdf", ".csv"] and all(p.stat().st_size > 0 for p in paths)
    rows = read_rows(out.with_suffix(".csv"))
    stages = read_stages(straight)
    assert {r["panel"] for r in rows if r["series"] == "conv2"} == {"Widths along run 1 (seed 0)",
                                                                    "Widths along run 2 (seed 0)"}  # one per run
    widths = [r for r in rows if r["panel"] == "Widths along run 1 (seed 0)" and r["series"] == "conv2"]
    assert len(widths) == 2 * TINY.epochs  # a staircase: two points per epoch
    assert float(widths[0]["y"]) == pytest.approx(100 * 4 / 16)  # starts at 4 of the standard 16 filters
    assert float(widths[-1]["y"]) == pytest.approx(100 * stages[-1]["widths"]["conv2"] / 16)
    final = next(r for r in rows if r["series"] == "grown (final)")
    assert float(final["y"]) == pytest.approx(stages[-1]["test_acc"]) and final["n"] == "2"
    standard = next(r for r in rows if r["series"] == "standard width")
    assert float(standard["x"]) == pytest.approx(100.0, abs=0.01) and float(standard["y"]) == 51.0
    assert main(["plot", "grow", str(straight), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.csv").is_file()
    with pytest.raises(SplitLBIError, match="is not a 'splitlbi grow' run"):
        run_dir = tmp_path / "trained"
        run_training(dataclasses.replace(TINY, widths=(), epochs=1), run_dir, log=None)
        plot_growth([run_dir], tmp_path / "x.png")


def test_widths_leave_the_names_of_cached_runs_alone() -> None:
    """reproduce names a run by the hash of its settings: a field added later (widths) is left out at
    its default, so the runs of every workspace written before it are still found."""
    from splitlbi.experiments.workspace import config_settings

    assert "widths" not in config_settings(TrainConfig())
    assert list(config_settings(TrainConfig(model="lenet5", widths=(3, 8, 60)))["widths"]) == [3, 8, 60]
