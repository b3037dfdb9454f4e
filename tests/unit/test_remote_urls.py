"""Object-store and hub URLs without a server: parsing, prefix confinement of index entries, the hub's offline
mode and a missing fsspec backend are each one clear error; the store of a URL and of a directory."""

from __future__ import annotations

import pytest

from shardmerge.engine.io.remote import confine_key
from shardmerge.engine.io.stores import open_store
from shardmerge.engine.io.stores.objects import StoreError, client_for, is_url, split_url


def test_urls_are_recognised_and_split():
    assert is_url("s3://b/p") and is_url("hf://org/name") and is_url("abfs://c/p")
    assert not is_url("/data/model") and not is_url("org/name") and not is_url("http://x/y")
    assert split_url("s3://bucket/a/b/") == ("s3", "bucket", "a/b")
    with pytest.raises(ValueError, match="expected scheme://bucket/prefix"):
        split_url("s3:///nobucket")


@pytest.mark.parametrize("bad", ["../other/x.safetensors", "a/../../x.safetensors", "/abs/x.safetensors", "s3://b/x"])
def test_index_entries_escaping_the_prefix_are_refused(bad):
    with pytest.raises(ValueError, match=r"outside the model location|absolute path"):
        confine_key("s3://b/m", "m", bad, "s3://b/m/model.safetensors.index.json")


def test_index_entries_inside_the_prefix_are_keys_under_it():
    assert confine_key("s3://b/m", "m", "sub/../x.safetensors", "i") == "m/x.safetensors"
    assert confine_key("s3://b/m", "m", "sub/x.safetensors", "i") == "m/sub/x.safetensors"


def test_hub_urls_honour_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StoreError, match=r"hf://org/name: HF_HUB_OFFLINE is set.*bare hub id 'org/name'"):
        client_for("hf://org/name@main")
    with pytest.raises(ValueError, match=r"expected hf://org/name\[@revision\]"):
        client_for("hf://org")


def test_hub_url_revision_is_kept(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    client, sub = client_for("hf://org/name@v1.0/sub")
    assert (client.scheme, client.bucket, sub) == ("hf", "org/name@v1.0", "sub")


def test_missing_fsspec_backend_is_one_clear_error():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    client, _ = client_for("gs://bucket/model")
    with pytest.raises(StoreError, match=r"gs:// inputs need the gcsfs package"):
        client.head("model/config.json")


def test_writing_to_gs_is_not_supported_yet(tmp_path):
    with pytest.raises(ValueError, match=r"writing to gs:// is not supported yet"):
        open_store("gs://bucket/out")
    assert open_store(tmp_path).local and not open_store("s3://b/out").local
    assert open_store("s3://b/out/").url == "s3://b/out"


def test_remote_inputs_fetch_the_next_chunk_while_the_current_one_is_merged(monkeypatch):
    import threading

    import torch

    import shardmerge.engine.run.unit as unit
    from shardmerge.engine.io.checkpoint import TensorMeta
    from shardmerge.engine.plan.build import OutputTensor

    calls, lock = [], threading.Lock()

    def fake_read_rows(meta, a, b):
        with lock:
            calls.append((meta.name, a))
        return torch.full((b - a, 4), float(a))

    monkeypatch.setattr(unit, "read_rows", fake_read_rows)
    metas = [TensorMeta(n, f"s3://b/m/{n}.safetensors", "F32", (8, 4), 0, 128) for n in ("x", "y", "base")]
    t = OutputTensor("w", "F32", (8, 4), "linear", tuple(metas[:2]), metas[2], (), None, 1, 0, 0)
    gen = unit._reader(t, 2 * 4 * 4, "cpu", True)()  # two rows per chunk: 4 chunks
    c, xs, base = next(gen)
    import time

    deadline = time.monotonic() + 30
    while len(calls) < 6 and time.monotonic() < deadline:  # the second chunk's fetches, issued before it is asked for
        time.sleep(0.01)
    assert {a for _, a in calls} == {0, 2} and len(calls) == 6
    assert c.row_start == 0 and [x[0, 0].item() for x in xs] == [0.0, 0.0] and base.shape == (2, 4)
    rest = list(gen)
    assert [r[0].row_start for r in rest] == [2, 4, 6] and len(calls) == 12
    assert all(x[0, 0].item() == r[0].row_start for r in rest for x in r[1])
    on_disk = tuple(TensorMeta(n, f"/m/{n}.safetensors", "F32", (8, 4), 0, 128) for n in ("x", "y"))
    local = OutputTensor("w", "F32", (8, 4), "linear", on_disk, None, (), None, 1, 0, 0)
    assert unit._reader(local, 32, "cpu", True).__name__ == "read"  # local files: read when needed, as before
