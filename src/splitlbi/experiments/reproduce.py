"""``splitlbi reproduce FIG --scale SCALE``: run what a figure of the paper needs, then draw it.

Each figure (``fig1`` … ``fig8``, ``table1``) has a recipe file (:mod:`.recipes`) with a
``smoke`` scale (minutes on 2 CPU cores, for tests), a ``cpu`` scale (the runs shown in
docs/results.md, Fashion-MNIST at 32×32) and a ``paper`` scale (the paper's models,
CIFAR-10 and schedule). Runs live in ``OUT/runs`` (:class:`.workspace.Workspace`): a
second call skips finished runs and resumes interrupted ones, and figures that need the
same run share it. Figures go to ``OUT/figures/<fig>.png|.pdf|.csv``.

Which runs each figure uses:

* fig3, fig4, fig6 — the *sweep*: SplitLBI for each κ in ``sweep.kappa`` (at the
  recipe's ν) and each ν in ``sweep.nu`` (at the recipe's κ), once per seed; in one seed
  every setting starts from the same initialization (the seed fixes it).
* fig8 — the SplitLBI runs whose Γ gives the lottery masks (the recipe's κ, ν), per seed.
* fig5, fig7 — a SplitLBI and an SGD run (first seed); at each ``subnet.epochs`` K:
  lottery retraining of the support of Γ_K, SGD (Lottery) with the same per-layer
  sparsity, Network Slimming and Soft Filter Pruning at the same share of filters,
  Scratch-E/B of the same architecture; a SplitLBI run with the ``l1`` penalty for the
  weight-sparsity panel; fig7 adds fine-tuning from W_K (F-epoch K).
* fig1 — LeNet-5 filter paths (SplitLBI vs SGD) and activation maximization.
* fig2 — guided backpropagation of the first conv layer: SGD vs SplitLBI at each κ of
  ``fig2.kappa``, at ``fig2.epochs``.
* table1 — :func:`splitlbi.experiments.compare.compare` with the recipe's variants.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from splitlbi.errors import SplitLBIError
from splitlbi.experiments.recipes import EXPERIMENTS, FIGURES, Recipe, load_recipe
from splitlbi.experiments.workspace import Workspace, config_settings
from splitlbi.train.config import TrainConfig
from splitlbi.train.runfiles import read_metric_columns
from splitlbi.utils.io import atomic_write_csv, atomic_write_text

__all__ = ["reproduce", "FIGURE_FUNCTIONS", "sweep_settings", "mask_facts", "check_figure_settings"]

FIGURES_DIR = "figures"
Log = Optional[Callable[[str], None]]


# --------------------------------------------------------------------------- shared runs


def _label(config: TrainConfig) -> str:
    if config.optimizer != "splitlbi":
        return f"{config.model}-{config.optimizer}-seed{config.seed}"
    from splitlbi.models import create_model, is_model
    from splitlbi.train.optimizers import resolve_coupling

    if is_model(config.model):  # "auto" couplings are named by what they are for this model
        config = resolve_coupling(config, create_model(config.model))
    penalty = "" if config.penalty == "auto" else f"-{config.penalty}"
    penalty += "" if config.update == "paper" else f"-{config.update}"
    penalty += "" if config.couple == "filters" else f"-{config.couple}"
    penalty += "-stemfree" if config.couple_stem is False else ""
    penalty += "" if config.lam_scale == "none" else f"-lam{config.lam if config.lam is not None else 'auto'}{config.lam_scale}"
    return f"{config.model}-splitlbi{penalty}-k{config.kappa:g}-nu{config.nu:g}-seed{config.seed}"


def _train(ws: Workspace, config: TrainConfig) -> Path:
    return ws.train(config, _label(config))


def sweep_settings(recipe: Recipe) -> Dict[str, List[Tuple[float, float]]]:
    """``{"kappa": [(κ, ν), ...], "nu": [(κ, ν), ...]}``: the κ sweep at the base ν and the ν sweep at the base κ."""
    base = recipe.train_config()
    sweep = recipe.section("sweep", ["kappa", "nu"])
    for key in ("kappa", "nu"):
        values = sweep[key]
        if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and v > 0
                                                                for v in values):
            raise SplitLBIError(f"recipe {recipe.path}: [{recipe.scale}.sweep] {key} must be a list of "
                                f"numbers > 0, got {values!r}")
    return {"kappa": [(float(k), base.nu) for k in sweep["kappa"]],
            "nu": [(base.kappa, float(n)) for n in sweep["nu"]]}


def _sweep_runs(ws: Workspace, recipe: Recipe) -> Dict[Tuple[float, float], List[Path]]:
    """Train every sweep setting for every seed (seed by seed, so each seed's runs finish together)."""
    settings = sweep_settings(recipe)
    unique = list(dict.fromkeys(settings["kappa"] + settings["nu"]))
    runs: Dict[Tuple[float, float], List[Path]] = {s: [] for s in unique}
    for seed in recipe.seeds:
        for kappa, nu in unique:
            config = recipe.train_config(optimizer="splitlbi", kappa=kappa, nu=nu, seed=seed)
            runs[(kappa, nu)].append(_train(ws, config))
    return runs


# --------------------------------------------------------------------------- curves (fig 3, 4, 6, 8)


def _sweep_figure(ws: Workspace, recipe: Recipe, columns: Sequence[Tuple[str, str, float]], out: Path,
                  title: str, note: str) -> List[Path]:
    from splitlbi.plots.curves import Panel, mean_curve

    runs = _sweep_runs(ws, recipe)
    settings = sweep_settings(recipe)
    panels = []
    for group, symbol in (("kappa", "κ"), ("nu", "ν")):
        fixed = "ν" if group == "kappa" else "κ"
        for column, axis, scale in columns:
            panel = Panel(f"{axis.split(' (')[0]}, several {symbol}", "epoch", axis)
            for kappa, nu in settings[group]:
                metrics = [read_metric_columns(run) for run in runs[(kappa, nu)]]
                value = kappa if group == "kappa" else nu
                other = nu if group == "kappa" else kappa
                panel.series.append(mean_curve(
                    f"{symbol}={value:g} ({fixed}={other:g})", [[v * scale for v in m[column]] for m in metrics],
                    metrics[0]["epoch"]))
            panels.append(panel)
    return _draw(panels, out, title, note, columns=len(columns))


def _draw(panels: list, out: Path, title: str, note: str, columns: int = 2) -> List[Path]:
    from splitlbi.plots.curves import draw_panels

    return draw_panels(panels, out, columns=columns, title=title, note=note)


def _scale_note(recipe: Recipe, extra: str = "") -> str:
    config = recipe.train_config()
    data = config.dataset + (f" padded to {config.pad_to}x{config.pad_to}" if config.pad_to else "")
    if config.train_split:
        data += f" (official test set: first {config.train_split} images train, the rest test)"
    if config.limit_train:
        data += f", first {config.limit_train} training images"
    if config.limit_test:
        data += f", first {config.limit_test} test images"
    seeds = len(recipe.seeds)
    text = (f"{config.model} on {data}; {config.epochs} epochs, lr {config.lr:g}"
            + (f" x{config.lr_gamma:g} after epochs {', '.join(map(str, config.lr_milestones))}"
               if config.lr_milestones else "")
            + f"; {seeds} seed{'s' if seeds > 1 else ''}; scale '{recipe.scale}'")
    return text + (f"; {extra}" if extra else "")


def fig3(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Training loss and accuracy over epochs for several κ and ν (global convergence)."""
    return _sweep_figure(ws, recipe, [("train_loss", "training loss", 1.0), ("train_acc", "training accuracy (%)", 1.0)],
                         out, "Training loss and accuracy of SplitLBI (Fig. 3)", _scale_note(recipe, "mean ± std"))


def fig4(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Share of non-zeros of Γ and the sparse model's test accuracy over epochs for several κ and ν."""
    return _sweep_figure(ws, recipe, [("gamma_nonzero_share", "non-zeros of Γ (% of coupled weights)", 100.0),
                                      ("sparse_test_acc", "sparse model test accuracy (%)", 1.0)],
                         out, "Non-zeros of Γ and accuracy of the sparse model, no fine-tuning (Fig. 4)",
                         _scale_note(recipe, "mean ± std over seeds; each seed's settings share one initialization"))


def fig6(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Test accuracy of the dense W over epochs for several κ and ν."""
    return _sweep_figure(ws, recipe, [("test_acc", "dense model test accuracy (%)", 1.0)], out,
                         "Accuracy of the dense model W (Fig. 6)", _scale_note(recipe, "mean ± std"))


def fig8(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Sparsity over training of the SplitLBI runs that give the lottery masks, mean ± std over seeds."""
    from splitlbi.plots.curves import Heatmap, Panel, layer_filter_share, mean_curve
    from splitlbi.plots.style import method_color

    runs = [_train(ws, recipe.train_config(optimizer="splitlbi", seed=seed)) for seed in recipe.seeds]
    metrics = [read_metric_columns(run) for run in runs]
    overall = Panel("Non-zeros of Γ", "epoch", "non-zeros of Γ (% of coupled weights)")
    overall.series.append(mean_curve("SplitLBI", [[100.0 * v for v in m["gamma_nonzero_share"]] for m in metrics],
                                     metrics[0]["epoch"], color=method_color("splitlbi")))
    shares = [layer_filter_share(run) for run in runs]
    names = [name for name in shares[0] if all(name in s for s in shares)]
    epochs = sorted(set.intersection(*(set(s[name]) for s in shares for name in names)))
    values = [[100.0 * statistics.fmean(s[name][e] for s in shares) for e in epochs] for name in names]
    layers = Panel("Filters selected per layer", "epoch", "", heatmap=Heatmap(
        names, [float(e) for e in epochs], values, "filters selected by Γ (%)",
        n=len(shares)))
    paths = _draw([overall, layers], out, "Non-zeros of Γ in the SplitLBI (Lottery) runs (Fig. 8)",
                  _scale_note(recipe, "left: mean ± std over seeds; right: mean over seeds, epoch 0 = init"))
    return paths


# --------------------------------------------------------------------------- sub-networks (fig 5, 7)


@dataclasses.dataclass
class _Subnet:
    """The runs of one sub-network experiment."""

    splitlbi: Path
    sgd: Path
    penalty: str
    results: List[Dict[str, Any]]
    lottery: Dict[int, Path]
    sgd_lottery: Dict[int, Path]


def _retrain_settings(recipe: Recipe, base: TrainConfig, prefix: str) -> Dict[str, Any]:
    sub = recipe.section("subnet")
    return dict(epochs=int(sub.get(f"{prefix}_epochs", base.epochs)), lr=float(sub.get(f"{prefix}_lr", base.lr)),
                lr_milestones=tuple(int(m) for m in sub.get(f"{prefix}_milestones", base.lr_milestones)),
                lr_gamma=base.lr_gamma, batch_size=base.batch_size, momentum=base.momentum,
                weight_decay=base.weight_decay, seed=base.seed)


def _mask_file(ws: Workspace, run: Path, epoch: int) -> Path:
    from splitlbi.prune import load_run_masks, save_mask_file
    from splitlbi.train.run import read_run_config

    model = read_run_config(run)["model"]
    return ws.file(f"{run.name}-epoch{epoch}.pt", lambda path: save_mask_file(
        path, load_run_masks(run, epoch), model=model, epoch=epoch, source=run))


def _masks_like(ws: Workspace, run: Path, reference: Path) -> Path:
    from splitlbi.prune import magnitude_masks_like, read_mask_file, save_mask_file
    from splitlbi.train.run import load_checkpoint, read_run_config

    def make(path: Path) -> None:
        masks = magnitude_masks_like(load_checkpoint(run)["model"], read_mask_file(reference)["masks"])
        save_mask_file(path, masks, model=read_run_config(run)["model"], source=run, kind="magnitude")

    return ws.file(f"{run.name}-like-{reference.stem}.pt", make)


def _retrain_job(ws: Workspace, label: str, source: Path, mode: str, settings: Dict[str, Any], *,
                 epoch: Optional[int] = None, masks: Optional[Path] = None) -> Path:
    from splitlbi.prune.retrain import retrain

    spec = {"kind": "retrain", "mode": mode, "source": source.name, "epoch": epoch,
            "masks": masks.name if masks else None, "settings": settings}
    # A recipe's sweep over K may start before the support of Γ has grown: an empty mask is
    # then a data point of the figure (chance accuracy), not a mistake.
    return ws.job(label, spec, lambda out: retrain(source, out, mode=mode, epoch=epoch, masks=masks,
                                                   device=ws.device, progress=ws.progress, log=None,
                                                   allow_empty_mask=True, **settings))


def _baseline_job(ws: Workspace, name: str, label: str, config: TrainConfig, *, keep: Optional[float] = None,
                  masks: Optional[Path] = None) -> Path:
    from splitlbi.prune import baselines

    config = ws.config(dataclasses.replace(config, optimizer="sgd"))
    spec = {"kind": name, "config": config_settings(config), "keep": keep, "masks": masks.name if masks else None}

    def make(out: Path) -> None:
        if name == "slimming":
            sparse = out.with_name(out.name + ".sparse")
            if sparse.exists():
                shutil.rmtree(sparse)
            baselines.slimming(config, out, keep=float(keep), sparse_out=sparse, log=None)
        elif name == "sfp":
            baselines.soft_filter_pruning(config, out, keep=float(keep), log=None)
        else:
            baselines.scratch(config, out, masks=masks, budget=name[-1].upper(), log=None, allow_empty_mask=True)

    return ws.job(label, spec, make)


def _final(run: Path) -> float:
    return read_metric_columns(run)["test_acc"][-1]


def mask_facts(mask_file: Optional[Path], example_shape: Sequence[int], config: Dict[str, Any], *,
               compact: bool = True) -> Dict[str, Any]:
    """Filters and weights kept, parameters and MACs of the compacted model for a mask file (``None``: dense).

    Filter-structured masks are compacted for real (:func:`~splitlbi.prune.compact.compact_model`,
    which keeps a residual channel that any sharing layer selects); unstructured masks count
    the remaining weights and the dense MACs, and so does ``compact=False`` (weight sparsity,
    where even an empty filter is a count of weights). ``config`` is the run's ``config.json``.
    """
    import torch

    from splitlbi.models import create_model
    from splitlbi.prune import is_filter_structured, mask_sparsity, read_mask_file
    from splitlbi.prune.compact import compact_model, count_macs_params

    masks = read_mask_file(mask_file)["masks"] if mask_file is not None else {}
    model = create_model(config["model"], num_classes=config["num_classes"], in_channels=config["in_channels"])
    example = torch.zeros(1, *example_shape)
    dense_macs, dense_params = count_macs_params(model, example)
    conv = {n: m for n, m in masks.items() if m.dim() == 4}
    sparsity = mask_sparsity(conv) if conv else None
    filters = (sum(sparsity.filters_kept.values()) / sum(sparsity.filters_total.values())) if sparsity else 1.0
    structured = compact and all(is_filter_structured(m) for m in conv.values())
    if structured and conv:
        smaller, _ = compact_model(model, {n: m.bool() for n, m in conv.items()}, example, measure=False)
        macs, params = count_macs_params(smaller, example)
    else:  # unstructured: the weights remaining; the dense MACs (no structured saving)
        removed = sum(int((~m.bool()).sum()) for m in masks.values())
        macs, params = dense_macs, dense_params - removed
    return {"filters_kept": filters, "weights_kept": mask_sparsity(masks).overall if masks else 1.0, "params": params,
            "params_share": params / dense_params, "macs": macs, "macs_share": macs / dense_macs,
            "dense_params": dense_params, "dense_macs": dense_macs}


def _subnetworks(ws: Workspace, recipe: Recipe, penalty: str, baselines: bool = True) -> _Subnet:
    """Run the sub-network experiment for one penalty (group: filter sparsity, l1: weight sparsity).

    ``baselines=False``: only the lottery retrainings (what fig7 draws).
    """
    from splitlbi.prune import mask_sparsity, read_mask_file
    from splitlbi.train.run import read_run_config

    sub = recipe.section("subnet", ["epochs"])
    base = recipe.train_config(seed=recipe.seeds[0])
    # Single weights are far smaller than filter norms: the l1 run takes its own λ (subnet.l1_lam).
    lbi_config = dataclasses.replace(base, optimizer="splitlbi", **({} if penalty == "group" else
                                                                     {"penalty": penalty,
                                                                      "lam": float(sub.get("l1_lam", base.lam if base.lam is not None else 1.0))}))
    lbi = _train(ws, lbi_config)
    sgd = _train(ws, dataclasses.replace(base, optimizer="sgd"))
    settings = _retrain_settings(recipe, base, "retrain")
    info = read_run_config(lbi)
    shape = [info["in_channels"], *([info["image_size"]] * 2 if isinstance(info["image_size"], int)
                                    else info["image_size"])]
    filter_baselines = [name for name in sub.get("baselines", ["slimming", "sfp", "scratch-e", "scratch-b"])]
    unknown = set(filter_baselines) - {"slimming", "sfp", "scratch-e", "scratch-b"}
    if unknown:
        raise SplitLBIError(f"recipe {recipe.path}: unknown baselines {sorted(unknown)} in [{recipe.scale}.subnet]")
    results: List[Dict[str, Any]] = []
    lottery: Dict[int, Path] = {}
    sgd_lottery: Dict[int, Path] = {}
    tag = "weights" if penalty == "l1" else "filters"

    def record(method: str, epoch: int, run: Path, mask: Path) -> None:
        results.append({"penalty": penalty, "method": method, "epoch_k": epoch, "test_acc": _final(run),
                        "run": run.name, **mask_facts(mask, shape, info, compact=penalty != "l1")})

    for epoch in [int(k) for k in sub["epochs"]]:
        mask = _mask_file(ws, lbi, epoch)
        masks = read_mask_file(mask)["masks"]
        empty = [name for name, m in masks.items() if m.dim() == 4 and not m.any()]
        if empty:
            ws.say(f"warning: at epoch {epoch} the support of Γ has no filter in {', '.join(empty[:4])}"
                    f"{' ...' if len(empty) > 4 else ''}: its sub-network cuts the signal; choose a later K")
        lottery[epoch] = _retrain_job(ws, f"{lbi.name}-lottery-K{epoch}", lbi, "lottery", settings, epoch=epoch)
        record("splitlbi_lottery", epoch, lottery[epoch], mask)
        like = _masks_like(ws, sgd, mask)
        sgd_lottery[epoch] = _retrain_job(ws, f"{sgd.name}-lottery-like-K{epoch}-{tag}", sgd, "lottery", settings,
                                          masks=like)
        record("sgd_lottery", epoch, sgd_lottery[epoch], like)
        if penalty == "l1" or not baselines:
            continue
        conv = mask_sparsity({n: m for n, m in masks.items() if m.dim() == 4})
        keep = round(sum(conv.filters_kept.values()) / sum(conv.filters_total.values()), 4)
        sgd_base = dataclasses.replace(base, optimizer="sgd")
        for name in filter_baselines:
            if name in ("slimming", "sfp"):
                run = _baseline_job(ws, name, f"{base.model}-{name}-keep{keep:g}", sgd_base, keep=keep)
            else:
                run = _baseline_job(ws, name, f"{base.model}-{name}-like-{lbi.name}-K{epoch}", sgd_base, masks=mask)
            record(name.replace("-", "_").replace("slimming", "network_slimming").replace(
                "sfp", "soft_filter_pruning"), epoch, run, run / "mask.pt")
    dense = {"penalty": penalty, "epoch_k": None, "run": sgd.name, **mask_facts(None, shape, info)}
    results.append({**dense, "method": "sgd_dense", "test_acc": _final(sgd)})
    results.append({**dense, "method": "splitlbi_dense", "run": lbi.name, "test_acc": _final(lbi)})
    return _Subnet(lbi, sgd, penalty, results, lottery, sgd_lottery)


_RESULT_COLUMNS = ("penalty", "method", "epoch_k", "test_acc", "filters_kept", "weights_kept", "params",
                   "params_share", "macs", "macs_share", "run")


def _write_results(rows: Sequence[Dict[str, Any]], out: Path) -> List[Path]:
    atomic_write_csv(out, _RESULT_COLUMNS, (
        ["" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
         for c in _RESULT_COLUMNS] for row in rows))
    from splitlbi.plots.style import method_name

    lines = ["| method | K | filters kept | weights kept | params | MACs | test acc. |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        name = {"splitlbi_lottery": "SplitLBI (Lottery)", "sgd_lottery": "SGD (Lottery)",
                "sgd_dense": "SGD (dense)", "splitlbi_dense": "SplitLBI (dense W)"}.get(row["method"],
                                                                                 method_name(row["method"]))
        if row["penalty"] == "l1":
            name += ", weight sparsity"
        k = "" if row["epoch_k"] is None else str(row["epoch_k"])
        params = "" if row.get("params") is None else f"{row['params'] / 1e3:.1f}k ({100 * row['params_share']:.1f}%)"
        macs = "" if row.get("macs") is None else f"{row['macs'] / 1e6:.2f}M ({100 * row['macs_share']:.1f}%)"
        lines.append(f"| {name} | {k} | {100 * row['filters_kept']:.1f}% | {100 * row['weights_kept']:.1f}% | "
                     f"{params} | {macs} | {row['test_acc']:.2f}% |")
    markdown = out.with_suffix(".md")
    atomic_write_text(markdown, "\n".join(lines) + "\n")
    return [out, markdown]


def _penalties(recipe: Recipe) -> List[str]:
    penalties = recipe.section("subnet").get("penalties", ["group", "l1"])
    if not penalties or set(penalties) - {"group", "l1"}:
        raise SplitLBIError(f"recipe {recipe.path}: [{recipe.scale}.subnet] penalties must be from group, l1; "
                            f"got {penalties!r}")
    return list(penalties)


def fig5(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Accuracy against parameters remaining: SplitLBI early stopping + lottery retraining vs the baselines."""
    from splitlbi.plots.curves import Panel, Series
    from splitlbi.plots.style import method_color, method_name

    experiments = [_subnetworks(ws, recipe, penalty) for penalty in _penalties(recipe)]
    rows = [row for experiment in experiments for row in experiment.results]
    panels = []
    markers = {"splitlbi_lottery": "*", "sgd_lottery": "o", "network_slimming": "s", "soft_filter_pruning": "^",
               "scratch_e": "v", "scratch_b": "D"}
    names = {"splitlbi_lottery": "SplitLBI (Lottery)", "sgd_lottery": "SGD (Lottery)"}
    for experiment in experiments:
        weights = experiment.penalty == "l1"
        panel = Panel("Weight sparsity" if weights else "Filter sparsity",
                      "weights remaining (%)" if weights else "parameters remaining (%)", "test accuracy (%)")
        for method, marker in markers.items():
            points = [r for r in experiment.results if r["method"] == method]
            if not points:
                continue
            x = [100.0 * (r["weights_kept"] if weights else r["params_share"]) for r in points]
            color = method_color("splitlbi" if method == "splitlbi_lottery" else
                                 "lottery" if method == "sgd_lottery" else method)
            panel.series.append(Series(names.get(method, method_name(method)), x, [r["test_acc"] for r in points],
                                       color=color, marker=marker, scatter=True))
        dense = [r for r in experiment.results if r["method"] == "sgd_dense"][0]
        panel.hlines.append(Series("SGD (dense)", [100.0], [dense["test_acc"]], color=method_color("sgd")))
        panels.append(panel)
    config = recipe.train_config()
    ks = ", ".join(str(k) for k in recipe.section("subnet")["epochs"])
    paths = _draw(panels, out, "Early stopping + retraining against pruning baselines (Fig. 5)",
                  _scale_note(recipe, f"masks from epoch K = {ks} of {config.epochs}; first seed"))
    return paths + _write_results(rows, out.with_name(out.stem + "_table.csv"))


def fig7(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """F-epoch K fine-tuning curves against the dense model; SplitLBI (Lottery) against SGD (Lottery)."""
    from splitlbi.plots.curves import Panel, Series
    from splitlbi.plots.style import method_color

    experiment = _subnetworks(ws, recipe, "group", baselines=False)
    sub = recipe.section("subnet")
    base = recipe.train_config(seed=recipe.seeds[0])
    settings = _retrain_settings(recipe, base, "finetune")
    dense = read_metric_columns(experiment.splitlbi)
    finetune = Panel("Fine-tuning from epoch K (F-epoch K)", "epoch", "test accuracy (%)")
    finetune.series.append(Series("SplitLBI dense W", dense["epoch"], dense["test_acc"],
                                  color=method_color("splitlbi")))
    finetune.series.append(Series("SplitLBI sparse (no fine-tuning)", dense["epoch"], dense["sparse_test_acc"],
                                  color=method_color("splitlbi"), style=":"))
    import matplotlib

    colormap = matplotlib.colormaps["autumn"]
    epochs = [int(k) for k in sub.get("finetune_from", sub["epochs"])]
    for index, epoch in enumerate(epochs):
        run = _retrain_job(ws, f"{experiment.splitlbi.name}-finetune-K{epoch}", experiment.splitlbi, "finetune",
                           settings, epoch=epoch)
        metrics = read_metric_columns(run)
        # Starts from the sparse model at K (W_K on the support of Γ_K), as the dotted curve has it.
        start = dense["sparse_test_acc"][dense["epoch"].index(epoch)]
        finetune.series.append(Series(f"F-epoch {epoch}", [float(epoch)] + [epoch + e for e in metrics["epoch"]],
                                      [start] + metrics["test_acc"],
                                      color=colormap(index / max(1, len(epochs) - 1) * 0.8)))
    lottery = Panel("Lottery retraining from the initialization", "retraining epoch", "test accuracy (%)")
    sgd = read_metric_columns(experiment.sgd)
    lottery.series.append(Series("SGD (dense)", sgd["epoch"], sgd["test_acc"], color=method_color("sgd")))
    for epoch, run in experiment.lottery.items():
        metrics = read_metric_columns(run)
        lottery.series.append(Series(f"SplitLBI (Lottery), K={epoch}", metrics["epoch"], metrics["test_acc"],
                                     color=method_color("splitlbi"), marker="*" if len(experiment.lottery) == 1
                                     else None))
        metrics = read_metric_columns(experiment.sgd_lottery[epoch])
        lottery.series.append(Series(f"SGD (Lottery), K={epoch}", metrics["epoch"], metrics["test_acc"],
                                     color=method_color("lottery"), style="--"))
    return _draw([finetune, lottery], out, "Fine-tuning and lottery retraining of sparse sub-networks (Fig. 7)",
                 _scale_note(recipe, f"fine-tuning {settings['epochs']} epochs at lr {settings['lr']:g}; first seed"))


# --------------------------------------------------------------------------- fig 1, fig 2, table 1


def fig1(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """LeNet-5 filter-norm paths of conv c5 under SplitLBI and SGD (same initialization), and activation
    maximization of selected and unselected filters of both runs at ``[fig1] epochs``."""
    from splitlbi.experiments.demo import LAYER, visualized_epochs
    from splitlbi.plots.filters import plot_selected_filters
    from splitlbi.plots.path import make_filter_path_figure, read_filter_paths
    from splitlbi.plots.style import save_figure

    base = recipe.train_config()
    options = recipe.sections.get("fig1", {})
    layer = str(options.get("layer", LAYER))
    epochs = [int(e) for e in options.get("epochs", visualized_epochs(base))]
    if not epochs or min(epochs) < 0 or max(epochs) > base.epochs:
        raise SplitLBIError(f"recipe {recipe.path}: [{recipe.scale}.fig1] epochs must lie in 0..{base.epochs}")
    runs = [_train(ws, dataclasses.replace(base, optimizer=name)) for name in ("splitlbi", "sgd")]
    figure = make_filter_path_figure(runs, layer, title=f"Filter paths of {layer} (Fig. 1)\n"
                                      + textwrap.fill(_scale_note(recipe), 110))
    png = save_figure(figure, out, pdf=True)
    rows = []
    for name, run in zip(("splitlbi", "sgd"), runs):
        paths = read_filter_paths(run, layer)
        for e_index, epoch in enumerate(paths.epochs):
            for f in range(paths.norms.shape[1]):
                selected = "" if paths.final_support is None else int(paths.final_support[f])
                rows.append([name, int(epoch), f, f"{paths.norms[e_index, f]:.6g}", selected])
    atomic_write_csv(out.with_suffix(".csv"), ["run", "epoch", "filter", "w_norm", "selected_at_end"], rows)
    shown = dict(layer=layer, epochs=epochs, per_group=int(options.get("per_group", 12)),
                 steps=int(options.get("steps", 100)), progress=ws.progress)
    filters = [plot_selected_filters(runs[0], out=out.with_name(out.stem + "_filters.png"), **shown),
               plot_selected_filters(runs[1], out=out.with_name(out.stem + "_filters_sgd.png"), support_from=runs[0],
                                     **shown)]
    return [png, out.with_suffix(".pdf"), out.with_suffix(".csv")] + [path for png in filters
                                                                      for path in (png, png.with_suffix(".csv"))]


def fig2(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Guided backpropagation of the first conv layer's filters at several epochs: SGD vs SplitLBI per κ."""
    import torch

    from splitlbi.data.datasets import normalize
    from splitlbi.plots.filters import load_model_at
    from splitlbi.plots.guided import first_conv_block, guided_backprop_responses, plot_guided_backprop
    from splitlbi.train import run as run_module
    from splitlbi.train.run import read_run_config

    options = recipe.section("fig2", ["kappa", "epochs"])
    base = recipe.train_config()
    epochs = [int(e) for e in options["epochs"]]
    if max(epochs) > base.epochs or min(epochs) < 1:
        raise SplitLBIError(f"recipe {recipe.path}: [{recipe.scale}.fig2] epochs must lie in 1..{base.epochs}")
    runs = {"SGD": _train(ws, dataclasses.replace(base, optimizer="sgd"))}
    for kappa in options["kappa"]:
        runs[f"SplitLBI (κ={float(kappa):g})"] = _train(ws, dataclasses.replace(base, optimizer="splitlbi",
                                                                                  kappa=float(kappa)))
    count = int(options.get("images", 1))
    data = run_module._load_data(dataclasses.replace(ws.config(base), limit_train=1, limit_test=count),
                                 torch.device("cpu"))
    images = normalize(data.test_images, data.mean, data.std)
    first = first_conv_block(load_model_at(runs["SGD"], epochs[0], read_run_config(runs["SGD"])), images[:1])
    filters = list(range(min(int(options.get("filters", 16)), first[0].out_channels)))
    responses = {}
    for label, run in runs.items():
        config = read_run_config(run)
        for epoch in epochs:
            responses[(label, epoch)] = guided_backprop_responses(load_model_at(run, epoch, config), images, filters)
    return plot_guided_backprop(responses, images, out, filters=filters,
                                title="Guided backpropagation of the first conv layer (Fig. 2)\n"
                                      + textwrap.fill(_scale_note(recipe), 70))


def table1(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Table 1 from :func:`compare` runs (written to ``OUT/table1``)."""
    from splitlbi.experiments.compare import TABLE_CSV, TABLE_MD, compare

    options = recipe.section("table", ["variants"])
    settings = {k: v for k, v in ws.config(recipe.train_config()).to_dict().items()
                if k not in ("optimizer", "momentum", "nesterov", "weight_decay", "seed")}
    compare(ws.out / "table1", options["variants"], recipe.seeds, weight_decay=float(options.get("weight_decay", 5e-4)),
            layer=options.get("layer"), log=ws.say, **settings)
    paths = []
    for name in (TABLE_MD, TABLE_CSV):
        target = out.with_suffix(Path(name).suffix)
        shutil.copyfile(ws.out / "table1" / name, target)
        paths.append(target)
    return paths


def prune_bench(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """The pruning benchmark at a MACs budget (:mod:`splitlbi.experiments.prune_bench`)."""
    from splitlbi.experiments.prune_bench import prune_bench as run_bench

    return run_bench(ws, recipe, out)


def resnet_path(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """The path of a residual BatchNorm network in a regime where it forms (:mod:`splitlbi.experiments.path_study`)."""
    from splitlbi.experiments.path_study import path_study

    return path_study(ws, recipe, out)


FIGURE_FUNCTIONS: Dict[str, Callable[[Workspace, Recipe, Path], List[Path]]] = {
    "fig1": fig1, "fig2": fig2, "fig3": fig3, "fig4": fig4, "fig5": fig5, "fig6": fig6, "fig7": fig7,
    "fig8": fig8, "table1": table1, "prune-bench": prune_bench, "resnet-path": resnet_path,
}


# --------------------------------------------------------------------------- checked before any run


def _require(condition: bool, recipe: Recipe, table: str, message: str) -> None:
    if not condition:
        raise SplitLBIError(f"recipe {recipe.path} [{recipe.scale}.{table}]: {message}")


def check_figure_settings(recipe: Recipe) -> None:
    """Refuse (one line) the figure-specific settings of ``recipe`` that would fail only
    after its runs trained: ``fig1.layer`` / ``fig1.steps``, the epochs K of
    ``subnet.epochs`` and ``subnet.finetune_from`` (within the run, with a kept
    checkpoint), the retraining settings and the baselines of ``[subnet]``, ``[fig2]``."""
    from splitlbi.models import create_model

    base = recipe.train_config()
    epochs = base.epochs
    if recipe.figure == "fig1":
        from torch import nn

        from splitlbi.experiments.demo import LAYER

        options = recipe.sections.get("fig1", {})
        layer = options.get("layer", LAYER)
        model = create_model(base.model, num_classes=10, in_channels=1)  # layer names do not depend on either
        layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
        _require(layer in layers, recipe, "fig1", f"layer {layer!r} is not a conv or linear layer of {base.model} "
                                                  f"({', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''})")
        _require(int(options.get("steps", 100)) >= 0, recipe, "fig1", "steps must be >= 0")
    if recipe.figure in ("fig5", "fig7"):
        sub = recipe.section("subnet", ["epochs"])
        for key in ("epochs", "finetune_from"):
            ks = sub.get(key, sub["epochs"])
            _require(bool(ks) and all(1 <= k <= epochs for k in ks), recipe, "subnet",
                     f"{key} must be epochs K from 1 to the runs' {epochs}, got {ks}")
        kept = [k for k in sub.get("finetune_from", sub["epochs"]) if k % base.save_every and k != epochs]
        _require(recipe.figure != "fig7" or not kept, recipe, "subnet",
                 f"finetune_from {kept} have no checkpoint (train.save_every = {base.save_every})")
        for key in ("retrain_epochs", "finetune_epochs"):
            _require(sub.get(key, 1) >= 1, recipe, "subnet", f"{key} must be >= 1, got {sub.get(key)}")
        for key in ("retrain_lr", "finetune_lr", "l1_lam"):
            value = sub.get(key, 1.0)
            _require(math.isfinite(value) and value > 0, recipe, "subnet", f"{key} must be a number > 0, got {value}")
        for key in ("retrain_milestones", "finetune_milestones"):
            value = sub.get(key, [1])
            _require(all(m >= 1 for m in value) and value == sorted(set(value)), recipe, "subnet",
                     f"{key} must be increasing epochs >= 1, got {value}")
        unknown = sorted(set(sub.get("baselines", [])) - {"slimming", "sfp", "scratch-e", "scratch-b"})
        _require(not unknown, recipe, "subnet", f"unknown baselines {unknown} (slimming, sfp, scratch-e, scratch-b)")
        _penalties(recipe)
    if recipe.figure == "fig2":
        options = recipe.section("fig2", ["kappa", "epochs"])
        _require(bool(options["epochs"]) and all(1 <= e <= epochs for e in options["epochs"]), recipe, "fig2",
                 f"epochs must lie in 1..{epochs}, got {options['epochs']}")
        _require(bool(options["kappa"]) and all(k > 0 for k in options["kappa"]), recipe, "fig2",
                 f"kappa must be numbers > 0, got {options['kappa']}")
        for key in ("images", "filters"):
            _require(options.get(key, 1) >= 1, recipe, "fig2", f"{key} must be >= 1, got {options.get(key)}")


# --------------------------------------------------------------------------- entry point


def remove_stale_figure_temporaries(folder: Path, before: float) -> List[Path]:
    """Delete the temporaries of atomic writes into ``folder`` made before ``before`` (a time.time()):
    a process killed while writing a figure left them. Another reproduction sharing the folder
    writes its temporaries after this one began its figure, so they are left alone."""
    removed = []
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
            try:
                if path.stat().st_mtime < before:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # its writer renamed it meanwhile
                continue
    return removed


def reproduce(figures: Sequence[str], scale: str = "smoke", out_dir: Optional[Path] = None, *,
              data_dir: Optional[str] = None, device: str = "auto", progress: bool = True,
              overrides: Sequence[str] = (), recipe_file: Optional[Path] = None, reuse: Sequence[Path] = (),
              log: Log = print) -> List[Path]:
    """Run what ``figures`` need at ``scale`` (skipping finished runs) and draw them; return the files written.

    Args:
        figures: names from :data:`~splitlbi.experiments.recipes.FIGURES`, or ``["all"]``.
        scale: a scale of the recipes (``smoke``, ``cpu``, ``paper``).
        out_dir: the reproduction folder (default ``reproduce-<scale>``): ``runs/``, ``masks/``,
            ``figures/``.
        overrides: ``SECTION.KEY=VALUE`` recipe changes (``--set``).
        recipe_file: a recipe file to use instead of the bundled one (one figure only).
        reuse: finished ``splitlbi train`` run directories to copy in where a needed run has
            exactly their settings (``--reuse``).
    """
    say = log if log is not None else (lambda line: None)
    names = list(FIGURES) if list(figures) == ["all"] else list(figures)
    unknown = [name for name in names if name not in FIGURE_FUNCTIONS]
    if unknown or not names:
        raise SplitLBIError(f"unknown figure {', '.join(unknown) or '(none)'} (choose from "
                            f"{', '.join(EXPERIMENTS)} or all)")
    if recipe_file is not None and len(names) != 1:
        raise SplitLBIError("--recipe takes one figure")
    recipes = [load_recipe(name, scale, path=recipe_file, overrides=overrides) for name in names]
    for recipe in recipes:  # bad settings fail now, not after hours of other figures
        check_figure_settings(recipe)
    out = Path(out_dir) if out_dir is not None else Path(f"reproduce-{scale}")
    ws = Workspace(out, data_dir=data_dir, device=device, progress=progress, log=say, reuse=reuse)
    written: List[Path] = []
    started = time.perf_counter()
    for recipe in recipes:
        say(f"== {recipe.figure} ({recipe.title}), scale {scale}")
        target = out / FIGURES_DIR / f"{recipe.figure}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        began = time.time()
        files = FIGURE_FUNCTIONS[recipe.figure](ws, recipe, target)
        remove_stale_figure_temporaries(target.parent, began)
        for path in files:
            say(f"wrote {path}")
        written.extend(files)
    runs = f": runs {ws.summary()}" if ws.counts else ""  # table1's runs are compare's, reported above
    say(f"done in {time.perf_counter() - started:.0f}s{runs}")
    return written
