"""The output's metadata beside its shards: index, config (output dtype), tokenizer and processor files, model card,
method reports and the manifest that marks a finished merge. Written through the output's shard store
(engine/io/stores/), so the same code serves a directory and an object store. Shard files themselves are written
by the store (engine/io/shard_files.py on a filesystem). A directory without a complete manifest is not a finished
merge.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import shardmerge
from shardmerge.engine.io.dtypes import DTYPES
from shardmerge.engine.io.shard_files import STATE_DIR

MANIFEST = "shardmerge_manifest.json"
INDEX = "model.safetensors.index.json"
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "spiece.model",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
)
REPORTS_DIR = "reports"  # per-unit method reports in the state dir, gathered into <report>_report.json
log = logging.getLogger("shardmerge.report")


def _config_with_dtype(src: Path, out_dtype: str | None, updates: tuple = ()) -> bytes:
    """config.json with the output dtype recorded (transformers 5 reads `dtype`; older keys are replaced) and the
    plan's `config_updates` applied (dotted keys, e.g. `text_config.vocab_size`)."""
    cfg = json.loads(src.read_text())
    for key, value in updates:
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if out_dtype:
        name = str(DTYPES[out_dtype][0]).removeprefix("torch.")
        subs = [v for v in cfg.values() if isinstance(v, dict) and ("dtype" in v or "torch_dtype" in v)]
        for c in [cfg] + subs:
            c.pop("torch_dtype", None)
            c["dtype"] = name
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def model_card(plan) -> str:
    """README.md of the output: inputs, the method's section from its spec (shardmerge.engine.methods.catalog), the recipe
    and the plan hash."""
    from shardmerge.engine.methods.catalog import card_section

    recipe_yaml = json.dumps(plan.recipe.model_dump(mode="json", exclude_defaults=True), indent=2)
    return (
        "---\ntags:\n- merge\n- shardmerge\n---\n"
        f"# Merged model\n\nProduced by shardmerge {shardmerge.__version__} with `{plan.recipe.merge_method}`.\n\n"
        f"Inputs:\n"
        + "".join(f"- `{r}`\n" for r in plan.recipe.model_refs)
        + f"\n{card_section(plan.recipe.merge_method)}"
        + f"\n## Recipe\n\n```json\n{recipe_yaml}\n```\n\nPlan hash: `{plan.plan_hash}`\n"
        + ("\n## Notes\n\n" + "".join(f"- {n}\n" for n in plan.notes) if plan.notes else "")
    )


def _unit_report_name(unit_id: int) -> str:
    return f"{STATE_DIR}/{REPORTS_DIR}/unit-{unit_id:06d}.json"


def _store(out):
    from shardmerge.engine.io.stores import open_store

    return open_store(out)


def write_unit_report(out, unit_id: int, entries: list[dict]) -> None:
    """A work unit's per-tensor method reports (JSON-able dicts with a "report" and a "tensor" key), written
    atomically by the worker; a re-run unit overwrites its file with the same content. `out`: a directory, URL
    or shard store (shardmerge.engine.io.stores)."""
    _store(out).write_atomic(_unit_report_name(unit_id), json.dumps(entries, sort_keys=True, allow_nan=False).encode())


def _report_line(entry: dict) -> str:
    return f"{entry['report']}: {entry['tensor']}: {entry.get('summary') or entry.get('kind', '')}"


def _old_report(store, name: str, plan_hash: str) -> list[dict]:
    """The entries of a report file left by an earlier run of the same plan (none for another plan or damage)."""
    try:
        raw = store.read_bytes(name)
        doc = json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("plan_hash") != plan_hash:
        return []
    return [e for e in doc.get("tensors", []) if isinstance(e, dict)]


def write_reports(plan, out) -> list[str]:
    """Gather the units' reports into `<report>_report.json` per report name (entries in output order), log a
    line per entry, and return the files written. A report file already in `out` keeps the entries of tensors
    not re-run (resume of a finished merge only re-runs the units whose shards no longer match)."""
    store = _store(out)
    gathered: dict[str, dict[str, dict]] = {}
    for unit in plan.units:
        raw = store.read_bytes(_unit_report_name(unit.id))
        if raw is not None:
            for e in json.loads(raw):
                gathered.setdefault(e["report"], {})[e["tensor"]] = e
    order = {t.name: i for i, t in enumerate(plan.tensors())}
    written = []
    if gathered:  # journaled before they exist, so --overwrite of a run cut short here knows them
        store.journal_append({"metadata": [f"{name}_report.json" for name in sorted(gathered)]})
    for name, entries in sorted(gathered.items()):
        dst = f"{name}_report.json"
        old = _old_report(store, dst, plan.plan_hash)
        entries = {**{e["tensor"]: e for e in old if e.get("tensor") in order}, **entries}
        rows = sorted(entries.values(), key=lambda e: order.get(e["tensor"], len(order)))
        for e in rows:
            log.info("%s", _report_line(e))
        doc = {
            "format": "shardmerge-report/1",
            "report": name,
            "merge_method": plan.recipe.merge_method,
            "plan_hash": plan.plan_hash,
            "models": list(plan.recipe.model_refs),
            "tensors": rows,
        }
        store.write_atomic(dst, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())
        written.append(dst)
    return written


def metadata_files(plan) -> list[str]:
    """Every file besides the shards and the manifest that write_metadata may write (the manifest lists them, so
    --overwrite removes exactly these): index, config, tokenizer/processor files, template, card, artifacts.
    Method reports are added as write_reports learns their names."""
    names = {INDEX, "config.json", "README.md", *COPIED_FILES, *(n for n, _ in getattr(plan, "artifacts", ()))}
    if plan.recipe.chat_template:
        names.add("chat_template.jinja")
    return sorted(names)


def write_metadata(plan, out, shard_hashes: dict[str, tuple[str, int]]) -> None:
    """Index, config, tokenizer/processor files, model card, method reports, then the manifest (last: it marks
    completion); `out` a directory, URL or shard store (shardmerge.engine.io.stores)."""
    store = _store(out)
    files = metadata_files(plan)
    store.journal_append({"metadata": files})  # so --overwrite knows them even if this step is cut short
    weight_map = {t.name: plan.shards[t.shard].filename for t in plan.tensors()}
    index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    store.write_atomic(INDEX, (json.dumps(index, indent=2) + "\n").encode())
    cfg = Path(plan.config_source) / "config.json"
    if cfg.exists():
        store.write_atomic("config.json", _config_with_dtype(cfg, plan.out_dtype, plan.config_updates))
    tok = Path(plan.tokenizer_source)
    built = {name for name, _ in getattr(plan, "artifacts", ())}
    # a tokenizer built by the plan (union, added tokens) replaces every tokenizer file of the source: a stale
    # tokenizer.model or vocab.json beside the new tokenizer.json would describe another vocabulary
    skip = set(TOKENIZER_FILES) if built & {"tokenizer.json", "tokenizer_config.json"} else set()
    for name in COPIED_FILES:
        if name not in skip and name not in built and (tok / name).exists():
            if store.local:
                shutil.copyfile(tok / name, Path(store.root) / name)
            else:
                store.write_atomic(name, (tok / name).read_bytes())
    store.write_atomic("README.md", model_card(plan).encode())
    files = sorted({*files, *write_reports(plan, store)})
    for name, text in getattr(plan, "artifacts", ()):
        store.write_atomic(name, text.encode())
    manifest = {
        "format": "shardmerge-manifest/1",
        "engine_version": shardmerge.__version__,
        "plan_hash": plan.plan_hash,
        "merge_method": plan.recipe.merge_method,
        "total_size": plan.total_bytes,
        "files": files,
        "shards": [
            {
                "file": s.filename,
                "sha256": shard_hashes[s.filename][0],
                "size": shard_hashes[s.filename][1],
                "tensors": len(s.tensors),
            }
            for s in plan.shards
        ],
    }
    store.write_atomic(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    store.remove(STATE_DIR)
