"""A tiny MLLM whose answers depend on the image, for the demo and tests: random tiny weights ignore the image, so
their probe curve is flat and says so; a few seconds of training on a synthetic visual question ("Is the picture
bright?" on bright and dark noise images) make the unmasked model answer from the image, so m(L) is far above
m(0) and the curve has stages.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

QUESTION = "Is the picture bright?"


def visual_png(bright: bool, seed: int, size: tuple = (56, 56)) -> bytes:
    """A noisy RGB PNG whose mean brightness (not its hue or texture) carries the answer."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    level = rng.uniform(0.7, 0.95) if bright else rng.uniform(0.05, 0.3)
    tint = rng.uniform(0.8, 1.2, size=3)
    arr = np.clip(level * tint[None, None, :] + rng.normal(0, 0.08, (size[1], size[0], 3)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((arr * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def visual_rows(n: int, seed: int = 0) -> list[dict]:
    """n yes/no rows of our benchmark schema (see fixtures.write_ours), alternating bright/dark."""
    rows = []
    for i in range(n):
        bright = i % 2 == 0
        rows.append(
            dict(
                id=f"v{i}",
                image=visual_png(bright, seed * 100_003 + i),
                question=QUESTION,
                options=None,
                answer="yes" if bright else "no",
                category="brightness",
            )
        )
    return rows


def train_visual_mllm(model_dir: str | Path, *, n: int = 16, steps: int = 12, lr: float = 1e-2, seed: int = 0) -> dict:
    """Fine-tune the MLLM in `model_dir` in place on `visual_rows(n, seed)` (every parameter, Adam, full-vocab
    cross-entropy of the answer label's first token) and rewrite its weights; returns the training accuracy of the
    unmasked model before and after. The rows it trains on use seed `seed`: evaluate on another seed."""
    from shardmerge.engine.probe import prompting, readers
    from shardmerge.engine.tiny_models import write_safetensors

    model_dir = Path(model_dir)
    prompter = prompting.Prompter(model_dir)
    model = prompting.load_model(model_dir, dtype=torch.float32)
    samples = [
        readers.Sample("train", i, r["id"], r["image"], r["question"], (), r["answer"])
        for i, r in enumerate(visual_rows(n, seed))
    ]
    encoded = [prompter.encode(s) for s in samples]
    if len({e.seq_len for e in encoded}) != 1:
        raise RuntimeError("visual task prompts differ in length; they are batched without padding")
    # one batch: every kwarg (ids, masks, Qwen patches and grids, LLaVA images) concatenates along dim 0
    kw = {k: torch.cat([e.model_kwargs[k] for e in encoded]) for k in encoded[0].model_kwargs}
    labels = [prompter.label_ids(s) for s in samples]  # (Yes, No) first tokens
    target = torch.tensor([lab[0 if s.answer == "yes" else 1] for lab, s in zip(labels, samples)])
    label_ids = torch.tensor(labels)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            last = model(**kw, use_cache=False).logits[:, -1]
        pred = label_ids.gather(1, last.gather(1, label_ids).argmax(1, keepdim=True))[:, 0]
        return float((pred == target).float().mean())

    before = accuracy()
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(**kw, use_cache=False).logits[:, -1], target)
        loss.backward()
        opt.step()
    after = accuracy()
    for old in list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.safetensors.index.json")):
        old.unlink()
    write_safetensors(model_dir, model.state_dict())
    return {"train_accuracy_before": before, "train_accuracy_after": after, "steps": steps, "rows": n}
