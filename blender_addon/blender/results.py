"""A finished job's files — the final GLB, turntable preview, reward curve, metrics and learned
negative embedding — fetched from the backend without blocking, written (atomically) into a folder
next to the .blend, and shown as pictures in the Jobs panel."""

from __future__ import annotations

from pathlib import Path

import bpy
import bpy.utils.previews

from ..core import library
from . import assets, connection, notices
from .jobs import find_job

FETCH_TIMEOUT = 120.0  # a result carries the GLB (a few MB) and the PNGs
PICTURES = ("preview.png", "reward_curve.png")
_previews = None  # a bpy.utils.previews collection, made on first draw, removed on unregister


def results_root() -> Path:
    """The preferences' results folder; a path relative to an unsaved .blend lands in the data folder."""
    p = connection.prefs()
    if p.results_dir.startswith("//") and not bpy.data.filepath:
        return Path(p.data_dir).expanduser() / "results"
    return Path(bpy.path.abspath(p.results_dir)).expanduser()


def job_folder(item) -> Path:
    return results_root() / f"{library.slug(item.prompt)}-{item.job_id[:8]}"


def fetch(job: str) -> None:
    """Ask for the job's files; ``arrived`` writes them in a later poll."""
    def failed(exc: Exception) -> None:
        notices.post(f"results of {job[:8]} not fetched ({exc}); press Fetch Results")

    connection.session().request("result", {"job": job}, on_reply=lambda msg: arrived(job, msg.arrays),
                                 on_error=failed, timeout=FETCH_TIMEOUT)


def arrived(job: str, files: dict) -> None:
    _, item = find_job(job)
    if item is None:  # removed from the list meanwhile
        return
    folder = job_folder(item)
    for name, data in files.items():
        if library.plain_file_name(name):  # names come from the server: never a path
            library.atomic_write_bytes(folder / name, data.tobytes())
    item.results_dir = str(folder)
    if item.batch and assets.PREVIEW_FILE in files:
        assets.preview_arrived(job, files[assets.PREVIEW_FILE].tobytes())
    notices.redraw()


def preview(item, name: str):
    """One of the job's result pictures as an ImagePreview (None when the file is not there)."""
    global _previews
    path = Path(item.results_dir) / name if item.results_dir else None
    if path is None or not path.is_file():
        return None
    if _previews is None:
        _previews = bpy.utils.previews.new()
    key = str(path)
    return _previews.get(key) or _previews.load(key, key, "IMAGE")


def icon(item, name: str) -> int:
    """Its icon id for ``template_icon`` (0 when absent, and in a headless Blender, which draws none)."""
    found = preview(item, name)
    return found.icon_id if found is not None else 0


def clear() -> None:
    global _previews
    if _previews is not None:
        bpy.utils.previews.remove(_previews)
        _previews = None
