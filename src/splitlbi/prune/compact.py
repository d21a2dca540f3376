"""Real compaction: remove the conv filters outside the support of Γ.

:func:`compact_model` takes a model and its masks (``{param name: bool mask of Γ≠0,
shaped like the weight}``, e.g. :func:`splitlbi.train.load_masks`) and returns a smaller
model in which every conv filter whose mask is all-False is gone for real, with
everything that depends on it (its BatchNorm channel, the next conv's input channels,
a linear layer's inputs), using torch-pruning's ``DependencyGraph``.

**The masked model** (the reference the compact model equals): a copy of the model in
which, for every ``Conv2d`` filter ``f`` whose mask ``masks[conv.weight][f]`` is
all-False, the filter weights, the conv bias ``f`` and the affine weight and bias of
channel ``f`` of the BatchNorm right after the conv are set to zero
(:func:`apply_filter_masks`). So a removed filter contributes exactly zero, also after
BN in eval mode (a filter with zero weights alone would still emit BN's bias as a
constant). Nothing else is masked: linear layers and the weights of selected filters
are kept as they are.

**Coupled channels** (residual adds): torch-pruning groups the convs whose output
channels are summed; a channel of such a group is removed only when it is unselected
in EVERY conv of the group (the intersection), so a selected filter is never removed.
A group is pruned only when it is safe: every conv/BN/linear member covers its whole
channel dimension with the same index order and no slicing op is involved; an unsafe
group is skipped (its unselected filters stay, zeroed) and reported.

The CIFAR ResNets' option-A shortcuts (subsample + zero-pad in channels) are such a
case for plain torch-pruning: it sees ``F.pad`` as element-wise and couples the 16 stem
channels with the 32/64 of later stages. So the traced copy has each
:class:`~splitlbi.models.resnet_cifar.PadShortcut` replaced by the equal
:class:`IndexShortcut`, which torch-pruning prunes through a custom pruner
(:func:`splitlbi.prune.importance.prepare_torch_pruning`): every residual stream (one per
stage: the stem conv and the ``conv2`` s of stage 1; the ``conv2`` s of stage 2; of
stage 3) is then an ordinary torch-pruning group, sliced by torch-pruning. What
torch-pruning cannot know, and is kept here (:func:`compact_model`), is the zero-padding
semantics of the masked model: a stream channel that the shortcut fills from a channel
of the previous stream is zero only when that source channel is zero too, so it is
removed only then. At least one channel of each group is kept (a zeroed one if none is
selected).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.models.structure import forward_once

__all__ = ["CompactReport", "ConvGroup", "GroupReport", "IndexShortcut", "MaskedNetwork", "apply_filter_masks",
           "check_masks", "compact_model", "compare_latency", "mask_network", "count_macs_params", "measure_latency",
           "trace_conv_groups", "unselected_filters"]


@dataclass
class GroupReport:
    """One torch-pruning group rooted at a conv's output channels."""

    convs: List[str]            #: convs whose output channels are coupled in this group
    channels: int               #: channels before
    removed: int                #: channels removed
    unselected: int             #: channels unselected in every conv of the group
    skipped: Optional[str] = None  #: why the group was not pruned (None: pruned)
    kept_unselected: int = 0    #: unselected filters of its convs that stay (zeroed) when skipped
    emptied: bool = False       #: no channel selected: one zeroed channel kept


@dataclass
class CompactReport:
    """What :func:`compact_model` did and measured; ``print(report)`` gives :meth:`lines`.

    Attributes:
        params_before, params_after: parameters of the masked network and of the compact one.
        macs_before, macs_after: multiply-accumulates of one forward pass of the example
            input (Torch-Pruning's counter), before and after.
        latency_before_ms, latency_after_ms: CPU milliseconds of a forward pass of the latency
            input (1 thread): the median over ``latency_rounds`` rounds of each round's
            median; None without ``measure``.
        latency_ratio: after / before, the median of the per-round ratios (the rounds time
            both networks alternately, so a busy machine moves both alike).
        latency_ratio_range: (lowest, highest) per-round ratio: the spread of that figure.
        latency_rounds: rounds measured.
        groups: one :class:`GroupReport` per channel group (coupled convs).
        kept_channels: conv name -> output channels in the compact network.
        selected_channels: conv name -> filters its mask selects.
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    latency_before_ms: Optional[float] = None
    latency_after_ms: Optional[float] = None
    groups: List[GroupReport] = field(default_factory=list)
    kept_channels: Dict[str, int] = field(default_factory=dict)   #: conv name -> output channels after
    selected_channels: Dict[str, int] = field(default_factory=dict)  #: conv name -> selected filters
    latency_ratio: Optional[float] = None
    latency_ratio_range: Optional[Tuple[float, float]] = None
    latency_rounds: int = 0

    @property
    def skipped_groups(self) -> List[GroupReport]:
        """The groups that could not be pruned safely (their unselected filters stay, zeroed)."""
        return [group for group in self.groups if group.skipped]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> List[str]:
        """The report as text lines (params, MACs, latency before -> after, skipped groups)."""
        def ratio(after: float, before: float) -> str:
            return f"{100.0 * after / before:.1f}%" if before else "n/a"

        out = [f"params   {self.params_before:,} -> {self.params_after:,} "
               f"({ratio(self.params_after, self.params_before)})",
               f"MACs     {self.macs_before:,} -> {self.macs_after:,} ({ratio(self.macs_after, self.macs_before)})"]
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            if self.latency_ratio is not None and self.latency_ratio_range is not None:
                low, high = self.latency_ratio_range
                spread = (f"{100.0 * self.latency_ratio:.1f}% (per round {100.0 * low:.1f}-{100.0 * high:.1f}%, "
                          f"{self.latency_rounds} rounds of medians)")
            else:
                spread = ratio(self.latency_after_ms, self.latency_before_ms)
            out.append(f"latency  {self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms "
                       f"(CPU, 1 thread; {spread})")
        removed = sum(group.removed for group in self.groups)
        out.append(f"filters  removed {removed} in {sum(1 for g in self.groups if g.removed)} of "
                   f"{len(self.groups)} channel groups")
        empty = [group.convs[0] for group in self.groups if group.emptied]
        if empty:
            out.append(f"note     {len(empty)} group(s) with no selected filter keep one zeroed channel: "
                       + ", ".join(empty))
        for group in self.skipped_groups:
            out.append(f"skipped  {group.convs[0]} (+{len(group.convs) - 1} coupled): {group.skipped}; "
                       f"{group.kept_unselected} unselected filter(s) in its convs kept, zeroed")
        return out


def _named_convs(model: nn.Module) -> Dict[str, nn.Conv2d]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """:class:`SplitLBIError` naming the first mask whose name or shape does not match ``model``."""
    from splitlbi.prune.masks import validate_masks

    not_tensors = [name for name, mask in masks.items() if not isinstance(mask, Tensor)]
    if not_tensors:
        raise SplitLBIError(f"masks do not fit the model: {not_tensors[0]} is a "
                            f"{type(masks[not_tensors[0]]).__name__}, not a tensor")
    validate_masks(masks, model)


def unselected_filters(model: nn.Module, masks: Mapping[str, Tensor]) -> Dict[str, List[int]]:
    """Conv name -> indices of its filters whose mask is all-False (convs without a mask: none)."""
    out = {}
    for name, conv in _named_convs(model).items():
        mask = masks.get(f"{name}.weight")
        if mask is not None:
            out[name] = torch.nonzero(~mask.bool().flatten(1).any(1)).flatten().tolist()
    return out


def _bn_after(model: nn.Module, example_input: Tensor) -> Dict[str, nn.BatchNorm2d]:
    """Conv name -> the BatchNorm2d that consumes its output directly (traced with hooks)."""
    convs = {module: name for name, module in _named_convs(model).items()}
    last: Dict[int, str] = {}  # id(conv output tensor) -> conv name
    found: Dict[str, nn.BatchNorm2d] = {}

    def conv_hook(module, inputs, output):
        last[id(output)] = convs[module]
        keep.append(output)

    def bn_hook(module, inputs, output):
        name = last.get(id(inputs[0]))
        if name is not None:
            found.setdefault(name, module)

    keep: List[Tensor] = []
    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    forward_once(model, example_input, handles)
    return found


def apply_filter_masks(model: nn.Module, masks: Mapping[str, Tensor], example_input: Tensor) -> nn.Module:
    """Zero, in place, every unselected conv filter: its weights, its bias and the affine
    weight and bias of its channel in the BatchNorm right after the conv (the module
    docstring's *masked model*). Returns ``model``."""
    check_masks(model, masks)
    convs = _named_convs(model)
    bns = _bn_after(model, example_input)
    with torch.no_grad():
        for name, indices in unselected_filters(model, masks).items():
            if not indices:
                continue
            index = torch.tensor(indices, dtype=torch.long)
            conv = convs[name]
            conv.weight[index] = 0
            if conv.bias is not None:
                conv.bias[index] = 0
            bn = bns.get(name)
            if bn is not None and bn.affine:
                bn.weight[index] = 0
                bn.bias[index] = 0
    return model


def count_macs_params(model: nn.Module, example_input: Tensor) -> Tuple[int, int]:
    """(MACs, parameters) for one forward pass of ``example_input`` (torch-pruning's counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_input)
    finally:
        model.train(was_training)
    return int(macs), int(params)


def compare_latency(first: nn.Module, second: nn.Module, example_input: Tensor, repeats: int = 20,
                    rounds: int = 5) -> Tuple[float, float, float, Tuple[float, float]]:
    """Time two networks alternately: ``rounds`` rounds, each the median of ``repeats`` forward
    passes of ``first`` then of ``second`` (:func:`measure_latency`). Returns (median ms of
    ``first``, of ``second``, median of the per-round ratios second/first, (lowest, highest)
    per-round ratio). Alternating keeps a busy machine's slow spells from landing on one side."""
    firsts, seconds, ratios = [], [], []
    for _ in range(max(1, int(rounds))):
        a = measure_latency(first, example_input, repeats)
        b = measure_latency(second, example_input, repeats)
        firsts.append(a)
        seconds.append(b)
        ratios.append(b / a if a > 0 else float("nan"))
    return statistics.median(firsts), statistics.median(seconds), statistics.median(ratios), (min(ratios),
                                                                                              max(ratios))


def measure_latency(model: nn.Module, example_input: Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``repeats`` forward passes of ``example_input`` (eval mode, 1 CPU thread)."""
    threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    times = []
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(example_input)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def _channels(module: nn.Module, handler_name: str) -> Optional[int]:
    """The channel count a pruning function of a parametrized module acts on (None: not one)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels if "out" in handler_name else module.in_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if "out" in handler_name else module.in_features
    return None


def _group_problem(group, n: int) -> Optional[str]:
    """Why a group cannot be pruned safely, or None."""
    for dep, indices in group:
        module = dep.target.module
        kind = type(module).__name__
        if "Slice" in kind and getattr(module, "dim", 1) != 1:
            continue  # a spatial slice (e.g. the stride of an IndexShortcut): channels pass unchanged
        if "Slice" in kind or "Split" in kind or "Concat" in kind or "Unbind" in kind or "Expand" in kind:
            return (f"coupled through a {kind.strip('_')} (e.g. an option-A zero-pad shortcut) that "
                    "torch-pruning cannot map between layers of different widths")
        channels = _channels(module, dep.handler.__name__)
        if channels is not None and len(indices) != channels:
            return (f"{dep.target._name} has {channels} channels but the group couples {len(indices)}; "
                    "channel correspondence is unknown")
        if isinstance(module, nn.Conv2d) and "out" in dep.handler.__name__ and channels != n:
            return f"{dep.target._name} has {channels} output channels, the group root {n}"
    return None


@dataclass
class ConvGroup:
    """The output channels of one or more convs that are removed together (a Torch-Pruning
    group rooted at ``root``'s output channels, traced by :func:`trace_conv_groups`)."""

    root: str                   #: the conv the group was traced from (first in module order)
    members: List[str]          #: convs whose output channels are these channels (residual adds)
    channels: int               #: number of channels
    group: Any                  #: the ``tp`` group over all channels (for costs and pruning)
    problem: Optional[str]      #: why it cannot be pruned safely (None: it can)
    #: IndexShortcuts writing into these channels: (shortcut, src, dst) as traced
    feeds: List[Tuple[nn.Module, List[int], List[int]]] = field(default_factory=list)
    reads: List[nn.Module] = field(default_factory=list)  #: IndexShortcuts reading these channels


def trace_conv_groups(model: nn.Module, example_input: Tensor) -> Tuple[Any, List[ConvGroup]]:
    """``(graph, groups)``: Torch-Pruning's dependency graph of ``model`` and the channel
    group of every conv, in module order, each conv in exactly one group.

    ``model`` is changed in place by :func:`splitlbi.prune.importance.prepare_torch_pruning`
    (option-A pad shortcuts become equal :class:`IndexShortcut` s, which Torch-Pruning
    then prunes as layers with separate input and output channels): pass a copy.
    """
    import torch_pruning as tp

    from splitlbi.prune.importance import prepare_torch_pruning

    pruners = prepare_torch_pruning(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, customized_pruners=pruners,
                                                  verbose=False)
    convs = _named_convs(model)
    names = {module: name for name, module in convs.items()}
    done = set()
    groups = []
    for name, conv in convs.items():
        if conv in done:
            continue
        n = conv.out_channels
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        members = list(dict.fromkeys(names[dep.target.module] for dep, _ in group
                                     if dep.target.module in names and dep.handler.__name__ == "prune_out_channels"))
        done.update(convs[member] for member in members)
        found = ConvGroup(root=name, members=members, channels=n, group=group, problem=_group_problem(group, n))
        for dep, _ in group:
            shortcut = dep.target.module
            if isinstance(shortcut, IndexShortcut):
                if dep.handler.__name__ == "prune_out_channels":
                    found.feeds.append((shortcut, shortcut.src.tolist(), shortcut.dst.tolist()))
                else:
                    found.reads.append(shortcut)
        groups.append(found)
    return graph, groups


@dataclass
class MaskedNetwork:
    """What :func:`mask_network` did: the network in its own architecture, as the compact
    network computes it (``model``), and how to remove the channels for real."""

    model: nn.Module
    graph: Any                                   #: Torch-Pruning's dependency graph of ``model``
    plans: List[Tuple[nn.Conv2d, GroupReport, List[int]]]  #: (group root, report, channels to remove)
    unselected: Dict[str, set]                   #: conv name -> its unselected filters
    folded: int = 0                              #: constants of removed channels folded into consumers
    unfolded: List[str] = field(default_factory=list)  #: consumers that could take no folded constant


def _removal_plans(groups: List["ConvGroup"], convs: Dict[str, nn.Conv2d], unselected: Dict[str, set]):
    """(root conv, GroupReport, channels to remove) per traced group (see the module docstring)."""
    plans = []
    removed_inputs: Dict[nn.Module, set] = {}  # IndexShortcut -> its input channels that are removed
    for found in groups:
        n, members = found.channels, found.members
        report = GroupReport(convs=members, channels=n, removed=0, unselected=0)
        if found.problem is None:
            # Identity coupling: channel i of every member conv is the same channel. It goes when
            # it is unselected in every member and, where an option-A shortcut places a channel of
            # an earlier stage into it, that one goes too (else the shortcut still carries it).
            removable = set(range(n))
            for member in members:
                removable &= unselected.get(member, set())
            for shortcut, src, dst in found.feeds:
                gone = removed_inputs.get(shortcut, set())
                removable -= {d for s, d in zip(src, dst) if s not in gone}
            for shortcut in found.reads:
                removed_inputs[shortcut] = set(removable)
            report.unselected = len(removable)
            indices = sorted(removable)
            if len(indices) == n:  # keep one (constant) channel: a layer cannot be empty
                indices = indices[1:]
                report.emptied = True
            report.removed = len(indices)
            plans.append((convs[found.root], report, indices))
        else:
            report.unselected = len(set.intersection(*[unselected.get(m, set()) for m in members]))
            report.skipped = found.problem
            report.kept_unselected = sum(len(unselected.get(m, ())) for m in members)
            plans.append((convs[found.root], report, []))
    return plans


def _consumer_inputs(model: nn.Module, example_input: Tensor) -> Dict[nn.Module, Tensor]:
    """The input of every Conv2d and Linear in one eval-mode forward pass of ``example_input``."""
    seen: Dict[nn.Module, Tensor] = {}

    def hook(module, inputs, output):
        seen.setdefault(module, inputs[0].detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def _fold_removed_inputs(network: "MaskedNetwork", bns: Dict[str, nn.Module], example_input: Tensor,
                         fold: bool) -> None:
    """Make every removed channel contribute nothing, folding the constant it emitted into what
    consumed it (``fold``): the consumer's bias, else the running mean of its BatchNorm.

    A removed channel's filters are zero, so in eval mode it emits a constant (its BatchNorm
    shift, or its conv bias, through the activation). Removing it for real would drop that
    constant; with ``fold`` each consumer adds, per output channel, the constant times the sum
    of its weights on that input (exact for a linear layer; for a padded conv exact away from
    the border, where the padded window saw fewer copies of the constant).
    """
    import torch_pruning as tp

    model, graph = network.model, network.graph
    names = {module: name for name, module in model.named_modules()}
    inputs = _consumer_inputs(model, example_input) if fold else {}
    zero_out = []  # (module, channels): removed channels whose own output is set to zero
    for conv, _, indices in network.plans:
        if not indices:
            continue
        for dep, idxs in graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=indices):
            module, handler = dep.target.module, dep.handler.__name__
            if handler == "prune_out_channels" and isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                zero_out.append((module, list(idxs)))
                continue
            if handler != "prune_in_channels" or not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue  # a depthwise conv's input channel is its output channel: removed whole
            index = torch.tensor(list(idxs), dtype=torch.long, device=module.weight.device)
            weight = module.weight.index_select(1, index)  # [out, removed, (kh, kw)]
            if fold:
                seen = inputs.get(module)
                if seen is not None:
                    values = seen.index_select(1, index.to(seen.device))
                    values = values.flatten(2).mean(dim=2) if values.dim() > 2 else values
                    delta = (weight.flatten(2).sum(dim=2) if weight.dim() > 2 else weight) @ values.mean(dim=0)
                    bn = bns.get(names[module])
                    if module.bias is not None:
                        module.bias.add_(delta.to(module.bias.dtype))
                        network.folded += len(idxs)
                    elif bn is not None and bn.running_mean is not None:
                        bn.running_mean.sub_(delta.to(bn.running_mean.dtype))
                        network.folded += len(idxs)
                    elif bool(delta.abs().max() > 0):
                        network.unfolded.append(names[module])
            module.weight.index_fill_(1, index, 0.0)
    for module, idxs in zero_out:  # the removed channels emit exact zeros (also into shortcuts)
        index = torch.tensor(idxs, dtype=torch.long, device=module.weight.device)
        module.weight.index_fill_(0, index, 0.0)
        if module.bias is not None:
            module.bias.index_fill_(0, index, 0.0)


def mask_network(
    model: nn.Module, masks: Mapping[str, Tensor], example_input: Tensor, fold: bool = True,
) -> MaskedNetwork:
    """A copy of ``model`` that computes what :func:`compact_model` will build from ``masks``,
    in ``model``'s own architecture (same ``state_dict`` keys, eval mode).

    Masks may be keyed by conv weights or by BatchNorm weights (see
    :func:`splitlbi.prune.channels.filter_masks`). In the copy every unselected conv filter is
    zero and so is the scale of its BatchNorm channel, which therefore emits its shift as a
    constant (the channel's mean over training: BatchNorm's output has mean β). Channels that
    compaction removes (a channel coupled by a residual add goes only when no member selects
    it) are made exactly zero and, with ``fold``, their constant is folded into the layers
    that read them (:func:`_fold_removed_inputs`); channels that stay keep their constant.
    ``model`` is not changed.
    """
    from splitlbi.prune.channels import filter_masks

    masks = filter_masks(model, masks, example_input)
    check_masks(model, masks)
    example_input = example_input.detach()
    work = copy.deepcopy(model).eval()
    example_input = example_input.to(next(work.parameters()).device)
    convs = _named_convs(work)
    bns = _bn_after(work, example_input)
    unselected = {name: set(indices) for name, indices in unselected_filters(work, masks).items()}
    with torch.no_grad():
        for name, indices in unselected.items():
            if indices:
                index = torch.tensor(sorted(indices), dtype=torch.long, device=convs[name].weight.device)
                convs[name].weight.index_fill_(0, index, 0.0)
                bn = bns.get(name)
                if bn is not None and bn.affine:
                    bn.weight.index_fill_(0, index, 0.0)
    with torch.enable_grad():  # Torch-Pruning traces through autograd
        graph, groups = trace_conv_groups(work, example_input)
    network = MaskedNetwork(model=work, graph=graph, plans=_removal_plans(groups, convs, unselected),
                            unselected=unselected)
    _fold_removed_inputs(network, {name: bn for name, bn in bns.items()}, example_input, fold)
    return network


def compact_model(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    example_input: Tensor,
    latency_repeats: int = 20,
    measure: bool = True,
    latency_input: Optional[Tensor] = None,
    fold: bool = True,
    latency_rounds: int = 5,
) -> Tuple[nn.Module, CompactReport]:
    """Remove, for real, the conv filters outside the support; return ``(compact, report)``.

    ``model`` is left untouched: :func:`mask_network` builds the masked copy (``fold``: the
    constants of removed channels folded into their consumers) and Torch-Pruning removes
    its unselected channels; the compact model equals that copy (same outputs in eval
    mode). ``example_input``: a batch (normally of one image) used to trace the dependency
    graph and count MACs; with ``measure``, the masked and the compact network are timed
    alternately on ``latency_input`` (default ``example_input``) by :func:`compare_latency`:
    ``latency_rounds`` rounds of the median of ``latency_repeats`` forward passes each.
    Raises :class:`SplitLBIError` when the masks do not match the model.
    """
    import torch_pruning as tp

    model_cpu = copy.deepcopy(model).cpu()
    example_input = example_input.detach().cpu()
    network = mask_network(model_cpu, masks, example_input, fold=fold)
    work = network.model
    macs_before, params_before = count_macs_params(work, example_input)
    timed = example_input if latency_input is None else latency_input.detach().cpu()
    masked = copy.deepcopy(work) if measure else None  # timed against the compact network below
    convs = _named_convs(work)
    selected_counts = {name: conv.out_channels - len(network.unselected.get(name, ()))
                       for name, conv in convs.items()}
    for conv, report, indices in network.plans:
        if indices:
            network.graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=indices).prune()

    macs_after, params_after = count_macs_params(work, example_input)
    latency_before = latency_after = latency_ratio = spread = None
    if masked is not None:
        latency_before, latency_after, latency_ratio, spread = compare_latency(masked, work, timed, latency_repeats,
                                                                               latency_rounds)
    result = CompactReport(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        latency_before_ms=latency_before, latency_after_ms=latency_after,
        groups=[report for _, report, _ in network.plans],
        kept_channels={name: conv.out_channels for name, conv in convs.items()},
        selected_channels=selected_counts, latency_ratio=latency_ratio, latency_ratio_range=spread,
        latency_rounds=latency_rounds if measure else 0,
    )
    return work, result


# --------------------------------------------------------------------------- option-A ResNets


class IndexShortcut(nn.Module):
    """The option-A shortcut as a channel placement: ``x[:, :, ::stride, ::stride]`` with
    input channel ``src[i]`` placed at output channel ``dst[i]`` of ``planes`` channels,
    the others zero. :meth:`from_pad` builds the one equal to a
    :class:`~splitlbi.models.resnet_cifar.PadShortcut`; after pruning it places the kept
    source channels into the kept output channels (see
    :class:`splitlbi.prune.importance.IndexShortcutPruner`). ``src``/``dst`` are buffers
    that are not in the ``state_dict`` (it has the keys of the model it replaces in)."""

    def __init__(self, src: Sequence[int], dst: Sequence[int], planes: int, stride: int,
                 in_planes: Optional[int] = None) -> None:
        super().__init__()
        self.stride = int(stride)
        self.register_buffer("src", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("dst", torch.zeros(0, dtype=torch.long), persistent=False)
        self.set_placement(src, dst, planes=planes, in_planes=max(src, default=-1) + 1 if in_planes is None else in_planes)

    @classmethod
    def from_pad(cls, pad: nn.Module, planes: int) -> "IndexShortcut":
        """The IndexShortcut computing what ``pad`` (a PadShortcut into ``planes`` channels) does."""
        before, after = int(getattr(pad, "pad_before", 0)), int(getattr(pad, "pad_after", 0))
        in_planes = planes - before - after
        return cls(range(in_planes), range(before, before + in_planes), planes, getattr(pad, "stride", 1), in_planes)

    def set_placement(self, src: Sequence[int], dst: Sequence[int], planes: Optional[int] = None,
                      in_planes: Optional[int] = None) -> None:
        """Replace the placement (and the channel counts given)."""
        device = self.src.device
        self.src = torch.tensor([int(i) for i in src], dtype=torch.long, device=device)
        self.dst = torch.tensor([int(i) for i in dst], dtype=torch.long, device=device)
        if planes is not None:
            self.planes = int(planes)
        if in_planes is not None:
            self.in_planes = int(in_planes)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.planes, x.shape[2], x.shape[3])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return (f"in_planes={getattr(self, 'in_planes', '?')}, planes={self.planes}, stride={self.stride}, "
                f"channels={len(self.src)}")


