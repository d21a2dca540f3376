"""Training epoch time: SplitLBI against SGD, and our on-device data pipeline against a textbook loop.

For CIFAR ResNet-20 and ResNet-56 on 32x32 images, in one process, three ways to train
one epoch on the same images (batch 128, crop-flip augmentation, lr 0.1, momentum 0.9,
weight decay 1e-4):

- ``SGD, on-device``: ``splitlbi.train.train_one_epoch`` (the uint8 images live on the
  training device; each batch is normalized and crop-flipped there in one go) with
  ``torch.optim.SGD``;
- ``SplitLBI, on-device``: the same with the SplitLBI optimizer (κ=1, ν=100);
- ``SGD, textbook``: the everyday loop: a ``torch.utils.data.Dataset`` that returns one
  float image at a time, padded, randomly cropped and flipped per sample in torch, a
  ``DataLoader(batch_size=128, shuffle=True, num_workers=0 on CPU / 2 on CUDA)``,
  ``torch.optim.SGD`` and per-batch ``loss.item()`` bookkeeping.

Each method keeps its own model and optimizer; after a warm-up of a few batches the
methods are timed one epoch each in turn, over ``--epochs`` rounds, and the medians are
reported, so drifts in machine load affect all of them alike.

Data: Fashion-MNIST zero-padded to 32x32 (the first ``--subset`` training images) from
``--data-dir`` (default ``$SPLITLBI_DATA``, else ``../shared/data`` next to the
repository); ``--dataset cifar10`` where CIFAR-10 is present.

    python benchmarks/bench_train.py                         # CPU, and CUDA when present
    python benchmarks/bench_train.py --device cpu --subset 1280 --models resnet20 --epochs 2
    python benchmarks/bench_train.py --device cuda --subset 50000 --dataset cifar10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitlbi.data import load_dataset
from splitlbi.data.augment import augment_generator, train_transform
from splitlbi.models import create_model, is_model
from splitlbi.train import TrainConfig, build_optimizer, epoch_generator, train_one_epoch

BATCH_SIZE = 128
PADDING = 4
WARMUP_BATCHES = 2
METHODS = ("SGD, on-device", "SplitLBI, on-device", "SGD, textbook")
SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, kappa=1.0, nu=100.0, batch_size=BATCH_SIZE)


def default_data_dir() -> str:
    return os.environ.get("SPLITLBI_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")


# --------------------------------------------------------------------------- the textbook loop


class TextbookDataset(torch.utils.data.Dataset):
    """One float image at a time: normalize, zero-pad, random crop, random flip (per sample)."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
        self.images, self.labels = images, labels  # uint8 [N, C, H, W] on the CPU
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = (self.images[index].float() / 255.0 - self.mean) / self.std
        height, width = image.shape[-2:]
        # Pad with the normalized black value, as torchvision's ToTensor+Normalize after RandomCrop would.
        black = (0.0 - self.mean) / self.std
        padded = black.expand(-1, height + 2 * PADDING, width + 2 * PADDING).clone()
        padded[:, PADDING:PADDING + height, PADDING:PADDING + width] = image
        top, left = torch.randint(0, 2 * PADDING + 1, (2,)).tolist()
        image = padded[:, top:top + height, left:left + width]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[index])


def textbook_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device,
                   max_batches: Optional[int] = None, autocast_dtype: Optional[torch.dtype] = None,
                   memory_format: Optional[torch.memory_format] = None) -> float:
    model.train()
    running_loss, correct, seen = 0.0, 0, 0
    for batch, (inputs, targets) in enumerate(loader):
        if max_batches is not None and batch >= max_batches:
            break
        inputs = inputs.to(device, non_blocking=True)
        if memory_format is not None:
            inputs = inputs.contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * targets.shape[0]
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += targets.shape[0]
    return running_loss / max(seen, 1)


# --------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, num_classes: int, in_channels: int, device: torch.device,
           memory_format: Optional[torch.memory_format] = None) -> nn.Module:
    torch.manual_seed(0)  # every method starts from the same weights
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).to(device)
    return model if memory_format is None else model.to(memory_format=memory_format)


def bench_model(model_name: str, splits, images: Tensor, labels: Tensor, device: torch.device,
                epochs: int, workers: int, amp: bool = False, channels_last: bool = False,
                methods: Sequence[str] = METHODS) -> Dict[str, List[float]]:
    """Seconds per epoch of each method, ``epochs`` interleaved rounds after a warm-up.
    ``amp``: forward and loss under bfloat16 autocast; ``channels_last``: model and
    batches in channels-last memory format (both as ``splitlbi train --amp
    --channels-last``)."""
    autocast_dtype = torch.bfloat16 if amp else None
    memory_format = torch.channels_last if channels_last else None
    num_classes, in_channels = len(splits.classes), images.shape[1]
    mean, std = splits.mean, splits.std
    device_images, device_labels = images.to(device), labels.to(device)
    runners: Dict[str, Callable[[Optional[int]], None]] = {}

    for method in METHODS[:2]:
        if method not in methods:
            continue
        config = TrainConfig(optimizer="splitlbi" if method.startswith("SplitLBI") else "sgd", **SETTINGS)
        model = _model(model_name, num_classes, in_channels, device, memory_format)
        optimizer = build_optimizer(config, model)
        state = {"epoch": 0}

        def on_device(max_batches: Optional[int], model=model, optimizer=optimizer, state=state) -> None:
            state["epoch"] += 1
            count = images.shape[0] if max_batches is None else min(images.shape[0], max_batches * BATCH_SIZE)
            transform = train_transform("crop-flip", mean, std, augment_generator(0, state["epoch"]))
            train_one_epoch(model, optimizer, device_images[:count], device_labels[:count], batch_size=BATCH_SIZE,
                            mean=mean, std=std, generator=epoch_generator(0, state["epoch"]), transform=transform,
                            progress=False, autocast_dtype=autocast_dtype, memory_format=memory_format)
        runners[method] = on_device

    if METHODS[2] in methods:
        model = _model(model_name, num_classes, in_channels, device, memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=SETTINGS["lr"], momentum=SETTINGS["momentum"],
                                    weight_decay=SETTINGS["weight_decay"])
        loader = torch.utils.data.DataLoader(TextbookDataset(images, labels, mean, std), batch_size=BATCH_SIZE,
                                             shuffle=True, num_workers=workers, pin_memory=device.type == "cuda")

        def textbook(max_batches: Optional[int], model=model, optimizer=optimizer, loader=loader) -> None:
            textbook_epoch(model, optimizer, loader, device, max_batches, autocast_dtype, memory_format)
        runners[METHODS[2]] = textbook

    for run in runners.values():
        run(WARMUP_BATCHES)
    _sync(device)
    seconds: Dict[str, List[float]] = {method: [] for method in runners}
    for _ in range(epochs):
        for method, run in runners.items():
            _sync(device)
            start = time.perf_counter()
            run(None)
            _sync(device)
            seconds[method].append(time.perf_counter() - start)
    return seconds


def machine_description(devices: Sequence[torch.device]) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    parts = [f"CPU {cpu} ({os.cpu_count()} logical cores)", f"torch {torch.__version__}",
             f"{torch.get_num_threads()} threads"]
    for device in devices:
        if device.type == "cuda":
            parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    return ", ".join(parts)


def _load_average() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def format_table(rows: List[dict]) -> str:
    header = ["device", "model", "method", "epoch (s)", "images/s", "× first method"]
    out = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['device']} | {r['model']} | {r['method']} | {r['seconds']:.2f} | "
                   f"{r['images_per_s']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: the CPU, and CUDA when present (default)")
    parser.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist")
    parser.add_argument("--data-dir", default=default_data_dir(), help="default: $SPLITLBI_DATA or ../shared/data")
    parser.add_argument("--subset", type=int, default=None,
                        help="train images per epoch (default: 2560 on the CPU, 20480 on CUDA)")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per method, interleaved (default: 3)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the textbook loop (default: 0 on the CPU, 2 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward and loss (as train --amp)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last model and batches")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to time (default: all three; the first is the ratio's baseline)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in args.models:
        if not is_model(name):
            parser.error(f"unknown model {name!r}")
    if args.epochs < 1 or (args.subset is not None and args.subset < 1):
        parser.error("--epochs and --subset must be >= 1")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        parser.error("--device cuda: no CUDA device is available")

    # Fashion-MNIST's 28x28 images are zero-padded to CIFAR's 32x32.
    splits = load_dataset(args.dataset, args.data_dir, download=False,
                          pad_to=32 if args.dataset == "fashion-mnist" else None)
    print(machine_description(devices))
    print(f"data: {splits.description}; batch {BATCH_SIZE}, crop-flip (padding {PADDING}), "
          f"{args.epochs} timed epoch(s) per method after {WARMUP_BATCHES} warm-up batches, medians; "
          f"load average at start {_load_average()}")

    rows = []
    for device in devices:
        subset = args.subset or (2560 if device.type == "cpu" else 20480)
        images, labels = splits.train.images[:subset], splits.train.labels[:subset]
        workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 2)
        for model_name in args.models:
            seconds = bench_model(model_name, splits, images, labels, device, args.epochs, workers,
                                  args.amp, args.channels_last, args.methods)
            medians = {method: statistics.median(values) for method, values in seconds.items()}
            baseline = medians[args.methods[0]]
            options = "".join(f", {flag}" for flag, on in (("amp", args.amp), ("channels-last", args.channels_last))
                              if on)
            for method in medians:
                rows.append(dict(device=f"{device.type} ({images.shape[0]} img{options})", model=model_name,
                                 method=method, seconds=medians[method],
                                 images_per_s=images.shape[0] / medians[method], ratio=medians[method] / baseline))
            sgd, lbi, textbook = (medians.get(method) for method in METHODS)
            ratios = ", ".join(([f"SplitLBI/SGD epoch time {lbi / sgd:.2f}"] if sgd and lbi else [])
                               + ([f"textbook/on-device (SGD) {textbook / sgd:.2f}"] if sgd and textbook else []))
            print(f"{device.type} {model_name}{options}: {ratios}; "
                  f"workers {workers}; all epochs (s): "
                  + "; ".join(f"{m}: {', '.join(f'{s:.2f}' for s in v)}" for m, v in seconds.items()), flush=True)
    print(f"load average at end {_load_average()}")
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
