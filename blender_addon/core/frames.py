"""Frames and layouts between the backend (glTF: +Y up, UV origin top-left, image row 0 at the
top) and Blender (+Z up, UV origin bottom-left, image row 0 at the bottom). Pure numpy."""

from __future__ import annotations

import os
import threading

import numpy as np

# Blender world from glTF world: (x, y, z)_blender = (x, -z, y)_gltf, a rotation of +90 degrees about X
GLTF_TO_BLENDER = np.array([[1, 0, 0, 0],
                            [0, 0, -1, 0],
                            [0, 1, 0, 0],
                            [0, 0, 0, 1]], dtype=np.float64)
BLENDER_TO_GLTF = GLTF_TO_BLENDER.T  # a rotation: its inverse is its transpose


def points_to_blender(p: np.ndarray) -> np.ndarray:
    """(N,3) glTF points -> (N,3) float32 Blender points."""
    p = np.asarray(p)
    return np.stack([p[:, 0], -p[:, 2], p[:, 1]], axis=1).astype(np.float32)


def points_to_gltf(p: np.ndarray) -> np.ndarray:
    """(N,3) Blender points -> (N,3) float32 glTF points."""
    p = np.asarray(p)
    return np.stack([p[:, 0], p[:, 2], -p[:, 1]], axis=1).astype(np.float32)


def camera_to_gltf(blender_c2w: np.ndarray, world_to_local: np.ndarray) -> np.ndarray:
    """A Blender camera's 4x4 camera-to-world matrix -> DESIGN.md's convention: a rigid camera-to-world
    in the glTF frame of the mesh being worked on (``world_to_local``: rigid, world -> that frame).
    Blender cameras already look down their local -Z with +Y up, as OpenGL's do, so only the world
    changes; a scaled, sheared or mirrored camera object keeps the view direction and up it renders with."""
    m = BLENDER_TO_GLTF @ np.asarray(world_to_local, np.float64) @ np.asarray(blender_c2w, np.float64)
    m[:3, :3] = view_frame(m[:3, :3])
    m[3] = (0.0, 0.0, 0.0, 1.0)
    return m


def world_to_prop(location, size: float) -> np.ndarray:
    """World -> a new prop's frame (the backend's, where the object spans 1): moved to ``location``
    (Blender, metres) and scaled by 1/``size``, so cameras set up around a prop of ``size`` metres
    see the object the backend makes as they see the prop."""
    m = np.eye(4) / float(size)
    m[:3, 3] = -np.asarray(location, np.float64) / float(size)
    m[3, 3] = 1.0
    return m


def view_frame(a: np.ndarray) -> np.ndarray:
    """The rotation with ``a``'s view axis (its Z column: the camera looks down -Z) and, made orthogonal
    to it, its up axis (Y); X completes a right-handed frame, so a mirror in the matrix is dropped."""
    a = np.asarray(a, np.float64)
    z = a[:, 2] / np.linalg.norm(a[:, 2])
    y = a[:, 1] - (a[:, 1] @ z) * z
    y /= np.linalg.norm(y)
    return np.stack([np.cross(y, z), y, z], axis=1)


def fov_y_degrees(sensor_fit: str, angle_x: float, angle_y: float, width: int, height: int) -> float:
    """A Blender camera's vertical field of view in degrees for a render of width x height pixels.
    ``angle_x``/``angle_y`` are the camera data's own (radians); Blender applies the sensor to the
    larger side under AUTO."""
    aspect = width / height
    if sensor_fit == "VERTICAL" or (sensor_fit == "AUTO" and height > width):
        return float(np.degrees(angle_y if sensor_fit == "VERTICAL" else angle_x))
    return float(np.degrees(2 * np.arctan(np.tan(angle_x / 2) / aspect)))


def square_fov_degrees(sensor_fit: str, angle_x: float, angle_y: float, width: int, height: int) -> float:
    """The field of view of a square render that holds a Blender camera's whole width x height frame:
    the backend renders square views, so a wide camera's horizontal (a tall one's vertical) extent."""
    fov_y = np.radians(fov_y_degrees(sensor_fit, angle_x, angle_y, width, height))
    fov_x = 2 * np.arctan(np.tan(fov_y / 2) * width / height)
    return float(np.degrees(max(fov_x, fov_y)))


def uvs_to_blender(uvs: np.ndarray) -> np.ndarray:
    """Per-corner glTF UVs (F,3,2), origin top-left -> per-loop Blender UVs (F*3,2), origin bottom-left."""
    out = np.asarray(uvs, np.float32).reshape(-1, 2).copy()
    out[:, 1] = 1.0 - out[:, 1]
    return out


def uvs_to_gltf(loop_uvs: np.ndarray, n_faces: int) -> np.ndarray:
    """Per-loop Blender UVs of a triangulated mesh (F*3,2) -> per-corner glTF UVs (F,3,2)."""
    out = np.asarray(loop_uvs, np.float32).reshape(n_faces, 3, 2).copy()
    out[..., 1] = 1.0 - out[..., 1]
    return out


PIXEL_CHUNK_ROWS = 64  # a 1024-wide chunk is 256 KiB of uint8: the flipped copy stays in cache
PIXEL_THREAD_MIN = 512 * 512  # smaller images are converted on the calling thread alone
PIXEL_THREADS = max(1, min(4, os.cpu_count() or 1))


def _srgb_to_linear(code: np.ndarray) -> np.ndarray:
    """The sRGB transfer function's inverse (IEC 61966-2-1) of 8-bit codes, float64."""
    c = code / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_CODES = np.arange(256)
# uint8 -> float for each channel of an RGBA pixel: colour (sRGB codes) and alpha (linear), as
# written into a float image (linear, Blender's float-buffer convention) or a byte image (the codes / 255)
LINEAR_TABLE = np.concatenate([np.tile(_srgb_to_linear(_CODES), 3), _CODES / 255.0]).astype(np.float32)
CODE_TABLE = np.tile(_CODES / 255.0, 4).astype(np.float32)
# the exact inverse of LINEAR_TABLE's colour part: the code whose value lies nearest
_LINEAR_MIDPOINTS = ((LINEAR_TABLE[1:256] + LINEAR_TABLE[:255]) / 2).astype(np.float32)


def rgba8_to_blender_pixels(rgba: np.ndarray, out: np.ndarray | None = None, linear: bool = False) -> np.ndarray:
    """(H,W,4) uint8, row 0 at the top -> flat float32 pixels, row 0 at the bottom (``Image.pixels``),
    into ``out`` (float32, rgba.size) when given. ``linear``: colour decoded from sRGB for a float
    image (alpha stays linear), else the codes / 255 for a byte image.

    Rows are flipped a cache-sized chunk at a time into a small contiguous scratch and scaled from
    there, 1.5x faster than flipping the whole image first (a 4 MiB copy) or scaling through a
    negative-stride view; large images are split into bands converted on short-lived threads
    (numpy releases the GIL), another 1.5-2x on two cores. Nothing outlives the call."""
    out = np.empty(rgba.size, np.float32) if out is None else out
    h = rgba.shape[0]
    if rgba.size == 0:
        return out
    src = np.asarray(rgba, np.uint8).reshape(h, -1)
    dst = out.reshape(h, -1)
    parts = PIXEL_THREADS if rgba.size >= 4 * PIXEL_THREAD_MIN else 1
    bounds = [h * i // parts for i in range(parts + 1)]
    errors: list[BaseException] = []

    table = LINEAR_TABLE if linear else CODE_TABLE

    def band(lo: int, hi: int) -> None:
        try:
            _flip_scale_rows(src, dst, lo, hi, table)
        except BaseException as exc:  # re-raised on the calling thread: never a half-written buffer in silence
            errors.append(exc)

    threads = [threading.Thread(target=band, args=bounds_pair, daemon=True) for bounds_pair in zip(bounds[1:-1], bounds[2:])]
    for thread in threads:
        thread.start()
    _flip_scale_rows(src, dst, bounds[0], bounds[1], table)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return out


def _flip_scale_rows(src: np.ndarray, dst: np.ndarray, lo: int, hi: int, table: np.ndarray) -> None:
    """dst rows lo..hi (bottom-up) = ``table`` of src rows h-1-lo .. h-hi (top-down), per channel."""
    h = src.shape[0]
    rows = min(PIXEL_CHUNK_ROWS, max(hi - lo, 1))
    scratch = np.empty((rows, src.shape[1]), np.uint16)
    channel = (np.arange(src.shape[1], dtype=np.uint16) % 4) * 256  # each channel's part of the table
    for a in range(lo, hi, PIXEL_CHUNK_ROWS):
        b = min(a + PIXEL_CHUNK_ROWS, hi)
        chunk = scratch[:b - a]
        np.add(src[h - b:h - a][::-1], channel, out=chunk, dtype=np.uint16)
        np.take(table, chunk, out=dst[a:b])


def blender_pixels_to_rgba8(pixels: np.ndarray, width: int, height: int, linear: bool = False) -> np.ndarray:
    """Flat float pixels of a Blender image (row 0 at the bottom) -> (H,W,4) uint8, row 0 at the top;
    ``linear``: a float image's linear colour, encoded to sRGB (the inverse of rgba8_to_blender_pixels)."""
    img = np.asarray(pixels, np.float32).reshape(height, width, 4)[::-1]
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if linear:
        out[..., :3] = np.searchsorted(_LINEAR_MIDPOINTS, img[..., :3]).astype(np.uint8)
    return np.ascontiguousarray(out)


def triangle_loops(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A triangle mesh's Blender layout: (loop vertex indices (F*3,), loop starts (F,), loop totals (F,)), int32."""
    f = np.asarray(faces, np.int32)
    n = f.shape[0]
    return (np.ascontiguousarray(f.reshape(-1)), np.arange(0, 3 * n, 3, dtype=np.int32), np.full(n, 3, np.int32))


def fit_size(positions: np.ndarray, size: float) -> float:
    """The uniform scale that makes the mesh's largest extent ``size`` (1 for an empty or flat mesh)."""
    if len(positions) == 0:
        return 1.0
    extent = float(np.max(np.ptp(np.asarray(positions, np.float64), axis=0)))
    return size / extent if extent > 1e-9 else 1.0
