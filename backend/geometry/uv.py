"""UV unwrapping (xatlas), decimation before it, UV padding, and the optimised UV texture."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backend.geometry.mesh import Mesh

# xatlas chart computation dominates: measured on 2 cores, 50k DMTet faces 19-23 s, 20k faces 5 s
# (threestudio #511 saw hours far above). Generated meshes are decimated to this before unwrapping.
UNWRAP_MAX_FACES = 20_000


def decimate(positions: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast-simplification, the library trimesh uses) to about ``target_faces``."""
    import fast_simplification

    if len(faces) <= target_faces:
        return positions, faces
    reduction = 1.0 - target_faces / len(faces)
    pos, f = fast_simplification.simplify(positions.astype(np.float32), faces.astype(np.int64), target_reduction=reduction)
    return pos.astype(np.float32), f.astype(np.int64)


@dataclass
class UnwrapReport:
    faces_in: int
    faces_out: int
    decimate_s: float
    unwrap_s: float


def unwrap(mesh: Mesh, max_faces: int | None = UNWRAP_MAX_FACES, padding: int = 4,
           resolution: int = 1024) -> tuple[Mesh, UnwrapReport]:
    """xatlas parametrisation of ``mesh``, decimated first above ``max_faces`` (None: never,
    for an artist's mesh that must keep its geometry). Returns a new mesh with per-corner UVs
    (glTF convention) and the timings."""
    import xatlas

    pos = mesh.positions.detach().cpu().numpy().astype(np.float32)
    faces = mesh.faces.detach().cpu().numpy().astype(np.uint32)
    start = time.perf_counter()
    if max_faces is not None:
        pos, faces = decimate(pos, faces, max_faces)
    decimated = time.perf_counter()
    atlas = xatlas.Atlas()
    atlas.add_mesh(pos, faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.padding, pack.resolution, pack.bilinear = padding, resolution, True
    atlas.generate(pack_options=pack)
    vmapping, indices, uvs = atlas[0]
    done = time.perf_counter()
    new_pos = torch.from_numpy(pos[vmapping].astype(np.float32))
    new_faces = torch.from_numpy(indices.astype(np.int64))
    corner_uv = torch.from_numpy(uvs[indices].astype(np.float32))  # (F,3,2)
    out = Mesh(new_pos, new_faces, corner_uv, None, mesh.topology_id + 1)
    return out, UnwrapReport(len(mesh.faces), len(new_faces), decimated - start, done - decimated)


def dilate(texture: torch.Tensor, mask: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """UV padding: grow each chart's colours into the empty texels around it so that bilinear
    sampling and mip-maps at seams do not pull in background. texture (H,W,C), mask (H,W) bool."""
    tex = texture.permute(2, 0, 1)[None]
    m = mask[None, None].to(tex.dtype)
    kernel = torch.ones(1, 1, 3, 3, dtype=tex.dtype, device=tex.device)
    for _ in range(iterations):
        summed = F.conv2d(tex * m, kernel.expand(tex.shape[1], 1, 3, 3), padding=1, groups=tex.shape[1])
        count = F.conv2d(m, kernel, padding=1)
        grow = (count > 0) & (m == 0)
        tex = torch.where(grow, summed / count.clamp(min=1), tex)
        m = torch.where(grow, torch.ones_like(m), m)
    return tex[0].permute(1, 2, 0)


class UVTexture(torch.nn.Module):
    """A multi-resolution UV texture: the colour is ``sigmoid(sum_l up(level_l))`` over levels
    of size (H, W) / 2^k, so coarse levels move large areas together early on (as a Laplacian
    pyramid does) while the finest level keeps per-texel detail. ``levels=1`` is a plain texture.
    ``init`` (H,W,3) in [0,1] starts the finest level at its logit, so the step-0 texture is it."""

    def __init__(self, height: int, width: int, levels: int = 4, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.size = (height, width)
        sizes = [(max(2, height >> k), max(2, width >> k)) for k in range(levels)]
        self.levels = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1, 3, h, w)) for h, w in sizes])
        if init is not None:
            eps = 0.25 / 255  # keeps logit finite; sigmoid(logit(c)) still rounds back to the same byte
            logit = torch.logit(init.float().clamp(eps, 1 - eps)).permute(2, 0, 1)[None]
            if logit.shape[-2:] != self.size:
                logit = F.interpolate(logit, size=self.size, mode="bilinear", align_corners=False)
            self.levels[0].data.copy_(logit)

    def forward(self) -> torch.Tensor:
        """(H,W,3) colours in [0,1], rows top-first (glTF)."""
        total = self.levels[0]
        for level in self.levels[1:]:
            total = total + F.interpolate(level, size=total.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(total)[0].permute(1, 2, 0)


def uv_coverage(uvs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Which texels the UV charts cover: (H,W) bool, row 0 = v 0 (top). uvs (F,3,2) per corner."""
    from backend.render import torch_raster

    flat = uvs.reshape(-1, 2).float()
    clip = torch.cat([flat * 2 - 1, torch.zeros_like(flat[:, :1]), torch.ones_like(flat[:, :1])], dim=1)
    tri = torch.arange(flat.shape[0]).view(-1, 3)
    rast = torch_raster.rasterize(clip, tri, (height, width))  # NDC y = -1 (v = 0) lands in row 0
    return rast[0, ..., 3] > 0
