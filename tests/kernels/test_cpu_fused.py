"""The fused CPU kernels (shardmerge.kernels.cpu_fused) write the same bytes as the eager torch path, for every
input/output dtype pair, input count and parameter branch, across chunk sizes; NaN/Inf chunks take the eager path
(its errors and --allow-nonfinite results unchanged); steady-state chunks allocate nothing new."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shardmerge.engine.io.checkpoint import parse_safetensors_header
from shardmerge.engine.plan.build import OutputTensor
from shardmerge.engine.run import unit as unit_mod
from shardmerge.engine.run.options import RunOptions
from shardmerge.kernels import cpu_fused

needs_numba = pytest.mark.skipif(not cpu_fused.available(), reason="numba not installed (the eager path is used)")

SHAPE = (67, 129)  # rows x cols: chunks of a few rows, blocks that do not divide the chunk


@pytest.fixture(autouse=True)
def _small_tensors_fused(monkeypatch):
    monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 0)  # the test tensors are below the production threshold


def _values(seed: int, dtype: torch.dtype, base: torch.Tensor | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * torch.logspace(-30, 30, SHAPE[1], base=2.0)
    if base is not None:
        x = base.float() + 0.01 * x
    x = x.to(dtype)
    flat = x.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e38, -1e38]).to(dtype)  # zeros, subnormals, near max
    return x


def _inputs(tmp_path, dtype, k: int, bad: float | None = None):
    base = _values(100, dtype)
    metas = []
    for i in range(k + 1):
        x = base if i == k else _values(i, dtype, base)
        if bad is not None and i == 0:
            x = x.clone()
            x[5, 7] = bad
        path = tmp_path / f"m{i}.safetensors"
        save_file({"w": x.contiguous()}, str(path))
        metas.append(parse_safetensors_header(path)["w"])
    return metas[:k], metas[k]


def _tensor(op, inputs, base, out_code, params) -> OutputTensor:
    return OutputTensor("w", out_code, SHAPE, op, tuple(inputs), base, tuple(sorted(params.items())), 0, 1, 0, 0)


def _merge(t: OutputTensor, chunk_bytes: int, allow_nonfinite: bool = False) -> bytes:
    parts = unit_mod._merge_tensor(t, RunOptions(chunk_bytes=chunk_bytes, allow_nonfinite=allow_nonfinite))
    return b"".join(bytes(p.contiguous().view(torch.uint8).numpy()) for p in parts)


def _both(t: OutputTensor, chunk_bytes: int, monkeypatch, **kw) -> tuple[bytes, bytes]:
    assert cpu_fused.plan_for(t, "cpu") is not None
    fused = _merge(t, chunk_bytes, **kw)
    monkeypatch.setenv(cpu_fused.ENV, "torch")
    assert cpu_fused.plan_for(t, "cpu") is None
    eager = _merge(t, chunk_bytes, **kw)
    monkeypatch.delenv(cpu_fused.ENV)
    return fused, eager


CASES = [
    ("linear", 3, {"weight": (0.3, 0.5, 0.2), "normalize": True}),
    ("linear", 3, {"weight": (0.7, -1.3, 2.1), "normalize": False}),
    ("linear", 1, {"weight": (0.37,), "normalize": True}),
    ("task_arithmetic", 2, {"weight": (0.6, 0.4), "density": (1.0, 1.0), "normalize": False, "lambda": 1.0,
                            "rescale": False, "int8_mask": False}),
    ("task_arithmetic", 3, {"weight": (0.6, 0.4, -0.3), "density": (1.0, 1.0, 1.0), "normalize": True,
                            "lambda": 0.7, "rescale": False, "int8_mask": False}),
    ("task_arithmetic", 1, {"weight": (1.5,), "density": (1.0,), "normalize": True, "lambda": 1.0,
                            "rescale": False, "int8_mask": False}),
    ("task_arithmetic", 2, {"weight": (0.5, -0.5), "density": (1.0, 1.0), "normalize": True, "lambda": 2.0,
                            "rescale": False, "int8_mask": False}),  # zero weight sum: divisor 1
]  # fmt: skip


@needs_numba
@pytest.mark.parametrize("in_dtype,out_code", [(torch.bfloat16, "BF16"), (torch.bfloat16, "F32"),
                                               (torch.float32, "BF16"), (torch.float32, "F32")])  # fmt: skip
@pytest.mark.parametrize("op,k,params", CASES)
def test_fused_bytes_equal_the_eager_path(tmp_path, monkeypatch, in_dtype, out_code, op, k, params):
    inputs, base = _inputs(tmp_path, in_dtype, k)
    t = _tensor(op, inputs, base if op == "task_arithmetic" else None, out_code, params)
    for chunk_bytes in (3 * SHAPE[1] * 4, 1 << 26):  # 3-row chunks, one chunk
        fused, eager = _both(t, chunk_bytes, monkeypatch)
        assert len(fused) == math.prod(SHAPE) * (2 if out_code == "BF16" else 4)
        assert fused == eager, (op, k, in_dtype, out_code, chunk_bytes)


@needs_numba
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises_the_eager_error_or_merges_as_eager_with_allow(tmp_path, monkeypatch, bad):
    inputs, _ = _inputs(tmp_path, torch.bfloat16, 2, bad=bad)
    t = _tensor("linear", inputs, None, "BF16", {"weight": (0.5, 0.5), "normalize": True})
    with pytest.raises(ValueError, match="holds NaN/Inf .*first at row 5.*--allow-nonfinite"):
        _merge(t, 3 * SHAPE[1] * 4)
    fused, eager = _both(t, 3 * SHAPE[1] * 4, monkeypatch, allow_nonfinite=True)
    assert fused == eager


@needs_numba
def test_overflow_from_finite_inputs_is_the_eager_error(tmp_path):
    inputs, _ = _inputs(tmp_path, torch.float32, 2)  # both hold 1e38 at the same element: 6e38 overflows
    t = _tensor("linear", inputs, None, "F32", {"weight": (3.0, 3.0), "normalize": False})
    with pytest.raises(RuntimeError, match="produced NaN/Inf for tensor 'w' .*from finite inputs"):
        _merge(t, 3 * SHAPE[1] * 4)


@needs_numba
def test_unsupported_tensors_take_the_eager_path(tmp_path, monkeypatch):
    inputs, base = _inputs(tmp_path, torch.float16, 2)
    lin = {"weight": (0.5, 0.5), "normalize": True}
    bf16, _ = _inputs(tmp_path, torch.bfloat16, 2)
    assert cpu_fused.plan_for(_tensor("linear", bf16, None, "BF16", lin), "cpu") is not None
    monkeypatch.setattr(cpu_fused, "MIN_NUMEL", math.prod(SHAPE) + 1)  # small tensors stay eager
    assert cpu_fused.plan_for(_tensor("linear", bf16, None, "BF16", lin), "cpu") is None
    monkeypatch.setattr(cpu_fused, "MIN_NUMEL", 0)
    assert cpu_fused.plan_for(_tensor("linear", inputs, None, "BF16", lin), "cpu") is None  # fp16 inputs
    inputs, base = _inputs(tmp_path, torch.bfloat16, 2)
    assert cpu_fused.plan_for(_tensor("linear", inputs, None, "F16", lin), "cpu") is None  # fp16 output
    assert cpu_fused.plan_for(_tensor("linear", inputs, None, "BF16", lin), "cuda") is None
    zero = {"weight": (0.5, -0.5), "normalize": True}  # the method's own error comes from the eager path
    assert cpu_fused.plan_for(_tensor("linear", inputs, None, "BF16", zero), "cpu") is None
    with pytest.raises(ValueError, match="non-zero sum"):
        _merge(_tensor("linear", inputs, None, "BF16", zero), 1 << 20)


@needs_numba
def test_steady_state_reuses_buffers(tmp_path):
    inputs, _ = _inputs(tmp_path, torch.bfloat16, 3)
    t = _tensor("linear", inputs, None, "BF16", {"weight": (0.3, 0.5, 0.2), "normalize": True})
    cpu_fused.BUFFERS.release()
    _merge(t, 3 * SHAPE[1] * 4)  # warm-up: buffers sized
    seen_in = {k: v.ctypes.data for k, v in cpu_fused.BUFFERS.inputs.items()}
    ptrs = set()
    for p in unit_mod._merge_tensor(t, RunOptions(chunk_bytes=3 * SHAPE[1] * 4)):
        ptrs.add(p.data_ptr())
    assert {k: v.ctypes.data for k, v in cpu_fused.BUFFERS.inputs.items()} == seen_in
    assert len(ptrs) <= cpu_fused._OUT_RING  # 23 chunks, at most two output buffers in rotation
    assert np.all([len(r) <= cpu_fused._OUT_RING for r in cpu_fused.BUFFERS.outputs.values()])


def test_without_numba_every_chunk_is_eager(tmp_path, monkeypatch):
    inputs, _ = _inputs(tmp_path, torch.bfloat16, 2)
    t = _tensor("linear", inputs, None, "BF16", {"weight": (0.5, 0.5), "normalize": True})
    monkeypatch.setattr(cpu_fused, "_kernels", False)  # as when numba is not importable
    assert not cpu_fused.available() and cpu_fused.plan_for(t, "cpu") is None
    got = _merge(t, 3 * SHAPE[1] * 4)
    from safetensors.torch import load_file

    xs = [load_file(str(m.file))["w"].float() for m in inputs]
    want = (((xs[0] * 0.5).add_(0.0) + xs[1] * 0.5) / 1.0).to(torch.bfloat16)
    assert got == bytes(want.view(torch.uint8).numpy())


def test_the_writer_holds_at_most_one_chunk_in_flight():
    """The two-buffer output ring is safe only while _Sink.put returns after the previous chunk's write+hash."""
    import threading
    import time

    done = []
    first_running = threading.Event()

    def slow():
        first_running.set()
        time.sleep(0.3)
        done.append(1)

    sink = unit_mod._Sink()
    try:
        sink.put(slow)
        first_running.wait(10)
        sink.put(lambda: done.append(2))
        assert done[:1] == [1]  # put waited for the chunk before
        sink.drain()
    finally:
        sink.close()
    assert done == [1, 2] and cpu_fused._OUT_RING == 2


@needs_numba
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_whole_merge_bytes_equal_eager_across_chunk_sizes(llm_family_bf16, tmp_path, monkeypatch, method):
    from shardmerge.jobs.merge import run_merge
    from tests.conftest import write_recipe

    f = llm_family_bf16
    head = f"merge_method: {method}\n" + (f"base_model: {f['base']}\n" if method == "task_arithmetic" else "")
    models = [f["e1"], f["e2"]] + ([f["base"]] if method == "linear" else [])
    body = "models:\n" + "".join(f"  - model: {m}\n    parameters: {{weight: {0.3 + 0.2 * i}}}\n" for i, m in
                                 enumerate(models))  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", head + body + "dtype: float32\nout_dtype: bfloat16\n")
    used = []
    real_run = cpu_fused.run
    monkeypatch.setattr(cpu_fused, "run", lambda *a: (used.append(1), (yield from real_run(*a))))
    run_merge(recipe, tmp_path / "small", workers=0, chunk_mb=0.01, progress=False)
    run_merge(recipe, tmp_path / "big", workers=0, chunk_mb=64, progress=False)
    assert used  # the fused path merged tensors
    monkeypatch.setenv(cpu_fused.ENV, "torch")
    n = len(used)
    run_merge(recipe, tmp_path / "eager", workers=0, chunk_mb=64, progress=False)
    assert len(used) == n  # and the eager run did not
    names = sorted(p.name for p in (tmp_path / "eager").glob("*.safetensors"))
    assert names
    for name in names:
        eager = (tmp_path / "eager" / name).read_bytes()
        assert (tmp_path / "small" / name).read_bytes() == eager, name
        assert (tmp_path / "big" / name).read_bytes() == eager, name
