"""Widening a network without changing what it computes, and carrying its SplitLBI state over.

:func:`widen_model` builds the network at the new widths and copies every old weight,
bias and BatchNorm statistic to its place (old channels keep their values; a ResNet
option-A stream may move them, see :mod:`splitlbi.grow.layout`). The new entries start
so that the output is unchanged at the moment of growth:

* a new channel of a plain space (LeNet-5, VGG, a ResNet block's inner conv): its filter
  starts as the family's initialization draws it (``init="drawn"``) or, by default
  (``init="matched"``), drawn and then scaled to the median norm of the conv's old filters,
  and its *outgoing* weights (the input channels of the readers that see it) are zero, so
  nothing downstream sees it yet; the gradient of those outgoing weights is the new
  channel's activation times the reader's gradient, so they start learning at the first step;
* a new channel of a residual stream: its BatchNorm scale and shift are zero where it is
  written, so the channel is exactly zero everywhere in the stream; its readers' weights
  start as drawn (they multiply a zero), which gives the scale a gradient at the first step.

:func:`widen_optimizer_state` does the same to an optimizer ``state_dict``: the old
entries of ``momentum_buffer`` and ``v`` (SplitLBI's V) keep their values, every new
entry is zero (V = 0: a new filter starts outside the support of Γ; fresh momentum).
Γ = κ·prox(V) of an old filter is unchanged, as the group norm of its V is.

Why ``matched``: a new filter starts with Γ = 0, so SplitLBI pulls its weights towards 0 (at
the rate κα/ν per step) while its zero outgoing weights give it no gradient yet; without a
gradient its V tends to its starting weights (V → W₀/κ), so a filter drawn at the
initialization's norm (median 0.58 for LeNet-5's convs, below λ = 1) stays out of the
support, while one at the median norm of its layer's trained filters can enter (on LeNet-5 /
Fashion-MNIST no drawn new conv1/conv2 filter was ever selected, every matched one at the
next check: docs/growing.md).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.grow.layout import GrowthLayout, layout_of

__all__ = ["NEW_FILTER_INITS", "Widening", "widen_model", "widen_optimizer_state", "scatter_old"]

#: How a new filter's weights start: as the family's initialization draws them, or drawn and
#: scaled to the median norm of the conv's old filters (see the module docstring).
NEW_FILTER_INITS = ("matched", "drawn")

#: Per dimension of a tensor: the new position of each old index, or None (the dimension keeps its size).
Positions = Tuple[Optional[Tensor], ...]

_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


class Widening(NamedTuple):
    """A widened network and, per ``state_dict`` key whose shape changed, where its old entries went."""

    model: nn.Module
    positions: Dict[str, Positions]
    old_widths: Tuple[int, ...]
    new_widths: Tuple[int, ...]


def scatter_old(target: Tensor, source: Tensor, positions: Positions) -> Tensor:
    """Write ``source`` into ``target`` (in place) at ``positions`` (per dimension, the new
    index of each old one; None: the same index); return ``target``. The indexed dimensions
    are the leading ones (a weight's output and input channels)."""
    indexed = [d for d, p in enumerate(positions) if p is not None]
    if not indexed:
        target.copy_(source)
        return target
    if indexed != list(range(len(indexed))) and indexed != [1]:
        raise ValueError(f"only leading dimensions can be widened, got dimensions {indexed}")
    index: List[Any] = [slice(None)] * len(positions)
    for j, d in enumerate(indexed):
        shape = [1] * len(indexed)
        shape[j] = -1
        index[d] = positions[d].to(target.device).view(shape)
    target[tuple(index)] = source
    return target


def _new_entries(size: int, positions: Tensor) -> Tensor:
    """Boolean mask of the indices of a widened dimension that no old index went to."""
    new = torch.ones(size, dtype=torch.bool)
    new[positions] = False
    return new


def _module_dims(layout: GrowthLayout) -> Dict[str, Tuple[Optional[int], Optional[int]]]:
    """Module name -> (space of its output channels, space of its input channels), by space index."""
    dims: Dict[str, List[Optional[int]]] = {}
    for index, space in enumerate(layout.spaces):
        for name in space.producers:
            dims.setdefault(name, [None, None])[0] = index
        for name in space.consumers:
            dims.setdefault(name, [None, None])[1] = index
    return {name: (out, into) for name, (out, into) in dims.items()}


def _check_new_widths(layout: GrowthLayout, old: Sequence[int], new: Sequence[int]) -> Tuple[int, ...]:
    new = tuple(int(w) for w in new)
    if len(new) != len(old):
        raise SplitLBIError(f"expected {len(old)} widths ({', '.join(layout.groups)}), got {len(new)}")
    shrunk = [f"{name} {a} -> {b}" for name, a, b in zip(layout.groups, old, new) if b < a]
    if shrunk:
        raise SplitLBIError(f"widening cannot remove filters: {', '.join(shrunk)}")
    if layout.limit(new) != new:
        raise SplitLBIError(f"widths {list(new)} break the family's constraint (each stage at most the next one "
                            f"with option-A shortcuts)")
    return new


def widen_model(model: nn.Module, build: Callable[[Sequence[int]], nn.Module], new_widths: Sequence[int], *,
                seed: int, init: str = "matched") -> Widening:
    """``model`` widened to ``new_widths`` (one per width group of its family), computing the
    same function (see the module docstring); ``model`` itself is left unchanged.

    Args:
        build: ``build(widths)`` makes a network of ``model``'s family at those widths (on
            the CPU; the result is moved to ``model``'s device and dtype).
        seed: seeds the draw of the new filters (through a forked RNG: the global one is
            left as it was, so a resumed run draws the same).
        init: one of :data:`NEW_FILTER_INITS`: the new filters as drawn, or scaled to the
            median norm of their conv's old filters.
    """
    if init not in NEW_FILTER_INITS:
        raise SplitLBIError(f"init of new filters must be one of {', '.join(NEW_FILTER_INITS)}, got {init!r}")
    layout = layout_of(model)
    old = layout.widths(model)
    new = _check_new_widths(layout, old, new_widths)
    reference = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        widened = build(new)
    widened = widened.to(device=reference.device, dtype=reference.dtype)
    if layout_of(widened).widths(widened) != new:
        raise SplitLBIError(f"the network built for widths {list(new)} has widths "
                            f"{list(layout_of(widened).widths(widened))}")

    placed = layout.place(old, new)
    space_positions = [placed.get(index, torch.arange(old[space.group])) for index, space in enumerate(layout.spaces)]
    dims = _module_dims(layout)
    # The BatchNorms that write a residual stream: its new channels get scale and shift 0 there.
    silenced = {name for space in layout.spaces if space.residual for name in space.norms}
    convs = {name for space in layout.spaces for name in space.convs}
    old_state = model.state_dict()
    state = widened.state_dict()
    positions: Dict[str, Positions] = {}
    for key, fresh in state.items():
        module, _, tensor_name = key.rpartition(".")
        out_space, in_space = dims.get(module, (None, None))
        if tensor_name == "weight" and fresh.dim() >= 2:
            spaces = (out_space, in_space)
        elif tensor_name in ("bias", *_NORM_TENSORS) and fresh.dim() == 1:
            spaces = (out_space,)
        else:
            spaces = ()
        where = tuple(space_positions[s] if s is not None else None for s in spaces)
        where = where + (None,) * (fresh.dim() - len(where))
        value = old_state[key]
        if all(p is None for p in where):
            if tuple(value.shape) != tuple(fresh.shape):
                raise SplitLBIError(f"{key} changes shape ({list(value.shape)} -> {list(fresh.shape)}) but is in no "
                                    f"channel space of the layout")
            state[key] = value.clone()
            continue
        target = scatter_old(fresh.clone(), value, where)
        if in_space is not None and len(spaces) == 2 and not layout.spaces[in_space].residual:
            # Zero outgoing weights: the readers do not see the new channels yet.
            target[:, _new_entries(target.shape[1], where[1]).to(target.device)] = 0
        if module in silenced and tensor_name in ("weight", "bias"):
            # A residual stream's new channel is zero where it is written.
            target[_new_entries(target.shape[0], where[0]).to(target.device)] = 0
        if init == "matched" and module in convs and tensor_name == "weight" and where[0] is not None:
            new = _new_entries(target.shape[0], where[0]).to(target.device)
            if bool(new.any()):
                norm = value.flatten(1).norm(dim=1).median()
                drawn = target[new].flatten(1).norm(dim=1).clamp_min(1e-12)
                target[new] *= (norm / drawn).view(-1, *([1] * (target.dim() - 1)))
        state[key] = target
        positions[key] = where
    widened.load_state_dict(state)
    widened.train(model.training)
    return Widening(widened, positions, old, new)


def widen_optimizer_state(state_dict: Mapping[str, Any], widening: Widening,
                          new_parameters: Mapping[str, Tensor]) -> Dict[str, Any]:
    """An optimizer ``state_dict`` of the old network, widened to the network of ``widening``.

    Every per-parameter tensor of the old parameter's shape (``momentum_buffer``, ``v``)
    keeps its entries at their new places and is zero elsewhere; hyperparameters (the
    current learning rate included) and other state are kept. The parameter groups must
    carry ``param_names`` (an optimizer built from ``model.named_parameters()``).
    ``new_parameters``: the widened network's ``named_parameters()``.
    """
    state = copy.deepcopy(dict(state_dict))
    names: Dict[Any, str] = {}
    for group in state["param_groups"]:
        group_names = group.get("param_names")
        if group_names is None:
            raise SplitLBIError("the optimizer's parameter groups carry no param_names: build it from "
                                "model.named_parameters()")
        names.update(zip(group["params"], group_names))
    for index, entry in state["state"].items():
        name = names[index]
        parameter = new_parameters[name]
        where = widening.positions.get(name)
        for key, value in list(entry.items()):
            if where is None or not isinstance(value, Tensor) or value.dim() != parameter.dim():
                continue
            entry[key] = scatter_old(torch.zeros(parameter.shape, dtype=value.dtype, device=value.device), value, where)
    return state
