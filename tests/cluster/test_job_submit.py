"""The real thing: `ray start --head` on this machine, then `ray job submit --working-dir <repo> -- python -m
jobs.merge recipe.yaml --out DIR`; the job must succeed, its logs (`ray job logs`) must show the driver's progress
lines and summary, and the output must verify and equal the in-process merge byte for byte."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(
        os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"
    )  # the job imports the shipped working dir only


@pytest.fixture(scope="module")
def head():
    """A `ray start --head --block` of our own (own temp dir and ports); stopped by its pid, which takes every
    process of that node with it (Ray fate-shares them with the `ray start` process)."""
    temp = tempfile.mkdtemp(prefix="smjob", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    dash = _free_port()
    cmd = RAY + [
        "start",
        "--head",
        "--block",
        f"--port={_free_port()}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(url + "/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"ray start --head did not come up (exit {proc.poll()}) within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _reap(temp)


def _reap(temp: str) -> None:
    """Stop any process of this node that outlived `ray start` (identified by our unique temp dir), by pid."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if temp.encode() in cmdline and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    from shardmerge.engine.plan.build import build_plan
    from shardmerge.engine.recipe.schema import load_recipe
    from shardmerge.engine.run.executor import execute
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("job")
    base = build_llm(root / "base", seed=8, num_hidden_layers=3)
    e1 = build_llm(root / "e1", base=base, perturb_seed=1)
    e2 = build_llm(root / "e2", base=base, perturb_seed=2)
    (root / "recipe.yaml").write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {e1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {e2}\n    parameters: {{weight: 0.4, density: 0.7}}\n"
    )
    plan = build_plan(load_recipe(root / "recipe.yaml"), shard_size="40KB")
    execute(plan, root / "ref", workers=0, progress=False)
    return {
        "root": root,
        "recipe": root / "recipe.yaml",
        "ref": {p.name: p.read_bytes() for p in (root / "ref").glob("model-*.safetensors")},
    }


@pytest.mark.slow
def test_ray_job_submit_runs_the_merge(head, family, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from shardmerge.engine.verify import verify_dir

    out = tmp_path / "shared" / "out"
    sub_id = f"shardmerge-test-{os.getpid()}"
    cmd = RAY + [
        "job",
        "submit",
        "--address",
        head,
        "--submission-id",
        sub_id,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "jobs.merge",
        str(family["recipe"]),
        "--out",
        str(out),
        "--workers",
        "2",
        "--shard-size",
        "40KB",
        "--chunk-mb",
        "0.01",
        "--json",
    ]
    env = _env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this interpreter
    for _ in range(10):  # the head's dashboard agent may come up after the dashboard answers (a known Ray race)
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = JobSubmissionClient(head)
    logs = client.get_job_logs(sub_id)
    assert client.get_job_status(sub_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "units 0/" in logs and "merge: 100.0%" in logs, logs[-3000:]  # progress lines in `ray job logs`
    assert "] starting workers" in logs and "] writing metadata" in logs, logs[-3000:]  # phase lines too
    summary = json.JSONDecoder().raw_decode(logs, logs.index("\n{\n") + 1)[0]  # --json: the JSON summary
    assert summary["verified"] is True and summary["workers"] == 2 and summary["units_run"] == summary["units"]
    assert verify_dir(out) == []
    assert {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")} == family["ref"]
