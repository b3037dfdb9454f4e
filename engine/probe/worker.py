"""One model replica probing shards: the heavy state (model, prompter) is built once, then shards stream through.

Used directly in-process and wrapped by the Ray actor in engine/probe/actors.py, so both run the same code.
A sample that cannot be probed for a reason of its own (bad row, prompt/label problem: ValueError) is reported as a
bad row; anything else is a runtime error of the worker and propagates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from shardmerge.engine.probe import core, focus, prompting, readers, scoring

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a probe worker needs besides the shards (frozen: ships to Ray actors)."""

    model: str
    device: str = "cpu"  # cpu | cuda | auto (auto: cuda when this process sees one)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    score: scoring.ScoreSettings = field(default_factory=scoring.ScoreSettings)
    attention: bool = False  # per-sample attention focus (unmasked model)
    attention_sample: str | None = None  # sample id for the heat map (None: the first sample)
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    system_prompt: str | None = None  # a system turn before the user's (lmms-eval's Qwen runs use one)
    min_pixels: int | None = None  # Qwen-VL resize bounds; None: the model directory's image processor
    max_pixels: int | None = None
    split: tuple = ()  # (holdout fraction, seed, "probe" | "eval"): probe only that side of a group split

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"worker device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")

    def local_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("probe worker was asked for device 'cuda' but this process sees no CUDA device")
        return self.device

    def torch_dtype(self, device: str) -> torch.dtype | None:
        """float32 on CPU unless asked otherwise (CPU bf16 is slow and imprecise); the checkpoint's dtype on GPU."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return torch.float32 if device == "cpu" else None


@dataclass
class ShardResult:
    index: int
    rows: list
    bad: list
    focus_rows: list
    heatmap: dict | None  # sample id, image bytes, per-token attention, grid, mass, entropy
    seconds: float


class ShardProber:
    """Holds one model replica; `run(shard)` probes every sample of a shard."""

    def __init__(self, settings: WorkerSettings):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.prompter = prompting.Prompter(
            settings.model,
            system_prompt=settings.system_prompt,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
        )
        device = settings.local_device()
        self.model = prompting.load_model(settings.model, device=device, dtype=settings.torch_dtype(device))
        self.parts = core.install(self.model)
        self.num_layers = self.parts.num_layers

    def run(self, shard: readers.Shard) -> ShardResult:
        start = time.perf_counter()
        read = readers.read_shard(shard)
        rows, bad, focus_rows, heatmap = [], list(read.bad), [], None
        samples = [s for s in read.samples if not self.settings.split or readers.in_split(s, *self.settings.split)]
        for sample in samples:
            try:
                rows.extend(scoring.score_sample(self.model, self.parts, self.prompter, sample, self.settings.score))
                if self.settings.attention:
                    fr, hm = self._focus(sample)
                    focus_rows.extend(fr)
                    heatmap = heatmap or hm
            except ValueError as exc:
                bad.append(dict(benchmark=sample.benchmark, row=sample.row, id=sample.id, reason=str(exc)))
        return ShardResult(shard.index, rows, bad, focus_rows, heatmap, time.perf_counter() - start)

    def _focus(self, sample: readers.Sample):
        inputs = core.to_device(self.prompter.encode(sample), self.model.device)
        f = focus.attention_focus(self.model, self.parts, inputs)
        nosink = f.without(f.sinks)
        grid = focus.image_grid(inputs, self.model.config)
        box = None
        if sample.bbox:
            size = prompting.decode_image(sample.image).size
            box = focus.box_focus(f.per_token, grid, size, sample.bbox)
        rows = []
        for i in range(len(f.mass)):
            row = dict(
                benchmark=sample.benchmark,
                row=sample.row,
                id=sample.id,
                group=sample.group or sample.id,
                layer=i,
                mass=f.mass[i],
                entropy=f.entropy[i],
                weighted_entropy=f.weighted_entropy[i],
                n_sinks=len(f.sinks),
                mass_nosink=nosink.mass[i],
                entropy_nosink=nosink.entropy[i],
                weighted_entropy_nosink=nosink.weighted_entropy[i],
            )
            if box is not None:
                row.update(box_inside=box["inside"][i], box_hit=box["hit"][i])
            rows.append(row)
        wanted = self.settings.attention_sample
        heat = None
        if wanted is None or wanted == sample.id:
            heat = dict(
                benchmark=sample.benchmark,
                row=sample.row,
                id=sample.id,
                image=sample.image,
                per_token=f.per_token.numpy(),
                grid=grid,
                mass=list(f.mass),
                entropy=list(f.entropy),
                sinks=list(f.sinks),
                mass_nosink=list(nosink.mass),
                entropy_nosink=list(nosink.entropy),
            )
        return rows, heat

    def shutdown(self) -> None:
        """Drop the model so its memory (GPU included) is released before the process goes."""
        self.model = None
        self.parts = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
