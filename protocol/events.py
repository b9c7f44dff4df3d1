"""Events a pipeline yields and the server streams: progress, snapshots, done, failed.

``Progress``, ``Done`` and ``Failed`` are delivered exactly once and in order; snapshot
events coalesce (a slow client gets the latest). Plain dataclasses: the wire codec turns
them into a msgpack header plus raw array frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Progress:
    step: int  # steps done so far (1-based after the first step)
    total: int
    stage: str  # e.g. "image2d", "geometry", "texture"
    metrics: dict = field(default_factory=dict)  # the step's record (metrics.json schema)


@dataclass
class ImageSnapshot:
    step: int
    image: np.ndarray  # (H,W,4) uint8 sRGB RGBA, row 0 at the top


@dataclass
class Done:
    outputs: dict  # name -> file path inside the job folder
    final: dict  # metrics.json "final"


@dataclass
class Failed:
    code: str
    message: str
    field: str | None = None



@dataclass
class MeshSnapshot:
    """The current mesh in the output frame; ``topology_id`` changes only when faces change,
    so a client may update positions alone when it is unchanged."""

    step: int
    positions: np.ndarray  # (V,3) float32
    faces: np.ndarray  # (F,3) int32
    uvs: np.ndarray | None  # (F,3,2) float32 per corner, glTF convention
    topology_id: int


@dataclass
class TextureSnapshot:
    step: int
    image: np.ndarray  # (H,W,4) uint8 sRGB RGBA, row 0 at the top


Event = Progress | ImageSnapshot | MeshSnapshot | TextureSnapshot | Done | Failed
