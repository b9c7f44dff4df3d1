"""NeRF stages: the single stage of the paper's Table 1, a NeRF distilled from MVDream (four joint
views per object, one front and one back) as MVDream-threestudio's ``configs/mvdream-sd21.yaml``
runs it; and the second stage of Table 2's 2-stage pipeline, that NeRF refined on Stable Diffusion
2.1 at 512² as CFD's ``configs/cfd/sd-nerf-stage2.yaml`` runs it. PSD, SDS or DreamDPO is the
guidance. Each streams the mesh extracted at density 25 while it optimises; the result is that
mesh with the albedo baked into a UV texture.

Frame: the NeRF lives in MVDream's radius-1 box (``geometry.radius: 1.0``) with glTF's axes
(+Y up, front +Z): the box of the DMTet grid (``TetGrid.cube``, CFD's ``geometry.radius: 1.0``), so
every recipe's result comes out in the same optimisation frame."""

from __future__ import annotations

import random
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
from backend.pipelines.views import ViewPrompts, resize_for_prior
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller, StepOutput
from backend.psd.guidance import Weighting, distillation_loss
from backend.pipelines.cfd import CFD_LOSS_SCALE, CFD_NERF_CAMERAS
from backend.psd.mvdream import MultiViewPrior, mvdream_camera
from backend.psd.negative import NegativeConfig, NegativeEmbedding
from backend.psd.prior import DiffusionPrior
from backend.psd.schedule import MVDREAM_SCHEDULE, LinearAnnealSchedule, RandomAnnealedSchedule
from backend.render.camera import MultiViewOrbit, OrbitSpec
from backend.render.integral_noise import IntegralNoise, IntegralNoiseConfig
from backend.render.volume import (EnvironmentMapBackground, OccupancyGrid, ShadingSchedule, VolumeRender,
                                   VolumeRenderConfig, camera_rays, opaque_loss, orientation_loss, render_volume,
                                   sample_point_lights, sparsity_loss, z_variance_loss)

# mvdream-sd21.yaml system.prompt_processor.negative_prompt: the negative the config conditions on
MVDREAM_NEGATIVE_PROMPT = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, cropped, "
    "lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, dehydrated, "
    "bad proportions")


# sd-nerf-stage2.yaml system.prompt_processor.negative_prompt
CFD_NEGATIVE_PROMPT = (
    "lack details, ugly, oversmoothed, bad structure, out of focus, blurry, cartoon, oversaturated, foggy, hazy, "
    "bad anatomy, malformed, pixelated obscure, unnatural colors, dull, unclear, lowres, low quality, deformed, "
    "dehydrated")


@dataclass(frozen=True)
class NerfSettings:
    """A NeRF stage. The defaults are MVDream's single stage, each field naming its key in
    MVDream-threestudio's ``configs/mvdream-sd21.yaml`` (``-shading.yaml`` where marked); "ours"
    where it is not there. :data:`SD_NERF_STAGE2` holds the 2-stage pipeline's second stage."""

    steps: int = 10000  # trainer.max_steps
    render_sizes: tuple[int, int] = (64, 256)  # data.width / data.height: [64, 256]
    size_switch: float = 0.5  # data.resolution_milestones: [5000] of 10000 steps
    objects: tuple[int, int] = (2, 1)  # data.batch_size: [8, 4] over data.n_view: 4
    prior_size: int = 256  # guidance.image_size: renders are resized to 256 before the VAE
    # data.*_range, n_view; a single-view prior takes an OrbitSpec
    cameras: MultiViewOrbit | OrbitSpec = field(default_factory=MultiViewOrbit)
    # guidance.guidance_scale: 50 in threestudio's form is gamma = 51 here; recon_loss: true is the
    # s/a weighting (guidance.Weighting.RECON) with recon_std_rescale: 0.5; PSD by default (appendix F.1)
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(
        method=Method.PSD, guidance_scale=51.0, weighting=Weighting.RECON, cfg_rescale=0.5))
    schedule: RandomAnnealedSchedule | LinearAnnealSchedule = MVDREAM_SCHEDULE  # guidance.min/max_step_percent
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
    z_variance: float = 0.0  # system.loss.lambda_z_variance: 0. (HiFA's term)
    sparsity: float = 0.0  # system.loss.lambda_sparsity: 0. (mvdream.py loss_sparsity, volume.sparsity_loss)
    opaque: float = 0.0  # system.loss.lambda_opaque: 0. (mvdream.py loss_opaque, volume.opaque_loss)
    # Lambertian shading: -shading.yaml system.material (diffuse-with-point-light, ambient only for
    # the first 5000 steps, ShadingSchedule's defaults), lights by threestudio's "dreamfusion" strategy
    # with one perturbation per object (random_multiview.py). None: the albedo only, as appendix F.1
    # runs the single stage (shading dropped for memory)
    shading: ShadingSchedule | None = None
    normal_smooth: float = 0.0  # not in mvdream-sd21.yaml (the prolificdreamer system's 2D normal smoothness)
    negative_prompt: str = MVDREAM_NEGATIVE_PROMPT  # system.prompt_processor.negative_prompt (when the job gives none)
    view_prompts: bool = False  # guidance.view_dependent_prompting: false
    # CFD's integral noise (paper Eq. 17) for the first noising of each step; None (mvdream-sd21.yaml
    # has no noise generator): random noise. The surface a pixel sees is its ray's expected depth.
    integral_noise: IntegralNoiseConfig | None = None
    name: str = "nerf"  # the Progress events' stage
    texture_size: int = 1024  # ours: the baked albedo
    init_fit_steps: int = 300  # ours: Adam steps fitting the NeRF to an artist's block-out (geometry/nerf.fit_field_to_mesh)
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


# Table 2's 2-stage pipeline, second stage: CFD's configs/cfd/sd-nerf-stage2.yaml (key per value;
# a CFD lambda is halved here, CFD_LOSS_SCALE: its SDS loss has gradient 2g, ours g). The field and
# its background continue from the MVDream stage (geometry_convert_inherit_texture: true), so they
# keep that stage's hash grid (2^19 entries; CFD's configs use 2^20 in both stages).
SD_NERF_STAGE2 = NerfSettings(
    steps=20_000,  # trainer.max_steps
    render_sizes=(512, 512),  # data.width / height (low_res_prob 0.2 is not used)
    objects=(1, 1),  # data.batch_size: 1
    prior_size=512,  # SD 2.1 base's native size
    cameras=CFD_NERF_CAMERAS,
    # guidance.guidance_scale: 70. (threestudio's form) is gamma 71; weighting_strategy: dmd
    guidance=GuidanceConfig(method=Method.PSD, guidance_scale=71.0, weighting=Weighting.DMD),
    schedule=LinearAnnealSchedule(),  # t_scheduler.linear_anneal_max: [0.6, 0.8] over linear_anneal_steps [0, 20000]
    # appendix F.1: n's lr falls linearly from 1e-4 to 0 over the first 1000 steps
    negative=NegativeConfig(lr=1e-4, linear_decay=1000),
    orient=(0.0, 0.0),  # loss.lambda_orient: 0.
    z_variance=10.0 * CFD_LOSS_SCALE,  # loss.lambda_z_variance: 10.
    normal_smooth=1000.0 * CFD_LOSS_SCALE,  # loss.lambda_normal_smooth: 1000.
    negative_prompt=CFD_NEGATIVE_PROMPT,
    view_prompts=True,  # threestudio's default for SD prompts (front/back_threshold: 30.)
    integral_noise=IntegralNoiseConfig(),  # noise_generator: triplane-noise-generator (peel_depth 4, 2048, background fix)
    texture_size=1024,
    name="nerf-refine",
)


def volume_surface_points(cameras, render: VolumeRender) -> tuple[torch.Tensor, torch.Tensor]:
    """The world point each pixel sees: its ray at the expected depth of the surface, depth /
    opacity (B,H,W,3); and where the pixel is mostly surface (opacity > 0.5), (B,H,W) bool."""
    origins, dirs = camera_rays(cameras, render.depth.device)
    opacity = render.opacity.detach()
    depth = render.depth.detach() / opacity.clamp_min(1e-6)
    return origins + dirs * depth, opacity[..., 0] > 0.5


def normal_map_smoothness(render: VolumeRender) -> torch.Tensor:
    """threestudio's prolificdreamer ``lambda_normal_smooth`` term: the mean squared difference of
    neighbouring pixels of the rendered normal map, ``comp_normal = (n + 1) / 2 * opacity``."""
    comp = (render.normal + 1) / 2 * render.opacity
    return (comp[:, 1:] - comp[:, :-1]).square().mean() + (comp[:, :, 1:] - comp[:, :, :-1]).square().mean()


class NerfStage(DistillationStage):
    """A NeRF distilled from ``prior``: MultiViewPrior (MVDream, the cameras' views of an object
    together) or DiffusionPrior (one view each). ``start``: a NeRF stage to continue from (its
    field and background, as threestudio's geometry_convert_from with inherit_texture)."""

    def __init__(self, models: LoadedModels, prior: DiffusionPrior, prompt: str, negative_init: torch.Tensor,
                 settings: NerfSettings, guidance: GuidanceConfig, seed: int, out_dir: Path,
                 to_world: Callable, start: "NerfStage | None" = None) -> None:
        self.models, self.prior, self.settings, self.out, self.to_world = models, prior, settings, out_dir, to_world
        self.name = settings.name
        self.checkpoint_path = out_dir / "checkpoints" / f"{settings.name}.pt"
        self.multiview = isinstance(prior, MultiViewPrior)
        self.device = prior.device
        self.generator = torch.Generator().manual_seed(seed)
        self.shading_rng = random.Random(seed)  # ShadingSchedule's draws (albedo / textureless / diffuse share)
        with torch.random.fork_rng(devices=[]):  # the same seed starts from the same weights
            torch.manual_seed(seed)
            self.field = NerfField(settings.nerf if start is None else start.field.config, self.device)
            self.background = EnvironmentMapBackground().to(self.device)
        if start is not None:
            self.field.load_state_dict(start.field.state_dict())
            self.background.load_state_dict(start.background.state_dict())
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
        self.views = ViewPrompts(prior, prompt) if settings.view_prompts else None
        y = prior.encode_text([prompt])
        self.distiller = ScoreDistiller(prior=prior, reward=models.target_reward, text_features=self.reward_features,
                                        y=y, negative=self.negative, config=guidance, generator=self.generator,
                                        views=prior.num_frames if self.multiview else 1)
        # its own generator, so the run's RNG stream is unchanged by turning the noise on
        self.noise = None if settings.integral_noise is None else IntegralNoise(
            settings.integral_noise, torch.Generator().manual_seed(seed))
        self.step = 0
        self.log = MetricsLog()
        # a streamed mesh's faces are named by an id that rises through the job's stages (the add-on
        # moves vertices only within one id): a stage that continues another continues its ids
        self.topology_id = 0 if start is None else start.topology_id

    # -- the loop ---------------------------------------------------------------------------
    def update(self, total: int) -> tuple[torch.Tensor, StepOutput, dict]:
        s = self.settings
        size = s.render_size(self.step, total)
        cams = s.cameras.resized(size, size).sample(s.objects_at(self.step, total), self.generator)
        self.field.train(), self.background.train()
        self.occupancy.update(self.field.density, self.step, s.render.step_size, self.generator)
        orient = s.orient_weight(self.step, total)
        light = None
        if s.shading is not None:
            positions = sample_point_lights(cams, self.generator, views_per_object=self.distiller.views)
            light = s.shading.light(self.step, positions, self.shading_rng)
        render = render_volume(self.field, cams, s.render, background=self.background, light=light,
                               with_normals=orient > 0 or s.normal_smooth > 0,
                               occupancy=self.occupancy, generator=self.generator, device=self.device)
        images = render.rgb.permute(0, 3, 1, 2)
        x_c = self.prior.encode_images(resize_for_prior(images, s.prior_size))
        t = s.schedule.sample(self.step, total, x_c.shape[0], self.prior.num_train_timesteps, self.generator).to(self.device)
        camera = mvdream_camera(torch.stack([c.c2w for c in cams])).to(self.device) if self.multiview else None
        y = self.views.for_cameras(cams) if self.views is not None else None
        noise = None
        if self.noise is not None:
            points, mask = volume_surface_points(cams, render)
            noise = self.noise.sample(points, mask, tuple(x_c.shape[-2:])).to(x_c.device)
        out = self.distiller.step(x_c, t, self.step, y=y, camera=camera, noise=noise)
        # threestudio's SDS loss is 0.5 * sum((x - target)^2) / B: its gradient is the guidance over B
        loss = distillation_loss(x_c, out.grad / x_c.shape[0])
        if orient > 0:
            loss = loss + orient * orientation_loss(render)
        if s.z_variance > 0:
            loss = loss + s.z_variance * z_variance_loss(render)
        if s.normal_smooth > 0:
            loss = loss + s.normal_smooth * normal_map_smoothness(render)
        if s.sparsity > 0:
            loss = loss + s.sparsity * sparsity_loss(render.opacity)
        if s.opaque > 0:
            loss = loss + s.opaque * opaque_loss(render.opacity)
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
                           "generator": self.generator.get_state(), "shading_rng": self.shading_rng.getstate(),
                           "metrics": self.log.steps,
                           "topology_id": self.topology_id, "integral_noise": None if self.noise is None else self.noise.state_dict()},
                          self.checkpoint_path)

    def load_checkpoint(self) -> bool:
        path = self.checkpoint_path
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
        if state.get("shading_rng") is not None:
            self.shading_rng.setstate(state["shading_rng"])
        if self.noise is not None and state.get("integral_noise") is not None:
            self.noise.load_state_dict(state["integral_noise"])
        self.log.steps, self.step = state["metrics"], state["step"]
        # ids keep rising after a resume: past any the killed run streamed after this checkpoint (at
        # most one new id a step, and one for the stop)
        self.topology_id = max(self.topology_id, int(state.get("topology_id", 0)) + self.settings.checkpoint_every + 1)
        return True
