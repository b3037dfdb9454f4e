"""Files of a model directory: resolving a file name inside it, so nothing a reader opens or the writer copies can
point outside the model (symlinks followed; the Hugging Face cache's blobs are allowed for its snapshots).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def confine(root: Path, rel: str, what: str) -> Path:
    """Resolve `rel` inside `root` (symlinks followed); anything escaping the model dir is refused."""
    if os.path.isabs(rel):
        raise ValueError(f"{what}: file name {rel!r} is an absolute path; only files inside {root} are allowed")
    path = (root / rel).resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":  # HF cache: snapshot files are symlinks into the repo's blobs/
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(path.is_relative_to(a) for a in allowed):
        raise ValueError(f"{what}: file {rel!r} resolves to {path}, outside the model directory {root}")
    return path


def check_confined(root: Path, names: Iterable[str]) -> None:
    """Each existing file of `names` in `root` resolves inside it (or the HF cache's blobs): copying a symlink that
    points elsewhere into the output would leak an arbitrary file."""
    for name in names:
        if os.path.lexists(root / name) and not (root / name).exists():
            raise ValueError(
                f"{root / name}: a broken symlink or a symlink loop; fix or remove it (this file would "
                "be copied into the output)"
            )
        if (root / name).exists():
            confine(root, name, str(root))
