"""Checkpoint metadata from headers, row-chunked reads, strict header validation, confinement, legacy .bin."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardmerge.engine.io.checkpoint import open_checkpoint, parse_safetensors_header, read_rows


def test_metadata_and_row_reads_match_safetensors(llm_family):
    ck = open_checkpoint(str(llm_family["e1"]))
    assert len(ck.tensors) == 21
    for name, meta in ck.tensors.items():
        full = load_file(meta.file)[name]
        assert meta.shape == tuple(full.shape) and meta.nbytes == full.numel() * full.element_size()
        rows = meta.rows
        for a, b in [(0, rows), (0, 1), (rows // 2, rows), (1, max(1, rows - 1))]:
            got = read_rows(meta, a, b)
            assert torch.equal(got, full[a:b] if full.ndim else full), (name, a, b)


def test_single_file_and_legacy_bin(tmp_path):
    t = {"a.weight": torch.randn(5, 3), "b": torch.arange(4, dtype=torch.int64), "c": torch.tensor(2.5)}
    (tmp_path / "st").mkdir()
    save_file(t, str(tmp_path / "st" / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save(t, tmp_path / "bin" / "pytorch_model.bin")
    for sub in ("st", "bin"):
        ck = open_checkpoint(str(tmp_path / sub))
        assert set(ck.tensors) == set(t)
        assert torch.equal(read_rows(ck.meta("a.weight"), 1, 4), t["a.weight"][1:4])
        assert torch.equal(read_rows(ck.meta("c"), 0, 1), t["c"])


def test_legacy_bin_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        open_checkpoint(str(tmp_path))


def _write_raw(path, header: dict | bytes, data: bytes = b"", hlen: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if hlen is None else hlen) + body + data)


@pytest.mark.parametrize(
    "header,data,hlen,match",
    [
        (b"{not json", b"", None, "not valid JSON"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, None, "expected 8"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None, "not supported"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
        ({}, b"", 1 << 40, "impossible"),
    ],
)
def test_corrupt_headers_are_named(tmp_path, header, data, hlen, match):
    p = tmp_path / "bad.safetensors"
    _write_raw(p, header, data, hlen)
    with pytest.raises(ValueError, match=match) as exc:
        parse_safetensors_header(p)
    assert str(p) in str(exc.value)


def test_index_confinement_and_consistency(tmp_path, llm_family):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llm_family["e1"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    for evil in ("../x.safetensors", "/etc/passwd"):
        bad = dict(index, weight_map={**index["weight_map"], name: evil})
        (d / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="outside|absolute"):
            open_checkpoint(str(d))
    bad = dict(index, weight_map={**index["weight_map"], "ghost.weight": index["weight_map"][name]})
    (d / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="ghost.weight"):
        open_checkpoint(str(d))
    missing = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != name})
    (d / "model.safetensors.index.json").write_text(json.dumps(missing))
    with pytest.raises(ValueError, match="does not list"):
        open_checkpoint(str(d))


def test_symlinked_shard_outside_dir_is_refused(tmp_path, llm_family):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llm_family["e1"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(d / shard, outside)
    (d / shard).symlink_to(outside)
    with pytest.raises(ValueError, match="outside the model directory"):
        open_checkpoint(str(d))


def test_missing_model_and_offline_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="does not exist"):
        open_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        open_checkpoint("someorg/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors.index.json"):
        open_checkpoint(str(tmp_path / "empty"))


def test_hub_cache_snapshot_symlinks_into_blobs_are_allowed(tmp_path, llm_family, monkeypatch):
    """The HF cache stores snapshot files as symlinks to ../../blobs; that layout must open offline."""
    import shutil

    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in llm_family["e1"].iterdir():
        blob = repo / "blobs" / f.name
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/{f.name}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    ck = open_checkpoint("org/tiny")
    assert len(ck.tensors) == 21 and ck.root == snap
