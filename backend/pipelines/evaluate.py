"""Score a finished textured mesh the way the paper's Table 2 does (appendix F.2): render
equally spaced views around it and average each reward over them."""

from __future__ import annotations

import numpy as np
import torch

from backend.geometry.mesh import Mesh, Normalisation
from backend.models import LoadedModels
from backend.render.camera import OrbitSpec
from backend.render.ops import RasterContext
from backend.render.shading import rasterize_views, render_albedo

EVAL_VIEWS = 60  # appendix F.2: "the average of the scores across 60 equally spaced views"


def render_views(mesh: Mesh, views: int = EVAL_VIEWS, size: int = 256, device: torch.device | str = "cpu",
                 background=(1.0, 1.0, 1.0), batch: int = 12) -> torch.Tensor:
    """(views,3,size,size) albedo renders of a textured mesh (any frame: it is normalised first)."""
    norm = Normalisation.fit(mesh.positions.numpy().astype(np.float64))
    pos = torch.from_numpy(norm.to_unit(mesh.positions.numpy().astype(np.float64)).astype(np.float32)).to(device)
    faces = mesh.faces.to(device).int()
    uvs = mesh.uvs.to(device)
    tex = torch.from_numpy(mesh.texture[..., :3].astype(np.float32) / 255).to(device)
    ctx = RasterContext(device)
    cams = OrbitSpec(width=size, height=size, fov_y=(45.0, 45.0), distance=(1.75, 1.75)).turntable(views)
    bg = torch.tensor(background, device=device)
    out = []
    with torch.no_grad():
        for i in range(0, views, batch):
            frags = rasterize_views(ctx, pos, faces, cams[i : i + batch])
            out.append(render_albedo(ctx, frags, faces, uvs, tex, bg))
    return torch.cat(out)


def score_mesh(mesh: Mesh, prompt: str, models: LoadedModels, views: int = EVAL_VIEWS) -> dict[str, float]:
    """Mean reward over the views, per reward model: {'hpsv2.1': ..., 'pickscore': ...}."""
    images = render_views(mesh, views, device=models.prior.device)
    scores = {}
    with torch.no_grad():
        for reward in [models.target_reward, *models.unseen_rewards]:
            feats = reward.text_features(prompt)
            scores[reward.name] = float(torch.cat([reward.score(chunk, feats) for chunk in images.split(12)]).mean())
    return scores
