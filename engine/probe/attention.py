"""The masked attention function behind the exact path of the vision-token-masking probe.

It is registered in transformers' AttentionInterface (and AttentionMaskInterface) under `ATTN_NAME`, so every
architecture that dispatches attention through that interface (Llama, Qwen2/2.5/3-VL, LLaVA's language models, ...)
gets the probe without model-specific code. Outside a `masking(...)` context, or for attention modules that are not
language-model decoder layers (e.g. the vision tower), it is exactly transformers' SDPA path.

Inside `masking(cut, image_mask)` the decoder layers with index >= cut see a mask in which no query can attend to the
keys/values of image tokens. Positions (RoPE, M-RoPE) are untouched because keys are masked, not removed; tokens
before the image keep their ordinary causal attention (no bottom-right alignment quirk). The same function serves
the independent check (image K/V replaced by seeded noise) and the attention-focus recorder.

`mode` reproduces, for comparison with published curves, what a reference implementation that *drops* the image
K/V slices before calling its attention kernel computes (expressed here as a mask over the full keys, so RoPE and
the KV cache are the same as in clean mode):

- "reference-qwen25": FlashAttention's causal mask is aligned bottom-right when there are fewer keys than queries:
  query i sees the kept keys of rank <= i + K' - Q (K' kept keys, Q queries). After dropping N image keys, text
  after the image sees exactly the text up to itself, but a query before position N sees no key at all and
  FlashAttention returns a zero output for it (so the text before the image changes in masked layers, and through
  its keys the text after it too). Decode steps (one query) see every kept key.
- "reference-qwen3": PyTorch SDPA's `is_causal` is aligned top-left: query i sees the kept keys of rank <= i, so
  text after the image sees up to N later prompt tokens. Decode steps are not masked at all (the image K/V are only
  dropped in the prefill).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

ATTN_NAME = "shardmerge_probe"
MODES = ("clean", "reference-qwen25", "reference-qwen3")
LAYER_ATTR = "_shardmerge_probe_layer"


@dataclass(frozen=True)
class MaskState:
    """What the attention function needs to know for one masked forward (or one generation)."""

    cut: int  # decoder layers >= cut block image keys
    image_keys: torch.Tensor  # (B, S_prompt) bool: which prompt positions hold image tokens
    noise_seed: int | None = None  # replace the image tokens' K/V in blocked layers by seeded noise
    block: bool = True  # False only for the sensitivity check (noise without the mask must change outputs)
    recorder: AttentionRecorder | None = None
    mode: str = "clean"  # one of MODES


class AttentionRecorder:
    """Collects, per decoder layer, the attention probabilities of the last query row (the answer position)."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}

    def add(self, layer: int, probs: torch.Tensor) -> None:
        if layer in self.rows:
            raise RuntimeError(f"attention of decoder layer {layer} recorded twice in one forward; expected once")
        self.rows[layer] = probs.detach().float().cpu()


_STATE: contextvars.ContextVar[MaskState | None] = contextvars.ContextVar("shardmerge_probe_state", default=None)


@dataclass
class SharedPrefix:
    """Keys/values of the text before the image, per decoder layer (post-RoPE, as attention sees them).

    Masking never changes them (those tokens cannot attend to the image, which comes later), so the fast path
    captures them once in the unmasked pass (`length` positions) and lets the suffix queries attend to them
    instead of recomputing the prefix for every cut."""

    length: int
    kv: dict = field(default_factory=dict)  # layer -> (key (1, H_kv, length, D), value)
    capture: bool = True  # True: record during the unmasked pass; False: prepend during suffix runs


_PREFIX: contextvars.ContextVar[SharedPrefix | None] = contextvars.ContextVar("shardmerge_probe_prefix", default=None)


@contextlib.contextmanager
def shared_prefix(prefix: SharedPrefix) -> Iterator[SharedPrefix]:
    """Within the block, decoder-layer attention records (capture=True) or prepends (False) the prefix K/V."""
    token = _PREFIX.set(prefix)
    try:
        yield prefix
    finally:
        _PREFIX.reset(token)


def _with_prefix(prefix: SharedPrefix, layer: int, query, key, value):
    """Prepend the layer's prefix K/V; the suffix queries see all of it and causal attention among themselves."""
    if layer not in prefix.kv:
        raise RuntimeError(f"fast path: no shared-prefix keys/values captured for decoder layer {layer}")
    k_p, v_p = prefix.kv[layer]
    batch = key.shape[0]
    key = torch.cat([k_p.expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([v_p.expand(batch, -1, -1, -1), value], dim=2)
    mask = _visible(None, query.shape[2], key.shape[2], query.device)  # bottom-right: queries follow the prefix
    return key, value, mask.expand(batch, 1, query.shape[2], key.shape[2])


@contextlib.contextmanager
def masking(
    cut: int,
    image_mask: torch.Tensor,
    *,
    noise_seed: int | None = None,
    block: bool = True,
    recorder: AttentionRecorder | None = None,
    mode: str = "clean",
) -> Iterator[MaskState]:
    """Within the block, forwards of a probe-installed model block image keys from decoder layer `cut` on.

    image_mask: (S,) or (B, S) bool over the prompt positions. Keys beyond the prompt (generated tokens) are text.
    mode: "clean" (default) or one of the reference implementations' alignments (see the module docstring).
    """
    if isinstance(cut, bool) or not isinstance(cut, int) or cut < 0:
        raise ValueError(f"cut layer must be an int >= 0, got {cut!r}")
    if mode not in MODES:
        raise ValueError(f"masking mode must be one of {MODES}, got {mode!r}")
    if image_mask.dtype != torch.bool or image_mask.ndim not in (1, 2):
        raise ValueError(
            f"image_mask must be a 1-D or 2-D bool tensor, got dtype {image_mask.dtype} shape {tuple(image_mask.shape)}"
        )
    keys = image_mask if image_mask.ndim == 2 else image_mask[None]
    state = MaskState(cut=cut, image_keys=keys, noise_seed=noise_seed, block=block, recorder=recorder, mode=mode)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def _image_keys(state: MaskState, batch: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B, kv_len) bool: which key positions are image tokens (prompt positions; generated tokens never are)."""
    keys = state.image_keys.to(device)
    if keys.shape[0] not in (1, batch):
        raise RuntimeError(f"image mask has batch {keys.shape[0]}, attention batch is {batch}; expected 1 or {batch}")
    prompt = keys.shape[1]
    if kv_len < prompt:
        keys = keys[:, :kv_len]
    elif kv_len > prompt:
        keys = torch.cat([keys, keys.new_zeros(keys.shape[0], kv_len - prompt)], dim=1)
    return keys.expand(batch, kv_len)


def _visible(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """The model's own mask as bool (B|1, 1, Q, K), or the causal mask aligned to the end of the cache."""
    if attention_mask is None:
        offset = kv_len - q_len  # queries are the last q_len positions (prefill: 0, decode: cache length)
        q_pos = torch.arange(q_len, device=device)[:, None] + offset
        return (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
    if attention_mask.ndim != 4:
        raise RuntimeError(
            f"probe attention expects a 4-D mask or None, got shape {tuple(attention_mask.shape)}; "
            f"the mask interface {ATTN_NAME!r} is registered as SDPA's, so this is a model-specific mask path"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :kv_len]
    return attention_mask[..., :kv_len] > torch.finfo(attention_mask.dtype).min / 2


def _noisy(t: torch.Tensor, image: torch.Tensor, seed: int) -> torch.Tensor:
    """t (B, H, K, D) with the image key positions replaced by seeded Gaussian noise of t's scale."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device, t.dtype)
    scale = t.float().std().clamp_min(1e-3).to(t.dtype) * 4
    return torch.where(image[:, None, :, None], noise * scale, t)


def _last_row_probs(module, query, key, mask, scaling: float | None) -> torch.Tensor:
    """Attention probabilities (B, heads, K) of the last query row, as the model computes them."""
    q = query[:, :, -1:, :].float()
    k = key.float()
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[..., -1:, :], float("-inf"))
    return torch.softmax(scores, dim=-1)[:, :, 0, :]


def _reference_mask(mode: str, image: torch.Tensor, q_len: int) -> torch.Tensor | None:
    """(B, 1, Q, K) bool: what a kernel given only the kept (non-image) keys lets each query see, placed back on the
    full key positions; None where the reference does not mask (reference-qwen3's decode steps)."""
    kv_len = image.shape[1]
    kept = ~image
    rank = torch.cumsum(kept.long(), dim=1) - 1  # (B, K): index of each kept key among the kept keys
    rows = torch.arange(q_len, device=image.device)[None, :, None]  # (1, Q, 1)
    if mode == "reference-qwen25":  # FlashAttention: causal aligned to the bottom-right corner
        limit = rows + kept.sum(dim=1)[:, None, None] - q_len
    elif kv_len > q_len:  # reference-qwen3 decode step: the reference drops the image K/V in the prefill only
        return None
    else:  # SDPA is_causal: aligned to the top-left corner
        limit = rows
    return (kept[:, None, :] & (rank[:, None, :] <= limit))[:, None]


def probe_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: SDPA with image keys blocked in decoder layers >= the active cut."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _STATE.get()
    layer = getattr(module, LAYER_ATTR, None)
    prefix = _PREFIX.get() if layer is not None else None
    if prefix is not None and prefix.capture:
        prefix.kv[layer] = (key[:, :, : prefix.length], value[:, :, : prefix.length])
    elif prefix is not None:
        if state is not None:
            raise RuntimeError("probe attention: a masked forward inside a shared-prefix suffix run")
        key, value, attention_mask = _with_prefix(prefix, layer, query, key, value)
    if state is None or layer is None or (layer < state.cut and state.recorder is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    mask = _visible(attention_mask, q_len, kv_len, query.device).expand(batch, 1, q_len, kv_len)
    if layer >= state.cut:
        image = _image_keys(state, batch, kv_len, query.device)
        if state.noise_seed is not None:
            key = _noisy(key, image, state.noise_seed * 1009 + 2 * layer)
            value = _noisy(value, image, state.noise_seed * 1009 + 2 * layer + 1)
        if state.block and state.mode != "clean":
            ref = _reference_mask(state.mode, image, q_len)
            if ref is not None:
                empty = ~ref.any(dim=-1, keepdim=True)  # (B, 1, Q, 1): FlashAttention's zero-output rows
                own = torch.arange(kv_len, device=query.device)[None, :] == (
                    torch.arange(q_len, device=query.device)[:, None] + kv_len - q_len
                )
                mask = ref | (empty & own[None, None])  # any visible key keeps SDPA finite; the row is zeroed below
                if state.recorder is not None:
                    state.recorder.add(layer, _last_row_probs(module, query, key, mask, kwargs.get("scaling")))
                out, weights = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
                zero = empty[:, 0, :, 0]  # (B, Q); the output is (B, Q, heads, D)
                return out.masked_fill(zero[:, :, None, None], 0.0), weights
        elif state.block:
            blocked = mask & ~image[:, None, None, :]
            # An image query with no text before it would see nothing (NaN); let it see its own key. Its output is
            # never read: no later query attends to image keys in these layers.
            empty = ~blocked.any(dim=-1, keepdim=True)
            own = torch.arange(kv_len, device=query.device)[None, :] == (
                torch.arange(q_len, device=query.device)[:, None] + kv_len - q_len
            )
            mask = blocked | (empty & own[None, None])
    if state.recorder is not None:
        state.recorder.add(layer, _last_row_probs(module, query, key, mask, kwargs.get("scaling")))
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def register() -> None:
    """Register the probe attention (and SDPA's mask builder under the same name) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, probe_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
