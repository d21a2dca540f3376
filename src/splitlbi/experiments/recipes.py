"""Experiment recipes: one TOML file per figure, one table per scale.

A recipe file (``recipes/fig4.toml``) holds a table per scale (``smoke``, ``cpu``,
``paper``); each scale has a ``[<scale>.train]`` table of :class:`TrainConfig` fields
shared by every run of the figure, and figure-specific tables (``sweep``, ``subnet``,
``fig2``, ``table``, ...). ``--set section.key=value`` overrides one entry from the
command line, e.g. ``--set train.model=vgg16_bn``; the value is read as TOML
(``--set sweep.kappa=[1,2,5]``), falling back to a plain string.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from splitlbi.errors import SplitLBIError
from splitlbi.train.config import TrainConfig, check_setting_types, validate_config

__all__ = ["SCALES", "FIGURES", "BENCHMARKS", "EXPERIMENTS", "RECIPE_DIR", "RECIPE_TABLES", "Recipe", "load_recipe",
           "recipe_path", "parse_override"]

#: The scales a recipe file may define (a top-level table each).
SCALES = ("smoke", "cpu", "paper", "resnet")  # resnet: prune-bench in the reference regime (docs/results.md)
#: The other top-level entries of a recipe file, with the type each must have.
_TOP_LEVEL = {"figure": str, "title": str}

#: The experiments ``splitlbi reproduce`` knows, in paper order.
FIGURES = ("fig1", "fig2", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8", "table1")
#: Benchmarks beyond the paper (not part of ``reproduce all``).
BENCHMARKS = ("prune-bench", "resnet-path")
EXPERIMENTS = FIGURES + BENCHMARKS
#: Bundled recipes (``recipes/`` at the repository root links here).
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

#: The tables a recipe scale may hold besides ``train`` (every TrainConfig field), the keys
#: each may hold and their kind: a typo or a stray ``--set`` is an error, not ignored.
RECIPE_TABLES: Dict[str, Dict[str, str]] = {
    "run": {"seeds": "integers"},
    "sweep": {"kappa": "numbers", "nu": "numbers"},
    "subnet": {"epochs": "integers", "finetune_from": "integers", "finetune_epochs": "integer",
               "finetune_lr": "number", "finetune_milestones": "integers", "retrain_epochs": "integer",
               "retrain_lr": "number", "retrain_milestones": "integers", "penalties": "strings",
               "l1_lam": "number", "baselines": "strings"},
    "table": {"variants": "strings", "weight_decay": "number", "layer": "string"},
    "fig1": {"layer": "string", "steps": "integer", "epochs": "integers", "per_group": "integer"},
    "fig2": {"kappa": "numbers", "epochs": "integers", "images": "integer", "filters": "integer"},
    # prune-bench (experiments/prune_bench.py checks the "any" ones: a value or a per-model table).
    "bench": {"models": "strings", "budgets": "any", "train_epochs": "integer", "finetune_epochs": "integer",
              "k": "integers", "normalize": "strings", "variant_budgets": "any", "methods": "strings",
              "ranking": "string", "taylor_batches": "integer", "slimming_lambda": "number",
              "group_norm_reg": "number", "group_norm_every": "any", "report_only": "boolean",
              "full_runs": "boolean", "goal_margin": "number"},
    # resnet-path (experiments/path_study.py)
    "study": {"candidates": "strings", "reference": "string", "half": "integer", "budget": "number",
              "margin": "number"},
}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "boolean":
        return isinstance(value, bool)
    def one(item: Any, singular: str) -> bool:
        if singular == "string":
            return isinstance(item, str)
        if isinstance(item, bool):
            return False
        return isinstance(item, int) if singular == "integer" else isinstance(item, (int, float))

    if kind.endswith("s"):
        return isinstance(value, list) and all(one(item, kind[:-1]) for item in value)
    return one(value, kind)


def _check_tables(file: Path, scale: str, sections: Mapping[str, Mapping[str, Any]], overridden: set) -> None:
    """Every table and key known, every value of its kind; ``overridden``: (table, key) set by --set."""
    for table, values in sections.items():
        def where(key: str) -> str:
            return f"--set {table}.{key}" if (table, key) in overridden else f"recipe {file} [{scale}.{table}]"
        if table in ("model", "candidate"):  # prune-bench, resnet-path: [scale.model|candidate.NAME] settings
            for name, settings in values.items():
                if not isinstance(settings, Mapping):
                    raise SplitLBIError(f"{where(name)}: {table}.{name} must be a table of training settings")
                _check_tables(file, scale, {"train": settings}, overridden)
            continue
        if table == "train":
            unknown = sorted(set(values) - _TRAIN_FIELDS)
            if unknown:
                raise SplitLBIError(f"{where(unknown[0])}: unknown training setting {unknown[0]!r}")
            for key in values:
                try:
                    check_setting_types({key: values[key]})
                except SplitLBIError as error:
                    raise SplitLBIError(f"{where(key)}: {error}") from None
            continue
        if table not in RECIPE_TABLES:
            first = next(iter(values), "")
            raise SplitLBIError(f"{where(first)}: unknown table {table!r} (known: train, "
                                f"{', '.join(RECIPE_TABLES)})")
        for key, value in values.items():
            kind = RECIPE_TABLES[table].get(key)
            if kind is None:
                raise SplitLBIError(f"{where(key)}: unknown key {key!r} (known in [{table}]: "
                                    f"{', '.join(RECIPE_TABLES[table])})")
            if not _is_kind(value, kind):
                expected = f"a list of {kind}" if kind.endswith("s") else ("an " if kind[0] == "i" else "a ") + kind
                raise SplitLBIError(f"{where(key)}: {key} must be {expected}, got {value!r}")


@dataclasses.dataclass
class Recipe:
    """One scale of one recipe file: ``train`` (TrainConfig fields) and the figure's own tables."""

    figure: str
    scale: str
    path: Path
    title: str
    sections: Dict[str, Dict[str, Any]]

    def section(self, name: str, required: Iterable[str] = ()) -> Dict[str, Any]:
        """The ``[scale.name]`` table; a missing table or key is a clear error."""
        values = self.sections.get(name)
        if values is None:
            raise SplitLBIError(f"recipe {self.path} has no [{self.scale}.{name}] table")
        for key in required:
            if key not in values:
                raise SplitLBIError(f"recipe {self.path}: [{self.scale}.{name}] needs {key!r}")
        return values

    def train_config(self, **changes: Any) -> TrainConfig:
        """The recipe's :class:`TrainConfig` with ``changes`` applied, validated."""
        values = {**self.section("train"), **changes}
        unknown = sorted(set(values) - _TRAIN_FIELDS)
        if unknown:
            raise SplitLBIError(f"recipe {self.path}: unknown training setting(s) {', '.join(unknown)} in "
                                f"[{self.scale}.train]")
        if "lr_milestones" in values:
            values["lr_milestones"] = tuple(int(m) for m in values["lr_milestones"])
        try:
            config = TrainConfig(**values)
        except (TypeError, ValueError) as error:
            raise SplitLBIError(f"recipe {self.path} [{self.scale}.train]: {error}") from None
        validate_config(config)
        return config

    @property
    def seeds(self) -> List[int]:
        seeds = self.sections.get("run", {}).get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise SplitLBIError(f"recipe {self.path}: [{self.scale}.run] seeds must be distinct integers >= 0, "
                                f"got {seeds!r}")
        return seeds


def recipe_path(figure: str, recipe_dir: Optional[Path] = None) -> Path:
    """The bundled recipe file of ``figure``."""
    if figure not in EXPERIMENTS:
        raise SplitLBIError(f"unknown figure {figure!r} (choose from {', '.join(EXPERIMENTS)})")
    return Path(recipe_dir or RECIPE_DIR) / f"{figure}.toml"


def parse_override(text: str) -> tuple:
    """``"train.model=vgg16_bn"`` -> ``("train", "model", "vgg16_bn")`` (values read as TOML)."""
    key, sep, raw = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise SplitLBIError(f"--set expects SECTION.KEY=VALUE (e.g. train.epochs=5), got {text!r}")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def load_recipe(figure: str, scale: str, *, path: Optional[Path] = None,
                overrides: Iterable[str] = ()) -> Recipe:
    """Read ``scale`` of ``figure``'s recipe (the bundled one unless ``path``), apply ``--set`` overrides."""
    file = Path(path) if path is not None else recipe_path(figure)
    if not file.is_file():
        raise SplitLBIError(f"recipe file {file} does not exist")
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SplitLBIError(f"recipe {file} is not valid TOML: {error}") from None
    for name, value in document.items():  # a typo at the top level would be ignored otherwise
        if name in SCALES:
            if not isinstance(value, dict):
                raise SplitLBIError(f"recipe {file}: {name} must be a table of tables ([{name}.train], ...)")
        elif name in _TOP_LEVEL:
            if not isinstance(value, _TOP_LEVEL[name]):
                raise SplitLBIError(f"recipe {file}: {name} must be a string, got {value!r}")
        elif isinstance(value, dict):
            raise SplitLBIError(f"recipe {file}: unknown scale [{name}] (scales: {', '.join(SCALES)})")
        else:
            raise SplitLBIError(f"recipe {file}: unknown entry {name!r} (a recipe has figure, title and the "
                                f"scale tables {', '.join(SCALES)})")
    scales = {name: value for name, value in document.items() if isinstance(value, dict)}
    if scale not in scales:
        raise SplitLBIError(f"recipe {file} has no scale {scale!r} (it has: {', '.join(scales) or 'none'})")
    sections: Dict[str, Dict[str, Any]] = {}
    for name, value in scales[scale].items():
        if not isinstance(value, dict):
            raise SplitLBIError(f"recipe {file}: {scale}.{name} must be a table ([{scale}.{name}])")
        sections[name] = dict(value)
    overridden = set()
    for text in overrides:
        section, name, value = parse_override(text)
        sections.setdefault(section, {})[name] = value
        overridden.add((section, name))
    _check_tables(file, scale, sections, overridden)
    declared = document.get("figure", figure)
    if path is None and declared != figure:
        raise SplitLBIError(f"recipe {file} is for {declared!r}, not {figure!r}")
    return Recipe(figure=figure, scale=scale, path=file, title=str(document.get("title", figure)),
                  sections=sections)


def scales_of(figure: str) -> List[str]:
    """The scales the bundled recipe of ``figure`` defines."""
    document: Mapping[str, Any] = tomllib.loads(recipe_path(figure).read_text())
    return [name for name, value in document.items() if isinstance(value, dict)]
