"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter (tests/test_fused.py).
# Triton reads this when it is imported, so it is set before any test can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder of real datasets, by the one rule of README.md ("Data"): ``$SPLITLBI_DATA``,
    as for ``splitlbi`` itself; when it is unset, ``../shared/data`` next to the checkout
    (the tests never download, so the CLI's fallback, the download cache, is not used).

    Skips the test when the folder is absent, except on CI (``CI=true``), where a
    missing folder is a setup error and fails the test.
    """
    from_env = os.environ.get("SPLITLBI_DATA")
    path = Path(from_env) if from_env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        reason = f"real datasets not found at {path} (set SPLITLBI_DATA to the folder holding mnist/raw/)"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test downloads anything: a missing file must fail fast, not hang on the network."""
    monkeypatch.setenv("SPLITLBI_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): the CPU is shared, and OpenMP
    spinning under contention makes small forwards slow. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
