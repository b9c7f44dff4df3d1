"""The latest snapshot of each kind (``mesh``, ``texture``, ``image``) per job: the server's one
owner of the coalescing rule.

A snapshot replaces the previous one of its kind; a subscriber gets the latest of each. The
worker writes each job's latest to its folder (``save_latest``: ``latest_mesh.npz``,
``latest_texture.png``, ``latest_image.png``); the server loop keeps recent ones in memory,
bounded, and reads the folder back after a restart or an eviction (``LatestSnapshots.of``).
Snapshots carry the ``seq`` of the job's last stored event when they were made; one read back
from the folder carries the job's last ``seq`` and ``step`` now.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import numpy as np

from protocol.cursor import SNAPSHOTS
from protocol.events import ImageSnapshot, MeshSnapshot, TextureSnapshot
from protocol.messages import event_to_message
from protocol.png import decode_png, encode_png
from protocol.wire import Message
from backend.files import atomic_write_bytes
from backend.jobs.store import JobRow, JobStore

MAX_LATEST_SNAPSHOTS = 48  # snapshots kept in memory (a long batch must not keep every job's texture)
FILES = {"mesh": "latest_mesh.npz", "texture": "latest_texture.png", "image": "latest_image.png"}


def save_latest(folder: Path, event) -> None:
    """Write a snapshot event as its job's latest of its kind (atomically; the worker calls this)."""
    if isinstance(event, MeshSnapshot):
        buf = io.BytesIO()
        arrays = {"positions": event.positions, "faces": event.faces, "topology_id": np.int64(event.topology_id)}
        if event.uvs is not None:
            arrays["uvs"] = event.uvs
        np.savez(buf, **arrays)
        atomic_write_bytes(folder / FILES["mesh"], buf.getvalue())
    else:
        kind = "texture" if isinstance(event, TextureSnapshot) else "image"
        atomic_write_bytes(folder / FILES[kind], encode_png(np.ascontiguousarray(event.image)))


def load_latest(job_id: str, folder: Path, seq: int, step: int) -> dict[str, Message]:
    """The snapshots ``save_latest`` kept, as event messages by kind."""
    found = {}
    mesh_file = folder / FILES["mesh"]
    if mesh_file.is_file():
        with np.load(mesh_file) as z:
            found["mesh"] = event_to_message(job_id, seq, MeshSnapshot(
                step, z["positions"], z["faces"], z["uvs"] if "uvs" in z.files else None, int(z["topology_id"])))
    for kind, cls in (("texture", TextureSnapshot), ("image", ImageSnapshot)):
        png = folder / FILES[kind]
        if png.is_file():
            found[kind] = event_to_message(job_id, seq, cls(step, decode_png(png.read_bytes())))
    return found


class LatestSnapshots:
    """The latest snapshot message of each kind per job, in memory (bounded) over the job folders."""

    def __init__(self, store: JobStore, capacity: int = MAX_LATEST_SNAPSHOTS) -> None:
        self.store, self.capacity = store, capacity
        # (job, kind) -> latest snapshot, least recently updated first
        self._memory: OrderedDict[tuple[str, str], Message] = OrderedDict()

    def keep(self, job_id: str, message: Message) -> None:
        """Remember a published snapshot as its job's latest of its kind."""
        key = (job_id, message.body["kind"])
        self._memory[key] = message
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def of(self, row: JobRow) -> list[Message]:
        """The job's latest snapshots, mesh first (a texture applies to the mesh before it): from memory,
        else from its folder."""
        found = {kind: self._memory[(row.id, kind)] for kind in SNAPSHOTS if (row.id, kind) in self._memory}
        on_disk = [kind for kind in SNAPSHOTS if kind not in found and (self.store.folder(row.id) / FILES[kind]).is_file()]
        if on_disk:
            found = {**load_latest(row.id, self.store.folder(row.id), self.store.last_seq(row.id), row.step), **found}
        return [found[kind] for kind in ("mesh", "texture", "image") if kind in found]
