"""RunOptions, the one value the driver hands to every layer that runs units: frozen, picklable (Ray ships it to the
workers), validated with messages that name the option; and the public entry points take no fault-injection hook."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from shardmerge.engine.run.options import RunOptions


def test_defaults_match_the_public_defaults():
    from shardmerge.engine.run.executor import execute

    opts = RunOptions()
    params = inspect.signature(execute).parameters
    assert opts.chunk_bytes == params["chunk_bytes"].default == 64 << 20
    assert opts.device == params["device"].default == "cpu"
    assert opts.allow_nonfinite is params["allow_nonfinite"].default is False
    assert (opts.threads, opts.svd_batch_bytes, opts.batching) == (1, None, False)


def test_frozen_and_picklable():
    opts = RunOptions(chunk_bytes=4096, device="cuda", allow_nonfinite=True, threads=3, svd_batch_bytes=12345)
    back = pickle.loads(pickle.dumps(opts))
    assert back == opts and back is not opts and back.batching
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.chunk_bytes = 1
    assert hash(back) == hash(opts)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"device": "tpu"}, r"--device 'tpu': expected cpu or cuda"),
        ({"chunk_bytes": 0}, r"chunk size must be a positive number of bytes, got 0"),
        ({"chunk_bytes": 1.5}, r"chunk size must be a positive number of bytes, got 1.5"),
        ({"chunk_bytes": True}, r"chunk size .* got True"),
        ({"threads": 0}, r"--threads-per-worker must be a positive integer, got 0"),
        ({"threads": -2}, r"--threads-per-worker must be a positive integer, got -2"),
        ({"svd_batch_bytes": 0}, r"SVD batch budget must be a positive number of bytes or None, got 0"),
        ({"svd_batch_bytes": -5}, r"SVD batch budget .* got -5"),
    ],
)
def test_bad_values_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RunOptions(**kw)


def test_no_fault_hook_in_the_public_signatures():
    """Fault injection is the environment variable SHARDMERGE_FAULT, read by the driver (worker.fault_from_env)."""
    from shardmerge.engine.run.executor import execute
    from shardmerge.jobs.merge import run_merge

    for fn in (execute, run_merge):
        assert not [p for p in inspect.signature(fn).parameters if "fault" in p], fn.__name__
    assert not [f.name for f in dataclasses.fields(RunOptions) if "fault" in f.name]


def test_fault_spec_comes_from_the_environment_and_is_checked(monkeypatch):
    from shardmerge.engine.run.worker import FAULT_ENV, fault_from_env

    assert FAULT_ENV == "SHARDMERGE_FAULT"
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_from_env() is None
    monkeypatch.setenv(FAULT_ENV, "")
    assert fault_from_env() is None
    monkeypatch.setenv(FAULT_ENV, "sleep:0.5,crash:/tmp/tok:2")
    assert fault_from_env() == "sleep:0.5,crash:/tmp/tok:2"
    monkeypatch.setenv(FAULT_ENV, "boom:1")
    with pytest.raises(ValueError, match=r"fault spec 'boom:1'"):
        fault_from_env()
