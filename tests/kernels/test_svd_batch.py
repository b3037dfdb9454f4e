"""Batched SVD merges (METHODS.md: on GPU, same-shape matrices across layers and experts are batched), forced on
the CPU: `merge_batch` equals per-tensor `merge` for every SVD method and path, the engine groups only tensors of one
op/shape/params into budget-bounded batches, `--svd-batch-layers N` joins layers into units without changing the
shard layout, a batched merge of a tiny LLM equals the unbatched one and verifies, and a worker budget that cannot
hold a batch is refused by name.

Stated bound (batched vs per-tensor, float32 results): |batched - per_tensor| <= atol + rtol * |per_tensor| with the
TOL table below. Both entries run the same arithmetic with a different leading batch size, so the difference is
only the rounding of batched vs single BLAS/LAPACK calls (measured: 0 for most, <= 3.4e-9 relative, 2 threads).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardmerge.engine import methods
from shardmerge.engine.io.checkpoint import TensorMeta
from shardmerge.engine.methods.base import TensorInfo
from shardmerge.engine.plan.build import OutputTensor, build_plan
from shardmerge.engine.recipe.schema import load_recipe
from shardmerge.engine.run.batching import DEFAULT_SVD_BATCH_BYTES, batch_schedule, batching_on, plan_batches
from shardmerge.engine.run.executor import (
    WORKER_BASE_BYTES,
    check_memory_budget,
    execute,
    svd_batch_budget,
    whole_tensor_bytes,
    worker_memory_floor,
)
from shardmerge.engine.run.options import RunOptions

TOL = {torch.float32: (1e-6, 1e-5)}  # dtype -> (atol, rtol); values are O(1)
SVD_METHODS = ("tsv", "iso_c", "iso_cts", "cart")


def assert_within_bound(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# the method entry: merge_batch == B merge calls
# ---------------------------------------------------------------------------------------------------------------


def _batch(B: int, K: int, m: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(m, n, generator=g) for _ in range(B)]
    inputs = [[b + 0.1 * torch.randn(m, n, generator=g) for _ in range(K)] for b in bases]
    infos = [TensorInfo(f"model.layers.{i}.mlp.up_proj.weight", (m, n), i, B) for i in range(B)]
    return inputs, bases, infos


@pytest.mark.parametrize(
    "name, path",
    [(m, p) for m in ("tsv", "iso_cts", "cart") for p in ("exact", "randomized", "gram")] + [("iso_c", None)],
)
def test_merge_batch_equals_per_tensor(name, path):
    spec = methods.get(name)
    inputs, bases, infos = _batch(4, 3, 36, 58, seed=1)
    params = dict(spec.global_params)
    if path is not None:
        params["svd_path"] = path
    if name in ("tsv", "cart"):  # a truncation the randomized sketch (rank + oversample <= 36) can hold
        params["rank_fraction"] = 0.25 if name == "tsv" else 0.15
    if name == "cart":
        params["lambda"] = 0.7
    got = spec.merge_batch(inputs, bases, infos, **params)
    assert len(got) == 4
    for xs, b, info, y in zip(inputs, bases, infos, got):
        want = spec.merge(xs, b if spec.needs_base else None, info=info, **params)
        assert y.shape == want.shape == (36, 58)
        assert_within_bound(y, want, f"{name} {path} {info.name}")
    # the results are the tensors' own: permuting the batch permutes them
    flipped = spec.merge_batch(inputs[::-1], bases[::-1], infos[::-1], **params)
    assert_within_bound(flipped[0], got[-1], "permuted batch")
    assert float((got[0] - got[1]).abs().max()) > 0.1


def test_merge_batch_1d_and_bad_batches():
    spec = methods.get("tsv")
    g = torch.Generator().manual_seed(2)
    bases = [torch.randn(8, generator=g) for _ in range(2)]
    inputs = [[b + torch.randn(8, generator=g) for _ in range(3)] for b in bases]
    infos = [TensorInfo(f"n{i}", (8,)) for i in range(2)]
    got = spec.merge_batch(inputs, bases, infos, alpha=0.5)
    for xs, b, y in zip(inputs, bases, got):  # 1-D: theta_0 + alpha * mean(tau), closed form
        assert torch.equal(y, b + 0.5 * (torch.stack(xs) - b).mean(0))
    inputs2, bases2, infos2 = _batch(2, 3, 6, 8, seed=3)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has 3 experts of shape \(6, 7\)"):
        spec.merge_batch([inputs2[0], [x[:, :7] for x in inputs2[1]]], [bases2[0], bases2[1][:, :7]], infos2)
    with pytest.raises(ValueError, match="base model is required"):
        spec.merge_batch(inputs2, [None, None], infos2)
    with pytest.raises(ValueError, match="one expert list, base and info per tensor"):
        spec.merge_batch(inputs2, bases2[:1], infos2)
    with pytest.raises(ValueError, match="rank_fraction must be"):
        spec.merge_batch(inputs2, bases2, infos2, rank_fraction=0.0)


def test_every_svd_method_registers_a_batched_entry():
    for name in SVD_METHODS:
        assert methods.get(name).merge_batch is not None
    for name in ("linear", "ties", "pivot"):  # chunk-wise and reporting methods are never batched
        assert methods.get(name).merge_batch is None


# ---------------------------------------------------------------------------------------------------------------
# grouping inside a unit: key (op, shape, params, inputs), byte budget, schedule
# ---------------------------------------------------------------------------------------------------------------


def _meta(name, shape, model):
    numel = 1
    for d in shape:
        numel *= d
    return TensorMeta(name, f"/{model}/model.safetensors", "F32", tuple(shape), 0, 4 * numel)


def _t(name, shape, op="tsv", params=(("alpha", 1.0),), layer=0):
    return OutputTensor(
        name,
        "F32",
        tuple(shape),
        op,
        tuple(_meta(name, shape, m) for m in "xyz"),
        _meta(name, shape, "b"),
        params,
        layer,
        4,
        0,
        0,
    )


def _w(
    m, n, K=3
):  # whole_tensor_bytes of a tsv matrix with base, closed form (shardmerge.engine.methods.svd.svd_memory)
    return 4 * m * n * (3 * K + 1 + 2) + K * (16 * m * n + 32 * min(m, n) ** 2)


def test_plan_batches_groups_by_op_shape_params_within_the_budget():
    ts = [
        _t("l0.q", (32, 32)),
        _t("l0.k", (16, 32)),
        _t("l0.norm", (32,)),
        _t("l0.o", (32, 32)),
        _t("l0.lin", (32, 32), op="linear", params=()),
        _t("l1.q", (32, 32), layer=1),
        _t("l1.k", (16, 32), layer=1),
        _t("l1.o", (32, 32), layer=1),
        _t("l2.q", (32, 32), params=(("alpha", 0.5),), layer=2),
        _t("l2.o", (32, 32), params=(("alpha", 0.5),)),
        _t("c.q", (32, 32), op="cart", params=()),
    ]
    assert whole_tensor_bytes("tsv", (32, 32), 3, True) == _w(32, 32)
    big = plan_batches(ts, 1 << 40)
    assert [b.members for b in big] == [(0, 3, 5, 7), (1, 6), (8, 9)]
    assert big[0].nbytes == 4 * _w(32, 32) and big[1].nbytes == 2 * _w(16, 32)
    # a budget of two 32 x 32 matrices splits the four in plan order; a lone third would be no batch
    two = plan_batches(ts, 2 * _w(32, 32))
    assert [b.members for b in two] == [(0, 3), (1, 6), (5, 7), (8, 9)]
    assert all(b.nbytes <= 2 * _w(32, 32) for b in two)
    assert [b.members for b in plan_batches(ts, 3 * _w(32, 32))] == [(0, 3, 5), (1, 6), (8, 9)]
    assert [b.members for b in plan_batches(ts, _w(32, 32))] == [(1, 6)]  # two 16 x 32 fit one 32 x 32
    assert plan_batches(ts, 2 * _w(16, 32) - 1) == []  # nothing fits twice: every tensor alone, as unbatched
    with pytest.raises(ValueError, match="budget must be positive"):
        plan_batches(ts, 0)


def test_batch_schedule_holds_later_members_outputs():
    ts = [_t("a", (32, 32)), _t("b", (16, 32)), _t("c", (32, 32)), _t("d", (16, 32)), _t("e", (8,))]
    steps = list(batch_schedule(ts, 1 << 40))
    # a+c computed at a (c's output waits), b+d at b (c waiting), e alone (nothing waits: c, d written)
    assert steps == [((0, 2), 0), ((1, 3), 32 * 32 * 4), ((4,), 0)]


def test_batching_is_on_off_the_cpu_or_when_forced():
    assert (batching_on("cpu", None), batching_on("cuda", None)) == (False, True)
    assert (batching_on("cpu", True), batching_on("cuda", False)) == (True, False)


# ---------------------------------------------------------------------------------------------------------------
# engine: tiny 4-layer LLM, tsv with a per-layer alpha gradient and cart with constant params
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    from shardmerge.engine.tiny_models import build_llm

    root = tmp_path_factory.mktemp("svdbatch")
    base = build_llm(root / "base", seed=7, num_hidden_layers=4)
    experts = [build_llm(root / f"e{k}", base=base, perturb_seed=20 + k, tokenizer=False) for k in (1, 2, 3)]
    models = "".join(f"  - model: {e}\n" for e in experts)
    recipes = {
        "tsv": f"merge_method: tsv\nbase_model: {base}\nparameters:\n  alpha: [0.6, 1.0]\n  rank_fraction: 0.5\n"
        f"models:\n{models}",
        "cart": f"merge_method: cart\nmodels:\n{models}parameters:\n  lambda: 0.8\n  rank_fraction: 0.3\n"
        "  svd_path: randomized\n",
        "linear": f"merge_method: linear\nparameters:\n  weight: 1.0\nmodels:\n{models}",
    }
    for k, text in recipes.items():
        (root / f"{k}.yaml").write_text(text)
    return {"root": root, **{k: root / f"{k}.yaml" for k in recipes}}


def _plan(recipe: Path, layers: int = 1, shard_size: str = "20KB"):
    return build_plan(load_recipe(recipe), shard_size=shard_size, source=str(recipe), svd_batch_layers=layers)


def _recording(monkeypatch, name: str) -> list[list[str]]:
    """Wrap the registered method's merge_batch to record the tensor names of every batched call."""
    calls: list[list[str]] = []
    spec = methods.get(name)

    def record(inputs, bases, infos, **params):
        calls.append([i.name for i in infos])
        return spec.merge_batch(inputs, bases, infos, **params)

    monkeypatch.setitem(methods._REGISTRY, name, dataclasses.replace(spec, merge_batch=record))
    return calls


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def test_svd_batch_layers_joins_units_but_keeps_the_shard_layout(family):
    one, two = _plan(family["tsv"]), _plan(family["tsv"], 2)
    assert [s.header for s in one.shards] == [s.header for s in two.shards] and len(one.shards) >= 6
    assert [t.name for t in one.tensors()] == [t.name for t in two.tensors()]
    layers_one = [u.key for u in one.units if u.key.startswith("model.layers")]
    layers_two = [u.key for u in two.units if u.key.startswith("model.layers")]
    assert layers_one == [f"model.layers.{i}" for i in range(4)]
    assert layers_two == ["model.layers.0-1", "model.layers.2-3"]
    assert [u.key for u in one.units if not u.key.startswith("model.layers")] == [
        u.key for u in two.units if not u.key.startswith("model.layers")
    ]
    assert any(len(u.shards) > 1 for u in two.units)  # a joined unit spans shards (finalised when all are done)
    assert (
        one.plan_hash == build_plan(load_recipe(family["tsv"]), shard_size="20KB", source=str(family["tsv"])).plan_hash
    )
    assert two.plan_hash != one.plan_hash  # the journal names units: resume across N is refused
    # a recipe without a batched method plans the same for any N (hash included)
    lin1, lin4 = _plan(family["linear"]), _plan(family["linear"], 4)
    assert lin1.plan_hash == lin4.plan_hash and [u.key for u in lin1.units] == [u.key for u in lin4.units]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--svd-batch-layers must be an integer >= 1"):
            _plan(family["tsv"], bad)


def _merge(plan, out: Path, **kw) -> dict[str, torch.Tensor]:
    from shardmerge.engine.verify import verify_dir

    execute(plan, out, workers=0, progress=False, **kw)
    assert verify_dir(out) == []
    tensors: dict[str, torch.Tensor] = {}
    for p in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(str(p)))
    return tensors


@pytest.mark.parametrize("method", ["tsv", "cart"])
def test_batched_merge_of_joined_layers_equals_unbatched(family, method, tmp_path, monkeypatch):
    ref = _merge(_plan(family[method]), tmp_path / "ref")
    calls = _recording(monkeypatch, method)
    got = _merge(_plan(family[method], 2), tmp_path / "batched", svd_batch=True)
    assert got.keys() == ref.keys()
    batched = {n for c in calls for n in c}
    assert len(calls) >= 4 and all(len(c) >= 2 for c in calls)
    for name, want in ref.items():
        if name in batched:
            assert_within_bound(got[name], want, name)
        else:  # merged alone exactly as before
            assert torch.equal(got[name], want), name
    # bitwise where possible: on the CPU a batched LAPACK/BLAS call loops over its matrices, and at these sizes
    # (one thread's blocks) the batched output's shards are byte-identical to the unbatched ones (measured; the
    # bound above is the contract, so a failure here with the bound holding is rounding, not a mix-up)
    for p in sorted((tmp_path / "ref").glob("model-*.safetensors")):
        assert (tmp_path / "batched" / p.name).read_bytes() == p.read_bytes(), p.name
    mixed = [c for c in calls if len({_layer(n) for n in c}) > 1]
    if method == "tsv":  # alpha differs per layer: no call may mix layers, yet within a layer pairs batch
        assert mixed == [] and any(len(c) == 2 for c in calls)
    else:  # constant params: q/o (and k/v, gate/up) of both layers of a unit share one call
        assert {len(c) for c in calls} == {2, 4} and len(mixed) == len(calls)
        assert [
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
        ] in calls
    # unbatched with two-layer units writes the very same bytes as one-layer units
    monkeypatch.undo()
    plain = tmp_path / "plain"
    _merge(_plan(family[method], 2), plain)
    for p in sorted((tmp_path / "ref").glob("model-*.safetensors")):
        assert (plain / p.name).read_bytes() == p.read_bytes()


def test_batched_unit_skipping_a_finished_shard_writes_the_same_bytes(family, tmp_path):
    """Resume re-runs a unit without the tensors of its already finalised shards: the batches then form from the
    remaining tensors only, and the other shard's bytes (digest) must not change."""
    from shardmerge.engine.io.shard_files import create_partial
    from shardmerge.engine.run.unit import run_unit

    plan = _plan(family["cart"], 2)
    unit = next(u for u in plan.units if len(u.shards) > 1)
    first, last = (plan.shards[s].filename for s in (min(unit.shards), max(unit.shards)))

    def run(skip: frozenset) -> dict:
        out = tmp_path / f"skip{len(skip)}"
        out.mkdir()
        for s in plan.shards:
            create_partial(out, s)
        opts = RunOptions(chunk_bytes=64 << 20, svd_batch_bytes=DEFAULT_SVD_BATCH_BYTES)
        return run_unit(unit, plan.shards, str(out), opts, skip_shards=skip).digests

    full, partial = run(frozenset()), run(frozenset({first}))
    assert first in full and first not in partial
    assert partial[last] == full[last]


def test_cli_flag_reaches_the_plan(family, tmp_path):
    from shardmerge.jobs.merge import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                str(family["cart"]),
                "--out",
                str(out),
                "--workers",
                "0",
                "--svd-batch-layers",
                "2",
                "--shard-size",
                "20KB",
                "--no-progress",
            ]
        )
        == 0
    )
    import json

    manifest = json.loads((out / "shardmerge_manifest.json").read_text())
    assert manifest["plan_hash"] == _plan(family["cart"], 2).plan_hash != _plan(family["cart"]).plan_hash


def test_nonfinite_input_in_a_batch_names_its_tensor(family, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = shutil.copytree(family["root"] / "e2", tmp_path / "e2nan")
    name = "model.layers.1.self_attn.q_proj.weight"
    for f in bad.glob("*.safetensors"):
        ts = load_file(str(f))
        if name in ts:
            ts[name][3, 5] = float("nan")
            save_file(ts, str(f), metadata={"format": "pt"})
            shard = f.name
    recipe = tmp_path / "nan.yaml"
    recipe.write_text(family["cart"].read_text().replace(str(family["root"] / "e2"), str(bad)))
    with pytest.raises(ValueError, match=rf"{shard}: tensor '{name}' holds NaN/Inf \(first at row 3\)"):
        execute(_plan(recipe, 2), tmp_path / "out", workers=0, progress=False, svd_batch=True)


# ---------------------------------------------------------------------------------------------------------------
# memory: the check accounts for a batch and refuses by name
# ---------------------------------------------------------------------------------------------------------------


def test_memory_check_accounts_for_the_batch_and_names_it(family):
    plan = _plan(family["cart"], 2)
    chunk = 64 << 20
    alone, _ = worker_memory_floor(plan, chunk)
    floor, where = worker_memory_floor(plan, chunk, svd_batch_bytes=1 << 40)
    # the largest single cart matrix is the 128 x 32 embedding; batched, a unit's four 64 x 32 gate/up share one call
    assert alone == WORKER_BASE_BYTES + whole_tensor_bytes("cart", (128, 32), 3, False)
    assert floor >= WORKER_BASE_BYTES + 4 * whole_tensor_bytes("cart", (64, 32), 3, False)
    assert where == "model.layers.0.mlp.gate_proj.weight"
    check_memory_budget(plan, chunk, floor, svd_batch_bytes=1 << 40)
    check_memory_budget(plan, chunk, floor - 1)  # the same budget holds the unbatched merge
    with pytest.raises(
        ValueError,
        match=r"cannot hold the batch of 4 same-shape matrices "
        r"'model.layers.0.mlp.gate_proj.weight' .. 'model.layers.1.mlp.up_proj."
        rf"weight' \(64 x 32, 3 inputs each\).*'cart'.*{floor} bytes",
    ):
        check_memory_budget(plan, chunk, floor - 1, svd_batch_bytes=1 << 40)


def test_batch_budget_from_the_worker_budget(family, tmp_path):
    plan = _plan(family["cart"], 2)
    largest_unit = max(u.nbytes for u in plan.units)
    assert svd_batch_budget(plan, "cpu", None, None, None) is None
    assert svd_batch_budget(plan, "cuda", None, None, None) == DEFAULT_SVD_BATCH_BYTES
    assert svd_batch_budget(plan, "cpu", True, 12345, 1) == 12345  # explicit: taken as given, then checked
    mem = WORKER_BASE_BYTES + largest_unit + 3 * whole_tensor_bytes("cart", (64, 32), 3, False)
    budget = svd_batch_budget(plan, "cuda", None, None, mem)
    assert budget == 3 * whole_tensor_bytes("cart", (64, 32), 3, False)
    check_memory_budget(plan, 64 << 20, mem, budget)  # the derived budget's batches fit the worker budget
    with pytest.raises(ValueError, match="svd_batch_bytes must be positive"):
        svd_batch_budget(plan, "cpu", True, 0, None)


def test_ray_workers_get_the_drivers_batch_budget(family, tmp_path, monkeypatch):
    """execute hands the same budget to the Ray pool that in-process runs use, and a MergeWorker passes it to
    run_unit (batching on exactly when a budget is given)."""
    import shardmerge.engine.run.ray_pool as rp
    import shardmerge.engine.run.worker as wk

    plan = _plan(family["cart"], 2)
    seen = {}

    def fake_pool(drv, opts, **kw):
        seen["opts"] = opts
        raise RuntimeError("stop after the hand-over")

    monkeypatch.setattr(rp, "run_on_ray", fake_pool)
    with pytest.raises(RuntimeError, match="stop after the hand-over"):
        execute(plan, tmp_path / "ray", workers=1, svd_batch=True, svd_batch_bytes=4321, progress=False)
    assert seen["opts"].svd_batch_bytes == 4321
    calls = []
    monkeypatch.setattr(wk, "run_unit", lambda *a, **kw: calls.append(a[3]))
    for budget in (4321, None):
        opts = RunOptions(chunk_bytes=1 << 20, device="cpu", threads=1, svd_batch_bytes=budget)
        w = wk.MergeWorker(str(tmp_path), plan.shards, opts)
        w.run(plan.units[0])
        assert calls[-1] is opts  # the driver's options, unchanged
        assert (calls[-1].batching, calls[-1].svd_batch_bytes) == (budget is not None, budget)
