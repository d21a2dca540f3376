"""SplitLBI(update="release"): the update of the paper's release code, against its equations.

The reference transcription below follows the release code's step
(``slbi_noconv_with_normalize.py`` in DessiLBI2020/DessiLBI, ``SLBI.step``): Γ is stored
explicitly and recomputed after every step from the new ``W``, as that code does; the
optimizer stores only ``V`` and forms Γ on demand. Written with plain tensor arithmetic.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn

import splitlbi.optim.functional as functional
from splitlbi import SplitLBI
from splitlbi.errors import SplitLBIError


def make_model(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).double()
    with torch.no_grad():  # some weights above 1, so that max(|W|, 1) is not just 1
        model[0].weight.mul_(scale)
    return model


def make_batches(steps: int) -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 6, 6, generator=generator, dtype=torch.float64),
             torch.randn(8, 5, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def shrink(v: torch.Tensor, lam: float, penalty: str) -> torch.Tensor:
    if penalty == "l1":
        return torch.sign(v) * torch.clamp(v.abs() - lam, min=0)
    rows = v.reshape(v.shape[0], -1)  # group (conv filter) or neuron (linear row)
    norms = torch.sqrt((rows * rows).sum(dim=1))
    factor = torch.where(norms > 0, torch.clamp(1 - lam / torch.where(norms > 0, norms, 1.0), min=0), 0.0)
    return (rows * factor[:, None]).reshape(v.shape)


def release_run(model, batches, *, lr, kappa, nu, lam, momentum, weight_decay, penalties):
    """The release code's step; its ``lr`` is our κ·α (W moves by lr, V by lr/(ν·κ))."""
    params = dict(model.named_parameters())
    lr_kappa, lr_gamma = kappa * lr, kappa * lr / (nu * kappa)
    z = {n: torch.zeros_like(p) for n, p in params.items() if penalties[n] != "none"}
    gamma = {n: torch.zeros_like(params[n]) for n in z}
    buf: dict = {}
    trace = []  # per step and coupled layer: share of non-zeros of Γ, the V-step factor, max of max(|W|, 1)
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        step = {}
        with torch.no_grad():
            for n, W in params.items():
                # the release code adds wd·W after the momentum update, into the buffer: with
                # dampening 0 (its setting) the same recursion as torch.optim.SGD's, written here
                d_p = W.grad + weight_decay * W
                if momentum:
                    buf[n] = d_p.clone() if n not in buf else momentum * buf[n] + d_p
                    d_p = buf[n]
                if n not in z:
                    W -= lr_kappa * d_p
                    continue
                new_grad = d_p * lr_kappa + (W - gamma[n]) * lr_kappa / nu
                last_p = W.clone()
                W -= new_grad
                gamma_grad = gamma[n] - last_p
                norm_scale = torch.clamp(torch.abs(W), min=1)
                gamma_ratio = float((gamma[n].abs() > 0).sum()) / gamma[n].numel()
                proportion = min(1 - gamma_ratio, 1e-2)
                z[n] -= lr_gamma * gamma_grad * proportion / norm_scale
                gamma[n] = kappa * norm_scale * shrink(z[n], lam, penalties[n])
                step[n] = (gamma_ratio, proportion, float(norm_scale.max()))
        trace.append(step)
    return params, z, gamma, trace


def penalties_of(model, penalty: str) -> dict:
    out = {}
    for n, p in model.named_parameters():
        if p.dim() == 1:
            out[n] = "none"
        elif penalty == "auto":
            out[n] = "group" if p.dim() == 4 else "l1"
        elif penalty == "neuron":
            out[n] = "group" if p.dim() == 4 else "neuron"
        else:
            out[n] = penalty
    return out


def groups_for(model, penalties: dict, **extra) -> list:
    named = list(model.named_parameters())
    by_penalty: dict = {}
    for n, p in named:
        by_penalty.setdefault(penalties[n], []).append((n, p))
    return [{"params": params, "penalty": penalty, **extra} for penalty, params in by_penalty.items()]


# κ ≠ 1 checks the mapping of the release code's lr to κα; a strong V step (α/ν = 0.5) and a small λ
# fill the conv layer's Γ within a few steps, so that min(1 − ρ, 0.01) leaves 0.01.
HYPER = dict(lr=0.05, kappa=0.5, nu=0.1, momentum=0.9, weight_decay=5e-3)


@pytest.mark.parametrize("penalty, lam", [("auto", 1e-3), ("l1", 1e-4), ("neuron", 1e-2)])
def test_release_update_matches_its_equations(penalty, lam):
    batches = make_batches(40)
    reference = make_model(scale=10.0)
    pens = penalties_of(reference, penalty)
    params, z, gamma, trace = release_run(reference, batches, lam=lam, penalties=pens, **HYPER)

    model = make_model(scale=10.0)
    opt = SplitLBI(groups_for(model, pens), update="release", lam=lam, **HYPER)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    for (name, p), q in zip(params.items(), model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-8, rtol=1e-7, msg=f"W of {name}")
    coupled = {c.name: c for c in opt.named_coupled()}
    assert set(coupled) == set(z)
    gammas = opt.gamma()
    for name in z:
        torch.testing.assert_close(coupled[name].v, z[name], atol=1e-8, rtol=1e-7, msg=f"V of {name}")
        torch.testing.assert_close(gammas[name], gamma[name], atol=1e-8, rtol=1e-7, msg=f"Γ of {name}")
        assert torch.equal(opt.support()[name], gamma[name] != 0)
    # The run exercised every part of the update: a partial support along the way, a layer whose Γ
    # filled (factor min(1 − ρ, 0.01) below 0.01), and weights above 1 in the normalization.
    ratios = [ratio for step in trace for ratio, _, _ in step.values()]
    assert any(0 < r < 1 for r in ratios), ratios
    assert any(factor < 1e-2 for step in trace for _, factor, _ in step.values())
    assert any(scale > 1 for step in trace for _, _, scale in step.values())


def test_release_update_differs_from_the_paper_and_paper_is_the_default(monkeypatch):
    batches = make_batches(10)
    finals = {}
    for update in (None, "paper", "release"):
        model = make_model(scale=6.0)
        extra = {} if update is None else {"update": update}
        opt = SplitLBI(model.named_parameters(), foreach=False, lr=0.05, nu=0.5, lam=0.05, **extra)
        for batch in batches:
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        finals[update] = [p.detach().clone() for p in model.parameters()]
        assert opt.param_groups[0]["update"] == (update or "paper")
    assert all(torch.equal(a, b) for a, b in zip(finals[None], finals["paper"]))
    assert not all(torch.equal(a, b) for a, b in zip(finals["paper"], finals["release"]))


def test_release_runs_on_the_per_tensor_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the release update must not take the multi-tensor or fused path")

    import splitlbi.optim.splitlbi as module

    monkeypatch.setattr(module, "multi_tensor_splitlbi", refuse)
    monkeypatch.setattr(module, "fused_splitlbi", refuse)
    model = make_model()
    opt = SplitLBI(model.named_parameters(), lr=0.05, update="release")  # foreach, fused: None
    loss_fn(model, make_batches(1)[0]).backward()
    opt.step()
    assert opt.state[model[0].weight]["v"].abs().sum() > 0


def test_one_group_release_the_other_paper():
    """The option is a per-group hyperparameter: each group follows its own update (two separate
    networks in one optimizer against one optimizer each)."""
    batches = make_batches(8)
    first, second = make_model(scale=6.0), make_model(scale=6.0)
    both = SplitLBI([{"params": first.parameters(), "update": "release"}, {"params": second.parameters()}],
                    lr=0.05, nu=0.5, lam=0.05)
    alone = {"release": make_model(scale=6.0), "paper": make_model(scale=6.0)}
    singles = [SplitLBI(model.parameters(), lr=0.05, nu=0.5, lam=0.05, update=update, foreach=False)
               for update, model in alone.items()]
    for batch in batches:
        both.zero_grad()
        (loss_fn(first, batch) + loss_fn(second, batch)).backward()
        both.step()
        for single, model in zip(singles, alone.values()):
            single.zero_grad()
            loss_fn(model, batch).backward()
            single.step()
    for a, b in zip(first.parameters(), alone["release"].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(second.parameters(), alone["paper"].parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)  # the multi-tensor path against per-tensor
    assert not torch.equal(first[0].weight, second[0].weight)


def test_state_dict_round_trip_keeps_the_update_and_resumes_bitwise():
    batches = make_batches(12)
    model = make_model(scale=6.0)
    opt = SplitLBI(model.named_parameters(), lr=0.05, nu=0.5, lam=0.05, update="release")
    for batch in batches[:6]:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a copy: the state_dict shares its tensors with opt
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert [g["update"] for g in state["param_groups"]] == ["release"]

    copy = make_model(scale=6.0)
    copy.load_state_dict(model.state_dict())
    resumed = SplitLBI(copy.named_parameters(), lr=0.05, nu=0.5, lam=0.05, update="release")
    resumed.load_state_dict(state)
    for a, b in zip(opt.state.values(), resumed.state.values()):
        assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)
    for batch in batches[6:]:
        for o, m in ((opt, model), (resumed, copy)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
    for p, q in zip(model.parameters(), copy.parameters()):
        assert torch.equal(p, q)


def test_state_saved_before_the_option_loads_as_the_paper_update():
    model = make_model()
    opt = SplitLBI(model.named_parameters(), lr=0.05)
    loss_fn(model, make_batches(1)[0]).backward()
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["update"]  # as written by versions without the option
    fresh = SplitLBI(make_model().named_parameters(), lr=0.05, update="release")
    fresh.load_state_dict(state)
    assert [g["update"] for g in fresh.param_groups] == ["paper"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(update="Release"), r"Invalid update: 'Release' \(expected one of \('paper', 'release'\)\)"),
    (dict(update=None), "Invalid update: None"),
    (dict(update="release", foreach=True), "Invalid update: 'release' runs on the per-tensor path only"),
    (dict(update="release", fused=True), "Invalid update: 'release' runs on the per-tensor path only"),
])
def test_bad_update_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SplitLBI(make_model().parameters(), lr=0.1, **kwargs)


def test_bad_update_in_a_group_or_a_state_dict_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="Invalid update: 'fast'"):
        SplitLBI([{"params": model.parameters(), "update": "fast"}], lr=0.1)
    with pytest.raises(ValueError, match="Invalid update: 'release' runs on the per-tensor path only"):
        SplitLBI([{"params": model.parameters(), "update": "release"}], lr=0.1, foreach=True)
    opt = SplitLBI(model.parameters(), lr=0.1)
    state = opt.state_dict()
    state["param_groups"][0]["update"] = "fast"
    with pytest.raises(ValueError, match="Invalid update: 'fast'"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["update"] == "paper"  # nothing changed


# --- training plumbing ------------------------------------------------------------------


def test_train_config_and_build_optimizer_carry_the_update():
    from splitlbi.models import create_model
    from splitlbi.train.config import TrainConfig, validate_config
    from splitlbi.train.optimizers import build_optimizer

    assert TrainConfig().update == "paper"
    config = TrainConfig(update="release", nu=500.0, lam=3e-4, penalty="l1")
    validate_config(config)
    optimizer = build_optimizer(config, create_model("lenet5", num_classes=10, in_channels=1))
    assert {g["update"] for g in optimizer.param_groups} == {"release"}
    with pytest.raises(SplitLBIError, match=r"unknown --update 'fast' \(choose from paper, release\)"):
        validate_config(TrainConfig(update="fast"))
    with pytest.raises(SplitLBIError, match="setting update must be a string"):
        TrainConfig.from_dict({"update": 1})


def test_cli_option_and_old_run_configs(tmp_path):
    import argparse
    import json

    from splitlbi.cli import train as train_cli
    from splitlbi.train.run import CONFIG_FILE, read_train_config

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    config = train_cli.config_from_arguments(parser.parse_args(["train", "--update", "release"]))
    assert config.update == "release"
    assert train_cli.config_from_arguments(parser.parse_args(["train"])).update == "paper"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--update", "fast"])
    assert exit_info.value.code == 2
    # a run directory written before the field existed reads as the paper's update
    from splitlbi.train.config import TrainConfig

    values = {**TrainConfig().to_dict(), "num_classes": 10, "in_channels": 1}  # what a run adds to its config
    del values["update"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(values))
    assert read_train_config(tmp_path).update == "paper"


def test_workspace_hash_unchanged_for_the_default_and_new_for_the_variant():
    """Runs cached by reproduce before the option existed keep their names; SGD ignores it."""
    from splitlbi.experiments.workspace import config_settings
    from splitlbi.train.config import TrainConfig

    paper = TrainConfig()
    assert "update" not in config_settings(paper)
    assert config_settings(dataclasses.replace(paper, update="release"))["update"] == "release"
    sgd = TrainConfig(optimizer="sgd")
    assert config_settings(dataclasses.replace(sgd, update="release")) == config_settings(sgd)


def test_release_with_lambda_zero_and_float32_runs():
    """Edge cases of the per-tensor step: λ = 0 (every non-zero V is in the support) and float32."""
    model = make_model().float()
    opt = SplitLBI(model.named_parameters(), lr=0.05, lam=0.0, update="release")
    x, y = make_batches(1)[0]
    loss_fn(model, (x.float(), y.float())).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.nonzero_share().overall > 0.9



def test_training_run_with_the_release_update_records_it_and_resumes_bitwise(tmp_path):
    """``splitlbi train --update release``: config.json and the checkpoint's optimizer carry the update, and
    a run stopped after one epoch and resumed ends with the weights of the run trained straight."""
    from splitlbi.train import TrainConfig, load_checkpoint, read_run_config, run_training
    from splitlbi.train.run import load_model_from_run

    config = TrainConfig(dataset="digits", epochs=2, batch_size=64, limit_train=256, limit_test=128, lr=0.05,
                         nu=0.5, lam=1e-3, update="release", progress=False)
    straight = run_training(config, tmp_path / "straight", log=None)
    assert read_run_config(straight)["update"] == "release"
    groups = load_checkpoint(straight)["optimizer"]["param_groups"]
    assert {g["update"] for g in groups} == {"release"}

    stopped = run_training(dataclasses.replace(config, epochs=1), tmp_path / "resumed", log=None)
    run_training(config, stopped, resume=True, log=None)
    first, second = load_model_from_run(straight), load_model_from_run(stopped)
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
