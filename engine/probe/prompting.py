"""Prompts for the probe, built from a model directory without torchvision.

transformers' composite Qwen2-VL/Qwen2.5-VL/Qwen3-VL processors cannot be constructed without torchvision (their
video processor needs it), so the prompt is assembled from the directory's tokenizer, chat template and (PIL) image
processor, and the single image placeholder is expanded to one token per visual feature here, exactly as the Qwen
processors do (grid_t * grid_h * grid_w / merge_size**2). When AutoProcessor can be built (LLaVA, LLaVA-NeXT) it is
used as is. Image-token positions always come from the processed ids.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from shardmerge.engine.probe import core
from shardmerge.engine.probe.readers import LETTERS, Sample

CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_SUFFIX = "Answer the question using a single word or phrase."
YES_NO = ("Yes", "No")


def question_kind(sample: Sample) -> str:
    """choice (option letters), yesno (gold yes/no, no options) or open."""
    if sample.n_choices:
        return "choice"
    if sample.answer.strip().lower() in ("yes", "no"):
        return "yesno"
    return "open"


def labels(sample: Sample) -> tuple[str, ...]:
    """The answer labels compared at the answer position (empty for open questions)."""
    kind = question_kind(sample)
    if kind == "choice":
        return tuple(LETTERS[: sample.n_choices])
    return YES_NO if kind == "yesno" else ()


def gold_label(sample: Sample) -> str:
    return sample.answer.strip().capitalize() if question_kind(sample) == "yesno" else sample.answer


def prompt_text(sample: Sample) -> str:
    """The user's text: hint, question, lettered options, and the usual short-answer instruction."""
    parts = [sample.hint] if sample.hint else []
    parts.append(sample.question)
    parts.extend(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(sample.options))
    parts.append(CHOICE_SUFFIX if sample.n_choices else SHORT_SUFFIX)
    return "\n".join(parts)


def decode_image(data: bytes):
    """PNG/JPEG bytes -> an RGB PIL image (the probe's samples, PivotMerge's calibration pairs)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class Prompter:
    """Turns a Sample into ProbeInputs for one model directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.system_prompt = system_prompt or None
        # trust_remote_code=False everywhere: a model repo's own Python never runs (and transformers never prompts)
        self.config = AutoConfig.from_pretrained(str(self.model_dir), trust_remote_code=False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), trust_remote_code=False)
        self.image_token_id = core.image_token_id(self.config)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.processor = self._processor()
        self.image_processor = (
            self.processor.image_processor if self.processor is not None else load_image_processor(self.model_dir)
        )
        if not self.tokenizer.chat_template:
            template = getattr(self.processor, "chat_template", None) or _template_file(self.model_dir)
            if not template:
                raise ValueError(
                    f"{self.model_dir}: no chat template in the tokenizer, processor or "
                    "chat_template.jinja / chat_template.json files"
                )
            self.tokenizer.chat_template = template
        self.pixel_kw = self._pixel_bounds(min_pixels, max_pixels)

    def _pixel_bounds(self, min_pixels: int | None, max_pixels: int | None) -> dict:
        """Image-processor call kwargs bounding Qwen-VL's resized pixel count (its `size` shortest/longest edge)."""
        if min_pixels is None and max_pixels is None:
            return {}
        size = getattr(self.image_processor, "size", None)
        if self.processor is not None or size is None or "longest_edge" not in dict(size):
            raise ValueError(
                f"{self.model_dir}: --min-pixels/--max-pixels bound Qwen-VL's dynamic resolution; this "
                "model's image processor resizes to a fixed size (leave them unset)"
            )
        bounds = dict(size)
        bounds["shortest_edge"] = min_pixels if min_pixels is not None else bounds.get("shortest_edge")
        bounds["longest_edge"] = max_pixels if max_pixels is not None else bounds["longest_edge"]
        if not 0 < bounds["shortest_edge"] <= bounds["longest_edge"]:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got {bounds['shortest_edge']} / {bounds['longest_edge']}"
            )
        return {"size": {"shortest_edge": int(bounds["shortest_edge"]), "longest_edge": int(bounds["longest_edge"])}}

    def _processor(self):
        """AutoProcessor when it can be built here and really is a multimodal processor, else None."""
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(str(self.model_dir), trust_remote_code=False)
        except (ImportError, OSError, ValueError, TypeError, KeyError):
            return None  # Qwen-VL without torchvision, or no processor files: assembled by hand below
        return proc if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer") else None

    def render(self, text: str) -> str:
        """The chat-templated prompt with one image placeholder, ending with the generation prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(self.image_token) != 1:
            raise ValueError(
                f"{self.model_dir}: the chat template put {rendered.count(self.image_token)} image placeholders "
                f"({self.image_token!r}) in the prompt; expected exactly 1"
            )
        return rendered

    def _tokenize(self, text: str) -> dict:
        bos = self.tokenizer.bos_token
        add = not (bos and text.startswith(bos))  # the template may already hold BOS
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=add)

    def encode(self, sample: Sample, *, text: str | None = None) -> core.ProbeInputs:
        """Model inputs for the sample's image and prompt (batch 1, no padding)."""
        rendered = self.render(text if text is not None else prompt_text(sample))
        image = decode_image(sample.image)
        if self.processor is not None:
            bos = self.tokenizer.bos_token
            kw = dict(add_special_tokens=False) if bos and rendered.startswith(bos) else {}
            out = dict(self.processor(text=[rendered], images=[image], return_tensors="pt", **kw))
        else:
            out = self._encode_by_hand(rendered, image)
        return core.make_inputs(out, self.image_token_id, sample=sample.id)

    def _encode_by_hand(self, rendered: str, image) -> dict:
        pixels = dict(self.image_processor(images=[image], return_tensors="pt", **self.pixel_kw))
        if "image_grid_thw" in pixels:
            merge = getattr(self.image_processor, "merge_size", None) or getattr(
                self.config.vision_config, "spatial_merge_size", 2
            )
            count = int(pixels["image_grid_thw"][0].prod()) // merge**2
        elif isinstance(getattr(self.config, "image_seq_length", None), int):
            count = self.config.image_seq_length
        else:
            raise ValueError(
                f"{self.model_dir}: cannot tell how many image tokens one image takes without the model's processor "
                "(no image_grid_thw from the image processor, no image_seq_length in config.json)"
            )
        enc = self._tokenize(rendered.replace(self.image_token, self.image_token * count))
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **pixels}
        if "image_grid_thw" in pixels:  # Qwen-VL computes M-RoPE positions from the modality of every token
            out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        return out

    def _answer_prefixes(self, rendered: str) -> tuple[str, ...]:
        """How an answer starts after this prompt: directly after a newline ("assistant\n"), after a space
        otherwise ("ASSISTANT: A"); the other spelling is the fallback."""
        return ("", " ") if rendered[-1:].isspace() else (" ", "")

    def continuation_ids(self, sample: Sample, answer: str, prefix: str | None = None) -> list[int]:
        """Token ids of `answer` as the model would write it right after the prompt (tokenizer merges included;
        prefix None: the natural separator of this chat template)."""
        rendered = self.render(prompt_text(sample))
        if prefix is None:
            prefix = self._answer_prefixes(rendered)[0]
        head = self._tokenize(rendered)["input_ids"][0].tolist()
        full = self._tokenize(rendered + prefix + answer)["input_ids"][0].tolist()
        if full[: len(head)] != head or len(full) == len(head):
            raise ValueError(
                f"sample {sample.id!r}: answer {answer!r} does not tokenize as a continuation of the prompt "
                "(the tokenizer merges it with the generation prompt)"
            )
        return full[len(head) :]

    def label_ids(self, sample: Sample) -> tuple[int, ...]:
        """First token of each answer label, with the template's natural separator (" A" after "ASSISTANT:")
        unless that makes the labels share their first token (a byte-level tokenizer spells " A" as " ", "A");
        labels sharing first tokens either way make the comparison meaningless: ValueError."""
        rendered = self.render(prompt_text(sample))
        tried = []
        for prefix in self._answer_prefixes(rendered):
            ids = tuple(self.continuation_ids(sample, lab, prefix)[0] for lab in labels(sample))
            if len(set(ids)) == len(ids):
                return ids
            tried.append(ids)
        raise ValueError(f"sample {sample.id!r}: answer labels {labels(sample)} share first tokens {tried}")

    def eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id} | set(_as_list(getattr(self.config, "eos_token_id", None)))
        gen = self.model_dir / "generation_config.json"
        if gen.is_file():
            ids |= set(_as_list(json.loads(gen.read_text()).get("eos_token_id")))
        return sorted(i for i in ids if isinstance(i, int))


def load_image_processor(model_dir: str | Path):
    """The model dir's image processor (the PIL one where transformers' composite processor needs torchvision);
    ValueError naming the dir when there is none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
    except (ImportError, OSError, ValueError) as exc:
        raise ValueError(f"{model_dir}: no usable image processor ({type(exc).__name__}: {exc})") from None


def _template_file(model_dir: Path) -> str | None:
    """A processor-level chat template saved beside the model (hub Qwen-VL dirs keep it in chat_template.json)."""
    jinja, js = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text()
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """The MLLM from a directory (AutoModelForImageTextToText), on `device`, in eval mode."""
    from transformers import AutoModelForImageTextToText

    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), trust_remote_code=False, **kwargs)
    return model.to(device).eval()
