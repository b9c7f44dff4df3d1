"""Texture snapshots into Blender's float pixels off Blender's main thread.

``Image.pixels.foreach_set`` must run on the main thread; the uint8 -> float conversion and the
row flip before it need not. ``TextureConverter`` does them on one worker thread (numpy releases
the GIL), so the main thread only hands over the snapshot and later writes a ready float32 buffer.
Per key (a job) only the newest snapshot counts: one that waits is replaced by a newer one, as
the session coalesces snapshots. Pure numpy and threading: no bpy."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import frames

POOL_PER_SIZE = 2  # float buffers kept for reuse per pixel count (no 16 MiB allocation per 1024² snapshot)


@dataclass
class Converted:
    """A snapshot ready for ``Image.pixels.foreach_set``: flat float32 RGBA in 0..1 (not premultiplied,
    as the snapshot), row 0 at the bottom; or the error its conversion raised."""

    key: str
    width: int
    height: int
    pixels: np.ndarray | None
    error: BaseException | None = None


class TextureConverter:
    """One worker thread, started on the first ``submit``; ``ready`` hands back what it finished."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._todo: dict[str, np.ndarray] = {}  # key -> the newest snapshot not started, in arrival order
        self._busy: str | None = None  # the key being converted
        self._done: dict[str, Converted] = {}  # key -> the newest finished conversion not yet taken
        self._pool: dict[int, list[np.ndarray]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, key: str, rgba: np.ndarray) -> None:
        """Queue an (H,W,4) uint8 texture, row 0 at the top. The array is handed over: not copied,
        so the caller must not change it afterwards. A snapshot of ``key`` still waiting is dropped."""
        with self._cond:
            self._closed = False
            self._todo.pop(key, None)  # the newer one goes to the back, behind earlier keys
            self._todo[key] = rgba
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="psd3d-texture-converter", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def ready(self) -> list[Converted]:
        """The finished conversions (the newest per key), taken: give each back with ``release``."""
        with self._cond:
            out = list(self._done.values())
            self._done.clear()
        return out

    def release(self, converted: Converted) -> None:
        """A converted buffer's pixels were written: it may be reused."""
        if converted.pixels is None:
            return
        with self._cond:
            pool = self._pool.setdefault(converted.pixels.size, [])
            if len(pool) < POOL_PER_SIZE:
                pool.append(converted.pixels)
        converted.pixels = None

    def pending(self, key: str | None = None) -> bool:
        """Whether a snapshot (of ``key``, or of any key) is waiting, being converted or not yet taken."""
        with self._cond:
            keys = [*self._todo, *self._done] + ([self._busy] if self._busy is not None else [])
            return (key in keys) if key is not None else bool(keys)

    def wait(self, key: str | None = None, timeout: float = 10.0) -> bool:
        """Block until nothing of ``key`` (or of any key) waits or is being converted. Returns whether it
        got there within ``timeout`` seconds. For the rare moments that need the newest state now (a
        job's end, a save), never for every snapshot."""
        def idle() -> bool:
            if key is None:
                return not self._todo and self._busy is None
            return key not in self._todo and self._busy != key

        with self._cond:
            return self._cond.wait_for(idle, timeout)

    def close(self) -> None:
        """Drop what waits and stop the worker (it ends after the conversion it is doing)."""
        with self._cond:
            self._closed = True
            self._todo.clear()
            self._done.clear()
            self._pool.clear()
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._todo or self._closed)
                if self._closed:
                    return
                key = next(iter(self._todo))
                rgba = self._todo.pop(key)
                self._busy = key
                pool = self._pool.get(rgba.size)
                buffer = pool.pop() if pool else None
            try:
                converted = convert(key, rgba, buffer)
            except BaseException as exc:  # handed to the main thread, which reports it
                converted = Converted(key, 0, 0, None, exc)
            with self._cond:
                old = self._done.pop(key, None)
                pool = self._pool.setdefault(old.pixels.size, []) if old is not None and old.pixels is not None else None
                if pool is not None and len(pool) < POOL_PER_SIZE:  # superseded before it was taken
                    pool.append(old.pixels)
                if not self._closed:
                    self._done[key] = converted
                self._busy = None
                self._cond.notify_all()


def convert(key: str, rgba: np.ndarray, out: np.ndarray | None = None) -> Converted:
    """One snapshot's conversion (what the worker runs): uint8 sRGB rows top-down -> float32 linear
    rows bottom-up, for the job's float image (scene.ensure_image)."""
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"texture: expected (H,W,4) uint8, got {rgba.shape} {rgba.dtype}")
    h, w = rgba.shape[:2]
    if out is None or out.size != rgba.size or out.dtype != np.float32:
        out = np.empty(rgba.size, np.float32)
    return Converted(key, w, h, frames.rgba8_to_blender_pixels(rgba, out=out, linear=True))
