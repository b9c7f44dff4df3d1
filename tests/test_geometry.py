"""DMTet grid and marching tetrahedra."""

import math

import pytest
import torch
import torch.nn.functional as F

from backend.geometry.dmtet import CELL_TETS, TET_EDGES, TetGrid, marching_tets, sphere_sdf
from backend.geometry.sdf import sdf_sign_entropy


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


def all_tet_edges_deduplicated(tets):
    """The reference: every tet's six edges, sorted, deduplicated by torch.unique."""
    return torch.unique(tets[:, torch.tensor(TET_EDGES)].reshape(-1, 2).sort(dim=1).values, dim=0)


@pytest.mark.parametrize("res", [1, 2, 3, 6])
def test_cached_grid_edges_are_the_deduplicated_tet_edges(res):
    grid = TetGrid.cube(res)
    expected = all_tet_edges_deduplicated(grid.tets)
    assert torch.equal(grid.edges, expected)  # same rows, same (lexicographic) order
    assert grid.edges.shape[0] == 3 * res * (res + 1) ** 2 + 3 * res**2 * (res + 1) + res**3
    assert grid.edges is grid.edges  # built once


def reference_sdf_sign_entropy(sdf, tets):
    """sdf_sign_entropy as it was before the edge list was cached (deduplicating every call)."""
    e = all_tet_edges_deduplicated(tets)
    a, b = sdf[e[:, 0]], sdf[e[:, 1]]
    flip = (a > 0) != (b > 0)
    a, b = a[flip], b[flip]
    return 0.5 * (F.binary_cross_entropy_with_logits(a, (b > 0).float()) + F.binary_cross_entropy_with_logits(b, (a > 0).float()))


def test_sdf_sign_entropy_on_cached_edges_matches_the_reference():
    grid = TetGrid.cube(7)
    noise = torch.randn(grid.vertices.shape[0], generator=torch.Generator().manual_seed(0))
    sdf = (sphere_sdf(grid.vertices, 0.5) + 0.1 * noise).requires_grad_(True)
    value = sdf_sign_entropy(sdf, grid.edges)
    (grad,) = torch.autograd.grad(value, sdf)
    ref = reference_sdf_sign_entropy(sdf, grid.tets)
    (ref_grad,) = torch.autograd.grad(ref, sdf)
    assert value.item() > 0
    torch.testing.assert_close(value, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def test_sdf_sign_entropy_is_zero_without_crossings_and_penalises_flips():
    grid = TetGrid.cube(4)
    assert float(sdf_sign_entropy(torch.ones(grid.vertices.shape[0]), grid.edges)) == 0.0
    sdf = sphere_sdf(grid.vertices, 0.5).requires_grad_(True)
    loss = sdf_sign_entropy(sdf, grid.edges)
    loss.backward()
    assert loss.item() > 0 and sdf.grad.abs().sum() > 0


def test_geometry_stage_step_uses_the_grids_cached_edges(tmp_path, tiny):
    """One geometry-stage update with the SDF regulariser on: it runs on the stage's grid edges
    (moved to the stage's device, built once) and moves the SDF."""
    from dataclasses import replace

    from backend.pipelines.geometry_stage import GeometrySettings, GeometryStage

    settings = replace(GeometrySettings(), grid_resolution=8, render_size=32, prior_size=32, sdf_sign_weight=0.01)
    grid = TetGrid.cube(settings.grid_resolution)
    sdf0 = sphere_sdf(grid.vertices, 0.5)
    n0 = tiny.prior.encode_text(["low quality"])
    stage = GeometryStage(tiny, "a ball", n0, sdf0, grid, settings, seed=0, out_dir=tmp_path, to_world=lambda v: v)
    stage.update(total=10)
    assert torch.equal(stage.grid.edges, grid.edges) and stage.grid.edges is stage.grid.edges
    assert not torch.equal(stage.sdf.detach(), sdf0)


def test_mesh_regularisers_match_threestudios_forms():
    """Uniform Laplacian |(D - A) v| as a sparse matrix (threestudio Mesh.laplacian) and the
    vertex-normal consistency over edges, computed independently here."""
    import torch.nn.functional as F

    from backend.geometry.primitives import uv_sphere
    from backend.geometry.surface import laplacian_smoothness, mesh_edges, normal_consistency, vertex_normals

    v, f, _ = uv_sphere(12, 8, radius=0.5, bumps=0.1)
    f = f.long()
    ii, jj = f[:, [1, 2, 0]].flatten(), f[:, [2, 0, 1]].flatten()
    adj = torch.stack([torch.cat([ii, jj]), torch.cat([jj, ii])]).unique(dim=1)
    idx = torch.cat([adj, torch.stack([adj[0], adj[0]])], dim=1)
    values = torch.cat([-torch.ones(adj.shape[1]), torch.ones(adj.shape[1])])
    lap = torch.sparse_coo_tensor(idx, values, (v.shape[0], v.shape[0])).coalesce()
    expected = lap.mm(v).norm(dim=1).mean()
    torch.testing.assert_close(laplacian_smoothness(v, f), expected)
    edges = mesh_edges(f)
    n = vertex_normals(v, f)
    expected_nc = (1 - F.cosine_similarity(n[edges[:, 0]], n[edges[:, 1]], dim=-1)).mean()
    torch.testing.assert_close(normal_consistency(v, f), expected_nc)
    assert normal_consistency(v, f) > 0
    # a flat sheet is perfectly consistent and, inside, Laplacian-free
    g = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    flat = torch.cat([g, torch.zeros(16, 1)], 1)
    quads = torch.tensor([[r * 4 + c, r * 4 + c + 1, (r + 1) * 4 + c] for r in range(3) for c in range(3)]
                         + [[r * 4 + c + 1, (r + 1) * 4 + c + 1, (r + 1) * 4 + c] for r in range(3) for c in range(3)])
    assert float(normal_consistency(flat, quads)) < 1e-6
    # the Laplacian's gradient pulls a spike back toward its neighbours' mean
    spiky = flat.clone()
    spiky[5, 2] = 1.0
    spiky.requires_grad_(True)
    laplacian_smoothness(spiky, quads).backward()
    assert spiky.grad[5, 2] > 0
