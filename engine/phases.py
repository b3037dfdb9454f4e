"""One line per phase of a command (planning, starting Ray and workers, merging, writing metadata, verifying, ...),
each with the time elapsed since the command started, on stderr, so a run says what it is doing from its first
second, in a terminal and in `ray job logs` alike (plain lines, no carriage returns).

A command opens `reporting(Phases(...))`; engine code calls `phase(name, detail)`, which prints nothing when no
command is reporting (library use, tests) or when the command's progress display is off. Also here: the size, rate
and duration formats the progress display shares.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Phases:
    def __init__(self, prog: str, *, enabled: bool = True, stream=None, clock: Callable[[], float] = time.monotonic):
        self.prog, self.enabled, self.stream, self.clock = prog, enabled, stream, clock
        self.t0 = clock()
        self.names: list[str] = []

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def __call__(self, name: str, detail: str = "") -> None:
        self.names.append(name)
        if self.enabled:
            text = f"{self.prog}: [{duration(self.elapsed()):>7}] {name}" + (f": {detail}" if detail else "")
            print(text, file=self.stream or sys.stderr, flush=True)


_current: list[Phases] = []


@contextmanager
def reporting(phases: Phases) -> Iterator[Phases]:
    """Make `phases` the reporter of `phase()` calls inside the block (an outer reporter is kept: a command that
    runs another, like plam running merges, reports for both)."""
    if _current:
        yield _current[-1]
        return
    _current.append(phases)
    try:
        yield phases
    finally:
        _current.pop()


def phase(name: str, detail: str = "") -> None:
    if _current:
        _current[-1](name, detail)


def active() -> Phases | None:
    return _current[-1] if _current else None


def size(nbytes: float) -> str:
    """1023 B, 1.50 KiB, 12.3 MiB, 1.07 GiB: three significant digits from KiB up."""
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}" if nbytes < 1000 else f"{nbytes:.0f} {unit}"
    raise AssertionError("unreachable")


def rate(nbytes: float, seconds: float) -> str:
    """Bytes per second over an interval; 'n/a' when nothing was done or no time has passed yet."""
    if nbytes <= 0 or seconds <= 0:
        return "n/a"
    return f"{size(nbytes / seconds)}/s"


def duration(seconds: float) -> str:
    """0.4 s, 12.3 s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"
