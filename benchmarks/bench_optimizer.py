"""Optimizer step time: SplitLBI (multi-tensor and per-tensor) against torch.optim.SGD.

In one process, on the parameter sets of ResNet-56 (CIFAR), VGG-16-BN (CIFAR),
ResNet-18 and ResNet-50 (ImageNet): plain tensors of the real shapes, conv and linear
weights plus BatchNorm scales/shifts and the classifier bias. Prints the median step
time of each optimizer, its ratio to ``torch.optim.SGD(momentum=0.9, foreach=True)``
and the optimizer-state memory. Ratios are taken within each interleaved round; the
table gives their median and range over the rounds.

    python benchmarks/bench_optimizer.py                  # CPU (and CUDA when present)
    python benchmarks/bench_optimizer.py --device cpu --repeats 30 --markdown
    python benchmarks/bench_optimizer.py --device cpu --sets resnet56 resnet18 --penalties auto group l1 none
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch

from splitlbi import SplitLBI
from splitlbi.optim.fused import fused_supported

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


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def median_step_ms(optimizer: torch.optim.Optimizer, device: torch.device, repeats: int, warmup: int = 3,
                   clock: str = "wall") -> float:
    """Median time of one step. ``clock="cpu"`` counts the CPU time of this process
    (with one thread: the step's own work, unaffected by other jobs on a shared machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = CLOCKS[clock]
    for _ in range(warmup):
        optimizer.step()
    sync()
    times = []
    for _ in range(repeats):
        start = now()
        optimizer.step()
        sync()
        times.append(now() - start)
    return statistics.median(times) * 1e3


def penalty_groups(params: list, penalty: str) -> list[dict]:
    """Parameter groups for one penalty setting: ``auto`` (conv: group, linear: l1,
    vectors: none), ``group`` (conv: group, linear: neuron, vectors: none), ``l1``
    (every tensor) or ``none`` (plain SGD-momentum with step κα)."""
    by_rank = {"auto": {4: "group", 2: "l1"}, "group": {4: "group", 2: "neuron"}, "l1": {4: "l1", 2: "l1", 1: "l1"},
               "none": {}}[penalty]
    groups: dict[str, list] = {}
    for p in params:
        groups.setdefault(by_rank.get(p.dim(), "none"), []).append(p)
    return [dict(params=ps, penalty=pen) for pen, ps in groups.items()]


def splitlbi(penalty: str = "auto", **kwargs) -> Callable[[list], torch.optim.Optimizer]:
    return lambda p: SplitLBI(penalty_groups(p, penalty), lr=0.1, kappa=1.0, nu=100.0, **kwargs)


BASELINE = "SGD (momentum, foreach)"


def optimizers_for(device: torch.device, penalties: list[str], per_tensor: bool) -> dict[str, Callable]:
    """The optimizers timed on ``device``: SGD (foreach, fused), and for each penalty
    SplitLBI's default step (fused where the kernel is available), its multi-tensor
    ``_foreach`` path and (for the first penalty) the per-tensor reference path."""
    optimizers: dict[str, Callable] = {
        BASELINE: lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        "SGD (momentum, fused)": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    }
    probe = [torch.zeros(2, 2, device=device)]
    fused = fused_supported(probe) is None
    for k, penalty in enumerate(penalties):
        tag = "" if penalty == "auto" else f", {penalty}"
        if fused:
            optimizers[f"SplitLBI (fused, default{tag})"] = splitlbi(penalty, fused=True)
        optimizers[f"SplitLBI (multi-tensor{tag})"] = splitlbi(penalty, fused=False)
        if per_tensor and k == 0:
            optimizers[f"SplitLBI (per-tensor{tag})"] = splitlbi(penalty, foreach=False)
    return optimizers


def run(devices: list[str], sets: list[str], repeats: int, rounds: int = 3, penalties: tuple[str, ...] = ("auto",),
        per_tensor: bool = True, clock: str = "wall") -> list[dict]:
    """Median step time of each optimizer, interleaved over ``rounds`` rounds so that
    drifts in machine load hit all alike; the ratio to SGD is taken within each round
    and reported as the median and the range over the rounds."""
    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        makers = optimizers_for(device, list(penalties), per_tensor)
        for set_name in sets:
            shapes = PARAMETER_SETS[set_name]()
            numel = sum(torch.Size(s).numel() for s in shapes)
            optimizers = {name: make(make_params(shapes, device)) for name, make in makers.items()}
            timings: dict[str, list[float]] = {name: [] for name in optimizers}
            for _ in range(rounds):
                for name, optimizer in optimizers.items():
                    timings[name].append(median_step_ms(optimizer, device, max(1, repeats // rounds), clock=clock))
            for name, optimizer in optimizers.items():
                ratios = [t / b for t, b in zip(timings[name], timings[BASELINE])]
                rows.append(dict(device=device_name, set=set_name, params_m=numel / 1e6, optimizer=name,
                                 ms=statistics.median(timings[name]), ratio=statistics.median(ratios),
                                 low=min(ratios), high=max(ratios), state_mb=state_megabytes(optimizer)))
    return rows


def format_table(rows: list[dict], markdown: bool) -> str:
    header = ["device", "parameter set", "params (M)", "optimizer", "step (ms)", "× SGD", "range", "state (MB)"]
    lines = []
    for r in rows:
        lines.append([r["device"], r["set"], f"{r['params_m']:.2f}", r["optimizer"], f"{r['ms']:.2f}",
                      f"{r['ratio']:.2f}", f"{r['low']:.2f}–{r['high']:.2f}", f"{r['state_mb']:.1f}"])
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
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median and range)")
    parser.add_argument("--penalties", nargs="+", choices=["auto", "group", "l1", "none"], default=["auto"],
                        help="SplitLBI penalty settings to time (default: auto)")
    parser.add_argument("--no-per-tensor", action="store_true", help="skip the slow per-tensor reference path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time (default) or this process's CPU time (use with --threads 1)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    rows = run(devices, args.sets, args.repeats, args.rounds, tuple(args.penalties), not args.no_per_tensor,
               args.clock)
    print(format_table(rows, args.markdown))


if __name__ == "__main__":
    main()
