"""Simple meshes for initialisation, tests and benchmarks."""

from __future__ import annotations

import math

import torch


def uv_sphere(segments: int, rings: int, radius: float = 0.5, bumps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A latitude/longitude sphere (Y up). Returns positions (V,3) float32, faces (F,3) int32
    wound counter-clockwise from outside, and per-corner UVs (F,3,2) in glTF's convention
    (origin top-left: v = 0 at the north pole). ``bumps`` adds a wavy radius, so that shading
    and occlusion are not trivial. F = 2 * segments * (rings - 1)."""
    theta = torch.linspace(0, 2 * math.pi, segments + 1)[:, None]  # longitude, seam duplicated
    phi = torch.linspace(0, math.pi, rings + 1)[None, :]  # 0 = north pole
    r = radius * (1 + bumps * torch.sin(5 * theta) * torch.sin(3 * phi))
    pos = torch.stack([r * torch.sin(phi) * torch.sin(theta), r * torch.cos(phi) * torch.ones_like(theta),
                       r * torch.sin(phi) * torch.cos(theta)], -1).reshape(-1, 3)
    uv = torch.stack([theta.expand(-1, rings + 1) / (2 * math.pi), phi.expand(segments + 1, -1) / math.pi], -1).reshape(-1, 2)
    idx = lambda s, k: s * (rings + 1) + k  # noqa: E731
    faces = []
    for k in range(rings):
        s = torch.arange(segments)
        a, b, c, d = idx(s, k), idx(s + 1, k), idx(s, k + 1), idx(s + 1, k + 1)
        if k > 0:  # skip the degenerate triangle at the north pole
            faces.append(torch.stack([a, c, b], 1))
        if k < rings - 1:  # and at the south pole
            faces.append(torch.stack([b, c, d], 1))
    faces = torch.cat(faces)
    return pos.float(), faces.int(), uv[faces.long()].float()
