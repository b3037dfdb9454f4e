"""Probe scoring (closed-form metrics, open answers by masked generation) and attention focus."""

import math

import pytest
import torch

from shardmerge.engine.probe import core, fixtures, focus, paths, prompting, readers, scoring


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~50x faster than two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_kl_closed_form():
    p = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    q = torch.log(torch.tensor([0.9, 0.1], dtype=torch.float64))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert scoring.kl(p, q) == pytest.approx(expected, rel=1e-12)
    assert scoring.kl(q, q) == 0.0


def test_closed_metrics_closed_form():
    logits = torch.full((10,), -5.0)
    logits[[3, 5, 7]] = torch.tensor([1.0, 2.0, 0.0])
    ref = torch.zeros(10)
    m = scoring.closed_metrics(logits, ref, [3, 5, 7], gold=1)
    assert m["pred_index"] == 1 and m["correct"]
    z = 7 * math.exp(-5.0) + math.exp(1) + math.exp(2) + 1
    assert m["gold_logprob"] == pytest.approx(2.0 - math.log(z), rel=1e-9)
    q = torch.softmax(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), 0)
    assert m["kl"] == pytest.approx(float((1 / 3 * torch.log((1 / 3) / q)).sum()), rel=1e-9)
    assert scoring.closed_metrics(logits, ref, [3, 5, 7], gold=0)["correct"] is False


def test_gold_sequence_logprob_and_normalisation():
    logits = torch.zeros(4, 6)  # rows: ..., answer position, gold_0, gold_1 (last row unused)
    logits[1, 2] = 3.0
    logits[2, 4] = 1.0
    lp = scoring.gold_sequence_logprob(logits, [2, 4])
    expected = (3.0 - math.log(5 + math.exp(3))) + (1.0 - math.log(5 + math.e))
    assert lp == pytest.approx(expected, rel=1e-9)
    assert scoring.normalize_answer("  The Red, car! ") == "red car"
    assert scoring.normalize_answer("an apple") == scoring.normalize_answer("Apple.")


def test_settings_always_include_0_and_L():
    assert scoring.ScoreSettings(cuts=(2,)).cut_list(4) == [0, 2, 4]
    assert scoring.ScoreSettings().cut_list(2) == [0, 1, 2]
    with pytest.raises(ValueError, match="outside"):
        scoring.ScoreSettings(cuts=(5,)).cut_list(4)
    with pytest.raises(ValueError, match="path"):
        scoring.ScoreSettings(path="slow")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from shardmerge.engine.tiny_models import build_mllm

    return build_mllm(tmp_path_factory.mktemp("m") / "qwen", "qwen2_5_vl", seed=3, num_layers=3)


def _samples():
    rows = fixtures.bench_rows(3)  # choice, yesno, open
    return [
        readers.Sample(
            "b",
            i,
            r["id"],
            r["image"],
            r["question"],
            tuple(r["options"] or ()),
            r["answer"],
            n_choices=len(r["options"] or ()),
        )
        for i, r in enumerate(rows)
    ]


def test_score_sample_fast_equals_exact_and_matches_direct_computation(qwen_dir):
    prompter = prompting.Prompter(qwen_dir)
    model = prompting.load_model(qwen_dir, dtype=torch.float32)
    parts = core.install(model)
    L = parts.num_layers
    for sample in _samples():
        fast = scoring.score_sample(model, parts, prompter, sample, scoring.ScoreSettings(path="fast"))
        exact = scoring.score_sample(model, parts, prompter, sample, scoring.ScoreSettings(path="exact"))
        assert [r["cut"] for r in fast] == list(range(L + 1))
        for f, e in zip(fast, exact):
            assert f["pred"] == e["pred"] and f["correct"] == e["correct"]
            for key in ("gold_logprob", "kl", "kl_vocab"):
                assert f[key] == pytest.approx(e[key], abs=1e-5, rel=1e-4)
        assert fast[-1]["kl"] == 0.0 and fast[-1]["kl_vocab"] == 0.0
        assert any(r["kl_vocab"] > 1e-8 for r in fast[:-1])  # masking changes the answer distribution
        inputs = prompter.encode(sample)
        if sample.n_choices:  # recompute cut 0 by hand from the exact path
            logits = paths.exact_logits(model, inputs, 0)[-1].double()
            ids = prompter.label_ids(sample)
            gold = "ABCD".index(sample.answer)
            assert fast[0]["gold_logprob"] == pytest.approx(float(torch.log_softmax(logits, -1)[ids[gold]]), abs=1e-5)
            assert fast[0]["pred"] == "ABCD"[int(logits[list(ids)].argmax())]
        if prompting.question_kind(sample) == "open":  # prediction = masked greedy generation, decoded
            from shardmerge.engine.probe import generation

            new = generation.greedy_generate(model, inputs, 1, max_new_tokens=8, eos_ids=prompter.eos_ids())
            assert fast[1]["pred"] == prompter.tokenizer.decode(new, skip_special_tokens=True)


def test_attention_focus_matches_eager_attention(qwen_dir):
    """Recorded masses/entropies == those from the eager implementation's returned attention probabilities."""
    from transformers import AutoModelForImageTextToText

    prompter = prompting.Prompter(qwen_dir)
    model = prompting.load_model(qwen_dir, dtype=torch.float32)
    parts = core.install(model)
    inputs = prompter.encode(_samples()[0])
    f = focus.attention_focus(model, parts, inputs)
    eager = AutoModelForImageTextToText.from_pretrained(
        str(qwen_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        att = eager(**inputs.model_kwargs, output_attentions=True).attentions
    assert len(att) == parts.num_layers == len(f.mass)
    for layer, a in enumerate(att):
        row = a[0, :, -1, :].double()  # (heads, S) at the answer position
        img = row[:, inputs.image_mask]
        assert f.mass[layer] == pytest.approx(float(img.sum(-1).mean()), abs=1e-6)
        q = img / img.sum(-1, keepdim=True)
        assert f.entropy[layer] == pytest.approx(float(-(q * q.log()).sum(-1).mean()), abs=1e-5)
        torch.testing.assert_close(f.per_token[layer], img.mean(0).float(), atol=1e-6, rtol=1e-5)
    assert 0 < min(f.mass) and max(f.mass) < 1
    masked = focus.attention_focus(model, parts, inputs, cut=1)
    assert masked.mass[0] == pytest.approx(f.mass[0], abs=1e-6) and masked.mass[1] == 0.0
    grid = focus.image_grid(inputs, model.config)
    _, h, w = inputs.model_kwargs["image_grid_thw"][0].tolist()
    assert grid == (h // 2, w // 2) and grid[0] * grid[1] == int(inputs.image_mask.sum())
    delta = focus.focus_delta(f, masked)
    assert delta["mass"][0] == pytest.approx(0.0, abs=1e-6) and delta["mass"][-1] < 0
