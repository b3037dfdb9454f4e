"""The benchmark's page-fault and floor accounting (jobs/bench_common.py, jobs/bench_mergekit.py)."""

from __future__ import annotations

import mmap
import os
import resource
import sys

from shardmerge.jobs.bench_common import _minflt, run_child
from shardmerge.jobs.bench_mergekit import add_floor

PAGES = (64 << 20) // mmap.PAGESIZE


def _touch_fresh_pages(nbytes: int) -> None:
    """Write one byte per page of a fresh anonymous mapping (no huge pages): one minor fault per page."""
    m = mmap.mmap(-1, nbytes)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    m[:: mmap.PAGESIZE] = b"\1" * (nbytes // mmap.PAGESIZE)
    m.close()


def test_minflt_counts_first_touch_faults_of_this_process():
    before = _minflt(os.getpid())
    assert before > 0
    _touch_fresh_pages(64 << 20)
    assert _minflt(os.getpid()) - before >= PAGES
    assert _minflt(2**22 + 12345) == 0  # no such process


def test_run_child_reports_the_childs_faults():
    code = f"from tests.unit.test_bench_faults import _touch_fresh_pages; _touch_fresh_pages({64 << 20})"
    small = run_child([sys.executable, "-c", "pass"]).mem["process_minflt"]
    big = run_child([sys.executable, "-c", code], env={"PYTHONPATH": os.pathsep.join(sys.path)}).mem["process_minflt"]
    assert small > 0 and big - small >= PAGES
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt >= big


def test_floor_counts_the_inputs_a_method_reads():
    floor = {"read_s": 3.0, "write_fsync_s": 1.0}
    assert add_floor({"method": "linear"}, floor, 3)["floor_s"] == 4.0
    assert add_floor({"method": "slerp"}, floor, 3)["floor_s"] == 3.0  # base + one expert: 2 of 3 read
