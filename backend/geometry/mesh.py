"""The mesh the pipelines pass around, its normalisation, and GLB / OBJ input and output.

Conventions (DESIGN.md): glTF world (+Y up, metres); float32 positions (V,3), int64 faces
(F,3), per-corner UVs (F,3,2) with the origin at the image's top-left; textures uint8 sRGB
RGBA (H,W,4) with row 0 at the top. This module is format code: no torch autograd, no bpy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from protocol.errors import InvalidInputError
from protocol.messages import MAX_FACES, MAX_TEXTURE_SIDE  # the limits are the protocol's, for files and uploads alike
from backend.files import atomic_write_bytes


@dataclass
class Normalisation:
    """World = ``unit * scale + centre``: maps the unit-cube optimisation frame back to the input's."""

    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scale: float = 1.0

    @classmethod
    def fit(cls, positions: np.ndarray, size: float = 1.0) -> "Normalisation":
        lo, hi = positions.min(0), positions.max(0)
        extent = float((hi - lo).max())
        if not np.isfinite(extent) or extent <= 0:
            raise InvalidInputError("mesh: has no extent (all vertices coincide)", field="mesh")
        return cls(centre=(lo + hi) / 2, scale=extent / size)

    def to_unit(self, p: np.ndarray) -> np.ndarray:
        return (p - self.centre) / self.scale

    def to_world(self, p: np.ndarray) -> np.ndarray:
        return p * self.scale + self.centre


@dataclass
class Mesh:
    positions: torch.Tensor  # (V,3) float32
    faces: torch.Tensor  # (F,3) int64
    uvs: torch.Tensor | None = None  # (F,3,2) per corner, glTF convention
    texture: np.ndarray | None = None  # (H,W,4) uint8 sRGB RGBA, row 0 on top
    topology_id: int = 0

    def validate(self, field_name: str = "mesh") -> None:
        p, f = self.positions, self.faces
        if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
            raise InvalidInputError(f"{field_name}: positions must be (V,3) with V > 0, got {tuple(p.shape)}", field=field_name)
        if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
            raise InvalidInputError(f"{field_name}: faces must be (F,3) with F > 0, got {tuple(f.shape)}", field=field_name)
        if f.shape[0] > MAX_FACES:
            raise InvalidInputError(f"{field_name}: {f.shape[0]} faces, at most {MAX_FACES}", field=field_name)
        if not torch.isfinite(p).all():
            raise InvalidInputError(f"{field_name}: positions contain NaN or inf", field=field_name)
        if int(f.min()) < 0 or int(f.max()) >= p.shape[0]:
            raise InvalidInputError(f"{field_name}: face indices outside [0, {p.shape[0]})", field=field_name)
        if self.uvs is not None and (self.uvs.shape != (f.shape[0], 3, 2) or not torch.isfinite(self.uvs).all()):
            raise InvalidInputError(f"{field_name}: UVs must be finite (F,3,2), got {tuple(self.uvs.shape)}", field=field_name)
        if self.texture is not None:
            t = self.texture
            if t.ndim != 3 or t.shape[2] != 4 or t.dtype != np.uint8 or max(t.shape[:2]) > MAX_TEXTURE_SIDE:
                raise InvalidInputError(f"{field_name}: texture must be uint8 RGBA up to {MAX_TEXTURE_SIDE}^2, got {t.shape} {t.dtype}",
                                        field=field_name)


def repair(mesh: Mesh, field_name: str = "mesh") -> tuple[Mesh, list[str]]:
    """Remove what an artist expects to be removed — faces with a repeated vertex or no area —
    and say so. Raises when nothing would be left."""
    f = mesh.faces
    p = mesh.positions.double()
    area2 = torch.linalg.cross(p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]]).norm(dim=1)
    extent = float((p.max(0).values - p.min(0).values).max())
    repeated = (f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])
    keep = ~repeated & (area2 > 1e-12 * max(extent, 1e-30) ** 2)
    warnings = []
    if not bool(keep.all()):
        dropped = int((~keep).sum())
        if dropped == f.shape[0]:
            raise InvalidInputError(f"{field_name}: all {dropped} faces are degenerate (no area)", field=field_name)
        warnings.append(f"{field_name}: removed {dropped} degenerate face(s) (repeated vertex or zero area)")
        mesh = Mesh(mesh.positions, f[keep], None if mesh.uvs is None else mesh.uvs[keep], mesh.texture, mesh.topology_id)
    return mesh, warnings


def split_by_uv(mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-corner UVs -> per-vertex (glTF needs one UV per vertex): vertices are duplicated
    where a position has several UVs (seams). Returns positions (V',3), faces (F,3), uv (V',2)."""
    pos = mesh.positions.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.detach().cpu().numpy().astype(np.int64)
    uv = mesh.uvs.detach().cpu().numpy().reshape(-1, 2).astype(np.float32)
    key = np.concatenate([faces.reshape(-1, 1).astype(np.float64), uv.astype(np.float64)], axis=1)
    unique, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    new_faces = inverse.reshape(-1, 3)
    return pos[faces.reshape(-1)[first]], new_faces, uv[first]


def to_glb_bytes(mesh: Mesh) -> bytes:
    """A binary glTF with the base-colour texture embedded (sRGB PNG) and glTF UVs."""
    import trimesh
    from PIL import Image

    if mesh.uvs is None:
        tm = trimesh.Trimesh(mesh.positions.detach().cpu().numpy(), mesh.faces.cpu().numpy(), process=False)
    else:  # UVs are written with or without a texture: refine keeps an artist's UVs whatever the material
        pos, faces, uv = split_by_uv(mesh)
        uv = uv.astype(np.float64)  # 1 - (1 - v) is exact in float64 for float32 v: UVs come back byte-equal
        image = None if mesh.texture is None else Image.fromarray(mesh.texture, "RGBA")
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, metallicFactor=0.0, roughnessFactor=0.8)
        # trimesh stores UVs with the origin bottom-left and flips v when writing glTF
        visual = trimesh.visual.TextureVisuals(uv=np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1), material=material)
        tm = trimesh.Trimesh(pos, faces, visual=visual, process=False)
    return trimesh.Scene(tm).export(file_type="glb")


def save_glb(mesh: Mesh, path: str | Path) -> Path:
    return atomic_write_bytes(path, to_glb_bytes(mesh))


def load_mesh(path: str | Path, field_name: str = "mesh") -> Mesh:
    """Read a GLB/glTF/OBJ/PLY file (all geometry merged, in the file's own frame) with its UVs
    and base-colour texture when present."""
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{field_name}: no file at {path}", field=field_name)
    try:
        loaded = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:
        raise InvalidInputError(f"{field_name}: {path.name} could not be read as a mesh ({exc})", field=field_name) from exc
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise InvalidInputError(f"{field_name}: {path.name} holds no triangles", field=field_name)
    positions = torch.from_numpy(np.asarray(loaded.vertices, dtype=np.float32))
    faces = torch.from_numpy(np.asarray(loaded.faces, dtype=np.int64))
    uvs, texture = None, None
    visual = loaded.visual
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None and len(visual.uv) == len(loaded.vertices):
        uv = np.asarray(visual.uv, dtype=np.float32)
        uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1)  # back to glTF's top-left origin
        uvs = torch.from_numpy(uv[np.asarray(loaded.faces)])
        image = getattr(visual.material, "baseColorTexture", None) or getattr(visual.material, "image", None)
        if image is not None:
            texture = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    mesh = Mesh(positions, faces, uvs, texture)
    mesh.validate(field_name)
    return mesh


def png_to_rgba(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"), dtype=np.uint8)
