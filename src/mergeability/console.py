"""What long work shows while it runs, and the tables it prints when done.

On a terminal: rich progress bars. Off one (a pipe, a log file, CI, a job scheduler) the bars would print
nothing until the end, so each stage prints one plain line at most every `interval` seconds, with done/total,
elapsed time and ETA, and a last line when it completes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

INTERVAL = 10.0  # seconds between plain progress lines of one stage


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainBar:
    """One stage's progress as plain lines: at most one per `interval` seconds, and one at completion."""

    def __init__(self, console: Console, name: str, total: int, completed: int, interval: float):
        self.console, self.name, self.total, self.done = console, name, total, completed
        self.interval, self.start, self.first = interval, time.monotonic(), completed
        self.last = -float("inf")
        self._line(force=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._line(force=self.done >= self.total)

    def finish(self) -> None:
        """The stage ended before its total (a bound, not a count): what was done is the total."""
        if self.done < self.total:
            self.total = self.done
            self._line(force=True)

    def _line(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.console.print(f"{self.name:<10} {self.done}/{self.total} ({pct:.0f}%)  elapsed {_clock(elapsed)}  "
                           f"ETA {eta}", highlight=False, soft_wrap=True)


class RichBar:
    def __init__(self, progress: Progress, name: str, total: int, completed: int):
        self.progress, self.task = progress, progress.add_task(name, total=total, completed=completed)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def finish(self) -> None:
        done = next(t.completed for t in self.progress.tasks if t.id == self.task)
        self.progress.update(self.task, total=done)


class Bars:
    """Opens one bar per stage: `bars.stage(name, total, completed)` returns an object with `advance()`, and
    `finish()` for a stage whose total was a bound and that ended below it."""

    def __init__(self, console: Console, progress: Progress | None, interval: float):
        self.console, self.progress, self.interval = console, progress, interval

    def stage(self, name: str, total: int, completed: int = 0):
        if self.progress is not None:
            return RichBar(self.progress, name, total, completed)
        return PlainBar(self.console, name, total, completed, self.interval)


@contextlib.contextmanager
def progress(console: Console, interval: float = INTERVAL) -> Iterator[Bars]:
    """Progress for a block of stages: bars on a terminal, plain lines elsewhere."""
    if not console.is_terminal:
        yield Bars(console, None, interval)
        return
    bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    with bars:
        yield Bars(console, bars, interval)


def natural_width(console: Console, renderable) -> int:
    """The columns `renderable` takes unconstrained (at least the console's width)."""
    return max(console.width, console.measure(renderable, options=console.options.update_width(10_000)).maximum)


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table of strings; the first column left-aligned, the others right-aligned."""
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    if console.is_terminal:
        console.print(t)
        return
    # Off a terminal (a log, a pipe) nobody resizes the window: print the table at its natural width rather than
    # squeeze it into 80 columns, which cut every task name to "task0…" (print's width= can only narrow).
    width = console.width
    console.width = natural_width(console, t)
    try:
        console.print(t)
    finally:
        console.width = width
