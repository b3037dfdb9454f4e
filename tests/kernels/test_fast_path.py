"""The CPU fast path: small merges skip Ray, the background write+hash step keeps bytes and digests, errors in it
surface, and the allocator tuning respects the user's glibc settings."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from shardmerge.engine.run import unit as unit_mod
from shardmerge.jobs.merge import IN_PROCESS_MAX_BYTES, run_merge
from tests.conftest import write_recipe


def test_small_merge_without_workers_runs_in_process_and_matches_ray_free_bytes(llm_family_bf16, tmp_path):
    f = llm_family_bf16
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {f['base']}\nmodels:\n"
        f"  - model: {f['e1']}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {f['e2']}\n    parameters: {{weight: 0.4, density: 0.3}}\n",
    )
    default = run_merge(recipe, tmp_path / "a", chunk_mb=0.01, progress=False)
    assert default["bytes"] <= IN_PROCESS_MAX_BYTES and default["workers"] == 0  # no Ray started
    run_merge(recipe, tmp_path / "b", workers=0, chunk_mb=64, progress=False)
    for name in sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_sink_writes_in_order_and_hashes_like_a_synchronous_loop(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 4000)
    blocks = [bytes([i]) * 1000 for i in range(1, 5)]
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY)

    class Writer:  # a shard writer as the stores give one: byte ranges at offsets
        def write(self, data, offset, label):
            os.pwrite(fd, data, offset)

    sink = unit_mod._Sink()
    try:
        for i, b in enumerate(blocks):
            sink.put(unit_mod._write_and_hash, Writer(), memoryview(b), 1000 * i, h, "t")
        sink.drain()
    finally:
        sink.close()
        os.close(fd)
    assert path.read_bytes() == b"".join(blocks)
    assert h.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()


def test_sink_raises_the_background_error():
    sink = unit_mod._Sink()

    def boom():
        raise OSError("disk gone")

    try:
        sink.put(boom)
        with pytest.raises(OSError, match="disk gone"):
            sink.drain()
    finally:
        sink.close()


@pytest.mark.parametrize(
    "env,tuned", [({}, True), ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, False), ({"SHARDMERGE_MALLOC": "default"}, False)]
)
def test_allocator_tuning_respects_the_environment(env, tuned):
    code = "from shardmerge.engine.run.unit import tune_allocator; import json; print(json.dumps(tune_allocator()))"
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "SHARDMERGE_MALLOC")
    }
    r = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip()) is tuned
