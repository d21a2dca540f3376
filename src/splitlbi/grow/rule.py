"""The growth rule: when a width group is full and how much it grows.

Every ``check_every`` epochs the share of each group's filters that the solution path has
selected is read (:func:`selected_filters`); a group whose share is at least ``tau`` is
too narrow and grows, by a ratio (``ceil(width * ratio)``) or by a count of filters, up
to its cap. Growth stops at the first check where nothing grew (or after ``until``);
training then goes on at the final widths to the end of the run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

from splitlbi.errors import SplitLBIError
from splitlbi.grow.layout import GrowthLayout
from splitlbi.grow.widen import NEW_FILTER_INITS
from splitlbi.optim import SplitLBI

__all__ = ["GrowthRule", "LayerCheck", "selected_filters", "check_growth"]


def selected_filters(optimizer: SplitLBI, conv: str, norm: Optional[str] = None) -> Optional[Tensor]:
    """Which filters of the conv layer ``conv`` (a module name) the path has selected: a
    bool per output filter, or None when nothing of it carries Γ (e.g. an uncoupled stem).

    The one definition of "selected" that growth uses: the support of Γ of whatever carries
    it for this conv (``splitlbi.optim.groups``): its filters (``--couple filters``), the
    scale of its BatchNorm ``norm`` (``--couple bn``), or both, a filter then being selected
    when both are (``--couple both``).
    """
    support = optimizer.filter_support()
    present = [support[key] for key in (f"{conv}.weight", f"{norm}.weight" if norm else None) if key in support]
    if not present:
        return None
    selected = present[0]
    for other in present[1:]:
        selected = selected & other
    return selected


class LayerCheck(NamedTuple):
    """One width group at one check: its width, how many of its filters are selected, their
    share, and the width it grows to (``new_width == width``: it did not grow)."""

    group: str
    width: int
    selected: int
    filters: int
    new_width: int

    @property
    def share(self) -> float:
        return self.selected / self.filters if self.filters else 0.0

    @property
    def grew(self) -> bool:
        return self.new_width > self.width


@dataclass(frozen=True)
class GrowthRule:
    """When and how much the width groups grow (``splitlbi grow``'s growth options).

    Args:
        check_every: epochs between checks (the release code's ``local_epoch``): checks
            come after epochs ``check_every, 2 * check_every, ...`` before the last epoch.
        tau: a group grows when at least this share of its filters is selected (``0 < tau <= 1``).
        ratio: grow to ``ceil(width * ratio)`` filters (``ratio > 1``); used unless ``count``.
        count: grow by this many filters instead of by ``ratio``.
        max_widths: the cap of each group (empty: the family's standard widths).
        until: no check after this epoch (None: checks until the run's last epoch).
        init: how new filters start, one of :data:`splitlbi.grow.widen.NEW_FILTER_INITS`
            (``matched``: drawn, then scaled to the median norm of the conv's old filters).
    """

    check_every: int = 10
    tau: float = 0.8
    ratio: float = 1.1
    count: Optional[int] = None
    max_widths: Tuple[int, ...] = ()
    until: Optional[int] = None
    init: str = "matched"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_widths", tuple(self.max_widths))

    def validate(self) -> None:
        """Raise :class:`SplitLBIError` (one line, naming the option) for the first bad setting."""
        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not whole(self.check_every) or self.check_every < 1:
            raise SplitLBIError(f"--check-every must be a whole number of epochs >= 1, got {self.check_every!r}")
        if not number(self.tau) or not 0 < self.tau <= 1:
            raise SplitLBIError(f"--tau must be a share in (0, 1], got {self.tau!r}")
        if not number(self.ratio) or self.ratio <= 1:
            raise SplitLBIError(f"--grow-ratio must be a number > 1, got {self.ratio!r}")
        if self.count is not None and (not whole(self.count) or self.count < 1):
            raise SplitLBIError(f"--grow-count must be a whole number >= 1, got {self.count!r}")
        if any(not whole(w) or w < 1 for w in self.max_widths):
            raise SplitLBIError(f"--max-widths must be positive whole numbers, got {list(self.max_widths)}")
        if self.until is not None and (not whole(self.until) or self.until < 1):
            raise SplitLBIError(f"--grow-until must be an epoch >= 1, got {self.until!r}")
        if self.init not in NEW_FILTER_INITS:
            raise SplitLBIError(f"--new-filters must be one of {', '.join(NEW_FILTER_INITS)}, got {self.init!r}")

    def caps(self, layout: GrowthLayout, widths: Sequence[int]) -> Tuple[int, ...]:
        """The cap of each group: ``max_widths`` or the family's standard widths, checked
        against the number of groups and the starting ``widths``."""
        caps = self.max_widths or layout.standard
        if len(caps) != len(layout.groups):
            raise SplitLBIError(f"--max-widths needs {len(layout.groups)} numbers ({', '.join(layout.groups)}), "
                                f"got {len(caps)}")
        over = [f"{name} {width} > {cap}" for name, width, cap in zip(layout.groups, widths, caps) if width > cap]
        if over:
            raise SplitLBIError(f"the starting widths exceed the caps ({', '.join(over)}): lower --widths or raise "
                                f"--max-widths")
        return tuple(caps)

    def grown_width(self, width: int, cap: int) -> int:
        """The width a full group of ``width`` filters grows to (at most ``cap``)."""
        grown = width + self.count if self.count is not None else math.ceil(width * self.ratio)
        return min(cap, max(grown, width + 1))

    def is_check(self, epoch: int, epochs: int) -> bool:
        """Whether a check comes after ``epoch`` of a run of ``epochs`` epochs."""
        return (0 < epoch < epochs and epoch % self.check_every == 0
                and (self.until is None or epoch <= self.until))

    def next_check(self, epoch: int, epochs: int) -> Optional[int]:
        """The first check epoch after ``epoch`` (None: no more checks)."""
        candidate = (epoch // self.check_every + 1) * self.check_every
        return candidate if self.is_check(candidate, epochs) else None

    def to_dict(self) -> Dict[str, Any]:
        """The rule as a JSON-ready dict (config.json's ``grow``)."""
        values = dataclasses.asdict(self)
        values["max_widths"] = list(self.max_widths)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GrowthRule":
        """The rule stored by :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(values, Mapping):
            raise SplitLBIError(f"the growth settings must be a JSON object, got {values!r}")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SplitLBIError(f"unknown growth setting(s): {', '.join(unknown)}")
        rule = cls(**dict(values))
        rule.validate()
        return rule


def check_growth(layout: GrowthLayout, optimizer: SplitLBI, widths: Sequence[int], rule: GrowthRule,
                 caps: Sequence[int]) -> List[LayerCheck]:
    """Apply ``rule`` to every width group: how many of its filters are selected and what it grows to.

    A group counts the filters of its convs that carry Γ (:func:`selected_filters`); one with
    none (``filters == 0``) does not grow.
    """
    wanted, counts = [], []
    for group, width in enumerate(widths):
        selected = [s for conv in layout.convs(group)
                    if (s := selected_filters(optimizer, conv, layout.norm_of(conv))) is not None]
        chosen, filters = sum(int(s.sum()) for s in selected), sum(int(s.numel()) for s in selected)
        counts.append((chosen, filters))
        full = filters > 0 and chosen / filters >= rule.tau
        wanted.append(rule.grown_width(width, caps[group]) if full else width)
    new = layout.limit(wanted)
    return [LayerCheck(name, width, chosen, filters, grown)
            for name, width, (chosen, filters), grown in zip(layout.groups, widths, counts, new)]
