"""Tiny in-memory MLLMs and tiny benchmark files for the probe's tests, benchmark and demo (no downloads).

The in-memory models are deliberately different from shardmerge.engine.tiny_models' on-disk ones (other widths, layer counts,
vision settings) so that the probe is checked on more than one shape of each architecture.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import torch

from shardmerge.engine import tiny_models
from shardmerge.engine.layout import families

IMAGE, VIDEO, V_START, V_END = 150, 151, 152, 153  # special ids of the in-memory models (vocab 160)
_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END)
# the families whose image tokens `tiny_inputs` lays out: a patch grid (Qwen-VL) or a fixed count (LLaVA)
FAMILIES = tuple(f for f in tiny_models.MLLM_FAMILIES if families.get(f).image_tokens in ("grid", "fixed"))
# vision-tower sizes of the in-memory models, applied to each key the family's tiny builder sets
_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    patch_size=4,
    window_size=16,
    num_hidden_layers=1,
    projection_dim=16,
    deepstack_visual_indexes=[0, 1],
)


def _text(num_layers: int, hidden: int, heads: int, **extra) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=160,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def tiny_config(family: str, num_layers: int = 3, *, hidden: int = 32, heads: int = 4, llava_side: int = 4):
    """A transformers config of a tiny MLLM (default hidden 32, head_dim 8, vocab 160), built by the family's
    tiny-model builder entry with these sizes.

    LLaVA images are 4*llava_side pixels square -> llava_side**2 image tokens; Qwen's come from the input grid."""
    if family not in FAMILIES:
        raise ValueError(f"unknown in-memory probe family {family!r}; expected one of {', '.join(FAMILIES)}")
    vision = dict(tiny_models.TINY_MLLM[family].vision)
    vision.update({k: v for k, v in _VISION.items() if k in vision})
    if "image_size" in vision:
        vision["image_size"] = 4 * llava_side
    ids = {k: _IDS[k] for k in tiny_models.media_token_ids(family)}
    return tiny_models.mllm_config(family, _text(num_layers, hidden, heads, head_dim=hidden // heads), vision, ids)


def tiny_model(family: str, num_layers: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, **shape):
    """A tiny random MLLM in memory, every tensor seeded and informative (norms not exactly 1).
    `shape`: hidden / heads / llava_side for tiny_config."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(family, num_layers, **shape), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else 0.05))
    return model.to(dtype).eval()


def tiny_inputs(
    family: str, seed: int = 0, *, before: int = 4, after: int = 6, grid: tuple = (4, 6), llava_side: int = 4
) -> dict:
    """Model kwargs (batch 1) for an in-memory model: `before` text tokens, the image, `after` text tokens.

    Qwen: a t=1 image of grid (h, w) patches (-> h*w/4 image tokens, M-RoPE positions); LLaVA: llava_side**2."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, 140, (before,), generator=gen)
    post = torch.randint(3, 140, (after,), generator=gen)
    if families.get(family).image_tokens == "fixed":
        ids = torch.cat([pre, torch.full((llava_side**2,), IMAGE), post])[None]
        pix = torch.randn(1, 3, 4 * llava_side, 4 * llava_side, generator=gen)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix)
    h, w = grid
    n_img = h * w // 4
    ids = torch.cat([pre, torch.tensor([V_START]), torch.full((n_img,), IMAGE), torch.tensor([V_END]), post])[None]
    pix = torch.randn(h * w, 3 * 2 * 4 * 4, generator=gen)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pix,
        image_grid_thw=torch.tensor([[1, h, w]]),
        mm_token_type_ids=(ids == IMAGE).int(),
    )


# ----------------------------------------------------------------------------------------------------------------
# tiny benchmarks in the three supported formats
# ----------------------------------------------------------------------------------------------------------------


def png_bytes(seed: int, size: tuple = (56, 56)) -> bytes:
    """A small random RGB PNG (Pillow), different per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bench_rows(n: int, seed: int = 0, kinds: Sequence[str] = ("choice", "yesno", "open")) -> list[dict]:
    """n benchmark rows cycling through the question kinds; options only for multiple choice."""
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        row = dict(
            id=f"q{i}",
            image=png_bytes(seed * 1000 + i),
            question=f"question {i} about the picture?",
            category=f"cat{i % 2}",
        )
        if kind == "choice":
            row.update(options=["red", "green", "blue", "black"], answer="ABCD"[i % 4])
        elif kind == "yesno":
            row.update(options=None, answer="yes" if i % 2 else "no")
        else:
            row.update(options=None, answer=f"w{i % 3}")
        rows.append(row)
    return rows


def write_ours(path: Path, rows: list[dict], *, row_group_size: int = 4, image_paths: bool = False) -> Path:
    """Our Parquet schema: id, image (bytes) or image_path, question, options (list, nullable), answer, category."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    cols = {k: [r.get(k) for r in rows] for k in ("id", "question", "options", "answer", "category")}
    if image_paths:
        img_dir = path.parent / f"{path.stem}_images"
        img_dir.mkdir(parents=True, exist_ok=True)
        for r in rows:
            (img_dir / f"{r['id']}.png").write_bytes(r["image"])
        cols["image_path"] = [f"{img_dir.name}/{r['id']}.png" for r in rows]
    else:
        cols["image"] = [r["image"] for r in rows]
    schema = {"options": pa.list_(pa.string()), "image": pa.binary()}
    table = pa.table({k: pa.array(v, type=schema.get(k)) for k, v in cols.items()})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf(path: Path, rows: list[dict], *, row_group_size: int = 4) -> Path:
    """HF datasets Parquet: `image` struct {bytes, path}; MC options as a `choices` list, answer as an index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    answers = []
    for r in rows:
        answers.append(str("ABCD".index(r["answer"])) if r.get("options") else r["answer"])
    table = pa.table(
        {
            "question_id": [r["id"] for r in rows],
            "image": [{"bytes": r["image"], "path": f"{r['id']}.png"} for r in rows],
            "question": [r["question"] for r in rows],
            "choices": pa.array([r.get("options") for r in rows], type=pa.list_(pa.string())),
            "answer": answers,
            "category": [r.get("category") for r in rows],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_tsv(path: Path, rows: list[dict], *, hint: str | None = None) -> Path:
    """VLMEvalKit TSV: index, base64 image, question, hint, A/B/C/D option columns, answer, category."""
    path = Path(path)
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    lines = ["\t".join(header)]
    for i, r in enumerate(rows):
        opts = list(r.get("options") or []) + [""] * 4
        cells = [
            str(i),
            base64.b64encode(r["image"]).decode(),
            r["question"],
            hint or "",
            *opts[:4],
            r["answer"],
            r.get("category") or "",
        ]
        lines.append("\t".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path
