"""The single stage of the paper's Table 1: a NeRF distilled from MVDream (four joint views per
object, one front and one back), as MVDream-threestudio's ``configs/mvdream-sd21.yaml`` runs it,
with PSD, SDS or DreamDPO as the guidance. Streams the mesh extracted at density 25 while it
optimises; the result is that mesh with the albedo baked into a UV texture.

Frame: the NeRF lives in MVDream's radius-1 box (``geometry.radius: 1.0``) with glTF's axes
(+Y up, front +Z): the box of the DMTet grid (``TetGrid.cube``, CFD's ``geometry.radius: 1.0``), so
every recipe's result comes out in the same optimisation frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from protocol.events import MeshSnapshot
from backend.files import atomic_torch_save
from backend.geometry.mesh import Mesh, repair
from backend.geometry.nerf import NerfConfig, NerfField, bake_albedo, extract_mesh
from backend.models import LoadedModels
from backend.outputs import MetricsLog
from backend.pipelines.stage import DistillationStage
from backend.pipelines.views import resize_for_prior
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller, StepOutput
from backend.psd.guidance import Weighting, distillation_loss
from backend.psd.mvdream import MultiViewPrior, mvdream_camera
from backend.psd.negative import NegativeConfig, NegativeEmbedding
from backend.psd.schedule import MVDREAM_SCHEDULE, RandomAnnealedSchedule
from backend.render.camera import MultiViewOrbit
from backend.render.volume import EnvironmentMapBackground, OccupancyGrid, VolumeRenderConfig, orientation_loss, render_volume

# mvdream-sd21.yaml system.prompt_processor.negative_prompt: the negative the config conditions on
MVDREAM_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, cropped, "
    "lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, dehydrated, "
    "bad proportions")


@dataclass(frozen=True)
class SingleStageSettings:
    """MVDream's single stage. Each field names its key in MVDream-threestudio's
    ``configs/mvdream-sd21.yaml`` (``-shading.yaml`` where marked); "ours" where it is not there."""

    steps: int = 10000  # trainer.max_steps
    render_sizes: tuple[int, int] = (64, 256)  # data.width / data.height: [64, 256]
    size_switch: float = 0.5  # data.resolution_milestones: [5000] of 10000 steps
    objects: tuple[int, int] = (2, 1)  # data.batch_size: [8, 4] over data.n_view: 4
    prior_size: int = 256  # guidance.image_size: renders are resized to 256 before the VAE
    cameras: MultiViewOrbit = field(default_factory=MultiViewOrbit)  # data.*_range, n_view
    # guidance.guidance_scale: 50 in threestudio's form is gamma = 51 here; recon_loss: true is the
    # s/a weighting (guidance.Weighting.RECON); PSD by default (appendix F.1)
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(
        method=Method.PSD, guidance_scale=51.0, weighting=Weighting.RECON))
    schedule: RandomAnnealedSchedule = MVDREAM_SCHEDULE  # guidance.min/max_step_percent
    negative: NegativeConfig = field(default_factory=lambda: NegativeConfig(lr=1e-4))  # appendix F.1: 1e-4, constant
    nerf: NerfConfig = field(default_factory=NerfConfig)  # system.geometry
    render: VolumeRenderConfig = field(default_factory=VolumeRenderConfig)  # system.renderer
    # system.optimizer: AdamW, betas [0.9, 0.99], eps 1e-15; lr per group
    lr_encoding: float = 0.01  # params.geometry.encoding.lr
    lr_networks: float = 0.001  # params.geometry.density_network / feature_network.lr
    lr_background: float = 0.001  # params.background.lr
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-15
    # -shading.yaml system.loss.lambda_orient: [0, 10., 1000., 5000]: 10 -> 1000 linearly over
    # the first 5000 of 10000 steps; appendix F.1 keeps the albedo-only material (no shading)
    orient: tuple[float, float] = (10.0, 1000.0)
    orient_ramp: float = 0.5
    texture_size: int = 1024  # ours: the baked albedo
    extract_resolution: int = 128  # geometry.isosurface_resolution (threestudio's default)
    snapshot_every: int = 250  # ours: a streamed mesh costs one extraction
    checkpoint_every: int = 500

    def render_size(self, step: int, total: int) -> int:
        return self.render_sizes[0] if step < self.size_switch * total else self.render_sizes[1]

    def objects_at(self, step: int, total: int) -> int:
        return self.objects[0] if step < self.size_switch * total else self.objects[1]

    def orient_weight(self, step: int, total: int) -> float:
        ramp = min(1.0, step / max(1.0, self.orient_ramp * total))
        return self.orient[0] + (self.orient[1] - self.orient[0]) * ramp


class NerfStage(DistillationStage):
    name = "nerf"
    CHECKPOINT = "checkpoints/nerf.pt"

    def __init__(self, models: LoadedModels, prior: MultiViewPrior, prompt: str, negative_init: torch.Tensor,
                 settings: SingleStageSettings, guidance: GuidanceConfig, seed: int, out_dir: Path,
                 to_world: Callable) -> None:
        self.models, self.prior, self.settings, self.out, self.to_world = models, prior, settings, out_dir, to_world
        self.device = prior.device
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # the same seed starts from the same weights
            torch.manual_seed(seed)
            self.field = NerfField(settings.nerf, self.device)
            self.background = EnvironmentMapBackground().to(self.device)
        self.occupancy = OccupancyGrid(settings.render.radius).to(self.device)
        networks = [*self.field.density_network.parameters(), *self.field.feature_network.parameters()]
        self.optimizer = torch.optim.AdamW([
            {"params": self.field.encoding.parameters(), "lr": settings.lr_encoding},
            {"params": networks, "lr": settings.lr_networks},
            {"params": self.background.parameters(), "lr": settings.lr_background},
        ], betas=settings.betas, eps=settings.adam_eps)
        self.negative = NegativeEmbedding(negative_init, settings.negative if guidance.method is Method.PSD
                                          else NegativeConfig(lr=0.0))
        self.reward_features = models.target_reward.text_features(prompt)
        y = prior.encode_text([prompt])  # MVDream: view_dependent_prompting false
        self.distiller = ScoreDistiller(prior, models.target_reward, self.reward_features, y, self.negative, guidance,
                                        self.generator, views=settings.cameras.views)
        self.step = 0
        self.log = MetricsLog()
        self.topology_id = 0

    # -- the loop ---------------------------------------------------------------------------
    def update(self, total: int) -> tuple[torch.Tensor, StepOutput, dict]:
        s = self.settings
        size = s.render_size(self.step, total)
        cams = s.cameras.resized(size, size).sample(s.objects_at(self.step, total), self.generator)
        self.field.train(), self.background.train()
        self.occupancy.update(self.field.density, self.step, s.render.step_size, self.generator)
        orient = s.orient_weight(self.step, total)
        render = render_volume(self.field, cams, s.render, background=self.background, with_normals=orient > 0,
                               occupancy=self.occupancy, generator=self.generator, device=self.device)
        images = render.rgb.permute(0, 3, 1, 2)
        x_c = self.prior.encode_images(resize_for_prior(images, s.prior_size))
        t = s.schedule.sample(self.step, total, x_c.shape[0], self.prior.num_train_timesteps, self.generator).to(self.device)
        camera = mvdream_camera(torch.stack([c.c2w for c in cams])).to(self.device)
        out = self.distiller.step(x_c, t, self.step, camera=camera)
        # threestudio's SDS loss is 0.5 * sum((x - target)^2) / B: its gradient is the guidance over B
        loss = distillation_loss(x_c, out.grad / x_c.shape[0])
        if orient > 0:
            loss = loss + orient * orientation_loss(render)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return t, out, {"render_size": size, "opacity": float(render.opacity.detach().mean())}

    # -- results ----------------------------------------------------------------------------
    def surface_level(self) -> float:
        """threestudio's isosurface threshold (25) once the density reaches it. Before that (the
        blob it starts from peaks at softplus(10) ~ 10) the streamed surface is the half-maximum
        level of the density, so a stop that early still keeps a shape; the metrics say which."""
        level = self.field.config.isosurface_threshold
        r = self.field.config.radius
        axis = torch.linspace(-r, r, 32, device=self.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        with torch.no_grad():
            peak = float(self.field.density(points).max())
        self.log.final["surface_level"] = level if peak > level else 0.5 * peak
        return self.log.final["surface_level"]

    def extract(self, resolution: int | None = None) -> Mesh:
        """The surface at :meth:`surface_level`, in the NeRF's frame (no UVs)."""
        self.field.eval()
        with torch.no_grad():
            verts, faces = extract_mesh(self.field, resolution or self.settings.extract_resolution, self.surface_level())
        return Mesh(verts, faces.int())

    def snapshot_event(self) -> MeshSnapshot:
        mesh = self.extract()
        self.topology_id += 1  # every extraction has faces of its own
        world = self.to_world(mesh.positions.numpy()).astype("float32")
        return MeshSnapshot(self.step, world, mesh.faces.numpy().astype("int32"), None, self.topology_id)

    def textured_mesh(self) -> Mesh:
        """The extracted surface (slivers of zero area removed) with UVs and the albedo baked (NeRF frame)."""
        mesh, _ = repair(self.extract(), "mesh")
        return bake_albedo(self.field, mesh, self.settings.texture_size)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        atomic_torch_save({"step": self.step, "field": self.field.state_dict(), "background": self.background.state_dict(),
                           "occupancy": self.occupancy.state_dict(), "optimizer": self.optimizer.state_dict(),
                           "negative": self.negative.value.detach().cpu(),
                           "negative_optimizer": self.negative.optimizer.state_dict(),
                           "generator": self.generator.get_state(), "metrics": self.log.steps}, self.out / self.CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = self.out / self.CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.negative.value.copy_(state["negative"])
        self.negative.optimizer.load_state_dict(state["negative_optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.log.steps, self.step = state["metrics"], state["step"]
        return True
