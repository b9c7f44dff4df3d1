"""DMTet (Shen et al. 2021): a deformable tetrahedral grid with a signed distance per vertex,
turned into a triangle mesh by differentiable marching tetrahedra.

The grid is our own: the cube [-1, 1]^3 split into res^3 cells, each cell into six tetrahedra
around its main diagonal (the Freudenthal / Kuhn triangulation), which conforms across cells.
Sign convention: sdf < 0 inside. Extracted vertices lie on edges whose endpoints differ in
sign, at the zero crossing of the linear interpolation, so their positions are differentiable
w.r.t. both the sdf values and the (deformed) grid positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import permutations

import torch

# The six tetrahedra of a unit cell, as corner indices (corner = x + 2y + 4z): one per
# permutation of the axes, each walking 0 -> 7 along the cube's edges.
_AXIS_BITS = (1, 2, 4)
CELL_TETS = tuple(
    (0, order[0], order[0] + order[1], 7) for order in (tuple(_AXIS_BITS[a] for a in p) for p in permutations(range(3)))
)
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _corner_xyz(corner: int) -> tuple[int, int, int]:
    return corner & 1, corner >> 1 & 1, corner >> 2 & 1


# Every edge of the triangulation joins two lattice points one of these (dx, dy, dz) apart (the
# three axes, the three face diagonals and the main diagonal), lower index first: the
# differences between the corners of CELL_TETS' edges. Every lattice pair that far apart is an
# edge (the cells tile the cube and each cell's faces are split the same way on both sides).
GRID_EDGE_STEPS = tuple(sorted({
    tuple(b - a for a, b in zip(_corner_xyz(tet[i]), _corner_xyz(tet[j]))) for tet in CELL_TETS for i, j in TET_EDGES
}))


def _triangle_table() -> torch.Tensor:
    """For each of the 16 inside/outside cases of a tet (bit i = vertex i inside), up to two
    triangles as indices into TET_EDGES (-1 = none). Orientation is fixed at extraction time."""
    edge_of = {frozenset(e): i for i, e in enumerate(TET_EDGES)}
    table = torch.full((16, 6), -1, dtype=torch.long)
    for case in range(1, 15):
        inside = [v for v in range(4) if case >> v & 1]
        outside = [v for v in range(4) if not case >> v & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tri = [edge_of[frozenset((lone, o))] for o in others]
            table[case, :3] = torch.tensor(tri)
        else:
            (a, b), (c, d) = inside, outside
            ac, ad, bd, bc = (edge_of[frozenset(e)] for e in ((a, c), (a, d), (b, d), (b, c)))
            table[case] = torch.tensor([ac, ad, bd, ac, bd, bc])
    return table


TRIANGLE_TABLE = _triangle_table()


@dataclass
class TetGrid:
    vertices: torch.Tensor  # (V,3) float32 in [-1, 1]^3
    tets: torch.Tensor  # (T,4) long
    resolution: int

    @classmethod
    def cube(cls, resolution: int, device: torch.device | str = "cpu") -> "TetGrid":
        r = resolution
        axis = torch.linspace(-1, 1, r + 1, device=device)
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
        vertices = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
        idx = torch.arange(r, device=device)
        cz, cy, cx = torch.meshgrid(idx, idx, idx, indexing="ij")
        base = (cz * (r + 1) + cy) * (r + 1) + cx  # (r,r,r) index of each cell's corner 0
        offsets = torch.tensor([(c >> 2 & 1) * (r + 1) ** 2 + (c >> 1 & 1) * (r + 1) + (c & 1) for c in range(8)], device=device)
        corners = base.reshape(-1, 1) + offsets  # (cells, 8)
        tets = corners[:, torch.tensor(CELL_TETS, device=device)].reshape(-1, 4)
        return cls(vertices, tets, r)

    @cached_property
    def edges(self) -> torch.Tensor:
        """Every edge of the grid once: (E,2) long on the tets' device, each row (lower vertex
        index, higher), rows in lexicographic order, as ``torch.unique`` over all tet edges gives
        them. Built from the lattice (no sort, no unique) on first use, then kept: at grid 128
        E is 14.8 M, and deduplicating the tets' 75 M edges took about a minute per call on two
        CPU cores. Assumes the vertices and tets are laid out as :meth:`cube` lays them out."""
        return grid_edges(self.resolution, self.tets.device)


def grid_edges(resolution: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unique edges (E,2) of :meth:`TetGrid.cube`'s grid at ``resolution`` (see
    :attr:`TetGrid.edges`). E = 3 r (r+1)^2 + 3 r^2 (r+1) + r^3."""
    n = resolution + 1
    steps = torch.tensor(GRID_EDGE_STEPS, device=device)  # (7,3)
    offsets = steps[:, 0] + steps[:, 1] * n + steps[:, 2] * n * n
    order = torch.argsort(offsets)  # for each start vertex, its edges in ascending end index
    steps, offsets = steps[order], offsets[order]
    idx = torch.arange(n, device=device)
    fits = [idx.view(-1, 1) + steps[:, a] < n for a in range(3)]  # (n,7) per axis: far end in the grid
    inside = fits[2].view(n, 1, 1, -1) & fits[1].view(1, n, 1, -1) & fits[0].view(1, 1, n, -1)  # (z,y,x,7)
    start, k = inside.reshape(-1, steps.shape[0]).nonzero(as_tuple=True)  # row-major: lexicographic
    return torch.stack([start, start + offsets[k]]).T  # a view of (2,E): each column contiguous, for fast gathers


def marching_tets(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the zero level set. vertices (V,3), tets (T,4), sdf (V,) -> (positions (M,3), faces (F,3) long).

    Faces are wound counter-clockwise seen from outside (normals point toward sdf > 0)."""
    device = vertices.device
    inside = sdf < 0
    # the tets the surface passes through (a flat uint8 gather: the grid has millions of tets)
    occ = inside.view(torch.uint8).index_select(0, tets.reshape(-1)).view(-1, 4)  # (T,4)
    count = occ.sum(1, dtype=torch.uint8)
    valid = ((count > 0) & (count < 4)).nonzero().squeeze(1)
    tets, occ = tets.index_select(0, valid), occ.index_select(0, valid).bool()
    if tets.shape[0] == 0:
        return vertices.new_zeros((0, 3)), torch.zeros((0, 3), dtype=torch.long, device=device)
    case = (occ.long() * torch.tensor([1, 2, 4, 8], device=device)).sum(1)
    edges = tets[:, torch.tensor(TET_EDGES, device=device)]  # (T,6,2)
    edges_sorted = edges.sort(dim=-1).values.reshape(-1, 2)
    crossing = inside[edges_sorted[:, 0]] != inside[edges_sorted[:, 1]]
    # each crossing edge once, in lexicographic order: a 1-D unique of (a, b) as one key
    n = sdf.shape[0]
    cross = edges_sorted[crossing]
    keys, inverse = torch.unique(cross[:, 0] * n + cross[:, 1], return_inverse=True)
    unique = torch.stack([keys // n, keys % n], dim=1)
    edge_vertex = torch.full((edges_sorted.shape[0],), -1, dtype=torch.long, device=device)
    edge_vertex[crossing] = inverse
    edge_vertex = edge_vertex.view(-1, 6)
    # vertex on each crossing edge: where the linear interpolation of sdf is zero
    sa, sb = sdf[unique[:, 0]], sdf[unique[:, 1]]
    pa, pb = vertices[unique[:, 0]], vertices[unique[:, 1]]
    t = (sa / (sa - sb)).unsqueeze(1)
    positions = pa + t * (pb - pa)
    table = TRIANGLE_TABLE.to(device)[case]  # (T,6)
    faces = []
    for k in (0, 3):
        has = table[:, k] >= 0
        local = table[has, k : k + 3]
        faces.append(torch.gather(edge_vertex[has], 1, local))
    faces = torch.cat(faces)
    # orient: normal toward the outside, i.e. along (mean outside vertex - mean inside vertex)
    tet_of_face = torch.cat([torch.nonzero(table[:, k] >= 0).squeeze(1) for k in (0, 3)])
    tv = vertices[tets[tet_of_face]].detach()  # (F,4,3)
    o = occ[tet_of_face].float().unsqueeze(-1)
    toward_out = (tv * (1 - o)).sum(1) / (1 - o).sum(1) - (tv * o).sum(1) / o.sum(1)
    p = positions.detach()[faces]
    normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    flip = (normal * toward_out).sum(-1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return positions, faces


def sphere_sdf(points: torch.Tensor, radius: float = 0.5) -> torch.Tensor:
    return points.norm(dim=-1) - radius


def ellipsoid_sdf(points: torch.Tensor, radii=(0.5, 0.4, 0.3)) -> torch.Tensor:
    """An approximate SDF (exact on the axes): |p / r| scaled back by the mean radius."""
    r = torch.as_tensor(radii, dtype=points.dtype, device=points.device)
    return ((points / r).norm(dim=-1) - 1) * r.mean()
