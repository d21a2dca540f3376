"""``splitlbi compact RUN_DIR --epoch K --out model.pt``: remove the filters outside the
support of Γ for real and save the smaller model (see :mod:`splitlbi.prune.compact`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from splitlbi.cli.argtypes import positive_int
from splitlbi.errors import SplitLBIError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``compact`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "compact",
        help="remove the filters outside the support of Γ and save the smaller model",
        description="Load the weights W of epoch K of a run and the support of Γ at epoch K (masks/, or "
                    "--masks FILE), zero the unselected conv filters (weights, bias and the affine "
                    "parameters of their BatchNorm channel), remove them for real with torch-pruning "
                    "(with the BN channels and next-layer inputs that depend on them), save the whole "
                    "compact network, and print parameters, MACs, CPU latency and test accuracy "
                    "(masked -> compact: equal) before -> after. Channels coupled by residual additions are "
                    "removed only when unselected in every coupled conv. Writes NAME.pt2 (a torch.export "
                    "program: torch.export.load(path).module() runs it without splitlbi), "
                    "NAME.state_dict.pt (weights_only=True) and NAME.pt (the pickled module: "
                    "torch.load(path, weights_only=False) with splitlbi installed).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'splitlbi train'")
    parser.add_argument("--epoch", type=positive_int, required=True, metavar="K",
                        help="epoch whose checkpoint (checkpoints/epoch_K.pt) and masks are used")
    parser.add_argument("--out", required=True, metavar="NAME",
                        help="where to save the compact network: NAME.pt2, NAME.state_dict.pt and NAME.pt "
                             "(a .pt or .pt2 suffix of NAME is dropped first)")
    parser.add_argument("--masks", metavar="FILE",
                        help="a mask file ({'masks': {param name: bool tensor}}) instead of the run's "
                             "masks/epoch_K.pt")
    parser.add_argument("--allow-empty-mask", action="store_true",
                        help="accept a mask that keeps no weight at all (refused by default)")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                        help="batch size of the latency measurement (default: 16)")
    parser.add_argument("--repeats", type=positive_int, default=20, metavar="N",
                        help="timed forward passes; the median is reported (default: 20)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="dataset folder for the test accuracy (default: the run's, else $SPLITLBI_DATA, "
                             "else ~/.cache/splitlbi)")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip the test accuracy of the masked and compact networks")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (drawn only when stderr is a terminal anyway)")
    parser.set_defaults(func=run)
    return parser


def _input_shape(info: Dict[str, Any]) -> tuple:
    size = info.get("pad_to") or info.get("image_size") or 32
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return int(info.get("in_channels", 3)), height, width


def _test_accuracies(info: Dict[str, Any], data_dir: Optional[str], models: Dict[str, torch.nn.Module],
                     progress: bool) -> Dict[str, float]:
    """Test accuracy (percent) of each model on the run's held-out images (its config: dataset,
    --train-split, --pad-to, --limit-test), in eval mode on the CPU."""
    from splitlbi.data import load_dataset
    from splitlbi.train.loop import evaluate

    splits = load_dataset(info["dataset"], data_dir or info.get("data_dir"), train_split=info.get("train_split"),
                          pad_to=info.get("pad_to"))
    limit = info.get("limit_test")
    images, labels = splits.test.images[:limit], splits.test.labels[:limit]
    return {name: evaluate(model, images, labels, batch_size=int(info.get("eval_batch_size", 1000)),
                           mean=splits.mean, std=splits.std, progress=None if progress else False,
                           description=f"test accuracy, {name}").accuracy
            for name, model in models.items()}


def run(args: argparse.Namespace) -> int:
    from splitlbi.prune.compact import compact_model, mask_network
    from splitlbi.prune.export import save_compact
    from splitlbi.prune.masks import check_not_empty, load_run_masks, read_mask_file
    from splitlbi.train.run import list_checkpoints, load_model_from_run, read_run_config

    run_dir = Path(args.run_dir)
    info = read_run_config(run_dir)
    available = list(list_checkpoints(run_dir))
    if args.epoch not in available:
        listed = ", ".join(map(str, available)) or "none"
        raise SplitLBIError(f"{run_dir} has no checkpoint of epoch {args.epoch} (available epochs: {listed})")
    if args.masks is not None:
        masks = read_mask_file(args.masks)["masks"]
    else:
        masks = load_run_masks(run_dir, args.epoch)
    check_not_empty(masks, f"the masks ({args.masks or f'{run_dir} epoch {args.epoch}'})", args.allow_empty_mask)
    model = load_model_from_run(run_dir, weights=args.epoch).eval()

    shape = _input_shape(info)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch_size, *shape, generator=generator)
    say = print
    say(f"{info.get('model', 'model')} epoch {args.epoch}: input {list(shape)}, latency batch {args.batch_size}")
    say("compacting (torch-pruning) and timing ...")
    compact, report = compact_model(model, masks, batch[:1], latency_repeats=args.repeats, latency_input=batch)
    for line in report.lines():
        say(line)
    if not args.no_accuracy:
        masked = mask_network(model, masks, batch[:1]).model
        try:
            accuracy = _test_accuracies(info, args.data_dir, {"masked": masked, "compact": compact},
                                        progress=not args.no_progress)
        except SplitLBIError as error:
            raise SplitLBIError(f"{error} (the test accuracy needs the run's dataset: give --data-dir, or "
                                f"--no-accuracy)") from None
        say(f"test acc {accuracy['masked']:.2f}% (masked) -> {accuracy['compact']:.2f}% (compact), "
            f"{info.get('test_size', '?')} held-out images of {info['dataset']}")
    say("exporting (torch.export) ...")
    paths = save_compact(compact, batch, args.out)
    say(f"wrote {paths['program']} (torch.export.load(path).module(): runs without splitlbi)")
    say(f"wrote {paths['state_dict']} (state_dict, weights_only=True)")
    say(f"wrote {paths['module']} (whole module: torch.load(path, weights_only=False), needs splitlbi)")
    return 0
