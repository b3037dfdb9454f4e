"""Exact path (per-layer attention mask) vs fast path (prefix sharing, image positions dropped) of the probe."""

import pytest
import torch

from shardmerge.engine.probe import core, fixtures, generation, paths

# dtype -> (atol, rtol) for logits of the two paths (different reduction lengths, same math)
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
LAYERS = 3


def _setup(family, dtype=torch.float32, seed=1):
    model = fixtures.tiny_model(family, LAYERS, seed=seed, dtype=dtype)
    stock = fixtures.tiny_model(family, LAYERS, seed=seed, dtype=dtype)  # never installed: plain SDPA
    parts = core.install(model)
    inputs = core.make_inputs(fixtures.tiny_inputs(family, seed), parts.image_token_id)
    return model, stock, parts, inputs


def _close(a, b, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("family,dtype", [(f, torch.float32) for f in fixtures.FAMILIES] + [("llava", torch.bfloat16)])
def test_fast_equals_exact_for_every_cut(family, dtype):
    model, stock, parts, inputs = _setup(family, dtype)
    text = ~inputs.image_mask
    fast = paths.fast_logits(model, parts, inputs, range(LAYERS + 1), positions="text")
    last = paths.fast_logits(model, parts, inputs, range(LAYERS + 1), positions="last")
    tail = paths.fast_logits(model, parts, inputs, range(LAYERS + 1), positions=3)
    assert sorted(fast) == list(range(LAYERS + 1))
    unmasked = stock(**inputs.model_kwargs).logits[0].float()
    for c in range(LAYERS + 1):
        exact = paths.exact_logits(model, inputs, c)
        _close(fast[c], exact[text], dtype)
        _close(last[c], exact[-1], dtype)
        _close(tail[c], exact[-3:], dtype)
        _close(paths.exact_logits(model, inputs, c, last=3), exact[-3:], dtype)
        if c < LAYERS:  # the mask must matter, otherwise agreement proves nothing
            assert (exact[text] - unmasked[text]).abs().max() > 4 * TOL[dtype][0]


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_cut_L_is_the_unmodified_model(family):
    model, stock, parts, inputs = _setup(family)
    unmasked = stock(**inputs.model_kwargs).logits[0].float()
    torch.testing.assert_close(paths.exact_logits(model, inputs, LAYERS), unmasked, atol=0, rtol=0)
    fast = paths.fast_logits(model, parts, inputs, [LAYERS], positions="text")[LAYERS]
    torch.testing.assert_close(fast, unmasked[~inputs.image_mask], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_tokens_before_the_image_attend_normally(family):
    """No FlashAttention bottom-right quirk: positions before the image are untouched by any cut."""
    model, stock, parts, inputs = _setup(family)
    first_image = int(torch.nonzero(inputs.image_mask)[0])
    unmasked = stock(**inputs.model_kwargs).logits[0].float()
    for c in range(LAYERS):
        exact = paths.exact_logits(model, inputs, c)
        torch.testing.assert_close(exact[:first_image], unmasked[:first_image], atol=1e-6, rtol=1e-5)
        assert exact[:first_image].abs().max() > 0


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_noise_in_image_kv_after_cut_changes_nothing(family):
    """Independent check: image K/V replaced by noise in layers >= c leaves the masked outputs unchanged, while the
    same noise without the mask does change them (so the check can fail)."""
    model, _, parts, inputs = _setup(family)
    text = ~inputs.image_mask
    for c in range(LAYERS):
        clean = paths.exact_logits(model, inputs, c)
        noisy = paths.exact_logits(model, inputs, c, noise_seed=7)
        torch.testing.assert_close(noisy[text], clean[text], atol=1e-6, rtol=1e-5)
        unblocked = paths.exact_logits(model, inputs, c, noise_seed=7, block=False)
        assert (unblocked[text] - clean[text]).abs().max() > 1e-3


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_generation_masks_every_decode_step(family):
    """KV-cached greedy decoding under the mask == recomputing the fast path on the growing sequence."""
    model, _, parts, inputs = _setup(family)
    steps = 5
    outs = {}
    for c in (0, 1, LAYERS):
        tokens, logits = generation.greedy_generate(model, inputs, c, max_new_tokens=steps, with_logits=True)
        assert len(tokens) == steps and len(logits) == steps
        current = inputs
        for step in range(steps):
            ref = paths.fast_logits(model, parts, current, [c])[c]
            torch.testing.assert_close(logits[step], ref, atol=1e-4, rtol=1e-4)
            assert int(ref.argmax()) == tokens[step]
            current = core.append_tokens(current, [tokens[step]])
        outs[c] = logits
    assert (outs[0][0] - outs[LAYERS][0]).abs().max() > 1e-3  # masking changes the first decoding step


def test_generation_stops_at_eos():
    model, _, parts, inputs = _setup("llava")
    free = generation.greedy_generate(model, inputs, 1, max_new_tokens=4)
    stopped = generation.greedy_generate(model, inputs, 1, max_new_tokens=4, eos_ids=[free[1]])
    assert stopped == free[: free.index(free[1])]


def test_bad_inputs_are_value_errors():
    model, _, parts, inputs = _setup("qwen2_5_vl")
    with pytest.raises(ValueError, match="cut layers"):
        paths.fast_logits(model, parts, inputs, [LAYERS + 1])
    with pytest.raises(ValueError, match="cut layer"):
        paths.exact_logits(model, inputs, -1)
    with pytest.raises(ValueError, match="positions"):
        paths.fast_logits(model, parts, inputs, [0], positions=10_000)
    text_only = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="no image tokens"):
        core.make_inputs(text_only, parts.image_token_id)
    padded = dict(inputs.model_kwargs, attention_mask=torch.zeros_like(inputs.input_ids))
    with pytest.raises(ValueError, match="padding"):
        core.make_inputs(padded, parts.image_token_id)


def test_sliding_window_models_refused_by_fast_path():
    model, _, parts, inputs = _setup("llava")
    model.config.text_config.layer_types = ["sliding_attention"] + ["full_attention"] * (LAYERS - 1)
    with pytest.raises(ValueError, match="full-attention"):
        paths.fast_logits(model, parts, inputs, [0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_gpu_fast_equals_exact_bf16(family):
    model = fixtures.tiny_model(family, LAYERS, seed=2, dtype=torch.bfloat16).cuda()
    parts = core.install(model)
    inputs = core.to_device(core.make_inputs(fixtures.tiny_inputs(family, 2), parts.image_token_id), "cuda")
    fast = paths.fast_logits(model, parts, inputs, range(LAYERS + 1), positions="text")
    for c in range(LAYERS + 1):
        exact = paths.exact_logits(model, inputs, c)
        _close(fast[c], exact[(~inputs.image_mask).to(exact.device)], torch.bfloat16)
    tokens, logits = generation.greedy_generate(model, inputs, 1, max_new_tokens=3, with_logits=True)
    ref = paths.fast_logits(model, parts, inputs, [1])[1]
    _close(logits[0], ref, torch.bfloat16)
