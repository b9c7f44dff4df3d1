"""Batch results as assets: each finished batch job's object is marked as an asset with the
backend's preview, a catalog and its prompt, seed, method and reward, and the batch's assets are
written into one library .blend in the artist's library folder (rewritten atomically as more finish)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import bpy
import numpy as np

from ..core import library
from . import scene
from .jobs import find_job

BATCH_KEY = "psd3d_batch"  # on a batch's collection
SPACING = 1.5  # metres between props of a batch (in units of their size)
PREVIEW_FILE = "preview.png"


def object_name(item) -> str:
    return f"PSD {library.slug(item.prompt, 24)}"


GRID_COLUMNS = 5


def grid_spot(origin, index: int, size: float) -> tuple[float, float, float]:
    """Where a batch's ``index``-th prop of ``size`` metres stands: a grid from ``origin`` (the 3D cursor
    when the batch was submitted); its scene cameras are sent relative to this spot."""
    x, y, z = origin
    return (x + (index % GRID_COLUMNS) * SPACING * size, y - (index // GRID_COLUMNS) * SPACING * size, z)


def placement(sc: bpy.types.Scene, item) -> tuple[float, float, float]:
    """Batch props on a grid from where the batch was submitted; single props where they were asked for."""
    return grid_spot(item.location, item.index, item.size) if item.batch else tuple(item.location)


def batch_collection(sc: bpy.types.Scene, batch: str) -> bpy.types.Collection:
    for coll in bpy.data.collections:
        if coll.get(BATCH_KEY) == batch:
            return coll
    coll = bpy.data.collections.new(f"PSD Batch {batch[:8]}")
    coll[BATCH_KEY] = batch
    sc.collection.children.link(coll)
    return coll


def library_blend(item) -> Path:
    return Path(item.library)


def finish_batch_job(sc: bpy.types.Scene, item, final: dict) -> None:
    """Mark the job's object as an asset and save the batch's library .blend; the preview follows
    when the job's results arrive (``results.fetch``, without blocking)."""
    obj = scene.job_object(item.job_id)
    if obj is None:
        return
    folder = library_blend(item).parent
    catalog = library.ensure_catalog(folder, sc.psd3d.catalog)
    obj.asset_mark()
    data = obj.asset_data
    data.catalog_id = catalog
    data.description = item.prompt
    data.author = "psd3d"
    reward_name = final.get("target_reward_name", "reward")
    for tag in library.asset_tags(item.method, item.seed, reward_name, final.get("target_reward")):
        if tag not in data.tags:
            data.tags.new(tag)
    save_library(item.batch, library_blend(item))


def preview_arrived(job: str, png: bytes) -> None:
    obj = scene.job_object(job)
    if obj is None:
        return
    set_preview(obj, png)
    _, item = find_job(job)
    if item is not None:
        save_library(item.batch, library_blend(item))


def set_preview(obj: bpy.types.Object, png: bytes) -> None:
    """The asset preview from the backend's turntable strip (its first, square frame)."""
    fd, tmp = tempfile.mkstemp(suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(png)
        image = bpy.data.images.load(tmp, check_existing=False)
        try:
            w, h = image.size
            pixels = np.empty(w * h * 4, np.float32)
            image.pixels.foreach_get(pixels)
        finally:
            bpy.data.images.remove(image)
    finally:
        os.unlink(tmp)
    side = min(w, h)
    frame = np.ascontiguousarray(pixels.reshape(h, w, 4)[:side, :side])
    preview = obj.preview_ensure()
    preview.image_size = (side, side)
    preview.image_pixels_float.foreach_set(frame.reshape(-1))


def save_library(batch: str, path: Path) -> Path:
    """Write the batch's assets (objects with their meshes, materials and packed images) into ``path``,
    through a temporary file and a rename: a crash never leaves a half-written library."""
    ids: set = set()
    for obj in bpy.data.objects:
        if obj.asset_data is None or scene.JOB_KEY not in obj:
            continue
        coll_batches = {c.get(BATCH_KEY) for c in obj.users_collection}
        if batch in coll_batches:
            ids.add(obj)
    path = Path(bpy.path.abspath(str(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.blend")
    bpy.data.libraries.write(str(tmp), ids, fake_user=True, compress=True)
    os.replace(tmp, path)
    return path
