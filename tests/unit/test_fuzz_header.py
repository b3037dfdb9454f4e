"""Fuzz the safetensors header path (hypothesis, seeded, a few hundred cases, no example database written).

Every input either opens, with every invariant the engine relies on holding (each tensor's bytes inside the file
and sized by its shape and dtype, no two non-empty tensors overlapping, rows readable), or fails with the documented
error: a ValueError naming the file. Nothing else may escape (no RecursionError, KeyError, struct.error, ...).
Differential oracle: a file the safetensors library itself opens, with dtypes we support, must open here too, with
the same dtypes, shapes and tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from shardmerge.engine.io.checkpoint import (
    DTYPES,
    close_cached_files,
    open_checkpoint,
    parse_safetensors_header,
    read_rows,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OTHER_DTYPES = ["U16", "U32", "U64", "F8_E8M0", "F4", "Q4", ""]  # real or made-up codes we do not support


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _blob(header: dict | bytes, data: bytes, hlen_delta: int = 0) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(body) + hlen_delta)) + body + data


def _accepted_invariants(path, metas: dict, size: int) -> None:
    spans = []
    for name, m in metas.items():
        assert m.name == name and m.file == str(path) and m.dtype in DTYPES
        assert all(type(d) is int and d >= 0 for d in m.shape)
        assert m.nbytes == math.prod(m.shape) * DTYPES[m.dtype][1]
        assert 8 <= m.begin <= m.end <= size
        if m.nbytes:
            spans.append((m.begin, m.end))
        rows = read_rows(m, 0, m.rows)
        assert rows.numel() == math.prod(m.shape) and rows.dtype == DTYPES[m.dtype][0]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    close_cached_files()


def _theirs(path) -> dict | None:
    """What the safetensors library makes of the file: {name: (dtype, shape, tensor)}, or None if it refuses."""
    try:
        with safe_open(str(path), "pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()), f.get_tensor(k))
            return out
    except Exception:
        return None


def _check(model_dir, blob: bytes, *, via_checkpoint: bool) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(blob)
    try:
        metas = open_checkpoint(str(model_dir)).tensors if via_checkpoint else parse_safetensors_header(path)
    except ValueError as exc:
        assert str(path) in str(exc), str(exc)
        metas = None
    if metas is not None:
        _accepted_invariants(path, metas, len(blob))
    theirs = _theirs(path)
    if theirs is not None and all(dtype in DTYPES for dtype, _, _ in theirs.values()):
        assert metas is not None, "safetensors opens this file but shardmerge refuses it"
        assert {k: (v[0], v[1]) for k, v in theirs.items()} == {k: (m.dtype, m.shape) for k, m in metas.items()}
        for k, (_, _, tensor) in theirs.items():
            ours = read_rows(metas[k], 0, metas[k].rows)
            assert torch.equal(ours.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
        close_cached_files()


@st.composite
def safetensors_files(draw) -> bytes:
    """Mostly-valid files (contiguous tensors, right sizes) with a few targeted corruptions mixed in."""
    names = draw(
        st.lists(st.sampled_from(["a", "b.weight", "model.layers.0.w", "__x", "é", "n" * 40]), max_size=4, unique=True)
    )
    header, data = {}, b""
    for name in names:
        dtype = draw(st.sampled_from(list(DTYPES)) | st.sampled_from(OTHER_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = math.prod(shape) * DTYPES.get(dtype, (None, 1))[1]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += draw(st.binary(min_size=n, max_size=n))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    mutation = draw(
        st.sampled_from(["none", "none", "offset", "dim", "field", "trailing", "truncate", "hlen", "flip", "order"])
    )
    tensors = [k for k in header if k != "__metadata__"]
    if mutation in ("offset", "dim", "field") and tensors:
        entry = header[draw(st.sampled_from(tensors))]
        if mutation == "offset":
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
        elif mutation == "dim":
            entry["shape"] = entry["shape"] + [draw(st.sampled_from([-1, True, 1.0, "2", None, 2**70]))]
        else:
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    if mutation == "order" and len(tensors) > 1:  # same bytes, swapped placement: sizes may no longer fit
        a, b = tensors[:2]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    data += draw(st.binary(max_size=16)) if mutation == "trailing" else b""
    data = data[: len(data) - draw(st.integers(1, 8))] if mutation == "truncate" and data else data
    body = json.dumps(header).encode()
    if mutation == "flip" and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
    return _blob(body, data, draw(st.integers(-3, 3)) if mutation == "hlen" else 0)


@FUZZ
@given(blob=safetensors_files())
def test_structured_headers_open_or_fail_with_the_documented_error(model_dir, blob):
    _check(model_dir, blob, via_checkpoint=True)


@FUZZ
@given(
    blob=st.one_of(
        st.binary(max_size=64),
        st.builds(lambda body, data: _blob(body, data), st.binary(max_size=64), st.binary(max_size=32)),
        st.builds(
            lambda v, data: _blob(json.dumps(v).encode(), data),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                max_leaves=12,
            ),
            st.binary(max_size=32),
        ),
    )
)
@example(blob=_blob(b"[" * 100_000, b""))  # deeper than the JSON decoder's recursion limit
@example(blob=_blob(b'{"x": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', b"\0" * 4))
@example(blob=struct.pack("<Q", 2**64 - 1) + b"{}")
@example(blob=_blob(b'{"a": {"dtype": "F64", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}', b""))
def test_arbitrary_bytes_never_crash_the_parser(model_dir, blob):
    _check(model_dir, blob, via_checkpoint=False)


def test_fuzz_oracle_accepts_real_files(model_dir):
    """The differential oracle is live: a file written by safetensors itself passes every check above."""
    from safetensors.torch import save_file

    tensors = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(2, dtype=torch.bfloat16),
        "i": torch.tensor([1, 2], dtype=torch.int64),
        "s": torch.tensor(3.5),
        "e": torch.zeros(0, 3),
    }
    save_file(tensors, str(model_dir / "model.safetensors"))
    blob = (model_dir / "model.safetensors").read_bytes()
    _check(model_dir, blob, via_checkpoint=True)
    metas = parse_safetensors_header(model_dir / "model.safetensors")
    assert {k: m.shape for k, m in metas.items()} == {k: tuple(t.shape) for k, t in tensors.items()}
    assert torch.equal(read_rows(metas["w"], 1, 3), tensors["w"][1:3])
    close_cached_files()
