"""Progress bars: ``tqdm`` on a terminal, silent in files, pipes and with ``--no-progress``.

Every long-running piece of splitlbi (training and evaluation passes, activation
maximization, compaction, reproduce) draws its bar through :func:`progress_bar`, so
the rule is in one place:

* ``enabled=False`` (``--no-progress``): never shown;
* otherwise shown only when stderr is a terminal (``isatty()``), as tqdm's
  ``disable=None`` does; logs redirected to a file or a pipe stay clean.

A pseudo-terminal that reports no window size (0 x 0: ``docker exec -t``, ``script``,
some CI runners and editors) makes tqdm compute a negative number of rows and print
nothing at all; there the bar gets a fixed 100-column width instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm import tqdm

__all__ = ["progress_bar", "progress_enabled"]

#: Width of the bar when the terminal does not report one.
FALLBACK_COLUMNS = 100


def progress_enabled(enabled: Optional[bool] = None, stream: Optional[TextIO] = None) -> bool:
    """Whether a bar would be drawn: ``enabled`` is not False and ``stream`` (default
    stderr) is a terminal."""
    if enabled is False:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _terminal_columns(stream: TextIO) -> Optional[int]:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return None
    return columns if columns > 0 else None


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
                 description: Optional[str] = None, enabled: Optional[bool] = None, unit: str = "batch",
                 leave: bool = False, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar on stderr, drawn only on a terminal (see the module docstring).

    Args:
        iterable, total: as for ``tqdm``.
        description: the text before the bar (``desc``), e.g. ``"epoch 3/20"``.
        enabled: ``False`` never draws it (``--no-progress``); ``True`` or ``None``
            draw it when stderr is a terminal.
        leave: keep the finished bar on screen (default: erase it, so that the one
            summary line per epoch stays the only permanent output).
        kwargs: passed on to ``tqdm``.
    """
    stream = sys.stderr
    show = progress_enabled(enabled, stream)
    options: dict = dict(desc=description, file=stream, leave=leave, unit=unit, disable=not show)
    if show:
        if _terminal_columns(stream) is None:
            # 0 x 0 pseudo-terminal: tqdm would hide the bar, give it a size.
            options.update(ncols=FALLBACK_COLUMNS, nrows=50, dynamic_ncols=False)
        else:
            options.update(dynamic_ncols=True)
    options.update(kwargs)
    return tqdm(iterable, total=total, **options)
