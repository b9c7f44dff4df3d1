"""Shading on top of the four ops: albedo from a UV texture, normals, Lambertian, background.

Every function returns images as (B,3,H,W) in [0,1] with row 0 at the top (PNG order), ready
for the VAE; the rasterizer's bottom-up rows are flipped here, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.render.camera import Camera, to_clip
from backend.render.ops import RasterContext, antialias, interpolate, rasterize, texture


@dataclass
class Fragments:
    rast: torch.Tensor  # (B,H,W,4) bottom-up
    mask: torch.Tensor  # (B,H,W,1) float, 1 where a triangle covers the pixel
    pos: torch.Tensor  # (B,V,4) clip positions


def vertex_normals(positions: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals (V,3), differentiable."""
    f = faces.long()
    a, b, c = positions[f[:, 0]], positions[f[:, 1]], positions[f[:, 2]]
    fn = torch.linalg.cross(b - a, c - a)
    n = torch.zeros_like(positions).index_add(0, f[:, 0], fn).index_add(0, f[:, 1], fn).index_add(0, f[:, 2], fn)
    return F.normalize(n, dim=-1, eps=1e-12)


def rasterize_views(ctx: RasterContext, positions: torch.Tensor, faces: torch.Tensor, cameras: list[Camera]) -> Fragments:
    pos = to_clip(positions, cameras)
    rast = rasterize(ctx, pos, faces, (cameras[0].height, cameras[0].width))
    return Fragments(rast, (rast[..., 3:] > 0).to(positions.dtype), pos)


def _finish(ctx, color: torch.Tensor, frags: Fragments, faces: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    color = color * frags.mask + background.view(1, 1, 1, -1).to(color) * (1 - frags.mask)
    color = antialias(ctx, color, frags.rast, frags.pos, faces)
    return color.flip(1).permute(0, 3, 1, 2).clamp(0, 1)


def render_albedo(ctx: RasterContext, frags: Fragments, faces: torch.Tensor, uvs: torch.Tensor, tex: torch.Tensor,
                  background: torch.Tensor) -> torch.Tensor:
    """Textured colour. uvs per corner (F,3,2); tex (H,W,3) rows top-first."""
    corner_tri = torch.arange(faces.shape[0] * 3, device=uvs.device, dtype=torch.int32).view(-1, 3)
    uv = interpolate(ctx, uvs.reshape(-1, 2), frags.rast, corner_tri)
    return _finish(ctx, texture(ctx, tex, uv), frags, faces, background)


def render_normals(ctx: RasterContext, frags: Fragments, positions: torch.Tensor, faces: torch.Tensor,
                   background: torch.Tensor) -> torch.Tensor:
    """World-space normals mapped to colours (n + 1) / 2, as geometry-stage SDS uses."""
    n = F.normalize(interpolate(ctx, vertex_normals(positions, faces), frags.rast, faces), dim=-1, eps=1e-12)
    return _finish(ctx, (n + 1) / 2, frags, faces, background)


def render_lambertian(ctx: RasterContext, frags: Fragments, positions: torch.Tensor, faces: torch.Tensor,
                      light_dir: torch.Tensor, albedo: float = 0.8, ambient: float = 0.3,
                      background: torch.Tensor | None = None) -> torch.Tensor:
    """Grey Lambertian shading with one directional light (unit vector toward the light)."""
    n = F.normalize(interpolate(ctx, vertex_normals(positions, faces), frags.rast, faces), dim=-1, eps=1e-12)
    shade = ambient + (1 - ambient) * (n * light_dir.view(1, 1, 1, 3).to(n)).sum(-1, keepdim=True).clamp(min=0)
    bg = background if background is not None else torch.ones(3)
    return _finish(ctx, (albedo * shade).expand(*shade.shape[:-1], 3), frags, faces, bg)
