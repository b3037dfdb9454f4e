"""PivotMerge's data-driven contributions: alignment gains of each expert's projector layers on image-caption pairs.

METHODS.md "PivotMerge", step 4, data-driven option (OUR RECONSTRUCTION, docs/pivotmerge.md): for projector layer
l and expert k, a_{k,l} = mean over calibration pairs of [score(pivot projector with expert k's layer l) -
score(pivot projector)]. The default score is contrastive: per image, the cosine between its mean-pooled projected
features and its own caption's mean-pooled LLM token embeddings minus the mean cosine with the other sampled
pairs' captions (matched vs mismatched), so the offset between the two distributions cancels; `score: cosine` keeps
the matched cosine alone. Pairs are a seeded sample of the file's rows. Those gains become the per-model `gain` of
every tensor of layer l, and the merge takes lambda_{k,l} = softmax_k(z_{k,l} / T) of the standardised gains.
Qwen3-VL's deepstack mergers feed the language model's hidden states after its decoder layers, not its input:
under the contrastive score they are excluded (gain 0, a note), since the input embeddings are not where their
output is used.

What runs, and what is never loaded: the vision tower, the projector and the token embeddings of the backbone source
(identical across the experts: shardmerge.engine.plan.forms.pivot checks it), through transformers' own loader so every on-disk
naming it reads works, with the language model cut to one decoder layer that is never called. A 70B-class MLLM's
calibration therefore holds its vision tower + projector + embeddings, not the model. Per image the vision tower runs
once; forward hooks capture the input of every projector root module (LLaVA's `multi_modal_projector`, Qwen-VL's
`visual.merger` and Qwen3-VL's `visual.deepstack_merger_list.<i>`), and the root is re-run for the pivot and for
every (expert, layer) swap with `torch.func.functional_call` -- 1 + K * G cheap projector passes, one image at a
time; the pooled features (one d-vector per pair and swap) are kept for the contrastive score.

A "layer" is a projector submodule holding parameters (`merger.mlp.0`, `linear_2`, `merger.ln_q`, ...): the tensors
swapped together. A layer's features are the output of its root module. A layer outside every root (LLaVA-NeXT's
`image_newline`, added after projection) gets gain 0 for every expert (uniform weights) and a note says so.
Bad input (missing column, undecodable image, empty caption, no pairs) is a ValueError naming the file and row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shardmerge.engine.io.checkpoint import Checkpoint, files_identity, read_rows
from shardmerge.engine.layout import families
from shardmerge.engine.layout.roles import classify
from shardmerge.engine.recipe.schema import CalibrationRecipe

log = logging.getLogger("shardmerge.pivot")

FORMAT = "shardmerge-pivot-calibration/1"
ARTIFACT = "pivot_calibration.json"  # written into the output dir (and the state dir, for --resume)
IMAGE_COLUMNS = ("image", "image_bytes", "img")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentence")


@dataclass(frozen=True)
class Calibration:
    """The gains per projector layer and the per-tensor gains the plan feeds to the pivot op."""

    fingerprint: str
    experts: tuple[str, ...]
    pairs: int
    layers: dict  # layer -> {"tensors": [...], "root": str|None, "gains": [K], "pivot_score": f, "expert_scores": [K]}
    notes: tuple[str, ...] = ()

    def gains_for(self, tensor: str) -> tuple[float, ...]:
        for rec in self.layers.values():
            if tensor in rec["tensors"]:
                return tuple(rec["gains"])
        raise KeyError(tensor)

    def to_json(self) -> str:
        body = {"format": FORMAT, **asdict(self), "notes": list(self.notes), "experts": list(self.experts)}
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str, source: str) -> Calibration:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {FORMAT!r}")
            return Calibration(
                body["fingerprint"],
                tuple(body["experts"]),
                int(body["pairs"]),
                body["layers"],
                tuple(body.get("notes", ())),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: not a PivotMerge calibration file ({type(exc).__name__}: {exc})") from None


def layer_of(sub: str) -> str:
    """The projector layer a tensor belongs to: its module path (`merger.mlp.0.weight` -> `merger.mlp.0`)."""
    return sub.rsplit(".", 1)[0] if "." in sub else sub


def fingerprint(settings: CalibrationRecipe, experts: Sequence[str], pivot: str, ckpts: dict[str, Checkpoint]) -> str:
    """Identity of a calibration: the settings, the pivot rule, the Parquet file's bytes and every input file's
    (size, mtime) -- what a cached result must match to be reused on --resume."""
    h = hashlib.sha256(json.dumps([settings.model_dump(), list(experts), pivot], sort_keys=True).encode())
    with open(settings.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(files_identity(ckpts.values()))
    return h.hexdigest()


# ---------------------------------------------------------------- calibration pairs


def _pick(names: Sequence[str], wanted: str, defaults: Sequence[str], what: str, path: str) -> str:
    if wanted:
        if wanted not in names:
            raise ValueError(f"{path}: calibration {what} column {wanted!r} not found; columns: {list(names)}")
        return wanted
    for c in defaults:
        if c in names:
            return c
    raise ValueError(
        f"{path}: no {what} column (looked for {list(defaults)}); columns: {list(names)}; set calibration.{what}_column"
    )


def _image_bytes(value, path: str, row: int) -> bytes:
    if isinstance(value, dict):  # Hugging Face datasets' image struct {bytes, path}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ValueError(
            f"{path}: row {row}: image is {type(value).__name__}, expected PNG/JPEG bytes (or a "
            "{bytes, path} struct with bytes)"
        )
    return bytes(value)


def _sampled_rows(total: int, settings: CalibrationRecipe) -> set | None:
    """The rows a calibration uses: all when the file has at most max_pairs, else a seeded sample of max_pairs
    (never the first rows, which are often one source or one class)."""
    import random

    if total <= settings.max_pairs:
        return None
    return set(random.Random(settings.seed).sample(range(total), settings.max_pairs))


def read_pairs(settings: CalibrationRecipe) -> list[tuple[int, bytes, str]]:
    """(row, image bytes, caption) of the sampled rows, in file order; ValueError naming the file and row."""
    import pyarrow.parquet as pq

    path = settings.path
    if not Path(path).is_file():
        raise ValueError(f"calibration: {path} is not a file (expected a Parquet file of image-caption pairs)")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or non-Parquet file
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    names = pf.schema_arrow.names
    icol = _pick(names, settings.image_column, IMAGE_COLUMNS, "image", path)
    ccol = _pick(names, settings.caption_column, CAPTION_COLUMNS, "caption", path)
    rows = _sampled_rows(pf.metadata.num_rows, settings)
    pairs: list[tuple[int, bytes, str]] = []
    row = -1
    for batch in pf.iter_batches(batch_size=64, columns=[icol, ccol]):
        for image, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            row += 1
            if rows is not None and row not in rows:
                continue
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}: row {row}: caption {caption!r} is empty or not text")
            pairs.append((row, _image_bytes(image, path, row), caption))
    if not pairs:
        raise ValueError(f"{path}: no image-caption pairs")
    return pairs


def _decode(data: bytes, path: str, row: int):
    from PIL import UnidentifiedImageError

    from shardmerge.engine.probe.prompting import decode_image

    try:
        return decode_image(data)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: row {row}: image is not decodable ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- the model parts


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"calibration.device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"calibration.device {device!r}: no CUDA device here")
    return device


def load_parts(model_dir: str, device: str):
    """The MLLM with its language model cut to one (never called) decoder layer: vision tower, projector and token
    embeddings loaded by transformers (every naming it reads), in float32 on CPU, the checkpoint dtype on CUDA."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    text = getattr(config, "text_config", config)
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:1]
    dtype = torch.float32 if device == "cpu" else "auto"
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped decoder layers are "unexpected keys" by design
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, config=config, dtype=dtype, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{model_dir}: transformers cannot load this MLLM's vision tower and projector for "
            f"calibration ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    return model.to(device).eval()


def projector_roots(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules whose output is projected image features: the projector, Qwen-VL's merger, Qwen3-VL's deepstack
    mergers (name -> module), as the family table's projector_modules / deepstack_modules name them."""
    patterns = families.PROJECTOR_MODULES + families.DEEPSTACK_MODULES
    roots = {}
    for name, mod in model.named_modules():
        if any(families.module_matches(name, p) for p in patterns):
            roots[name] = mod
    if not roots:
        raise ValueError(f"{type(model).__name__}: no projector module found (looked for {patterns})")
    return roots


def _param_index(model: torch.nn.Module, roots: dict) -> dict[str, tuple[str | None, str]]:
    """Layout sub-name (`merger.mlp.0.weight`) -> (root name or None, parameter name relative to the root / model)."""
    index = {}
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        role = classify(name)
        if role is None or role.module != "projector":
            continue
        root = next((r for r in roots if name.startswith(r + ".")), None)
        index[role.sub] = (root, name[len(root) + 1 :] if root else name)
    return index


def _whole(meta) -> torch.Tensor:
    return read_rows(meta, 0, meta.rows if meta.shape else 1).reshape(meta.shape).float()


def projector_weights(
    ckpts: dict[str, Checkpoint], experts: Sequence[str], pivot_ref: str | None, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """(pivot tensor per projector name, the K experts' tensors per name), float32; the pivot is the experts' mean
    or the pivot model's tensor (`init` / `model:<name>`), as the merge itself uses."""
    per_expert = {n: [_whole(ckpts[r].tensors[n]) for r in experts] for n in names}
    pivot = {
        n: (_whole(ckpts[pivot_ref].tensors[n]) if pivot_ref else torch.stack(per_expert[n]).mean(dim=0)) for n in names
    }
    return pivot, per_expert


def _pool(x) -> torch.Tensor:
    """Mean over every position of a projected feature tensor (..., d) -> (d,) in float32."""
    x = x[0] if isinstance(x, (tuple, list)) else getattr(x, "last_hidden_state", x)
    return x.float().reshape(-1, x.shape[-1]).mean(dim=0)


class _Capture:
    """Forward hooks on the projector roots: the (args, kwargs) each was called with and its pooled output."""

    def __init__(self, roots: dict[str, torch.nn.Module]):
        self.calls: dict[str, tuple] = {}
        self.handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in roots.items()]

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            self.calls[name] = (args, kwargs, _pool(output))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _pixels(ip, image, device, dtype) -> dict:
    out = dict(ip(images=[image], return_tensors="pt"))
    keep = {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
    if "pixel_values" not in keep:
        raise ValueError(f"the image processor returned {sorted(out)}; expected pixel_values")
    return {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in keep.items()}


@dataclass
class _Layers:
    """The projector layers: layer -> on-disk tensor names, its root, and each tensor's name inside the root."""

    tensors: dict[str, list[str]] = field(default_factory=dict)
    root: dict[str, str | None] = field(default_factory=dict)
    local: dict[str, str] = field(default_factory=dict)  # on-disk name -> parameter name relative to its root


def _layers(names: Sequence[str], index: dict, model_dir: str) -> _Layers:
    out = _Layers()
    for n in names:
        sub = classify(n).sub
        if sub not in index:
            raise ValueError(
                f"{model_dir}: projector tensor {n!r} has no counterpart in transformers' model "
                f"(projector parameters it has: {sorted(index)[:8]})"
            )
        root, local = index[sub]
        layer = layer_of(sub)
        out.tensors.setdefault(layer, []).append(n)
        out.root[layer] = root
        out.local[n] = local
    return out


def _load_pivot(model: torch.nn.Module, roots: dict, lay: _Layers, pivot: dict[str, torch.Tensor]) -> None:
    """Put the pivot projector into the model (the vision tower stays the shared backbone's)."""
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for layer, names in lay.tensors.items():
        root = lay.root[layer]
        for n in names:
            full = f"{root}.{lay.local[n]}" if root else lay.local[n]
            with torch.no_grad():
                params[full].copy_(pivot[n].reshape(params[full].shape))


def _features(model, roots, lay: _Layers, experts_w, pixels, cap: _Capture):
    """(pooled pivot features per root, pooled features per (layer, expert) swap) for one image."""
    from torch.func import functional_call

    cap.calls.clear()
    model.model.get_image_features(**pixels)
    pivot = {r: cap.calls[r][2] for r in roots if r in cap.calls}
    swapped = {}
    for layer, names in lay.tensors.items():
        root = lay.root[layer]
        if root is None or root not in cap.calls:
            continue
        args, kwargs, _ = cap.calls[root]
        dtype = next(roots[root].parameters()).dtype
        for k in range(len(next(iter(experts_w.values())))):
            swap = {lay.local[n]: experts_w[n][k].to(args[0].device, dtype) for n in names}
            swapped[(layer, k)] = _pool(functional_call(roots[root], swap, args, kwargs))
    return pivot, swapped


def _is_deepstack(root: str | None) -> bool:
    return root is not None and any(families.module_matches(root, p) for p in families.DEEPSTACK_MODULES)


def pair_scores(features: torch.Tensor, captions: torch.Tensor, score: str) -> torch.Tensor:
    """Per-pair score (N,) of pooled features (N, d) against pooled captions (N, d): `contrastive` (matched minus
    mean mismatched cosine, shardmerge.engine.methods.pivot.contrastive_scores) or `cosine` (the matched cosine alone)."""
    from shardmerge.engine.methods.pivot import contrastive_scores

    if score == "contrastive":
        return contrastive_scores(features, captions)
    return torch.nn.functional.cosine_similarity(features, captions, dim=-1).double()


def calibrate(
    settings: CalibrationRecipe,
    model_dir: str,
    ckpts: dict[str, Checkpoint],
    experts: Sequence[str],
    pivot_ref: str | None,
    names: Sequence[str],
    fp: str,
    *,
    progress: bool = True,
) -> Calibration:
    """Run the calibration (see the module doc) and return the gains per projector layer."""
    from transformers import AutoTokenizer

    from shardmerge.engine.probe.prompting import load_image_processor

    pairs = read_pairs(settings)
    if settings.score == "contrastive" and len(pairs) < 2:
        raise ValueError(
            f"{settings.path}: the contrastive score compares each image with the other pairs' captions "
            f"and needs at least 2 pairs, got {len(pairs)}"
        )
    device = resolve_device(settings.device)
    model = load_parts(model_dir, device)
    roots = projector_roots(model)
    lay = _layers(names, _param_index(model, roots), model_dir)
    pivot_w, experts_w = projector_weights(ckpts, experts, pivot_ref, names)
    _load_pivot(model, roots, lay, pivot_w)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ip, embed = load_image_processor(model_dir), model.get_input_embeddings()
    dtype = next(embed.parameters()).dtype
    captions, pivot_f, swapped_f = [], {}, {}
    cap = _Capture(roots)
    bar = _progress(len(pairs), progress)
    try:
        with torch.no_grad():
            for row, data, text in pairs:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError(f"{settings.path}: row {row}: caption {text!r} tokenizes to nothing")
                captions.append(_pool(embed(torch.tensor([ids], device=device))).cpu())
                pixels = _pixels(ip, _decode(data, settings.path, row), device, dtype)
                pf, sf = _features(model, roots, lay, experts_w, pixels, cap)
                for key, v in pf.items():
                    pivot_f.setdefault(key, []).append(v.cpu())
                for key, v in sf.items():
                    swapped_f.setdefault(key, []).append(v.cpu())
                bar.update(1)
    finally:
        cap.close()
        bar.close()
    return _result(fp, experts, settings.score, lay, torch.stack(captions), pivot_f, swapped_f)


def run_calibration(
    settings: CalibrationRecipe,
    model_dir: str,
    ckpts: dict[str, Checkpoint],
    experts: Sequence[str],
    pivot_ref: str | None,
    names: Sequence[str],
    fp: str,
    *,
    address: str | None = None,
) -> Calibration:
    """`calibrate` where `settings.where` says: in this process, or as a Ray task (one GPU when the cluster has
    any; inputs on storage every node sees, as for the merge itself). `auto` sends it to the cluster only when the
    merge runs on one (`address` / RAY_ADDRESS), this process sees no CUDA device and the cluster has GPUs."""
    args = (settings, model_dir, ckpts, tuple(experts), pivot_ref, tuple(names), fp)
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    if settings.where == "driver" or (settings.where == "auto" and (not on_cluster or torch.cuda.is_available())):
        return calibrate(*args)
    import ray

    from shardmerge.engine.run.ray_session import alive_nodes, connect
    from shardmerge.engine.run.ray_session import unwrap as _unwrap

    started = connect(address)
    try:
        gpus = sum(n.get("GPU", 0) for n in alive_nodes())
        if settings.where == "auto" and not gpus:
            log.info("pivot: the cluster has no GPU; calibrating in the driver")
            return calibrate(*args)
        log.info("pivot: calibrating in a Ray task (%s)", "1 GPU" if gpus else "CPU")
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=1)(calibrate)
        try:
            return ray.get(task.remote(*args, progress=False))
        except Exception as exc:  # a RayTaskError wraps the task's ValueError / RuntimeError
            raise _unwrap(exc) from None
    finally:
        if started:
            ray.shutdown()


def _result(fp, experts, score: str, lay: _Layers, captions: torch.Tensor, pivot_f: dict, swapped_f: dict):
    """Gains per layer from the collected pooled features: mean over pairs of score(swap) - score(pivot). A layer
    off the feature path, or (contrastive score) a Qwen3-VL deepstack merger, gets gain 0 for every expert."""
    layers, notes = {}, []
    K, n = len(experts), captions.shape[0]
    pivot_scores = {r: pair_scores(torch.stack(v), captions, score) for r, v in pivot_f.items()}
    for layer, names in lay.tensors.items():
        root = lay.root[layer]
        if root is None or root not in pivot_scores:
            notes.append(
                f"projector layer {layer!r} is not on the path of the projected image features; its gain is "
                "0 for every expert (uniform weights)"
            )
            gains, pscore, escores = [0.0] * K, None, [None] * K
        elif score == "contrastive" and _is_deepstack(root):
            notes.append(
                f"projector layer {layer!r} (a deepstack merger) is excluded from the contrastive score: "
                "its output is added to the language model's hidden states after its decoder layers, not "
                "compared with caption embeddings at the input; gain 0 for every expert (uniform weights)"
            )
            gains, pscore, escores = [0.0] * K, None, [None] * K
        else:
            base = pivot_scores[root]
            gains = [
                float((pair_scores(torch.stack(swapped_f[(layer, k)]), captions, score) - base).mean())
                for k in range(K)
            ]
            pscore = float(base.mean())
            escores = [pscore + g for g in gains]
        if not all(math.isfinite(g) for g in gains):
            raise ValueError(f"calibration: projector layer {layer!r}: non-finite alignment gains {gains}")
        layers[layer] = {
            "tensors": sorted(names),
            "root": root,
            "gains": gains,
            "pivot_score": pscore,
            "expert_scores": escores,
        }
    return Calibration(fp, tuple(experts), n, layers, tuple(notes))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="pivot calibration", unit="pair", disable=not enabled, mininterval=2.0)
