"""Analytic antialiasing in plain PyTorch: nvdiffrast's ``antialias`` op for the torch backend.

Laine et al. 2020, "Modular Primitives for High-Performance Differentiable Rendering",
section 3.4 (analytic antialiasing). A rasterized image is piecewise constant in the vertex
positions, so it has no gradient at silhouettes. The op blends the two colours of every pair of
horizontally or vertically adjacent pixels that a silhouette edge separates, by how far along the
segment between their centres the edge crosses; that distance moves with the edge's vertices, so
the blended image does too. Semantics, kept identical to nvdiffrast's so the two backends agree:

1. Pairs: each pixel and its neighbour in the next column, and in the next row, whose triangle
   ids differ (background is id 0).
2. The front triangle ``T`` of a pair is the one that is there, or the one with the smaller z/w
   when both are (a tie goes to the second pixel's). Its pixel is ``c``, the other one ``o``.
3. Silhouette edges of ``T``: an edge with no neighbouring triangle (a boundary, or an edge that
   more than two triangles share), or one whose neighbour's far vertex lies on the same side of
   the edge as ``T``'s own in screen space (the two faces fold over each other on screen).
4. In pixels, from ``c``'s centre toward ``o``'s: of the edges of ``T`` that cross the axis
   line, the one that crosses farthest along it (where the ray leaves ``T``), at distance ``t``.
   It counts when it is a silhouette edge, is at least as steep across the axis as along it
   (flatter edges are left to the pairs on the other axis), and ``-1/16 < t < 1 + 1/16``.
5. ``t`` clamped to [0, 1]. ``T`` covers ``1/2 + t`` of ``c``'s footprint along the axis: if
   ``t < 1/2``, ``out[c] += (1/2 - t) (color[o] - color[c])``; else it spills into ``o``:
   ``out[o] += (t - 1/2) (color[c] - color[o])``. Updates read the input colours and add up.

Gradients: the blend is built from differentiable ops on ``color`` and on the two clip-space
vertices of the crossing edge, so autograd gives d/d``color`` and d/d``pos`` (exactly; nvdiffrast
adds 1e-3 px to the edge's extent across the axis, and neither backend passes a gradient to
``rast``). A clamped ``t`` passes no gradient to ``pos``, as in nvdiffrast. The search for pairs,
silhouettes and crossings runs without autograd over whole tensors; only the surviving crossings
(one per silhouette pixel pair) are recomputed with autograd, so the graph stays small.

The one known difference: an edge shared by more than two triangles is a silhouette for all of
them here, whereas nvdiffrast's hash pairs up the first two it happens to insert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.render.torch_raster import screen_coords

# Edge k of a triangle joins corners k+1 and k+2 (mod 3), opposite corner k: for per-corner
# values x (...,3), x.roll(-1, dims=-1) and x.roll(-2, dims=-1) hold edge k's two ends at k.
CROSSING_SLACK = 1.0 / 16  # nvdiffrast's tolerance: crossings this far outside [0, 1] still count


@dataclass(frozen=True)
class EdgeTopology:
    """Which triangle lies across each edge, for the silhouette test; build once per ``tri``
    with :func:`edge_topology` and pass it back in while the faces stay the same.

    opposite: (F,3) long; ``opposite[f, k]`` is the vertex of the neighbouring triangle across
    edge k of triangle f that is not on the edge, or -1 where there is no single neighbour."""

    opposite: torch.Tensor


def edge_topology(tri: torch.Tensor) -> EdgeTopology:
    """Edge adjacency of tri (F,3) int: edges are matched by their two vertex indices (winding
    ignored); an edge that exactly two triangles share links them, any other gets -1."""
    t = tri.long()
    n_faces = t.shape[0]
    if n_faces == 0:
        return EdgeTopology(torch.empty(0, 3, dtype=torch.long, device=tri.device))
    a, b = t.roll(-1, dims=1), t.roll(-2, dims=1)  # edge k's ends
    key = (torch.minimum(a, b) * (int(t.max()) + 1) + torch.maximum(a, b)).reshape(-1)
    degenerate = ((t[:, 0] == t[:, 1]) | (t[:, 1] == t[:, 2]) | (t[:, 2] == t[:, 0])).repeat_interleave(3)
    # a degenerate triangle's edges get unique negative keys, so they never pair
    key = torch.where(degenerate, -1 - torch.arange(key.numel(), device=key.device), key)
    sorted_key, order = torch.sort(key)
    same = sorted_key[1:] == sorted_key[:-1]  # (3F-1,): entries i and i+1 are the same edge
    no = torch.zeros(1, dtype=torch.bool, device=key.device)
    i = torch.nonzero(same & ~torch.cat([no, same[:-1]]) & ~torch.cat([same[1:], no])).squeeze(1)  # runs of two
    first, second = order.index_select(0, i), order.index_select(0, i + 1)
    flat = t.reshape(-1)  # the corner opposite edge k of f is t[f, k] itself
    opposite = torch.full_like(flat, -1)
    opposite.index_copy_(0, first, flat.index_select(0, second))
    opposite.index_copy_(0, second, flat.index_select(0, first))
    return EdgeTopology(opposite.view(n_faces, 3))


def _cross(ax, ay, bx, by, cx, cy):
    """Twice the signed area of triangles (a, b, c), elementwise."""
    return (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)


def _silhouette_edges(xy: torch.Tensor, tri: torch.Tensor, opposite: torch.Tensor) -> torch.Tensor:
    """(B*F,3) bool: edge k of triangle f is a silhouette in view b (row b*F + f).
    xy (B,V,2) pixel coordinates; tri, opposite (F,3) long."""
    batch, n_verts, _ = xy.shape
    offset = (torch.arange(batch, device=xy.device) * n_verts).view(batch, 1, 1)
    flat = xy.reshape(-1, 2)
    v = flat.index_select(0, (offset + tri).reshape(-1)).view(-1, 3, 2)  # (B*F,3,2)
    o = flat.index_select(0, (offset + opposite.clamp(min=0)).reshape(-1)).view(-1, 3, 2)  # junk where -1
    x, y = v[..., 0], v[..., 1]
    own = _cross(x[:, 0], y[:, 0], x[:, 1], y[:, 1], x[:, 2], y[:, 2])  # (B*F,)
    # the triangle with corner k moved to the neighbour's far vertex; corner order (k, k+1, k+2)
    # is a rotation of (0, 1, 2), so its sign is comparable with own's
    x1, y1, x2, y2 = x.roll(-1, dims=1), y.roll(-1, dims=1), x.roll(-2, dims=1), y.roll(-2, dims=1)
    wing = _cross(o[..., 0], o[..., 1], x1, y1, x2, y2)  # (B*F,3)
    same_side = torch.signbit(wing) == torch.signbit(own)[:, None]
    return same_side | (opposite < 0).repeat(batch, 1)


def _pairs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (N,) of the first pixel of each differing pair and its axis (N,) bool:
    False = the next column, True = the next row. ids (B,H,W)."""
    batch, height, width = ids.shape
    index = torch.arange(batch * height * width, device=ids.device).view(batch, height, width)
    across = index[:, :, :-1][ids[:, :, 1:] != ids[:, :, :-1]]
    down = index[:, :-1, :][ids[:, 1:, :] != ids[:, :-1, :]]
    axis = torch.cat([torch.zeros_like(across, dtype=torch.bool), torch.ones_like(down, dtype=torch.bool)])
    return torch.cat([across, down]), axis


def antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              topology: EdgeTopology | None = None) -> torch.Tensor:
    """Blend colours across silhouette edges (the semantics are in this module's docstring).

    color (B,H,W,C) float; rast (B,H,W,4) from the rasterizer, same B, H, W; pos (B,V,4) or
    (V,4) clip-space positions that made ``rast`` (V,4: shared by every image); tri (F,3) int;
    topology from :func:`edge_topology` (built here when None). Returns (B,H,W,C) in
    ``color``'s dtype, differentiable w.r.t. ``color`` and ``pos``."""
    batch, height, width, channels = color.shape
    if pos.dim() == 2:
        pos = pos[None].expand(batch, *pos.shape)
    tri = tri.long()
    if topology is None:
        topology = edge_topology(tri)
    with torch.no_grad():
        crossing = _find_crossings(rast, pos.detach(), tri, topology.opposite)
    if crossing is None:
        return color.clone()
    vertex, c, o, sign, vertical = crossing
    # the crossing again, with autograd, from the edge's two clip-space vertices
    clip = pos.reshape(-1, 4).index_select(0, vertex.reshape(-1)).view(-1, 2, 4)  # (N,2,4)
    cx = (c % width).to(pos.dtype) + 0.5
    cy = (torch.div(c, width, rounding_mode="floor") % height).to(pos.dtype) + 0.5
    x = (clip[..., 0] / clip[..., 3] + 1) * (0.5 * width) - cx[:, None]  # (N,2) relative to c's centre
    y = (clip[..., 1] / clip[..., 3] + 1) * (0.5 * height) - cy[:, None]
    along, across = torch.where(vertical[:, None], y, x), torch.where(vertical[:, None], x, y)
    t = sign * (along[:, 0] * across[:, 1] - across[:, 0] * along[:, 1]) / (across[:, 1] - across[:, 0])
    t = t.clamp(0.0, 1.0).to(color.dtype)
    inside = t < 0.5  # the edge stays in c's footprint: c is blended toward o; else o toward c
    target = torch.where(inside, c, o)
    source = torch.where(inside, o, c)
    weight = torch.where(inside, 0.5 - t, t - 0.5)
    flat = color.reshape(-1, channels)
    delta = weight[:, None] * (flat.index_select(0, source) - flat.index_select(0, target))
    return flat.index_add(0, target, delta).view_as(color)


def _find_crossings(rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor, opposite: torch.Tensor):
    """Steps 1-4 without autograd. Per surviving pair: the crossing edge's two vertices as rows
    of pos.reshape(-1, 4) (N,2), flat pixel indices c (front) and o (other), sign (+1. when o
    is the next pixel along the axis, else -1.; pos's dtype) and vertical (the pair is a
    column pair); None when no pair survives."""
    batch, height, width, _ = rast.shape
    n_faces, n_verts = tri.shape[0], pos.shape[1]
    ids = rast[..., 3].long()  # triangle id + 1
    first, vertical = _pairs(ids)
    if first.numel() == 0:
        return None
    second = first + torch.where(vertical, width, 1)
    ids_flat, z_flat = ids.reshape(-1), rast[..., 2].reshape(-1)
    id0, id1 = ids_flat.index_select(0, first), ids_flat.index_select(0, second)
    front_is_first = (id0 > 0) & ((id1 == 0) | (z_flat.index_select(0, first) < z_flat.index_select(0, second)))
    f = torch.where(front_is_first, id0, id1) - 1
    view = torch.div(first, height * width, rounding_mode="floor")

    xy, _ = screen_coords(pos.reshape(-1, 4), width, height)
    silhouette = _silhouette_edges(xy.view(batch, n_verts, 2), tri, opposite)  # (B*F,3)
    sil = silhouette.index_select(0, view * n_faces + f)  # (N,3)
    keep = torch.nonzero(sil.any(dim=1)).squeeze(1)  # pairs whose front triangle has a silhouette edge
    if keep.numel() == 0:
        return None
    first, second, vertical, front_is_first, f, view, sil = (
        a.index_select(0, keep) for a in (first, second, vertical, front_is_first, f, view, sil))
    c = torch.where(front_is_first, first, second)
    o = torch.where(front_is_first, second, first)
    sign = torch.where(front_is_first, 1.0, -1.0).to(pos.dtype)

    corner = (view * n_verts)[:, None] + tri.index_select(0, f)  # (N,3) rows of the flattened vertices
    v = xy.index_select(0, corner.reshape(-1)).view(-1, 3, 2)  # (N,3,2) pixel coordinates of T's corners
    cx = (c % width).to(v.dtype) + 0.5
    cy = (torch.div(c, width, rounding_mode="floor") % height).to(v.dtype) + 0.5
    rel_x, rel_y = v[..., 0] - cx[:, None], v[..., 1] - cy[:, None]
    along = torch.where(vertical[:, None], rel_y, rel_x)  # (N,3) per corner
    across = torch.where(vertical[:, None], rel_x, rel_y)
    ua, wa = along.roll(-1, dims=1), across.roll(-1, dims=1)  # edge k runs from corner k+1 ...
    ub, wb = along.roll(-2, dims=1), across.roll(-2, dims=1)  # ... to corner k+2
    straddles = torch.signbit(wa) != torch.signbit(wb)
    dw = wb - wa
    t = sign[:, None] * (ua * wb - wa * ub) / torch.where(straddles, dw, torch.ones_like(dw))
    t = torch.where(straddles, t, torch.full_like(t, -torch.inf))
    t_k, k = t.max(dim=1)  # where the ray from c's centre leaves T
    steep = dw.abs() >= (ub - ua).abs()
    counts = (sil & steep).gather(1, k[:, None]).squeeze(1) & (t_k > -CROSSING_SLACK) & (t_k < 1 + CROSSING_SLACK)
    hit = torch.nonzero(counts).squeeze(1)
    if hit.numel() == 0:
        return None
    k, corner = k.index_select(0, hit), corner.index_select(0, hit)
    vertex = torch.stack([corner.gather(1, ((k + 1) % 3)[:, None]), corner.gather(1, ((k + 2) % 3)[:, None])], dim=1)
    return vertex.view(-1, 2), c.index_select(0, hit), o.index_select(0, hit), sign.index_select(0, hit), \
        vertical.index_select(0, hit)
