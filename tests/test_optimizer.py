"""SplitLBI against the SPEC's equations, computed independently with plain tensor arithmetic."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

import splitlbi.optim.functional as functional
from splitlbi import SplitLBI


def make_model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3),  # 4-D weight + bias
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),  # 2-D weight + bias
    )
    return model.to(dtype)


def make_batches(steps: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 2, 6, 6, generator=generator, dtype=dtype), torch.randn(8, 5, generator=generator, dtype=dtype))
        for _ in range(steps)
    ]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# --- the SPEC, written out independently --------------------------------------------
def spec_prox(v: torch.Tensor, lam: float, penalty: str) -> torch.Tensor:
    if penalty in ("group", "neuron"):
        rows = v.reshape(v.shape[0], -1)
        norms = torch.sqrt((rows * rows).sum(dim=1))
        factor = torch.where(norms > 0, torch.clamp(1 - lam / torch.where(norms > 0, norms, 1.0), min=0), 0.0)
        return (rows * factor[:, None]).reshape(v.shape)
    if penalty == "l1":
        return torch.sign(v) * torch.clamp(v.abs() - lam, min=0)
    raise AssertionError(penalty)


def spec_penalty(name: str, shape, penalty: str) -> str:
    if penalty == "auto":
        return {4: "group", 2: "l1"}.get(len(shape), "none")
    if penalty == "neuron":  # per-group setting used below: neuron on linear, group on conv
        return {4: "group", 2: "neuron"}.get(len(shape), "none")
    if len(shape) == 1:
        return "none"
    return penalty


def spec_run(model, batches, *, lr, kappa, nu, lam, momentum, dampening, nesterov, weight_decay, penalty):
    """Train with the SPEC's update, storing W, V, Γ and the momentum buffer explicitly."""
    params = dict(model.named_parameters())
    pen = {n: spec_penalty(n, p.shape, penalty) for n, p in params.items()}
    V = {n: torch.zeros_like(p) for n, p in params.items() if pen[n] != "none"}
    Gamma = {n: torch.zeros_like(p) for n in V for p in [params[n]]}
    buf: dict[str, torch.Tensor] = {}
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        with torch.no_grad():
            for n, W in params.items():
                d = W.grad + weight_decay * W
                if momentum != 0:
                    buf[n] = d.clone() if n not in buf else momentum * buf[n] + (1 - dampening) * d
                    g = d + momentum * buf[n] if nesterov else buf[n]
                else:
                    g = d
                if pen[n] == "none":
                    W -= kappa * lr * g
                    continue
                W_old = W.clone()
                W -= kappa * lr * (g + (W_old - Gamma[n]) / nu)
                V[n] += lr / nu * (W_old - Gamma[n])
                Gamma[n] = kappa * spec_prox(V[n], lam, pen[n])
    return params, V, Gamma


def optimizer_run(model, batches, *, foreach, penalty, **hyper):
    if penalty == "neuron":  # per-group penalties: neuron rows for linear weights
        groups = [
            {"params": [p for p in model.parameters() if p.dim() == 4], "penalty": "group"},
            {"params": [p for p in model.parameters() if p.dim() == 2], "penalty": "neuron"},
            {"params": [p for p in model.parameters() if p.dim() == 1], "penalty": "none"},
        ]
        opt = SplitLBI(groups, foreach=foreach, **hyper)
    elif penalty == "l1":
        groups = [
            {"params": [p for p in model.parameters() if p.dim() > 1], "penalty": "l1"},
            {"params": [p for p in model.parameters() if p.dim() == 1], "penalty": "none"},
        ]
        opt = SplitLBI(groups, foreach=foreach, **hyper)
    else:
        opt = SplitLBI(model.named_parameters(), foreach=foreach, penalty=penalty, **hyper)
    opt.sparsity_path = []
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        opt.sparsity_path.append(opt.nonzero_share().overall)
    return opt


MOMENTUM_VARIANTS = {
    "naive": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "mom": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
    "mom-wd": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-3),
    "dampened-wd": dict(momentum=0.8, dampening=0.3, nesterov=False, weight_decay=1e-3),
    "nesterov-wd": dict(momentum=0.5, dampening=0.0, nesterov=True, weight_decay=1e-2),
}


@pytest.mark.parametrize("path", ["foreach", "foreach-waves", "per-tensor"])
@pytest.mark.parametrize("variant", list(MOMENTUM_VARIANTS))
@pytest.mark.parametrize("penalty", ["auto", "l1", "neuron", "none"])
def test_matches_spec_equations(penalty, variant, path, monkeypatch):
    if path == "foreach-waves":  # cut tensors into small waves, filters and flat pieces
        monkeypatch.setattr(functional, "CPU_WAVE_NUMEL", 37)
    hyper = dict(lr=0.05, kappa=2.0, nu=0.5, lam=0.3 if penalty == "neuron" else 0.05, **MOMENTUM_VARIANTS[variant])
    batches = make_batches(60)
    reference_model = make_model()
    params, V, Gamma = spec_run(reference_model, batches, penalty=penalty, **hyper)

    model = make_model()
    opt = optimizer_run(model, batches, foreach=path != "per-tensor", penalty=penalty, **hyper)

    for (name, p), q in zip(params.items(), model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=1e-6, msg=f"W of {name}")
    coupled = list(opt.named_coupled())
    assert len(coupled) == len(V)
    gammas = list(opt.gamma().values())
    for c, (name, v), gamma in zip(coupled, V.items(), gammas):
        torch.testing.assert_close(c.v, v, atol=1e-6, rtol=1e-6, msg=f"V of {name}")
        torch.testing.assert_close(gamma, Gamma[name], atol=1e-6, rtol=1e-6, msg=f"Γ of {name}")
    if penalty != "none":
        # the run must have been non-trivial: a partial support of Γ along the way
        assert any(0.0 < s < 1.0 for s in opt.sparsity_path), opt.sparsity_path


def test_foreach_and_per_tensor_agree_in_float32():
    batches = make_batches(50, torch.float32)
    finals = []
    for foreach in (True, False):
        model = make_model(torch.float32)
        optimizer_run(model, batches, foreach=foreach, penalty="auto", lr=0.05, kappa=1.0, nu=1.0, lam=0.05,
                      momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inverse_scale_space_on_sparse_regression():
    """True coefficients enter the support of Γ before any null one; the end recovers them."""
    generator = torch.Generator().manual_seed(0)
    n, p = 400, 30
    x = torch.randn(n, p, generator=generator)
    beta = torch.zeros(p)
    true = torch.tensor([3, 11, 17, 25])
    beta[true] = torch.tensor([2.0, -1.5, 1.0, -0.7])
    y = x @ beta + 0.1 * torch.randn(n, generator=generator)

    model = nn.Linear(p, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = SplitLBI(model.named_parameters(), lr=0.1, kappa=5.0, nu=1.0, lam=1.0, momentum=0.0, penalty="l1")
    entered = torch.full((p,), -1)
    for step in range(600):
        opt.zero_grad()
        loss = 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        opt.step()
        support = opt.support()["weight"][0]
        entered[(support) & (entered < 0)] = step
    null = torch.ones(p, dtype=torch.bool)
    null[true] = False
    assert (entered[true] >= 0).all(), entered
    first_null = entered[null][entered[null] >= 0].min() if (entered[null] >= 0).any() else 10**9
    assert entered[true].max() < first_null, (entered[true], first_null)
    # larger coefficients enter first (the inverse scale space order)
    assert entered[true].tolist() == sorted(entered[true].tolist())
    final_support = opt.support()["weight"][0]
    assert torch.equal(final_support, ~null)
    with opt.sparse_model():
        sparse_weight = model.weight.detach().clone()[0]
    assert (sparse_weight[null] == 0).all() and (sparse_weight[true] != 0).all()
    torch.testing.assert_close(sparse_weight[true], beta[true], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("foreach", [True, False])
def test_exact_resume_is_bitwise(foreach):
    batches = make_batches(20, torch.float32)
    hyper = dict(lr=0.05, kappa=2.0, nu=1.0, lam=0.05, momentum=0.9, weight_decay=1e-4, foreach=foreach)

    straight = make_model(torch.float32)
    optimizer_run_steps(straight, SplitLBI(straight.named_parameters(), **hyper), batches)

    first = make_model(torch.float32)
    opt = SplitLBI(first.named_parameters(), **hyper)
    optimizer_run_steps(first, opt, batches[:10])
    blob = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob)

    resumed = make_model(torch.float32)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # a fresh model that differs from the saved one
    resumed.load_state_dict(saved["model"])
    opt2 = SplitLBI(resumed.named_parameters(), **hyper)
    opt2.load_state_dict(saved["optimizer"])
    optimizer_run_steps(resumed, opt2, batches[10:])

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for (na, a), (nb, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), na


def optimizer_run_steps(model, opt, batches):
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(kappa=0.0), "kappa"),
        (dict(kappa=-2.0), "kappa"),
        (dict(nu=0.0), "nu"),
        (dict(lam=-0.1), "lam"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(nesterov=True, momentum=0.0), "nesterov"),
        (dict(penalty="lasso"), "penalty"),
        (dict(weight_decay=-1.0), "weight_decay"),
    ],
)
def test_invalid_hyperparameters_name_argument_and_value(kwargs, argument):
    model = make_model()
    hyper = dict(lr=0.1)
    hyper.update(kwargs)
    with pytest.raises(ValueError, match=rf"Invalid {argument}: "):
        SplitLBI(model.parameters(), **hyper)


def test_invalid_per_group_hyperparameter():
    model = make_model()
    with pytest.raises(ValueError, match="Invalid kappa: -1"):
        SplitLBI([{"params": model.parameters(), "kappa": -1}], lr=0.1)


@pytest.mark.parametrize("penalty, bad", [("group", "3.weight"), ("neuron", "0.weight"), ("group", "0.bias")])
def test_penalty_that_does_not_fit_the_shape_names_the_parameter(penalty, bad):
    model = make_model()
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match=rf"{bad.replace('.', '[.]')}"):
        SplitLBI([{"params": [(bad, named[bad])], "penalty": penalty}], lr=0.1)


def test_names_from_named_parameters_and_positional():
    model = make_model()
    named = SplitLBI(model.named_parameters(), lr=0.1, penalty="auto")
    assert list(named.support()) == ["0.weight", "3.weight"]
    plain = SplitLBI(model.parameters(), lr=0.1, penalty="auto")
    assert list(plain.support()) == ["param0", "param2"]
    assert list(SplitLBI(model.parameters(), lr=0.1).support()) == ["param0"]  # the default: conv weights only
    groups = SplitLBI([{"params": [model[0].bias]}, {"params": [model[3].weight]}], lr=0.1, penalty="auto")
    assert list(groups.support()) == ["param1"]


def _train(model, opt, steps=30):
    dtype = next(model.parameters()).dtype
    for batch in make_batches(steps, dtype):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


def test_path_readers_shapes_and_consistency():
    model = make_model(torch.float32)
    opt = SplitLBI(model.named_parameters(), lr=0.05, kappa=2, nu=0.5, lam=0.05, penalty="auto")
    assert opt.nonzero_share().overall == 0.0  # empty support before any step
    _train(model, opt)
    support = opt.support()
    filters = opt.filter_support()
    norms = opt.filter_norms()
    gamma_norms = opt.filter_norms("gamma")
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert name not in support
            continue
        assert support[name].shape == p.shape and support[name].dtype == torch.bool
        assert filters[name].shape == (p.shape[0],)
        torch.testing.assert_close(norms[name], p.detach().reshape(p.shape[0], -1).norm(dim=1))
        assert torch.equal(gamma_norms[name] > 0, filters[name])
    # group penalty: whole filters in or out
    conv = support["0.weight"].reshape(6, -1)
    assert torch.equal(conv.all(dim=1), conv.any(dim=1))
    sparsity = opt.nonzero_share()
    total = sum(m.numel() for m in support.values())
    assert sparsity.overall == pytest.approx(sum(int(m.sum()) for m in support.values()) / total)
    assert set(sparsity.layers) == set(support)
    masks = opt.masks()
    assert all(m.device.type == "cpu" for m in masks.values())


def test_sparse_model_projects_and_restores_exactly():
    model = make_model(torch.float32)
    opt = SplitLBI(model.named_parameters(), lr=0.05, kappa=2, nu=0.5, lam=0.05, penalty="auto")
    _train(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    support = opt.support()
    assert any(not m.all() for m in support.values())
    with opt.sparse_model() as masks:
        for name, p in model.named_parameters():
            if name in support:
                assert torch.equal(masks[name], support[name])
                assert (p[~support[name]] == 0).all()
                assert torch.equal(p[support[name]], before[name][support[name]])
            else:
                assert torch.equal(p, before[name])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_sparse_model_restores_on_exception():
    model = make_model(torch.float32)
    opt = SplitLBI(model.named_parameters(), lr=0.05, kappa=2, nu=0.5, lam=0.05)
    _train(model, opt, 10)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        with opt.sparse_model():
            raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_per_group_hyperparameters_are_used():
    model = make_model(torch.float32)
    conv = [p for p in model.parameters() if p.dim() == 4]
    rest = [p for p in model.parameters() if p.dim() != 4]
    opt = SplitLBI([{"params": conv, "lam": 1e9}, {"params": rest, "penalty": "auto"}], lr=0.05, kappa=2, nu=0.5,
                   lam=0.05)
    _train(model, opt)
    assert not opt.filter_support()["param0"].any()  # λ huge: nothing ever enters
    assert opt.filter_support()["param2"].any()


def test_state_dict_round_trip_and_scheduler_and_closure():
    model = make_model(torch.float32)
    opt = SplitLBI(model.named_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    batches = make_batches(4, torch.float32)
    for batch in batches:
        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    state = opt.state_dict()
    keys = set(itertools.chain.from_iterable(s.keys() for s in state["state"].values()))
    assert keys == {"momentum_buffer", "v"}
    fresh = SplitLBI(make_model(torch.float32).named_parameters(), lr=0.1)
    fresh.load_state_dict(state)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_grad_scaler_skips_inf_steps():
    model = make_model(torch.float32)
    opt = SplitLBI(model.named_parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batch = make_batches(1, torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_fn(model, batch)).backward()
    next(model.parameters()).grad[0].fill_(float("inf"))
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    scaler.scale(loss_fn(model, batch)).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("foreach", [True, False])
def test_bfloat16_parameters(foreach):
    model = make_model(torch.bfloat16)
    opt = SplitLBI(model.named_parameters(), lr=0.05, kappa=2, nu=0.5, lam=0.05, foreach=foreach)
    _train(model, opt)
    assert all(s["v"].dtype == torch.bfloat16 for s in opt.state.values() if "v" in s)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0.0 < opt.nonzero_share().overall <= 1.0


def test_params_without_grad_are_skipped():
    model = make_model(torch.float32)
    opt = SplitLBI(model.named_parameters(), lr=0.05)
    model[3].weight.requires_grad_(False)
    before = model[3].weight.detach().clone()
    _train(model, opt, 3)
    assert torch.equal(model[3].weight, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    batches = make_batches(20, torch.float32)
    results = []
    for device in ("cpu", "cuda"):
        model = make_model(torch.float32).to(device)
        opt = SplitLBI(model.named_parameters(), lr=0.05, kappa=2, nu=0.5, lam=0.05)
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model, (x.to(device), y.to(device))).backward()
            opt.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_channels_last_params_in_small_waves(monkeypatch):
    """Tensors cut into pieces (rows along dim 0) work in any memory format."""
    monkeypatch.setattr(functional, "CPU_WAVE_NUMEL", 40)
    batches = make_batches(20)
    finals = []
    for foreach in (True, False):
        model = make_model().to(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
        optimizer_run(model, batches, foreach=foreach, penalty="auto", lr=0.05, kappa=2.0, nu=0.5, lam=0.05,
                      momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-3)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_step_without_any_gradient_is_a_no_op(foreach):
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    SplitLBI(model.named_parameters(), lr=0.1, foreach=foreach).step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_parameters_that_stop_and_start_having_gradients_match_the_reference(monkeypatch):
    """The multi-tensor step plan is cached per parameter list; a changing list rebuilds it."""
    monkeypatch.setattr(functional, "CPU_WAVE_NUMEL", 50)
    batches = make_batches(12)
    finals = []
    for foreach in (True, False):
        model = make_model()
        opt = SplitLBI(model.named_parameters(), lr=0.05, kappa=2.0, nu=0.5, lam=0.05, foreach=foreach)
        for step, batch in enumerate(batches):
            model[3].weight.requires_grad_(not 4 <= step < 8)  # a layer frozen for a while
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_mixed_dtypes_in_one_group_match_the_reference():
    """Parameters of several dtypes in one group take the regrouping path."""
    finals = []
    for foreach in (True, False):
        torch.manual_seed(0)
        conv = nn.Conv2d(2, 4, 3).double()
        linear = nn.Linear(4 * 4 * 4, 3)
        opt = SplitLBI(list(conv.named_parameters()) + list(linear.named_parameters()), lr=0.05, kappa=2.0,
                       nu=0.5, lam=0.05, foreach=foreach)
        for x, _ in make_batches(10):
            opt.zero_grad()
            linear(torch.tanh(conv(x)).flatten(1).float()).pow(2).mean().backward()
            opt.step()
        finals.append([p.detach().clone() for p in [*conv.parameters(), *linear.parameters()]])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
