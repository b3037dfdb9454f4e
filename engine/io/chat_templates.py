"""Chat templates for the output tokenizer: mergekit's named formats, `auto`, a template file or jinja text.

A recipe's `chat_template:` is resolved once, at planning, to the jinja text written as chat_template.jinja. A
short bare word is a template *name* (never template text: a template that renders the word "chatml" for every
conversation would be a silent corruption), `auto` picks the template most of the inputs share, and anything
else must be a file or look like jinja.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# The formats mergekit 0.1.5 ships under these names (each renders a conversation the same way; written here
# compactly, without whitespace that transformers' trim_blocks would have to remove).
NAMED_TEMPLATES = {
    "alpaca": (
        "{% set sys = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (sys | last).content | trim if sys else '' }}{{ '\\n\\n' }}"
        "{% set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n',"
        " 'user_context': '### Input:\\n'} %}"
        "{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + m['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set has_sys = messages and messages[0]['role'] == 'system' %}"
        "{% for m in (messages[1:] if has_sys else messages) %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('conversation roles must "
        "alternate user/assistant/user/... after an optional first system message') }}{% endif %}"
        "{% if m['role'] == 'user' %}"
        "{{ ' [INST] ' + (messages[0]['content'] + '\\n\\n' if loop.first and has_sys else '') + m['content']"
        " + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles (and a first system message) are "
        "supported') }}{% endif %}{% endfor %}"
    ),
}
AUTO = "auto"


def is_template_name(value: str) -> bool:
    """Whether `value` is meant as a template name (a short bare word), as mergekit decides it."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str, where: str) -> None:
    """Recipe-time check: a name must be known, text must look like jinja (a file is checked when planning)."""
    if value == AUTO or value in NAMED_TEMPLATES or Path(value).is_file():
        return
    if is_template_name(value):
        raise ValueError(
            f"{where}: chat_template: {value!r} is not a template name ({AUTO}, {', '.join(NAMED_TEMPLATES)}), "
            "not an existing file and not jinja text; give one of those names, a path to a .jinja file, or the "
            "template text itself"
        )
    if len(value) < 20:
        raise ValueError(f"{where}: chat_template: {value!r} is too short to be a jinja chat template")


def model_template(root: Path) -> str | None:
    """The chat template a model directory ships: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the `default` one)."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = root / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        tpl = json.loads(cfg.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(tpl, list):
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return tpl if isinstance(tpl, str) and tpl else None


def resolve_chat_template(value: str | None, model_roots: Iterable[Path], where: str) -> str | None:
    """The template text to write, or None to keep the tokenizer source's own. `auto`: the template shared by
    most inputs (stripped; ties go to the first input's), None when no input has one."""
    if not value:
        return None
    if value == AUTO:
        found = [t.strip() for t in (model_template(Path(r)) for r in model_roots) if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if is_template_name(value) and Path(value).is_file():
        return Path(value).read_text()
    check_chat_template(value, where)
    return value
