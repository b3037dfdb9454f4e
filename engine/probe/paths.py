"""The two implementations of the masked forward, which must agree.

exact path: one forward per (sample, cut) with the probe attention blocking image keys in layers >= cut.
fast path:  one unmasked forward keeps the hidden states entering every decoder layer; for each cut c the image
            positions are dropped from the states entering layer c and layers c..L-1 run on the remaining tokens
            with their original position embeddings (incl. Qwen's 3-D M-RoPE). This is exact: in those layers no
            token attends to image keys and the image tokens' own outputs are never read. Suffixes for all cuts are
            batched layer by layer, so a whole sweep costs one pass + sum_c (text-only suffix from c).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from shardmerge.engine.probe import attention
from shardmerge.engine.probe.core import LMParts, ProbeInputs, check_fast_path_supported

# Layer kwargs the fast path knows how to restrict to the kept (text) positions.
_PASS_THROUGH = {"past_key_values": None, "use_cache": False, "attention_mask": None}


def _model_logits(model, inputs: ProbeInputs, last: int = 0) -> torch.Tensor:
    """(S, V) float32 logits, or only those of the last `last` positions when the model can skip the rest (a
    150k-word vocabulary times a 1000-token prompt is gigabytes)."""
    kwargs = dict(inputs.model_kwargs, use_cache=False)
    if last and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = last
    logits = model(**kwargs).logits[0]
    return logits[-last:].float() if last else logits.float()


@torch.no_grad()
def exact_logits(
    model,
    inputs: ProbeInputs,
    cut: int,
    *,
    last: int = 0,
    noise_seed: int | None = None,
    block: bool = True,
    mode: str = "clean",
) -> torch.Tensor:
    """(S, V) float32 logits of one forward with image keys blocked in decoder layers >= cut (cut = L: unmasked);
    with last=k only the (k, V) logits of the last k positions; mode: see `attention.MODES`."""
    with attention.masking(cut, inputs.image_mask, noise_seed=noise_seed, block=block, mode=mode):
        return _model_logits(model, inputs, last)


@dataclass
class Trace:
    """What the unmasked forward leaves behind for the suffix runs."""

    hidden_in: list  # hidden states entering layer l, (1, S, H), l = 0..L-1
    layer_kwargs: list  # the kwargs each layer was called with
    last_out: torch.Tensor | None  # output of layer L-1
    logits: torch.Tensor  # (S, V) the model's own logits, or those of the last `span` positions
    prefix: attention.SharedPrefix | None = None  # K/V of the text before the image, per layer


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def trace(model, parts: LMParts, inputs: ProbeInputs, last: int = 0, prefix_len: int = 0) -> Trace:
    """Run the model once unmasked, capturing every decoder layer's input and kwargs (logits of the last `last`
    positions only when last > 0) and, with prefix_len > 0, the K/V of the first prefix_len positions."""
    n = parts.num_layers
    hidden_in: list = [None] * n
    kwargs_in: list = [None] * n
    captured: dict = {}
    handles = []
    prefix = attention.SharedPrefix(prefix_len) if prefix_len > 0 else None

    def pre_hook(i):
        def hook(module, args, kwargs):
            hidden_in[i] = args[0] if args else kwargs["hidden_states"]
            kwargs_in[i] = dict(kwargs)

        return hook

    def post_hook(module, args, kwargs, out):
        captured["out"] = _layer_output(out)

    try:
        for i, layer in enumerate(parts.layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(parts.layers[-1].register_forward_hook(post_hook, with_kwargs=True))
        if prefix is None:
            logits = _model_logits(model, inputs, last)
        else:
            with attention.shared_prefix(prefix):
                logits = _model_logits(model, inputs, last)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, h in enumerate(hidden_in) if h is None]
    if missing:
        raise RuntimeError(f"{type(model).__name__}: decoder layers {missing} never ran in the unmasked forward")
    if prefix is not None and len(prefix.kv) != n:
        raise RuntimeError(
            f"{type(model).__name__}: shared-prefix K/V captured for {len(prefix.kv)} of {n} decoder "
            "layers; does every decoder layer dispatch through transformers' AttentionInterface?"
        )
    return Trace(hidden_in, kwargs_in, captured.get("out"), logits, prefix)


def _restrict(name: str, value, keep: torch.Tensor, seq_len: int, batch: int):
    """A layer kwarg restricted to the kept positions and expanded to `batch` suffixes."""
    if name in _PASS_THROUGH:
        return _PASS_THROUGH[name]
    if name == "position_embeddings":  # (cos, sin), each (1|3, 1, S, D) or (1, S, D): sequence on dim -2
        return tuple(_restrict_seq(t, keep, -2, batch, name) for t in value)
    if name == "position_ids":  # (1, S) text positions or (k, 1, S)
        return None if value is None else _restrict_seq(value, keep, -1, batch, name)
    if isinstance(value, torch.Tensor) and seq_len in value.shape:
        raise RuntimeError(
            f"fast path: decoder layer kwarg {name!r} of shape {tuple(value.shape)} looks per-position and is not "
            "known to the probe; extend engine/probe/paths.py:_restrict or use the exact path"
        )
    return value


def _restrict_seq(t: torch.Tensor, keep: torch.Tensor, dim: int, batch: int, name: str) -> torch.Tensor:
    t = t.index_select(dim % t.ndim, keep.to(t.device))
    bdim = t.ndim + dim - 1  # batch dim sits just before the sequence dim in every layout the models use
    if t.shape[bdim] != 1:
        raise RuntimeError(f"fast path: {name} has batch {t.shape[bdim]} on dim {bdim}; expected 1")
    shape = list(t.shape)
    shape[bdim] = batch
    return t.expand(*shape)


def _check_head(parts: LMParts, tr: Trace, row: int) -> None:
    """norm + head on the last layer's output must reproduce the model's logits, else the fast path would lie.
    Checked at the last position (row `row` of the trace's logits)."""
    if tr.last_out is None:
        raise RuntimeError("fast path: the last decoder layer's output was not captured")
    mine = parts.head(parts.norm(tr.last_out[:, -1:]))[0, 0].float()
    ref = tr.logits[row]
    tol = 1e-3 * (1 + ref.abs().max())
    if not torch.allclose(mine, ref, atol=float(tol), rtol=1e-3):
        raise RuntimeError(
            "fast path: lm_head(norm(last layer output)) differs from the model's logits by "
            f"{(mine - ref).abs().max().item():.3g} (tolerance {float(tol):.3g}); the architecture post-processes "
            "logits (softcapping / scaling?) — use the exact path"
        )


def _output_rows(positions, keep: torch.Tensor) -> torch.Tensor:
    """Indices into the kept (text) positions whose logits are returned."""
    if positions == "text":
        return torch.arange(len(keep))
    k = 1 if positions == "last" else positions
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(keep):
        raise ValueError(
            f"positions must be 'last', 'text' or an int in 1..{len(keep)} (text tokens), got {positions!r}"
        )
    return torch.arange(len(keep) - k, len(keep))


@torch.no_grad()
def fast_logits(
    model, parts: LMParts, inputs: ProbeInputs, cuts: Iterable[int], *, positions="last"
) -> dict[int, torch.Tensor]:
    """Logits for every cut from one unmasked pass plus batched text-only suffixes.

    positions="last": (V,) at the answer position; "text": (T, V) at every non-image position, in order;
    an int k: (k, V) at the last k text positions (teacher-forced answers).
    Text before the image is never affected by the mask (it cannot attend to later tokens): its logits come from
    the unmasked pass and its K/V are shared with the suffixes instead of being recomputed for every cut."""
    check_fast_path_supported(model)
    n = parts.num_layers
    cuts = sorted(set(_validate_cuts(cuts, n)))
    image_mask = inputs.image_mask.cpu()  # index bookkeeping on the CPU; tensors are moved where they are used
    keep = torch.nonzero(~image_mask).flatten()
    rows = keep[_output_rows(positions, keep)]  # absolute positions whose logits are returned
    first_image = int(torch.nonzero(image_mask)[0])
    span = inputs.seq_len - int(rows[0])  # logits the unmasked pass must produce: its last `span` positions
    tr = trace(model, parts, inputs, last=span, prefix_len=first_image)
    _check_head(parts, tr, span - 1)
    from_trace = tr.logits[(rows - (inputs.seq_len - span)).to(tr.logits.device)]
    result = {n: from_trace} if n in cuts else {}
    suffix = keep[keep > first_image]  # the text that may see the image: recomputed per cut
    pre = rows < first_image
    pick = torch.searchsorted(suffix, rows[~pre])
    suffix_cuts = [c for c in cuts if c < n]
    for c, hidden in zip(suffix_cuts, _run_suffixes(parts, tr, suffix, suffix_cuts, inputs.seq_len)):
        after = parts.head(parts.norm(hidden[None, pick.to(hidden.device)]))[0].float()
        result[c] = torch.cat([from_trace[pre.to(from_trace.device)], after.to(from_trace.device)])
    return {c: (v[0] if positions == "last" else v) for c, v in sorted(result.items())}


def _run_suffixes(parts: LMParts, tr: Trace, keep, cuts: Sequence[int], seq_len: int) -> list:
    """Hidden states (T, H) after the last layer at positions `keep` for each cut, running layers c..L-1 batched
    over cuts, attending to the shared prefix K/V when the trace captured one."""
    if not cuts:
        return []
    if tr.prefix is None:
        return _suffix_layers(parts, tr, keep, cuts, seq_len)
    with attention.shared_prefix(attention.SharedPrefix(tr.prefix.length, tr.prefix.kv, capture=False)):
        return _suffix_layers(parts, tr, keep, cuts, seq_len)


def _suffix_layers(parts: LMParts, tr: Trace, keep, cuts: Sequence[int], seq_len: int) -> list:
    batch = None
    for layer_idx in range(cuts[0], parts.num_layers):
        new = [tr.hidden_in[c][:, keep.to(tr.hidden_in[c].device)] for c in cuts if c == layer_idx]
        if new:
            batch = torch.cat([batch, *new], dim=0) if batch is not None else torch.cat(new, dim=0)
        kwargs = {k: _restrict(k, v, keep, seq_len, batch.shape[0]) for k, v in tr.layer_kwargs[layer_idx].items()}
        kwargs.pop("hidden_states", None)
        batch = _layer_output(parts.layers[layer_idx](batch, **kwargs))
    return [batch[i] for i in range(batch.shape[0])]


def _validate_cuts(cuts: Iterable[int], num_layers: int) -> list[int]:
    cuts = list(cuts)
    bad = [c for c in cuts if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= num_layers]
    if bad or not cuts:
        raise ValueError(f"cut layers must be ints in 0..{num_layers} (L = {num_layers}), got {cuts}")
    return cuts


@torch.no_grad()
def all_exact_logits(
    model, parts: LMParts, inputs: ProbeInputs, cuts: Iterable[int], *, mode: str = "clean"
) -> dict[int, torch.Tensor]:
    """The reference sweep: one masked forward per cut; logits (S, V) each."""
    return {c: exact_logits(model, inputs, c, mode=mode) for c in _validate_cuts(cuts, parts.num_layers)}
