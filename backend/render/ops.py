"""The rendering ops, one API over two backends (nvdiffrast's four-op design).

    ctx = RasterContext(device)                     # created by the caller; picks the backend
    rast = rasterize(ctx, pos, tri, (H, W))          # (B,H,W,4): u, v, z/w, triangle_id + 1
    attr = interpolate(ctx, vertex_attr, rast, tri)
    color = texture(ctx, tex, uv)                    # bilinear, wrap
    color = antialias(ctx, color, rast, pos, tri)    # silhouette gradients to pos

Both backends implement all four with the same semantics: nvdiffrast (``diffrp-nvdiffrast``,
CUDA only, JIT-compiled when its context is built; non-commercial licence) and the pure-PyTorch
rasterizer (backend/render/torch_raster.py and backend/render/antialias.py; CPU or CUDA), which
is the default wherever nvdiffrast cannot run and the choice for commercial use. Inputs are
checked here, with errors that name the argument.
"""

from __future__ import annotations

import logging
import warnings
from enum import Enum

import torch

from protocol.errors import InvalidInputError, require_choice
from backend.render import antialias as torch_antialias
from backend.render import torch_raster

log = logging.getLogger(__name__)


class Backend(str, Enum):
    TORCH = "torch"
    NVDIFFRAST = "nvdiffrast"


class RasterizerUnavailableError(InvalidInputError):
    """The rasterizer asked for cannot run on this machine (nvdiffrast without CUDA, not
    installed, or its JIT build failed); the field is ``rasterizer``."""

    code = "rasterizer_unavailable"


_nvdiffrast_failure: str | None = None  # why nvdiffrast cannot run in this process, once known
_fallback_warned = False


def _nvdiffrast_context(device: torch.device):
    """Import nvdiffrast and build its CUDA context (this is where it JIT-compiles: nvcc and
    ninja must be present). Returns (module, context); raises RasterizerUnavailableError with
    the reason. A failure is remembered, so later contexts do not retry the build."""
    global _nvdiffrast_failure
    if device.type != "cuda":
        raise RasterizerUnavailableError(f"rasterizer: nvdiffrast needs a CUDA device, got {device}; use 'torch'",
                                         field="rasterizer")
    if _nvdiffrast_failure is None:
        try:
            import nvdiffrast.torch as dr  # optional dependency (the `cuda` extra)

            return dr, dr.RasterizeCudaContext(device=device)
        except Exception as exc:  # ImportError, or the compiler's errors surfacing from the JIT build
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            _nvdiffrast_failure = f"{type(exc).__name__}: {first_line}"
    raise RasterizerUnavailableError(f"rasterizer: nvdiffrast cannot run here ({_nvdiffrast_failure}); use 'torch'",
                                     field="rasterizer")


class RasterContext:
    """Which backend renders, on which device. ``backend`` is a :class:`Backend` or its value.

    ``backend=None`` picks nvdiffrast on CUDA when it imports and its context builds, else
    torch; when nvdiffrast is installed but fails to build, the fallback is announced by one
    warning per process. An explicit ``Backend.NVDIFFRAST`` that cannot run raises
    :class:`RasterizerUnavailableError` (field ``rasterizer``)."""

    def __init__(self, device: torch.device | str = "cpu", backend: Backend | str | None = None) -> None:
        global _fallback_warned
        self.device = torch.device(device)
        self._dr = self._glctx = None
        if backend is not None and not isinstance(backend, Backend):
            require_choice(backend, [b.value for b in Backend], "rasterizer")
            backend = Backend(backend)
        if backend is None:
            backend = Backend.TORCH
            if self.device.type == "cuda":
                try:
                    self._dr, self._glctx = _nvdiffrast_context(self.device)
                    backend = Backend.NVDIFFRAST
                except RasterizerUnavailableError:
                    if not nvdiffrast_available():
                        log.info("nvdiffrast is not installed; rendering with the torch rasterizer")
                    elif not _fallback_warned:
                        _fallback_warned = True
                        warnings.warn(f"nvdiffrast cannot run here ({_nvdiffrast_failure}); rendering with the "
                                      "pure-PyTorch rasterizer for this process instead (same semantics; "
                                      "--rasterizer torch chooses it and silences this)", RuntimeWarning, stacklevel=2)
        elif backend is Backend.NVDIFFRAST:
            self._dr, self._glctx = _nvdiffrast_context(self.device)
        self.backend = backend


def nvdiffrast_available() -> bool:
    """Whether nvdiffrast imports (it may still fail to build; RasterContext tells)."""
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


def antialias_topology(ctx: RasterContext, tri: torch.Tensor):
    """The edge adjacency ``antialias`` needs, built once for faces that stay the same
    (an opaque object of the context's backend)."""
    if ctx.backend is Backend.NVDIFFRAST:
        return ctx._dr.antialias_construct_topology_hash(tri.int().contiguous())
    return torch_antialias.edge_topology(tri)


def antialias(ctx: RasterContext, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              topology=None) -> torch.Tensor:
    """Analytic antialiasing (Laine et al. 2020, section 3.4): colours blended across
    silhouette edges by how far the edge crosses between pixel centres, so gradients reach
    ``pos`` through the silhouette as well as ``color``. color (B,H,W,C), rast (B,H,W,4) from
    ``rasterize`` with the same ``pos`` (B,V,4) or (V,4) and tri (F,3); topology from
    ``antialias_topology`` or None. Semantics: backend/render/antialias.py."""
    _check(pos, tri, rast.shape[1:3])
    if color.dim() != 4 or rast.dim() != 4 or rast.shape[-1] != 4 or color.shape[:3] != rast.shape[:3]:
        raise InvalidInputError(f"color: expected (B,H,W,C) matching rast (B,H,W,4), got {tuple(color.shape)} "
                                f"and {tuple(rast.shape)}", field="color")
    if pos.dim() == 3 and pos.shape[0] != rast.shape[0]:
        raise InvalidInputError(f"pos: batch {pos.shape[0]} differs from rast's {rast.shape[0]}", field="pos")
    if ctx.backend is Backend.NVDIFFRAST:
        return ctx._dr.antialias(color.float().contiguous(), rast, pos.float().contiguous(), tri.int().contiguous(),
                                 topology_hash=topology)
    return torch_antialias.antialias(color, rast, pos, tri, topology)
