"""The SplitLBI optimizer: validates hyperparameters, gathers state, calls the functional core."""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import penalties as _penalties
from .functional import (
    UPDATES, StepPlan, default_wave_numel, multi_tensor_splitlbi, plan_step, release_gamma, splitlbi_update,
)
from .fused import NormCache, fused_splitlbi, fused_supported

ParamsT = Union[Iterable[Tensor], Iterable[tuple[str, Tensor]], Iterable[dict[str, Any]]]


class NonzeroShare(NamedTuple):
    """Share of non-zeros of Γ: over all coupled parameters, and per parameter name."""

    overall: float
    layers: dict[str, float]


#: Deprecated name of :class:`NonzeroShare` (same class).
Sparsity = NonzeroShare


class Coupled(NamedTuple):
    """A parameter that carries a structure parameter Γ."""

    name: str
    param: Tensor
    v: Tensor
    penalty: str
    kappa: float
    lam: float
    update: str = "paper"


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

    ``update="release"`` is the variant of the paper's release code (its CIFAR pruning
    example, ``slbi_noconv_with_normalize.py``): with ``s(W) = max(|W|, 1)`` elementwise
    and ``ρ`` the share of non-zeros of the layer's ``Γ`` before the step,

    .. math::

        Γ = κ\,s(W)\,\mathrm{prox}_Ω(V), \qquad
        W \leftarrow W - κα\,(g + (W - Γ)/ν), \qquad
        V \leftarrow V + (α/ν)\,\min(1 - ρ, 0.01)\,(W_{old} - Γ)/s(W_{new})

    (the release script uses it with ``penalty="l1"`` on every weight, ``λ = 3·10⁻⁴``,
    ``ν = 500``, ``κ = 1``). The support of ``Γ`` is that of ``prox_Ω(V)`` under both
    updates, so :meth:`support`, :meth:`path_scores` and the masks read the same way.

    Args:
        params: parameters, ``model.named_parameters()`` (names are used by
            :meth:`support` and friends), or parameter groups (dicts). Every
            hyperparameter below, ``penalty`` included, can be set per group.
        lr: learning rate ``α``.
        kappa: damping factor ``κ`` (``W`` moves with step ``κα``).
        nu: coupling strength ``ν``.
        lam: penalty weight ``λ`` inside ``Ω``.
        momentum, dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD`.
        update: ``"paper"`` (the equations above; the default and the reference) or
            ``"release"`` (the release code's variant above). ``"release"`` runs on the
            per-tensor path only: ``foreach=True`` or ``fused=True`` with it is an error.
        penalty: ``"group"`` (one group per output filter of a conv weight),
            ``"neuron"`` (one group per output row of a linear weight), ``"l1"``
            (elementwise), ``"none"`` (no Γ: plain SGD(-momentum) with step ``κα``), or
            ``"auto"``: 4-D → group, 2-D → l1, otherwise none.
        foreach: ``True`` selects the multi-tensor ``_foreach`` path, ``False`` the
            per-tensor reference path; ``None`` (default): the fused step where it
            runs, else the multi-tensor path.
        fused: the whole step in one kernel (:mod:`splitlbi.optim.fused`): a C++
            kernel on CPU (float32; compiled on first use, once per machine) and a
            Triton kernel on CUDA (when Triton is installed). ``None`` (default) uses it
            when ``foreach`` is not given and it can run, falling back silently;
            ``True`` raises where it cannot run; ``False`` never uses it.

    State per parameter (``self.state[p]``): ``"momentum_buffer"`` and, for coupled
    parameters, ``"v"``. ``Γ = κ·prox(V)`` is a function of ``V`` (with ``update="release"``:
    of ``V`` and the current ``W``) and is formed on demand (:meth:`gamma`), which saves
    memory and passes over it.

    Example::

        >>> opt = SplitLBI(model.named_parameters(), lr=0.1, kappa=1, nu=100)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        >>> opt.nonzero_share().overall, opt.filter_support()["conv3.weight"].sum()
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
        fused: Optional[bool] = None,
        update: str = "paper",
    ) -> None:
        if fused and foreach:
            raise ValueError("Invalid fused: `foreach` and `fused` cannot both be True")
        defaults = dict(
            lr=lr, kappa=kappa, nu=nu, lam=lam, momentum=momentum, dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, penalty=penalty, foreach=foreach, fused=fused,
            update=update,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        params = param_group.get("params")
        # Materialized once: a generator must not be consumed by the duplicate check.
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params or [])
        _check_unique(param_group["params"], sum(len(g["params"]) for g in self.param_groups))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate(group)
            names = group.get("param_names")
            offset = sum(len(g["params"]) for g in self.param_groups[:-1])
            for k, p in enumerate(group["params"]):
                name = names[k] if names else f"param{offset + k}"
                _penalties.resolve_penalty(group["penalty"], p.shape, name)
        except ValueError:
            self.param_groups.pop()  # an invalid group must not stay half-added
            raise

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, after checking that it is a SplitLBI state
        for these parameters: the group layout, valid hyperparameters in every group, and
        per parameter the state the step needs (``v`` for a coupled parameter that has
        state) with the parameter's shape. Raises ``ValueError`` naming the parameter;
        nothing is changed then."""
        _check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("update", "paper")  # states saved before the option existed

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
            if group["update"] != "paper":  # the variant runs on the per-tensor path only
                for i, p in enumerate(params):
                    buffers[i] = splitlbi_update(p, grads[i], buffers[i], vs[i], penalty=penalties[i],
                                                 update=group["update"], **hyper)
            elif self._fused_step(group, params, grads, buffers, vs, penalties, hyper):
                pass
            elif group["foreach"] is False or torch.jit.is_scripting():
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

    def _fused_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], buffers: list,
                    vs: list, penalties: list[str], hyper: dict[str, Any]) -> bool:
        """Run the fused kernel on a group when ``fused`` allows it and it can (True), else
        change nothing and return False. ``fused=True`` raises where it cannot run."""
        fused = group.get("fused")
        # as torch.optim: an explicit foreach (True or False) without fused=True picks that path
        if fused is False or (fused is None and group["foreach"] is not None) or torch.jit.is_scripting():
            return False
        reason = self._fused_reason(params)
        if reason is None:
            caches = self.__dict__.setdefault("_norm_caches", {})
            cache = caches.get(id(group["params"]))
            if cache is None:  # a new group, or load_state_dict made new ones: drop the old caches
                live = {id(g["params"]) for g in self.param_groups}
                caches = self.__dict__["_norm_caches"] = {k: c for k, c in caches.items() if k in live}
                cache = caches[id(group["params"])] = NormCache()
            if fused_splitlbi(params, grads, buffers, vs, penalties, cache, **hyper):
                return True
            reason = "a tensor's layout or dtype does not suit the kernel (see splitlbi.optim.fused)"
        if fused:
            raise RuntimeError(f"SplitLBI(fused=True) cannot run the fused step: {reason}")
        return False

    def _fused_reason(self, params: list[Tensor]) -> Optional[str]:
        """:func:`fused_supported` of a group's parameters, cached by the identity of the
        parameters (the kernels check dtypes, devices and layouts again on every call)."""
        checked = self.__dict__.setdefault("_fused_checked", {})
        key = (id(params[0]), len(params), params[0].device, params[0].dtype)
        cached = checked.get(key)
        if cached is not None and all(map(operator.is_, cached[0], params)):
            return cached[1]
        reason = fused_supported(params)
        checked[key] = (list(params), reason)
        return reason

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
                yield Coupled(name, p, v, penalty, group["kappa"], group["lam"], group["update"])

    def gamma(self) -> dict[str, Tensor]:
        """``{name: Γ}`` for every coupled parameter (new tensors): ``κ·prox(V)``, or with
        ``update="release"`` ``κ·max(|W|, 1)·prox(V)`` with the current ``W``."""
        return {c.name: release_gamma(c.v, c.param.detach(), c.kappa, c.lam, c.penalty) if c.update == "release"
                else _penalties.gamma_from_v(c.v, c.kappa, c.lam, c.penalty) for c in self.named_coupled()}

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

    def nonzero_share(self) -> NonzeroShare:
        """Share of non-zeros of Γ, overall and per layer (1.0 = dense, 0.0 = empty).

        This is what the paper calls the sparsity of Γ; the name says which way it runs
        (most readers take "sparsity" for the share of zeros). ``metrics.csv`` has it as
        ``gamma_nonzero_share``.
        """
        layers, nonzero, total = {}, 0, 0
        for name, mask in self.support().items():
            count = int(mask.sum())
            layers[name] = count / mask.numel()
            nonzero += count
            total += mask.numel()
        return NonzeroShare(nonzero / total if total else 0.0, layers)

    def sparsity(self) -> NonzeroShare:
        """Deprecated alias of :meth:`nonzero_share` (the share of NON-zeros of Γ)."""
        warnings.warn("SplitLBI.sparsity() is deprecated: it returns the share of non-zeros of Γ; call "
                      "nonzero_share()", DeprecationWarning, stacklevel=2)
        return self.nonzero_share()

    def filter_norms(self, which: str = "weight") -> dict[str, Tensor]:
        """``{name: ℓ2 norm of each output filter}`` of ``W`` (``which="weight"``) or of ``Γ``."""
        if which not in ("weight", "gamma"):
            raise ValueError(f"which must be 'weight' or 'gamma', got {which!r}")
        if which == "gamma":
            return {name: _penalties.group_norms(g) for name, g in self.gamma().items()}
        return {c.name: _penalties.group_norms(c.param.detach()) for c in self.named_coupled()}

    def masks_by_module(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """:meth:`masks` keyed by ``model``'s own parameter names (found by identity, so it
        works also when the optimizer was given ``model.parameters()`` without names)."""
        names = {id(p): name for name, p in model.named_parameters()}
        masks = {}
        for c in self.named_coupled():
            name = names.get(id(c.param))
            if name is None:
                raise ValueError(f"the coupled parameter {c.name} is not a parameter of the model given")
            masks[name] = _penalties.support_from_v(c.v, c.lam, c.penalty).cpu()
        return masks

    @contextlib.contextmanager
    def sparse_model(self, model: Optional[torch.nn.Module] = None, example_input: Optional[Tensor] = None,
                     fold: bool = True) -> Iterator[dict[str, Tensor]]:
        """Temporarily turn the network into its sparse model; restored exactly on exit.
        Yields the masks used (the support of Γ).

        With ``model`` and ``example_input`` (one batch of inputs; it traces the network): the
        network that :func:`splitlbi.prune.compact_model` builds from the support, computed in
        ``model``'s own architecture (:func:`splitlbi.prune.compact.mask_network`): every filter
        outside the support is removed with its BatchNorm channel, and the constant that
        channel emitted is folded into the layers that read it (``fold``). Evaluate in eval
        mode. This is what the training loop reports as the sparse accuracy.

        Without them: each coupled ``W`` projected onto the support of Γ (weights outside it
        set to zero), the projection of the paper. In a network with BatchNorm that is *not*
        the network you can cut out: a zeroed filter's BatchNorm channel still emits a
        constant that depends on its running mean.
        """
        if model is None:
            if example_input is not None:
                raise ValueError("sparse_model: example_input needs the model too: sparse_model(model, example_input)")
            with self._projected() as masks:
                yield masks
            return
        if example_input is None:
            raise ValueError("sparse_model(model) needs example_input: one batch of inputs, to trace the network "
                             "(e.g. sparse_model(model, x[:1]))")
        from splitlbi.prune.compact import mask_network

        masks = self.masks_by_module(model)
        masked = mask_network(model, masks, example_input, fold=fold).model
        live = model.state_dict(keep_vars=True)
        saved = []
        with torch.no_grad():
            for key, value in masked.state_dict().items():
                target = live[key]
                if isinstance(target, Tensor) and target.is_floating_point() and not torch.equal(target, value):
                    saved.append((target, target.detach().clone()))
                    target.copy_(value)
        try:
            yield masks
        finally:
            with torch.no_grad():
                for target, original in saved:
                    target.copy_(original)

    @contextlib.contextmanager
    def _projected(self) -> Iterator[dict[str, Tensor]]:
        """Each coupled ``W`` projected onto the support of Γ, restored on exit."""
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


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate(hyper: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter and its value."""
    checks = [
        ("lr", lambda x: x > 0, "> 0"),
        ("kappa", lambda x: x > 0, "> 0"),
        ("nu", lambda x: x > 0, "> 0"),
        ("lam", lambda x: x >= 0, ">= 0"),
        ("momentum", lambda x: 0 <= x < 1, "in [0, 1)"),
        ("dampening", lambda x: 0 <= x <= 1, "in [0, 1]"),
        ("weight_decay", lambda x: x >= 0, ">= 0"),
    ]
    for key, ok, expected in checks:
        value = hyper[key]
        if not _is_real(value) or not ok(value):
            raise ValueError(f"Invalid {key}: {value!r} (expected a finite number {expected})")
    if not isinstance(hyper["nesterov"], bool):
        raise ValueError(f"Invalid nesterov: {hyper['nesterov']!r} (expected True or False)")
    if hyper.get("foreach") is not None and not isinstance(hyper["foreach"], bool):
        raise ValueError(f"Invalid foreach: {hyper['foreach']!r} (expected None, True or False)")
    if hyper["nesterov"] and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
        raise ValueError(
            f"Invalid nesterov: True needs momentum > 0 and dampening = 0 "
            f"(got momentum={hyper['momentum']!r}, dampening={hyper['dampening']!r})"
        )
    if not isinstance(hyper["penalty"], str) or hyper["penalty"] not in _penalties.PENALTIES:
        raise ValueError(f"Invalid penalty: {hyper['penalty']!r} (expected one of {_penalties.PENALTIES})")
    if hyper.get("foreach") not in (None, True, False):  # "yes" would silently mean True
        raise ValueError(f"Invalid foreach: {hyper['foreach']!r} (expected None, True or False)")
    update = hyper.get("update", "paper")  # absent from states saved before the option existed
    if not isinstance(update, str) or update not in UPDATES:
        raise ValueError(f"Invalid update: {update!r} (expected one of {UPDATES})")
    if update != "paper" and (hyper.get("foreach") or hyper.get("fused")):
        raise ValueError(f"Invalid update: {update!r} runs on the per-tensor path only "
                         f"(got foreach={hyper.get('foreach')!r}, fused={hyper.get('fused')!r}; leave them None)")


def _check_unique(params: list[Any], offset: int) -> None:
    """Raise ``ValueError`` naming a parameter listed twice in one group (it would be stepped twice)."""
    seen: dict[int, int] = {}
    for k, item in enumerate(params):
        tensor = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if not isinstance(tensor, Tensor):
            continue  # torch.optim reports what is not a tensor
        if id(tensor) in seen:
            name = item[0] if isinstance(item, tuple) else f"param{offset + k}"
            raise ValueError(f"parameter {name} appears twice in one parameter group (it would be updated twice)")
        seen[id(tensor)] = k


_GROUP_KEYS = ("lr", "kappa", "nu", "lam", "momentum", "dampening", "nesterov", "weight_decay", "penalty")
_STATE_TENSORS = ("momentum_buffer", "v")


def _check_state_dict(optimizer: SplitLBI, state_dict: Any) -> None:
    """Raise ``ValueError`` (naming the group or parameter) unless ``state_dict`` is a
    SplitLBI state that fits ``optimizer``'s parameters."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        keys = sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"not an optimizer state_dict: expected the keys 'state' and 'param_groups', got {keys}")
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(state, Mapping):
        raise ValueError("not an optimizer state_dict: 'param_groups' must be a list and 'state' a dict")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the state_dict has {len(saved_groups)} parameter group(s), this optimizer "
                         f"{len(optimizer.param_groups)}")
    position = 0
    for index, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"parameter group {index} of the state_dict is not a parameter group")
        missing = [key for key in _GROUP_KEYS if key not in saved]
        if missing:
            raise ValueError(f"parameter group {index} of the state_dict has no {', '.join(map(repr, missing))}: "
                             f"not a SplitLBI state (from another optimizer?)")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"parameter group {index} of the state_dict has {len(saved['params'])} parameters, "
                             f"this optimizer's {len(group['params'])}")
        _validate({"foreach": None, **saved})
        names = group.get("param_names")
        for k, (p, key) in enumerate(zip(group["params"], saved["params"])):
            name = names[k] if names else f"param{position + k}"
            penalty = _penalties.resolve_penalty(saved["penalty"], p.shape, name)
            entry = state.get(key)
            if entry is None:
                continue
            if not isinstance(entry, Mapping):
                raise ValueError(f"the state of parameter {name} is not a dict")
            for tensor_key in _STATE_TENSORS:
                value = entry.get(tensor_key)
                if value is None:
                    continue
                if not isinstance(value, Tensor) or tuple(value.shape) != tuple(p.shape):
                    shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"the state of parameter {name}: {tensor_key} has shape {shape}, the "
                                     f"parameter {list(p.shape)}")
            if penalty != "none" and entry and entry.get("v") is None:
                raise ValueError(f"the state of parameter {name} has no 'v' (V of its path), which its penalty "
                                 f"{penalty!r} needs")
        position += len(group["params"])
