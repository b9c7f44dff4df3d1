"""A small PNG codec for texture snapshots on slow links (standard library zlib + numpy only,
so the Blender add-on can decode without Pillow).

Encodes 8-bit RGBA, non-interlaced, with the "Up" filter on every row (vectorised both ways);
decodes the None, Sub and Up filters — all this encoder emits — and names anything else.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from protocol.wire import ProtocolError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 16384


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgba: np.ndarray, level: int = 6) -> bytes:
    """(H,W,4) uint8, row 0 at the top -> PNG bytes."""
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected (H,W,4) uint8, got {rgba.shape} {rgba.dtype}")
    h, w, _ = rgba.shape
    rows = rgba.reshape(h, w * 4)
    up = np.empty_like(rows)
    up[0] = rows[0]
    up[1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps mod 256, as the filter wants
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)  # filter type 2 (Up) per row
    header = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b"")


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (8-bit RGBA, filters None/Sub/Up) -> (H,W,4) uint8."""
    if data[:8] != SIGNATURE:
        raise ProtocolError("png: not a PNG (bad signature)", field="png")
    pos, width, height, idat = 8, None, None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if (depth, colour, interlace) != (8, 6, 0) or not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
                raise ProtocolError("png: only non-interlaced 8-bit RGBA up to 16384 px is accepted", field="png")
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if width is None:
        raise ProtocolError("png: no IHDR chunk", field="png")
    stride = width * 4 + 1
    try:
        raw = zlib.decompressobj().decompress(b"".join(idat), height * stride)
    except zlib.error as exc:
        raise ProtocolError(f"png: corrupt image data ({exc})", field="png") from exc
    if len(raw) != height * stride:
        raise ProtocolError("png: image data is shorter than its header says", field="png")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride)
    filters, pixels = rows[:, 0], rows[:, 1:].copy()
    if not np.isin(filters, (0, 1, 2)).all():
        raise ProtocolError("png: filter types other than None/Sub/Up are not decoded here", field="png")
    for y in range(height):
        if filters[y] == 1:  # Sub: running sum per channel along the row
            pixels[y] = np.cumsum(pixels[y].reshape(width, 4), axis=0, dtype=np.uint8).reshape(-1)
        elif filters[y] == 2 and y > 0:  # Up
            pixels[y] = pixels[y] + pixels[y - 1]
    return pixels.reshape(height, width, 4)
