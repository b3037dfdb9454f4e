"""sce, ram, ramplus_tl, della, della_linear end to end against mergekit 0.1.5 (run in-process through its Python API)
on the same tiny checkpoints, in float32 and bfloat16; byte-identical output for any chunk size and worker count;
`--random-seed` feeding the keyed randomness and recorded in the plan hash and model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardmerge.jobs.merge import run_merge
from tests.conftest import write_recipe

ORACLE = {
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {e1}\n  - model: {e2}\n{more}"
    "parameters: {{select_topk: 0.5}}\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {e1}\n  - model: {e2}\n{more}"
    "parameters: {{epsilon: 0.01}}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {e1}\n  - model: {e2}\n{more}"
    "parameters: {{epsilon: 0.015, r: 0.5, alpha: 0.9}}\n",
}
DELLA = (
    "merge_method: {method}\nbase_model: {base}\nmodels:\n"
    "  - model: {e1}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.2}}\n"
    "  - model: {e2}\n    parameters: {{weight: 0.6, density: 0.4, epsilon: 0.1}}\n"
)


def _load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


def _mergekit(recipe: Path, out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    mk_run_merge(
        config,
        str(out),
        MergeOptions(lazy_unpickle=True, quiet=True, random_seed=seed, copy_tokenizer=False, write_model_card=False),
    )
    return _load(out)


def _fill(text: str, fam: dict, **kw) -> str:
    more = "  - model: {e3}\n".format(**fam) if "e3" in fam else ""
    return text.format(more=more, **fam, **kw)


@pytest.mark.parametrize("method", sorted(ORACLE))
def test_matches_mergekit_float32(method, llm_family, tmp_path):
    fam = {k: str(v) for k, v in llm_family.items()}
    recipe = write_recipe(tmp_path / "r.yaml", _fill(ORACLE[method], fam) + "dtype: float32\n")
    theirs = _mergekit(recipe, tmp_path / "mk")
    run_merge(recipe, tmp_path / "sm", workers=0, shard_size="30KB", chunk_mb=0.003, progress=False)
    ours, base = _load(tmp_path / "sm"), _load(Path(fam["base"]))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        err = (ours[name] - t).abs().max() / t.abs().max().clamp_min(1e-12)
        assert err <= 1e-3, f"{method}: {name}: relative max error {err:.2e}"
    moved = sum(not torch.equal(ours[n], base[n]) for n in theirs)
    assert moved > len(theirs) // 2, "the merge left most tensors at the base"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("method", sorted(ORACLE))
def test_bf16_matches_mergekit_and_is_at_least_as_accurate(method, llm_family_bf16, tmp_path):
    """bf16 checkpoints, bf16 output. We compute in float32 and round once; mergekit computes in the recipe dtype.
    So ours equals mergekit's float32 computation on the same inputs, rounded to bf16 (1e-3 relative, Frobenius),
    and is never further from that exact result than mergekit's own bf16 computation is."""
    fam = {k: str(v) for k, v in llm_family_bf16.items()}
    text = _fill(ORACLE[method], fam)
    exact = _mergekit(write_recipe(tmp_path / "f32.yaml", text + "dtype: float32\n"), tmp_path / "mk32")
    recipe = write_recipe(tmp_path / "r.yaml", text + "dtype: bfloat16\n")
    theirs = _mergekit(recipe, tmp_path / "mk16")
    run_merge(recipe, tmp_path / "sm", workers=0, shard_size="30KB", chunk_mb=0.003, progress=False)
    ours = _load(tmp_path / "sm")
    assert set(ours) == set(theirs) == set(exact)
    inputs = [_load(Path(fam[k])) for k in ("base", "e1", "e2")]
    for name, t in exact.items():
        keep = _untied(method, [m[name] for m in inputs])
        ours_, theirs_, t = ours[name][keep], theirs[name][keep], t[keep]
        # mergekit's ramplus_tl promotes to float32 (its lambda_k are float32) and writes float32 tensors for a
        # bfloat16 recipe; we write the recipe's dtype
        assert ours[name].dtype == torch.bfloat16, name
        assert theirs[name].dtype == (torch.float32 if method == "ramplus_tl" else torch.bfloat16), name
        assert _rel(ours_, t.to(torch.bfloat16)) <= 1e-3, name
        if theirs_.dtype == torch.bfloat16:
            assert _rel(ours_, t) <= _rel(theirs_, t) + 1e-6, name


def _untied(method: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Entries to compare. sce's Select keeps exactly k entries by variance across experts; bf16 task vectors lie on
    a grid, so many variances tie at the k-th largest, and which tied entries survive is unspecified in mergekit
    (torch.topk) and the first in flat order in ours: compare everywhere else."""
    if method != "sce":
        return torch.ones(tensors[0].shape, dtype=torch.bool)
    base, *xs = (x.float() for x in tensors)
    var = torch.var(torch.stack([x - base for x in xs]), dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * 0.5)
    if k == 0:
        return torch.ones(var.shape, dtype=torch.bool)
    t = var.flatten().topk(k).values[-1]
    return var != t


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_mergekit_in_distribution(method, llm_family, tmp_path):
    """mergekit draws its masks with torch.bernoulli, we with keyed Philox: compare what the distribution fixes.
    Over all matrices of the model: the share of entries the merge moves, and the mean |delta| (the L1 rescale
    makes each expert's kept delta as large as its full one), within a few sampling sd of each other."""
    fam = {k: str(v) for k, v in llm_family.items()}
    recipe = write_recipe(tmp_path / "r.yaml", DELLA.format(method=method, **fam) + "dtype: float32\n")
    theirs = _mergekit(recipe, tmp_path / "mk", seed=5)
    run_merge(recipe, tmp_path / "sm", workers=0, shard_size="30KB", chunk_mb=0.003, progress=False)
    ours, base = _load(tmp_path / "sm"), _load(Path(fam["base"]))
    stats = []
    for merged in (ours, theirs):
        deltas = [(merged[n].float() - base[n].float()).flatten() for n in sorted(base) if base[n].dim() == 2]
        d = torch.cat(deltas)
        stats.append((float((d != 0).float().mean()), float(d.abs().mean())))
    n = sum(base[k].numel() for k in base if base[k].dim() == 2)
    share_sd = (stats[1][0] * (1 - stats[1][0]) / n) ** 0.5
    assert abs(stats[0][0] - stats[1][0]) < 6 * share_sd + 1e-3, stats
    assert abs(stats[0][1] / stats[1][1] - 1) < 0.03, stats
    # kept fraction: 1 - (1 - 0.5)(1 - 0.4) = 0.7 of entries move when the experts' drops are independent
    assert abs(stats[0][0] - 0.7) < 6 * share_sd + 1e-3, stats


ALL = {
    **{m: (lambda fam, m=m: _fill(ORACLE[m], fam)) for m in ORACLE},
    **{m: (lambda fam, m=m: DELLA.format(method=m, **fam)) for m in ("della", "della_linear")},
}


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("model-*.safetensors"))}


@pytest.mark.parametrize("method", sorted(ALL))
def test_bytes_identical_across_chunk_sizes(method, llm_family, tmp_path):
    fam = {k: str(v) for k, v in llm_family.items()}
    recipe = write_recipe(tmp_path / "r.yaml", ALL[method](fam))
    outs = []
    for i, chunk_mb in enumerate([0.001, 1, 64]):
        run_merge(recipe, tmp_path / f"o{i}", workers=0, shard_size="30KB", chunk_mb=chunk_mb, progress=False)
        outs.append(_shards(tmp_path / f"o{i}"))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 1


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_bytes_identical_for_one_and_two_workers(ray_local, llm_family, tmp_path):
    """One Ray instance for the methods with whole-tensor passes or keyed draws (della_linear shares della's code,
    ram is per entry)."""
    fam = {k: str(v) for k, v in llm_family.items()}
    for method in ("della", "sce", "ramplus_tl"):
        text = ALL[method]
        recipe = write_recipe(tmp_path / f"{method}.yaml", text(fam))
        for w in (1, 2):
            run_merge(recipe, tmp_path / f"{method}-{w}", workers=w, shard_size="30KB", chunk_mb=0.002, progress=False)
        assert _shards(tmp_path / f"{method}-1") == _shards(tmp_path / f"{method}-2"), method


def test_random_seed_feeds_della_and_dare_and_is_recorded(llm_family, tmp_path):
    from shardmerge.jobs.merge import main

    fam = {k: str(v) for k, v in llm_family.items()}
    recipe = write_recipe(tmp_path / "r.yaml", DELLA.format(method="della", **fam))
    runs = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        runs[label] = run_merge(
            recipe, tmp_path / label, workers=0, shard_size="30KB", progress=False, random_seed=seed
        )
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b") != _shards(tmp_path / "c")
    assert runs["a"]["plan_hash"] == runs["b"]["plan_hash"] != runs["c"]["plan_hash"]
    assert '"random_seed": 4' in (tmp_path / "c" / "README.md").read_text()
    # the CLI flag equals the recipe parameter; a recipe seed that contradicts the flag is refused
    seeded = write_recipe(tmp_path / "s.yaml", DELLA.format(method="della", **fam) + "parameters: {random_seed: 4}\n")
    run_merge(seeded, tmp_path / "d", workers=0, shard_size="30KB", progress=False)
    assert _shards(tmp_path / "d") == _shards(tmp_path / "c")
    assert (
        main([str(seeded), "--out", str(tmp_path / "e"), "--workers", "0", "--no-progress", "--random-seed", "5"]) == 2
    )
    with pytest.raises(ValueError, match=r"parameters.random_seed is 4 but --random-seed is 5"):
        run_merge(seeded, tmp_path / "f", workers=0, progress=False, random_seed=5)
    # DARE takes the seed the same way; a deterministic method is unaffected by it
    dare = write_recipe(
        tmp_path / "dare.yaml",
        DELLA.format(method="dare_ties", **fam).replace(", epsilon: 0.2", "").replace(", epsilon: 0.1", ""),
    )
    hashes = {
        s: run_merge(dare, tmp_path / f"dare{s}", workers=0, progress=False, random_seed=s)["plan_hash"] for s in (1, 2)
    }
    assert hashes[1] != hashes[2] and _shards(tmp_path / "dare1") != _shards(tmp_path / "dare2")
    ram = write_recipe(tmp_path / "ram.yaml", _fill(ORACLE["ram"], fam))
    assert (
        run_merge(ram, tmp_path / "ram1", workers=0, progress=False, random_seed=1)["plan_hash"]
        == run_merge(ram, tmp_path / "ram2", workers=0, progress=False, random_seed=2)["plan_hash"]
    )
    assert json.loads((tmp_path / "ram1" / "shardmerge_manifest.json").read_text())


def test_random_seed_reaches_the_module_whose_method_draws():
    from shardmerge.engine.recipe.schema import parse_recipe, with_random_seed

    recipe = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "e", "parameters": {"weight": 1.0}}],
            "modules": {
                "language_model": {"merge_method": "della", "parameters": {"epsilon": 0.1}},
                "vision_tower": {"merge_method": "passthrough"},
            },
        },
        source="r.yaml",
    )
    seeded = with_random_seed(recipe, 9, "r.yaml")
    assert "random_seed" not in seeded.parameters  # ties draws nothing
    assert seeded.modules["language_model"].parameters == {"epsilon": 0.1, "random_seed": 9}
    assert seeded.modules["vision_tower"] == recipe.modules["vision_tower"]
    assert seeded.hash() != recipe.hash() and with_random_seed(recipe, None) is recipe
    with pytest.raises(ValueError, match="--random-seed must be an integer"):
        with_random_seed(recipe, "9")
