"""Small helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import csv
import os
import subprocess
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_environment() -> dict:
    """The environment of a child ``python -m splitlbi``: it imports splitlbi from this checkout
    even where it is not installed, never downloads, and takes one thread."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "SPLITLBI_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


#: Python source that makes any later import of splitlbi fail: put before code that must run on
#: torch alone (a deployed ``.pt2``).
NO_SPLITLBI = textwrap.dedent("""
    import importlib.abc, sys

    class NoSplitLBI(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "splitlbi" or name.startswith("splitlbi."):
                raise ImportError("splitlbi must not be needed to run the exported program")
            return None

    sys.meta_path.insert(0, NoSplitLBI())
""")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A CLI process failed the way user errors must: exit 2, one ``splitlbi: error:`` line
    on stderr containing every fragment, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("splitlbi: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
