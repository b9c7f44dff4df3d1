"""What a 3D job leaves in its folder: out.glb, preview.png (turntable strip), metrics.json,
reward_curve.png — DESIGN.md's shared schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from protocol.events import Done
from backend.geometry.mesh import Mesh, save_glb
from backend.outputs import plot_reward_curve, save_png, to_rgba8
from backend.pipelines.texture_stage import TextureStage
from backend.render.camera import OrbitSpec, framing_distance

PREVIEW_VIEWS = 8


PREVIEW_SIZE = 256


PREVIEW_FOV = 45.0


def turntable(stage: TextureStage, views: int = PREVIEW_VIEWS) -> torch.Tensor:
    """(views,3,H,W) renders evenly spaced around the object at 15 degrees elevation, at least
    PREVIEW_SIZE pixels square (the reward resizes to its own input anyway), from far enough that the
    whole object is in every view."""
    size = max(PREVIEW_SIZE, stage.settings.render_size)
    dist = framing_distance(float(stage.positions.norm(dim=-1).max()), PREVIEW_FOV)
    cams = OrbitSpec(distance=(dist, dist), fov_y=(PREVIEW_FOV, PREVIEW_FOV), width=size, height=size).turntable(views)
    with torch.no_grad():
        return stage.render(cams)


def finish(stage: TextureStage, world_mesh: Mesh, prompt: str, out: Path, title: str, source=None) -> Done:
    """Score the turntable, write every output (atomically) and return the Done event.
    ``world_mesh`` is the result in the input's own frame, with UVs; ``stage`` renders it.
    ``source``: the stage whose steps, metrics and negative embedding the job reports, when
    ``stage`` only renders the result (a baked NeRF); default ``stage``."""
    source = source or stage
    models = stage.models
    images = turntable(stage)
    log = source.log
    with torch.no_grad():
        log.final["steps_done"] = source.step
        log.final["target_reward"] = float(models.target_reward.score(images, stage.reward_features).mean())
        log.final["target_reward_name"] = models.target_reward.name
        log.final["views_scored"] = images.shape[0]
        for reward in models.unseen_rewards:
            log.final[f"unseen_{reward.name}"] = float(reward.score(images, reward.text_features(prompt)).mean())
    strip = torch.cat(list(images), dim=-1)  # (3,H,views*W)
    world_mesh.texture = stage.texture_rgba()
    outputs = {
        "glb": save_glb(world_mesh, out / "out.glb"),
        "preview": save_png(to_rgba8(strip), out / "preview.png"),
        "metrics": log.write(out / "metrics.json"),
        "reward_curve": plot_reward_curve(log.to_dict(), out / "reward_curve.png", title),
        "negative_embedding": out / "negative_embedding.pt",
    }
    source.negative.save(outputs["negative_embedding"])
    return Done({k: str(v) for k, v in outputs.items()}, log.to_dict()["final"])


def mesh_snapshot_arrays(mesh: Mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return (mesh.positions.detach().cpu().numpy().astype(np.float32), mesh.faces.cpu().numpy().astype(np.int32),
            None if mesh.uvs is None else mesh.uvs.detach().cpu().numpy().astype(np.float32))
