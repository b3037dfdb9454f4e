"""The merge's progress display and phase lines tell the truth: rates over the bytes this run merged, from when
merging began (not a resumed run's earlier bytes, not the wait for Ray), scaled units (a tiny merge is not
'0.00 MiB/s'), an ETA, and plain lines on a pipe (what `ray job logs` shows)."""

from __future__ import annotations

import io
import re

from shardmerge.engine import phases
from shardmerge.engine.run.driver import Progress

MiB = 2**20


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_resumed_run_rate_counts_only_this_runs_bytes():
    """1 GiB already merged by the interrupted run, 8 MiB more in 2 s: 4 MiB/s, not (1 GiB + 8 MiB) / 2 s."""
    clock, stream = Clock(), io.StringIO()
    bar = Progress(1024 * MiB + 16 * MiB, 1024 * MiB, 20, 18, enabled=True, stream=stream, clock=clock)
    clock.t += 30  # Ray and the workers starting: not merging time
    bar.begin()
    clock.t += 2
    bar.update(8 * MiB)
    line = bar.line()
    assert "4 MiB/s" in line, line
    assert "ETA 2.0 s" in line, line  # 8 MiB left at 4 MiB/s
    assert "units 19/20" in line and "99.2%" in line, line
    assert bar.merged() == 8 * MiB and bar.seconds() == 2


def test_tiny_merge_rate_is_scaled_not_zero():
    clock, stream = Clock(), io.StringIO()
    bar = Progress(30_000, 0, 3, 0, enabled=True, stream=stream, clock=clock)
    bar.begin()
    clock.t += 0.05
    bar.update(30_000, 3)
    bar.close()
    last = stream.getvalue().strip().splitlines()[-1]
    assert "0.00" not in last and "586 KiB/s" in last, last  # 30000 B / 0.05 s = 585.9 KiB/s
    assert "0.03/0.03 MiB" in last and "100.0%" in last and "ETA 0.0 s" in last, last


def test_nothing_merged_yet_says_so():
    clock = Clock()
    bar = Progress(10 * MiB, 0, 5, 0, enabled=True, stream=io.StringIO(), clock=clock)
    bar.begin()
    assert "n/a" in bar.line() and "ETA ?" in bar.line()


def test_plain_lines_on_a_pipe_at_begin_every_interval_and_at_the_end():
    clock, stream = Clock(), io.StringIO()
    bar = Progress(100 * MiB, 0, 100, 0, enabled=True, stream=stream, clock=clock, interval=10)
    assert stream.getvalue() == ""  # nothing before merging begins (the phase lines cover that time)
    bar.begin()
    for _ in range(30):
        clock.t += 1
        bar.update(MiB)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 3 + 1 and all(ln.startswith("merge: ") and "\r" not in ln for ln in lines), lines
    assert "1 MiB/s" in lines[-1] and "ETA 1m10s" in lines[-1], lines[-1]


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    bar = Progress(10, 0, 1, 0, enabled=False, stream=stream)
    bar.begin()
    bar.update(10)
    bar.close()
    assert stream.getvalue() == ""


def test_phase_lines_have_the_elapsed_time_and_only_print_while_reporting():
    clock, stream = Clock(0.0), io.StringIO()
    phases.phase("planning")  # nobody reporting: silent
    with phases.reporting(phases.Phases("shardmerge merge", stream=stream, clock=clock)) as p:
        phases.phase("planning", "r.yaml")
        clock.t = 12.34
        phases.phase("starting Ray")
        with phases.reporting(phases.Phases("inner", stream=stream)) as inner:  # a nested command reports to the outer
            assert inner is p
            clock.t = 75
            phases.phase("merging")
    assert stream.getvalue().splitlines() == [
        "shardmerge merge: [  0.0 s] planning: r.yaml",
        "shardmerge merge: [ 12.3 s] starting Ray",
        "shardmerge merge: [  1m15s] merging",
    ]
    assert phases.active() is None
    quiet = io.StringIO()
    with phases.reporting(phases.Phases("x", enabled=False, stream=quiet)) as q:
        phases.phase("planning")
    assert quiet.getvalue() == "" and q.names == ["planning"]


def test_size_rate_duration_formats():
    assert [phases.size(n) for n in (0, 1023, 1024, 1536, 10 * MiB, 1000 * MiB, 3 * 2**30)] == [
        "0 B",
        "1023 B",
        "1 KiB",
        "1.5 KiB",
        "10 MiB",
        "1000 MiB",
        "3 GiB",
    ]
    assert phases.rate(0, 5) == "n/a" and phases.rate(5, 0) == "n/a" and phases.rate(2 * MiB, 4) == "512 KiB/s"
    assert [phases.duration(s) for s in (0.04, 59.9, 61, 3725)] == ["0.0 s", "59.9 s", "1m01s", "1h02m"]
    assert re.fullmatch(r"\d+(\.\d+)? [KMG]iB/s", phases.rate(123456789, 3.3))
