"""Learned benchmark of PivotMerge (our reconstruction) against the baselines, on projector experts trained on CPU.

`shardmerge bench pivot` / `python -m shardmerge.jobs.bench pivot`:

1. A synthetic image-caption set: 16 x 16 images of one rendered shape (square, circle, triangle, cross) of one
   colour in one quadrant, with templated captions. Four splits differ in what they cover, as caption datasets do:
   `warm` ("a red circle": red / orange / yellow), `cool` ("a blue square": green / blue / purple), `where` (white
   shapes, "a cross on the top left": the position) and `plus` ("the cross is green": another template over
   crosses and squares of four colours). Every split has disjoint train / validation / test pairs (seeded).
2. One tiny LLaVA-style model in the Hugging Face layout (LlavaForConditionalGeneration: a CLIP vision tower, a
   two-layer MLP projector, a Llama language model): the language model is first trained on the captions alone
   (text only), each after a context of image-token slots holding its attribute words, so it reads a caption's
   content from where the image embeddings will be; then frozen. The vision tower stays at its seeded random
   initialisation, frozen. The projector's seeded initialisation (after `--warmup-steps` of shared training on
   alt-text captions, 0 by default) is the `init` model.
3. K experts (one per split): the projector (only) trained from that same initialisation on its split's training
   pairs (caption cross-entropy given the image). Each is written as a full checkpoint whose backbone bytes equal
   the init model's.
4. Every method merges the K experts' projectors through the engine (a recipe per method, `run_merge` in this
   process): `pivot` (the recipe form; `pivot: mean` with `allow_unaligned: true`, since trained experts fail the
   plan's weight-cosine heuristic although they share the init) and linear, task_arithmetic, ties, tsv, iso_c, cart (backbone passed
   through from the init model).
5. Scores on the held-out pairs of every split: image -> caption retrieval accuracy (the caption of highest
   log-likelihood among all captions the split's template can produce, given the image) and the caption's mean
   per-token log-likelihood. Table: method x split with the mean over splits, 95 % bootstrap CIs over pairs.

Choices are tuned on the validation pairs only: each method has a small grid (`GRIDS`, its standard default
first); the candidate with the best mean validation retrieval accuracy (ties: log-likelihood) is scored once on
the test pairs. `pivot (default)` is also scored with the method's defaults, untuned. `--grid default` scores
only the defaults. Sizes are options (`--steps`, `--train-pairs`, `--text-hidden`, ...); the defaults run in a
few minutes on 2 CPU cores. Results and commands are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PAD, BOS, EOS = 0, 1, 2
PROJECTOR = "model.multi_modal_projector."

COLOURS = {
    "red": (1.0, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.0),
    "yellow": (1.0, 1.0, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.1, 0.2, 1.0),
    "purple": (0.6, 0.1, 0.8),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("square", "circle", "triangle", "cross")
VERTICAL, HORIZONTAL = ("top", "bottom"), ("left", "right")


@dataclass(frozen=True)
class Split:
    """One part of the caption set: which colours and shapes it shows and how its captions read."""

    name: str
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    template: str  # fields: {colour} {shape} {v} {h}

    def caption(self, colour: str, shape: str, v: str, h: str) -> str:
        return self.template.format(colour=colour, shape=shape, v=v, h=h)

    def candidates(self) -> list[str]:
        """Every caption this split's template can produce over its attributes (the retrieval candidates)."""
        out = {
            self.caption(c, s, v, h)
            for c, s, v, h in itertools.product(self.colours, self.shapes, VERTICAL, HORIZONTAL)
        }
        return sorted(out)


SPLITS = (
    Split("warm", ("red", "orange", "yellow"), ("square", "circle", "triangle"), "a {colour} {shape}"),
    Split("cool", ("green", "blue", "purple"), ("square", "circle", "triangle"), "a {colour} {shape}"),
    Split("where", ("white",), SHAPES, "a {shape} on the {v} {h}"),
    Split("plus", ("red", "green", "blue", "yellow"), ("cross", "square"), "the {shape} is {colour}"),
)
WORDS = sorted(
    {w for s in SPLITS for t in s.candidates() for w in t.split()} | set(COLOURS) | set(SHAPES)
)  # word-level vocabulary, ids from 3
VOCAB = {w: i + 3 for i, w in enumerate(WORDS)}
# The shared warm-up of the projector (LLaVA's stage 1): alt-text style captions over every colour and shape, drawn
# apart from the splits' pairs; the experts' init is the projector after it.
WARMUP = Split("alt", tuple(COLOURS), SHAPES, "{colour} {shape} {v} {h}")


def tokens(caption: str) -> list[int]:
    return [VOCAB[w] for w in caption.split()] + [EOS]


# ---------------------------------------------------------------------------------------------------- images


def _mask(shape: str, size: int) -> torch.Tensor:
    """(size, size) bool mask of a shape drawn in a size x size box."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = (size - 1) / 2
    if shape == "square":
        return (ys >= 1) & (ys < size - 1) & (xs >= 1) & (xs < size - 1)
    if shape == "circle":
        return (ys - c) ** 2 + (xs - c) ** 2 <= (size / 2 - 0.3) ** 2
    if shape == "triangle":
        return (ys >= 1) & ((xs - c).abs() <= (ys.float() * 0.5))
    if shape == "cross":
        return ((ys - c).abs() <= 1) | ((xs - c).abs() <= 1)
    raise ValueError(f"unknown shape {shape!r}")


def render(colour: str, shape: str, v: str, h: str, px: int, gen: torch.Generator) -> torch.Tensor:
    """(3, px, px) image in [-1, 1]: a dark noisy background and the shape in its quadrant (jittered)."""
    img = torch.rand(3, px, px, generator=gen) * 0.15
    box = px // 2 - 1
    jy, jx = (int(x) for x in torch.randint(0, px // 2 - box + 1, (2,), generator=gen))
    y0 = (0 if v == "top" else px // 2) + jy
    x0 = (0 if h == "left" else px // 2) + jx
    m = _mask(shape, box)
    rgb = torch.tensor(COLOURS[colour])[:, None, None] * (0.85 + 0.15 * torch.rand(1, generator=gen))
    patch = img[:, y0 : y0 + box, x0 : x0 + box]
    img[:, y0 : y0 + box, x0 : x0 + box] = torch.where(m[None], rgb.expand(3, box, box), patch)
    return img * 2 - 1


@dataclass
class Pairs:
    images: torch.Tensor  # (N, 3, H, W)
    captions: list[str]
    attributes: list[tuple[str, str, str, str]]  # (colour, shape, vertical, horizontal) of each image

    def __len__(self) -> int:
        return len(self.captions)


def make_pairs(split: Split, n: int, px: int, gen: torch.Generator) -> Pairs:
    """n seeded image-caption pairs of a split (attributes drawn uniformly)."""
    images, captions, attributes = [], [], []
    for _ in range(n):
        c = split.colours[int(torch.randint(len(split.colours), (1,), generator=gen))]
        s = split.shapes[int(torch.randint(len(split.shapes), (1,), generator=gen))]
        v = VERTICAL[int(torch.randint(2, (1,), generator=gen))]
        h = HORIZONTAL[int(torch.randint(2, (1,), generator=gen))]
        images.append(render(c, s, v, h, px, gen))
        captions.append(split.caption(c, s, v, h))
        attributes.append((c, s, v, h))
    return Pairs(torch.stack(images), captions, attributes)


# ---------------------------------------------------------------------------------------------------- model


@dataclass
class Config:
    """Every size of the benchmark (command-line options of the same names)."""

    splits: int = 4
    train_pairs: int = 384
    val_pairs: int = 96
    test_pairs: int = 192
    lm_steps: int = 200
    steps: int = 250
    batch: int = 64
    lr: float = 1e-2  # language model and projector warm-up
    warmup_steps: int = 0  # > 0: a shared projector warm-up first (the init every expert starts from)
    expert_lr: float = 1e-2
    text_hidden: int = 64
    vision_hidden: int = 32
    layers: int = 2
    image_size: int = 16  # pixels, square
    patch: int = 8  # vision patch side: (image_size / patch)**2 image tokens
    threads: int = 1  # torch threads (tiny ops: one thread avoids spinning on a shared machine)
    seed: int = 0
    bootstrap: int = 1000
    grid: str = "val"  # val: tune each method on the validation pairs | default: defaults only
    methods: tuple[str, ...] = ("pivot", "linear", "task_arithmetic", "ties", "tsv", "iso_c", "cart")
    extra: dict = field(default_factory=dict)


def llava_config(cfg: Config):
    from transformers import LlavaConfig

    heads = max(1, cfg.text_hidden // 16)
    return LlavaConfig(
        text_config=dict(
            model_type="llama",
            hidden_size=cfg.text_hidden,
            intermediate_size=2 * cfg.text_hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=len(VOCAB) + 4,
            max_position_embeddings=256,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=cfg.vision_hidden,
            intermediate_size=2 * cfg.vision_hidden,
            num_hidden_layers=2,
            num_attention_heads=max(1, cfg.vision_hidden // 16),
            image_size=cfg.image_size,
            patch_size=cfg.patch,
            projection_dim=cfg.vision_hidden,
        ),
        image_token_id=len(VOCAB) + 3,
        image_seq_length=(cfg.image_size // cfg.patch) ** 2,
    )


def build_model(cfg: Config):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration(llava_config(cfg)).float().eval()


@torch.no_grad()
def vision_features(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The frozen tower's features the projector sees (LLaVA's default: hidden layer -2, CLS dropped)."""
    layer = model.config.vision_feature_layer
    out = []
    for i in range(0, len(images), batch):
        hs = model.model.vision_tower(images[i : i + batch], output_hidden_states=True).hidden_states
        out.append(hs[layer][:, 1:])
    return torch.cat(out)


def caption_ids(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) right-padded token ids (caption words + EOS) and their mask."""
    toks = [tokens(c) for c in captions]
    T = max(map(len, toks))
    ids = torch.full((len(toks), T), PAD)
    for i, t in enumerate(toks):
        ids[i, : len(t)] = torch.tensor(t)
    return ids, ids != PAD


def token_logprobs(model, prefix: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """log p(caption token t | BOS, image embeddings `prefix` (N, P, d) or none, earlier tokens): (N, T). The
    fast path of LlavaForConditionalGeneration's forward on [BOS, image tokens, caption] (one frozen language
    model; tests/e2e/test_bench_pivot.py checks it against the full model on a merged checkpoint)."""
    embed = model.model.language_model.get_input_embeddings()
    bos = embed(torch.full((ids.shape[0], 1), BOS))
    parts = [bos] + ([prefix] if prefix is not None else []) + [embed(ids)]
    x = torch.cat(parts, dim=1)
    hidden = model.model.language_model(inputs_embeds=x).last_hidden_state
    start = x.shape[1] - ids.shape[1] - 1
    logits = model.lm_head(hidden[:, start : start + ids.shape[1]])
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]


def _loss(model, prefix, ids, mask) -> torch.Tensor:
    lp = token_logprobs(model, prefix, ids)
    return -(lp * mask).sum() / mask.sum()


def pretrain_language_model(model, pairs: list[Pairs], slots: int, cfg: Config, log) -> None:
    """Text-only training of the language model (embeddings, decoder, head), then frozen: each caption follows a
    `slots`-token context holding its image's four attribute words in random slots (the rest PAD), so the model
    learns to read a caption's content from the context positions where the image embeddings will later be.
    The projector then has to put what the image shows where the language model reads it."""
    if slots < 4:
        raise ValueError(f"the image gives {slots} tokens; the benchmark needs at least 4 (lower --patch)")
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    captions = [c for p in pairs for c in p.captions]
    words = torch.tensor([[VOCAB[w] for w in a] for p in pairs for a in p.attributes])
    ids, mask = caption_ids(captions)
    embed = model.model.language_model.get_input_embeddings()
    for step in range(cfg.lm_steps):
        idx = torch.randint(len(captions), (cfg.batch,), generator=gen)
        context = torch.full((cfg.batch, slots), PAD)
        where = torch.rand(cfg.batch, slots, generator=gen).argsort(dim=1)[:, :4]
        context.scatter_(1, where, words[idx])
        loss = _loss(model, embed(context), ids[idx], mask[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.lm_steps - 1:
            log(f"  language model step {step}: caption loss {loss.item():.3f}")
    for p in model.parameters():
        p.requires_grad_(False)


def train_projector(
    model, init_state: dict, feats: torch.Tensor, captions: list[str], cfg: Config, seed: int, log, *, steps, lr
):
    """Train the projector (only) from `init_state` on (features, captions); returns its state dict."""
    proj = model.model.multi_modal_projector
    proj.load_state_dict(init_state)
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(proj.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ids, mask = caption_ids(captions)
    for step in range(steps):
        idx = torch.randint(len(captions), (cfg.batch,), generator=gen)
        loss = _loss(model, proj(feats[idx]), ids[idx], mask[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"    step {step}: loss {loss.item():.3f}")
    for p in proj.parameters():
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in proj.state_dict().items()}


def save_checkpoint(model, out: Path) -> Path:
    """The whole model in the HF layout (transformers' in-memory names), float32."""
    from shardmerge.engine.tiny_models import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, dict(model.state_dict()), max_shard_size="2MB")
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))
    return out


def projector_of(model_dir: Path) -> dict[str, torch.Tensor]:
    """The projector tensors of a checkpoint dir, keyed as in the projector module's state dict."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if k.startswith(PROJECTOR):
                out[k[len(PROJECTOR) :]] = v.float()
    return out


# ---------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(model, proj_state: dict, feats: torch.Tensor, pairs: Pairs, split: Split, chunk: int = 1024) -> dict:
    """Per-pair retrieval hit (0/1) and caption mean token log-likelihood with the projector `proj_state`."""
    proj = model.model.multi_modal_projector
    proj.load_state_dict(proj_state)
    prefix = proj(feats)
    ids, mask = caption_ids(pairs.captions)
    ll = (token_logprobs(model, prefix, ids) * mask).sum(1) / mask.sum(1)
    cands = split.candidates()
    cids, cmask = caption_ids(cands)
    N, C = len(pairs), len(cands)
    total = torch.empty(N, C)
    flat = [(i, j) for i in range(N) for j in range(C)]
    for s in range(0, len(flat), chunk):
        ii = torch.tensor([i for i, _ in flat[s : s + chunk]])
        jj = torch.tensor([j for _, j in flat[s : s + chunk]])
        lp = (token_logprobs(model, prefix[ii], cids[jj]) * cmask[jj]).sum(1)
        total[ii, jj] = lp
    truth = torch.tensor([cands.index(c) for c in pairs.captions])
    hit = (total.argmax(1) == truth).double()
    return {"hit": hit, "ll": ll.double()}


def bootstrap(per_split: list[torch.Tensor], reps: int, seed: int) -> dict:
    """Means per split and over splits, with 95 % percentile CIs from resampling each split's pairs."""
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for x in per_split:
        idx = torch.randint(len(x), (reps, len(x)), generator=gen)
        draws.append(x[idx].mean(1))
    draws = torch.stack(draws)  # (S, reps)
    mean_draw = draws.mean(0)

    def ci(d):
        return [float(d.quantile(0.025)), float(d.quantile(0.975))]

    return {
        "splits": [{"mean": float(x.mean()), "ci": ci(d)} for x, d in zip(per_split, draws)],
        "mean": {"mean": float(torch.stack([x.mean() for x in per_split]).mean()), "ci": ci(mean_draw)},
    }


# ---------------------------------------------------------------------------------------------------- merging

# Candidate parameters per method, the method's standard setting first; tuned on the validation pairs.
GRIDS: dict[str, list[dict]] = {
    "pivot": [
        {},
        {"pivot": "init"},
        {"density": 0.5},
        {"pivot": "init", "density": 0.5},
        {"scale": 1.5},
        {"pivot": "init", "scale": 1.5},
    ],
    "linear": [{}],
    "task_arithmetic": [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}],
    "ties": [{"density": 0.2}, {"density": 0.5}, {"density": 0.2, "lambda": 1.5}],
    "tsv": [{}, {"alpha": 0.5}],
    "iso_c": [{}, {"alpha": 0.5}, {"alpha": 1.5}],
    "cart": [{}, {"rank_fraction": 0.25}],
}


def recipe(method: str, params: dict, experts: list[Path], init: Path) -> dict:
    """The recipe of one method: the pivot form (projectors only, backbone checked identical), or a baseline on
    the projector with the vision tower and language model passed through from the init model."""
    from shardmerge.engine import methods

    params = dict(params)
    if method == "pivot":
        # The experts do share the init, but trained projectors can drift far enough from it (and from each other)
        # for the plan's weight-cosine heuristic to refuse them: only the init model proves it (see BENCHMARKS.md)
        top = {"init_model": str(init)} if params.get("pivot") == "init" else {"allow_unaligned": True}
        return {
            "merge_method": "pivot",
            "models": [{"model": str(e)} for e in experts],
            "dtype": "float32",
            "parameters": params,
            **top,
        }
    spec = methods.get(method)
    weight = params.pop("weight", 1.0)
    models = [
        {"model": str(e), "parameters": {"weight": weight}} if "weight" in spec.per_model_params else {"model": str(e)}
        for e in experts
    ]
    return {
        "merge_method": method,
        "base_model": str(init),
        "dtype": "float32",
        "models": models,
        "parameters": params,
        "modules": {"vision_tower": {"merge_method": "passthrough"}, "language_model": {"merge_method": "passthrough"}},
    }


def merge(method: str, params: dict, experts: list[Path], init: Path, work: Path) -> tuple[Path, list[str]]:
    """Run the real merge in this process; (output dir, the plan's notes)."""
    import yaml

    from shardmerge.jobs.merge import run_merge

    tag = method + "".join(f"_{k}-{v}" for k, v in sorted(params.items()))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe(method, params, experts, init)))
    out = work / tag
    summary = run_merge(path, out, workers=0, progress=False, overwrite=True)
    return out, list(summary.get("notes", ()))


# ---------------------------------------------------------------------------------------------------- driver


def _fmt(entry: dict, pct: bool) -> str:
    f = 100.0 if pct else 1.0
    lo, hi = entry["ci"]
    return (
        f"{entry['mean'] * f:6.1f} [{lo * f:5.1f},{hi * f:5.1f}]"
        if pct
        else f"{entry['mean']:6.3f} [{lo:.3f},{hi:.3f}]"
    )


def table(rows: dict[str, dict], splits: list[str], metric: str) -> str:
    pct = metric == "hit"
    head = ["method".ljust(26)] + [s.center(20) for s in splits] + ["mean".center(20)]
    lines = [" | ".join(head), "-" * (len(" | ".join(head)))]
    for name, r in rows.items():
        b = r[metric]
        cells = [name.ljust(26)] + [_fmt(x, pct).center(20) for x in b["splits"]] + [_fmt(b["mean"], pct).center(20)]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def run(cfg: Config, work: Path, log=print) -> dict:
    """The whole benchmark in `work`; returns the results (also what --json writes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.image_size % (2 * cfg.patch):
        raise ValueError(f"--image-size {cfg.image_size} must be a multiple of 2 * --patch ({2 * cfg.patch})")
    if not 2 <= cfg.splits <= len(SPLITS):
        raise ValueError(f"--splits must be in [2, {len(SPLITS)}], got {cfg.splits}")
    unknown = [m for m in cfg.methods if m not in GRIDS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(GRIDS)}")
    splits = list(SPLITS[: cfg.splits])
    gen = torch.Generator().manual_seed(cfg.seed)
    data = {
        s.name: {
            part: make_pairs(s, n, cfg.image_size, gen)
            for part, n in (("train", cfg.train_pairs), ("val", cfg.val_pairs), ("test", cfg.test_pairs))
        }
        for s in splits
    }
    model = build_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    log(f"[{time.perf_counter() - t0:6.1f}s] language model on the captions ({cfg.lm_steps} steps)")
    for p in list(model.model.language_model.parameters()) + list(model.lm_head.parameters()):
        p.requires_grad_(True)
    slots = (cfg.image_size // cfg.patch) ** 2
    pretrain_language_model(model, [data[s.name]["train"] for s in splits], slots, cfg, log)
    feats = {s.name: {k: vision_features(model, v.images) for k, v in data[s.name].items()} for s in splits}
    init_state = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    if cfg.warmup_steps:
        log(
            f"[{time.perf_counter() - t0:6.1f}s] shared projector warm-up on `{WARMUP.name}` ({cfg.warmup_steps} steps)"
        )
        warm = make_pairs(WARMUP, cfg.train_pairs, cfg.image_size, gen)
        init_state = train_projector(
            model,
            init_state,
            vision_features(model, warm.images),
            warm.captions,
            cfg,
            99,
            log,
            steps=cfg.warmup_steps,
            lr=cfg.lr,
        )
        model.model.multi_modal_projector.load_state_dict(init_state)
    init_dir = save_checkpoint(model, work / "init")
    experts = []
    for k, s in enumerate(splits):
        log(f"[{time.perf_counter() - t0:6.1f}s] expert {k} ({s.name}): projector, {cfg.steps} steps")
        state = train_projector(
            model,
            init_state,
            feats[s.name]["train"],
            data[s.name]["train"].captions,
            cfg,
            k,
            log,
            steps=cfg.steps,
            lr=cfg.expert_lr,
        )
        model.model.multi_modal_projector.load_state_dict(state)
        experts.append(save_checkpoint(model, work / f"expert_{s.name}"))
    model.model.multi_modal_projector.load_state_dict(init_state)
    t_train = time.perf_counter() - t0

    def evaluate(proj_state: dict, part: str) -> dict:
        per = [score(model, proj_state, feats[s.name][part], data[s.name][part], s) for s in splits]
        return {m: [x[m] for x in per] for m in ("hit", "ll")}

    def summarise(raw: dict, seed: int) -> dict:
        return {m: bootstrap(raw[m], cfg.bootstrap, seed) for m in ("hit", "ll")}

    rows: dict[str, dict] = {}
    rows["init (no training)"] = summarise(evaluate(init_state, "test"), cfg.seed)
    for s, e in zip(splits, experts):
        rows[f"expert {s.name}"] = summarise(evaluate(projector_of(e), "test"), cfg.seed)
    chosen, notes, val_table = {}, {}, {}
    for method in cfg.methods:
        grid = GRIDS[method] if cfg.grid == "val" else GRIDS[method][:1]
        best = None
        for params in grid:
            out, plan_notes = merge(method, params, experts, init_dir, work / "merges")
            raw = evaluate(projector_of(out), "val")
            val = (
                float(torch.stack([x.mean() for x in raw["hit"]]).mean()),
                float(torch.stack([x.mean() for x in raw["ll"]]).mean()),
            )
            val_table.setdefault(method, []).append({"params": params, "val_hit": val[0], "val_ll": val[1]})
            log(
                f"[{time.perf_counter() - t0:6.1f}s] {method} {params or '(defaults)'}: validation retrieval {val[0]:.3f}, ll {val[1]:.3f}"
            )
            if best is None or val > best[0]:
                best = (val, params, out, plan_notes)
            if method == "pivot" and params == {} and cfg.grid == "val":
                rows["pivot (default)"] = summarise(evaluate(projector_of(out), "test"), cfg.seed)
        _, params, out, plan_notes = best
        chosen[method], notes[method] = params, plan_notes
        label = f"{method} (tuned: {', '.join(f'{k}={v}' for k, v in params.items()) or 'defaults'})"
        rows[label] = summarise(evaluate(projector_of(out), "test"), cfg.seed)
    elapsed = time.perf_counter() - t0
    names = [s.name for s in splits]
    text = (
        "image -> caption retrieval accuracy, % (95 % bootstrap CI over test pairs)\n"
        + table(rows, names, "hit")
        + "\n\ncaption log-likelihood, nats/token (95 % bootstrap CI)\n"
        + table(rows, names, "ll")
    )
    return {
        "config": asdict(cfg),
        "splits": names,
        "candidates": {s.name: len(s.candidates()) for s in splits},
        "rows": rows,
        "chosen": chosen,
        "validation": val_table,
        "notes": notes,
        "train_s": t_train,
        "total_s": elapsed,
        "cpu_s": time.process_time() - c0,
        "table": text,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardmerge bench pivot", description=__doc__.split("\n")[0])
    d = Config()
    for f in (
        "splits",
        "train_pairs",
        "val_pairs",
        "test_pairs",
        "lm_steps",
        "steps",
        "batch",
        "text_hidden",
        "vision_hidden",
        "layers",
        "image_size",
        "patch",
        "threads",
        "seed",
        "bootstrap",
        "warmup_steps",
    ):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(d, f))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--expert-lr", type=float, default=d.expert_lr)
    p.add_argument("--grid", choices=("val", "default"), default=d.grid, help="tune on validation pairs, or defaults")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated methods to merge with")
    p.add_argument("--workdir", default=None, help="keep the checkpoints here (default: a temporary dir)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    cfg = Config(
        **{k: getattr(a, k) for k in asdict(d) if k not in ("methods", "extra")},
        methods=tuple(m for m in a.methods.split(",") if m),
    )
    from shardmerge.jobs.bench_common import print_machine

    print_machine()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-pivot-"))
    try:
        res = run(cfg, work)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{res['table']}\n")
    print(f"retrieval candidates per split: {res['candidates']} (chance = 1 / that)")
    print(f"chosen on validation: {json.dumps(res['chosen'])}")
    print(
        f"training {res['train_s']:.0f} s, total {res['total_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU; load average at end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=lambda t: t.tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
