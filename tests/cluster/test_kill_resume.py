"""SIGKILL of the whole merge job at seeded random points, 20 trials, each followed by `--resume`: the output is
byte-identical to an uninterrupted merge every time.

Each trial's job is `python -m shardmerge.jobs.merge ... --workers 0` (one process, in-process units) forked from a small
server process that imported the engine once, so 20 trials do not pay 20 interpreter and torch start-ups; the
server never runs a torch operation, so forking it is safe. The server kills the job `delay` seconds after its
journal appears, delays drawn uniformly over 1.25 times what an uninterrupted job takes from journal to manifest
(so kills land at the start, inside units, between a shard's rename and its journal line, in the metadata step,
after the manifest, or not at all). The resume runs in the test process and must finish and verify; the on-disk
state each kill left is tallied and printed (BENCHMARKS.md records runs).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shardmerge.engine.io.shard_files import Journal
from shardmerge.engine.io.writer import MANIFEST
from shardmerge.jobs.merge import run_merge

REPO = Path(__file__).resolve().parents[2]
TRIALS, SEED = 20, 20261122
ARGS = ["--workers", "0", "--shard-size", "40KB", "--chunk-mb", "0.001", "--no-progress"]

SERVER = r"""
import json, os, signal, sys, time
import shardmerge.jobs.merge, shardmerge.engine.run.executor, shardmerge.engine.run.unit, shardmerge.engine.methods
shardmerge.engine.methods.names()  # every import before the first fork; no torch operation runs in this process
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = shardmerge.jobs.merge.main(req["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    journal = os.path.join(req["out"], ".shardmerge", "journal.jsonl")
    manifest = os.path.join(req["out"], "shardmerge_manifest.json")
    started = to_manifest = None
    killed, status = False, None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        now = time.monotonic()
        if done:
            status = st
        elif started is None and os.path.exists(journal):
            started = now
        elif started is not None and to_manifest is None and os.path.exists(manifest):
            to_manifest = now - started
        if status is None and started is not None and req["delay"] is not None and now - started >= req["delay"]:
            os.kill(pid, signal.SIGKILL)  # the child is not reaped yet: this pid is still ours
            killed, status = True, os.waitpid(pid, 0)[1]
        if status is None:
            time.sleep(0.0005)
    print(json.dumps({"killed": killed, "exit": os.waitstatus_to_exitcode(status), "to_manifest": to_manifest}),
          flush=True)
"""


class JobServer:
    """The fork server: `trial(out, delay)` runs one merge job into `out` and SIGKILLs it `delay` s after its
    journal appears (None: let it finish)."""

    def __init__(self, recipe: Path, logs: Path):
        self.recipe, self.logs, self.n = recipe, logs, 0
        env = dict(os.environ, OMP_NUM_THREADS="1")  # the shardmerge under test, as imported here
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], cwd=REPO, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def trial(self, out: Path, delay) -> dict:
        self.n += 1
        log = self.logs / f"job{self.n}.log"
        req = {"argv": [str(self.recipe), "--out", str(out), *ARGS], "out": str(out), "delay": delay, "log": str(log)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the job server died (exit {self.proc.wait()})")
        return dict(json.loads(line), log=log.read_text() if log.exists() else "")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _tree(out: Path) -> dict[str, bytes]:
    """Every output file but the run summary (it records this run's times)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "shardmerge_summary.json"
    }


def _phase(out: Path, units: int) -> str:
    """Where the kill landed, read from what it left on disk."""
    if (out / MANIFEST).exists():
        return "after the manifest"
    recs = Journal(out).records()
    done = sum("unit" in r for r in recs)
    if done == 0:
        return "before the first unit"
    if done < units:
        return "inside the merge"
    return "metadata step"


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.tiny_models import build_llm

    base = build_llm(tmp_path / "base", seed=3, num_hidden_layers=6, hidden_size=64, intermediate_size=128)
    e1 = build_llm(tmp_path / "e1", base=base, perturb_seed=1, tokenizer=False)
    e2 = build_llm(tmp_path / "e2", base=base, perturb_seed=2, tokenizer=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {e1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {e2}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
    )
    plan = build_plan(load_recipe(recipe), shard_size="40KB", source=str(recipe))
    assert len(plan.shards) >= 5 and len(plan.units) == 9
    (tmp_path / "logs").mkdir()
    server = JobServer(recipe, tmp_path / "logs")
    try:
        clean = server.trial(tmp_path / "clean", None)
        assert clean["exit"] == 0 and not clean["killed"] and clean["to_manifest"], clean["log"]
        reference = _tree(tmp_path / "clean")
        rng = random.Random(SEED)
        phases: dict[str, int] = {}
        for i in range(TRIALS):
            out = tmp_path / f"t{i}"
            res = server.trial(out, rng.uniform(0.0, 1.25 * clean["to_manifest"]))
            phase = _phase(out, len(plan.units)) if res["killed"] else "exited before the kill"
            phases[phase] = phases.get(phase, 0) + 1
            s = run_merge(recipe, out, workers=0, resume=True, shard_size="40KB", chunk_mb=0.001, progress=False)
            assert s["verified"], (i, phase)
            assert _tree(out) == reference, f"trial {i} (killed {phase}): output differs after --resume"
    finally:
        server.close()
    print(
        f"\nkill-resume: {TRIALS}/{TRIALS} byte-identical; kills by phase: {json.dumps(phases, sort_keys=True)}; "
        f"clean job journal->manifest {clean['to_manifest']:.2f} s"
    )
    assert phases.get("inside the merge", 0) >= TRIALS // 2, phases  # the sweep really interrupts merges
