"""The DMTet stage's start from a coarse NeRF (issue 14 item 1; threestudio's
TetrahedraSDFGrid.create_from): clamp(-(density - threshold), -1, 1) on a tet grid over the
surface's bounding box with a 10 % margin."""

import torch

from backend.geometry.dmtet import marching_tets
from backend.geometry.nerf import NerfConfig, _drop_small_components, dmtet_from_field, extract_mesh


class UnionDensity(torch.nn.Module):
    """A density that crosses 25 on the surface of a union of two spheres and a box."""

    def __init__(self) -> None:
        super().__init__()
        self.config = NerfConfig()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the device the helpers read

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        a = (p - torch.tensor([-0.3, 0.0, 0.0])).norm(dim=-1) - 0.3
        b = (p - torch.tensor([0.25, 0.1, 0.0])).norm(dim=-1) - 0.25
        q = (p - torch.tensor([0.0, -0.25, 0.1])).abs() - torch.tensor([0.35, 0.08, 0.2])
        box = q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)
        return torch.minimum(torch.minimum(a, b), box)

    def density(self, p: torch.Tensor) -> torch.Tensor:
        return 50 * torch.sigmoid(-20 * self.sdf(p))


def chamfer(a: torch.Tensor, b: torch.Tensor, n: int = 6000) -> float:
    """Mean symmetric nearest-point distance over ``n`` vertices of each (seeded subsets)."""
    gen = torch.Generator().manual_seed(0)
    a = a[torch.randperm(len(a), generator=gen)[:n]]
    b_all = b
    b = b[torch.randperm(len(b), generator=gen)[:n]]

    def one_way(x, y):
        return torch.cat([torch.cdist(c, y).min(dim=1).values for c in x.split(4096)]).mean()
    return float(one_way(a, b_all) + one_way(b, a)) / 2


def test_dmtet_from_density_matches_the_isosurface_closed_and_in_one_piece():
    field = UnionDensity()
    grid, sdf = dmtet_from_field(field, resolution=64, threshold=25.0)
    assert sdf.min() >= -1 and sdf.max() <= 1
    verts, faces = marching_tets(grid.vertices, grid.tets, sdf)
    ref_verts, _ = extract_mesh(field, resolution=96, threshold=25.0)
    diagonal = float((ref_verts.amax(0) - ref_verts.amin(0)).norm())
    assert chamfer(verts, ref_verts) < 0.01 * diagonal
    # the grid spans the surface's box grown by 10 % of its size
    lo, hi = ref_verts.amin(0), ref_verts.amax(0)
    torch.testing.assert_close(grid.vertices.amin(0), lo - 0.1 * (hi - lo), atol=0.02, rtol=0)
    torch.testing.assert_close(grid.vertices.amax(0), hi + 0.1 * (hi - lo), atol=0.02, rtol=0)
    # closed: every edge has exactly two faces; one component
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(dim=1).values
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    assert bool((counts == 2).all())
    assert _drop_small_components(f, verts.shape[0], 1.0).shape[0] == f.shape[0]


def test_the_sign_is_negative_inside():
    field = UnionDensity()
    grid, sdf = dmtet_from_field(field, resolution=16, threshold=25.0)
    inside = field.sdf(grid.vertices) < -0.05
    outside = field.sdf(grid.vertices) > 0.05
    assert bool((sdf[inside] < 0).all()) and bool((sdf[outside] > 0).all())
