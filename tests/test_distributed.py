"""Distributed (DDP) training: batch sharding, the torchrun path on CPU/gloo, resume, rank agreement.

The end-to-end tests launch ``torchrun --nproc-per-node 2 --standalone -m splitlbi train``
(as ``python -m torch.distributed.run``, so no PATH lookup) on the CPU with gloo and
compare with one process whose batch is twice as large. NCCL/GPU is not tested here.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn

from splitlbi.data.augment import augment_generator, train_transform
from splitlbi.errors import SplitLBIError
from splitlbi.train import TrainConfig, epoch_generator, load_checkpoint, load_masks, read_run_config, run_training
from splitlbi.train import train_one_epoch
from splitlbi.train.distributed import shard_bounds
from helpers import read_rows

# 511 = 15 x 32 + 31: a ragged last batch, split 16 + 15 over two ranks and re-weighted.
# The two runs differ by float32 summation order only (a mean of 32 against the mean of
# two means of 16), ~1e-8 here. A small lr keeps it so: at lr 0.1 LeNet-5 on digits is
# chaotic, and even at 0.01 a max-pool near-tie flipping mid-run can lift the difference
# to ~1e-5. nu 10, lam 0.001 give a partial support (sparsity ~0.88).
ARGS = ["--dataset", "digits", "--model", "lenet5", "--optimizer", "splitlbi", "--momentum", "0.9",
        "--lr", "0.005", "--nu", "10", "--lam", "0.001", "--linear-penalty", "auto", "--limit-train", "511",
        "--limit-test", "200",
        "--device", "cpu", "--no-progress"]
SINGLE = TrainConfig(dataset="digits", model="lenet5", optimizer="splitlbi", momentum=0.9, lr=0.005, nu=10.0,
                     lam=0.001, linear_penalty="auto", limit_train=511, limit_test=200, device="cpu", progress=False, epochs=2,
                     batch_size=32)


def _environment() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # faulthandler: should a process abort, its Python stack shows in the failure output.
    env.update(OMP_NUM_THREADS="1", SPLITLBI_OFFLINE="1", PYTHONFAULTHANDLER="1")
    return env


def torchrun(*arguments: str, processes: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone",
               *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())


def splitlbi_train(*arguments: str) -> subprocess.CompletedProcess:
    # "--" ends torchrun's own options: its parser would take our --nu for an
    # ambiguous abbreviation of --numa-binding (documented in docs/distributed.md).
    return torchrun("-m", "splitlbi", "--", "train", *ARGS, *arguments)


def without_seconds(rows: List[Dict[str, str]]) -> List[Dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """2 processes x batch 16 for 2 epochs, launched as users do."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = splitlbi_train("--epochs", "2", "--batch-size", "16", "--out", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return {"dir": run_dir, "stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run in one process with batch 32 = 16 x 2."""
    return run_training(SINGLE, tmp_path_factory.mktemp("single") / "run", log=None)


# --- sharding arithmetic ----------------------------------------------------------------


def test_shard_bounds_cover_the_batch_in_order() -> None:
    assert [shard_bounds(32, r, 2) for r in range(2)] == [(0, 16), (16, 32)]
    assert [shard_bounds(31, r, 2) for r in range(2)] == [(0, 16), (16, 31)]
    assert [shard_bounds(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    for count in range(0, 20):
        for world in range(1, 5):
            bounds = [shard_bounds(count, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


class GradientRecorder(torch.optim.Optimizer):
    """Records each step's gradients and leaves the weights alone."""

    def __init__(self, params) -> None:
        super().__init__(params, {})
        self.steps: List[List[torch.Tensor]] = []

    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        self.steps.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])


@pytest.fixture
def one_process_group():
    """A 1-process gloo group, so that train_one_epoch's final all-reduce has a group to run in."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("count, world, batch", [(53, 2, 8), (26, 3, 4), (24, 2, 6)])
def test_rank_shards_average_to_the_global_batch_gradient(one_process_group, count: int, world: int,
                                                          batch: int) -> None:
    """Without DDP, each simulated rank's gradients are recorded; their mean (what DDP's
    all-reduce produces) equals the gradient of one process with batch B x W, for full
    batches, a ragged last batch (53 = 3 x 16 + 5, split 3 + 2), full ones (24 = 2 x 12) and one with fewer images
    than ranks (26 = 2 x 12 + 2 over 3 ranks), with crop-flip augmentation drawn per global batch."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (count, 1, 6, 6), dtype=torch.uint8)
    labels = torch.randint(0, 3, (count,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    mean, std = (0.5,), (0.25,)

    def gradients(shard, batch_size):
        recorder = GradientRecorder(model.parameters())
        train_one_epoch(model, recorder, images, labels, batch_size=batch_size, mean=mean, std=std,
                        generator=epoch_generator(3, 1), progress=False, shard=shard,
                        transform=train_transform("crop-flip", mean, std, augment_generator(3, 1)))
        return recorder.steps

    expected = gradients(None, batch * world)
    per_rank = [gradients((rank, world), batch) for rank in range(world)]
    assert all(len(steps) == len(expected) == -(-count // (batch * world)) for steps in per_rank)
    for step, reference in enumerate(expected):
        for index, tensor in enumerate(reference):
            averaged = sum(steps[step][index] for steps in per_rank) / world
            torch.testing.assert_close(averaged, tensor, rtol=1e-5, atol=1e-6)


# --- torchrun end to end ----------------------------------------------------------------


def test_two_processes_equal_one_process_with_twice_the_batch(ddp_run, single_run: Path) -> None:
    ddp, single = load_checkpoint(ddp_run["dir"]), load_checkpoint(single_run)
    assert ddp["epoch"] == single["epoch"] == 2
    assert ddp["model"].keys() == single["model"].keys()
    for name in ddp["model"]:
        torch.testing.assert_close(ddp["model"][name], single["model"][name], rtol=0, atol=1e-5, msg=name)
    # SplitLBI's own state: V (and the momentum buffers) match too, and so does the support.
    ddp_state, single_state = ddp["optimizer"]["state"], single["optimizer"]["state"]
    assert ddp_state.keys() == single_state.keys()
    v_count = 0
    for index in ddp_state:
        assert ddp_state[index].keys() == single_state[index].keys()
        for key, value in ddp_state[index].items():
            torch.testing.assert_close(value, single_state[index][key], rtol=0, atol=1e-5, msg=f"{index} {key}")
            v_count += key == "v"
    assert v_count == 5  # conv1-3, fc1-2 weights
    for epoch in (1, 2):
        ddp_masks, single_masks = load_masks(ddp_run["dir"], epoch), load_masks(single_run, epoch)
        assert all(torch.equal(ddp_masks[name], single_masks[name]) for name in single_masks)
    ddp_rows = read_rows(ddp_run["dir"] / "metrics.csv")
    single_rows = read_rows(single_run / "metrics.csv")
    assert 0 < float(ddp_rows[-1]["sparsity"]) < 1  # a partial support: the comparison means something
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        for column in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "sparse_test_acc", "sparsity"):
            assert float(ddp_row[column]) == pytest.approx(float(single_row[column]), abs=1e-4), column


def test_rank_zero_writes_the_run_directory_and_ranks_stay_in_sync(ddp_run, single_run: Path) -> None:
    run_dir = ddp_run["dir"]
    info = read_run_config(run_dir)
    assert info["world_size"] == 2 and info["batch_size"] == 16
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in single_run.iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch_0001.pt", "epoch_0002.pt", "last.pt"]
    assert len(read_rows(run_dir / "metrics.csv")) == 2
    # Layer names of the plain module, never DDP's "module." prefix.
    path_rows = read_rows(run_dir / "path.csv")
    assert {row["layer"] for row in path_rows} == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert [row[:3] for row in csv.reader((run_dir / "path.csv").open())] == \
        [row[:3] for row in csv.reader((single_run / "path.csv").open())]
    assert set(torch.load(run_dir / "init.pt", weights_only=True)) == set(load_checkpoint(run_dir)["model"])
    # Rank 0 alone logs: one summary per epoch, one "done"; the per-epoch check that all
    # ranks hold the same weights, buffers, momentum and V found nothing to repair.
    out = ddp_run["stdout"]
    assert out.count("epoch   1/2") == 1 and out.count("epoch   2/2") == 1 and out.count("done:") == 1
    assert "2 processes on cpu (global batch 32 = 16 x 2)" in out
    assert "differ" not in out + ddp_run["stderr"]
    assert len(load_checkpoint(run_dir)["rng_ranks"]) == 2


def test_distributed_resume_continues_exactly(ddp_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = splitlbi_train("--epochs", "1", "--batch-size", "16", "--out", str(run_dir))
    assert first.returncode == 0, first.stderr
    resumed = torchrun("-m", "splitlbi", "train", "--resume", str(run_dir), "--epochs", "2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and resumed.stdout.count("epoch   2/2") == 1
    straight, continued = load_checkpoint(ddp_run["dir"]), load_checkpoint(run_dir)
    for name in straight["model"]:
        assert torch.equal(straight["model"][name], continued["model"][name]), name
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, continued["optimizer"]["state"][index][key]), (index, key)
    assert without_seconds(read_rows(run_dir / "metrics.csv")) == \
        without_seconds(read_rows(ddp_run["dir"] / "metrics.csv"))
    # The global batch is --batch-size x processes: another process count is refused.
    with pytest.raises(SplitLBIError, match="2 process"):
        run_training(dataclasses.replace(SINGLE, batch_size=16, epochs=3), run_dir, resume=True, log=None)


WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from torch import nn
    from splitlbi.errors import SplitLBIError
    from splitlbi.optim import SplitLBI
    from splitlbi.train import distributed

    context, device = distributed.setup("cpu", torch.device)
    assert context.enabled and context.world_size == 2 and device.type == "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    optimizer = SplitLBI(model.named_parameters(), lr=0.1, nu=1.0, lam=0.01)
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    optimizer.step()
    assert distributed.check_in_sync(context, model, optimizer) == []
    if context.rank == 1:
        optimizer.state[model[0].weight]["v"][0, 0, 0, 0] += 1e-6
    assert distributed.check_in_sync(context, model, optimizer) == ["optimizer v of 0.weight"]
    distributed.resynchronize(context, model, optimizer)
    assert distributed.check_in_sync(context, model, optimizer) == []

    # A failure on rank 0 inside an agreement block stops rank 1 too instead of hanging it.
    try:
        with distributed.agreement(context):
            if context.is_main:
                raise OSError("disk full")
    except OSError:
        assert context.rank == 0
    except SplitLBIError as error:
        assert context.rank == 1 and "another process failed" in str(error)
    else:
        raise AssertionError("no error")
    distributed.shutdown()
    # The group and gloo's threads are gone (they used to outlive the interpreter when
    # torch._dynamo, which torch.optim imports, came after the group: aborts at exit).
    assert not dist.is_initialized()
    if os.path.isdir("/proc/self/task"):
        threads = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
        assert not [name for name in threads if "gloo" in name], threads
    with open(sys.argv[1] + f"/rank{context.rank}.ok", "w") as handle:
        handle.write("ok")
""")


def test_sync_check_detects_a_difference_and_failures_stop_all_ranks(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = torchrun(str(script), str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "rank0.ok").is_file() and (tmp_path / "rank1.ok").is_file()


def test_cuda_device_numbers_are_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitlbi.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SplitLBIError, match="cuda:LOCAL_RANK"):
        distributed.setup("cuda:1", torch.device)
    assert not dist.is_initialized()
