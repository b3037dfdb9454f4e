"""Executor without Ray: pure resource functions, exactly-once accounting, driver lock, resume (re-verified from the
journal, refused for another plan), idempotent reruns and finalisation, progress lines, fault-spec parsing and
the environment-only fault hook, RunOptions built from execute's arguments."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

GB = 10**9


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """Base + two experts with 4 decoder layers (7 work units), and a task_arithmetic recipe."""
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("exec")
    base = build_llm(root / "base", seed=3, num_hidden_layers=4, tokenizer=False)
    e1 = build_llm(root / "e1", base=base, perturb_seed=1, tokenizer=False)
    e2 = build_llm(root / "e2", base=base, perturb_seed=2, tokenizer=False)
    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {e1}\n    parameters: {{weight: 0.7}}\n  - model: {e2}\n    parameters: {{weight: 0.4}}\n"
    )
    (root / "r.yaml").write_text(text)
    (root / "r2.yaml").write_text(text.replace("0.4", "0.5"))
    return {"root": root, "recipe": root / "r.yaml", "recipe2": root / "r2.yaml"}


def _plan(recipe, shard_size="40KB"):
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe

    return build_plan(load_recipe(recipe), shard_size=shard_size, source=str(recipe))


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("model-*.safetensors"))}


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory) -> dict[str, bytes]:
    from shardmerge.engine.run.executor import execute

    out = tmp_path_factory.mktemp("ref") / "out"
    execute(_plan(family["recipe"]), out, workers=0, progress=False)
    shards = _shards(out)
    assert len(shards) >= 3
    return shards


# ---------------------------------------------------------------------------------------------------------------
# pure resource functions
# ---------------------------------------------------------------------------------------------------------------


def test_resource_options_cpu_cuda_memory_and_placement():
    from shardmerge.engine.run.ray_pool import resource_options

    cpu = resource_options("cpu", cpus_per_worker=3)
    assert cpu == {"num_cpus": 3, "max_restarts": 0, "max_task_retries": 0, "scheduling_strategy": "SPREAD"}
    gpu = resource_options("cuda", memory_bytes=8 * GB, spread=False)
    assert gpu == {"num_cpus": 1, "max_restarts": 0, "max_task_retries": 0, "num_gpus": 1, "memory": 8 * GB}
    pinned = resource_options("cpu", node_id="ab" * 28)
    assert type(pinned["scheduling_strategy"]).__name__ == "NodeAffinitySchedulingStrategy"
    assert pinned["scheduling_strategy"].soft is True
    for bad in (dict(device="tpu"), dict(device="cpu", cpus_per_worker=0), dict(device="cpu", memory_bytes=-1)):
        with pytest.raises(ValueError):
            resource_options(bad.pop("device"), **bad)


def test_worker_count_cpus_capacity_and_placement_problem():
    from shardmerge.engine.run.ray_pool import capacity, default_worker_count, placement_problem, worker_cpus

    assert default_worker_count("cuda", {"CPU": 64, "GPU": 8}) == 8
    assert default_worker_count("cpu", {"CPU": 7}) == 7
    assert default_worker_count("cpu", {"CPU": 1}) == 1
    assert worker_cpus("cpu", 2, [2.0]) == 1
    assert worker_cpus("cpu", 1, [2.0]) == 2
    assert worker_cpus("cpu", 1, [4.0, 16.0]) == 16  # never more than one node holds
    assert worker_cpus("cpu", 3, [4.0, 16.0]) == 6
    assert worker_cpus("cuda", 8, [96.0]) == 1
    with pytest.raises(ValueError):
        worker_cpus("cpu", 0, [2.0])
    nodes = [{"CPU": 4.0, "memory": 8 * GB}, {"CPU": 2.0, "memory": 3 * GB}, {"CPU": 8.0}]
    opts = {"num_cpus": 1, "memory": 2 * GB}
    assert capacity(opts, nodes) == 4 + 1 + 0  # memory-bound on the first two, no memory on the third
    assert capacity({"num_cpus": 1, "num_gpus": 1}, [{"CPU": 8, "GPU": 2}, {"CPU": 8}]) == 2
    assert placement_problem(opts, nodes, 5) is None
    msg = placement_problem(opts, nodes, 6)
    assert "6 merge worker(s)" in msg and "hold 5" in msg and "--max-memory-per-worker" in msg


def test_worker_memory_floor_is_the_largest_tensors_chunk_buffers(family):
    from shardmerge.engine.run.executor import WORKER_BASE_BYTES, check_memory_budget, worker_memory_floor

    plan = _plan(family["recipe"])
    # tiny llama: embed/lm_head 128x32 are the largest; whole tensors fit 1 MiB: 2 experts + base + result + cast
    floor, where = worker_memory_floor(plan, 1 << 20)
    assert floor == WORKER_BASE_BYTES + 128 * 32 * 4 * 5 and where == "model.embed_tokens.weight"
    # 256-byte chunks: 2 rows of 32 floats (or 1 row of 64) per input
    assert worker_memory_floor(plan, 256)[0] == WORKER_BASE_BYTES + 64 * 4 * 5
    check_memory_budget(plan, 1 << 20, floor)
    check_memory_budget(plan, 1 << 20, None)
    with pytest.raises(ValueError, match="below one worker's estimated peak"):
        check_memory_budget(plan, 1 << 20, floor - 1)


# ---------------------------------------------------------------------------------------------------------------
# accounting, lock, progress, faults
# ---------------------------------------------------------------------------------------------------------------


def test_driver_accounts_every_unit_exactly_once(family, tmp_path):
    from shardmerge.engine.run.driver import Driver
    from shardmerge.engine.run.executor import open_output
    from shardmerge.engine.run.unit import UnitResult

    plan = _plan(family["recipe"])
    state = open_output(plan, tmp_path, resume=False, overwrite=False)
    drv = Driver(plan, tmp_path, state, False)
    assert sorted(drv.todo) == [u.id for u in plan.units]
    res = UnitResult(0, {}, plan.units[0].nbytes, 0.0, "w")
    drv.unit_finished(res)
    with pytest.raises(RuntimeError, match="reported twice"):
        drv.unit_finished(res)
    with pytest.raises(RuntimeError, match="did not schedule it"):
        drv.unit_finished(UnitResult(len(plan.units), {}, 0, 0.0, "w"))
    with pytest.raises(RuntimeError, match=r"work units \[1, 2"):
        drv.finish()
    os.close(state.lock_fd)


def test_second_driver_on_same_output_is_refused(family, tmp_path):
    from shardmerge.engine.run.executor import open_output

    plan = _plan(family["recipe"])
    state = open_output(plan, tmp_path, resume=False, overwrite=False)
    try:
        with pytest.raises(RuntimeError, match="another shardmerge driver"):
            open_output(plan, tmp_path, resume=True, overwrite=False)
        with pytest.raises(RuntimeError, match="another shardmerge driver"):
            open_output(plan, tmp_path, resume=False, overwrite=True)
    finally:
        os.close(state.lock_fd)
    again = open_output(plan, tmp_path, resume=True, overwrite=False)  # the lock died with its holder: resume works
    os.close(again.lock_fd)


def test_progress_prints_plain_lines_when_not_a_terminal():
    from shardmerge.engine.run.driver import Progress

    buf = io.StringIO()
    p = Progress(4 << 20, 1 << 20, 4, 1, enabled=True, stream=buf, interval=0.0)
    p.workers(3, 2, 1)
    p.update(1 << 20)
    p.update(2 << 20, units=2)
    p.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("merge:  25.0% 1.00/4.00 MiB, units 1/4")
    assert any("units 2/4, workers 3 on 2 node(s), 1 replaced" in ln for ln in lines)
    assert lines[-1].startswith("merge: 100.0% 4.00/4.00 MiB, units 4/4, workers 3 on 2 node(s)")
    quiet = io.StringIO()
    Progress(10, 0, 1, 0, enabled=False, stream=quiet).close()
    assert quiet.getvalue() == ""


def test_fault_spec_parsing():
    from shardmerge.engine.run.worker import FaultInjector

    f = FaultInjector("sleep:0.25,crash:/tmp/a:b:3,crash-after:/tmp/t:2")
    assert f.rules == [("sleep", None, 0.25), ("crash", Path("/tmp/a:b"), 3), ("crash-after", Path("/tmp/t"), 2)]
    assert FaultInjector(None).rules == [] and FaultInjector("").rules == []
    for bad in ("boom:/t:1", "crash:/t:x", "crash:3", "sleep:", "sleep:soon"):
        with pytest.raises(ValueError, match="fault spec"):
            FaultInjector(bad)


def test_malformed_fault_spec_fails_before_anything_is_written(family, reference, tmp_path, monkeypatch):
    """SHARDMERGE_FAULT is read from the environment by the driver of a Ray run and checked before the output
    directory is touched; the in-process path has no workers to inject into and does not read it."""
    from shardmerge.engine.run.executor import execute

    plan = _plan(family["recipe"])
    monkeypatch.setenv("SHARDMERGE_FAULT", "crash:3")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"fault spec 'crash:3': bad number or missing token file"):
        execute(plan, out, workers=1, progress=False)
    assert not out.exists()
    execute(plan, out, workers=0, progress=False)
    assert _shards(out) == reference


def test_run_options_are_resolved_once_from_the_execute_arguments(family):
    from shardmerge.engine.run.batching import DEFAULT_SVD_BATCH_BYTES
    from shardmerge.engine.run.executor import run_options
    from shardmerge.engine.run.options import RunOptions

    plan = _plan(family["recipe"])
    assert run_options(plan) == RunOptions()
    assert run_options(plan, device="cuda").svd_batch_bytes == DEFAULT_SVD_BATCH_BYTES  # batching on off the CPU
    assert run_options(plan, device="cuda", svd_batch=False).svd_batch_bytes is None
    got = run_options(
        plan, chunk_bytes=300, allow_nonfinite=True, threads_per_worker=3, svd_batch=True, svd_batch_bytes=99
    )
    assert got == RunOptions(chunk_bytes=300, allow_nonfinite=True, threads=3, svd_batch_bytes=99)
    with pytest.raises(ValueError, match="--threads-per-worker must be a positive integer, got 0"):
        run_options(plan, threads_per_worker=0)


def test_lost_units_go_to_the_front_and_a_unit_that_kills_workers_fails_the_merge():
    from collections import deque
    from types import SimpleNamespace

    from shardmerge.engine.run.ray_pool import MAX_UNIT_ATTEMPTS, _Pool

    units = [SimpleNamespace(id=i, key=f"model.layers.{i}") for i in range(5)]
    drv = SimpleNamespace(pending=deque([3, 4]), plan=SimpleNamespace(units=units), ready_shards=list)
    pool = _Pool(drv, spawn=None, workers=2, opts={}, max_inflight=2)
    pool._requeue("unit", 1)
    pool._requeue("shard", "shard-a")
    assert list(drv.pending) == [1, 3, 4] and pool.finalize_q == ["shard-a"]
    for _ in range(MAX_UNIT_ATTEMPTS - 2):
        pool._requeue("unit", 1)
    msg = rf"work unit 1 \(model.layers.1\) was running on {MAX_UNIT_ATTEMPTS} workers"
    with pytest.raises(RuntimeError, match=msg):
        pool._requeue("unit", 1)


# ---------------------------------------------------------------------------------------------------------------
# idempotent reruns, resume
# ---------------------------------------------------------------------------------------------------------------


def _crashed_run(plan, out: Path, units: int, finalize: bool = True) -> None:
    """Run the first `units` units in-process, publish the shards they complete, then 'die' (drop the lock)."""
    from shardmerge.engine.io.shard_files import finalize_shard
    from shardmerge.engine.run.driver import Driver
    from shardmerge.engine.run.executor import open_output
    from shardmerge.engine.run.options import RunOptions
    from shardmerge.engine.run.unit import run_unit

    state = open_output(plan, out, resume=False, overwrite=False)
    drv = Driver(plan, out, state, False)
    for _ in range(units):
        uid = drv.pending.popleft()
        res = run_unit(plan.units[uid], plan.shards, str(out), RunOptions(chunk_bytes=1 << 20))
        for shard in drv.unit_finished(res):
            if finalize:
                drv.shard_finished(shard.filename, *finalize_shard(out, shard))
    os.close(state.lock_fd)


def test_rerun_of_a_unit_and_of_a_finalisation_is_idempotent(family, reference, tmp_path):
    from shardmerge.engine.io.shard_files import partial_path
    from shardmerge.engine.run.driver import Driver
    from shardmerge.engine.run.executor import open_output
    from shardmerge.engine.run.options import RunOptions
    from shardmerge.engine.run.unit import run_unit
    from shardmerge.engine.run.worker import finalize_idempotent

    plan = _plan(family["recipe"])
    state = open_output(plan, tmp_path, resume=False, overwrite=False)
    Driver(plan, tmp_path, state, False)
    unit = plan.units[1]
    shard = plan.shards[next(iter(unit.shards))]
    first = run_unit(unit, plan.shards, str(tmp_path), RunOptions(chunk_bytes=300))
    t = unit.tensors[0]
    with open(partial_path(tmp_path, shard.filename), "r+b") as f:  # a dying worker's torn write
        f.seek(t.offset)
        f.write(b"\xff" * min(t.nbytes, 100))
    again = run_unit(unit, plan.shards, str(tmp_path), RunOptions(chunk_bytes=1 << 20))
    assert again.digests == first.digests
    for u in plan.units:
        if u.id != 1 and shard.index in u.shards:
            run_unit(u, plan.shards, str(tmp_path), RunOptions(chunk_bytes=1 << 20))
    sha1 = finalize_idempotent(tmp_path, shard)
    assert finalize_idempotent(tmp_path, shard) == sha1  # the rename already happened: same answer
    assert (tmp_path / shard.filename).read_bytes() == reference[shard.filename]
    (tmp_path / shard.filename).unlink()
    with pytest.raises(RuntimeError, match="is missing"):
        finalize_idempotent(tmp_path, shard)
    os.close(state.lock_fd)


def test_resume_keeps_verified_shards_and_redoes_only_the_rest(family, reference, tmp_path):
    from shardmerge.engine.io.shard_files import Journal, partial_path
    from shardmerge.engine.run.executor import execute

    plan = _plan(family["recipe"])
    _crashed_run(plan, tmp_path, units=4)
    recs = Journal(tmp_path).records()
    done_shards = [r["shard"] for r in recs if "shard" in r]
    assert done_shards and len(done_shards) < len(plan.shards)
    kept = {n: os.stat(tmp_path / n).st_ino for n in done_shards}
    # a torn header in an unfinished temp shard must not be trusted
    bad = next(s for s in plan.shards if s.filename not in done_shards and partial_path(tmp_path, s.filename).exists())
    with open(partial_path(tmp_path, bad.filename), "r+b") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ValueError, match="pass --resume"):
        execute(plan, tmp_path, workers=0, progress=False)
    s = execute(plan, tmp_path, workers=0, progress=False, resume=True)
    assert s["reused_shards"] == len(done_shards)
    assert s["units_run"] == len(plan.units) - s["reused_units"] and 0 < s["reused_units"] <= 4
    assert _shards(tmp_path) == reference
    assert {n: os.stat(tmp_path / n).st_ino for n in done_shards} == kept  # not rewritten


def test_resume_redoes_a_corrupted_finished_shard(family, reference, tmp_path):
    from shardmerge.engine.io.shard_files import Journal
    from shardmerge.engine.run.executor import execute

    plan = _plan(family["recipe"])
    _crashed_run(plan, tmp_path, units=4)
    done = [r["shard"] for r in Journal(tmp_path).records() if "shard" in r]
    name = done[0]
    data = bytearray((tmp_path / name).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / name).write_bytes(bytes(data))
    s = execute(plan, tmp_path, workers=0, progress=False, resume=True)
    assert s["reused_shards"] == len(done) - 1  # the corrupted one is redone, the others kept
    assert _shards(tmp_path) == reference


def test_resume_with_another_plan_is_refused(family, tmp_path):
    from shardmerge.engine.run.executor import execute

    _crashed_run(_plan(family["recipe"]), tmp_path, units=2)
    for plan in (_plan(family["recipe2"]), _plan(family["recipe"], shard_size="30KB")):
        with pytest.raises(ValueError, match=r"--resume refused: .* was started for plan .* this recipe/inputs"):
            execute(plan, tmp_path, workers=0, progress=False, resume=True)
    man = tmp_path / "shardmerge_manifest.json"
    assert not man.exists()
    s = execute(_plan(family["recipe"]), tmp_path, workers=0, progress=False, resume=True)
    assert json.loads(man.read_text())["plan_hash"] == s["plan_hash"]


def test_scaling_benchmark_report_and_in_process_run(tmp_path, capsys):
    import torch

    from shardmerge.jobs.bench_scaling import main, report

    threads = torch.get_num_threads()
    rows = [
        {"workers": 1, "wall_s": 10.0, "merge_s": 8.0},
        {"workers": 2, "wall_s": 4.0, "merge_s": 2.5},
        {"workers": 0, "wall_s": 3.0, "merge_s": 3.0},
    ]
    r = report(rows)
    assert r["speedup_vs_1_worker"] == {2: 2.5} and r["merge_speedup_vs_1_worker"] == {2: 3.2}
    out = tmp_path / "b.json"
    assert (
        main(
            [
                "--worker-counts",
                "0,0",
                "--layers",
                "1",
                "--hidden",
                "64",
                "--threads",
                "1",
                "--models",
                str(tmp_path / "m"),
                "--json-out",
                str(out),
            ]
        )
        == 0
    )  # in-process twice, outputs compared, no Ray
    got = json.loads(out.read_text())
    assert [row["workers"] for row in got["rows"]] == [0, 0] and got["rows"][0]["units"] == 4
    assert "workers 0" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # --threads for the in-process run is undone afterwards
