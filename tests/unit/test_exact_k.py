"""TIES and breadcrumbs keep exactly the asked number of entries when magnitudes tie at a bound (bf16 inputs).

Task vectors of bf16 checkpoints lie on a coarse grid, so hundreds of entries share the k-th largest |tau|. We
rank by |tau| descending, then flat index ascending, independent of the chunking. mergekit 0.1.5 keeps exactly k
too, but picks among the tied entries in its unstable sort's order: the kept count must equal mergekit's, every
entry off the tied magnitudes must equal mergekit's, and with mergekit's sort made stable (which then ranks ties by
flat index, as we do) TIES must equal mergekit everywhere.
"""

from __future__ import annotations

import mergekit.sparsify as mk_sparsify
import pytest
import torch

import shardmerge.engine.methods as methods
from shardmerge.engine.methods.base import TensorInfo
from shardmerge.engine.methods.common import magnitude_ks, outlier_ks, select_windows, window_mask
from shardmerge.engine.methods.select import rank_streaming
from tests.oracles.methods import run_in_memory
from tests.unit.test_methods_mergekit import mergekit, rel_err

SHAPE = (64, 48)


def bf16_models(n: int, seed: int = 0):
    """A bf16 base and n bf16 fine-tunes, upcast to float32 as the engine reads them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*SHAPE, generator=g).bfloat16()
    experts = [(base.float() + torch.randn(*SHAPE, generator=g) * 0.02 * (1 + i)).bfloat16() for i in range(n)]
    return base.float(), [e.float() for e in experts]


def reader(taus, rows):
    def read():
        for r in range(0, taus[0].shape[0], rows):
            yield [t[r : r + rows] for t in taus]

    return read


def engine_reader(base, experts, rows):
    from shardmerge.engine.methods.base import Chunk

    def read():
        for r in range(0, SHAPE[0], rows):
            c = Chunk(r, min(r + rows, SHAPE[0]), r * SHAPE[1])
            yield c, [e[r : r + rows] for e in experts], base[r : r + rows]

    return read


def our_keep(base, experts, ks, rows):
    """Our keep masks (whole tensor) assembled from chunk masks, as the merge applies them."""
    info = TensorInfo("t", SHAPE, None, 0)
    windows = select_windows(engine_reader(base, experts, rows), ks, info)
    masks = []
    for e, w in enumerate(windows):
        parts = [
            window_mask(experts[e][r : r + rows] - base[r : r + rows], w, r * SHAPE[1])
            for r in range(0, SHAPE[0], rows)
        ]
        masks.append(torch.cat(parts))
    return masks


def mergekit_keep(fn, tau, *args, **kw) -> torch.Tensor:
    """mergekit's keep mask: zeros replaced by a magnitude below every other (same ranking), so kept entries show."""
    return fn(torch.where(tau == 0, 1e-30, tau), *args, **kw) != 0


def stable_rank_keep(tau: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """Reference: keep ranks [first, stop) of |tau| descending, ties by ascending flat index."""
    order = torch.sort(tau.abs().reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[order[first:stop]] = True
    return keep.reshape(tau.shape)


def test_rank_streaming_locates_the_kth_entry_in_ties():
    x = torch.tensor([[3.0, 1.0, 2.0], [2.0, -2.0, 0.5], [2.0, 3.0, -2.0]])
    flat_order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices
    for rows in (1, 2, 3):
        ranks = rank_streaming(reader([x], rows), [[1, 2, 3, 4, 5, 6, 7]])[0]
        assert [r.value for r in ranks] == x.abs().reshape(-1)[flat_order[:7]].tolist()
        for k, r in zip(range(1, 8), ranks):
            assert r.ties == int((x.abs() == r.value).sum())
            assert r.index == (int(flat_order[k - 1]) if r.ties > 1 else None), (rows, k)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_magnitude_keeps_exactly_k_with_ties_chunk_independent(rows):
    base, experts = bf16_models(3)
    taus = [e - base for e in experts]
    densities = (0.5, 0.3, 0.9)
    masks = our_keep(base, experts, [magnitude_ks(base.numel(), d) for d in densities], rows)
    for tau, d, keep in zip(taus, densities, masks):
        k = max(1, int(d * tau.numel()))
        theirs = mergekit_keep(mk_sparsify.magnitude, tau, d)
        t = tau.abs().reshape(-1).sort(descending=True).values[k - 1]
        assert int((tau.abs() == t).sum()) > 5  # the bound really is tied
        assert int(keep.sum()) == k == int(theirs.sum())
        assert torch.equal(keep, stable_rank_keep(tau, 0, k))
        off_tie = tau.abs() != t
        assert torch.equal(keep[off_tie], theirs[off_tie])


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_outlier_window_keeps_exactly_the_asked_ranks(rows):
    base, experts = bf16_models(2, seed=3)
    taus = [e - base for e in experts]
    params = ((0.5, 0.05), (0.3, 0.2))
    n = base.numel()
    masks = our_keep(base, experts, [outlier_ks(n, d, g) for d, g in params], rows)
    for tau, (d, g), keep in zip(taus, params, masks):
        target, n_top = int(d * n), int(g * n)
        drop_top = n - max(0, n - target - n_top) - target
        assert torch.equal(keep, stable_rank_keep(tau, drop_top, drop_top + target))
        theirs = mergekit_keep(mk_sparsify.magnitude_outliers, tau, d, gamma=g)
        bounds = tau.abs().reshape(-1).sort(descending=True).values[[drop_top, drop_top + target - 1]]
        off_tie = (tau.abs() != bounds[0]) & (tau.abs() != bounds[1])
        assert torch.equal(keep[off_tie], theirs[off_tie])
        assert int((~off_tie).sum()) > 5  # the bounds really are tied
        assert int(keep.sum()) == target == int(theirs.sum())


def _stable_argsort(x, dim=-1, descending=False, stable=True):
    return torch.sort(x, dim=dim, descending=descending, stable=True).indices


@pytest.mark.parametrize(
    "params",
    [
        dict(weight=[0.7, 0.4, 1.1], density=[0.5, 0.3, 0.8]),
        dict(weight=[0.7, 0.4, 1.1], density=[0.2, 0.5, 0.6], rescale=True),
    ],
)
def test_ties_on_bf16_ties_equals_mergekit(params, monkeypatch):
    base, experts = bf16_models(3, seed=5)
    outs = {
        rows: run_in_memory(
            methods.get("ties"),
            experts,
            base,
            name="t",
            rows_per_chunk=rows,
            **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()},
        )
        for rows in (1, 9, None)
    }
    assert torch.equal(outs[1], outs[9]) and torch.equal(outs[1], outs[None])
    ours = outs[1]
    theirs = mergekit("ties", base, experts, params)
    tied = torch.zeros(SHAPE, dtype=torch.bool)
    for e, d in zip(experts, params["density"]):
        tau = (e - base).abs()
        tied |= tau == tau.reshape(-1).sort(descending=True).values[max(1, int(d * tau.numel())) - 1]
    assert int(tied.sum()) > 100
    if not params.get("rescale"):  # L1 rescale factors depend on which tied entries are kept
        assert rel_err(ours[~tied], theirs[~tied]) < 1e-6
    monkeypatch.setattr(mk_sparsify.torch, "argsort", _stable_argsort)
    stable = mergekit("ties", base, experts, params)
    assert rel_err(ours, stable) < 1e-6
