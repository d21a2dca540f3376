"""Where a SplitLBI step's time goes, against torch.optim.SGD, on one parameter set.

Times, in one process and interleaved over rounds: the full steps of
``torch.optim.SGD(momentum=0.9, foreach=True)`` and of ``SplitLBI`` (multi-tensor), and
the bare tensor operations a step is made of:

- the three ``_foreach`` ops of SGD-momentum (``buf·m``, ``buf + g``, ``W − lr·buf``);
- SplitLBI's extra ops on the coupled weights: ``W − Γ`` (``addcmul``), ``V += ...``,
  ``W += ...``, and the per-filter norms of ``V`` (one call per layer).

The rest of a SplitLBI step (Python bookkeeping) is the difference.

    python benchmarks/bench_step_parts.py --set resnet56
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from bench_optimizer import PARAMETER_SETS, make_params
from splitlbi import SplitLBI
from splitlbi.optim.penalties import group_norms, shrink_factor


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=list(PARAMETER_SETS), default="resnet56")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    shapes = PARAMETER_SETS[args.set]()
    cpu = torch.device("cpu")
    sgd = torch.optim.SGD(make_params(shapes, cpu), lr=0.1, momentum=0.9, foreach=True)
    lbi = SplitLBI(make_params(shapes, cpu), lr=0.1, fused=False)  # the multi-tensor step these parts make up

    params = [p.detach() for p in make_params(shapes, cpu)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    coupled = [p for p in params if p.dim() == 4]
    vs = [torch.randn_like(p) * 0.01 for p in coupled]
    factors = [shrink_factor(group_norms(v, keepdim=True), 1.0) for v in vs]

    def sgd_ops() -> None:
        torch._foreach_mul_(bufs, 0.9)
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-1e-4)

    def coupling_ops() -> None:
        coupling = torch._foreach_addcmul(coupled, vs, factors)
        torch._foreach_add_(vs, coupling, alpha=1e-5)
        torch._foreach_add_(coupled, coupling, alpha=-1e-7)

    def norm_ops() -> None:
        for v in vs:
            group_norms(v, keepdim=True)

    parts: dict[str, Callable[[], object]] = {
        "torch.optim.SGD step": sgd.step,
        "SplitLBI step": lbi.step,
        "SGD's 3 foreach ops (all params)": sgd_ops,
        "SplitLBI extra: W−Γ, V, W ops (coupled)": coupling_ops,
        "SplitLBI extra: filter norms of V": norm_ops,
    }
    timings: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in parts.items():
                timings[name].append(median_ms(fn, args.repeats))
    result = {name: statistics.median(t) for name, t in timings.items()}
    base = result["torch.optim.SGD step"]
    print(f"{args.set}: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, {len(params)} tensors "
          f"({len(coupled)} coupled), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| part | ms | × SGD step |\n|---|---|---|")
    for name, ms in result.items():
        print(f"| {name} | {ms:.3f} | {ms / base:.2f} |")
    bookkeeping = result["SplitLBI step"] - result["SGD's 3 foreach ops (all params)"] - result[
        "SplitLBI extra: W−Γ, V, W ops (coupled)"] - result["SplitLBI extra: filter norms of V"]
    print(f"| SplitLBI step minus its tensor ops (bookkeeping) | {bookkeeping:.3f} | {bookkeeping / base:.2f} |")


if __name__ == "__main__":
    main()
