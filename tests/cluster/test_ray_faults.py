"""Ray worker pool on one local Ray instance (shared by the module): byte-identical output for 1, 2 and 4 workers
and any chunk size, workers dying mid-merge (before a unit, and after writing one but before reporting it),
a worker that cannot see the shared storage, and a driver SIGKILLed mid-merge then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # another module's instance: start clean with known resources
        ray.shutdown()
    # address="local": our own instance even if another session's cluster runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """Base + two experts with 6 decoder layers (9 work units, ~8 shards at 40KB), a task_arithmetic recipe, and
    the in-process (no Ray) output as the reference bytes."""
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("rayf")
    base = build_llm(root / "base", seed=4, num_hidden_layers=6, tokenizer=False)
    e1 = build_llm(root / "e1", base=base, perturb_seed=1, tokenizer=False)
    e2 = build_llm(root / "e2", base=base, perturb_seed=2, tokenizer=False)
    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {e1}\n    parameters: {{weight: 0.6}}\n  - model: {e2}\n    parameters: {{weight: 0.3}}\n"
    )
    (root / "r.yaml").write_text(text)
    (root / "r2.yaml").write_text(text.replace("0.3", "0.35"))
    execute(_plan(root / "r.yaml"), root / "ref", workers=0, progress=False)
    ref = _shards(root / "ref")
    assert len(ref) >= 5
    return {"root": root, "recipe": root / "r.yaml", "recipe2": root / "r2.yaml", "ref": ref}


def _plan(recipe):
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe

    return build_plan(load_recipe(recipe), shard_size="40KB", source=str(recipe))


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("model-*.safetensors"))}


def test_output_identical_for_1_2_4_workers_and_any_chunk_size(ray_local, family, tmp_path):
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.verify import verify_dir

    plan = _plan(family["recipe"])
    for workers, chunk in ((1, 1 << 20), (2, 300), (4, 64 << 20)):
        out = tmp_path / f"w{workers}"
        s = execute(plan, out, workers=workers, chunk_bytes=chunk, progress=False)
        assert _shards(out) == family["ref"], f"{workers} workers, chunk {chunk}"
        assert verify_dir(out) == []
        assert s["workers"] == workers and s["replaced_workers"] == 0
        assert sum(s["units_by_worker"].values()) == len(plan.units)  # every unit once
        assert sum(w["units"] for w in s["worker_stats"]) == len(plan.units)


def test_workers_killed_mid_merge_output_identical(ray_local, family, tmp_path, monkeypatch):
    """One worker exits before its 2nd unit; another exits after writing (fsync) its 3rd unit but before the
    driver hears of it. Both units are re-run elsewhere, counted once, and the bytes do not change."""
    from shardmerge.engine.run.executor import execute

    plan = _plan(family["recipe"])
    monkeypatch.setenv("SHARDMERGE_FAULT", f"crash:{tmp_path / 'tok_a'}:2,crash-after:{tmp_path / 'tok_b'}:3")
    s = execute(plan, tmp_path / "out", workers=2, chunk_bytes=700, progress=False)
    assert (tmp_path / "tok_a").exists() and (tmp_path / "tok_b").exists()  # both crashes happened
    assert s["replaced_workers"] == 2
    assert sum(s["units_by_worker"].values()) == len(plan.units)
    assert _shards(tmp_path / "out") == family["ref"]


def test_worker_that_cannot_see_the_inputs_fails_clearly(ray_local, family, tmp_path):
    import ray

    from shardmerge.engine.run.executor import execute

    plan = _plan(family["recipe"])
    missing = str(tmp_path / "not-mounted-here")
    with pytest.raises(RuntimeError, match=r"cannot see .*not-mounted-here.*shared filesystem"):
        execute(replace(plan, inputs=plan.inputs + (missing,)), tmp_path / "out", workers=1, progress=False)
    # the failed pool's worker is stopped and its 4 CPUs are free again
    _wait_for(lambda: ray.available_resources().get("CPU") == 4, 30, "the failed pool's CPUs to be released")


def _wait_for(pred, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _records(out: Path) -> list[dict]:
    from shardmerge.engine.io.shard_files import Journal

    return Journal(out).records()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_driver_killed_mid_merge_then_resume(ray_local, family, tmp_path):
    """`python -m shardmerge.jobs.merge` on the cluster is SIGKILLed once a shard is published; --resume keeps every
    journaled shard (same file, not rewritten), redoes only the rest, and the output is byte-identical."""
    from shardmerge.jobs.merge import main as merge_main
    from shardmerge.jobs.merge import run_merge

    out = tmp_path / "out"
    # the child inherits this process's import path, so it runs the same `shardmerge` as the module's Ray workers
    env = dict(os.environ, SHARDMERGE_FAULT="sleep:0.4")
    cmd = [
        sys.executable,
        "-m",
        "shardmerge.jobs.merge",
        str(family["recipe"]),
        "--out",
        str(out),
        "--workers",
        "2",
        "--address",
        ray_local,
        "--shard-size",
        "40KB",
        "--chunk-mb",
        "0.001",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(
            lambda: any("shard" in r for r in _records(out)) or proc.poll() is not None,
            120,
            "the first published shard",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, log
    recs = _records(out)
    workers = {int(r["worker"].rsplit(":", 1)[1]) for r in recs if "unit" in r}
    _wait_for(lambda: not any(_pid_alive(p) for p in workers), 60, "the dead driver's workers to exit")
    done = {r["shard"] for r in recs if "shard" in r}
    units_done = {r["unit"] for r in recs if "unit" in r}
    plan = _plan(family["recipe"])
    assert done and len(done) < len(plan.shards) and len(units_done) < len(plan.units)
    kept = {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in done}

    assert merge_main([str(family["recipe2"]), "--out", str(out), "--resume", "--workers", "0"]) == 2  # refused
    s = run_merge(family["recipe"], out, workers=2, resume=True, shard_size="40KB", chunk_mb=0.001, progress=False)
    assert s["verified"] and s["reused_shards"] == len(done)
    assert s["reused_units"] == len(units_done)  # every journaled unit re-verifies (fsync before journaling)
    assert s["units_run"] == len(plan.units) - s["reused_units"] == sum(s["units_by_worker"].values())
    assert _shards(out) == family["ref"]
    assert {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in done} == kept
    man = json.loads((out / "shardmerge_manifest.json").read_text())
    assert man["plan_hash"] == s["plan_hash"]
