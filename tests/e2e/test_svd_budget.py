"""Memory budget of whole-matrix methods (SVD family, pivot): the per-tensor estimate, a measured peak it must
bound, and the refusal of a --max-memory-per-worker that cannot hold the largest matrix (70B-shaped plan)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardmerge.engine.io.checkpoint import TensorMeta
from shardmerge.engine.plan.build import OutputTensor, Plan, ShardSpec, WorkUnit, build_plan
from shardmerge.engine.recipe.schema import Recipe, parse_recipe
from shardmerge.engine.run.batching import op_bytes
from shardmerge.engine.run.executor import (
    WORKER_BASE_BYTES,
    check_memory_budget,
    whole_tensor_bytes,
    worker_memory_floor,
)
from shardmerge.engine.tiny_models import build_mllm

pytestmark = pytest.mark.slow  # over ~10 s a file: outside the fast suite (README)

GB = 10**9


def test_whole_tensor_estimate_closed_form():
    m, n, K = 29568, 8192, 3  # a 70B MLP matrix, 3 experts + base
    assert whole_tensor_bytes("tsv", (m, n), K, True) == 4 * m * n * (3 * K + 1 + 2) + K * (16 * m * n + 32 * n * n)
    assert whole_tensor_bytes("cart", (m, n), K, False) == 4 * m * n * (3 * K + 2) + K * (16 * m * n + 32 * n * n)
    assert whole_tensor_bytes("iso_cts", (m, n), K, True) - whole_tensor_bytes("tsv", (m, n), K, True) == 2 * (
        16 * m * n + 32 * n * n
    )
    # pivot: the horizontal (m x Kn) and vertical (Km x n) stacks' decompositions, plus the stacked copy
    p, q = 64, 32
    hs, vs = 24 * p * (K * q) + 40 * p * p, 24 * q * (K * p) + 40 * q * q
    assert whole_tensor_bytes("pivot", (p, q), K, False) == 4 * p * q * (3 * K + 2) + 4 * K * p * q + hs + vs
    assert whole_tensor_bytes("pivot", (p,), K, True) == 4 * p * (3 * K + 1 + 2)  # 1-D: averaged, no SVD
    assert 25 * GB < whole_tensor_bytes("tsv", (m, n), K, True) < 35 * GB


MEASURE = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from shardmerge.engine import methods
    op, m, n, K = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 3
    spec = methods.get(op)
    torch.set_num_threads(1)
    a = torch.randn(8, 8)  # load the LAPACK kernels first: the worker's fixed cost, not the tensor's
    torch.linalg.svd(a), torch.linalg.eigh(a @ a.T), torch.linalg.qr(a)
    before = psutil.Process().memory_info().rss
    g = torch.Generator().manual_seed(0)
    base = torch.randn(m, n, generator=g)
    xs = [base + 0.01 * torch.randn(m, n, generator=g) for _ in range(K)]
    y = spec.merge(xs, base if spec.needs_base else None).to(torch.bfloat16)
    # VmHWM: this process image's peak RSS (ru_maxrss would keep the forking parent's peak across exec)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"measured": peak - before}))
""")


@pytest.mark.parametrize("op, m, n", [("tsv", 1100, 1500), ("iso_cts", 1100, 1500), ("pivot", 700, 1400)])
def test_estimate_bounds_the_measured_peak(op, m, n):
    """tsv at 1100 x 1500 takes the float64 Gram path (smaller side > 1024); pivot decomposes 700 x 4200 and
    2100 x 1400 stacks. The estimate must hold the measured peak (inputs included) without being absurd."""
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, op, str(m), str(n)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["measured"]
    estimate = whole_tensor_bytes(op, (m, n), 3, op != "pivot")
    assert measured <= estimate <= 2.5 * measured, (measured, estimate)


def _meta(name: str, shape, model: str) -> TensorMeta:
    n = 2
    for d in shape:
        n *= d
    return TensorMeta(name, f"/{model}/model.safetensors", "BF16", tuple(shape), 0, n)


def _synthetic_plan() -> Plan:
    """A 70B-shaped plan without files: one tsv MLP matrix (3 experts + base) and a chunk-wise linear embedding."""
    recipe = Recipe.model_validate({"merge_method": "tsv", "base_model": "b", "models": [{"model": m} for m in "xyz"]})
    up = "model.layers.0.mlp.up_proj.weight"
    embed = "model.embed_tokens.weight"
    tensors = (
        OutputTensor(
            embed,
            "BF16",
            (152064, 8192),
            "linear",
            tuple(_meta(embed, (152064, 8192), m) for m in "xyz"),
            None,
            (),
            None,
            80,
            0,
            0,
        ),
        OutputTensor(
            up,
            "BF16",
            (29568, 8192),
            "tsv",
            tuple(_meta(up, (29568, 8192), m) for m in "xyz"),
            _meta(up, (29568, 8192), "b"),
            (),
            0,
            80,
            0,
            0,
        ),
    )
    return Plan(
        recipe,
        (WorkUnit(0, "all", tensors),),
        (ShardSpec(0, "model-00001-of-00001.safetensors", b"", 0, (embed, up)),),
        "",
        "",
        None,
        "h",
    )


def test_budget_refuses_a_worker_that_cannot_hold_the_largest_matrix():
    plan = _synthetic_plan()
    need = whole_tensor_bytes("tsv", (29568, 8192), 3, True)
    floor, where = worker_memory_floor(plan, 64 << 20)
    assert (floor, where) == (WORKER_BASE_BYTES + need, "model.layers.0.mlp.up_proj.weight")
    check_memory_budget(plan, 64 << 20, floor)
    with pytest.raises(
        ValueError,
        match=r"cannot hold tensor 'model.layers.0.mlp.up_proj.weight' \(29568 x 8192, "
        rf"3 inputs \+ base\).*'tsv'.*{floor} bytes.*--chunk-mb does not change",
    ):
        check_memory_budget(plan, 64 << 20, 16 * GB)
    # a chunk-wise tensor that sets the floor keeps the chunk message (and --chunk-mb does help there)
    small = Plan(plan.recipe, (WorkUnit(0, "e", plan.units[0].tensors[:1]),), plan.shards, "", "", None, "h")
    floor, where = worker_memory_floor(small, 64 << 20)
    rows = (64 << 20) // (8192 * 4)
    assert (floor, where) == (WORKER_BASE_BYTES + rows * 8192 * 4 * 5, "model.embed_tokens.weight")
    with pytest.raises(ValueError, match="lower --chunk-mb"):
        check_memory_budget(small, 64 << 20, floor - 1)


def test_budget_of_a_real_pivot_plan_names_the_projector_matrix(tmp_path):
    init = build_mllm(tmp_path / "init", "llava", seed=0, num_layers=2)
    experts = [shutil.copytree(init, tmp_path / f"e{k}") for k in range(3)]
    plan = build_plan(parse_recipe({"merge_method": "pivot", "models": [{"model": str(e)} for e in experts]}))
    floor, where = worker_memory_floor(plan, 64 << 20)
    # llava projector linear_2 is 64 x 64 (linear_1 64 x 32): the largest whole matrix, above any copy's buffers.
    # Its bias op decomposes that same matrix again (for the weight's lambda) and holds its own 3 biases on top,
    # so the bias op sets the floor: the weight's estimate + the biases' data
    weight = whole_tensor_bytes("pivot", (64, 64), 3, False)
    bias = weight + whole_tensor_bytes("pivot", (64,), 3, False)
    assert where == "model.multi_modal_projector.linear_2.bias"
    assert floor == WORKER_BASE_BYTES + bias
    ops = {t.name: t for t in plan.tensors()}
    assert op_bytes(ops["model.multi_modal_projector.linear_2.weight"]) == weight
    assert op_bytes(ops["model.multi_modal_projector.linear_2.bias"]) == bias
    with pytest.raises(ValueError, match="cannot hold tensor 'model.multi_modal_projector.linear_2.bias'"):
        check_memory_budget(plan, 64 << 20, floor - 1)


MEASURE_BIAS = textwrap.dedent("""
    import json, sys
    import torch
    from shardmerge.engine import methods
    m, n, K = int(sys.argv[1]), int(sys.argv[2]), 3
    spec = methods.get("pivot")
    torch.set_num_threads(1)
    a = torch.randn(8, 8)
    torch.linalg.svd(a), torch.linalg.eigh(a @ a.T), torch.linalg.qr(a)
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    ws = [w0 + 0.01 * torch.randn(m, n, generator=g) for _ in range(K)]
    bs = [b0 + 0.01 * torch.randn(m, generator=g) for _ in range(K)]
    before = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    y = spec.merge(bs + ws, None, weight_inputs=K)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"measured": peak - before}))
""")


def test_bias_estimate_bounds_the_measured_peak():
    """A pivot bias op gets K biases + its layer weight's K inputs and decomposes the weight's stacks again: its
    estimate (from the inputs' shapes) must hold the measured peak, which the 1-D estimate alone does not."""
    m, n = 700, 1400
    run = subprocess.run(
        [sys.executable, "-c", MEASURE_BIAS, str(m), str(n)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])["measured"]
    estimate = whole_tensor_bytes("pivot", (m,), 6, False, input_shapes=[(m,)] * 3 + [(m, n)] * 3)
    assert whole_tensor_bytes("pivot", (m,), 6, False) < measured <= estimate <= 2.5 * measured, (measured, estimate)
