"""Progress bars: one rule, for every command and loop, on whether to draw them.

A bar is drawn on stderr only where someone watches it: when stderr is a terminal (or in a
Jupyter notebook), unless asked for (`progress=True`, `--progress`) or turned off (`False`,
`--no-progress`). A log file or a pipe gets no carriage-return debris, and results printed on
stdout start on their own line.

    for batch in progress_bar(loader, desc="eval", enabled=None):   # None: only on a terminal
        ...
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["draw_progress", "labelled", "progress_bar", "write_line"]

_LABEL: ContextVar[str] = ContextVar("sparseft_line_label", default="")


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (its bars are widgets, not carriage returns on a file)."""
    ipython = sys.modules.get("IPython")  # never imported here: only a session that has it runs one
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def draw_progress(enabled: bool | None = None) -> bool:
    """Whether to draw a progress bar: `enabled` when True or False; None (the default): only when
    stderr is a terminal or a notebook shows the bar."""
    if enabled is not None:
        return bool(enabled)
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty()) or _in_notebook()
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, enabled: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (`tqdm.auto`: a widget in notebooks) over `iterable`, disabled unless `draw_progress(enabled)`.

    Other keyword arguments go to tqdm (`desc`, `total`, `unit`, `leave`, ...); a disabled bar
    still iterates and takes `update` calls.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not draw_progress(enabled), **kwargs)


def write_line(text: str) -> None:
    """Print a result line on stdout without breaking a bar that is being drawn (tqdm.write), after the label of
    the run it belongs to where one is set (`labelled`)."""
    from tqdm.auto import tqdm

    label = _LABEL.get()
    tqdm.write(f"{label} {text}" if label else text)


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Start every `write_line` inside the block with `label`: which of several runs of one command a line is
    about (`--lr auto`'s tuning runs: `[--lr auto: lr 0.003] epoch=1 ...`)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)
