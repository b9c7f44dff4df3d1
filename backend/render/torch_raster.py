"""The pure-PyTorch rasterizer: nvdiffrast's semantics on any device, the reference on CPU.

Conventions are nvdiffrast's (so the two backends are interchangeable and comparable):
clip-space positions (B,V,4); pixel (x, y) covers NDC ``[-1 + 2x/W, -1 + 2(x+1)/W]`` with
row 0 at NDC y = -1 (OpenGL: the image is bottom-up; flip rows for PNG order); the raster
output is (B,H,W,4) = (u, v, z/w, triangle_id + 1) with 0 in the last channel where no
triangle covers the pixel centre, and ``interpolate`` computes ``u a0 + v a1 + (1-u-v) a2``
with perspective-correct (u, v). No face culling; depth test keeps the smallest z/w.
Analytic antialiasing, the op that gives silhouette gradients, is backend/render/antialias.py.

Differences from nvdiffrast: triangles with a vertex behind the camera (w <= 0) are skipped
rather than clipped; ties at equal depth go to the highest triangle id.

How it stays vectorised: every triangle expands to the pixels of its bounding box (in chunks
that bound memory); barycentrics and z/w are planes in screen space, evaluated per candidate
pixel, and one scatter-min over a key that packs depth and id keeps the nearest. That
selection runs without autograd; (u, v, z/w) of the winning triangle are then recomputed
from ``pos`` with autograd for the covered pixels only, so gradients reach the vertex positions.
"""

from __future__ import annotations

import torch

MAX_CANDIDATES = 1 << 22  # (triangle, pixel) pairs evaluated at once: about 0.5 GB at the peak


def screen_coords(pos: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip (V,4) -> pixel-space (V,2) (x right, y up from row 0) and NDC depth z/w (V,)."""
    w = pos[:, 3:4]
    ndc = pos[:, :3] / w
    xy = torch.stack([(ndc[:, 0] + 1) * 0.5 * width, (ndc[:, 1] + 1) * 0.5 * height], dim=-1)
    return xy, ndc[:, 2]


def _visible_triangle_ids(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """For one view: the id of the nearest triangle at each pixel centre, -1 where none. (H*W,) long.

    pos (V,4) float32 clip positions, no autograd; tri (F,3) long."""
    device = pos.device
    none = torch.full((height * width,), -1, dtype=torch.long, device=device)
    xy, z = screen_coords(pos, width, height)
    corners = tri.reshape(-1)
    v = xy.index_select(0, corners).view(-1, 3, 2)  # (F,3,2)
    vz = z.index_select(0, corners).view(-1, 3)
    lo = torch.ceil(v.amin(dim=1) - 0.5).clamp(min=0)  # first and last pixel whose centre is in the box
    hi = torch.minimum(torch.floor(v.amax(dim=1) - 0.5), torch.tensor([width - 1.0, height - 1.0], device=device))
    span = (hi - lo + 1).nan_to_num(0.0)  # (F,2) pixels per axis
    in_front = (pos[:, 3] > 0).index_select(0, corners).view(-1, 3).all(dim=1)
    keep = in_front & (span[:, 0] > 0) & (span[:, 1] > 0) & (vz.amax(dim=1) >= -1) & (vz.amin(dim=1) <= 1)
    ids = torch.nonzero(keep).squeeze(1)
    if ids.numel() == 0:
        return none
    lo, span, vz = lo[ids], span[ids], vz[ids]
    e = v[ids] - lo[:, None, :]  # corners relative to the box's first pixel corner
    # edge functions w_k(x, y) = a_k x + b_k y + c_k of the edge opposite corner k, over twice the
    # signed area, are the barycentrics; z/w is linear in screen space too: one plane each
    i, j = [1, 2, 0], [2, 0, 1]
    a = e[:, i, 1] - e[:, j, 1]
    b = e[:, j, 0] - e[:, i, 0]
    c = e[:, i, 0] * e[:, j, 1] - e[:, j, 0] * e[:, i, 1]
    area = c.sum(dim=1, keepdim=True)
    good = torch.nonzero(area.squeeze(1).abs() > 1e-12).squeeze(1)  # drop degenerate triangles
    ids, lo, span = ids[good], lo[good].long(), span[good].long()
    a, b, c, vz = a[good] / area[good], b[good] / area[good], c[good] / area[good], vz[good]
    planes = torch.cat([a, b, c, (a * vz).sum(1, keepdim=True), (b * vz).sum(1, keepdim=True),
                        (c * vz).sum(1, keepdim=True)], dim=1)  # (N,12): bary x, y, 1; depth x, y, 1
    count = span[:, 0] * span[:, 1]
    csum = torch.cumsum(count, 0)
    best = torch.full((height * width,), _NO_HIT, dtype=torch.long, device=device)
    start = 0
    while start < len(ids):  # chunks of triangles whose candidate pixels fit the budget
        base = int(csum[start - 1]) if start else 0
        end = max(start + 1, int(torch.searchsorted(csum, torch.tensor(base + MAX_CANDIDATES, device=device), right=True)))
        n = count[start:end]
        owner = torch.repeat_interleave(torch.arange(start, end, device=device), n)
        k = torch.arange(int(csum[end - 1]) - base, device=device) - (csum[start:end] - n - base).repeat_interleave(n)
        start = end
        nx = span[:, 0].index_select(0, owner)
        dy = torch.div(k, nx, rounding_mode="floor")
        dx = k - dy * nx
        p = planes.index_select(0, owner)
        x, y = dx.to(p.dtype) + 0.5, dy.to(p.dtype) + 0.5
        w0 = p[:, 0] * x + p[:, 3] * y + p[:, 6]
        w1 = p[:, 1] * x + p[:, 4] * y + p[:, 7]
        w2 = p[:, 2] * x + p[:, 5] * y + p[:, 8]
        depth = p[:, 9] * x + p[:, 10] * y + p[:, 11]
        hit = torch.nonzero((w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (depth >= -1) & (depth <= 1)).squeeze(1)
        owner, origin = owner[hit], lo.index_select(0, owner[hit])
        pix = (origin[:, 1] + dy[hit]) * width + origin[:, 0] + dx[hit]
        best.scatter_reduce_(0, pix, _depth_id_key(depth[hit], ids.index_select(0, owner)), reduce="amin")
    # the smallest key holds the nearest depth; ties (shared edges at equal depth) go to the highest id
    return torch.where(best == _NO_HIT, none, _ID_MASK - (best & _ID_MASK))


_ID_MASK = 0xFFFFFFFF
_NO_HIT = torch.iinfo(torch.long).max


def _depth_id_key(depth: torch.Tensor, tri_id: torch.Tensor) -> torch.Tensor:
    """One int64 per candidate that orders by float32 depth, then by descending triangle id."""
    bits = depth.float().contiguous().view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # integer order = float order
    return ordered * (1 << 32) + (_ID_MASK - tri_id)


def _screen_barycentrics(v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics (N,3) of points (x, y) in triangles v (N,3,2) with signed areas (N,)."""
    def edge(a, b):
        return (b[:, 0] - a[:, 0]) * (y - a[:, 1]) - (b[:, 1] - a[:, 1]) * (x - a[:, 0])

    w0 = edge(v[:, 1], v[:, 2])
    w1 = edge(v[:, 2], v[:, 0])
    w2 = edge(v[:, 0], v[:, 1])
    return torch.stack([w0, w1, w2], dim=1) / area[:, None]


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """Rasterize clip-space triangles.

    pos: (B,V,4) or (V,4) float clip-space positions (differentiable); tri: (F,3) int vertex
    indices; resolution: (H, W). Returns (B,H,W,4) in pos's dtype: perspective-correct barycentrics
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
            ids = _visible_triangle_ids(p.detach().float(), tri, height, width)
        pix = torch.nonzero(ids >= 0).squeeze(1)
        f = ids.index_select(0, pix)
        corner = tri.index_select(0, f).reshape(-1)  # (3N,) vertex ids of each covered pixel's triangle
        xy, _ = screen_coords(p, width, height)
        v = xy.index_select(0, corner).view(-1, 3, 2)  # (N,3,2) with grad
        clip = p.index_select(0, corner).view(-1, 3, 4)
        clip_z, clip_w = clip[..., 2], clip[..., 3]
        area = (v[:, 1, 0] - v[:, 0, 0]) * (v[:, 2, 1] - v[:, 0, 1]) - (v[:, 1, 1] - v[:, 0, 1]) * (v[:, 2, 0] - v[:, 0, 0])
        px = (pix % width).to(p.dtype) + 0.5
        py = torch.div(pix, width, rounding_mode="floor").to(p.dtype) + 0.5
        lam = _screen_barycentrics(v, px, py, area)
        persp = lam / clip_w
        bary = persp / persp.sum(dim=1, keepdim=True)
        zw = (lam * clip_z / clip_w).sum(dim=1)
        values = torch.stack([bary[:, 0], bary[:, 1], zw, (f + 1).to(p.dtype)], dim=1)
        image = torch.zeros(height * width, 4, dtype=p.dtype, device=p.device).index_copy(0, pix, values)
        out.append(image.view(height, width, 4))
    return torch.stack(out)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate per-vertex attributes: attr (V,C) or (B,V,C), rast (B,H,W,4), tri (F,3) ->
    (B,H,W,C) = u a0 + v a1 + (1-u-v) a2, zero on background. Differentiable w.r.t. attr and rast."""
    batch, height, width, _ = rast.shape
    channels = attr.shape[-1]
    flat = rast.reshape(-1, 4)
    pix = torch.nonzero(flat[:, 3] > 0).squeeze(1)
    hits = flat.index_select(0, pix)  # (N,4)
    corner = tri.long().index_select(0, hits[:, 3].long() - 1)  # (N,3)
    if attr.dim() == 3 and attr.shape[0] > 1:  # one attribute set per image: offset into the flattened batch
        view = torch.div(pix, height * width, rounding_mode="floor")
        corner = corner + (view * attr.shape[1])[:, None]
    a = attr.reshape(-1, channels).index_select(0, corner.reshape(-1)).view(-1, 3, channels)
    u, v = hits[:, 0:1], hits[:, 1:2]
    values = u * a[:, 0] + v * a[:, 1] + (1 - u - v) * a[:, 2]
    out = torch.zeros(batch * height * width, channels, dtype=values.dtype, device=values.device)
    return out.index_copy(0, pix, values).view(batch, height, width, channels)


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
