"""The geometry stage's smoothness regularisers on a triangle mesh (and its unique edges),
in the forms threestudio's ``Mesh`` computes them (the weights in configs/cfd/ refer to these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.render.shading import vertex_normals


def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    """The unique undirected edges (E,2) of a triangle mesh, each sorted."""
    f = faces.long()
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(dim=1).values
    n = int(f.max()) + 1 if f.numel() else 1
    key = torch.unique(edges[:, 0] * n + edges[:, 1])  # one number per edge: a 1-D unique, sorted as (a, b)
    return torch.stack([key // n, key % n], dim=1)


def normal_consistency(positions: torch.Tensor, faces: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over edges of ``1 - cos`` between the vertex normals at its two ends (threestudio
    ``Mesh.normal_consistency``, weighted by ``lambda_normal_consistency``)."""
    edges = mesh_edges(faces) if edges is None else edges
    if edges.numel() == 0:
        return positions.sum() * 0
    n = vertex_normals(positions, faces)
    return (1 - F.cosine_similarity(n[edges[:, 0]], n[edges[:, 1]], dim=-1)).mean()


def laplacian_smoothness(positions: torch.Tensor, faces: torch.Tensor, edges: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over vertices of ``|L v|`` with the uniform graph Laplacian ``L = D - A``, i.e.
    ``|deg_i v_i - sum_j v_j|`` (threestudio ``Mesh.laplacian``, from stable-dreamfusion; weighted by
    ``lambda_laplacian_smoothness``). Vertices on no edge contribute 0."""
    edges = mesh_edges(faces) if edges is None else edges
    if edges.numel() == 0:
        return positions.sum() * 0
    i, j = edges[:, 0], edges[:, 1]
    lap = torch.zeros_like(positions)
    lap = lap.index_add(0, i, positions[i] - positions[j]).index_add(0, j, positions[j] - positions[i])
    return lap.norm(dim=1).mean()
