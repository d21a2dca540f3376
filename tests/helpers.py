"""Small helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path


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
