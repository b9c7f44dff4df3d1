"""DMTet grid and marching tetrahedra."""

import math

import pytest
import torch

from backend.geometry.dmtet import CELL_TETS, TetGrid, marching_tets, sphere_sdf


def signed_volume(v, f):
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    return float((a * torch.linalg.cross(b, c)).sum() / 6)


def test_grid_tets_fill_the_cube_with_positive_volume():
    grid = TetGrid.cube(4)
    assert grid.vertices.shape == (125, 3) and grid.tets.shape == (4**3 * 6, 4)
    p = grid.vertices[grid.tets]
    vol = torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)).abs() / 6
    assert float(vol.sum()) == pytest.approx(8.0, rel=1e-5)  # [-1, 1]^3, no overlaps, no gaps
    assert (vol > 0).all()
    assert len(CELL_TETS) == 6


@pytest.mark.parametrize("res", [12, 24])
def test_sphere_extracts_a_closed_outward_mesh(res):
    grid = TetGrid.cube(res)
    verts, faces = marching_tets(grid.vertices, grid.tets, sphere_sdf(grid.vertices, 0.6))
    # closed 2-manifold: every edge in exactly two faces, Euler characteristic 2
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    _, counts = torch.unique(e, dim=0, return_counts=True)
    assert (counts == 2).all()
    assert verts.shape[0] - counts.numel() + faces.shape[0] == 2
    vol = signed_volume(verts, faces)
    assert vol > 0  # counter-clockwise from outside
    assert vol == pytest.approx(4 / 3 * math.pi * 0.6**3, rel=0.08 if res == 12 else 0.03)
    assert (verts.norm(dim=1) - 0.6).abs().max() < 2.0 / res


def test_positions_are_differentiable_in_sdf_and_grid():
    grid = TetGrid.cube(8)
    sdf = sphere_sdf(grid.vertices, 0.5).requires_grad_(True)
    deform = torch.zeros_like(grid.vertices, requires_grad=True)
    verts, faces = marching_tets(grid.vertices + deform, grid.tets, sdf)
    # growing the sphere (lower sdf everywhere) pushes vertices outward
    (verts.norm(dim=1).sum()).backward()
    assert sdf.grad is not None and float(sdf.grad.sum()) < 0
    assert deform.grad is not None and deform.grad.abs().sum() > 0


def test_empty_and_full_fields_give_no_surface():
    grid = TetGrid.cube(4)
    for sdf in (torch.ones(grid.vertices.shape[0]), -torch.ones(grid.vertices.shape[0])):
        v, f = marching_tets(grid.vertices, grid.tets, sdf)
        assert v.shape == (0, 3) and f.shape == (0, 3)


def test_sdf_sign_entropy_is_zero_without_crossings_and_penalises_flips():
    from backend.geometry.sdf import sdf_sign_entropy

    grid = TetGrid.cube(4)
    assert float(sdf_sign_entropy(torch.ones(grid.vertices.shape[0]), grid.tets)) == 0.0
    sdf = sphere_sdf(grid.vertices, 0.5).requires_grad_(True)
    loss = sdf_sign_entropy(sdf, grid.tets)
    loss.backward()
    assert float(loss) > 0 and sdf.grad.abs().sum() > 0
