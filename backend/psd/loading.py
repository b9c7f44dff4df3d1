"""Where model files come from, and what to do when they are missing.

A source is a local path, a name under ``$PSD3D_HOME/models``, a hub id (``owner/name``) or a
file in a hub repo (``owner/name:file``). :func:`locate` owns the lookup order and returns every
place it looked; every loader goes through :func:`load_or_explain`, so a missing model always ends
in one :class:`ModelNotFoundError` that names the places and prints a command that fetches it
exactly where the lookup finds it next time (:func:`fetch_command`).

Documented placements (README "Models"), for a hub id ``owner/name``:
``$PSD3D_HOME/models/name/`` (what the printed command writes) or ``$PSD3D_HOME/models/owner/name/``;
for a file ``owner/name:file``: ``$PSD3D_HOME/models/file`` or ``$PSD3D_HOME/models/name/file``.
Then the Hugging Face cache.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, TypeVar

from protocol.errors import ModelNotFoundError

T = TypeVar("T")


class Layout(Enum):
    """What a source holds: which file marks it as present in the hub cache, and which files of
    its repo the loaders read (the ``--include`` patterns of the fetch command; empty = all)."""

    DIFFUSERS_PIPELINE = ("model_index.json", ("model_index.json", "*/*.json", "*/*.txt",
                                               "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"))
    DIFFUSERS_MODEL = ("config.json", ("config.json", "diffusion_pytorch_model.safetensors"))
    TRANSFORMERS_MODEL = ("config.json", ())
    PROCESSOR = ("preprocessor_config.json", ("*.json", "*.txt"))
    FILE = ("", ())

    @property
    def marker(self) -> str:
        return self.value[0]

    @property
    def include(self) -> tuple[str, ...]:
        return self.value[1]


def psd3d_home() -> Path:
    """``$PSD3D_HOME`` (default ``~/.cache/psd3d``)."""
    return Path(os.environ.get("PSD3D_HOME", Path.home() / ".cache" / "psd3d")).expanduser()


def models_dir() -> Path:
    return psd3d_home() / "models"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def split_file_source(source: str) -> tuple[str, str] | None:
    """``owner/name:file`` -> (``owner/name``, ``file``); None for any other source."""
    if ":" not in source or Path(source).expanduser().exists():
        return None
    repo, filename = source.split(":", 1)
    return (repo, filename) if repo.count("/") == 1 and filename else None


def is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).is_absolute()


def local_candidates(source: str) -> list[Path]:
    """The local places a source may be, in lookup order (each checked with ``exists``)."""
    file_source = split_file_source(source)
    if file_source is not None:
        repo, filename = file_source
        return [models_dir() / filename, models_dir() / repo.split("/")[1] / filename]
    places = [Path(source).expanduser(), models_dir() / source]
    if is_hub_id(source):
        places.append(models_dir() / source.split("/")[1])
    return list(dict.fromkeys(places))  # keep order, drop repeats


def hub_cache_path(source: str, layout: Layout) -> str | None:
    """The cached file (a file source) or snapshot folder (a repo) in the Hugging Face cache, if there."""
    file_source = split_file_source(source)
    if file_source is None and not is_hub_id(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, filename = file_source if file_source is not None else (source, layout.marker)
    try:
        found = try_to_load_from_cache(repo, filename)
    except Exception:  # a malformed id is simply not in the cache
        return None
    if not isinstance(found, str):
        return None
    return found if file_source is not None else str(Path(found).parent)


@dataclass(frozen=True)
class Located:
    source: str
    looked: tuple[str, ...]  # every place looked, in order (the last may be the hub cache)
    path: str | None  # where it was found; None: not on this machine
    local: bool  # found outside the hub cache (a folder or file placed by hand)

    @property
    def present(self) -> bool:
        return self.path is not None


def locate(source: str, layout: Layout) -> Located:
    looked = []
    for place in local_candidates(source):
        looked.append(str(place))
        if place.exists():
            return Located(source, tuple(looked), str(place), True)
    if split_file_source(source) is not None or is_hub_id(source):
        looked.append(f"hub cache ({_hub_cache_dir()})")
        cached = hub_cache_path(source, layout)
        if cached is not None:
            return Located(source, tuple(looked), cached, False)
    return Located(source, tuple(looked), None, False)


def fetch_command(source: str, layout: Layout) -> str | None:
    """A shell command that downloads ``source`` to its documented placement (None: not a hub source).
    ``hf`` is huggingface_hub's CLI (installed with psd3d)."""
    file_source = split_file_source(source)
    if file_source is not None:
        repo, filename = file_source
        return f"hf download {repo} {shlex.quote(filename)} --local-dir {shlex.quote(str(models_dir()))}"
    if not is_hub_id(source):
        return None
    include = "".join(f" --include {shlex.quote(p)}" for p in layout.include)
    return f"hf download {source}{include} --local-dir {shlex.quote(str(models_dir() / source.split('/')[1]))}"


def size_on_disk(path: str | None) -> int:
    """Bytes of a file or of every file under a folder (links followed, as the hub cache uses them)."""
    if path is None:
        return 0
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def load_or_explain(what: str, source: str, field: str, load: Callable[[str, bool], T], layout: Layout) -> T:
    """Call ``load(location, local_files_only)`` on the first local placement of ``source``, else on
    the hub source itself (cache, then download unless offline). Any failure to find or read files
    becomes a :class:`ModelNotFoundError` that names the model, the field, the places looked and
    the fetch command."""
    found = locate(source, layout)
    location = found.path if found.local else source
    try:
        return load(location, found.local or hub_offline())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # HF hub and torch.load errors
        if found.local:
            hint = f"{location} exists but could not be loaded ({type(exc).__name__}: {exc})"
        else:
            command = fetch_command(source, layout)
            hint = f"looked in {', '.join(found.looked)}; " + (
                f"fetch it where the backend runs with `{command}`" if command else
                "name an existing folder or file, or a hub id")
            if not hub_offline() and found.path is None:
                hint += f" (downloading it failed: {type(exc).__name__})"
        raise ModelNotFoundError(f"{field}: {what} {source!r} not found: {hint}", field=field) from exc


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def file_path(location: str, local_only: bool) -> str:
    """A single file as :func:`load_or_explain` hands it to a loader: a local path as it is,
    ``owner/name:file`` from the hub cache (or the hub unless ``local_only``). OSError if absent."""
    if Path(location).is_file():
        return location
    file_source = split_file_source(location)
    if file_source is None:
        raise OSError(f"no file at {location} (a hub file is written 'owner/name:file')")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(*file_source, local_files_only=local_only)


# The tokens a CLIP text encoder reads: its position table (``max_position_embeddings`` in SD 2.1's
# text_encoder/config.json, and in every CLIP text tower the priors and rewards use).
CLIP_CONTEXT = 77


def bound_tokens(tokenizer, context: int = CLIP_CONTEXT):
    """``tokenizer`` with ``model_max_length`` no larger than the text encoder reads. transformers sets
    it to ``VERY_LARGE_INTEGER`` (1e30) when a folder's tokenizer_config.json does not name it (some
    mirrors and converted folders): prompts would pass unchecked, padding to "max_length" would fail,
    and the number could not go over the wire."""
    if tokenizer.model_max_length > context:
        tokenizer.model_max_length = context
    return tokenizer
