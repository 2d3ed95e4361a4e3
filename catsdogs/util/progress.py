"""Progress bars on stderr, made in one place, and the step a long item is at.

On a terminal (or in a notebook) a bar redraws itself in place, as tqdm draws it. Anywhere else
(stderr sent to a file, CI, ``nohup``) a bar redrawn in place is a stream of carriage returns on
one line; there each redraw is a line of its own, at most one every ``CATSDOGS_PROGRESS_INTERVAL``
seconds (:data:`LOG_INTERVAL` unless set; 0 writes every redraw), and the bar's last state when it
closes, so ``tail -f`` reads a log.

A bar over items that each take long (a run whose five folds fine-tune a backbone) says which
step the current item is at: the code around the loop makes the bar the place where
:func:`step` writes (:func:`steps_on`), and the code doing the work calls :func:`step` at each
step. Work done in another process (a Ray worker) has no bar there, and its steps go nowhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from catsdogs.errors import ConfigError

#: seconds between two lines of a bar written to a file (a log), unless
#: ``CATSDOGS_PROGRESS_INTERVAL`` says otherwise
LOG_INTERVAL = 30.0

#: how a bar written to a file reads: no bar graphic, the counts, the times and the step
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}]{postfix}"

_step: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "catsdogs_progress_step", default=None)


def log_interval() -> float:
    """The seconds between two lines of a bar written to a file (``CATSDOGS_PROGRESS_INTERVAL``)."""
    raw = os.environ.get("CATSDOGS_PROGRESS_INTERVAL")
    if raw is None or not raw.strip():
        return LOG_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise ConfigError(f"CATSDOGS_PROGRESS_INTERVAL={raw!r}: expected seconds, a number >= 0 "
                          f"(0 writes every redraw); unset it for {LOG_INTERVAL:g}")
    return value


class _Lines:
    """The stream a bar writes to when stderr is not a terminal: each redraw (tqdm starts it
    with a carriage return, and clears the line with spaces) becomes one line, unless it says
    what the line before it said (the bar's last state, drawn again when it closes)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self._last:
            self._stream.write(line + "\n")
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool = True,
                 file: IO[str] | None = None) -> Any:
    """A tqdm bar on ``file`` (stderr): drawn in place on a terminal or in a notebook, one line
    per redraw (at most one every :func:`log_interval` seconds) anywhere else; a disabled bar
    (updates do nothing) when not ``enabled``."""
    from tqdm.auto import tqdm as auto_tqdm  # first: it quiets autonotebook's warning
    from tqdm.autonotebook import tqdm as notebook_tqdm  # tqdm.std's outside a notebook
    from tqdm.std import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    stream = sys.stderr if file is None else file
    if notebook_tqdm is not tqdm or _is_terminal(stream):  # a notebook's widget, or a terminal
        return auto_tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=log_interval(),
                miniters=1, bar_format=LOG_FORMAT, ascii=True)


@contextlib.contextmanager
def steps_on(bar: Any) -> Iterator[None]:
    """While inside, :func:`step` in this thread writes its text as the bar's postfix, redrawn
    at once, or in a log, where a line was written less than :func:`log_interval` seconds ago,
    as soon as that interval is over (a timer: the next update may be minutes away), unless
    another step or the bar's own redraw has shown something newer by then."""

    timer: threading.Timer | None = None  # shows a step the interval held back, at its end
    stepped_at = 0.0  # when the latest step was set

    def redraw() -> None:
        nonlocal timer
        with bar.get_lock():
            if bar.disable or not bar.postfix or bar.last_print_t > stepped_at:
                return  # closed, no step now, or a redraw of the bar's own has shown it
            now = time.time()
            wait = bar.last_print_t + bar.mininterval - now
            if wait <= 0:
                bar.refresh(nolock=True)
                bar.last_print_t = now
            elif timer is None:  # one line per interval: at its end
                timer = threading.Timer(wait, fired)
                timer.daemon = True
                timer.start()

    def fired() -> None:
        nonlocal timer
        with bar.get_lock():
            timer = None
        redraw()

    def show(text: str) -> None:
        nonlocal stepped_at
        if bar.disable:
            return
        with bar.get_lock():
            bar.set_postfix_str(text, refresh=False)
            stepped_at = time.time()
        redraw()

    token = _step.set(show)
    try:
        yield
    finally:
        _step.reset(token)
        with bar.get_lock():
            if timer is not None:
                timer.cancel()
                timer = None


def advance(bar: Any) -> None:
    """One item of ``bar`` is done: the step it was at (:func:`step`) no longer applies, and the
    bar counts it."""
    bar.set_postfix_str("", refresh=False)
    bar.update()


def step(text: str) -> None:
    """Say which step a long item is at ("efficientnet_lite2__finetune: fold 3/5") on the bar
    of the work around it (:func:`steps_on`), if that bar is in this process; nothing otherwise."""
    show = _step.get()
    if show is not None:
        show(text)


def fold_step(what: str, fold: int, folds: int) -> None:
    """:func:`step`: ``what`` starts training its fold ``fold`` (from 0) of ``folds`` (a holdout
    split has one)."""
    step(f"{what}: fold {fold + 1}/{folds}" if folds > 1 else f"{what}: training")


__all__ = ["LOG_FORMAT", "LOG_INTERVAL", "advance", "fold_step", "log_interval", "progress_bar", "step", "steps_on"]
