"""Kill a splitlbi command in the middle of its k-th write: the fault injection shared by
``scripts/kill_resume_stress.py`` (a real SIGKILL in a child process) and the tests (an
exception in the test process, which leaves the same files behind).

The writes counted are every atomic file write (:mod:`splitlbi.utils.io`), every
``metrics.csv`` / ``path.csv`` append (:func:`splitlbi.train.rundir.append_rows`) and every
file copied by ``shutil.copyfile`` (``splitlbi reproduce --reuse``'s copytree copies through it). The k-th one writes half
of its bytes (to the atomic write's temporary file, appended, or copied), then ``die()``.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, Callable, List


class KillPoints:
    """The installed patches: ``count`` is the number of writes so far; :meth:`uninstall` undoes them."""

    def __init__(self, kill_at: int, die: Callable[[], None]) -> None:
        from splitlbi.train import rundir
        from splitlbi.utils import io as atomic

        self.kill_at, self.die, self.count = kill_at, die, 0
        self._undo: List[Callable[[], None]] = []
        self._patch(atomic, "_atomic_write", self._atomic_write)
        self._patch(rundir, "append_rows", self._append_rows)  # looked up at call time by rundir's writers
        self._patch(shutil, "copyfile", self._copyfile)

    def _patch(self, module: Any, name: str, replacement: Callable[..., Any]) -> None:
        original = getattr(module, name)
        setattr(self, f"_original_{name}", original)
        setattr(module, name, replacement)
        self._undo.append(lambda: setattr(module, name, original))

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _due(self) -> bool:
        self.count += 1
        return self.count == self.kill_at

    def _atomic_write(self, path: Any, write: Callable[[Any], Any], needed: Callable[[], int]) -> None:
        if self._due():
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            destination = Path(path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            (destination.parent / f".{destination.name}.killed.tmp").write_bytes(data[: len(data) // 2])
            self.die()
        return self._original__atomic_write(path, write, needed)  # type: ignore[attr-defined]

    def _append_rows(self, path: Path, rows: Any) -> str:
        rows = [list(row) for row in rows]
        if self._due():
            text = "".join(",".join(row) + "\n" for row in rows)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(text[: len(text) // 2])
            self.die()
        return self._original_append_rows(path, rows)  # type: ignore[attr-defined]

    def _copyfile(self, source: Any, destination: Any, **kwargs: Any) -> Any:
        if self._due():
            data = Path(source).read_bytes()
            Path(destination).write_bytes(data[: len(data) // 2])
            self.die()
        return self._original_copyfile(source, destination, **kwargs)  # type: ignore[attr-defined]
