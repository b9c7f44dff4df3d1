"""The texture stage shared by generate and refine: PSD (or SDS / DreamDPO) on a UV texture of
a fixed mesh, rendered from sampled cameras (appendix F.1, "3-stage DMTet": texture stage).

State lives in :class:`TextureStage` (texture, optimisers, negative embedding, RNG, step) and
is checkpointed atomically, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from protocol.events import TextureSnapshot
from backend.files import atomic_torch_save
from backend.geometry.mesh import Mesh
from backend.geometry.uv import UVTexture, dilate, uv_coverage
from backend.models import LoadedModels
from backend.outputs import MetricsLog
from backend.psd.distill import GuidanceConfig, ScoreDistiller, StepOutput
from backend.psd.guidance import Weighting, distillation_loss
from backend.psd.negative import NegativeConfig, NegativeEmbedding
from backend.psd.schedule import DreamTimeSchedule, LinearAnnealSchedule
from backend.render.camera import OrbitSpec
from backend.render.integral_noise import IntegralNoise, IntegralNoiseConfig, surface_points
from backend.pipelines.cfd import CFD_CAMERAS
from backend.pipelines.stage import DistillationStage
from backend.pipelines.views import ViewPrompts, resize_for_prior
from backend.render.ops import RasterContext
from backend.render.shading import rasterize_views, render_albedo


@dataclass(frozen=True)
class TextureSettings:
    """The texture stage, from ``configs/cfd/sd-mesh-texture-stage3.yaml`` (the config appendix
    F.1's 3-stage pipeline ran) and F.1 itself. Each field names its source; "ours" marks values
    that are in neither (CFD's texture is a hash grid, ours a UV texture)."""

    steps: int = 20000  # F.1: "20000 steps" (the config's trainer.max_steps says 15_000)
    render_size: int = 1024  # data.width / data.height
    prior_size: int = 512  # renders are resized to the prior's native size before the VAE
    texture_size: int = 1024  # ours
    texture_levels: int = 4  # ours
    lr: float = 0.01  # ours (the config's hash-grid encoding lr is 1e-2 too)
    betas: tuple[float, float] = (0.9, 0.99)  # optimizer.args.betas
    views: int = 1  # data.batch_size
    cameras: OrbitSpec = field(default_factory=lambda: CFD_CAMERAS)
    # guidance.guidance_scale: 75. in threestudio's form is gamma = 76; weighting_strategy: dmd
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(guidance_scale=76.0, weighting=Weighting.DMD))
    negative: NegativeConfig = field(default_factory=lambda: NegativeConfig(lr=1e-5, freeze_after=1000))  # F.1
    # t_scheduler.linear_anneal_*: t from 0.404 down to 0.212. That stage starts from the texture
    # the earlier stages made; refine starts from the artist's.
    schedule: LinearAnnealSchedule = field(default_factory=LinearAnnealSchedule)
    # Ours, until a coarse stage gives generate a coloured start (MVDream, issue 13): a blank
    # texture needs high noise first, so generate's texture stage anneals from 0.98 as geometry does.
    blank_schedule: DreamTimeSchedule = field(default_factory=DreamTimeSchedule)
    # Refine never draws t above this (a fraction of the diffusion schedule): the CFD texture
    # stage's own start, 0.404 (see ``schedule``). A refine job may lower or raise it (``max_t``).
    refine_max_t: float = LinearAnnealSchedule().t_start
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # ours (CFD: a learned environment map)
    snapshot_every: int = 10
    checkpoint_every: int = 100
    # CFD's integral noise (noise_generator: triplane-noise-generator, paper Eq. 17) for the first
    # noising of each step (one of the pair, so the winner's when it wins); None: random noise
    integral_noise: IntegralNoiseConfig | None = field(default_factory=IntegralNoiseConfig)


class TextureStage(DistillationStage):
    name = "texture"
    CHECKPOINT = "checkpoints/texture.pt"

    def __init__(self, models: LoadedModels, mesh: Mesh, prompt: str, negative_init: torch.Tensor,
                 settings: TextureSettings, guidance: GuidanceConfig, seed: int, out_dir: Path, rig=None,
                 checkpoint_tag: int = 0, schedule=None, ctx: RasterContext | None = None) -> None:
        """``mesh`` in the unit optimisation frame with per-corner UVs; its texture (if any) is the start.
        ``rig`` (an OrbitSpec or CameraList in the unit frame) replaces the preset's cameras;
        ``checkpoint_tag`` names the mesh a checkpoint belongs to (generate: the geometry step), so a
        checkpoint made for another mesh is never loaded. ``schedule`` replaces t(tau): by default
        ``settings.schedule`` when the mesh has a texture, else ``settings.blank_schedule``. ``ctx``:
        the job's rasterizer (default: RasterContext's choice for the prior's device)."""
        self.schedule = schedule or (settings.schedule if mesh.texture is not None else settings.blank_schedule)
        self.checkpoint_tag = checkpoint_tag
        self.models, self.mesh, self.settings, self.out = models, mesh, settings, out_dir
        prior = models.prior
        self.device = prior.device
        self.ctx = ctx or RasterContext(self.device)
        init = None
        # an artist's texture keeps its alpha and its texels outside the charts; a new one gets seam padding
        self.alpha = None if mesh.texture is None else mesh.texture[..., 3:].copy()
        self.pad_seams = mesh.texture is None
        if mesh.texture is not None:
            init = torch.from_numpy(mesh.texture[..., :3].astype(np.float32) / 255.0)
        h, w = mesh.texture.shape[:2] if mesh.texture is not None else (settings.texture_size,) * 2
        self.texture = UVTexture(h, w, settings.texture_levels, init).to(self.device)
        self.optimizer = torch.optim.Adam(self.texture.parameters(), lr=settings.lr, betas=settings.betas)
        self.negative = NegativeEmbedding(negative_init, settings.negative)
        self.generator = torch.Generator().manual_seed(seed)
        self.views = ViewPrompts(prior, prompt)
        self.reward_features = models.target_reward.text_features(prompt)  # the reward sees the artist's prompt
        self.distiller = ScoreDistiller(prior=prior, reward=models.target_reward, text_features=self.reward_features,
                                        y=self.views.front, negative=self.negative, config=guidance,
                                        generator=self.generator)
        self.positions = mesh.positions.to(self.device)
        self.faces = mesh.faces.to(self.device).int()
        self.uvs = mesh.uvs.to(self.device)
        self.background = torch.tensor(settings.background, device=self.device)
        self.cameras = (rig or settings.cameras).resized(settings.render_size, settings.render_size)
        # its own generator, so the run's RNG stream is unchanged by turning the noise on
        self.noise = None if settings.integral_noise is None else IntegralNoise(
            settings.integral_noise, torch.Generator().manual_seed(seed))
        self.step = 0
        self.log = MetricsLog()

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        atomic_torch_save({
            "step": self.step,
            "texture": self.texture.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "negative": {"value": self.negative.value.detach().cpu(), "optimizer": self.negative.optimizer.state_dict(),
                         "updates": self.negative.updates},
            "generator": self.generator.get_state(),
            "metrics": self.log.steps,
            "tag": self.checkpoint_tag,
            "integral_noise": None if self.noise is None else self.noise.state_dict(),
        }, self.out / self.CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = self.out / self.CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("tag", 0) != self.checkpoint_tag:
            return False
        self.texture.load_state_dict(state["texture"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.negative.value.data.copy_(state["negative"]["value"])
        self.negative.optimizer.load_state_dict(state["negative"]["optimizer"])
        self.negative.updates = state["negative"]["updates"]
        self.generator.set_state(state["generator"])
        self.log.steps = state["metrics"]
        self.step = state["step"]
        if self.noise is not None and state.get("integral_noise") is not None:
            self.noise.load_state_dict(state["integral_noise"])
        return True

    # -- rendering ---------------------------------------------------------------------------
    def render(self, cameras, tex: torch.Tensor | None = None, frags=None) -> torch.Tensor:
        """(B,3,H,W) textured renders, rows top-first; ``frags`` the cameras' fragments if rasterised."""
        frags = frags if frags is not None else rasterize_views(self.ctx, self.positions, self.faces, cameras)
        return render_albedo(self.ctx, frags, self.faces, self.uvs, self.texture() if tex is None else tex, self.background)

    def texture_rgba(self) -> np.ndarray:
        """The current texture as uint8 RGBA with UV padding around the charts."""
        with torch.no_grad():
            tex = self.texture().cpu()
            if self.pad_seams:
                mask = uv_coverage(self.uvs.cpu(), *tex.shape[:2])
                if mask.any():
                    tex = dilate(tex, mask, iterations=8)
        rgb = (tex.numpy() * 255 + 0.5).astype(np.uint8)
        alpha = self.alpha if self.alpha is not None else np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        return np.concatenate([rgb, alpha], axis=2)

    # -- the loop ----------------------------------------------------------------------------
    def update(self, total: int) -> tuple[torch.Tensor, StepOutput, dict]:
        s = self.settings
        prior = self.models.prior
        cams, y = self.views.sample(self.cameras, s.views, self.generator)
        t = self.schedule.sample(self.step, total, s.views, prior.num_train_timesteps, self.generator).to(self.device)
        frags = rasterize_views(self.ctx, self.positions, self.faces, cams)
        images = self.render(cams, frags=frags)
        x_c = prior.encode_images(resize_for_prior(images, s.prior_size))
        noise = None
        if self.noise is not None:
            points, mask = surface_points(self.ctx, frags, self.positions, self.faces)
            noise = self.noise.sample(points, mask, tuple(x_c.shape[-2:])).to(x_c.device)
        out = self.distiller.step(x_c, t, self.step, y=y, noise=noise)
        self.optimizer.zero_grad(set_to_none=True)
        distillation_loss(x_c, out.grad).backward()
        self.optimizer.step()
        return t, out, {}

    def snapshot_event(self) -> TextureSnapshot:
        return TextureSnapshot(self.step, self.texture_rgba())
