"""The learned PivotMerge benchmark (shardmerge.jobs.bench_pivot): its data, its fast scoring path against the full
LLaVA forward, and (slow) a small end-to-end run: experts that learned their split, every method merged through the
engine and scored, choices made on validation pairs only."""

from __future__ import annotations

import json

import pytest
import torch

from shardmerge.jobs import bench
from shardmerge.jobs import bench_pivot as bp

SMALL = dict(splits=3, train_pairs=256, val_pairs=32, test_pairs=48, lm_steps=150, steps=150, bootstrap=200)


def test_registered_in_the_bench_table():
    assert bench.BENCHES["pivot"] == "shardmerge.jobs.bench_pivot"


def test_pairs_are_seeded_and_captions_are_the_splits_candidates():
    for split in bp.SPLITS:
        a = bp.make_pairs(split, 40, 16, torch.Generator().manual_seed(3))
        b = bp.make_pairs(split, 40, 16, torch.Generator().manual_seed(3))
        assert torch.equal(a.images, b.images) and a.captions == b.captions
        assert set(a.captions) <= set(split.candidates())
        assert a.images.shape == (40, 3, 16, 16) and float(a.images.min()) >= -1 and float(a.images.max()) <= 1
    # the splits cover different things: their candidate captions are disjoint
    cands = [set(s.candidates()) for s in bp.SPLITS]
    assert all(not (cands[i] & cands[j]) for i in range(len(cands)) for j in range(i))
    # a red square in the top left lights the top-left quadrant red, nothing else
    img = bp.render("red", "square", "top", "left", 16, torch.Generator().manual_seed(0))
    red = (img[0] > 0.5) & (img[1] < -0.5)
    assert red[:8, :8].sum() > 20 and red[8:, :].sum() == 0 and red[:, 8:].sum() == 0


def test_fast_path_matches_the_full_llava_forward(tmp_path):
    """Scoring uses precomputed vision features and the language model on [BOS, image embeddings, caption]; it must
    equal LlavaForConditionalGeneration's own forward on input_ids with image tokens, loaded from the checkpoint."""
    from transformers import LlavaForConditionalGeneration

    cfg = bp.Config(text_hidden=32, vision_hidden=16)
    model = bp.build_model(cfg)
    out = bp.save_checkpoint(model, tmp_path / "m")
    loaded = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    pairs = bp.make_pairs(bp.SPLITS[2], 3, cfg.image_size, torch.Generator().manual_seed(1))
    ids, mask = bp.caption_ids(pairs.captions)
    P = (cfg.image_size // cfg.patch) ** 2
    full_ids = torch.cat([torch.full((3, 1), bp.BOS), torch.full((3, P), loaded.config.image_token_id), ids], dim=1)
    with torch.no_grad():
        logits = loaded(input_ids=full_ids, pixel_values=pairs.images).logits
        want = torch.log_softmax(logits[:, P : P + ids.shape[1]], -1).gather(-1, ids[..., None])[..., 0]
        prefix = model.model.multi_modal_projector(bp.vision_features(model, pairs.images))
        got = bp.token_logprobs(model, prefix, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bp.projector_of(out).keys() == model.model.multi_modal_projector.state_dict().keys()


def test_bootstrap_interval_brackets_the_mean():
    x = torch.tensor([1.0] * 30 + [0.0] * 70, dtype=torch.float64)
    res = bp.bootstrap([x, 1 - x], 500, 0)
    assert res["splits"][0]["mean"] == pytest.approx(0.3) and res["mean"]["mean"] == pytest.approx(0.5)
    lo, hi = res["splits"][0]["ci"]
    assert 0.18 < lo < 0.3 < hi < 0.42
    assert res["mean"]["ci"][0] < 0.5 < res["mean"]["ci"][1]


@pytest.mark.slow
def test_small_benchmark_end_to_end(tmp_path):
    """K = 3 experts trained here, every method merged through the engine and scored on the test pairs."""
    cfg = bp.Config(**SMALL, grid="val")
    logs: list[str] = []
    res = bp.run(cfg, tmp_path, log=logs.append)
    rows = res["rows"]
    chance = {s: 1 / n for s, n in res["candidates"].items()}
    init = rows["init (no training)"]["hit"]["splits"]
    for k, split in enumerate(res["splits"]):
        own = rows[f"expert {split}"]["hit"]["splits"][k]["mean"]
        # each expert learned its split: well above chance and above the untrained projector
        assert own > max(2 * chance[split], init[k]["mean"] + 0.1), (split, own, init[k])
    labels = {m: [r for r in rows if r.startswith(f"{m} (tuned")] for m in cfg.methods}
    assert all(len(v) == 1 for v in labels.values()), labels
    assert "pivot (default)" in rows
    for method, tried in res["validation"].items():
        # the choice is the best validation candidate (retrieval, then log-likelihood), from the method's grid
        best = max(tried, key=lambda r: (r["val_hit"], r["val_ll"]))
        assert res["chosen"][method] == best["params"] and best["params"] in bp.GRIDS[method]
        assert len(tried) == len(bp.GRIDS[method])
    for r in rows.values():
        for metric in ("hit", "ll"):
            for cell in [*r[metric]["splits"], r[metric]["mean"]]:
                assert cell["ci"][0] <= cell["mean"] <= cell["ci"][1]
    assert "retrieval accuracy" in res["table"] and "pivot (default)" in res["table"]
    json.dumps(res, default=lambda t: t.tolist())  # what --json writes
