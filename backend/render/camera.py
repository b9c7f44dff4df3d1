"""Cameras in DESIGN.md's convention: 4x4 camera-to-world matrices, OpenGL style (the camera
looks down -Z with +Y up), vertical field of view in degrees; world is glTF's (+Y up, metres).

A rig is either a sampling spec (:class:`OrbitSpec`) or a list of explicit cameras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Camera:
    c2w: torch.Tensor  # (4,4) float32 camera-to-world
    fov_y: float  # degrees
    width: int
    height: int
    azimuth: float | None = None  # degrees, for view-dependent prompts; None for explicit cameras

    def projection(self, near: float = 0.01, far: float = 100.0) -> torch.Tensor:
        return perspective(self.fov_y, self.width / self.height, near, far)

    def mvp(self) -> torch.Tensor:
        """World -> clip (4,4)."""
        return self.projection() @ torch.linalg.inv(self.c2w)


def perspective(fov_y: float, aspect: float, near: float, far: float) -> torch.Tensor:
    """OpenGL projection (camera space, -Z forward) -> clip space, z/w in [-1, 1]."""
    f = 1.0 / math.tan(math.radians(fov_y) / 2)
    return torch.tensor([
        [f / aspect, 0, 0, 0],
        [0, f, 0, 0],
        [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
        [0, 0, -1, 0],
    ], dtype=torch.float32)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """Camera-to-world (4,4) for a camera at ``eye`` looking at ``target`` (-Z toward it)."""
    eye, target, up = (torch.as_tensor(x, dtype=torch.float32) for x in (eye, target, up))
    back = torch.nn.functional.normalize(eye - target, dim=0)  # camera +Z
    right = torch.nn.functional.normalize(torch.linalg.cross(up, back), dim=0)
    true_up = torch.linalg.cross(back, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, back, eye
    return c2w


def framing_distance(radius: float, fov_y: float, margin: float = 1.1) -> float:
    """Distance at which a sphere of ``radius`` about the target fits a vertical (and, on a square
    image, horizontal) field of view of ``fov_y`` degrees with ``margin`` to spare, from any direction."""
    return margin * radius / math.sin(math.radians(fov_y) / 2)


def orbit_position(elevation: float, azimuth: float, distance: float) -> tuple[float, float, float]:
    """Y-up orbit: azimuth 0 looks from +Z (the front), 90 from +X; elevation above the XZ plane."""
    el, az = math.radians(elevation), math.radians(azimuth)
    return (distance * math.cos(el) * math.sin(az), distance * math.sin(el), distance * math.cos(el) * math.cos(az))


@dataclass(frozen=True)
class OrbitSpec:
    """Camera sampling as score-distillation pipelines use it (threestudio's random-camera
    defaults: elevation [-10, 45] deg, azimuth [-180, 180], distance [1.5, 2.0] x unit object,
    fov [40, 70] deg)."""

    elevation: tuple[float, float] = (-10.0, 45.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (1.5, 2.0)
    fov_y: tuple[float, float] = (40.0, 70.0)
    width: int = 64
    height: int = 64

    def sample(self, n: int, generator: torch.Generator) -> list[Camera]:
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        cams = []
        for row in u.tolist():
            el = self.elevation[0] + row[0] * (self.elevation[1] - self.elevation[0])
            az = self.azimuth[0] + row[1] * (self.azimuth[1] - self.azimuth[0])
            dist = self.distance[0] + row[2] * (self.distance[1] - self.distance[0])
            fov = self.fov_y[0] + row[3] * (self.fov_y[1] - self.fov_y[0])
            cams.append(Camera(look_at(orbit_position(el, az, dist)), fov, self.width, self.height, az))
        return cams

    def resized(self, width: int, height: int) -> "OrbitSpec":
        return replace(self, width=width, height=height)

    def turntable(self, n: int, elevation: float = 15.0) -> list[Camera]:
        """n evenly spaced views around the object, for previews and evaluation (appendix F.2)."""
        dist = sum(self.distance) / 2
        fov = sum(self.fov_y) / 2
        return [Camera(look_at(orbit_position(elevation, 360.0 * i / n, dist)), fov, self.width, self.height, 360.0 * i / n)
                for i in range(n)]


@dataclass(frozen=True)
class MultiViewOrbit:
    """The cameras of a multi-view prior (MVDream): each object gets ``views`` cameras 360/views
    degrees apart from a random azimuth, sharing one elevation, field of view and distance; the
    distance is relative, ``d / tan(fov_y / 2)``, so the frame's half-height at the centre is d.
    Defaults: MVDream-threestudio ``configs/mvdream-sd21.yaml`` ``data.*`` (``n_view: 4``,
    ``elevation_range: [0, 30]``, ``fovy_range: [15, 60]``, ``camera_distance_range: [0.8, 1.0]``,
    ``relative_radius: true``), in the frame of its radius-1 volume."""

    views: int = 4
    elevation: tuple[float, float] = (0.0, 30.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (0.8, 1.0)
    fov_y: tuple[float, float] = (15.0, 60.0)
    width: int = 64
    height: int = 64

    def sample(self, objects: int, generator: torch.Generator) -> list[Camera]:
        """``objects * views`` cameras, each object's views consecutive."""
        cams = []
        for row in torch.rand(objects, 4, generator=generator, dtype=torch.float64).tolist():
            el = self.elevation[0] + row[0] * (self.elevation[1] - self.elevation[0])
            fov = self.fov_y[0] + row[2] * (self.fov_y[1] - self.fov_y[0])
            dist = (self.distance[0] + row[3] * (self.distance[1] - self.distance[0])) / math.tan(math.radians(fov) / 2)
            span = self.azimuth[1] - self.azimuth[0]
            for v in range(self.views):
                az = self.azimuth[0] + (row[1] + v) / self.views * span
                cams.append(Camera(look_at(orbit_position(el, az, dist)), fov, self.width, self.height, az))
        return cams

    def resized(self, width: int, height: int) -> "MultiViewOrbit":
        return replace(self, width=width, height=height)

    def turntable(self, n: int, elevation: float = 15.0) -> list[Camera]:
        fov = sum(self.fov_y) / 2
        dist = sum(self.distance) / 2 / math.tan(math.radians(fov) / 2)
        return [Camera(look_at(orbit_position(elevation, 360.0 * i / n, dist)), fov, self.width, self.height, 360.0 * i / n)
                for i in range(n)]


@dataclass(frozen=True)
class CameraList:
    """The artist's own cameras (the other kind of rig): each step samples among them."""

    cameras: tuple[Camera, ...]

    def sample(self, n: int, generator: torch.Generator) -> list[Camera]:
        idx = torch.randint(len(self.cameras), (n,), generator=generator)
        return [self.cameras[i] for i in idx.tolist()]

    def resized(self, width: int, height: int) -> "CameraList":
        return CameraList(tuple(replace(c, width=width, height=height) for c in self.cameras))


def rig_from_spec(rig: dict | None, centre=(0.0, 0.0, 0.0), scale: float = 1.0) -> "OrbitSpec | CameraList | None":
    """A spec's camera rig (validated by protocol.specs) in the unit optimisation frame.
    ``{"orbit": {...ranges...}}`` is already in unit-object units; ``{"matrices": [...], "fov_y": [...]}``
    are camera-to-world matrices in the input's own frame, moved by ``(p - centre) / scale``."""
    if rig is None:
        return None
    if "orbit" in rig:
        return OrbitSpec(**{k: tuple(v) for k, v in rig["orbit"].items()})
    cams = []
    for matrix, fov in zip(rig["matrices"], rig["fov_y"]):
        c2w = torch.tensor(matrix, dtype=torch.float32).view(4, 4)
        c2w[:3, 3] = (c2w[:3, 3] - torch.tensor(centre, dtype=torch.float32)) / scale
        x, z = float(c2w[0, 3]), float(c2w[2, 3])
        cams.append(Camera(c2w, float(fov), 64, 64, math.degrees(math.atan2(x, z))))
    return CameraList(tuple(cams))


def view_suffix(azimuth: float | None) -> str:
    """DreamFusion's view-dependent prompting: front (|az| < 45), back (|az| > 135), else side."""
    if azimuth is None:
        return ""
    az = (azimuth + 180.0) % 360.0 - 180.0
    if abs(az) < 45:
        return ", front view"
    if abs(az) > 135:
        return ", back view"
    return ", side view"


def to_clip(vertices: torch.Tensor, cameras: list[Camera]) -> torch.Tensor:
    """World positions (V,3) -> clip positions (B,V,4) for each camera."""
    homo = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)
    mvp = torch.stack([c.mvp() for c in cameras]).to(vertices)
    return homo[None] @ mvp.transpose(1, 2)
