"""``splitlbi reproduce prune-bench``: sub-networks at a MACs budget, SplitLBI against the standard criteria.

Every method gets the same total epoch budget ``E + F`` and the same initialization per
seed (the runs of one seed all start from the ``init.pt`` that ``--seed`` draws; Scratch-E
is the exception by definition: a fresh init, seed + 1). Every mask is made by
:func:`splitlbi.prune.budget.budget_masks`, so each method's network, compacted for real,
keeps at most the target share of the dense MACs (within 2 points). The methods:

* ``splitlbi_finetune`` (F-epoch K): SplitLBI trained K epochs; filters ranked by the path
  score ``‖V_g‖/λ`` at K (:func:`~splitlbi.prune.budget.path_scores`), budget mask;
  train the masked network from ``W_K`` for the remaining ``E + F − K`` epochs;
  ``splitlbi_lottery``: the same mask, weights reset to the run's init, ``E + F − K``
  epochs. The K epochs before pruning are the only dense ones: ``epochs_saved = E − K``
  dense epochs against the SGD pipeline (``train_cost`` counts dense-epoch equivalents).
* On the SGD network after E epochs, Torch-Pruning importances, then F epochs of
  fine-tuning with the mask fixed: ``l1`` / ``l2`` (``MagnitudeImportance(p=1|2)``),
  ``taylor`` (``TaylorImportance``, gradients of a few training batches), ``random``
  (``RandomImportance``, the floor).
* With their own sparsity training (E epochs from the same init), then prune + F:
  ``bn_scale`` (Network Slimming: L1 on the BatchNorm scales, ``BNScaleImportance``;
  models with BatchNorm only) and ``group_norm`` (DepGraph: ``GroupNormPruner``'s
  group regularization, ``GroupMagnitudeImportance(p=2)``).
* ``sfp``: Soft Filter Pruning for E + F epochs at the per-layer keep ratio whose
  compacted network meets the budget; ``scratch_e``: the SplitLBI sub-network's
  architecture (default variant) trained from a fresh init for E + F epochs.
* ``sgd_dense``: the reference, SGD E epochs then F with nothing pruned.

Learning rates: the training schedule (``[train]``: lr, milestones < E, γ) for the first
E epochs, then one more step of the schedule (lr × γ) for the F fine-tuning epochs. A
run of E + F epochs (SFP, Scratch-E, SplitLBI's post-pruning training) follows the same
per-epoch schedule, with a milestone at E.

Item 6 of issue 10 (variants): every ``bench.k`` × ``bench.normalize`` pair is pruned at
every budget and evaluated before any training (cheap); at ``bench.variant_budgets`` the
variants one change away from the default (each normalization at the first K, each K at
the first normalization) are also trained (F-epoch K). The first K and normalization are
the default variant, drawn in the plot and trained at every budget.

Writes ``figures/prune_bench.csv`` (one row per method, model, budget, seed, variant),
``prune_bench.png|pdf`` (test accuracy against MACs kept, mean ± std over seeds, one panel
per model) and ``prune_bench.md`` (the summary tables).
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.experiments.recipes import Recipe
from splitlbi.experiments.workspace import Workspace, config_settings
from splitlbi.train.config import TrainConfig
from splitlbi.utils.io import atomic_write_csv, atomic_write_text

__all__ = ["METHODS", "CSV_COLUMNS", "BenchSettings", "bench_settings", "prune_bench", "schedule_after",
           "summarize"]

#: Methods in plot order; the first two are SplitLBI's.
METHODS: Tuple[str, ...] = ("splitlbi_finetune", "splitlbi_lottery", "l1", "l2", "bn_scale", "group_norm",
                            "taylor", "random", "sfp", "scratch_e")
_TP_METHODS = ("l1", "l2", "taylor", "random")
NAMES = {"splitlbi_finetune": "SplitLBI path (F-epoch K)", "splitlbi_lottery": "SplitLBI path (Lottery)",
         "l1": "L1 magnitude (TP)", "l2": "L2 magnitude (TP)", "bn_scale": "BN scale / Network Slimming (TP)",
         "group_norm": "Group norm + sparse training (DepGraph, TP)", "taylor": "Taylor (TP)",
         "random": "Random (TP)", "sfp": "Soft Filter Pruning", "scratch_e": "Scratch-E", "sgd_dense": "SGD (dense)"}
CSV_COLUMNS = ("method", "model", "target_macs", "seed", "K", "normalize", "default_variant", "macs", "params",
               "macs_share", "params_share", "test_acc", "sparse_acc_before_finetune", "epochs_trained",
               "epochs_saved", "train_cost", "run")
CSV_NAME = "prune_bench.csv"


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass
class BenchSettings:
    """The ``[scale.bench]`` table, checked."""

    models: List[str]
    budgets: List[float]         #: every budget of any model, in recipe order
    train_epochs: int            #: E
    finetune_epochs: int         #: F
    k: List[int]                 #: SplitLBI epochs K (first: default)
    normalize: List[str]         #: path-score normalizations of budget_masks (first: default)
    variant_budgets: Dict[str, List[float]]  #: model -> budgets where variants are trained
    model_budgets: Dict[str, List[float]]    #: model -> its budgets (fractions of the dense MACs kept)
    methods: List[str]
    ranking: str = "global"
    taylor_batches: int = 4
    slimming_lambda: float = 1e-4
    group_norm_reg: float = 1e-4
    group_norm_every: Dict[str, int] = dataclasses.field(default_factory=dict)  #: model -> steps (default 1)
    #: train SGD and SplitLBI for the whole E + F epochs (the schedule's step at E included) and take
    #: their checkpoints at E and K: SGD's run is then the dense reference itself, and the runs are those
    #: of ``splitlbi reproduce resnet-path`` (the same settings share a workspace's runs)
    full_runs: bool = False
    #: how far (points) below dense SGD the goal lets SplitLBI's sub-network be (issue 10: 0.5; issue 20: 0.3)
    goal_margin: float = 0.5


def bench_settings(recipe: Recipe) -> BenchSettings:
    """Read and check ``[scale.bench]`` and the ``[scale.model.NAME]`` tables it names."""
    bench = recipe.section("bench", ["models", "budgets", "train_epochs", "finetune_epochs", "k", "normalize"])
    where = f"recipe {recipe.path}: [{recipe.scale}.bench]"

    def numbers(key: str, kind: type, low: float, high: float, values: Any = None) -> list:
        values = bench.get(key) if values is None else values
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and low < v <= high for v in values) \
                or (kind is int and not all(isinstance(v, int) for v in values)):
            raise SplitLBIError(f"{where} {key} must be a non-empty list of numbers in ({low:g}, {high:g}], "
                                f"got {values!r}")
        return [kind(v) for v in values]

    models = bench["models"]
    tables = recipe.sections.get("model", {})
    if not isinstance(models, list) or not models or any(m not in tables for m in models):
        raise SplitLBIError(f"{where} models must name [{recipe.scale}.model.NAME] tables (have: "
                            f"{', '.join(tables) or 'none'}), got {models!r}")
    for key in ("train_epochs", "finetune_epochs"):
        if not isinstance(bench[key], int) or bench[key] < 1:
            raise SplitLBIError(f"{where} {key} must be an integer >= 1, got {bench[key]!r}")
    epochs = int(bench["train_epochs"])
    # budgets: a list for every model, or a table {model = [...]} (every model named).
    given_budgets = bench["budgets"]
    if isinstance(given_budgets, dict):
        if set(models) - set(given_budgets):
            raise SplitLBIError(f"{where} budgets as a table must name every model of models {models}, "
                                f"got {sorted(given_budgets)}")
        model_budgets = {name: numbers("budgets", float, 0.0, 1.0, given_budgets[name]) for name in models}
    else:
        model_budgets = {name: numbers("budgets", float, 0.0, 1.0) for name in models}
    budgets = list(dict.fromkeys(b for name in models for b in model_budgets[name]))
    # variant_budgets: a list for every model, or a table {model = [...]} (a model not named: none).
    given = bench.get("variant_budgets", budgets[:1])
    table = given if isinstance(given, dict) else {name: given for name in models}
    variant_budgets: Dict[str, List[float]] = {}
    for name in models:
        values = table.get(name, [])
        if not isinstance(values, list) or not set(values) <= set(model_budgets[name]):
            raise SplitLBIError(f"{where} variant_budgets must be among the budgets of {name} "
                                f"{model_budgets[name]}, got {given!r}")
        variant_budgets[name] = [float(b) for b in values]
    k = numbers("k", int, 0, epochs)
    from splitlbi.prune.budget import NORMALIZATIONS

    normalize = bench["normalize"]
    if not isinstance(normalize, list) or not normalize or set(normalize) - set(NORMALIZATIONS):
        raise SplitLBIError(f"{where} normalize must be a list from {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    methods = list(bench.get("methods", METHODS))
    if set(methods) - set(METHODS):
        raise SplitLBIError(f"{where} unknown methods {sorted(set(methods) - set(METHODS))} "
                            f"(choose from {', '.join(METHODS)})")
    ranking = str(bench.get("ranking", "global"))
    if ranking not in ("global", "uniform"):
        raise SplitLBIError(f"{where} ranking must be global or uniform, got {ranking!r}")
    settings = BenchSettings(models=list(models), budgets=budgets, train_epochs=epochs,
                             finetune_epochs=int(bench["finetune_epochs"]), k=k, normalize=list(normalize),
                             variant_budgets=variant_budgets, model_budgets=model_budgets, methods=methods, ranking=ranking,
                             taylor_batches=int(bench.get("taylor_batches", 4)),
                             slimming_lambda=float(bench.get("slimming_lambda", 1e-4)),
                             group_norm_reg=float(bench.get("group_norm_reg", 1e-4)),
                             group_norm_every=_per_model(bench.get("group_norm_every", 1), models, where),
                             full_runs=bool(bench.get("full_runs", False)),
                             goal_margin=_goal_margin(bench.get("goal_margin", 0.5), where))
    for name in models:
        base = model_config(recipe, name)
        if settings.full_runs:
            if any(m >= epochs + settings.finetune_epochs for m in base.lr_milestones):
                raise SplitLBIError(f"recipe {recipe.path}: [{recipe.scale}.model.{name}] lr_milestones must be < "
                                    f"train_epochs + finetune_epochs ({epochs + settings.finetune_epochs})")
            continue
        if any(m >= epochs for m in base.lr_milestones):
            raise SplitLBIError(f"recipe {recipe.path}: [{recipe.scale}.model.{name}] lr_milestones must be < "
                                f"train_epochs ({epochs}): fine-tuning is the schedule's next step")
    return settings


def _goal_margin(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise SplitLBIError(f"{where} goal_margin must be a number of points from 0 to 100, got {value!r}")
    return float(value)


def _per_model(value: Any, models: Sequence[str], where: str) -> Dict[str, int]:
    """``group_norm_every``: one integer for every model, or a table ``{model = n}`` (missing: 1)."""
    table = value if isinstance(value, dict) else {name: value for name in models}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in table.values()):
        raise SplitLBIError(f"{where} group_norm_every must be an integer >= 1 or a table of them, got {value!r}")
    return {name: int(table.get(name, 1)) for name in models}


def model_config(recipe: Recipe, name: str, **changes: Any) -> TrainConfig:
    """``[train]`` updated by ``[model.NAME]`` and ``changes``."""
    table = recipe.sections.get("model", {}).get(name)
    if not isinstance(table, dict):
        raise SplitLBIError(f"recipe {recipe.path} has no [{recipe.scale}.model.{name}] table")
    return recipe.train_config(**{**table, **changes})


def lr_after(config: TrainConfig, epochs: int) -> float:
    """The step schedule's learning rate for the epoch after ``epochs`` epochs."""
    return config.lr * config.lr_gamma ** sum(1 for m in config.lr_milestones if m <= epochs)


def schedule_after(config: TrainConfig, start: int, train_epochs: int, extra_step: bool = True) -> Dict[str, Any]:
    """``lr``, ``lr_milestones``, ``lr_gamma`` of a run that continues ``config``'s schedule at epoch
    ``start`` and (``extra_step``) takes one more step (×γ) after epoch ``train_epochs`` (where
    fine-tuning starts); without it the schedule's own milestones continue (``full_runs``)."""
    steps = list(config.lr_milestones) + ([train_epochs] if extra_step else [])
    milestones = sorted(m - start for m in steps if m > start)
    return {"lr": lr_after(config, start) * (config.lr_gamma if extra_step and start >= train_epochs else 1.0),
            "lr_milestones": milestones, "lr_gamma": config.lr_gamma}


# --------------------------------------------------------------------------- units of work


class _Bench:
    """The runs of one model and one seed (each a workspace job: done once, skipped later)."""

    def __init__(self, ws: Workspace, recipe: Recipe, settings: BenchSettings, model: str, seed: int) -> None:
        self.ws, self.recipe, self.s, self.seed = ws, recipe, settings, seed
        self.base = model_config(recipe, model, seed=seed)
        self.E, self.F = settings.train_epochs, settings.finetune_epochs
        self.rows: List[Dict[str, Any]] = []
        self._info: Optional[Dict[str, Any]] = None
        self._test_data: Any = None
        self.sgd = Path()
        self.lbi: Optional[Path] = None
        self.sparse_runs: Dict[str, Path] = {}

    # ------------------------------------------------------------- plumbing
    def say(self, line: str) -> None:
        self.ws.say(line)

    @property
    def info(self) -> Dict[str, Any]:
        assert self._info is not None
        return self._info

    def example(self) -> Tensor:
        size = self.info["image_size"]
        shape = [size, size] if isinstance(size, int) else list(size)
        return torch.zeros(1, self.info["in_channels"], *shape)

    def train(self, optimizer: str, epochs: int) -> Path:
        from splitlbi.experiments.reproduce import _label

        # Every epoch kept: SplitLBI's K and SGD's E need their checkpoints (save_every is not hashed).
        config = dataclasses.replace(self.base, optimizer=optimizer, epochs=epochs, save_every=1)
        if self.s.full_runs:  # the whole schedule of E + F epochs, its milestones as given
            config = dataclasses.replace(config, epochs=self.E + self.F)
        return self.ws.train(config, _label(config))

    def whole_schedule(self) -> Tuple[int, ...]:
        """The milestones of a run of E + F epochs: the schedule's, and its step at E unless ``full_runs``
        (whose schedule already covers E + F)."""
        return tuple(self.base.lr_milestones) + (() if self.s.full_runs else (self.E,))

    def after(self, start: int) -> Dict[str, Any]:
        """The schedule of a retraining that continues the training schedule at epoch ``start``."""
        return schedule_after(self.base, start, self.E, extra_step=not self.s.full_runs)

    def retrain(self, label: str, source: Path, mode: str, epoch: Optional[int], masks: Path, epochs: int,
                schedule: Dict[str, Any]) -> Path:
        from splitlbi.prune.retrain import retrain

        settings = dict(epochs=epochs, batch_size=self.base.batch_size, momentum=self.base.momentum,
                        weight_decay=self.base.weight_decay, seed=self.seed, **schedule)
        spec = {"kind": "retrain", "mode": mode, "source": source.name, "epoch": epoch, "masks": masks.name,
                "settings": settings}
        return self.ws.job(label, spec, lambda out: retrain(
            source, out, mode=mode, epoch=epoch, masks=masks, device=self.ws.device, progress=self.ws.progress,
            log=None, **settings))

    def accuracy_before(self, label: str, source: Path, epoch: int, masks: Path) -> float:
        """Test accuracy of the network compacted from ``W_epoch`` and the mask, no training (kept in
        ``masks/<label>-acc.json``): what ``splitlbi compact`` builds (:func:`~splitlbi.prune.compact_model`)."""
        import json

        from splitlbi.data.datasets import normalize
        from splitlbi.prune import read_mask_file
        from splitlbi.prune.compact import compact_model
        from splitlbi.train.loop import evaluate

        def make(path: Path) -> None:
            model = self.model_at(source, epoch)
            filters = {name: mask for name, mask in read_mask_file(masks)["masks"].items() if mask.dim() == 4}
            data = self.test_data()
            compact, _ = compact_model(model, filters, normalize(data.test_images[:1], data.mean, data.std),
                                       measure=False)
            test = evaluate(compact, data.test_images, data.test_labels, batch_size=self.base.eval_batch_size,
                            mean=data.mean, std=data.std)
            atomic_write_text(path, json.dumps({"test_acc": test.accuracy, "source": source.name, "epoch": epoch,
                                                "masks": masks.name, "network": "compact"}))

        return float(json.loads(self.ws.file(f"{label}-compact-acc.json", make).read_text())["test_acc"])

    def test_data(self) -> Any:
        """The test set of the runs (loaded once)."""
        from splitlbi.train import run as run_module

        if self._test_data is None:
            config = dataclasses.replace(self.ws.config(self.base), limit_train=1)
            self._test_data = run_module._load_data(config, torch.device("cpu"))
        return self._test_data

    def model_at(self, run: Path, epoch: int) -> nn.Module:
        from splitlbi.train.run import load_model_from_run

        return load_model_from_run(run, epoch).eval()

    def mask_file(self, name: str, make_masks: Callable[[], Dict[str, Tensor]], source: Path,
                  epoch: Optional[int], kind: str) -> Path:
        """A budget mask saved as an architecture mask file (filters, their biases and BN channels)."""
        from splitlbi.prune import save_mask_file
        from splitlbi.train.rundir import create_run_model
        from splitlbi.prune.baselines import architecture_masks

        def make(path: Path) -> None:
            masks = make_masks()
            model = create_run_model(self.info)
            save_mask_file(path, architecture_masks(model, masks, self.example()), model=self.info["model"],
                           epoch=epoch, source=source, kind=kind)

        return self.ws.file(name, make)

    def budget(self, model: nn.Module, scores: Any, target: float, **options: Any) -> Dict[str, Tensor]:
        from splitlbi.prune.budget import budget_masks

        result = budget_masks(model, self.example(), scores, macs=target, ranking=self.s.ranking, **options)
        return {name: mask for name, mask in result.masks.items() if mask.dim() == 4}

    def facts(self, mask: Optional[Path]) -> Dict[str, Any]:
        """MACs and parameters of the compacted network of ``mask`` (kept in ``masks/``: compaction is slow)."""
        import json

        from splitlbi.experiments.reproduce import mask_facts

        if mask is None:
            return mask_facts(None, self.example().shape[1:], self.info)
        name = f"{mask.parent.name}-{mask.stem}-facts.json" if mask.name == "mask.pt" else f"{mask.stem}-facts.json"
        path = self.ws.file(name, lambda path: atomic_write_text(path, json.dumps(
            mask_facts(mask, self.example().shape[1:], self.info))))
        return json.loads(path.read_text())

    def record(self, method: str, target: float, run: Optional[Path], mask: Optional[Path], *,
               test_acc: Optional[float] = None, before: Optional[float] = None, k: Optional[int] = None,
               normalize: Optional[str] = None, default: bool = True, dense_epochs: float = 0.0) -> None:
        """One CSV row; ``dense_epochs``: epochs trained on the whole network (the rest is sparse)."""
        from splitlbi.train.runfiles import read_metric_columns

        facts = self.facts(mask)
        if test_acc is None and run is not None:
            test_acc = read_metric_columns(run)["test_acc"][-1]
        total = self.E + self.F
        self.rows.append({
            "method": method, "model": self.info["model"], "target_macs": target, "seed": self.seed, "K": k,
            "normalize": normalize, "default_variant": int(default), "macs": facts["macs"],
            "params": facts["params"], "macs_share": facts["macs_share"], "params_share": facts["params_share"],
            "test_acc": test_acc, "sparse_acc_before_finetune": before, "epochs_trained": total,
            "epochs_saved": None if k is None else self.E - k,
            "train_cost": dense_epochs + (total - dense_epochs) * facts["macs_share"],
            "run": run.name if run is not None else ""})

    # ------------------------------------------------------------- the experiment
    def setup(self) -> None:
        """The runs every budget shares: SGD, SplitLBI, the dense reference, the sparsity trainings."""
        from splitlbi.train.run import read_run_config

        E, F = self.E, self.F
        sgd = self.sgd = self.train("sgd", E)
        self._info = read_run_config(sgd)
        if {"splitlbi_finetune", "splitlbi_lottery", "scratch_e"} & set(self.s.methods):
            def splitlbi() -> None:
                self.lbi = self.train("splitlbi", max(self.s.k))
            _unless_unfinished(splitlbi, self.say)

        def dense() -> None:
            if self.s.full_runs:  # SGD trained for E + F epochs is the dense reference
                self.record("sgd_dense", 1.0, sgd, None, dense_epochs=E + F)
                return
            mask = self.mask_file(f"{sgd.name}-dense.pt", lambda: {
                name: torch.ones_like(p, dtype=torch.bool) for name, p in self.model_at(sgd, E).named_parameters()
                if p.dim() == 4}, sgd, E, "dense")
            run = self.retrain(f"{sgd.name}-dense-F{F}", sgd, "finetune", E, mask, F, self.after(E))
            self.record("sgd_dense", 1.0, run, None, dense_epochs=E + F)
        _unless_unfinished(dense, self.say)
        self.sparse_runs = self.sparsity_runs()

    def at(self, target: float) -> None:
        """Every method at one budget (``setup`` first). Under ``report_only`` a method whose runs are not
        finished is left out."""
        E, F, lbi = self.E, self.F, self.lbi
        self.say(f"-- {self.info['model']} seed {self.seed}: {100 * target:g}% of the MACs")
        parts: List[Callable[[], None]] = []
        if lbi is not None:
            parts.append(lambda: self.splitlbi(lbi, target))
        parts += [lambda m=method: self.criterion(m, self.sgd, target) for method in _TP_METHODS
                  if method in self.s.methods]
        parts += [lambda m=method, r=run: self.criterion(m, r, target) for method, run in self.sparse_runs.items()]
        if "sfp" in self.s.methods:
            parts.append(lambda: self.sfp(target))
        if "scratch_e" in self.s.methods and lbi is not None:
            def scratch() -> None:
                mask = self.splitlbi_mask(lbi, self.s.k[0], self.s.normalize[0], target)
                config = dataclasses.replace(self.base, epochs=E + F, optimizer="sgd",
                                             lr_milestones=self.whole_schedule())
                run = self.baseline("scratch-e", f"{self.info['model']}-scratch-e-{mask.stem}", config, masks=mask)
                self.record("scratch_e", target, run, run / "mask.pt")
            parts.append(scratch)
        for part in parts:
            _unless_unfinished(part, self.say)

    def sparsity_runs(self) -> Dict[str, Path]:
        """Network Slimming's and DepGraph's sparsity training (E epochs, same init as SGD)."""
        from splitlbi.prune import baselines

        runs: Dict[str, Path] = {}
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model_at_init().modules())
        config = dataclasses.replace(self.base, optimizer="sgd", epochs=self.E)
        if "bn_scale" in self.s.methods:
            if has_bn:
                lam = self.s.slimming_lambda
                spec = {"kind": "bn-sparsity", "config": config_settings(self.ws.config(config)), "lambda": lam}
                _unless_unfinished(lambda: runs.__setitem__("bn_scale", self.ws.job(
                    f"{config.model}-bn-l1-{lam:g}-seed{self.seed}", spec, lambda out: baselines.sparsity_training(
                        self.ws.config(config), out, bn_l1=lam, name="slimming", log=None))), self.say)
            else:
                self.say(f"bn_scale: {config.model} has no BatchNorm, skipped")
        if "group_norm" in self.s.methods:
            reg, every = self.s.group_norm_reg, self.s.group_norm_every.get(config.model, 1)
            spec = {"kind": "group-norm-sparsity", "config": config_settings(self.ws.config(config)), "reg": reg,
                    "every": every}
            _unless_unfinished(lambda: runs.__setitem__("group_norm", self.ws.job(
                f"{config.model}-group-norm-{reg:g}-seed{self.seed}", spec, lambda out: baselines.sparsity_training(
                    self.ws.config(config), out, regularizer=group_norm_regularizer(reg, every), name="group-norm",
                    log=None))), self.say)
        return runs

    def model_at_init(self) -> nn.Module:
        """The seed's initial network (the SGD run's ``init.pt``, shared by every method of the seed)."""
        from splitlbi.train.run import load_model_from_run

        return load_model_from_run(self.sgd, "init").eval()

    def importance(self, method: str, model: nn.Module, run: Path, epoch: int) -> Any:
        import torch_pruning as tp

        if method == "l1":
            return tp.importance.MagnitudeImportance(p=1)
        if method == "l2":
            return tp.importance.MagnitudeImportance(p=2)
        if method == "bn_scale":
            return tp.importance.BNScaleImportance()
        if method == "group_norm":
            return tp.importance.GroupMagnitudeImportance(p=2)
        if method == "random":
            torch.manual_seed(self.seed)
            return tp.importance.RandomImportance()
        if method == "taylor":
            self.taylor_gradients(model, run)  # budget_masks scores a copy; the copy keeps the gradients
            return tp.importance.TaylorImportance()
        raise AssertionError(method)

    def taylor_gradients(self, model: nn.Module, run: Path) -> None:
        """Accumulate the loss gradients of the first ``taylor_batches`` training batches in ``model``."""
        from splitlbi.data.datasets import normalize
        from splitlbi.train import run as run_module

        count = self.s.taylor_batches * self.base.batch_size
        data = run_module._load_data(dataclasses.replace(self.ws.config(self.base), limit_train=count, limit_test=1),
                                     torch.device("cpu"))
        model.zero_grad()
        for start in range(0, data.train_images.shape[0], self.base.batch_size):
            images = normalize(data.train_images[start:start + self.base.batch_size], data.mean, data.std)
            loss = nn.functional.cross_entropy(model(images), data.train_labels[start:start + self.base.batch_size])
            loss.backward()

    def criterion(self, method: str, run: Path, target: float) -> None:
        """Prune the network of ``run`` after E epochs by a Torch-Pruning importance; fine-tune F epochs."""
        E, F = self.E, self.F

        def masks() -> Dict[str, Tensor]:
            model = self.model_at(run, E)
            return self.budget(model, self.importance(method, model, run, E), target)

        mask = self.mask_file(f"{run.name}-{method}-macs{target:g}.pt", masks, run, E, method)
        before = self.accuracy_before(f"{run.name}-{method}-macs{target:g}", run, E, mask)
        tuned = self.retrain(f"{run.name}-{method}-macs{target:g}-F{F}", run, "finetune", E, mask, F,
                             self.after(E))
        self.record(method, target, tuned, mask, before=before, dense_epochs=E)

    def splitlbi_mask(self, lbi: Path, k: int, norm: str, target: float) -> Path:
        from splitlbi.prune.budget import path_scores

        return self.mask_file(f"{lbi.name}-path-K{k}-{norm}-macs{target:g}.pt", lambda: self.budget(
            self.model_at(lbi, k), path_scores(lbi, k), target, normalize=norm), lbi, k, "splitlbi-path")

    def splitlbi(self, lbi: Path, target: float, variants: bool = False) -> None:
        """Every K × normalization at ``target``: the default variant is trained (finetune and lottery);
        the others are evaluated before training, and the ones one change from the default (each
        normalization at the default K, each K at the default normalization) are trained at the
        variant budgets, in a later pass (``variants=True``) so that a stopped run has the main
        comparison at every budget first."""
        E, F = self.E, self.F
        for k in self.s.k:
            for norm in self.s.normalize:
                default = k == self.s.k[0] and norm == self.s.normalize[0]
                trained = default or (target in self.s.variant_budgets[self.base.model]
                                      and (k == self.s.k[0] or norm == self.s.normalize[0]))
                if variants and (default or not trained):
                    continue
                mask = self.splitlbi_mask(lbi, k, norm, target)
                label = f"{lbi.name}-path-K{k}-{norm}-macs{target:g}"
                before = self.accuracy_before(label, lbi, k, mask)
                if not trained:  # the untrained variants still get a row: their accuracy before training
                    self.record("splitlbi_finetune", target, None, mask, test_acc=None, before=before, k=k,
                                normalize=norm, default=False, dense_epochs=k)
                    continue
                if not default and not variants:
                    continue  # trained in the variants pass
                schedule = self.after(k)
                for method, mode in (("splitlbi_finetune", "finetune"), ("splitlbi_lottery", "lottery")):
                    if method not in self.s.methods or (mode == "lottery" and not default):
                        continue  # lottery retraining: default variant only (it costs E + F - K epochs each)

                    def train(method: str = method, mode: str = mode, k: int = k, norm: str = norm,
                              mask: Path = mask, label: str = label, before: float = before,
                              default: bool = default, schedule: Dict[str, Any] = schedule) -> None:
                        run = self.retrain(f"{label}-{mode}", lbi, mode, k, mask, E + F - k, schedule)
                        self.record(method, target, run, mask, before=before if mode == "finetune" else None, k=k,
                                    normalize=norm, default=default, dense_epochs=k)
                    _unless_unfinished(train, self.say)

    def baseline(self, name: str, label: str, config: TrainConfig, *, keep: Optional[float] = None,
                 masks: Optional[Path] = None) -> Path:
        from splitlbi.experiments.reproduce import _baseline_job

        return _baseline_job(self.ws, name, label, config, keep=keep, masks=masks)

    def sfp(self, target: float) -> None:
        E, F = self.E, self.F
        keep = sfp_keep(self.model_at_init(), self.example(), target)
        config = dataclasses.replace(self.base, epochs=E + F, lr_milestones=self.whole_schedule())
        run = self.baseline("sfp", f"{self.info['model']}-sfp-keep{keep:.4g}-seed{self.seed}", config, keep=keep)
        self.record("sfp", target, run, run / "mask.pt", dense_epochs=E + F)


def sfp_keep(model: nn.Module, example: Tensor, target: float, steps: int = 14) -> float:
    """The largest per-layer keep ratio whose compacted network (smallest-ℓ2 filters zeroed in
    every conv of ``model``) keeps at most ``target`` of the MACs (bisection; 4 decimals)."""
    from splitlbi.prune.baselines import smallest_filter_masks
    from splitlbi.prune.compact import compact_model, count_macs_params

    dense, _ = count_macs_params(model, example)

    def share(keep: float) -> float:
        smaller, _ = compact_model(model, smallest_filter_masks(model, keep), example, measure=False)
        return count_macs_params(smaller, example)[0] / dense

    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        if share(middle) <= target:
            low = middle
        else:
            high = middle
    return round(max(low, 1e-4), 4)


def group_norm_regularizer(reg: float, every: int = 1) -> Callable[[nn.Module, Tensor], Callable[[], None]]:
    """DepGraph's sparse training: Torch-Pruning's ``GroupNormPruner(reg=reg).regularize`` before each step
    (every ``every``-th step with ``reg × every``, for speed: the penalty's gradient is Python-heavy)."""

    def build(model: nn.Module, example: Tensor) -> Callable[[], None]:
        import torch_pruning as tp

        from splitlbi.prune.importance import prepare_torch_pruning

        training = model.training
        model.eval()  # tracing must not move the BatchNorm statistics
        pruners = prepare_torch_pruning(model)
        pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=reg * every, ignored_layers=[_classifier(model)],
                                           customized_pruners=pruners)
        model.train(training)
        count = [0]

        def regularize() -> None:
            count[0] += 1
            if count[0] % every == 0:
                pruner.regularize(model)

        return regularize

    build.__name__ = f"group_norm_reg{reg:g}"
    return build


def _classifier(model: nn.Module) -> nn.Module:
    """The last Linear (or conv) layer: its outputs are the classes, never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]


# --------------------------------------------------------------------------- results


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: Sequence[Dict[str, Any]], settings: BenchSettings) -> str:
    """The markdown summary: per model and budget, each method's mean ± std over seeds; the
    SplitLBI variants; the goal at each budget of the model (``goal_margin`` points below dense SGD)."""
    lines: List[str] = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        dense = [r["test_acc"] for r in mine if r["method"] == "sgd_dense"]
        seeds = sorted({r["seed"] for r in mine})
        lines += [f"### {model}", "",
                  f"SGD dense (E + F epochs): {_fmt(dense)} (seeds {', '.join(map(str, seeds))})", "",
                  "| MACs target | method | MACs kept | params kept | test acc. | before fine-tuning | n |",
                  "|---|---|---|---|---|---|---|"]
        for target in settings.budgets:
            for method in METHODS:
                chosen = [r for r in mine if r["method"] == method and r["target_macs"] == target
                          and r["default_variant"] and r["test_acc"] is not None]
                if not chosen:
                    continue
                before = [r["sparse_acc_before_finetune"] for r in chosen
                          if r["sparse_acc_before_finetune"] is not None]
                lines.append(f"| {100 * target:.1f}% | {NAMES[method]} | "
                             f"{100 * statistics.fmean(r['macs_share'] for r in chosen):.1f}% | "
                             f"{100 * statistics.fmean(r['params_share'] for r in chosen):.1f}% | "
                             f"{_fmt([r['test_acc'] for r in chosen])} | {_fmt(before) if before else ''} | "
                             f"{len(chosen)} |")
        variants = [r for r in mine if r["method"].startswith("splitlbi") and r["K"] is not None]
        if variants:
            lines += ["", f"SplitLBI variants (K = SplitLBI epochs before pruning, normalize = per-layer score "
                          f"normalization of budget_masks; default: K = {settings.k[0]}, {settings.normalize[0]}):",
                      "", "| MACs target | method | K | normalize | test acc. | before fine-tuning | n |",
                      "|---|---|---|---|---|---|---|"]
            keys = list(dict.fromkeys((r["target_macs"], r["method"], r["K"], r["normalize"]) for r in variants))
            for target, method, k, norm in sorted(keys, key=lambda t: (t[0], t[1], t[2], str(t[3]))):
                chosen = [r for r in variants if (r["target_macs"], r["method"], r["K"], r["normalize"])
                          == (target, method, k, norm)]
                accs = [r["test_acc"] for r in chosen if r["test_acc"] is not None]
                before = [r["sparse_acc_before_finetune"] for r in chosen
                          if r["sparse_acc_before_finetune"] is not None]
                lines.append(f"| {100 * target:.1f}% | {NAMES[method]} | {k} | {norm} | "
                             f"{_fmt(accs) if accs else 'not trained'} | {_fmt(before) if before else ''} | "
                             f"{len(chosen)} |")
        lines += [""] + [goal_line(mine, budget, settings.goal_margin)
                         for budget in settings.model_budgets.get(model, settings.budgets)] + [""]
    return "\n".join(lines) + "\n"


def goal_line(rows: Sequence[Dict[str, Any]], budget: float, margin: float = 0.5) -> str:
    """The goal at ``budget``: SplitLBI within ``margin`` points of dense SGD and at or above the
    best Torch-Pruning criterion's mean (default variants; the better SplitLBI method)."""
    def accs(method: str) -> List[float]:
        return [r["test_acc"] for r in rows if r["method"] == method and r["test_acc"] is not None
                and (method == "sgd_dense" or (r["target_macs"] == budget and r["default_variant"]))]

    dense = accs("sgd_dense")
    lbi = {m: accs(m) for m in ("splitlbi_finetune", "splitlbi_lottery") if accs(m)}
    tp = {m: accs(m) for m in ("l1", "l2", "bn_scale", "group_norm", "taylor", "random") if accs(m)}
    if not dense or not lbi or not tp:
        return f"Goal at {100 * budget:g}% of the MACs: not measured (missing runs)."
    best_lbi = max(lbi, key=lambda m: statistics.fmean(lbi[m]))
    best_tp = max(tp, key=lambda m: statistics.fmean(tp[m]))
    mean_lbi, mean_dense, mean_tp = (statistics.fmean(v) for v in (lbi[best_lbi], dense, tp[best_tp]))
    close = mean_dense - mean_lbi <= margin
    above = mean_lbi >= mean_tp
    return (f"Goal at {100 * budget:g}% of the MACs: best SplitLBI ({NAMES[best_lbi]}) {mean_lbi:.2f}% vs dense SGD "
            f"{mean_dense:.2f}% ({mean_lbi - mean_dense:+.2f} points: {'met' if close else 'not met'}, goal >= {-margin:g}) "
            f"and vs the best Torch-Pruning criterion ({NAMES[best_tp]}) {mean_tp:.2f}% "
            f"({mean_lbi - mean_tp:+.2f} points: {'met' if above else 'not met'}); "
            f"{len(lbi[best_lbi])} seed(s).")


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f}%" if len(values) > 1 else f"{mean:.2f}%"


def _write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    def cell(value: Any) -> Any:
        if value is None:
            return ""
        return f"{value:.6g}" if isinstance(value, float) else value

    atomic_write_csv(path, CSV_COLUMNS, ([cell(row.get(c)) for c in CSV_COLUMNS] for row in rows))


def _plot(rows: Sequence[Dict[str, Any]], out: Path, note: str) -> List[Path]:
    from splitlbi.plots.curves import Panel, Series, draw_panels

    panels = []
    markers = {"splitlbi_finetune": "*", "splitlbi_lottery": "P", "l1": "o", "l2": "s", "bn_scale": "D",
               "group_norm": "X", "taylor": "^", "random": "v", "sfp": "<", "scratch_e": ">"}
    for model in dict.fromkeys(r["model"] for r in rows):
        panel = Panel(model, "MACs kept (%)", "test accuracy (%)")
        mine = [r for r in rows if r["model"] == model and r["test_acc"] is not None]
        for method in METHODS:
            points = [r for r in mine if r["method"] == method and r["default_variant"]]
            targets = sorted({r["target_macs"] for r in points})
            if not targets:
                continue
            x, y, std, n = [], [], [], 1
            for target in targets:
                chosen = [r for r in points if r["target_macs"] == target]
                x.append(100 * statistics.fmean(r["macs_share"] for r in chosen))
                mean, deviation = _mean_std([r["test_acc"] for r in chosen])
                y.append(mean)
                std.append(deviation)
                n = len(chosen)
            panel.series.append(Series(NAMES[method], x, y, y_std=std if n > 1 else None, n=n,
                                       marker=markers[method], style="-" if method.startswith("splitlbi") else "--",
                                       band=False))
        dense = [r["test_acc"] for r in mine if r["method"] == "sgd_dense"]
        if dense:  # a line across the budgets: a point at 100% would squeeze them into a corner of the axis
            mean, _ = _mean_std(dense)
            panel.hlines.append(Series("SGD (dense, 100% MACs)", [100.0], [mean], n=len(dense), color="black",
                                       style=":"))
        panels.append(panel)
    return draw_panels(panels, out, columns=len(panels), title="Accuracy at a MACs budget (prune-bench)", note=note,
                       shared_legend=True)


class _Unfinished(Exception):
    """A run that ``report_only`` needs is not finished."""


class _FinishedOnly(Workspace):
    """A workspace that runs nothing: finished jobs are found, any other raises :class:`_Unfinished`."""

    def __init__(self, ws: Workspace) -> None:  # noqa: D107 - a view of ws
        self.__dict__.update(ws.__dict__)

    def _found(self, run_dir: Path, label: str) -> Path:
        from splitlbi.experiments.workspace import JOB_FILE

        if not (run_dir / JOB_FILE).is_file():
            raise _Unfinished(label)
        self._count("found")
        return run_dir

    def train(self, config: TrainConfig, label: str) -> Path:
        config = self.config(config)
        return self._found(self.run_dir(label, {"kind": "train", "config": config_settings(config)}), label)

    def job(self, label: str, spec: Any, make: Callable[[Path], Any]) -> Path:
        return self._found(self.run_dir(label, spec), label)


def _unless_unfinished(part: Callable[[], None], say: Callable[[str], None]) -> bool:
    try:
        part()
        return True
    except _Unfinished as missing:
        say(f"report only: {missing} is not finished, left out")
        return False


def prune_bench(ws: Workspace, recipe: Recipe, out: Path) -> List[Path]:
    """Run the benchmark of ``recipe`` (every model, seed, budget and method) and write its files.

    ``[bench] report_only = true`` runs nothing: the files are written from the finished runs
    (for a benchmark still running or stopped early; the summary says which rows exist).
    """
    settings = bench_settings(recipe)
    if recipe.sections["bench"].get("report_only", False) is True:
        ws = _FinishedOnly(ws)
    rows: List[Dict[str, Any]] = []
    for model in settings.models:
        benches = [_Bench(ws, recipe, settings, model, seed) for seed in recipe.seeds]
        benches = [bench for bench in benches if _unless_unfinished(bench.setup, ws.say)]
        # Budget by budget, every seed: a run stopped early leaves whole budgets (the first is the goal's).
        for target in settings.model_budgets[model]:
            for bench in benches:
                bench.at(target)
        for target in settings.model_budgets[model]:  # then the trained SplitLBI variants (item 6 of issue 10)
            for bench in benches:
                if bench.lbi is not None:
                    _unless_unfinished(lambda b=bench: b.splitlbi(b.lbi, target, variants=True), ws.say)
        rows += [row for bench in benches for row in bench.rows]
    folder = out.parent
    note = (f"E = {settings.train_epochs} training + F = {settings.finetune_epochs} fine-tuning epochs for every "
            f"method; SplitLBI: K = {settings.k[0]}, normalize = {settings.normalize[0]}; mean ± std over "
            f"{len(recipe.seeds)} seed(s); scale '{recipe.scale}'")
    # The plot also writes its plotted numbers to prune_bench.csv, which the table of every run then replaces.
    figures = _plot(rows, folder / "prune_bench.png", note) if any(r["test_acc"] is not None for r in rows) else []
    csv = folder / CSV_NAME
    _write_csv(rows, csv)
    summary = folder / "prune_bench.md"
    atomic_write_text(summary, f"# prune-bench, scale {recipe.scale}\n\n{note}\n\n" + summarize(rows, settings))
    return [csv, summary] + [path for path in figures if path != csv]
