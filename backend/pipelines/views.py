"""View-dependent prompting for the 3D stages (DreamFusion): the prior sees "<prompt>, front
view" etc. by the sampled camera's azimuth; the reward scores the artist's plain prompt."""

from __future__ import annotations

import torch

from backend.render.camera import Camera, OrbitSpec, view_suffix

SUFFIXES = (", front view", ", side view", ", back view")


class ViewPrompts:
    def __init__(self, prior, prompt: str) -> None:
        embeds = prior.encode_text([prompt + s for s in SUFFIXES])
        self.embeddings = {s: embeds[i : i + 1] for i, s in enumerate(SUFFIXES)}
        self.front = embeds[:1]

    def sample(self, cameras: OrbitSpec, n: int, generator: torch.Generator) -> tuple[list[Camera], torch.Tensor]:
        """n cameras and their prompt embeddings (n, L, D)."""
        cams = cameras.sample(n, generator)
        return cams, self.for_cameras(cams)

    def for_cameras(self, cams: list[Camera]) -> torch.Tensor:
        """The prompt embedding (n, L, D) each camera's azimuth asks for."""
        return torch.cat([self.embeddings[view_suffix(c.azimuth)] for c in cams])


def resize_for_prior(images: torch.Tensor, size: int) -> torch.Tensor:
    """Renders (B,3,H,W) at the prior's native size (antialiased when shrinking)."""
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
