"""Ctrl-C (SIGINT) and SIGTERM during `shardmerge merge` on the embedded Ray: the driver cancels its workers,
leaves the journal and temp shards for --resume, prints one line naming the output directory and the exact command
that continues it, and exits 130 / 143 without a traceback; that command then completes the merge byte-identically
to an uninterrupted one."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardmerge.engine.io.output_dir import SUMMARY
from shardmerge.engine.io.shard_files import Journal
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.jobs.merge import main as merge_main

REPO = Path(__file__).resolve().parents[2]
TA = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.7}}\n"
)
ARGS = ["--shard-size", "30KB", "--chunk-mb", "0.002", "--no-progress"]


def _files(out: Path) -> dict[str, bytes]:
    """Every output file but the run summary (it records this run's times)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != SUMMARY}


@pytest.fixture(scope="module")
def reference(llm_family, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("interrupt")
    recipe = d / "r.yaml"
    recipe.write_text(TA.format(**llm_family))
    assert merge_main([str(recipe), "--out", str(d / "clean"), "--workers", "0", *ARGS]) == 0
    return {"recipe": recipe, "files": _files(d / "clean")}


# Both signals while the driver waits in Ray's native wait loop (most of a merge's time): SIGTERM used to come out of
# that loop as SystemExit(1), now it is a KeyboardInterrupt subclass, which the loop passes on.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_merge_then_resume(sig, reference, tmp_path, capsys):
    out = tmp_path / "out"
    env = dict(
        os.environ,
        SHARDMERGE_FAULT="sleep:1.5",
        OMP_NUM_THREADS="1",
        RAY_TMPDIR=os.environ.get("RAY_TMPDIR", "/tmp/ray"),
    )
    env.pop("RAY_ADDRESS", None)
    argv = [str(reference["recipe"]), "--out", str(out), "--workers", "1", *ARGS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardmerge.jobs.merge", *argv],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    journal, deadline = Journal(out), time.monotonic() + 240
    while not any("unit" in r for r in journal.records()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()  # still merging: one unit done, more to go
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert line.startswith(f"shardmerge merge: interrupted by {name}") and str(out) in line, line
    assert not (out / MANIFEST).exists() and journal.records()  # unfinished, resumable
    cmd = shlex.split(line.split("Continue it with: ", 1)[1])
    assert cmd[:2] == ["shardmerge", "merge"] and cmd[-1] == "--resume" and "--workers" in cmd
    i = cmd.index("--workers")
    cmd[i + 1] = "0"  # the same command, run in this process
    assert merge_main(cmd[2:]) == 0
    assert _files(out) == reference["files"]
    assert (out / SUMMARY).is_file() and set(reference["files"]) | {SUMMARY} == {p.name for p in out.iterdir()}


def test_sigterm_handler_gives_the_resume_line(reference, tmp_path, capsys, monkeypatch):
    """SIGTERM raised inside the merge (as the handler does): one line naming --out and the resume command, 143."""
    import shardmerge.jobs.merge as jm

    def stop(*a, **k):
        jm._on_sigterm(signal.SIGTERM, None)

    monkeypatch.setattr(jm, "run_merge", stop)
    out = tmp_path / "out"
    capsys.readouterr()
    assert jm.main([str(reference["recipe"]), "--out", str(out), "--workers", "0", *ARGS]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("shardmerge merge: interrupted by SIGTERM") and str(out) in err[-1]
    cmd = err[-1].split("Continue it with: ", 1)[1]
    assert cmd.endswith(" --resume") and "--overwrite" not in cmd, cmd
    for opt in ("--workers 0", "--shard-size 30KB", "--chunk-mb 0.002", "--no-progress"):
        assert f" {opt} " in cmd, cmd
