"""Progress bars for the steps that can take more than a few seconds (calibration, searches, kernel timing).

One place decides whether a bar is drawn: ``bar`` returns a tqdm bar that is silent when stderr is not a terminal
(tqdm's ``disable=None``) or inside ``enabled(False)`` (``fxforge.compile(..., progress=False)``), and drawn
inside ``enabled(True)`` even off a terminal (a notebook cell, a log file the user asked for).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

_ENABLED: ContextVar[bool | None] = ContextVar("fxforge_progress", default=None)  # None: when stderr is a TTY


@contextlib.contextmanager
def enabled(flag: bool | None) -> Iterator[None]:
    """Within the block, bars are drawn (True), never drawn (False) or drawn when stderr is a terminal (None)."""
    token = _ENABLED.set(flag)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def disable_flag() -> bool | None:
    """tqdm's ``disable``: True (silent), False (always drawn) or None (drawn when stderr is a terminal)."""
    flag = _ENABLED.get()
    return None if flag is None else not flag


def bar(iterable: Iterable[Any] | None = None, *, desc: str, unit: str = "it", total: int | None = None,
        leave: bool = False, show: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand with ``total``), drawn only when progress is on (and
    ``show``: a caller's own switch, e.g. a search run inside another one)."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave,
                disable=disable_flag() if show else True, dynamic_ncols=True)


def write(text: str) -> None:
    """Print a line to stdout without breaking a bar being drawn."""
    tqdm.write(text)
