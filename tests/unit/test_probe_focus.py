"""Attention focus beyond mass and mean entropy: mass-weighted head entropy, visual attention sinks, region boxes
(pointing game), the paired bootstrap for before/after, and merged-range means."""

import math

import numpy as np
import pytest
import torch

from shardmerge.engine.probe import core, fixtures, focus


def _rows(probs):
    """{layer: (1, heads, S)} from a nested list [layer][head][position]."""
    return {i: torch.tensor([layer], dtype=torch.float64) for i, layer in enumerate(probs)}


def _h(p):
    p = [x / sum(p) for x in p if x > 0]
    return -sum(x * math.log(x) for x in p)


def test_weighted_entropy_closed_form():
    # positions: text, img, img, img, text; head 0 looks at the image a lot and diffusely, head 1 barely, sharply
    mask = torch.tensor([False, True, True, True, False])
    f = focus.focus_from_rows(_rows([[[0.1, 0.3, 0.3, 0.3, 0.0], [0.9, 0.1, 0.0, 0.0, 0.0]]]), mask, 1)
    m0, m1 = 0.9, 0.1
    h0, h1 = _h([0.3, 0.3, 0.3]), 0.0
    assert f.mass[0] == pytest.approx((m0 + m1) / 2)
    assert f.entropy[0] == pytest.approx((h0 + h1) / 2)
    assert f.weighted_entropy[0] == pytest.approx((m0 * h0 + m1 * h1) / (m0 + m1))
    assert f.weighted_entropy[0] > f.entropy[0]  # the near-blind sharp head no longer halves it


def test_sinks_found_by_norm_and_removed():
    mask = torch.tensor([False, True, True, True, True, False])
    hidden = torch.ones(1, 6, 4)
    hidden[0, 3] *= 10  # image token 2 (position 3) is a massive-norm token
    assert focus.sink_tokens([torch.ones(1, 6, 4), hidden], mask) == (2,)
    assert focus.sink_tokens([torch.ones(1, 6, 4)], mask) == ()
    with pytest.raises(ValueError, match="sink factor"):
        focus.sink_tokens([hidden], mask, factor=1.0)
    f = focus.focus_from_rows(_rows([[[0.1, 0.1, 0.1, 0.6, 0.1, 0.0]]]), mask, 1)
    g = f.without([2])
    assert g.mass[0] == pytest.approx(0.3)
    assert g.entropy[0] == pytest.approx(math.log(3))  # uniform over the three remaining tokens
    assert f.entropy[0] == pytest.approx(_h([0.1, 0.1, 0.6, 0.1]))


def test_attention_focus_finds_a_planted_sink_on_a_tiny_model():
    model = fixtures.tiny_model("qwen2_5_vl", 3, seed=4)
    parts = core.install(model)
    inputs = core.make_inputs(fixtures.tiny_inputs("qwen2_5_vl", 4), parts.image_token_id)
    plain = focus.attention_focus(model, parts, inputs)
    first = int(torch.nonzero(inputs.image_mask)[0])

    def plant(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[:, first + 1] *= 50.0  # image token 1 becomes a high-norm token entering layer 1
        return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = parts.layers[1].register_forward_pre_hook(plant, with_kwargs=True)
    try:
        planted = focus.attention_focus(model, parts, inputs)
    finally:
        handle.remove()
    assert 1 in planted.sinks and 1 not in plain.sinks
    clean = planted.without(planted.sinks)
    assert len(clean.per_token[0]) == int(inputs.image_mask.sum()) - len(planted.sinks)
    assert all(c <= p + 1e-12 for c, p in zip(clean.mass, planted.mass))


def test_box_focus_and_pointing_game():
    per_token = torch.tensor([[0.0, 0.1, 0.0, 0.0, 0.3, 0.1], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]])  # grid 2x3
    box = (20, 20, 60, 40)  # image 60x40: cells of 20x20, the box covers row 1, cols 1..2 (centres 30,50 / 30)
    out = focus.box_focus(per_token, (2, 3), (60, 40), box)
    assert out["inside"][0] == pytest.approx(0.4 / 0.5) and out["hit"][0] is True
    assert out["inside"][1] == 0.0 and out["hit"][1] is False
    with pytest.raises(ValueError, match="bbox"):
        focus.box_focus(per_token, (2, 3), (60, 40), (50, 0, 10, 10))
    with pytest.raises(ValueError, match="no image-token centre"):
        focus.box_focus(per_token, (2, 3), (60, 40), (0, 0, 5, 5))


def test_paired_bootstrap_intervals():
    rng = np.random.default_rng(0)
    before = rng.random(200)
    exact = focus.paired_bootstrap(before, before + 0.2, n_boot=200)
    assert exact["mean"] == pytest.approx(0.2) and exact["ci"] == pytest.approx([0.2, 0.2])
    noisy = focus.paired_bootstrap(before, before + 0.1 + rng.normal(0, 0.2, 200), n_boot=2000, seed=1)
    assert noisy["ci"][0] < 0.1 < noisy["ci"][1] and noisy["ci"][0] > 0
    # four identical copies per question (MMBench's circular copies): resampling copies as independent samples
    # understates the uncertainty; resampling the question group does not
    base = rng.normal(0, 1, 50)
    diff = np.repeat(base, 4)
    groups = np.repeat(np.arange(50), 4)
    by_group = focus.paired_bootstrap(np.zeros(200), diff, groups, n_boot=2000)
    naive = focus.paired_bootstrap(np.zeros(200), diff, n_boot=2000)
    unique = focus.paired_bootstrap(np.zeros(50), base, n_boot=2000)
    width = lambda r: r["ci"][1] - r["ci"][0]
    assert width(by_group) > 1.5 * width(naive)
    assert width(by_group) == pytest.approx(width(unique), rel=0.2)
    assert by_group["groups"] == 50 and by_group["pairs"] == 200
    with pytest.raises(ValueError, match="equal-length"):
        focus.paired_bootstrap([1, 2], [1])


def test_range_means():
    out = focus.range_means([0.0, 1.0, 2.0, 3.0], (2, 3))
    assert out == {"merged": 2.5, "others": 0.5, "layers": [2, 3]}
    with pytest.raises(ValueError, match="outside"):
        focus.range_means([0.0, 1.0], (1, 2))


def test_probe_job_writes_the_focus_analyses(tmp_path):
    """--attention on a benchmark with region boxes: sink-free and in-box columns, the merged range apart, the
    second heat map; compare_focus of a run with itself is a zero difference with a zero-width interval."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardmerge.engine.probe import runner
    from shardmerge.engine.tiny_models import build_mllm
    from shardmerge.jobs import probe as probe_cli

    model = build_mllm(tmp_path / "m", "qwen2_5_vl", seed=2, num_layers=3)
    bench = fixtures.write_ours(tmp_path / "boxes.parquet", fixtures.bench_rows(3, kinds=("yesno",)))
    table = pq.read_table(bench)
    boxes = [[0.0, 0.0, 28.0, 28.0], None, [10.0, 20.0, 56.0, 56.0]]
    pq.write_table(table.append_column("bbox", pa.array(boxes, type=pa.list_(pa.float64()))), bench)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = ["--model", str(model), "--bench", str(bench), "--out", str(out), "--local", "--attention"]
        assert probe_cli.main(argv + ["--merged-layers", "1", "2", "--bootstrap", "50"]) == 0
        outs.append(out)
    rows = pq.read_table(outs[0] / "focus.parquet").to_pylist()
    assert len(rows) == 3 * 3
    with_box = [r for r in rows if r["row"] != 1]
    assert all(0.0 <= r["box_inside"] <= 1.0 and isinstance(r["box_hit"], bool) for r in with_box)
    assert all(r["box_inside"] is None for r in rows if r["row"] == 1)
    for r in rows:
        assert r["mass_nosink"] <= r["mass"] + 1e-12 and r["weighted_entropy"] >= 0
    info = json.loads((outs[0] / "focus.json").read_text())
    per = info["per_benchmark"]["boxes"]
    assert per["merged_range"]["mass"]["layers"] == [1, 2]
    assert per["merged_range"]["mass"]["merged"] == pytest.approx(np.mean(per["mass"][1:3]))
    assert per["box_inside"] and len(per["box_inside"]) == 3
    assert (outs[0] / info["heatmap"]["file_nosinks"]).is_file()
    same = runner.compare_focus(outs[0], outs[1], "mass", n_boot=100)
    assert set(same["layers"]) == {0, 1, 2}
    assert all(v["mean"] == 0.0 and v["ci"] == [0.0, 0.0] for v in same["layers"].values())
    with pytest.raises(ValueError, match="focus metric"):
        runner.compare_focus(outs[0], outs[1], "volume")
