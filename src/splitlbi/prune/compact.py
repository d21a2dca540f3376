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
case for torch-pruning: it sees ``F.pad`` as element-wise and couples the 16 stem
channels with the 32/64 of later stages. Their residual streams (one per stage: the
stem conv and every ``conv2`` of stage 1; the ``conv2`` s of stage 2; of stage 3) are
therefore pruned here directly, not by torch-pruning: a stream channel is removed when
it is unselected in every conv writing to the stream and, where the stage's first
block pads the previous stream into it, that source channel is removed (zero) too. The
pad shortcuts become :class:`IndexShortcut` s that place the kept source channels.
At least one channel of each group is kept (a zeroed one if none is selected).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError

__all__ = ["CompactReport", "GroupReport", "IndexShortcut", "apply_filter_masks", "check_masks", "compact_model",
           "measure_latency", "unselected_filters"]


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
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    latency_before_ms: Optional[float] = None
    latency_after_ms: Optional[float] = None
    groups: List[GroupReport] = field(default_factory=list)
    kept_channels: Dict[str, int] = field(default_factory=dict)   #: conv name -> output channels after
    selected_channels: Dict[str, int] = field(default_factory=dict)  #: conv name -> selected filters

    @property
    def skipped_groups(self) -> List[GroupReport]:
        return [group for group in self.groups if group.skipped]

    def lines(self) -> List[str]:
        """The report as text lines (params, MACs, latency before -> after, skipped groups)."""
        def ratio(after: float, before: float) -> str:
            return f"{100.0 * after / before:.1f}%" if before else "n/a"

        out = [f"params   {self.params_before:,} -> {self.params_after:,} "
               f"({ratio(self.params_after, self.params_before)})",
               f"MACs     {self.macs_before:,} -> {self.macs_after:,} ({ratio(self.macs_after, self.macs_before)})"]
        if self.latency_before_ms is not None and self.latency_after_ms is not None:
            out.append(f"latency  {self.latency_before_ms:.2f} ms -> {self.latency_after_ms:.2f} ms "
                       f"(CPU, 1 thread, median; {ratio(self.latency_after_ms, self.latency_before_ms)})")
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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
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


def compact_model(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    example_input: Tensor,
    latency_repeats: int = 20,
    measure: bool = True,
    latency_input: Optional[Tensor] = None,
) -> Tuple[nn.Module, CompactReport]:
    """Remove, for real, the conv filters outside the support; return ``(compact, report)``.

    ``model`` is left untouched (a deep copy is masked, see :func:`apply_filter_masks`,
    and pruned). The compact model equals the masked model (same outputs in eval mode).
    ``example_input``: a batch (normally of one image) used to trace the dependency
    graph and count MACs; with ``measure``, ``latency_repeats`` forward passes of
    ``latency_input`` (default ``example_input``) are timed before and after.
    Raises :class:`SplitLBIError` when the masks do not match the model.
    """
    import torch_pruning as tp

    check_masks(model, masks)
    example_input = example_input.detach()
    work = copy.deepcopy(model).cpu().eval()
    apply_filter_masks(work, masks, example_input)
    macs_before, params_before = count_macs_params(work, example_input)
    timed = example_input if latency_input is None else latency_input.detach()
    latency_before = measure_latency(work, timed, latency_repeats) if measure else None

    convs = _named_convs(work)
    unselected = {name: set(indices) for name, indices in unselected_filters(work, masks).items()}
    selected_counts = {name: conv.out_channels - len(unselected.get(name, ())) for name, conv in convs.items()}
    names = {module: name for name, module in convs.items()}

    graph = tp.DependencyGraph().build_dependency(work, example_inputs=example_input)
    plans = []  # (root conv, indices to remove, GroupReport)
    done = set()
    streams = _option_a_streams(work)
    for stream in streams:  # pruned below, without torch-pruning (see _prune_option_a_streams)
        done.update(convs[name] for name in stream["members"])
    for name, conv in convs.items():
        if conv in done:
            continue
        n = conv.out_channels
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        members = [names[dep.target.module] for dep, _ in group
                   if dep.target.module in names and dep.handler.__name__ == "prune_out_channels"]
        members = list(dict.fromkeys(members))
        for member in members:
            done.add(convs[member])
        report = GroupReport(convs=members, channels=n, removed=0, unselected=0)
        plans.append((conv, report))
        problem = _group_problem(group, n)
        if problem is None:
            # Identity coupling: channel i of every member conv is the same channel.
            removable = set(range(n))
            for member in members:
                removable &= unselected.get(member, set())
            report.unselected = len(removable)
            report.skipped = None
            report_removable = sorted(removable)
            if len(report_removable) == n:  # keep one (zeroed) channel: a layer cannot be empty
                report_removable = report_removable[1:]
                report.emptied = True
            report.removed = len(report_removable)
            plans[-1] = (conv, report, report_removable)
        else:
            report.unselected = len(set.intersection(*[unselected.get(m, set()) for m in members]))
            report.skipped = problem
            report.kept_unselected = sum(len(unselected.get(m, ())) for m in members)
            plans[-1] = (conv, report, [])

    for conv, report, indices in plans:
        if indices:
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=indices)
            group.prune()

    if streams:
        stream_reports = _prune_option_a_streams(work, streams, unselected)
        plans.extend((None, report, []) for report in stream_reports)

    macs_after, params_after = count_macs_params(work, example_input)
    latency_after = measure_latency(work, timed, latency_repeats) if measure else None
    result = CompactReport(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        latency_before_ms=latency_before, latency_after_ms=latency_after,
        groups=[report for _, report, _ in plans],
        kept_channels={name: conv.out_channels for name, conv in convs.items()},
        selected_channels=selected_counts,
    )
    return work, result


# --------------------------------------------------------------------------- option-A ResNets


class IndexShortcut(nn.Module):
    """The option-A shortcut of a compacted CIFAR ResNet: ``x[:, :, ::stride, ::stride]``
    with input channel ``src[i]`` placed at output channel ``dst[i]`` of ``planes``
    channels, the others zero (a :class:`~splitlbi.models.resnet_cifar.PadShortcut` whose
    input and output channels were pruned)."""

    def __init__(self, src: Sequence[int], dst: Sequence[int], planes: int, stride: int) -> None:
        super().__init__()
        self.planes, self.stride = int(planes), int(stride)
        self.register_buffer("src", torch.tensor(list(src), dtype=torch.long))
        self.register_buffer("dst", torch.tensor(list(dst), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.planes, x.shape[2], x.shape[3])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"planes={self.planes}, stride={self.stride}, channels={len(self.src)}"


def _option_a_streams(model: nn.Module) -> List[Dict]:
    """The residual streams (one per stage) of a CIFAR ResNet with option-A shortcuts, else []."""
    from splitlbi.models.resnet_cifar import CifarResNet, PadShortcut

    if not isinstance(model, CifarResNet) or getattr(model, "shortcut_type", "A") != "A":
        return []
    streams = []
    for k in (1, 2, 3):
        stage = getattr(model, f"layer{k}")
        members = (["conv1"] if k == 1 else []) + [f"layer{k}.{i}.conv2" for i in range(len(stage))]
        bns = (["bn1"] if k == 1 else []) + [f"layer{k}.{i}.bn2" for i in range(len(stage))]
        consumers = [f"layer{k}.{i}.conv1" for i in range(1 if k > 1 else 0, len(stage))]
        if k < 3:
            consumers.append(f"layer{k + 1}.0.conv1")
        shortcut = stage[0].shortcut  # the shortcut INTO this stream (stage 1: identity)
        if k > 1 and not isinstance(shortcut, (PadShortcut, nn.Identity)):
            return []
        streams.append({"members": members, "bns": bns, "consumers": consumers, "block": stage[0],
                        "width": stage[0].conv2.out_channels})
    return streams


def _slice_out(conv: nn.Conv2d, keep: Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.data.index_select(0, keep).clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data.index_select(0, keep).clone())
    conv.out_channels = len(keep)


def _slice_in(conv: nn.Conv2d, keep: Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.data.index_select(1, keep).clone())
    conv.in_channels = len(keep)


def _slice_bn(bn: nn.BatchNorm2d, keep: Tensor) -> None:
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(bn, name, nn.Parameter(getattr(bn, name).data.index_select(0, keep).clone()))
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(bn, name, getattr(bn, name).index_select(0, keep).clone())
    bn.num_features = len(keep)


def _prune_option_a_streams(model: nn.Module, streams: List[Dict], unselected: Dict[str, set]) -> List[GroupReport]:
    """Remove the channels of each residual stream of an option-A CIFAR ResNet that are
    zero in the masked model: unselected in every conv writing to the stream and, for a
    channel fed by the zero-pad shortcut of the stage's first block, zero in the previous
    stream too. The pad shortcuts become :class:`IndexShortcut` s."""
    modules = dict(model.named_modules())
    reports = []
    previous_zero: Optional[set] = None
    previous_keep: Optional[List[int]] = None
    for k, stream in enumerate(streams, start=1):
        width, members = stream["width"], stream["members"]
        zero = set(range(width))
        for member in members:
            zero &= unselected.get(member, set())
        shortcut = stream["block"].shortcut
        if k > 1:
            before = getattr(shortcut, "pad_before", 0)
            source_width = streams[k - 2]["width"]
            zero = {j for j in zero if not (before <= j < before + source_width) or (j - before) in previous_zero}
        removed = sorted(zero)
        emptied = len(removed) == width
        if emptied:
            removed = removed[1:]
        keep_list = [j for j in range(width) if j not in set(removed)]
        keep = torch.tensor(keep_list, dtype=torch.long)
        if removed:
            for name in members:
                _slice_out(modules[name], keep)
            for name in stream["bns"]:
                _slice_bn(modules[name], keep)
            for name in stream["consumers"]:
                _slice_in(modules[name], keep)
            if k == 3:
                fc = model.fc
                fc.weight = nn.Parameter(fc.weight.data.index_select(1, keep).clone())
                fc.in_features = len(keep)
        if k > 1:
            stride = getattr(shortcut, "stride", 1)
            before = getattr(shortcut, "pad_before", 0)
            source_position = {c: i for i, c in enumerate(previous_keep)}
            src, dst = [], []
            for position, j in enumerate(keep_list):
                c = j - before
                if c in source_position:
                    src.append(source_position[c])
                    dst.append(position)
            stream["block"].shortcut = IndexShortcut(src, dst, len(keep_list), stride)
        reports.append(GroupReport(convs=list(members), channels=width, removed=len(removed),
                                   unselected=len(zero), emptied=emptied))
        previous_zero, previous_keep = zero, keep_list
    return reports
