"""Growing networks along the SplitLBI path: start narrow, widen the layers whose filters the path fills.

``grow_network(config, rule, out_dir)`` (``splitlbi grow``) trains ``config.model`` from the
narrow ``config.widths``; every ``rule.check_every`` epochs the width groups (convs, or
ResNet stages) of which at least ``rule.tau`` of the filters are selected by the support of
Γ are widened by :func:`widen_model`, which keeps the network's function, and the optimizer
state is carried over by :func:`widen_optimizer_state` (old filters keep their momentum
and V, new ones start at zero). See docs/growing.md.
"""

from splitlbi.grow.layout import GROWABLE, ChannelSpace, GrowthLayout, layout_of, uniform_widths
from splitlbi.grow.rule import GrowthRule, LayerCheck, check_growth, selected_filters
from splitlbi.grow.run import (
    CHECK_COLUMNS, CHECKS_FILE, GROW_KEY, STAGE_COLUMNS, STAGES_FILE, Stage, grow_network, input_shape,
    layout_of_config, load_grown_model, network_cost, read_checks, read_stages, stages_of, training_compute,
)
from splitlbi.grow.widen import Widening, widen_model, widen_optimizer_state

__all__ = [
    "GROWABLE", "ChannelSpace", "GrowthLayout", "layout_of", "uniform_widths",
    "GrowthRule", "LayerCheck", "check_growth", "selected_filters",
    "CHECK_COLUMNS", "CHECKS_FILE", "GROW_KEY", "STAGE_COLUMNS", "STAGES_FILE", "Stage", "grow_network",
    "input_shape", "layout_of_config", "load_grown_model", "network_cost", "read_checks", "read_stages", "stages_of", "training_compute",
    "Widening", "widen_model", "widen_optimizer_state",
]
