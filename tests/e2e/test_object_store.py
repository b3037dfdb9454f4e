"""Merges from and to object storage against a real S3-compatible server on 127.0.0.1 (moto's server, with
authentication on, behind a proxy that can throttle): s3 -> s3 and mixed inputs give the same shards as the local
merge; throttling is survived; wrong credentials and a missing bucket are one clear error each with nothing marked
complete; a SIGKILL mid-upload then --resume is byte-identical; `shardmerge verify s3://...` catches a flipped byte;
no credential reaches any output file or log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardmerge.jobs.merge import run_merge
from tests.conftest import write_recipe

pytestmark = pytest.mark.slow  # over ~10 s a file: outside the fast suite (README)

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

RECIPE = (
    "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 0.5}}\n  - model: {e2}\n    parameters: {{weight: 0.8}}\n"
)
# what must be byte-identical between a local and an object-store merge: everything but the model card and the
# manifest, which name the inputs (local paths vs URLs) and the plan hash (it covers the inputs' locations)
SAME = ("model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer_config.json")
SHARD = "40KB"  # several shards from the tiny models


@pytest.fixture(scope="module")
def s3():
    from shardmerge.jobs.s3_local import LocalS3

    with LocalS3() as server:
        yield server


@pytest.fixture(scope="module")
def models(s3, llm_family):
    urls = {k: s3.upload_dir(v, "models", f"tiny/{k}") for k, v in llm_family.items()}
    s3.client().create_bucket(Bucket="outputs")
    return urls


@pytest.fixture
def s3_env(s3, monkeypatch):
    from shardmerge.engine.io import remote

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    remote.clear_cache()
    yield s3
    s3.throttle(0)
    s3.delay(0)
    remote.clear_cache()


@pytest.fixture(scope="module")
def local_ref(llm_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("local_ref")
    recipe = write_recipe(root / "r.yaml", RECIPE.format(**{k: str(v) for k, v in llm_family.items()}))
    run_merge(recipe, root / "out", workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    return root / "out"


def _objects(s3, url: str) -> dict[str, bytes]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    c = s3.client()
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1 :]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _assert_same_as_local(files: dict[str, bytes], ref: Path) -> None:
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(n for n in files if n.endswith(".safetensors")) == shards
    for name in (*shards, *SAME):
        assert files[name] == (ref / name).read_bytes(), name
    assert "shardmerge_manifest.json" in files and not any(n.startswith(".shardmerge") for n in files)


def test_s3_to_s3_merge_is_byte_identical_to_the_local_merge(s3_env, models, local_ref, tmp_path):
    from shardmerge.engine.verify import verify_dir

    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**models))
    out = "s3://outputs/s3-to-s3"
    s = run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    assert s["verified"] is True
    _assert_same_as_local(_objects(s3_env, out), local_ref)
    assert verify_dir(out) == []


def test_mixed_local_and_s3_inputs(s3_env, models, llm_family, local_ref, tmp_path):
    refs = {"base": models["base"], "e1": str(llm_family["e1"]), "e2": models["e2"]}
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**refs))
    run_merge(recipe, tmp_path / "out", workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    _assert_same_as_local(files, local_ref)


def test_throttling_is_survived_by_retries(s3_env, models, local_ref, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**models))
    out = "s3://outputs/throttled"
    s3_env.throttle(4)  # every 4th request: 503 SlowDown
    run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    throttled = s3_env.throttled
    s3_env.throttle(0)
    assert throttled > 20  # the merge really was throttled, many times
    _assert_same_as_local(_objects(s3_env, out), local_ref)


def test_wrong_credentials_are_one_clear_error_and_nothing_is_complete(s3_env, models, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**models))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKNOWNKEY")
    with pytest.raises(ValueError, match=r"credentials were refused \(InvalidAccessKeyId\)") as e:
        run_merge(recipe, "s3://outputs/bad-creds", workers=0, shard_size=SHARD, progress=False)
    assert s3_env.secret not in str(e.value) and str(e.value).count("\n") == 0
    assert _objects(s3_env, "s3://outputs/bad-creds") == {}


def test_wrong_credentials_for_the_output_only(s3_env, llm_family, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**{k: str(v) for k, v in llm_family.items()}))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKNOWNKEY")
    with pytest.raises(RuntimeError, match=r"s3://outputs/.*credentials were refused"):
        run_merge(recipe, "s3://outputs/bad-creds-out", workers=0, shard_size=SHARD, progress=False)
    assert _objects(s3_env, "s3://outputs/bad-creds-out") == {}


def test_missing_bucket_is_one_clear_error(s3_env, models, llm_family, tmp_path):
    local = write_recipe(tmp_path / "l.yaml", RECIPE.format(**{k: str(v) for k, v in llm_family.items()}))
    with pytest.raises(RuntimeError, match=r"s3://no-such-bucket/.*bucket 'no-such-bucket' does not exist"):
        run_merge(local, "s3://no-such-bucket/out", workers=0, shard_size=SHARD, progress=False)
    refs = dict(models, e2="s3://no-such-bucket/tiny/e2")
    remote = write_recipe(tmp_path / "r.yaml", RECIPE.format(**refs))
    with pytest.raises(
        ValueError, match=r"model 's3://no-such-bucket/tiny/e2'.*bucket 'no-such-bucket' does not exist"
    ):
        run_merge(remote, "s3://outputs/missing-in", workers=0, shard_size=SHARD, progress=False)
    assert _objects(s3_env, "s3://outputs/missing-in") == {}


def test_index_entry_escaping_the_prefix_is_refused(s3_env, models, tmp_path):
    import json

    from shardmerge.engine.io.checkpoint import open_checkpoint

    c = s3_env.client()
    index = json.loads(c.get_object(Bucket="models", Key="tiny/e1/model.safetensors.index.json")["Body"].read())
    name = next(iter(index["weight_map"]))
    for bad in ("../e2/model-00001-of-00003.safetensors", "/tiny/e2/model-00001-of-00003.safetensors"):
        index["weight_map"][name] = bad
        for k, o in _objects(s3_env, models["e1"]).items():
            c.put_object(Bucket="models", Key=f"tiny/evil/{k}", Body=o)
        c.put_object(Bucket="models", Key="tiny/evil/model.safetensors.index.json", Body=json.dumps(index).encode())
        with pytest.raises(ValueError, match=r"outside the model location|absolute path"):
            open_checkpoint("s3://models/tiny/evil")


def test_verify_s3_catches_a_flipped_byte(s3_env, models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**models))
    out = "s3://outputs/flip"
    run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    env = dict(os.environ)
    ok = subprocess.run([sys.executable, "-m", "shardmerge.jobs.verify", out], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    c = s3_env.client()
    shards = sorted(n for n in _objects(s3_env, out) if n.endswith(".safetensors"))
    key = f"flip/{shards[1]}"
    data = bytearray(c.get_object(Bucket="outputs", Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    c.put_object(Bucket="outputs", Key=key, Body=bytes(data))
    bad = subprocess.run([sys.executable, "-m", "shardmerge.jobs.verify", out], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"s3://outputs/{key}: sha256 differs from the manifest" in bad.stderr


def _in_flight_uploads(c, bucket: str, prefix: str) -> int:
    return len(c.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []))


def test_sigkill_mid_upload_then_resume_is_byte_identical_and_leaks_no_secret(s3_env, models, local_ref, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**models))
    out = "s3://outputs/killed"
    env = dict(os.environ, SHARDMERGE_STAGE_DIR=str(tmp_path / "stage"))
    cmd = [sys.executable, "-m", "shardmerge.jobs.merge", str(recipe), "--out", out, "--workers", "0"]
    cmd += ["--shard-size", SHARD, "--chunk-mb", "0.01"]
    c = s3_env.client()
    s3_env.delay(0.02)  # slow enough to be caught with an upload in flight
    logs = []
    with open(tmp_path / "run1.log", "w") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while _in_flight_uploads(c, "outputs", "killed/") == 0:
            assert p.poll() is None, "the merge ended before an upload was caught in flight"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    logs.append((tmp_path / "run1.log").read_bytes())
    s3_env.delay(0)
    files = _objects(s3_env, out)
    assert "shardmerge_manifest.json" not in files and any(n.startswith(".shardmerge/journal/") for n in files)
    mid_run = dict(files)  # the journal, staged units and any published shard of the killed run
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True)
    logs.append(again.stdout + again.stderr)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    files = _objects(s3_env, out)
    _assert_same_as_local(files, local_ref)
    assert _in_flight_uploads(c, "outputs", "killed/") == 0  # the killed run's upload was aborted
    secret = s3_env.secret.encode()
    for name, data in [*files.items(), *mid_run.items()]:
        assert secret not in data, name
    for text in logs:
        assert secret not in text
    staged = list((tmp_path / "stage").glob("*")) if (tmp_path / "stage").exists() else []
    assert staged == []  # staging files of finished units are removed


def test_overwrite_and_input_overlap_on_s3(s3_env, models, local_ref, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE.format(**models))
    with pytest.raises(
        ValueError, match=r"--out s3://models/tiny/e1/out lies inside the input location s3://models/tiny/e1"
    ):
        run_merge(recipe, models["e1"] + "/out", workers=0, shard_size=SHARD, progress=False)
    out = "s3://outputs/overwrite"
    run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    with pytest.raises(ValueError, match=r"already holds this finished merge"):
        run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False)
    s = run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False, overwrite=True)
    assert "shardmerge_manifest.json" in s["removed"] and any(n.endswith(".safetensors") for n in s["removed"])
    _assert_same_as_local(_objects(s3_env, out), local_ref)
    s3_env.client().put_object(Bucket="outputs", Key="overwrite/notes.txt", Body=b"mine")
    with pytest.raises(ValueError, match=r"holds files that no earlier shardmerge merge wrote \(notes.txt\)"):
        run_merge(recipe, out, workers=0, shard_size=SHARD, chunk_mb=0.01, progress=False, overwrite=True)
    assert _objects(s3_env, out)["notes.txt"] == b"mine"
