"""The SplitLBI optimizer: validates hyperparameters, gathers state, calls the functional core."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import penalties as _penalties
from .functional import StepPlan, default_wave_numel, multi_tensor_splitlbi, plan_step, splitlbi_update

ParamsT = Union[Iterable[Tensor], Iterable[tuple[str, Tensor]], Iterable[dict[str, Any]]]


class Sparsity(NamedTuple):
    """Share of non-zeros of Γ: over all coupled parameters, and per parameter name."""

    overall: float
    layers: dict[str, float]


class Coupled(NamedTuple):
    """A parameter that carries a structure parameter Γ."""

    name: str
    param: Tensor
    v: Tensor
    penalty: str
    kappa: float
    lam: float


class SplitLBI(Optimizer):
    r"""Split Linearized Bregman Iteration (DessiLBI).

    Each weight ``W`` is coupled with a sparse structure parameter ``Γ`` through
    ``L̄(W, Γ) = L(W) + ‖W − Γ‖² / (2ν)``; with learning rate ``α`` a step is

    .. math::

        W &\leftarrow W - κα\,(g + (W - Γ)/ν), \qquad
        V \leftarrow V + (α/ν)\,(W_{old} - Γ), \qquad
        Γ = κ\,\mathrm{prox}_Ω(V)

    where ``g`` is the gradient passed through weight decay and momentum exactly as
    :class:`torch.optim.SGD` does. The support of ``Γ`` grows from empty to full along
    training (an inverse scale space): important filters and weights enter first.

    Args:
        params: parameters, ``model.named_parameters()`` (names are used by
            :meth:`support` and friends), or parameter groups (dicts). Every
            hyperparameter below, ``penalty`` included, can be set per group.
        lr: learning rate ``α``.
        kappa: damping factor ``κ`` (``W`` moves with step ``κα``).
        nu: coupling strength ``ν``.
        lam: penalty weight ``λ`` inside ``Ω``.
        momentum, dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        penalty: ``"group"`` (one group per output filter of a conv weight),
            ``"neuron"`` (one group per output row of a linear weight), ``"l1"``
            (elementwise), ``"none"`` (no Γ: plain SGD(-momentum) with step ``κα``), or
            ``"auto"``: 4-D → group, 2-D → l1, otherwise none.
        foreach: use the multi-tensor path (default) or the per-tensor reference path.

    State per parameter (``self.state[p]``): ``"momentum_buffer"`` and, for coupled
    parameters, ``"v"``. ``Γ = κ·prox(V)`` is a function of ``V`` and is formed on
    demand (:meth:`gamma`), which saves memory and passes over it.

    Example::

        >>> opt = SplitLBI(model.named_parameters(), lr=0.1, kappa=1, nu=100)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        >>> opt.sparsity().overall, opt.filter_support()["conv3.weight"].sum()
        >>> with opt.sparse_model():   # W projected onto the support of Γ
        ...     evaluate(model)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        kappa: float = 1.0,
        nu: float = 3.0,
        lam: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        penalty: str = "auto",
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr, kappa=kappa, nu=nu, lam=lam, momentum=momentum, dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, penalty=penalty, foreach=foreach,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate(group)
        names = group.get("param_names")
        offset = sum(len(g["params"]) for g in self.param_groups[:-1])
        for k, p in enumerate(group["params"]):
            name = names[k] if names else f"param{offset + k}"
            _penalties.resolve_penalty(group["penalty"], p.shape, name)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one SplitLBI step (``closure`` re-evaluates the loss, as in torch.optim)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers, vs, penalties, states = self._init_group(group)
            if not params:  # no gradients in this group: nothing to do, as torch.optim.SGD
                continue
            first_step = any(buf is None for buf in buffers)
            hyper = dict(
                lr=group["lr"], kappa=group["kappa"], nu=group["nu"], lam=group["lam"],
                momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], weight_decay=group["weight_decay"],
            )
            if group["foreach"] is False or torch.jit.is_scripting():
                for i, p in enumerate(params):
                    buffers[i] = splitlbi_update(p, grads[i], buffers[i], vs[i], penalty=penalties[i], **hyper)
            else:
                plan = self._step_plan(params, penalties)
                if plan is not None:  # one device and dtype: no regrouping needed
                    multi_tensor_splitlbi(params, grads, buffers, vs, penalties, plan=plan, **hyper)
                else:
                    by_device = Optimizer._group_tensors_by_device_and_dtype(
                        [params, grads, buffers, vs], with_indices=True  # type: ignore[list-item]
                    )
                    for (device_params, device_grads, device_buffers, device_vs), indices in by_device.values():
                        new_buffers = multi_tensor_splitlbi(
                            device_params, device_grads, list(device_buffers), list(device_vs),
                            [penalties[i] for i in indices], **hyper,
                        )
                        for i, buf in zip(indices, new_buffers):
                            buffers[i] = buf
            if group["momentum"] != 0 and first_step:
                for state, buf in zip(states, buffers):
                    if state.get("momentum_buffer") is None:  # created by this first step
                        state["momentum_buffer"] = buf
        return loss

    def _step_plan(self, params: list[Tensor], penalties: list[str]) -> Optional[StepPlan]:
        """The multi-tensor :class:`StepPlan` of a group's parameters with gradients, or
        None when they span several devices or dtypes. Rebuilt only when the list of
        parameters (compared by identity), their penalties or the wave size change."""
        plans = self.__dict__.setdefault("_step_plans", {})
        key = (id(params[0]), len(params))
        wave_numel = default_wave_numel(params[0].device)
        cached = plans.get(key)
        if (cached is not None and cached[2] == wave_numel and cached[1] == penalties
                and all(map(operator.is_, cached[0], params))):
            return cached[3]
        first = params[0]
        same = all(p.device == first.device and p.dtype == first.dtype for p in params)
        plan = plan_step(params, penalties, wave_numel) if same else None
        plans[key] = (list(params), list(penalties), wave_numel, plan)
        return plan

    def _init_group(self, group: dict[str, Any]) -> tuple[list, list, list, list, list, list]:
        params, grads, buffers, vs, penalties, states = [], [], [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("SplitLBI does not support sparse gradients")
            penalty = _penalties.penalty_for_rank(group["penalty"], p.dim())
            state = self.state[p]
            v = None
            if penalty != "none":
                v = state.get("v")
                if v is None:
                    v = state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad)
            buffers.append(state.get("momentum_buffer"))
            vs.append(v)
            penalties.append(penalty)
            states.append(state)
        return params, grads, buffers, vs, penalties, states

    # -------------------------------------------------------- reading the path
    def named_coupled(self) -> Iterator[Coupled]:
        """The parameters that carry Γ, with their names, ``V``, penalty, κ and λ.

        Names come from ``named_parameters()`` / a ``param_names`` group key; unnamed
        parameters are called ``param0, param1, ...`` in the order they were given.
        Before the first step ``V`` is zero (an empty support).
        """
        position = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for k, p in enumerate(group["params"]):
                name = names[k] if names else f"param{position}"
                position += 1
                penalty = _penalties.resolve_penalty(group["penalty"], p.shape, name)
                if penalty == "none":
                    continue
                v = self.state[p].get("v") if p in self.state else None
                if v is None:
                    v = torch.zeros_like(p)
                yield Coupled(name, p, v, penalty, group["kappa"], group["lam"])

    def gamma(self) -> dict[str, Tensor]:
        """``{name: Γ = κ·prox(V)}`` for every coupled parameter (new tensors)."""
        return {c.name: _penalties.gamma_from_v(c.v, c.kappa, c.lam, c.penalty) for c in self.named_coupled()}

    def support(self) -> dict[str, Tensor]:
        """``{name: bool mask of Γ ≠ 0}``, each of the weight's shape."""
        return {c.name: _penalties.support_from_v(c.v, c.lam, c.penalty) for c in self.named_coupled()}

    def filter_support(self) -> dict[str, Tensor]:
        """``{name: bool[out]}``: which output filters/neurons have any weight in the support."""
        return {c.name: _penalties.filter_support_from_v(c.v, c.lam, c.penalty) for c in self.named_coupled()}

    def path_scores(self) -> dict[str, Tensor]:
        """``{name: score of each output filter/neuron}``: ``‖V_g‖₂ / λ`` for the grouped
        penalties, ``max_j |V_gj| / λ`` (over the row's entries) for ``"l1"``.

        A filter is in the support of Γ exactly when its score is above 1 (the same
        comparison as :meth:`filter_support`), and below 1 the score says how close it is
        to entering: the inverse scale space selects groups in decreasing order of it.
        ``λ = 0`` gives ``inf`` for every non-zero ``V_g``.
        """
        return {c.name: _penalties.filter_scores_from_v(c.v, c.lam, c.penalty) for c in self.named_coupled()}

    def masks(self) -> dict[str, Tensor]:
        """The support of Γ as CPU boolean masks, ready for ``torch.save``."""
        return {name: mask.cpu() for name, mask in self.support().items()}

    def sparsity(self) -> Sparsity:
        """Share of non-zeros of Γ, overall and per layer (1.0 = dense, 0.0 = empty)."""
        layers, nonzero, total = {}, 0, 0
        for name, mask in self.support().items():
            count = int(mask.sum())
            layers[name] = count / mask.numel()
            nonzero += count
            total += mask.numel()
        return Sparsity(nonzero / total if total else 0.0, layers)

    def filter_norms(self, which: str = "weight") -> dict[str, Tensor]:
        """``{name: ℓ2 norm of each output filter}`` of ``W`` (``which="weight"``) or of ``Γ``."""
        if which not in ("weight", "gamma"):
            raise ValueError(f"which must be 'weight' or 'gamma', got {which!r}")
        if which == "gamma":
            return {name: _penalties.group_norms(g) for name, g in self.gamma().items()}
        return {c.name: _penalties.group_norms(c.param.detach()) for c in self.named_coupled()}

    @contextlib.contextmanager
    def sparse_model(self) -> Iterator[dict[str, Tensor]]:
        """Temporarily replace each coupled ``W`` by its projection onto the support of
        Γ (weights outside it set to zero): the "sparse model" of the path. ``W`` is
        restored exactly on exit. Yields the masks used."""
        saved, masks = [], {}
        with torch.no_grad():
            for c in self.named_coupled():
                mask = _penalties.support_from_v(c.v, c.lam, c.penalty)
                masks[c.name] = mask
                saved.append((c.param, c.param.detach().clone()))
                c.param.mul_(mask)
        try:
            yield masks
        finally:
            with torch.no_grad():
                for param, original in saved:
                    param.copy_(original)


def _validate(hyper: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter and its value."""
    checks = [
        ("lr", lambda x: isinstance(x, (int, float)) and x > 0, "a number > 0"),
        ("kappa", lambda x: x > 0, "> 0"),
        ("nu", lambda x: x > 0, "> 0"),
        ("lam", lambda x: x >= 0, ">= 0"),
        ("momentum", lambda x: 0 <= x < 1, "in [0, 1)"),
        ("dampening", lambda x: 0 <= x <= 1, "in [0, 1]"),
        ("weight_decay", lambda x: x >= 0, ">= 0"),
    ]
    for key, ok, expected in checks:
        value = hyper[key]
        if isinstance(value, Tensor) or not ok(value):
            raise ValueError(f"Invalid {key}: {value!r} (expected {expected})")
    if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov: True needs momentum > 0 and dampening = 0 "
            f"(got momentum={hyper['momentum']!r}, dampening={hyper['dampening']!r})"
        )
    if hyper["penalty"] not in _penalties.PENALTIES:
        raise ValueError(f"Invalid penalty: {hyper['penalty']!r} (expected one of {_penalties.PENALTIES})")
