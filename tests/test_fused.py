"""The fused SplitLBI step (splitlbi.optim.fused): the C++ CPU kernel and the Triton
kernel (run on CPU through Triton's interpreter) against the per-tensor reference."""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitlbi import SplitLBI
from splitlbi.optim import fused as fused_module
from splitlbi.optim.functional import splitlbi_update
from splitlbi.optim.fused import NormCache, cpu_kernel_available, fused_splitlbi

VARIANTS = {
    "sgd": dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    "momentum": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0),
    "weight-decay": dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2),
    "dampening": dict(momentum=0.5, dampening=0.3, nesterov=False, weight_decay=1e-3),
}
HYPER = dict(lr=0.1, kappa=2.0, nu=0.5, lam=0.3)

needs_cpp = pytest.mark.skipif(not cpu_kernel_available(), reason="no C++ compiler: the CPU kernel is not built")


# ----------------------------------------------------------------- helpers
def reference_run(shapes, penalties, variant, steps, dtype=torch.float32, seed=0):
    """Weights, Vs and buffers after ``steps`` per-tensor reference steps on random gradients."""
    return _run(shapes, penalties, variant, steps, dtype, seed, backend=None)


def _run(shapes, penalties, variant, steps, dtype, seed, backend):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    vs = [None if pen == "none" else torch.zeros_like(w) for w, pen in zip(weights, penalties)]
    buffers, cache = [None] * len(shapes), NormCache()
    for _ in range(steps):
        grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
        if backend is None:
            for i in range(len(shapes)):
                buffers[i] = splitlbi_update(weights[i], grads[i], buffers[i], vs[i], penalty=penalties[i],
                                             **HYPER, **VARIANTS[variant])
        else:
            assert fused_splitlbi(weights, grads, buffers, vs, penalties, cache, backend=backend,
                                  **HYPER, **VARIANTS[variant])
    return weights + [v for v in vs if v is not None] + [b for b in buffers if b is not None]


def assert_close_lists(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


def mixed_model():
    """Every penalty in one model: conv (group), linear (neuron, l1), vectors (none), odd sizes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Conv2d(5, 7, (3, 1)), torch.nn.Flatten(),
        torch.nn.LazyLinear(9), torch.nn.Linear(9, 3),
    )


def model_groups(model):
    convs = [model[0].weight, model[2].weight]
    vectors = [model[0].bias, model[1].weight, model[1].bias, model[2].bias, model[4].bias, model[5].bias]
    return [dict(params=convs, penalty="group"), dict(params=[model[4].weight], penalty="neuron"),
            dict(params=[model[5].weight], penalty="l1"), dict(params=vectors, penalty="none")]


def train(opt, model, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 7, 5, generator=generator)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [t.clone() for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
    return out


def fresh_model():
    model = mixed_model()
    model(torch.zeros(1, 3, 7, 5))  # materialise the lazy layer
    return model


# ------------------------------------------------------------ the C++ kernel
@needs_cpp
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_kernel_equals_reference_over_50_steps(variant):
    """Through the optimizer: every penalty in one model's parameters, random gradients."""
    runs = {}
    for name, kwargs in (("fused", dict(fused=True)), ("reference", dict(foreach=False))):
        model = fresh_model()
        opt = SplitLBI(model_groups(model), **HYPER, **VARIANTS[variant], **kwargs)
        generator = torch.Generator().manual_seed(1)
        for _ in range(50):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        runs[name] = snapshot(model, opt)
    assert_close_lists(runs["fused"], runs["reference"], rtol=1e-5, atol=1e-5)


@needs_cpp
def test_cpu_kernel_on_odd_shapes_and_large_tensors():
    # rows longer than a work chunk, tensors split over both threads, a 5-D conv, a scalar-free vector
    shapes = [(3, 2, 5, 1), (4, 20000), (70000,), (2, 3, 3, 3, 3), (11, 17), (1, 1)]
    penalties = ["group", "neuron", "l1", "group", "l1", "none"]
    expected = reference_run(shapes, penalties, "nesterov", 5)
    actual = _run(shapes, penalties, "nesterov", 5, torch.float32, 0, backend="cpp")
    assert_close_lists(actual, expected, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_default_step_is_fused_on_cpu(monkeypatch):
    calls = []
    kernel = torch.ops.splitlbi.fused_step_
    monkeypatch.setattr(fused_module.torch.ops.splitlbi, "fused_step_", lambda *a: calls.append(1) or kernel(*a),
                        raising=False)
    model = fresh_model()
    train(SplitLBI(model_groups(model), **HYPER), model, 2)
    assert calls  # the default (fused=None) took the kernel
    calls.clear()
    train(SplitLBI(model_groups(model), **HYPER, fused=False), model, 2)
    train(SplitLBI(model_groups(model), **HYPER, foreach=False), model, 2)
    train(SplitLBI(model_groups(model), **HYPER, foreach=True), model, 2)  # as torch.optim: foreach it is
    assert not calls


@needs_cpp
@pytest.mark.parametrize("variant", ["momentum", "dampening"])
def test_cpu_resume_from_state_dict_is_bitwise(variant):
    """Norms kept by the kernel and norms recomputed after load_state_dict give the same bits."""
    hyper = dict(**HYPER, **VARIANTS[variant])
    model = fresh_model()
    opt = SplitLBI(model_groups(model), **hyper)
    train(opt, model, 20)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    train(opt, model, 30, seed=2)
    straight = snapshot(model, opt)

    resumed_model = fresh_model()
    resumed_model.load_state_dict(saved_model)
    resumed = SplitLBI(model_groups(resumed_model), **hyper)
    resumed.load_state_dict(saved_opt)
    train(resumed, resumed_model, 30, seed=2)
    for a, b in zip(snapshot(resumed_model, resumed), straight):
        assert torch.equal(a, b)

    reference_model = fresh_model()
    reference = SplitLBI(model_groups(reference_model), **hyper, foreach=False)
    train(reference, reference_model, 20)
    train(reference, reference_model, 30, seed=2)
    assert_close_lists(straight, snapshot(reference_model, reference), rtol=1e-5, atol=1e-5)


@needs_cpp
def test_cpu_kernel_notices_v_changed_outside_the_step():
    runs = []
    for kwargs in (dict(fused=True), dict(foreach=False)):
        model = fresh_model()
        opt = SplitLBI(model_groups(model), **HYPER, **kwargs)
        train(opt, model, 5)
        with torch.no_grad():
            for state in opt.state.values():
                if "v" in state:
                    state["v"].mul_(3.0)  # the kept filter norms are now wrong
        train(opt, model, 5, seed=3)
        runs.append(snapshot(model, opt))
    assert_close_lists(runs[0], runs[1], rtol=1e-5, atol=1e-5)


@needs_cpp
def test_channels_last_weights_take_the_kernel(monkeypatch):
    calls = []
    kernel = torch.ops.splitlbi.fused_step_
    monkeypatch.setattr(fused_module.torch.ops.splitlbi, "fused_step_", lambda *a: calls.append(1) or kernel(*a),
                        raising=False)
    runs = []
    for kwargs in (dict(fused=True), dict(foreach=False)):
        model = fresh_model().to(memory_format=torch.channels_last)
        opt = SplitLBI(model_groups(model), **HYPER, **VARIANTS["nesterov"], **kwargs)
        train(opt, model, 10)
        runs.append(snapshot(model, opt))
    assert calls and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_close_lists(runs[0], runs[1], rtol=1e-5, atol=1e-5)


@needs_cpp
def test_unsuitable_tensors_fall_back_silently_or_raise_with_fused_true():
    def transposed_linear():  # a neuron-penalised weight whose rows are not blocks of memory
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(5, 4).t()), torch.nn.Parameter(torch.randn(3, 3, 2, 2))]

    runs = []
    for kwargs in (dict(), dict(foreach=False)):
        ps = transposed_linear()
        opt = SplitLBI([dict(params=ps[:1], penalty="neuron"), dict(params=ps[1:])], **HYPER, **kwargs)
        for _ in range(3):
            _step_with_grads(opt)
        runs.append([p.detach().clone() for p in ps])
    assert_close_lists(runs[0], runs[1], rtol=1e-5, atol=1e-5)

    strict = SplitLBI([dict(params=transposed_linear()[:1], penalty="neuron")], **HYPER, fused=True)
    with pytest.raises(RuntimeError, match="fused=True"):
        _step_with_grads(strict)
    bf16 = SplitLBI(model_groups(fresh_model().to(torch.bfloat16)), **HYPER, fused=True)
    with pytest.raises(RuntimeError, match="float32"):
        _step_with_grads(bf16)


def _step_with_grads(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 0.5)
    opt.step()


def test_fused_and_foreach_both_true_is_an_error():
    with pytest.raises(ValueError, match="fused"):
        SplitLBI(fresh_model().parameters(), lr=0.1, fused=True, foreach=True)


def test_without_a_compiler_the_default_step_falls_back(tmp_path):
    """A fresh process with no compiler on PATH and an empty cache: default steps work
    (the _foreach path) and fused=True says why it cannot run."""
    code = (
        "import torch; from splitlbi import SplitLBI\n"
        "p = torch.nn.Parameter(torch.randn(4, 3, 3, 3)); p.grad = torch.randn(4, 3, 3, 3)\n"
        "SplitLBI([p], lr=0.1).step()\n"
        "from splitlbi.optim.fused import cpu_kernel_available; assert not cpu_kernel_available()\n"
        "try:\n    SplitLBI([p], lr=0.1, fused=True).step()\nexcept RuntimeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "SPLITLBI_CACHE": str(tmp_path / "cache")}
    env.pop("CXX", None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "could not be built" in result.stdout
    assert not list((tmp_path / "cache").glob("**/*.so"))


# --------------------------------------------------------- the Triton kernel
@pytest.fixture(scope="module")
def triton_kernel():
    """splitlbi.optim._triton_kernel with Triton's interpreter on (CPU tensors;
    tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported)."""
    if not os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is not set (a CUDA machine runs the kernel for real)")
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from splitlbi.optim import _triton_kernel

    if not isinstance(_triton_kernel._fused_step_kernel, InterpretedFunction):
        _triton_kernel = importlib.reload(_triton_kernel)
    if not isinstance(triton.language.zeros, InterpretedFunction):
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set")
    return _triton_kernel


# Few programs per step (the interpreter runs each in numpy): a 5-row conv (two programs,
# the second with masked rows), rows longer than BLOCK_C (a column loop), an l1 tensor
# with a partial last row, a bias.
TRITON_SHAPES = [(5, 3, 3, 1), (3, 2, 15, 10), (7, 9), (300,), (6,)]
TRITON_PENALTIES = ["group", "group", "neuron", "l1", "none"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_kernel_equals_reference_over_50_steps_float32(triton_kernel, variant):
    expected = reference_run(TRITON_SHAPES, TRITON_PENALTIES, variant, 50)
    actual = _run(TRITON_SHAPES, TRITON_PENALTIES, variant, 50, torch.float32, 0, backend="triton")
    assert_close_lists(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["nesterov", pytest.param("momentum", marks=pytest.mark.slow),
                                     pytest.param("dampening", marks=pytest.mark.slow)])
def test_triton_kernel_bfloat16_is_as_accurate_as_the_reference(triton_kernel, variant):
    """In bfloat16 the reference rounds after every op and the kernel once per store,
    so they drift apart by a few bf16 ulps; both must track the float32 run as well."""
    exact = reference_run(TRITON_SHAPES, TRITON_PENALTIES, variant, 50)
    reference = reference_run(TRITON_SHAPES, TRITON_PENALTIES, variant, 50, dtype=torch.bfloat16)
    fused = _run(TRITON_SHAPES, TRITON_PENALTIES, variant, 50, torch.bfloat16, 0, backend="triton")
    for e, r, f in zip(exact, reference, fused):
        assert f.dtype == torch.bfloat16
        reference_error = (r.float() - e).abs().max().item()
        fused_error = (f.float() - e).abs().max().item()
        assert fused_error <= 1.5 * reference_error + 0.02, (fused_error, reference_error)


def test_triton_resume_from_state_dict_through_the_optimizer(triton_kernel, monkeypatch):
    """SplitLBI's default step routed to the Triton kernel: resuming from a state dict
    taken mid-run gives the bits of the uninterrupted run, and both equal the reference."""
    monkeypatch.setattr(fused_module, "default_backend", lambda device: "triton")
    hyper = dict(**HYPER, **VARIANTS["weight-decay"])

    def params():
        generator = torch.Generator().manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in TRITON_SHAPES]

    def groups(ps):
        return [dict(params=[p], penalty=pen) for p, pen in zip(ps, TRITON_PENALTIES)]

    def steps(opt, ps, n, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(n):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()

    calls = []
    kernel = triton_kernel.fused_step
    monkeypatch.setattr(triton_kernel, "fused_step", lambda *a: calls.append(1) or kernel(*a))
    ps = params()
    opt = SplitLBI(groups(ps), **hyper)
    steps(opt, ps, 25, 1)
    saved = ([p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict()))
    steps(opt, ps, 25, 2)
    assert calls

    resumed_params = [torch.nn.Parameter(w.clone()) for w in saved[0]]
    resumed = SplitLBI(groups(resumed_params), **hyper)
    resumed.load_state_dict(saved[1])
    steps(resumed, resumed_params, 25, 2)
    for a, b in zip(resumed_params, ps):
        assert torch.equal(a, b)

    monkeypatch.undo()
    reference_params = params()
    reference = SplitLBI(groups(reference_params), **hyper, foreach=False)
    steps(reference, reference_params, 25, 1)
    steps(reference, reference_params, 25, 2)
    assert_close_lists([p.detach() for p in ps], [p.detach() for p in reference_params], rtol=1e-5, atol=1e-5)


def test_triton_kernel_compiles_for_a_cuda_gpu():
    """The interpreter does not type-check like the compiler: compile the kernel for an
    H100/H200 (sm_90) down to a cubin, which needs Triton but no GPU."""
    pytest.importorskip("triton")
    code = (
        "import triton, triton.language as tl\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from splitlbi.optim import _triton_kernel as k\n"
        "sig = dict(meta='*i64', tasks='*i64', **{n: 'fp32' for n in "
        "('lr', 'kappa', 'nu', 'lam', 'momentum', 'keep', 'weight_decay')})\n"
        "for dtype, flags in ((tl.bfloat16, (True, True, True)), (tl.float32, (False, False, False))):\n"
        "    const = dict(zip(('HAS_MOMENTUM', 'NESTEROV', 'HAS_WD'), flags), DTYPE=dtype,\n"
        "                 ROWS=k.ROWS, BLOCK_C=k.BLOCK_C)\n"
        "    sig.update({name: 'constexpr' for name in const})\n"
        "    out = triton.compile(ASTSource(k._fused_step_kernel, sig, const), target=GPUTarget('cuda', 90, 32))\n"
        "    assert out.asm['cubin'], dtype\n"
        "print('compiled')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
