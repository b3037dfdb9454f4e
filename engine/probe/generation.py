"""Short greedy generation with the vision-token mask applied at prefill and at every decode step.

Decoding uses the model's own `generate` (KV cache, M-RoPE position bookkeeping) inside `attention.masking`: the
cached image keys stay blocked in layers >= cut for every new token, because the mask is applied to keys by their
position in the cache, whatever the query.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardmerge.engine.probe import attention
from shardmerge.engine.probe.core import ProbeInputs


@torch.no_grad()
def greedy_generate(
    model,
    inputs: ProbeInputs,
    cut: int,
    *,
    max_new_tokens: int = 8,
    eos_ids: Sequence[int] | None = None,
    with_logits: bool = False,
    mode: str = "clean",
):
    """Greedy continuation (new token ids, eos excluded) with image keys blocked in decoder layers >= cut.

    with_logits: also return the (V,) float32 logits of every decoding step (tests compare them to the fast path).
    mode: see `attention.MODES` (reference-qwen3 leaves the decode steps unmasked, as that reference does)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = list(eos_ids) if eos_ids else None
    pad = eos[0] if eos else 0
    with attention.masking(cut, inputs.image_mask, mode=mode):
        out = model.generate(
            **inputs.model_kwargs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, inputs.seq_len :].tolist()
    logits = [step[0].float() for step in out.logits]
    if eos:
        for i, tok in enumerate(new):
            if tok in eos:
                new, logits = new[:i], logits[: i + 1]
                break
    return (new, logits) if with_logits else new
