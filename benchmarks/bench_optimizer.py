"""Optimizer step time: SplitLBI (multi-tensor and per-tensor) against torch.optim.SGD.

In one process, on the parameter sets of ResNet-56 (CIFAR), VGG-16-BN (CIFAR),
ResNet-18 and ResNet-50 (ImageNet): plain tensors of the real shapes, conv and linear
weights plus BatchNorm scales/shifts and the classifier bias. Prints the median step
time of each optimizer, its ratio to ``torch.optim.SGD(momentum=0.9, foreach=True)``
and the optimizer-state memory.

    python benchmarks/bench_optimizer.py                  # CPU (and CUDA when present)
    python benchmarks/bench_optimizer.py --device cpu --repeats 30 --markdown
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

from splitlbi import SplitLBI

Shapes = list[tuple[int, ...]]


def _conv_bn(shapes: Shapes, cout: int, cin: int, k: int) -> None:
    shapes += [(cout, cin, k, k), (cout,), (cout,)]


def resnet_cifar_shapes(depth: int = 56) -> Shapes:
    """CIFAR ResNet (He et al. 2016): 3 stages of 16/32/64 channels, option-A shortcuts."""
    blocks = (depth - 2) // 6
    shapes: Shapes = []
    _conv_bn(shapes, 16, 3, 3)
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(blocks):
            _conv_bn(shapes, cout, cin, 3)
            _conv_bn(shapes, cout, cout, 3)
            cin = cout
    return shapes + [(10, 64), (10,)]


def vgg16_bn_shapes() -> Shapes:
    """VGG-16 with BatchNorm for CIFAR-10 (13 conv layers, a 512→10 classifier)."""
    shapes: Shapes = []
    cin = 3
    for cout in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
        _conv_bn(shapes, cout, cin, 3)
        cin = cout
    return shapes + [(10, 512), (10,)]


def resnet18_shapes() -> Shapes:
    shapes: Shapes = []
    _conv_bn(shapes, 64, 3, 7)
    cin = 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            _conv_bn(shapes, cout, cin, 3)
            _conv_bn(shapes, cout, cout, 3)
            if block == 0 and cin != cout:
                _conv_bn(shapes, cout, cin, 1)
            cin = cout
    return shapes + [(1000, 512), (1000,)]


def resnet50_shapes() -> Shapes:
    shapes: Shapes = []
    _conv_bn(shapes, 64, 3, 7)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            _conv_bn(shapes, width, cin, 1)
            _conv_bn(shapes, width, width, 3)
            _conv_bn(shapes, width * 4, width, 1)
            if block == 0:
                _conv_bn(shapes, width * 4, cin, 1)
            cin = width * 4
    return shapes + [(1000, 2048), (1000,)]


PARAMETER_SETS: dict[str, Callable[[], Shapes]] = {
    "resnet56": resnet_cifar_shapes,
    "vgg16_bn": vgg16_bn_shapes,
    "resnet18": resnet18_shapes,
    "resnet50": resnet50_shapes,
}


def make_params(shapes: Shapes, device: torch.device) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.05).to(device))
        p.grad = (torch.randn(shape, generator=generator) * 0.01).to(device)
        params.append(p)
    return params


def state_megabytes(optimizer: torch.optim.Optimizer) -> float:
    total = 0
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total / 2**20


def median_step_ms(optimizer: torch.optim.Optimizer, device: torch.device, repeats: int, warmup: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        optimizer.step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


OPTIMIZERS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "SGD (momentum, foreach)": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "SplitLBI (multi-tensor)": lambda p: SplitLBI(p, lr=0.1, kappa=1.0, nu=100.0, foreach=True),
    "SplitLBI (per-tensor)": lambda p: SplitLBI(p, lr=0.1, kappa=1.0, nu=100.0, foreach=False),
}


def run(devices: list[str], sets: list[str], repeats: int) -> list[dict]:
    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        for set_name in sets:
            shapes = PARAMETER_SETS[set_name]()
            numel = sum(torch.Size(s).numel() for s in shapes)
            results = {}
            # interleave the optimizers over rounds so drifts in machine load hit all alike
            timings: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
            optimizers = {name: make(make_params(shapes, device)) for name, make in OPTIMIZERS.items()}
            for _ in range(3):
                for name, optimizer in optimizers.items():
                    timings[name].append(median_step_ms(optimizer, device, max(1, repeats // 3)))
            for name, optimizer in optimizers.items():
                results[name] = (statistics.median(timings[name]), state_megabytes(optimizer))
            baseline = results["SGD (momentum, foreach)"][0]
            for name, (ms, megabytes) in results.items():
                rows.append(dict(device=device_name, set=set_name, params_m=numel / 1e6, optimizer=name,
                                 ms=ms, ratio=ms / baseline, state_mb=megabytes))
    return rows


def format_table(rows: list[dict], markdown: bool) -> str:
    header = ["device", "parameter set", "params (M)", "optimizer", "step (ms)", "× SGD", "state (MB)"]
    lines = []
    for r in rows:
        lines.append([r["device"], r["set"], f"{r['params_m']:.2f}", r["optimizer"], f"{r['ms']:.2f}",
                      f"{r['ratio']:.2f}", f"{r['state_mb']:.1f}"])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--sets", nargs="+", choices=list(PARAMETER_SETS), default=list(PARAMETER_SETS))
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer (after warm-up)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print(format_table(run(devices, args.sets, args.repeats), args.markdown))


if __name__ == "__main__":
    main()
