"""The pure-PyTorch rasterizer: nvdiffrast's semantics on any device, the reference on CPU.

Conventions are nvdiffrast's (so the two backends are interchangeable and comparable):
clip-space positions (B,V,4); pixel (x, y) covers NDC ``[-1 + 2x/W, -1 + 2(x+1)/W]`` with
row 0 at NDC y = -1 (OpenGL: the image is bottom-up; flip rows for PNG order); the raster
output is (B,H,W,4) = (u, v, z/w, triangle_id + 1) with 0 in the last channel where no
triangle covers the pixel centre, and ``interpolate`` computes ``u a0 + v a1 + (1-u-v) a2``
with perspective-correct (u, v). No face culling; depth test keeps the smallest z/w.

Differences from nvdiffrast: triangles with a vertex behind the camera (w <= 0) are skipped
rather than clipped; there is no ``antialias`` (so no silhouette gradients on this backend).

How it stays vectorised: triangles are binned into square tiles of the screen by their
bounding boxes; every (triangle, tile) pair expands to the tile's pixels; edge functions,
depth and a scatter-min z-buffer then run as whole-tensor operations. The selection is done
without autograd; (u, v, z/w) of the winning triangle are then recomputed from ``pos`` with
autograd, so gradients reach the vertex positions.
"""

from __future__ import annotations

import torch

TILE = 4  # pixels per tile side; small tiles waste less work on small triangles
MAX_CANDIDATES = 1 << 23  # (triangle, pixel) pairs evaluated at once; bounds memory


def screen_coords(pos: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (V,4) -> pixel-space (V,2) (x right, y up from row 0) and NDC depth z/w (V,)."""
    w = pos[:, 3:4]
    ndc = pos[:, :3] / w
    xy = torch.stack([(ndc[:, 0] + 1) * 0.5 * width, (ndc[:, 1] + 1) * 0.5 * height], dim=-1)
    return xy, ndc[:, 2]


def _visible_triangle_ids(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int, tile: int) -> torch.Tensor:
    """For one view: the id of the nearest triangle at each pixel centre, -1 where none. (H*W,) long."""
    device = pos.device
    xy, z = screen_coords(pos, width, height)
    v = xy[tri]  # (F,3,2)
    vz = z[tri]  # (F,3)
    in_front = (pos[:, 3] > 0)[tri].all(dim=1)
    area = (v[:, 1, 0] - v[:, 0, 0]) * (v[:, 2, 1] - v[:, 0, 1]) - (v[:, 1, 1] - v[:, 0, 1]) * (v[:, 2, 0] - v[:, 0, 0])
    # pixel index ranges whose centres (i + 0.5) fall inside the bounding box
    lo = torch.ceil(v.amin(dim=1) - 0.5).long()
    hi = torch.floor(v.amax(dim=1) - 0.5).long()
    lo[:, 0].clamp_(min=0), lo[:, 1].clamp_(min=0)
    hi[:, 0].clamp_(max=width - 1), hi[:, 1].clamp_(max=height - 1)
    keep = in_front & (area.abs() > 1e-12) & (hi[:, 0] >= lo[:, 0]) & (hi[:, 1] >= lo[:, 1]) \
        & (vz.amax(dim=1) >= -1) & (vz.amin(dim=1) <= 1)
    ids = torch.nonzero(keep).squeeze(1)

    best_depth = torch.full((height * width,), float("inf"), device=device)
    best_id = torch.full((height * width,), -1, dtype=torch.long, device=device)
    if ids.numel() == 0:
        return best_id
    t_lo, t_hi = lo[ids] // tile, hi[ids] // tile
    n_tiles = (t_hi - t_lo + 1).prod(dim=1)
    per_tri = n_tiles * tile * tile
    csum = torch.cumsum(per_tri, 0)
    cand_pix, cand_depth, cand_tri = [], [], []
    start = 0
    while start < len(ids):  # chunks of triangles whose candidate pixels fit the budget
        base = int(csum[start - 1]) if start else 0
        end = max(start + 1, int(torch.searchsorted(csum, torch.tensor(base + MAX_CANDIDATES, device=device), right=True)))
        sel = slice(start, end)
        start = end
        f = ids[sel]
        nt = n_tiles[sel]
        ntx = (t_hi[sel, 0] - t_lo[sel, 0] + 1)
        owner = torch.repeat_interleave(torch.arange(len(f), device=device), nt)
        k = torch.arange(int(nt.sum()), device=device) - torch.repeat_interleave(torch.cumsum(nt, 0) - nt, nt)
        tx = t_lo[sel, 0][owner] + k % ntx[owner]
        ty = t_lo[sel, 1][owner] + k // ntx[owner]
        j = torch.arange(tile * tile, device=device)
        px = (tx[:, None] * tile + j % tile).reshape(-1)
        py = (ty[:, None] * tile + j // tile).reshape(-1)
        owner = owner.repeat_interleave(tile * tile)
        fo = f[owner]
        inside_box = (px >= lo[fo, 0]) & (px <= hi[fo, 0]) & (py >= lo[fo, 1]) & (py <= hi[fo, 1])
        px, py, fo = px[inside_box], py[inside_box], fo[inside_box]
        bary = _screen_barycentrics(v[fo], px.to(v.dtype) + 0.5, py.to(v.dtype) + 0.5, area[fo])
        depth = (bary * vz[fo]).sum(dim=1)
        inside = (bary >= 0).all(dim=1) & (depth >= -1) & (depth <= 1)
        cand_pix.append(py[inside] * width + px[inside])
        cand_depth.append(depth[inside])
        cand_tri.append(fo[inside])
    pix, depth, tri_id = torch.cat(cand_pix), torch.cat(cand_depth), torch.cat(cand_tri)
    best_depth.scatter_reduce_(0, pix, depth, reduce="amin")
    nearest = depth <= best_depth[pix]
    best_id.scatter_reduce_(0, pix[nearest], tri_id[nearest], reduce="amax", include_self=True)
    # ties (shared edges at equal depth) go to the highest id, deterministically
    return best_id


def _screen_barycentrics(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics (N,3) of points (x, y) in triangles v (N,3,2) with signed areas (N,)."""
    def edge(a, b):
        return (b[:, 0] - a[:, 0]) * (y - a[:, 1]) - (b[:, 1] - a[:, 1]) * (x - a[:, 0])

    w0 = edge(v[:, 1], v[:, 2])
    w1 = edge(v[:, 2], v[:, 0])
    w2 = edge(v[:, 0], v[:, 1])
    return torch.stack([w0, w1, w2], dim=1) / area[:, None]


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int], tile: int = TILE) -> torch.Tensor:
    """Rasterize clip-space triangles.

    pos: (B,V,4) or (V,4) float clip-space positions (differentiable); tri: (F,3) int vertex
    indices; resolution: (H, W). Returns (B,H,W,4) float32: perspective-correct barycentrics
    (u, v) of vertices 0 and 1, z/w, and triangle_id + 1 (0 = background). u, v and z/w are
    differentiable w.r.t. ``pos``; the triangle id is not."""
    if pos.dim() == 2:
        pos = pos[None]
    height, width = resolution
    tri = tri.long()
    out = []
    for b in range(pos.shape[0]):
        p = pos[b]
        with torch.no_grad():
            ids = _visible_triangle_ids(p.detach().float(), tri, height, width, tile)
        covered = ids >= 0
        pix = torch.nonzero(covered).squeeze(1)
        f = ids[pix]
        xy, _ = screen_coords(p, width, height)
        v = xy[tri[f]]  # (N,3,2) with grad
        clip_w = p[:, 3][tri[f]]  # (N,3)
        clip_z = p[:, 2][tri[f]]
        area = (v[:, 1, 0] - v[:, 0, 0]) * (v[:, 2, 1] - v[:, 0, 1]) - (v[:, 1, 1] - v[:, 0, 1]) * (v[:, 2, 0] - v[:, 0, 0])
        px = (pix % width).to(p.dtype) + 0.5
        py = torch.div(pix, width, rounding_mode="floor").to(p.dtype) + 0.5
        lam = _screen_barycentrics(v, px, py, area)
        persp = lam / clip_w
        bary = persp / persp.sum(dim=1, keepdim=True)
        zw = (lam * clip_z / clip_w).sum(dim=1)
        values = torch.stack([bary[:, 0], bary[:, 1], zw, (f + 1).to(p.dtype)], dim=1)
        image = torch.zeros(height * width, 4, dtype=p.dtype, device=p.device)
        image = image.index_put((pix,), values)
        out.append(image.view(height, width, 4))
    return torch.stack(out)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes: attr (V,C) or (B,V,C), rast (B,H,W,4), tri (F,3) ->
    (B,H,W,C) = u a0 + v a1 + (1-u-v) a2, zero on background. Differentiable w.r.t. attr and rast."""
    batch, height, width, _ = rast.shape
    if attr.dim() == 2:
        attr = attr[None].expand(batch, *attr.shape)
    tri_id = rast[..., 3].long() - 1  # (B,H,W)
    covered = tri_id >= 0
    corners = tri.long()[tri_id.clamp(min=0)]  # (B,H,W,3)
    bidx = torch.arange(batch, device=rast.device).view(batch, 1, 1, 1).expand_as(corners)
    a = attr[bidx, corners]  # (B,H,W,3,C)
    u, v = rast[..., 0:1], rast[..., 1:2]
    out = u * a[..., 0, :] + v * a[..., 1, :] + (1 - u - v) * a[..., 2, :]
    return out * covered[..., None].to(out.dtype)


def texture(tex: torch.Tensor, uv: torch.Tensor, boundary: str = "wrap") -> torch.Tensor:
    """Bilinear texture lookup. tex (B,Ht,Wt,C) or (Ht,Wt,C), uv (B,H,W,2) -> (B,H,W,C).

    uv = (0, 0) is the corner of texel [0, 0] (the first row in memory: the top row of a PNG,
    glTF's UV origin); u runs along the width. ``boundary`` 'wrap' repeats (glTF's default
    sampler), 'clamp' clamps to the edge. Differentiable w.r.t. tex and uv."""
    if tex.dim() == 3:
        tex = tex[None]
    if tex.shape[0] != uv.shape[0]:
        tex = tex.expand(uv.shape[0], *tex.shape[1:])
    t = tex.permute(0, 3, 1, 2)  # (B,C,Ht,Wt)
    if boundary == "wrap":
        # one wrapped texel on each side, then sample the padded texture with clamped coords
        t = torch.cat([t[..., -1:, :], t, t[..., :1, :]], dim=-2)
        t = torch.cat([t[..., -1:], t, t[..., :1]], dim=-1)
        ht, wt = tex.shape[1], tex.shape[2]
        uv = torch.remainder(uv, 1.0)
        uv = torch.stack([(uv[..., 0] * wt + 1) / (wt + 2), (uv[..., 1] * ht + 1) / (ht + 2)], dim=-1)
    elif boundary != "clamp":
        raise ValueError(f"boundary must be 'wrap' or 'clamp', got {boundary!r}")
    grid = uv * 2 - 1  # grid_sample: -1 is the outer edge of the first texel (align_corners=False)
    out = torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)
