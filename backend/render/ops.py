"""The rendering ops, one API over two backends (nvdiffrast's four-op design).

    ctx = RasterContext(device)            # created by the caller; picks the backend
    rast = rasterize(ctx, pos, tri, (H, W)) # (B,H,W,4): u, v, z/w, triangle_id + 1
    attr = interpolate(ctx, vertex_attr, rast, tri)
    color = texture(ctx, tex, uv)           # bilinear, wrap
    color = antialias(ctx, color, rast, pos, tri)  # nvdiffrast only; identity on the torch backend

On CUDA with ``diffrp-nvdiffrast`` installed the ops call nvdiffrast (JIT-compiled on first
use); elsewhere the pure-PyTorch backend (backend/render/torch_raster.py) with the same
semantics. Inputs are checked here, with errors that name the argument.
"""

from __future__ import annotations

from enum import Enum

import torch

from protocol.errors import InvalidInputError
from backend.render import torch_raster


class Backend(str, Enum):
    TORCH = "torch"
    NVDIFFRAST = "nvdiffrast"


class RasterContext:
    """Which backend renders, on which device. ``backend=None`` picks nvdiffrast on CUDA when
    it imports, else torch."""

    def __init__(self, device: torch.device | str = "cpu", backend: Backend | None = None) -> None:
        self.device = torch.device(device)
        if backend is None:
            backend = Backend.NVDIFFRAST if self.device.type == "cuda" and nvdiffrast_available() else Backend.TORCH
        if backend is Backend.NVDIFFRAST:
            if self.device.type != "cuda":
                raise InvalidInputError("backend: nvdiffrast needs a CUDA device", field="backend")
            import nvdiffrast.torch as dr

            self._dr = dr
            self._glctx = dr.RasterizeCudaContext(device=self.device)
        self.backend = backend


def nvdiffrast_available() -> bool:
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:
        return False
    return True


def _check(pos: torch.Tensor, tri: torch.Tensor, resolution) -> None:
    if pos.dim() not in (2, 3) or pos.shape[-1] != 4:
        raise InvalidInputError(f"pos: expected (B,V,4) or (V,4) clip positions, got {tuple(pos.shape)}", field="pos")
    if tri.dim() != 2 or tri.shape[1] != 3:
        raise InvalidInputError(f"tri: expected (F,3) indices, got {tuple(tri.shape)}", field="tri")
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= pos.shape[-2]):
        raise InvalidInputError(f"tri: indices must lie in [0, {pos.shape[-2]}), got [{int(tri.min())}, {int(tri.max())}]", field="tri")
    h, w = resolution
    if not (0 < h <= 8192 and 0 < w <= 8192):
        raise InvalidInputError(f"resolution: {resolution} is outside 1..8192", field="resolution")


def rasterize(ctx: RasterContext, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """pos (B,V,4) clip space, tri (F,3) int32 -> rast (B,H,W,4); see torch_raster.rasterize."""
    _check(pos, tri, resolution)
    if ctx.backend is Backend.NVDIFFRAST:
        rast, _ = ctx._dr.rasterize(ctx._glctx, pos.float().contiguous(), tri.int().contiguous(), tuple(resolution))
        return rast
    return torch_raster.rasterize(pos, tri, tuple(resolution))


def interpolate(ctx: RasterContext, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    if ctx.backend is Backend.NVDIFFRAST:
        out, _ = ctx._dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous())
        return out
    return torch_raster.interpolate(attr, rast, tri)


def texture(ctx: RasterContext, tex: torch.Tensor, uv: torch.Tensor, boundary: str = "wrap") -> torch.Tensor:
    if ctx.backend is Backend.NVDIFFRAST:
        t = tex if tex.dim() == 4 else tex[None]
        return ctx._dr.texture(t.float().contiguous(), uv.float().contiguous(), filter_mode="linear", boundary_mode=boundary)
    return torch_raster.texture(tex, uv, boundary)


def antialias(ctx: RasterContext, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Analytic antialiasing with silhouette gradients (nvdiffrast). The torch backend has no
    equivalent and returns ``color`` unchanged."""
    if ctx.backend is Backend.NVDIFFRAST:
        return ctx._dr.antialias(color.contiguous(), rast, pos.float().contiguous(), tri.int().contiguous())
    return color
