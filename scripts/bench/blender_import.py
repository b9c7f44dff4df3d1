#!/usr/bin/env python
"""Applying a backend snapshot in headless Blender (the ``bpy`` module): our in-place writes
(``blender_addon.blender.scene``) vs the obvious alternative, the received GLB written to a temp
file and imported with ``bpy.ops.import_scene.gltf``. A 50,562-face mesh (25,600 vertices, per-corner
UVs) and a 1024^2 RGBA uint8 texture; medians of 15 interleaved rounds after a warm-up, in ms.

The importer packs the PNG and decodes it lazily, when the image is first drawn or read; the gltf
baseline forces that decode (``image.size``) so both sides end with pixels ready to show. The lazy
number is printed too. So is Blender's own share of (a), ``Image.pixels.foreach_set`` of ready float
pixels (its float -> byte loop in ``rna_Image_pixels_set``, which no 4.5 Python API avoids): the
floor of any in-place texture write. The add-on converts a texture snapshot (uint8 -> float, rows
flipped) on a worker thread (``blender_addon.core.pixels``) and its timer writes the ready buffer
later; what an artist feels is the main thread's share, printed as (a) on the main thread: handing
the snapshot over plus the later write (``pump.show_texture`` + ``pump.write_textures``), the
converter's time in between not counted (the glTF route runs wholly on the main thread). Targets:
texture >= 10x, texture_main >= 12x, positions >= 20x, full >= 2x faster than gltf.

    .venv/bin/python scripts/bench/blender_import.py
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bpy  # noqa: E402
import numpy as np  # noqa: E402
import trimesh  # noqa: E402
from PIL import Image  # noqa: E402

from blender_addon.blender import pump, scene  # noqa: E402
from blender_addon.core import frames  # noqa: E402

GRID = 160  # a GRID x GRID vertex sphere patch: 2 * (GRID - 1)^2 = 50,562 triangles
SIDE = 1024
REPEATS = 15
DATA = ("objects", "meshes", "materials", "images", "textures", "node_groups", "collections")


def sphere_patch(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """glTF-frame positions (V,3) float32, faces (F,3) int32, per-vertex uvs (V,2), origin top-left."""
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    theta, phi = u * 2 * np.pi, (0.05 + 0.9 * v) * np.pi  # poles cut off: no degenerate triangles
    pos = np.stack([np.sin(phi) * np.cos(theta), np.cos(phi), np.sin(phi) * np.sin(theta)], -1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return pos.reshape(-1, 3).astype(np.float32), faces.astype(np.int32), np.stack([u, v], -1).reshape(-1, 2)


def texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth pattern with a little noise: PNG-compressible like a real texture, not a worst case."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    base = np.stack([np.sin(6 * x), np.cos(9 * y), np.sin(5 * (x + y))], -1) * 100 + 127
    rgb = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((SIDE, SIDE, 1), 255, np.uint8)], -1)


def glb_bytes(pos: np.ndarray, faces: np.ndarray, uv: np.ndarray, rgba: np.ndarray) -> bytes:
    gl_uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], -1)  # trimesh UVs have their origin bottom-left
    visual = trimesh.visual.TextureVisuals(uv=gl_uv, image=Image.fromarray(rgba, "RGBA"))
    return trimesh.Trimesh(pos, faces, visual=visual, process=False).export(file_type="glb")


def data_ids() -> list[bpy.types.ID]:
    return [item for name in DATA for item in getattr(bpy.data, name)]


def gltf_import(glb: bytes, decode: bool) -> Callable[[], None]:
    def op() -> None:
        fd, path = tempfile.mkstemp(suffix=".glb")
        with os.fdopen(fd, "wb") as f:
            f.write(glb)
        try:
            bpy.ops.import_scene.gltf(filepath=path)
        finally:
            os.unlink(path)
        if decode:
            for image in bpy.data.images:
                if image.packed_file is not None:
                    image.size[:]  # noqa: B018 -- loads the image buffer (PNG decode)
    return op


def medians_ms(ops: dict[str, Callable[[], float | None]], cleanup: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median ms per op over REPEATS rounds after a warm-up; rounds interleave the ops, so load on a
    shared machine drifting during the run hits every op alike. ``cleanup`` runs untimed after its op.
    An op that returns seconds is timed by them (the part of it that counts), else by its wall time."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    for round_ in range(REPEATS + 1):
        for name, op in ops.items():
            start = time.perf_counter()
            counted = op()
            if round_:  # round 0 is the warm-up
                times[name].append(time.perf_counter() - start if counted is None else counted)
            cleanup.get(name, lambda: None)()
    return {name: sorted(t)[len(t) // 2] * 1000 for name, t in times.items()}


def main() -> None:
    rng = np.random.default_rng(0)
    pos, faces, uv = sphere_patch(GRID)
    corner_uvs = uv[faces].astype(np.float32)  # (F,3,2), as a MeshSnapshot carries them
    rgba = texture(rng)
    moved = [pos + rng.normal(0, 1e-3, pos.shape).astype(np.float32) for _ in range(2)]
    glb = glb_bytes(pos, faces, uv, rgba)
    logging.getLogger("glTFImporter").addFilter(lambda record: record.levelno >= logging.WARNING)

    obj = scene.new_job_object("bench", "bench", (0.0, 0.0, 0.0), bpy.context.scene.collection)
    mesh, image = obj.data, scene.job_image("bench")
    scene.apply_mesh(mesh, pos, faces, corner_uvs, topology_id=1)
    counter = iter(range(2, 1_000_000))
    baseline = {item.as_pointer() for item in data_ids()}  # what an import adds is what cleanup removes

    def cleanup() -> None:
        bpy.data.batch_remove([item for item in data_ids() if item.as_pointer() not in baseline])

    def positions() -> None:  # perturbed positions, the topology already there
        kept = mesh[scene.TOPOLOGY_KEY]
        assert scene.apply_mesh(mesh, moved[next(counter) % 2], faces, corner_uvs, kept) == "positions"

    buffer = np.empty(rgba.size, np.float32)

    def texture_whole() -> None:  # the whole conversion and write on one thread (the add-on before item 9)
        scene.apply_pixels(image, frames.rgba8_to_blender_pixels(rgba, out=buffer, linear=True), SIDE, SIDE)

    def texture_main() -> float:
        """As the pump does it: hand over (main), convert (the converter's thread), write (main)."""
        start = time.perf_counter()
        pump.show_texture("bench", rgba)
        handed = time.perf_counter()
        assert pump._converter.wait("bench")  # the timer would come back ACTIVE_INTERVAL later
        converted = time.perf_counter()
        assert pump.write_textures()
        main = (handed - start) + (time.perf_counter() - converted)
        off_main.append(converted - handed)
        return main

    off_main: list[float] = []

    def full() -> None:
        assert scene.apply_mesh(mesh, moved[0], faces, corner_uvs, topology_id=next(counter)) == "full"
        texture_whole()

    ready = frames.rgba8_to_blender_pixels(rgba, linear=True)
    ms = medians_ms({"gltf_lazy": gltf_import(glb, decode=False), "gltf": gltf_import(glb, decode=True),
                     "texture": texture_whole, "texture_main": texture_main,
                     "pixels_set": lambda: image.pixels.foreach_set(ready), "positions": positions, "full": full},
                    {"gltf_lazy": cleanup, "gltf": cleanup})
    ms["texture_off_main"] = sorted(off_main[1:])[len(off_main[1:]) // 2] * 1000
    assert np.array_equal(scene.image_rgba8(image), rgba)
    assert len(mesh.polygons) == len(faces) and len(mesh.uv_layers[scene.UV_NAME].uv) == 3 * len(faces)

    print(f"{len(faces):,} faces, {len(pos):,} vertices, {SIDE}^2 RGBA texture, GLB {len(glb) / 1e6:.1f} MB; "
          f"median of {REPEATS}, ms per op")
    rows = [("gltf: temp file + import_scene.gltf (PNG decoded lazily)", "gltf_lazy"),
            ("gltf: temp file + import_scene.gltf + PNG decode", "gltf"),
            ("(a) texture snapshot in place, conversion + write", "texture"),
            ("    of which Blender's Image.pixels.foreach_set alone", "pixels_set"),
            ("(a) on the main thread: hand-over + write of ready pixels", "texture_main"),
            ("    (conversion on the converter's thread, not counted)", "texture_off_main"),
            ("(b) positions snapshot in place (same topology)", "positions"),
            ("(c) mesh + texture snapshot, new topology", "full")]
    for label, key in rows:
        print(f"  {label:<58} {ms[key]:8.1f}")
    gltf = ms["gltf"]
    print(f"texture_vs_gltf={gltf / ms['texture']:.1f} positions_vs_gltf={gltf / ms['positions']:.1f} "
          f"full_vs_gltf={gltf / ms['full']:.1f} texture_main_vs_gltf={gltf / ms['texture_main']:.1f}")


if __name__ == "__main__":
    main()
