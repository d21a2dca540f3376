"""Sub-networks of a requested size: path scores and budget-targeted filter masks.

**Path score.** SplitLBI's dual variable ``V`` says how close each filter is to entering
the support of Γ: ``Γ_g ≠ 0`` exactly when the norm of ``V_g`` passes ``λ``. The path score
of a filter (output channel of a conv, output neuron of a linear layer) is
``‖V_g‖₂ / λ`` (``max_j |V_gj| / λ`` under the elementwise ``l1`` penalty): above 1 exactly on
the support, and below 1 it ranks the other filters in the order the inverse scale space
would select them. :func:`path_scores` reads it from a live optimizer or from a run
directory at any recorded epoch.

**Budget masks.** :func:`budget_masks` chooses whole conv filters to remove so that the
network compacted for real by :func:`splitlbi.prune.compact_model` keeps a fraction
``macs`` (or ``params``) of the dense network, measured with Torch-Pruning's counter: at
most the target and within :data:`TOLERANCE` (2 points) of it. How:

1. :func:`channel_groups` lists the channels that can only be removed together:
   Torch-Pruning's groups (channels summed by residual adds), and, in the option-A CIFAR
   ResNets, a stream channel with the channel of the next stage that the zero-pad
   shortcut copies it into (removing the later one alone would not save its filters,
   see :mod:`splitlbi.prune.compact`).
2. Each filter's score is normalized within its conv (``normalize``, default
   :data:`DEFAULT_NORMALIZE`; :func:`splitlbi.prune.importance.normalize_scores`) and the
   scores of a group's filters are combined (``aggregate``: ``"max"`` by default, so
   a group stays as long as one of its filters would, as with the support of Γ;
   ``"mean"``, ``"sum"``).
3. The groups are put in removal order: ``ranking="global"`` by score (one threshold
   across layers); ``"uniform"`` by rank within the layer (each layer loses the same
   fraction). Every conv keeps at least ``min_channels`` filters.
4. The longest prefix of that order meeting the target is found by bisection with a
   cost model of the compacted network (MACs and parameters as functions of the
   channels kept; exact for Conv2d, Linear and BatchNorm, parameter-free modules such
   as ReLU and pooling modules counted at their dense cost); where the next group in order would overshoot the 2-point window
   (coarse layers such as LeNet-5's ``conv1``: one filter is 14% of its MACs), it is
   skipped and the following groups fill the budget. The result is compacted for real
   and measured; if the measurement misses the window the model's error is corrected
   and the search repeated.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError

__all__ = ["AGGREGATIONS", "BudgetResult", "ChannelGroup", "DEFAULT_NORMALIZE", "NORMALIZATIONS", "RANKINGS",
           "TOLERANCE", "aggregate_scores", "budget_masks", "channel_groups", "normalize_scores", "path_scores"]

PathLike = Union[str, "os.PathLike[str]"]

#: The measured fraction is at most the target and at least target - TOLERANCE.
TOLERANCE = 0.02
RANKINGS = ("global", "uniform")
#: Per-layer normalization used unless one is given (see the benchmark, docs/subnetworks.md).
DEFAULT_NORMALIZE = "mean"

#: Per-layer normalizations of scores before they are compared across layers.
NORMALIZATIONS = ("none", "mean", "max", "sqrt_size")
#: How the scores of the filters of one channel group (coupled by residual adds) combine.
AGGREGATIONS = ("max", "mean", "sum")


def normalize_scores(scores: Tensor, how: str, filter_size: int = 1) -> Tensor:
    """One layer's scores, normalized so that layers can share one threshold.

    ``"none"``: as they are; ``"mean"``: divided by the layer's mean (a layer of average
    filters scores 1 whatever its width and depth); ``"max"``: by the layer's largest;
    ``"sqrt_size"``: by ``sqrt(filter_size)``, the number of weights in one filter (an
    ℓ2 norm of ``n`` entries of equal size grows like ``sqrt(n)``). A layer of zeros stays
    zero under ``"mean"`` and ``"max"``.
    """
    scores = scores.detach().to(torch.float64)
    if how == "none":
        return scores
    if how == "mean":
        mean = scores.mean()
        return scores / mean if mean > 0 else scores
    if how == "max":
        top = scores.max()
        return scores / top if top > 0 else scores
    if how == "sqrt_size":
        return scores / float(filter_size) ** 0.5
    raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {how!r}")


def aggregate_scores(stacked: Sequence[Tensor], how: str) -> Tensor:
    """Combine the scores of the member layers of a channel group, channel by channel."""
    values = torch.stack([s.to(torch.float64) for s in stacked])
    if how == "max":
        return values.max(dim=0).values
    if how == "mean":
        return values.mean(dim=0)
    if how == "sum":
        return values.sum(dim=0)
    raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {how!r}")


# --------------------------------------------------------------------------- path scores


def path_scores(source: Any, epoch: Optional[int] = None) -> Dict[str, Tensor]:
    """``{parameter name: path score of each output filter/neuron}`` (float32, CPU).

    Args:
        source: a live :class:`~splitlbi.optim.SplitLBI` optimizer (its current ``V``;
            ``epoch`` must be None), or a run directory written by ``splitlbi train``
            (``epoch`` required: 0 = initialization).

    From a run directory the scores are ``v_norm / λ`` of ``path.csv`` (λ: the run's
    ``lam``); runs written before ``path.csv`` had ``v_norm`` fall back to ``V`` in the
    optimizer state of ``checkpoints/epoch_K.pt``. Raises :class:`SplitLBIError` (one
    line) when neither exists or the run is not a SplitLBI run.
    """
    from splitlbi.optim import SplitLBI

    if isinstance(source, SplitLBI):
        if epoch is not None:
            raise SplitLBIError("path_scores: epoch is only for a run directory; a live optimizer has its "
                                "current scores")
        return {name: scores.detach().to("cpu", torch.float32) for name, scores in source.path_scores().items()}
    if isinstance(source, torch.optim.Optimizer):
        raise SplitLBIError(f"path_scores needs a SplitLBI optimizer or a run directory, got "
                            f"{type(source).__name__}")
    if epoch is None:
        raise SplitLBIError(f"path_scores({source}): give the epoch whose scores to read")
    return _run_path_scores(Path(source), int(epoch))


def _run_path_scores(run_dir: Path, epoch: int) -> Dict[str, Tensor]:
    from splitlbi.train.run import PATH_FILE, read_run_config
    from splitlbi.train.runfiles import iter_path, path_columns

    info = read_run_config(run_dir)
    if info.get("optimizer", "splitlbi") != "splitlbi" or "baseline" in info or "retrain" in info:
        raise SplitLBIError(f"{run_dir} has no path scores: it was not trained by SplitLBI "
                            f"(optimizer {info.get('optimizer')})")
    lam = float(info.get("lam", 1.0))
    norms: Dict[str, List[Tuple[int, float, bool]]] = {}
    has_column = (run_dir / PATH_FILE).is_file() and "v_norm" in path_columns(run_dir)
    if has_column:
        for row in iter_path(run_dir, epoch=epoch):
            if row.v_norm is not None:
                norms.setdefault(row.layer, []).append((row.filter, row.v_norm, bool(row.in_support)))
    if norms:
        scores = {}
        for layer, rows in norms.items():
            rows.sort()
            values = torch.tensor([v for _, v, _ in rows], dtype=torch.float64)
            support = torch.tensor([s for _, _, s in rows])
            scores[f"{layer}.weight"] = _consistent(values / lam if lam > 0 else _inf_where_nonzero(values), support)
        return scores
    return _checkpoint_path_scores(run_dir, epoch, "path.csv has no v_norm column (a run written before it "
                                   "existed)" if not has_column else f"path.csv has no rows of epoch {epoch}")


def _inf_where_nonzero(values: Tensor) -> Tensor:
    return torch.where(values > 0, torch.full_like(values, float("inf")), torch.zeros_like(values))


def _consistent(scores: Tensor, support: Tensor) -> Tensor:
    """float32 scores whose ``> 1`` agrees with the recorded support (rounding of the CSV aside)."""
    scores = scores.to(torch.float32)
    one = torch.ones_like(scores)
    scores = torch.where(support & (scores <= 1), torch.nextafter(one, one + 1), scores)
    return torch.where(~support & (scores > 1), one, scores)


def _checkpoint_path_scores(run_dir: Path, epoch: int, why: str) -> Dict[str, Tensor]:
    from splitlbi.train.optimizers import build_optimizer
    from splitlbi.train.rundir import create_run_model
    from splitlbi.train.run import CHECKPOINT_DIR, LAST_CHECKPOINT, list_checkpoints, load_checkpoint, \
        read_run_config, read_train_config

    checkpoints = list_checkpoints(run_dir)
    if epoch in checkpoints:
        checkpoint = load_checkpoint(run_dir, epoch)
    else:
        last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        checkpoint = load_checkpoint(run_dir) if last.is_file() else None
        if checkpoint is not None and int(checkpoint.get("epoch", -1)) != epoch:
            checkpoint = None
    if checkpoint is None:
        have = ", ".join(map(str, checkpoints)) or "none"
        raise SplitLBIError(f"{run_dir} has no path scores for epoch {epoch}: {why} and no checkpoint of epoch "
                            f"{epoch} (epochs with checkpoints: {have})")
    info = read_run_config(run_dir)
    model = create_run_model(info)
    optimizer = build_optimizer(read_train_config(run_dir), model)
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise SplitLBIError(f"cannot read the optimizer state of epoch {epoch} in {run_dir}: "
                            f"{' '.join(str(error).split())}") from None
    return path_scores(optimizer)


# --------------------------------------------------------------------------- channel groups


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are removed together.

    ``filters``: ``(conv weight name, filter index)`` of every conv filter that goes
    when the group goes (several for channels coupled by residual adds or by an
    option-A shortcut). ``layer``: the coupling set it belongs to (its member convs; the
    unit of ``ranking="uniform"``). ``channels``: ``(index of the traced conv group,
    channel)`` pairs, the group's place in the cost model.
    """

    filters: Tuple[Tuple[str, int], ...]
    layer: str
    channels: Tuple[Tuple[int, int], ...]


@dataclass
class _Structure:
    """A model's channel groups and the cost model of its compacted versions."""

    units: list                 # ConvGroup per traced unit (prunable ones only are used)
    groups: List[ChannelGroup]
    filter_sizes: Dict[str, int]
    unit_channels: np.ndarray   # channels per unit
    dense_macs: int
    dense_params: int
    cost: "_CostModel"


class _CostModel:
    """MACs and parameters of the compacted network as functions of the channels removed
    per unit: exact for Conv2d / Linear / BatchNorm (the formulas of Torch-Pruning's
    counter), everything else (pooling modules, ReLU modules) constant at its dense cost."""

    def __init__(self, model: nn.Module, example_input: Tensor, units: list) -> None:
        import torch_pruning as tp

        was_training = model.training
        model.eval()
        try:
            macs, params, layer_macs, _ = tp.utils.count_ops_and_params(model, example_input[:1], layer_wise=True)
        finally:
            model.train(was_training)
        self.dense_macs, self.dense_params = int(macs), int(params)
        modules = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))]
        index = {m: i for i, (_, m) in enumerate(modules)}
        count = len(modules)
        self.total_in = np.zeros(count)
        self.total_out = np.zeros(count)
        self.mac_pair = np.zeros(count)   # MACs per (input channel x output channel)
        self.mac_out = np.zeros(count)    # MACs per output channel (bias, BN)
        self.par_pair = np.zeros(count)
        self.par_out = np.zeros(count)
        modeled_macs = modeled_params = 0.0
        for i, (name, m) in enumerate(modules):
            dense = float(layer_macs.get(m) or 0)
            bias = 1.0 if getattr(m, "bias", None) is not None else 0.0
            if isinstance(m, nn.Conv2d):
                cin, cout = m.in_channels, m.out_channels
                per_pair = m.kernel_size[0] * m.kernel_size[1] / m.groups
                positions = dense / (per_pair * cin * cout + bias * cout) if dense else 0.0
                self.mac_pair[i], self.mac_out[i] = positions * per_pair, positions * bias
                self.par_pair[i], self.par_out[i] = per_pair, bias
            elif isinstance(m, nn.Linear):
                cin, cout = m.in_features, m.out_features
                tokens = (dense - bias * cout) / (cin * cout) if dense else 0.0
                self.mac_pair[i], self.mac_out[i] = tokens, bias
                self.par_pair[i], self.par_out[i] = 1.0, bias
            else:  # BatchNorm: one "output" dimension
                cin, cout = 1, m.num_features
                self.mac_out[i] = dense / cout
                self.par_out[i] = 2.0 if m.affine else 0.0
            self.total_in[i], self.total_out[i] = cin, cout
            modeled_macs += self.mac_pair[i] * cin * cout + self.mac_out[i] * cout
            modeled_params += self.par_pair[i] * cin * cout + self.par_out[i] * cout
        self.other_macs = self.dense_macs - modeled_macs
        self.other_params = self.dense_params - modeled_params
        # Channels of each module dimension that one channel of each unit removes.
        self.in_per_unit = np.zeros((count, len(units)))
        self.out_per_unit = np.zeros((count, len(units)))
        for u, unit in enumerate(units):
            n = unit.channels
            for dep, idxs in unit.group:
                i = index.get(dep.target.module)
                if i is None:
                    continue
                handler = dep.handler.__name__
                is_bn = isinstance(modules[i][1], nn.modules.batchnorm._BatchNorm)
                target = self.out_per_unit if (handler == "prune_out_channels" or is_bn) else self.in_per_unit
                target[i, u] = max(target[i, u], len(idxs) / n)

    def costs(self, removed: np.ndarray) -> Tuple[float, float]:
        """(MACs, params) with ``removed[u]`` channels of each unit removed."""
        kin = self.total_in - self.in_per_unit @ removed
        kout = self.total_out - self.out_per_unit @ removed
        macs = self.other_macs + float(np.sum(self.mac_pair * kin * kout + self.mac_out * kout))
        params = self.other_params + float(np.sum(self.par_pair * kin * kout + self.par_out * kout))
        return macs, params


def _analyze(model: nn.Module, example_input: Tensor) -> _Structure:
    from splitlbi.prune.compact import trace_conv_groups

    work = copy.deepcopy(model).cpu().eval()
    # A deep-copied Parameter loses its .grad; gradient-based importances (Taylor) score the copy.
    for source, copied in zip(model.parameters(), work.parameters()):
        if source.grad is not None:
            copied.grad = source.grad.detach().cpu().clone()
    example_input = example_input.detach()[:1].cpu()
    _, traced = trace_conv_groups(work, example_input)
    units = [unit for unit in traced if unit.problem is None]
    # Chain the channels an option-A shortcut copies from one unit into another (union-find).
    slot_parent: Dict[Tuple[int, int], Tuple[int, int]] = {}

    def find(slot):
        while slot_parent.get(slot, slot) != slot:
            slot = slot_parent[slot]
        return slot

    reader_of = {id(shortcut): u for u, unit in enumerate(units) for shortcut in unit.reads}
    for u, unit in enumerate(units):
        for shortcut, src, dst in unit.feeds:
            source = reader_of.get(id(shortcut))
            if source is None:
                continue
            for s, d in zip(src, dst):
                a, b = find((source, s)), find((u, d))
                if a != b:
                    slot_parent[b] = a
    members: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for u, unit in enumerate(units):
        for c in range(unit.channels):
            members.setdefault(find((u, c)), []).append((u, c))
    groups = []
    for slots in members.values():
        slots.sort()
        filters = tuple((f"{conv}.weight", c) for u, c in slots for conv in units[u].members)
        layer = " | ".join(dict.fromkeys("+".join(units[u].members) for u, _ in slots))
        groups.append(ChannelGroup(filters=filters, layer=layer, channels=tuple(slots)))
    groups.sort(key=lambda g: g.channels)
    sizes = {f"{name}.weight": int(m.weight[0].numel()) for name, m in work.named_modules()
             if isinstance(m, nn.Conv2d)}
    cost = _CostModel(work, example_input, units)
    return _Structure(units=units, groups=groups, filter_sizes=sizes,
                      unit_channels=np.array([unit.channels for unit in units], dtype=float),
                      dense_macs=cost.dense_macs, dense_params=cost.dense_params, cost=cost)


def channel_groups(model: nn.Module, example_input: Tensor) -> List[ChannelGroup]:
    """The channel groups of ``model``'s convs (see :class:`ChannelGroup`), each conv
    filter in exactly one group; convs Torch-Pruning cannot prune safely are left out."""
    return _analyze(model, example_input).groups


# --------------------------------------------------------------------------- budget masks


@dataclass
class BudgetResult:
    """The masks of :func:`budget_masks` and what the compacted network measures;
    ``print(result)`` gives :meth:`lines`.

    Attributes:
        masks: conv weight name -> bool mask shaped like the weight (whole filters; True =
            kept): the mask-file format of :func:`splitlbi.prune.save_mask_file`,
            ``splitlbi compact --masks`` and :func:`splitlbi.prune.compact_model`.
        kind: ``"macs"`` or ``"params"``, the budgeted quantity.
        target: the fraction of the dense network asked for.
        macs_fraction, params_fraction: MACs / parameters of the compacted network over the
            dense network's, measured (Torch-Pruning's counter).
        dense_macs, dense_params, macs, params: the counts behind them.
        removed_channels, kept_channels: conv name -> output channels removed / kept.
        reached: the achieved fraction lies in ``[target - TOLERANCE, target]``.
        ranking, normalize, aggregate: how the filters were ranked (see :func:`budget_masks`).
        compact: the compacted network (eval mode), ready for
            :func:`splitlbi.prune.save_compact`; it takes what ``model`` takes.
        achieved: (property) the measured fraction of the budgeted quantity.
    """

    masks: Dict[str, Tensor]        #: conv weight name -> bool mask (whole filters), the mask-file format
    kind: str                       #: "macs" or "params"
    target: float                   #: the fraction asked for
    macs_fraction: float            #: MACs of the compacted network / dense, measured
    params_fraction: float          #: parameters of the compacted network / dense, measured
    dense_macs: int
    dense_params: int
    macs: int
    params: int
    removed_channels: Dict[str, int]  #: conv name -> output channels removed
    kept_channels: Dict[str, int]     #: conv name -> output channels kept
    reached: bool                     #: achieved in [target - TOLERANCE, target]
    ranking: str
    normalize: str
    aggregate: str
    compact: Optional[nn.Module] = field(default=None, repr=False)  #: the compacted network (eval mode)

    @property
    def achieved(self) -> float:
        """The measured fraction of the budgeted quantity."""
        return self.macs_fraction if self.kind == "macs" else self.params_fraction

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> List[str]:
        """A short printable report."""
        label = "MACs" if self.kind == "macs" else "params"
        gap = 100.0 * (self.achieved - self.target)
        out = [f"target   {label} {100.0 * self.target:.1f}% of the dense network (ranking {self.ranking}, "
               f"normalize {self.normalize}, aggregate {self.aggregate})",
               f"achieved {label} {100.0 * self.achieved:.2f}% ({gap:+.2f} points; allowed -{100 * TOLERANCE:.0f} to 0)"
               + ("" if self.reached else "  NOT REACHED"),
               f"MACs     {self.dense_macs:,} -> {self.macs:,} ({100.0 * self.macs_fraction:.2f}%)",
               f"params   {self.dense_params:,} -> {self.params:,} ({100.0 * self.params_fraction:.2f}%)"]
        total = sum(self.removed_channels.values()) + sum(self.kept_channels.values())
        out.append(f"filters  removed {sum(self.removed_channels.values())} of {total}")
        return out


def _as_ranking(model: nn.Module, scores: Any, normalize: Optional[str],
                aggregate: Optional[str]) -> Tuple[Any, str, str]:
    """(scores, normalize, aggregate) as the ranking uses them: a PathImportance becomes its
    scores as a dict keyed by ``model``'s parameter names, with its own normalization and
    aggregation (so that both forms give one ranking: normalized once, per conv)."""
    from splitlbi.prune.importance import PathImportance

    if isinstance(scores, PathImportance):
        for option, value, own in (("normalize", normalize, scores.normalize), ("aggregate", aggregate,
                                                                                  scores.aggregate)):
            if value is not None and value != own:
                raise SplitLBIError(f"budget_masks: {option}={value!r}, but the PathImportance was built with "
                                    f"{option}={own!r}: set it there (PathImportance(..., {option}={value!r}))")
        return scores.scores_for(model), scores.normalize, scores.aggregate
    return scores, DEFAULT_NORMALIZE if normalize is None else normalize, "max" if aggregate is None else aggregate


def _group_scores(structure: _Structure, scores: Any, normalize: str, aggregate: str) -> np.ndarray:
    """One number per channel group (higher = keep); ``inf`` where nothing scores it."""
    import torch_pruning as tp

    values: List[List[Tensor]] = [[] for _ in structure.groups]
    if isinstance(scores, tp.importance.Importance):
        per_unit = []
        for unit in structure.units:
            imp = scores(unit.group)
            if imp is None:
                per_unit.append(None)
                continue
            size = structure.filter_sizes.get(f"{unit.root}.weight", 1)
            per_unit.append(normalize_scores(torch.as_tensor(imp).flatten().cpu(), normalize, size))
        for g, group in enumerate(structure.groups):
            values[g] = [per_unit[u][c:c + 1] for u, c in group.channels if per_unit[u] is not None]
    elif isinstance(scores, Mapping):
        normalized = {}
        for name, value in scores.items():
            value = torch.as_tensor(value).detach().flatten().cpu()
            if name in structure.filter_sizes:
                normalized[name] = normalize_scores(value, normalize, structure.filter_sizes[name])
        for g, group in enumerate(structure.groups):
            for name, f in group.filters:
                table = normalized.get(name)
                if table is not None:
                    if f >= table.numel():
                        raise SplitLBIError(f"scores[{name!r}] has {table.numel()} values, but the conv has more "
                                            f"filters (scores of another model?)")
                    values[g].append(table[f:f + 1])
    else:
        raise SplitLBIError(f"scores must be a dict of parameter name -> tensor or a "
                            f"torch_pruning.importance.Importance, got {type(scores).__name__}")
    if not any(values):
        unnamed = isinstance(scores, Mapping) and any(str(name).startswith("param") for name in scores)
        raise SplitLBIError("the scores name none of the model's conv weights " + (
            "(keyed param0, param1, ...: an optimizer given model.parameters() without names; call "
            "opt.name_parameters(model) first, or build it from splitlbi.param_groups(model))" if unnamed
            else "(scores of another model?)"))
    out = np.full(len(structure.groups), np.inf)
    for g, parts in enumerate(values):
        if parts:
            out[g] = float(aggregate_scores([p.flatten() for p in parts], aggregate).reshape(-1)[0])
    return np.nan_to_num(out, nan=np.inf)


def _removal_order(structure: _Structure, group_scores: np.ndarray, ranking: str) -> List[int]:
    """Group indices in the order they are removed; unscored groups never are."""
    candidates = [g for g in range(len(structure.groups)) if np.isfinite(group_scores[g])]
    if ranking == "global":
        return sorted(candidates, key=lambda g: (group_scores[g], g))
    by_layer: Dict[str, List[int]] = {}
    for g in candidates:
        by_layer.setdefault(structure.groups[g].layer, []).append(g)
    key = {}
    for layer, members in by_layer.items():
        members.sort(key=lambda g: (group_scores[g], g))
        size = sum(1 for g in range(len(structure.groups)) if structure.groups[g].layer == layer)
        for rank, g in enumerate(members):
            key[g] = (rank + 1) / size
    return sorted(candidates, key=lambda g: (key[g], group_scores[g], g))


def _feasible_sequence(structure: _Structure, order: List[int], min_channels: int) -> List[np.ndarray]:
    """The groups of ``order`` that can go without a unit falling below ``min_channels``
    (in order, given the earlier ones), each as its removal vector over units."""
    removed = np.zeros(len(structure.units))
    sequence = []
    for g in order:
        step = np.zeros(len(structure.units))
        for u, _ in structure.groups[g].channels:
            step[u] += 1
        if np.any(structure.unit_channels - (removed + step) < min_channels):
            continue
        removed += step
        sequence.append((g, step))
    return sequence


def _select(structure: _Structure, sequence, kind: str, low: float, high: float) -> List[int]:
    """Groups to remove so that the modeled fraction lies in [low, high]: the longest
    prefix of ``sequence`` above ``high`` plus, where the next group overshoots below
    ``low``, the following groups that fit (greedy, in order)."""
    dense = structure.dense_macs if kind == "macs" else structure.dense_params
    which = 0 if kind == "macs" else 1
    steps = [step for _, step in sequence]
    cumulative = np.cumsum(np.array(steps), axis=0) if steps else np.zeros((0, len(structure.units)))
    zero = np.zeros(len(structure.units))

    def fraction(removed: np.ndarray) -> float:
        return structure.cost.costs(removed)[which] / dense

    def prefix(n: int) -> np.ndarray:
        return cumulative[n - 1] if n > 0 else zero

    if fraction(zero) <= high:
        return []
    lo_n, hi_n = 0, len(steps)  # fraction(prefix(lo_n)) > high; find the smallest n with <= high
    if fraction(prefix(hi_n)) > high:
        return [g for g, _ in sequence]  # unreachable: remove all that may go
    while hi_n - lo_n > 1:
        mid = (lo_n + hi_n) // 2
        if fraction(prefix(mid)) <= high:
            hi_n = mid
        else:
            lo_n = mid
    if fraction(prefix(hi_n)) >= low:
        return [g for g, _ in sequence[:hi_n]]
    chosen = [g for g, _ in sequence[:lo_n]]
    removed = prefix(lo_n).copy()
    for g, step in sequence[lo_n:]:
        trial = removed + step
        value = fraction(trial)
        if value >= low:
            removed = trial
            chosen.append(g)
            if value <= high:
                return chosen
    # No filling lands in the window: stay under the target, further below it than asked.
    return [g for g, _ in sequence[:hi_n]]


def _masks_for(model: nn.Module, structure: _Structure, chosen: Sequence[int]) -> Dict[str, Tensor]:
    masks = {f"{name}.weight": torch.ones_like(m.weight, dtype=torch.bool, device="cpu")
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for g in chosen:
        for name, f in structure.groups[g].filters:
            masks[name][f] = False
    return masks


def budget_masks(model: nn.Module, example_input: Tensor, scores: Any, *, macs: Optional[float] = None,
                 params: Optional[float] = None, ranking: str = "global", normalize: Optional[str] = None,
                 aggregate: Optional[str] = None, min_channels: int = 1, max_rounds: int = 4) -> BudgetResult:
    """Filter masks whose compacted network keeps a fraction ``macs`` (or ``params``) of ``model``.

    Args:
        model: the dense network (left untouched).
        example_input: an input batch (its first image is used) to trace the network and count MACs.
        scores: ``{conv weight name: tensor[out_channels]}`` (higher = more important;
            e.g. :func:`path_scores`, filter norms, BN scales; entries keyed by a BatchNorm
            weight count for the conv it normalizes, see :func:`splitlbi.prune.channels.filter_scores`),
            a :class:`~splitlbi.prune.importance.PathImportance` (ranked exactly as its
            scores given as a dict, with its own ``normalize`` and ``aggregate``), or another
            Torch-Pruning ``Importance`` (called on each channel group; its output is
            normalized per group by ``normalize``). Convs without scores keep all their filters.
        macs / params: the fraction of the dense network's MACs / parameters to keep,
            in (0, 1]; exactly one of them.
        ranking: ``"global"`` (one threshold on the normalized scores across layers) or
            ``"uniform"`` (every layer loses the same share of its channel groups).
        normalize: per-conv normalization of the scores (``"none"``, ``"mean"``,
            ``"max"``, ``"sqrt_size"``; see :func:`~splitlbi.prune.importance.normalize_scores`);
            default :data:`DEFAULT_NORMALIZE`, for a PathImportance its own.
        aggregate: how the filters of a coupled channel group combine (``"max"``,
            ``"mean"``, ``"sum"``); default ``"max"``, for a PathImportance its own.
        min_channels: filters every conv keeps at least.

    Returns a :class:`BudgetResult`; its fractions are measured on the network compacted
    by :func:`splitlbi.prune.compact_model`, and ``reached`` says whether the achieved
    fraction lies in ``[target - 0.02, target]`` (it does whenever the target is reachable
    with ``min_channels`` per conv).
    """
    if (macs is None) == (params is None):
        raise SplitLBIError("budget_masks: give exactly one of macs= and params=")
    kind, target = ("macs", macs) if macs is not None else ("params", params)
    if not isinstance(target, (int, float)) or not 0 < float(target) <= 1:
        raise SplitLBIError(f"budget_masks: {kind}={target!r} must be a fraction in (0, 1]")
    target = float(target)
    if ranking not in RANKINGS:
        raise SplitLBIError(f"budget_masks: ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    scores, normalize, aggregate = _as_ranking(model, scores, normalize, aggregate)
    if normalize not in NORMALIZATIONS:
        raise SplitLBIError(f"budget_masks: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if aggregate not in AGGREGATIONS:
        raise SplitLBIError(f"budget_masks: aggregate must be one of {', '.join(AGGREGATIONS)}, got {aggregate!r}")
    if int(min_channels) < 1:
        raise SplitLBIError(f"budget_masks: min_channels must be >= 1, got {min_channels}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forwards of one image: extra threads only contend (10x slower on a busy CPU)
    try:
        return _budget_masks(model, example_input.detach()[:1].cpu(), scores, kind, target, ranking, normalize,
                             aggregate, int(min_channels), max_rounds)
    finally:
        torch.set_num_threads(threads)


def _budget_masks(model: nn.Module, example_input: Tensor, scores: Any, kind: str, target: float, ranking: str,
                  normalize: str, aggregate: str, min_channels: int, max_rounds: int) -> BudgetResult:
    from splitlbi.prune.channels import filter_scores
    from splitlbi.prune.compact import compact_model

    if isinstance(scores, Mapping):  # scores of BatchNorm scales count for the filters of their convs
        scores = filter_scores(model, scores, example_input)
    structure = _analyze(model, example_input)
    order = _removal_order(structure, _group_scores(structure, scores, normalize, aggregate), ranking)
    sequence = _feasible_sequence(structure, order, int(min_channels))

    # Aim inside the window with a margin for what the cost model does not see; correct
    # by the measured error when the compacted network misses the window.
    low, high = target - TOLERANCE, target
    shift = 0.0
    best = None
    for _ in range(max(1, int(max_rounds))):
        if target >= 1.0:
            chosen = []  # the dense network is the budget
        else:
            chosen = _select(structure, sequence, kind, low + 0.25 * TOLERANCE - shift,
                             high - 0.1 * TOLERANCE - shift)
        masks = _masks_for(model, structure, chosen)
        compact, report = compact_model(model, masks, example_input, measure=False)
        measured = {"macs": report.macs_after / report.macs_before,
                    "params": report.params_after / report.params_before}
        candidate = (masks, compact, report, measured)
        achieved = measured[kind]
        ok = low - 1e-12 <= achieved <= high + 1e-12
        if best is None or ok or abs(achieved - (high - TOLERANCE / 2)) < abs(best[3][kind] - (high - TOLERANCE / 2)):
            best = candidate
        if ok:
            break
        modeled = structure.cost.costs(_removed_vector(structure, chosen))[0 if kind == "macs" else 1]
        dense = structure.dense_macs if kind == "macs" else structure.dense_params
        shift += achieved - modeled / dense
    masks, compact, report, measured = best
    achieved = measured[kind]
    convs = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    kept = dict(report.kept_channels)
    return BudgetResult(
        masks=masks, kind=kind, target=target, macs_fraction=measured["macs"], params_fraction=measured["params"],
        dense_macs=report.macs_before, dense_params=report.params_before, macs=report.macs_after,
        params=report.params_after,
        removed_channels={name: convs[name] - kept.get(name, convs[name]) for name in convs},
        kept_channels={name: kept.get(name, convs[name]) for name in convs},
        reached=low - 1e-12 <= achieved <= high + 1e-12, ranking=ranking, normalize=normalize,
        aggregate=aggregate, compact=compact.eval())


def _removed_vector(structure: _Structure, chosen: Sequence[int]) -> np.ndarray:
    removed = np.zeros(len(structure.units))
    for g in chosen:
        for u, _ in structure.groups[g].channels:
            removed[u] += 1
    return removed
