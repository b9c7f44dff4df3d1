"""Where model files come from: a local folder, ``$PSD3D_HOME/models/<name>``, or a hub id.

Every loader in psd3d goes through :func:`resolve_source` and :func:`load_or_explain`, so
a missing model always ends in one :class:`ModelNotFoundError` that says what to download
and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from protocol.errors import ModelNotFoundError

T = TypeVar("T")


def psd3d_home() -> Path:
    """``$PSD3D_HOME`` (default ``~/.cache/psd3d``)."""
    return Path(os.environ.get("PSD3D_HOME", Path.home() / ".cache" / "psd3d")).expanduser()


def models_dir() -> Path:
    return psd3d_home() / "models"


def resolve_source(source: str) -> tuple[str, bool]:
    """Return ``(location, is_local)`` for a model source.

    ``source`` is an absolute or relative folder, a name under ``$PSD3D_HOME/models``, or
    a hub id (``owner/name``). Local folders win over hub ids of the same spelling.
    """
    as_path = Path(source).expanduser()
    if as_path.exists():
        return str(as_path), True
    under_home = models_dir() / source
    if under_home.exists():
        return str(under_home), True
    return source, False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def load_or_explain(what: str, source: str, field: str, load: Callable[[str, bool], T]) -> T:
    """Call ``load(location, local_files_only)``; turn any failure to find files into a
    :class:`ModelNotFoundError` that names the model, the field and the fix."""
    location, is_local = resolve_source(source)
    try:
        return load(location, is_local or hub_offline())
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # HF hub and torch.load errors
        if is_local:
            hint = f"the folder {location} exists but could not be loaded ({type(exc).__name__}: {exc})"
        else:
            hint = (
                f"{source!r} is neither a local folder nor in the hub cache, and the hub could not be "
                f"reached ({type(exc).__name__}). Download it where the backend runs, e.g. "
                f"`huggingface-cli download {source} --local-dir {models_dir() / source.split('/')[-1]}`, "
                f"then pass that folder or keep the hub id (the hub cache is searched too)"
            )
        raise ModelNotFoundError(f"{field}: {what} not found: {hint}", field=field) from exc
