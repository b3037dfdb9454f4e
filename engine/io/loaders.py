"""Bounded, strict reading of the text files users hand the engine: YAML recipes and JSON configs/indexes.

Every failure is one ValueError naming the file (and, where there is one, the field): a file that is not UTF-8,
too large, nested too deeply, a YAML alias bomb or recursive alias, a YAML tag that would build an object, a
number no float can hold, or a JSON field of the wrong type. Nothing here ever runs code or expands without
bound: YAML aliases are counted as the nodes they expand to before anything is constructed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

MAX_RECIPE_BYTES = 16 << 20  # a recipe with an inline chat template is a few KB; this is generous
MAX_JSON_BYTES = 256 << 20  # an index of a 1T-parameter model's weight_map is ~20 MB
MAX_NODES = 200_000  # YAML nodes after alias expansion
MAX_DEPTH = 64  # nesting of YAML collections (a recipe needs ~6)
MAX_INT = 2**1023  # beyond this an integer has no float value near it (float(2**1024) overflows)


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot or exponent sign (`1e38`, `1.0e38`, `2E-5`),
    which YAML 1.1 would leave as strings; resolvers are copied so the stock SafeLoader is unchanged."""


_RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_text(path: Path, what: str, limit: int) -> str:
    """A file's text: UTF-8 (a BOM is allowed), at most `limit` bytes; ValueError naming the file otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise ValueError(f"{path}: {what} is {size} bytes, more than the {limit} a {what} may have")
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None


def _mark(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _yaml_message(path: Path, exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    tag = re.search(r"tag '([^']*)'", problem or "")
    if isinstance(exc, yaml.constructor.ConstructorError) and tag:
        short = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return (
            f"{path}: YAML tag {short}{_mark(exc)} is not allowed; a recipe is plain data (mappings, lists, "
            "strings, numbers, true/false), remove the tag"
        )
    return f"{path}: not valid YAML: {problem}{_mark(exc)}"


def _check_size(node: yaml.Node, path: Path) -> None:
    """Count the nodes `node` expands to (aliases included) and its depth, without expanding anything; a cycle
    (a recursive alias) is refused too. Memoised per node, so a billion-laughs file costs its own size."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(n: yaml.Node, depth: int) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise ValueError(f"{path}: recursive YAML alias{_mark_of(n)}; a recipe cannot contain itself")
        if depth > MAX_DEPTH:
            raise ValueError(f"{path}: YAML nested more than {MAX_DEPTH} levels deep{_mark_of(n)}")
        total = 1
        if isinstance(n, (yaml.SequenceNode, yaml.MappingNode)):
            on_path.add(key)
            kids = n.value if isinstance(n, yaml.SequenceNode) else [x for kv in n.value for x in kv]
            for kid in kids:
                total += visit(kid, depth + 1)
                if total > MAX_NODES:
                    raise ValueError(
                        f"{path}: YAML expands to more than {MAX_NODES} values (aliases counted as "
                        "what they repeat); a recipe is far smaller, is this an alias bomb?"
                    )
            on_path.discard(key)
        sizes[key] = total
        return total

    visit(node, 0)


def _check_flow_depth(text: str, path: Path) -> None:
    """PyYAML's scanner takes time quadratic in the nesting of flow brackets (`[[[[...`: 20 s at 2000 levels), so
    unclosed brackets are counted on the raw text first. The count ignores quoting, so it is an upper bound on the
    real nesting; the bound is loose (4 x MAX_DEPTH) so brackets inside strings never reach it in practice."""
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > 4 * MAX_DEPTH:
                raise ValueError(
                    f"{path}: YAML nested more than {MAX_DEPTH} levels deep (more than "
                    f"{4 * MAX_DEPTH} unclosed brackets)"
                )
        elif ch in "]}" and depth:
            depth -= 1


def _mark_of(n: yaml.Node) -> str:
    return f" (line {n.start_mark.line + 1})" if n.start_mark is not None else ""


def load_yaml_file(path: Path | str, what: str = "recipe") -> Any:
    """The data of one YAML document, bounded (bytes, nodes after aliases, depth) and checked for numbers."""
    path = Path(path)
    text = read_text(path, what, MAX_RECIPE_BYTES)
    _check_flow_depth(text, path)
    loader = None
    try:
        loader = _RecipeLoader(text)  # the reader checks the characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, path)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(_yaml_message(path, exc)) from None
    except RecursionError:  # the composer recurses per level: refuse before Python's stack gives out
        raise ValueError(f"{path}: YAML nested more than {MAX_DEPTH} levels deep") from None
    except Exception as exc:
        # (PyYAML's constructors raise ValueError / AttributeError for such scalars)
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not valid YAML ({type(exc).__name__}: {str(exc)[:200]})") from None
    finally:
        if loader is not None:
            loader.dispose()
    check_numbers(data, str(path))
    return data


def check_numbers(data: Any, source: str, where: str = "") -> None:
    """Every integer has a float value (the engine computes in float32/64); ValueError naming the field."""
    if isinstance(data, dict):
        for k, v in data.items():
            check_numbers(v, source, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            check_numbers(v, source, f"{where}[{i}]")
    elif isinstance(data, int) and not isinstance(data, bool) and abs(data) > MAX_INT:
        raise ValueError(
            f"{source}: {where or '<top level>'}: the integer {str(data)[:20]}... ({len(str(data))} "
            f"digits) is out of range: no float holds it (largest about 1.8e308)"
        )


# ------------------------------------------------------------------------------------------------ JSON
def load_json_file(path: Path | str, what: str) -> Any:
    """Parsed JSON of a config/index file; ValueError naming the file for bad bytes, bad JSON or depth."""
    path = Path(path)
    if os.path.lexists(path) and not path.exists():
        raise ValueError(f"{path}: {what} is a broken symlink or a symlink loop; fix or remove it")
    text = read_text(path, what, MAX_JSON_BYTES)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} is not valid JSON (nested too deeply)") from None


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true/false"}
# config.json fields the engine reads, at the top level and inside text_config / vision_config
_CONFIG_FIELDS: dict[str, tuple] = {
    "model_type": (str,),
    "architectures": (list,),
    "num_hidden_layers": (int,),
    "text_config": (dict,),
    "vision_config": (dict,),
    "mm_projector_type": (str,),
    "image_token_id": (int,),
    "image_token_index": (int,),
    "tie_word_embeddings": (bool,),
    "vocab_size": (int,),
    "hidden_size": (int,),
}


def _type_error(path: Path, field: str, value: Any, want: tuple) -> ValueError:
    expected = " or ".join(_JSON_TYPES[t] for t in want)
    shown = json.dumps(value)[:60] if not isinstance(value, (set, bytes)) else repr(value)[:60]
    return ValueError(f"{path}: field {field!r} must be {expected}, got {type(value).__name__} {shown}")


def _check_fields(cfg: dict, path: Path, prefix: str = "") -> None:
    for key, want in _CONFIG_FIELDS.items():
        if key not in cfg or cfg[key] is None:
            continue
        v = cfg[key]
        ok = isinstance(v, want) and not (isinstance(v, bool) and bool not in want)
        if not ok:
            raise _type_error(path, prefix + key, v, want)
        if key == "architectures" and not all(isinstance(a, str) for a in v):
            raise ValueError(f"{path}: field {prefix + key!r} must be a list of strings, got {json.dumps(v)[:60]}")
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict) and not prefix:
            _check_fields(cfg[sub], path, f"{sub}.")


def load_config(path: Path | str) -> dict:
    """A model's config.json: an object whose fields the engine reads have the types transformers writes."""
    path = Path(path)
    cfg = load_json_file(path, "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path}: config.json must be a JSON object, got {_JSON_TYPES.get(type(cfg), type(cfg).__name__)}"
        )
    _check_fields(cfg, path)
    return cfg


def load_index(path: Path | str) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json: a non-empty object of tensor name -> shard file name."""
    path = Path(path)
    doc = load_json_file(path, "safetensors index")
    if not isinstance(doc, dict):
        raise ValueError(
            f"{path}: not a valid safetensors index: must be a JSON object with a 'weight_map', got "
            f"{_JSON_TYPES.get(type(doc), type(doc).__name__)}"
        )
    if "weight_map" not in doc:
        raise ValueError(f"{path}: not a valid safetensors index (needs a 'weight_map' object)")
    wm = doc["weight_map"]
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f"{path}: 'weight_map' is empty or not an object")
    for name, fname in wm.items():
        if not isinstance(fname, str):
            raise ValueError(
                f"{path}: weight_map value {fname!r} is not a file name (field 'weight_map.{name}' must be a string)"
            )
    if "metadata" in doc and doc["metadata"] is not None and not isinstance(doc["metadata"], dict):
        raise _type_error(path, "metadata", doc["metadata"], (dict,))
    return wm


def config_or_none(path: Path) -> dict | None:
    """load_config, or None when there is no file at all (a broken symlink is an error, not an absence)."""
    return load_config(path) if os.path.lexists(path) else None
