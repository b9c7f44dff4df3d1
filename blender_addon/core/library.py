"""Batch prompts and the asset library's files, without bpy: prompt lists, the catalog definition
file Blender keeps next to library .blend files, asset tags, and atomic file writes."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

from protocol.specs import MAX_BATCH  # the server's limit on a batch, owned by the protocol

CATALOG_FILE = "blender_assets.cats.txt"
CATALOG_HEADER = """# This is an Asset Catalog Definition file for Blender.
#
# Empty lines and lines starting with `#` will be ignored.
# The first non-ignored line should be the version indicator.
# Other lines are of the format "UUID:catalog/path/for/assets:simple catalog name"

VERSION 1

"""


class LibraryError(Exception):
    """A prompt list or library folder the add-on cannot use; the message names what and why."""


def parse_prompts(text: str, source: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with '#' are skipped."""
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise LibraryError(f"{source}: has no prompts (one a line; '#' starts a comment)")
    if len(prompts) > MAX_BATCH:
        raise LibraryError(f"{source}: has {len(prompts)} prompts, at most {MAX_BATCH} in one batch")
    return prompts


def clean_catalog_path(path: str) -> str:
    parts = [p.strip() for p in re.split(r"[/\\]+", path) if p.strip()]
    if not parts or any(":" in p for p in parts):
        raise LibraryError(f"catalog: {path!r} must be a path like 'PSD3D/Props' without ':'")
    return "/".join(parts)


def read_catalogs(folder: Path) -> dict[str, str]:
    """catalog path -> UUID, from the folder's catalog definition file (empty if it has none)."""
    found: dict[str, str] = {}
    file = Path(folder) / CATALOG_FILE
    if not file.is_file():
        return found
    for line in file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("VERSION"):
            continue
        parts = line.split(":", 2)
        if len(parts) >= 2:
            found[parts[1]] = parts[0]
    return found


def ensure_catalog(folder: Path, path: str) -> str:
    """The UUID of catalog ``path`` in the library folder, added to its definition file if missing
    (with its parent catalogs, as Blender expects)."""
    folder = Path(folder)
    path = clean_catalog_path(path)
    known = read_catalogs(folder)
    if path in known:
        return known[path]
    file = folder / CATALOG_FILE
    text = file.read_text(encoding="utf-8") if file.is_file() else CATALOG_HEADER
    if not text.endswith("\n"):
        text += "\n"
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        if sub not in known:
            known[sub] = str(uuid.uuid4())
            text += f"{known[sub]}:{sub}:{sub.replace('/', '-')}\n"
    atomic_write_text(file, text)
    return known[path]


def asset_tags(method: str, seed: int, reward_name: str, reward: float | None) -> list[str]:
    """Tags that make a library searchable by how an asset was made."""
    tags = ["psd3d", f"method:{method}", f"seed:{seed}"]
    if reward is not None:
        tags.append(f"{reward_name}:{reward:.4f}")
    return tags


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return (s[:limit].rstrip("_") or "prop")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_file_name(name: str) -> bool:
    """A name a server may give a result file: no folders, no dot-dot, nothing hidden."""
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name)) and ".." not in name