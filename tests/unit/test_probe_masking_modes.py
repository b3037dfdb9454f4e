"""--masking reference-qwen25 / reference-qwen3 against an independent re-implementation that, like the reference
code, literally drops the image tokens' K/V slices in masked layers and hands the shorter keys to the kernel:
FlashAttention-style causal attention aligned bottom-right (rows without keys give a zero output) or PyTorch SDPA
with is_causal=True (aligned top-left), decode steps of the latter unmasked."""

import pytest
import torch

from shardmerge.engine.probe import core, fixtures, generation, paths

LAYERS = 3
REF_NAME = "shardmerge_test_drop_kv"
REF_LAYER = "_test_drop_kv_layer"
_REF_STATE: dict = {}  # cut, image (1, S) bool, mode: the reference model's masking, set by the test


def _flash_bottom_right(q, k, v, scale):
    """softmax(q k^T) v with FlashAttention's causal alignment for kv_len != q_len; rows with no key -> 0."""
    q_len, kv_len = q.shape[2], k.shape[2]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all -inf row: FlashAttention writes zeros
    return (probs @ v.float()).to(q.dtype)


def _drop_kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, REF_LAYER, None)
    state = _REF_STATE
    if layer is None or layer < state["cut"]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    kv_len, q_len = key.shape[2], query.shape[2]
    image = state["image"][0]
    image = torch.cat([image, torch.zeros(max(0, kv_len - image.shape[0]), dtype=torch.bool)])[:kv_len]
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state["mode"] == "reference-qwen3" and q_len == 1:
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, scale=scale)  # decode: no dropping
    else:
        k, v = k[:, :, ~image], v[:, :, ~image]  # the reference's slice: image K/V gone
        if state["mode"] == "reference-qwen25":
            out = _flash_bottom_right(query, k, v, scale)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def _reference_model(family, seed):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF_NAME, _drop_kv_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    model = fixtures.tiny_model(family, LAYERS, seed=seed)
    model.set_attn_implementation(REF_NAME)
    for i, layer in enumerate(core.find_lm_parts(model).layers):
        for m in layer.modules():
            setattr(m, REF_LAYER, i)
    return model


def _setup(family, before, seed=3):
    model = fixtures.tiny_model(family, LAYERS, seed=seed)
    parts = core.install(model)
    inputs = core.make_inputs(fixtures.tiny_inputs(family, seed, before=before), parts.image_token_id)
    return model, parts, inputs, _reference_model(family, seed)


def _ref_logits(ref, inputs, cut, mode):
    _REF_STATE.update(cut=cut, image=inputs.image_mask[None], mode=mode)
    with torch.no_grad():
        return ref(**inputs.model_kwargs, use_cache=False).logits[0].float()


CASES = [(f, 4) for f in fixtures.FAMILIES] + [("qwen2_5_vl", 9)]  # 9 > the 6 image tokens: shifted, not empty


@pytest.mark.parametrize("mode", ["reference-qwen25", "reference-qwen3"])
@pytest.mark.parametrize("family,before", CASES)
def test_reference_modes_equal_dropping_the_image_kv(family, before, mode):
    model, parts, inputs, ref = _setup(family, before)
    first = int(torch.nonzero(inputs.image_mask)[0])
    text = ~inputs.image_mask
    for c in range(LAYERS + 1):
        mine = paths.exact_logits(model, inputs, c, mode=mode)
        torch.testing.assert_close(mine[text], _ref_logits(ref, inputs, c, mode)[text], atol=2e-5, rtol=1e-4)
        clean = paths.exact_logits(model, inputs, c)
        if c == LAYERS:
            torch.testing.assert_close(mine, clean, atol=0, rtol=0)
            continue
        # the quirks are real: the modes differ from clean masking exactly where the references misalign
        after = text.clone()
        after[:first] = False
        if mode == "reference-qwen25" and c == LAYERS - 1:
            # text after the image sees the right keys; only the prefix's own outputs change in the last layer
            torch.testing.assert_close(mine[after], clean[after], atol=1e-6, rtol=0)
        else:  # qwen25: through the changed prefix K/V of later layers; qwen3: later prompt tokens are visible
            assert (mine[after] - clean[after]).abs().max() > 1e-3
        before_diff = (mine[:first] - clean[:first]).abs().max()
        if mode == "reference-qwen25":
            assert before_diff > 1e-3  # prefix rows got zero (or shifted) attention in masked layers
        else:
            assert before_diff == 0  # top-left alignment leaves the prefix causal


@pytest.mark.parametrize("mode", ["reference-qwen25", "reference-qwen3"])
@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_reference_modes_in_generation(family, mode):
    """KV-cached greedy decoding in each mode == the dropping re-implementation's own generate."""
    model, parts, inputs, ref = _setup(family, 4)
    eos = [2]
    for c in (0, 1):
        tokens, logits = generation.greedy_generate(model, inputs, c, max_new_tokens=4, with_logits=True, mode=mode)
        _REF_STATE.update(cut=c, image=inputs.image_mask[None], mode=mode)
        with torch.no_grad():
            out = ref.generate(
                **inputs.model_kwargs,
                do_sample=False,
                max_new_tokens=4,
                min_new_tokens=0,
                eos_token_id=eos,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        assert tokens == out.sequences[0, inputs.seq_len :].tolist()[: len(tokens)]
        for mine, theirs in zip(logits, out.logits):
            torch.testing.assert_close(mine, theirs[0].float(), atol=2e-5, rtol=1e-4)


def test_qwen3_decode_steps_see_the_image_and_qwen25_ones_do_not():
    """A cached decode step vs the same token as the last row of one prefill in the same mode: equal for
    reference-qwen25 (a single query is masked like the prefill's last row), different for reference-qwen3 (its
    decode steps are unmasked, its prefill is not)."""
    model, parts, inputs, _ = _setup("qwen2_5_vl", 4)
    for mode in ("reference-qwen25", "reference-qwen3"):
        tokens, logits = generation.greedy_generate(model, inputs, 0, max_new_tokens=2, with_logits=True, mode=mode)
        prefill = paths.exact_logits(model, core.append_tokens(inputs, tokens[:1]), 0, mode=mode)[-1]
        if mode == "reference-qwen25":
            torch.testing.assert_close(logits[1], prefill, atol=2e-5, rtol=1e-4)
        else:
            assert (logits[1] - prefill).abs().max() > 1e-3


def test_unknown_mode_is_a_value_error():
    model, parts, inputs, _ = _setup("llava", 4)
    with pytest.raises(ValueError, match="masking mode"):
        paths.exact_logits(model, inputs, 1, mode="reference-llava")
