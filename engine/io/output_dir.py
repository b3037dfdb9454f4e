"""What an output directory may be, and what `--overwrite` may delete in it.

Two rules keep a merge from destroying its own inputs:

- `--out` may not be, contain or lie inside any directory an input is read from (the model dirs, the dirs their
  shard files resolve to, the tokenizer source), nor contain a file the recipe reads (the recipe itself, a
  calibration set, a chat template or probe file). Paths are compared after resolving symlinks.
- `--overwrite` deletes only what an earlier shardmerge run owns: the files its manifest lists, or, for an
  unfinished run, its state dir, the shards its journal lists and the files the journal says the metadata step
  writes. Anything else in the directory makes `--overwrite` an error before anything is deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from shardmerge.engine.io.shard_files import STATE_DIR, Journal
from shardmerge.engine.io.stores import ShardStore, is_url, open_store
from shardmerge.engine.io.writer import COPIED_FILES, INDEX, MANIFEST

log = logging.getLogger("shardmerge.output")
# The run summary `shardmerge merge` writes beside the shards after the manifest: part of the merge's output (so
# --overwrite removes it), not of what verify checks (its times differ from run to run).
SUMMARY = "shardmerge_summary.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# what engines that did not list their files in the manifest wrote beside the shards
_LEGACY_NAMES = frozenset({INDEX, "README.md", "config.json", "chat_template.jinja", *COPIED_FILES})


def _input_dirs(plan) -> dict[Path, str]:
    """Every local directory the plan reads from (resolved) -> the model dir it belongs to (for messages)."""
    dirs: dict[Path, str] = {}
    for root in (*plan.inputs, plan.config_source, plan.tokenizer_source):
        if not is_url(root):
            dirs.setdefault(Path(root).resolve(), str(root))
    for t in plan.tensors():
        for m in (*t.inputs, *([t.base] if t.base is not None else [])):
            if not is_url(m.file):
                dirs.setdefault(Path(m.file).resolve().parent, str(Path(m.file).parent))
    return dirs


def _input_urls(plan) -> set[str]:
    """Every object-store prefix the plan reads from (its inputs' URLs and their files' parents)."""
    urls = {str(r).rstrip("/") for r in plan.inputs if is_url(r)}
    for t in plan.tensors():
        for m in (*t.inputs, *([t.base] if t.base is not None else [])):
            if is_url(m.file):
                urls.add(m.file.rsplit("/", 1)[0])
    return urls


def _check_url_out(plan, url: str) -> None:
    for d in sorted(_input_urls(plan)):
        rel = (
            "is"
            if url == d
            else "lies inside"
            if url.startswith(d + "/")
            else "contains"
            if d.startswith(url + "/")
            else ""
        )
        if rel:
            raise ValueError(
                f"--out {url} {rel} the input location {d}; writing the merge there could destroy an input. "
                "Choose a --out outside every input model prefix"
            )


def _recipe_files(plan, extra: Iterable) -> list[tuple[str, Path]]:
    """(what, resolved path) of each file the recipe names that exists: calibration, chat template, probe file."""
    r = plan.recipe
    cands = [("recipe", p) for p in extra]
    if r.calibration is not None:
        cands.append(("calibration", r.calibration.path))
    if r.chat_template and len(r.chat_template) < 4096 and "\n" not in r.chat_template:
        cands.append(("chat_template", r.chat_template))
    if isinstance(r.parameters.get("plateau"), str):
        cands.append(("parameters.plateau", r.parameters["plateau"]))
    return [(what, Path(p).resolve()) for what, p in cands if p and os.path.isfile(p)]


def check_not_an_input(plan, out, files: Iterable = ()) -> None:
    """Refuse an output dir that is, contains or lies inside an input's directory, or that holds a file the recipe
    reads (`files`: the recipe file itself); ValueError naming the input. `out` a path or shard store; an
    object-store output is compared with the inputs' object-store prefixes."""
    if isinstance(out, ShardStore):
        if not out.local:
            return _check_url_out(plan, out.url)
        out = out.root
    out = Path(out).resolve()
    for d, shown in _input_dirs(plan).items():
        if out == d:
            rel = "is"
        elif out.is_relative_to(d):
            rel = "lies inside"
        elif d.is_relative_to(out):
            rel = "contains"
        else:
            continue
        where = shown if Path(shown).resolve() == d else f"{shown} (resolved: {d})"
        raise ValueError(
            f"--out {out} {rel} the input directory {where}; writing the merge there could destroy "
            "an input. Choose a --out outside every input model directory"
        )
    for what, f in _recipe_files(plan, files):
        if f.is_relative_to(out):
            raise ValueError(
                f"--out {out} contains the {what} file {f}, which this merge reads; --overwrite or a "
                "cleanup could delete it. Choose another --out or move the file"
            )


def _plain(names: Iterable) -> set[str]:
    """Plain file names only: a damaged or hostile list may not name anything outside the directory."""
    return {n for n in names if isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")}


def owned_files(out) -> set[str]:
    """Names in `out` (a path or shard store) that an earlier shardmerge run wrote (its manifest's and journal's
    lists)."""
    store = open_store(out)
    if store.local:
        return _owned_local(Path(store.root))
    owned: set[str] = set()
    raw = store.read_bytes(MANIFEST)
    doc = _parse_json(raw) if raw is not None else None
    if isinstance(doc, dict):
        owned |= {MANIFEST, SUMMARY}
        shards = doc.get("shards") if isinstance(doc.get("shards"), list) else []
        owned |= _plain(e.get("file") for e in shards if isinstance(e, dict))
        owned |= _plain(doc.get("files") if isinstance(doc.get("files"), list) else [])
    if store.state_exists():
        owned.add(STATE_DIR)
        recs = store.journal_records()
        for r in recs:
            owned |= _plain([r.get("shard")]) | _plain(r.get("metadata") or [])
        if recs:
            owned |= {n for n in store.listdir() if SHARD_NAME.fullmatch(n)}
    return owned


def _parse_json(raw: bytes) -> object | None:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _owned_local(out: Path) -> set[str]:
    owned: set[str] = set()
    manifest = out / MANIFEST
    if manifest.is_file() and not manifest.is_symlink():
        doc = _read_json(manifest)
        if isinstance(doc, dict):
            owned |= {MANIFEST, SUMMARY}
            shards = doc.get("shards") if isinstance(doc.get("shards"), list) else []
            owned |= _plain(e.get("file") for e in shards if isinstance(e, dict))
            files = doc.get("files")
            owned |= (
                _plain(files)
                if isinstance(files, list)
                else {n for n in _LEGACY_NAMES if (out / n).exists()} | {p.name for p in out.glob("*_report.json")}
            )
    journal = Journal(out)
    if journal.path.is_file():
        owned.add(STATE_DIR)
        recs = journal.records()
        for r in recs:
            owned |= _plain([r.get("shard")]) | _plain(r.get("metadata") or [])
        if recs:  # a shard published but not yet journaled when the run was killed
            owned |= {p.name for p in out.iterdir() if SHARD_NAME.fullmatch(p.name)}
    elif (out / STATE_DIR).is_dir() and not (out / STATE_DIR).is_symlink():
        owned.add(STATE_DIR)  # killed before the journal's first line
    return owned


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def remove_previous(out) -> list[str]:
    """`--overwrite`: delete what an earlier run owns and return the names removed (logged). Anything else in the
    directory (or object-store prefix) is a ValueError naming it, raised before anything is deleted."""
    store = open_store(out)
    owned = owned_files(store)
    present = store.listdir()
    foreign = [n for n in present if n not in owned]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"output directory {store.url} holds files that no earlier shardmerge merge wrote ({shown}); "
            "--overwrite only removes the files a previous merge's manifest or journal lists. Choose "
            "an empty --out or remove them yourself"
        )
    removed = [n for n in present if n in owned]
    for name in removed:
        store.remove(name)
    if removed:
        log.info(
            "--overwrite: removed %d file(s) of the previous merge in %s: %s",
            len(removed),
            store.url,
            ", ".join(removed[:10]) + (" ..." if len(removed) > 10 else ""),
        )
    return removed
