"""Torch-Pruning interoperability: the path score as a ``tp.importance.Importance`` and a
pruner for the option-A shortcut of the CIFAR ResNets.

* :class:`PathImportance` ranks channels by SplitLBI's path score (``‖V_g‖₂ / λ`` per
  filter, see :func:`splitlbi.prune.budget.path_scores`), from a live optimizer or a
  run directory and epoch, so Torch-Pruning's pruners can use it::

      import torch_pruning as tp
      from splitlbi.prune import PathImportance, prepare_torch_pruning

      pruners = prepare_torch_pruning(model)          # option-A ResNets; {} for others
      pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 32, 32),
                                    importance=PathImportance(optimizer),   # or (run_dir, epoch=K)
                                    pruning_ratio=0.5, global_pruning=True,
                                    ignored_layers=[model.fc], customized_pruners=pruners)
      pruner.step()

* :func:`prepare_torch_pruning` replaces each :class:`~splitlbi.models.resnet_cifar.PadShortcut`
  (subsample + zero-pad in channels) by the equivalent :class:`~splitlbi.prune.compact.IndexShortcut`
  (same outputs, same ``state_dict``) and returns ``customized_pruners`` for it. Without it
  Torch-Pruning traces ``F.pad`` as an element-wise op and couples the 16 channels of
  stage 1 with the 32/64 of later stages (wrong groups, then shape errors); with it the
  shortcut is a layer whose input and output channels are pruned separately
  (:class:`IndexShortcutPruner` keeps the kept-source -> kept-output placement).
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
import torch_pruning as tp
from torch import Tensor, nn

from splitlbi.prune.budget import AGGREGATIONS, NORMALIZATIONS, normalize_scores, path_scores
from splitlbi.prune.compact import IndexShortcut

__all__ = ["IndexShortcutPruner", "PathImportance", "prepare_torch_pruning"]

PathLike = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------- the option-A shortcut


class IndexShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner of :class:`IndexShortcut`: its input and output channels are
    two independent dimensions (``prune_in_channels != prune_out_channels``, so no
    intra-layer coupling). Removing output channels drops the placements into them;
    removing input channels drops the sources read from them (their outputs become zero)."""

    TARGET_MODULES = (IndexShortcut,)

    def prune_out_channels(self, layer: IndexShortcut, idxs: Sequence[int]) -> IndexShortcut:
        dropped = set(int(i) for i in idxs)
        kept = [j for j in range(layer.planes) if j not in dropped]
        position = {j: i for i, j in enumerate(kept)}
        pairs = [(s, position[d]) for s, d in zip(layer.src.tolist(), layer.dst.tolist()) if d in position]
        layer.set_placement([s for s, _ in pairs], [d for _, d in pairs], planes=len(kept))
        return layer

    def prune_in_channels(self, layer: IndexShortcut, idxs: Sequence[int]) -> IndexShortcut:
        dropped = set(int(i) for i in idxs)
        kept = [c for c in range(layer.in_planes) if c not in dropped]
        position = {c: i for i, c in enumerate(kept)}
        pairs = [(position[s], d) for s, d in zip(layer.src.tolist(), layer.dst.tolist()) if s in position]
        layer.set_placement([s for s, _ in pairs], [d for _, d in pairs], in_planes=len(kept))
        return layer

    def get_out_channels(self, layer: IndexShortcut) -> int:
        return layer.planes

    def get_in_channels(self, layer: IndexShortcut) -> int:
        return layer.in_planes


def prepare_torch_pruning(model: nn.Module) -> Dict[type, tp.pruner.BasePruningFunc]:
    """Make ``model`` prunable by Torch-Pruning; return the ``customized_pruners`` to pass.

    Replaces, in place, every option-A :class:`~splitlbi.models.resnet_cifar.PadShortcut`
    by the :class:`IndexShortcut` that computes the same output (its buffers are not
    persistent: ``state_dict`` keys are unchanged). Returns ``{IndexShortcut:
    IndexShortcutPruner()}``, to be given as ``customized_pruners=`` to
    ``tp.DependencyGraph().build_dependency`` or any ``tp.pruner`` (harmless for models
    without such shortcuts).
    """
    from splitlbi.models.resnet_cifar import PadShortcut

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, PadShortcut):
                setattr(parent, child_name, IndexShortcut.from_pad(child, _pad_planes(parent, child)))
    return {IndexShortcut: IndexShortcutPruner()}


def _pad_planes(block: nn.Module, shortcut: nn.Module) -> int:
    """Output channels of a PadShortcut: those of the block's last conv (it adds to them)."""
    conv2 = getattr(block, "conv2", None)
    if isinstance(conv2, nn.Conv2d):
        return conv2.out_channels
    raise ValueError(f"cannot tell the output width of {shortcut!r}: its block has no conv2")


# --------------------------------------------------------------------------- path importance


class PathImportance(tp.importance.Importance):
    """SplitLBI's path score as a Torch-Pruning importance.

    Args:
        source: a live :class:`~splitlbi.optim.SplitLBI` optimizer, or a run directory
            (then ``epoch`` is required), see :func:`splitlbi.prune.budget.path_scores`;
            or a ready ``{param name: scores}`` dict.
        epoch: the epoch of a run directory.
        normalize: per-layer normalization before layers are compared
            (:func:`normalize_scores`; ``"mean"`` by default, so that one threshold
            across layers does not favor wide or deep layers).
        aggregate: how the filters of one group (convs whose channels a residual add
            couples) combine: ``"max"`` (default: a channel is as important as its most
            important filter, as the support of Γ keeps it), ``"mean"`` or ``"sum"``.

    Called with a Torch-Pruning group it returns one score per channel of the group
    (higher = keep). Layers are matched by parameter name (the module names of the model
    given to the pruner, plus ``.weight``) or, for a live optimizer, by the parameter
    itself. Groups without a scored layer get ``None`` (Torch-Pruning skips them). The
    scores are read once: after pruning, a layer's channels no longer match them (use
    ``iterative_steps=1``, the default, or build a new importance from the pruned run).
    """

    def __init__(self, source: Union["torch.optim.Optimizer", PathLike, Mapping[str, Tensor]],
                 epoch: Optional[int] = None, normalize: str = "mean", aggregate: str = "max") -> None:
        from splitlbi.optim import SplitLBI

        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATIONS)}, got {aggregate!r}")
        self.normalize, self.aggregate = normalize, aggregate
        self._by_param: Dict[int, str] = {}
        if isinstance(source, Mapping):
            scores = {name: torch.as_tensor(value).detach().cpu() for name, value in source.items()}
        else:
            scores = path_scores(source, epoch)
            if isinstance(source, SplitLBI):
                self._by_param = {id(c.param): c.name for c in source.named_coupled()}
        self.scores: Dict[str, Tensor] = {name: value.to(torch.float64) for name, value in scores.items()}

    def scores_for(self, model: nn.Module) -> Dict[str, Tensor]:
        """The scores keyed by ``model``'s parameter names (a live optimizer's parameters are
        found by identity, so unnamed ones are matched too); what :func:`budget_masks` ranks."""
        names = {id(p): name for name, p in model.named_parameters()}
        by_key = {key: names[pid] for pid, key in self._by_param.items() if pid in names}
        return {by_key.get(key, key): value for key, value in self.scores.items()}

    def _layer_scores(self, layer: nn.Module, name: Optional[str], filter_size: Optional[int] = None
                      ) -> Optional[Tensor]:
        weight = getattr(layer, "weight", None)
        key = self._by_param.get(id(weight)) if weight is not None else None
        if key is None and name is not None:
            key = f"{name}.weight"
        values = self.scores.get(key) if key is not None else None
        if values is None:
            return None
        if weight is not None and weight.shape[0] != values.numel():
            raise ValueError(f"PathImportance: {key} has {weight.shape[0]} output channels but {values.numel()} "
                             "scores (already pruned? build the importance again from the pruned run)")
        if filter_size is None:
            filter_size = int(weight[0].numel()) if weight is not None else 1
        return normalize_scores(values, self.normalize, filter_size)

    @torch.no_grad()
    def __call__(self, group) -> Optional[Tensor]:
        function = tp.pruner.function
        out_fns = (function.prune_conv_out_channels, function.prune_depthwise_conv_out_channels,
                   function.prune_linear_out_channels)
        members: Dict[nn.Module, Tensor] = {}  # layer -> its scores on the group's channels (nan: none)
        norms = []  # (the layer a BatchNorm reads, the BatchNorm's scores): a scale's score counts for its conv
        for i, (dep, idxs) in enumerate(group):
            is_norm = dep.pruning_fn == function.prune_batchnorm_out_channels
            if dep.pruning_fn not in out_fns and not is_norm:
                continue
            source = getattr(dep.source, "module", None)
            size = int(source.weight[0].numel()) if is_norm and isinstance(source, nn.Conv2d) else None
            # Node._name is the module's name in the traced model (Node.name adds its repr).
            values = self._layer_scores(dep.layer, getattr(dep.target, "_name", None), size)
            if values is None:
                continue
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            positions = {int(r): p for p, r in enumerate(group[0].root_idxs)}
            channel = torch.full((len(positions),), float("nan"), dtype=torch.float64)
            where = torch.as_tensor([positions[int(r)] for r in root], dtype=torch.long)
            channel[where] = values[torch.as_tensor([int(i) for i in idxs], dtype=torch.long)]
            if is_norm:
                norms.append((source, channel))
            else:
                members.setdefault(dep.layer, channel)
        for source, channel in norms:  # as splitlbi.prune.channels.filter_scores: the smaller of conv and scale
            members[source] = torch.fmin(members[source], channel) if source in members else channel
        per_layer = list(members.values())
        if not per_layer:
            return None
        stacked = torch.stack(per_layer)
        known = ~torch.isnan(stacked)
        filled = torch.where(known, stacked, torch.zeros_like(stacked))
        if self.aggregate == "max":
            result = torch.where(known, stacked, torch.full_like(stacked, -float("inf"))).max(dim=0).values
            result = torch.where(known.any(dim=0), result, torch.zeros_like(result))
        elif self.aggregate == "sum":
            result = filled.sum(dim=0)
        else:
            result = filled.sum(dim=0) / known.sum(dim=0).clamp_min(1)
        return result.to(torch.float32)
