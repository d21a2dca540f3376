"""``splitlbi reproduce resnet-path``: the path of a residual BatchNorm network, in a regime where it forms.

Each candidate (a ``[scale.candidate.NAME]`` table of training settings over ``[scale.train]``:
SGD, or SplitLBI with some coupling, stem, λ or ν) is trained once per seed for the whole
schedule. Every epoch, ``metrics.csv`` holds the dense test accuracy and, for SplitLBI, the
accuracy of the network ``splitlbi compact`` builds from the support of Γ
(``sparse_test_acc``), the same with BatchNorm statistics recalibrated on training images
(``sparse_recal_test_acc``, ``--recalibrate-bn``) and its MACs over the dense network's
(``sparse_macs_share``).

Writes ``figures/resnet-path.png|pdf|csv`` (dense accuracy, sparse accuracy without and with
recalibration, and MACs kept, over epochs; mean ± std over seeds), ``resnet-path_runs.csv``
(one row per candidate, seed and epoch) and ``resnet-path.md``: per candidate and seed the
final dense accuracy and, at the epochs K up to ``[study] half``, the sparse model that keeps
at most ``[study] budget`` of the dense MACs; and the goal line: is there a K <= half whose
sparse model (mean of the seeds) keeps at most the budget and is within ``[study] margin``
points of the reference candidate's (SGD's) final dense accuracy.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from splitlbi.errors import SplitLBIError
from splitlbi.experiments.recipes import Recipe
from splitlbi.experiments.workspace import Workspace
from splitlbi.train.config import TrainConfig
from splitlbi.utils.io import atomic_write_csv, atomic_write_text

__all__ = ["StudySettings", "study_settings", "path_study", "summarize_study"]

#: The per-epoch columns the study reads (metrics.csv names) and how the figure labels them.
COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("test_acc", "dense model test accuracy (%)"),
    ("sparse_test_acc", "sparse model (compacted) test accuracy (%)"),
    ("sparse_recal_test_acc", "sparse model, BatchNorm recalibrated (%)"),
    ("sparse_macs_share", "MACs of the sparse model (% of dense)"),
)


@dataclasses.dataclass
class StudySettings:
    """The ``[scale.study]`` table, checked."""

    candidates: List[str]   #: candidate names, in plot order
    reference: str          #: the candidate whose final dense accuracy the goal compares with
    half: int               #: the last epoch K the goal looks at
    budget: float           #: share of the dense MACs the sparse model may keep
    margin: float           #: points of accuracy the sparse model may lose against the reference


def study_settings(recipe: Recipe) -> StudySettings:
    """Read and check ``[scale.study]`` and its ``[scale.candidate.NAME]`` tables."""
    study = recipe.section("study", ["candidates", "reference"])
    where = f"recipe {recipe.path}: [{recipe.scale}.study]"
    tables = recipe.sections.get("candidate", {})
    candidates = study["candidates"]
    if not isinstance(candidates, list) or not candidates or any(c not in tables for c in candidates):
        raise SplitLBIError(f"{where} candidates must name [{recipe.scale}.candidate.NAME] tables (have: "
                            f"{', '.join(tables) or 'none'}), got {candidates!r}")
    if study["reference"] not in candidates:
        raise SplitLBIError(f"{where} reference must be one of the candidates {candidates}, got "
                            f"{study['reference']!r}")
    epochs = recipe.train_config().epochs
    half = study.get("half", epochs // 2)
    if not isinstance(half, int) or not 1 <= half <= epochs:
        raise SplitLBIError(f"{where} half must be an epoch in 1..{epochs}, got {half!r}")
    budget, margin = study.get("budget", 0.5), study.get("margin", 1.0)
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise SplitLBIError(f"{where} budget must be a share of the MACs in (0, 1], got {budget!r}")
    if not isinstance(margin, (int, float)) or margin < 0:
        raise SplitLBIError(f"{where} margin must be >= 0 points, got {margin!r}")
    return StudySettings(list(candidates), str(study["reference"]), int(half), float(budget), float(margin))


def candidate_config(recipe: Recipe, name: str, seed: int) -> TrainConfig:
    """``[train]`` updated by ``[candidate.NAME]`` for ``seed``."""
    return recipe.train_config(**{**recipe.sections["candidate"][name], "seed": seed})


def path_study(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Train every candidate for every seed (seed by seed), then draw and summarize."""
    from splitlbi.experiments.reproduce import _label
    from splitlbi.train.runfiles import read_metric_columns

    settings = study_settings(recipe)
    jobs = [(name, candidate_config(recipe, name, seed)) for seed in recipe.seeds for name in settings.candidates]
    # Two processes sharing --out split the runs: the first pass skips what the other one trains now,
    # the second waits for it. The labels are those of prune-bench's runs, which may share them.
    for _, config in jobs:
        ws.train(config, _label(config), wait=False)
    runs: Dict[str, List[Path]] = {name: [] for name in settings.candidates}
    for name, config in jobs:
        runs[name].append(ws.train(config, _label(config)))
    rows = []
    for name, paths in runs.items():
        for seed, path in zip(recipe.seeds, paths):
            columns = read_metric_columns(path)
            for index, epoch in enumerate(columns["epoch"]):
                rows.append({"candidate": name, "seed": seed, "epoch": int(epoch),
                             **{key: _at(columns.get(key), index) for key, _ in COLUMNS},
                             "gamma_nonzero_share": _at(columns.get("gamma_nonzero_share"), index),
                             "run": path.name})
    stem = out.with_suffix("")
    files = [_write_rows(rows, stem.with_name(f"{stem.name}_runs.csv"))]
    files += _plot(rows, settings, out, recipe)
    summary = stem.with_name(f"{stem.name}.md")
    atomic_write_text(summary, summarize_study(rows, settings, _note(recipe)))
    files.append(summary)
    return files


def _at(values: Optional[Sequence[Any]], index: int) -> Optional[float]:
    if values is None or index >= len(values) or values[index] is None:
        return None
    value = float(values[index])
    return None if value != value else value  # an empty cell reads as nan


def _write_rows(rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    header = ["candidate", "seed", "epoch", *(key for key, _ in COLUMNS), "gamma_nonzero_share", "run"]
    atomic_write_csv(path, header, [["" if row[h] is None else row[h] for h in header] for row in rows])
    return path


def _note(recipe: Recipe) -> str:
    from splitlbi.experiments.reproduce import _scale_note

    return _scale_note(recipe, f"batch {recipe.train_config().batch_size}")


def _series(rows: Sequence[Dict[str, Any]], name: str, key: str) -> Tuple[List[int], List[List[float]]]:
    """Epochs and, per seed, the column's values (a seed missing a value is left out of that epoch)."""
    by_seed: Dict[int, Dict[int, float]] = {}
    for row in rows:
        if row["candidate"] == name and row[key] is not None:
            by_seed.setdefault(row["seed"], {})[row["epoch"]] = row[key]
    epochs = sorted({e for values in by_seed.values() for e in values})
    return epochs, [[values[e] for e in epochs if e in values] for values in by_seed.values()
                    if all(e in values for e in epochs)]


def _plot(rows: Sequence[Dict[str, Any]], settings: StudySettings, out: Path, recipe: Recipe) -> List[Path]:
    from splitlbi.plots.curves import Panel, draw_panels, mean_curve

    panels = []
    for key, axis in COLUMNS:
        panel = Panel(axis.split(" (")[0], "epoch", axis)
        scale = 100.0 if key == "sparse_macs_share" else 1.0
        for name in settings.candidates:
            epochs, values = _series(rows, name, key)
            if values and epochs:
                panel.series.append(mean_curve(name, [[v * scale for v in seed] for seed in values], epochs))
        panels.append(panel)
    title = "The path of a residual BatchNorm network: dense and sparse (compacted) accuracy, MACs kept"
    return draw_panels(panels, out, columns=2, title=title,
                       note=_note(recipe) + f"; mean ± std over seeds; sparse model = support of Γ, compacted")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize_study(rows: Sequence[Dict[str, Any]], settings: StudySettings, note: str) -> str:
    """The markdown summary: final accuracies, the sparse models up to ``half``, the goal line."""
    def value(name: str, seed: int, epoch: int, key: str) -> Optional[float]:
        for row in rows:
            if row["candidate"] == name and row["seed"] == seed and row["epoch"] == epoch:
                return row[key]
        return None

    seeds = sorted({row["seed"] for row in rows})
    last = max(row["epoch"] for row in rows)
    reference = [value(settings.reference, s, last, "test_acc") for s in seeds]
    reference = [r for r in reference if r is not None]
    lines = [f"# The path of a residual BatchNorm network ({note})", "",
             f"Reference: `{settings.reference}`, final dense test accuracy {_mean(reference):.2f} ± "
             f"{_std(reference):.2f} % (seeds {', '.join(f'{r:.2f}' for r in reference)}).", "",
             "| candidate | final dense acc (%) | final sparse acc (%) | final MACs kept (%) |",
             "|---|---|---|---|"]
    for name in settings.candidates:
        dense = [value(name, s, last, "test_acc") for s in seeds]
        sparse = [value(name, s, last, "sparse_test_acc") for s in seeds]
        macs = [value(name, s, last, "sparse_macs_share") for s in seeds]
        lines.append(f"| {name} | {_cell(dense)} | {_cell(sparse)} | {_cell(macs, 100.0)} |")
    lines += ["", f"Sparse models at epochs K <= {settings.half} (mean ± std over seeds; per seed in brackets):",
              "", "| candidate | K | MACs kept (%) | sparse acc (%) | BN recalibrated (%) | non-zeros of Γ (%) |",
              "|---|---|---|---|---|---|"]
    best: Dict[str, Tuple[float, int]] = {}
    for name in settings.candidates:
        if name == settings.reference:
            continue
        for epoch in range(1, settings.half + 1):
            macs = [value(name, s, epoch, "sparse_macs_share") for s in seeds]
            if any(m is None for m in macs):
                continue
            sparse = [value(name, s, epoch, "sparse_test_acc") for s in seeds]
            recal = [value(name, s, epoch, "sparse_recal_test_acc") for s in seeds]
            share = [value(name, s, epoch, "gamma_nonzero_share") for s in seeds]
            lines.append(f"| {name} | {epoch} | {_cell(macs, 100.0)} | {_cell(sparse, seeds=True)} | "
                         f"{_cell(recal, seeds=True)} | {_cell(share, 100.0)} |")
            usable = [v for v in (recal if all(r is not None for r in recal) else sparse) if v is not None]
            if _mean([m for m in macs if m is not None]) <= settings.budget + 1e-9 and usable:
                accuracy = _mean(usable)
                if name not in best or accuracy > best[name][0]:
                    best[name] = (accuracy, epoch)
    lines += ["", f"Goal: an epoch K <= {settings.half} whose sparse model keeps <= {100 * settings.budget:g} % of "
                  f"the dense MACs (mean of the seeds) within {settings.margin:g} point(s) of the reference's "
                  f"{_mean(reference):.2f} % (no fine-tuning; BatchNorm recalibration allowed):", ""]
    for name in settings.candidates:
        if name == settings.reference:
            continue
        if name not in best:
            lines.append(f"- `{name}`: no K <= {settings.half} keeps <= {100 * settings.budget:g} % of the MACs: "
                         f"not met")
            continue
        accuracy, epoch = best[name]
        gap = _mean(reference) - accuracy
        verdict = "met" if gap <= settings.margin else "not met"
        relation = f"{gap:.2f} points below" if gap > 0 else f"{-gap:.2f} points above"
        lines.append(f"- `{name}`: best K = {epoch}, {accuracy:.2f} %, {relation} the reference: {verdict}")
    return "\n".join(lines) + "\n"


def _cell(values: Sequence[Optional[float]], scale: float = 1.0, seeds: bool = False) -> str:
    present = [v * scale for v in values if v is not None]
    if not present:
        return "-"
    text = f"{_mean(present):.2f} ± {_std(present):.2f}"
    if seeds and len(present) > 1:
        text += " [" + ", ".join(f"{v:.2f}" for v in present) + "]"
    return text
