"""The geometry stage of generate: DMTet optimised by SDS on normal and shaded renders
(appendix F.1: "we only PSD in the texture space" — rewards are trained on RGB images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from protocol.errors import NumericalError
from protocol.events import MeshSnapshot
from backend.files import atomic_torch_save
from backend.geometry.dmtet import TetGrid, marching_tets
from backend.geometry.sdf import sdf_sign_entropy
from backend.geometry.surface import laplacian_smoothness, mesh_edges, normal_consistency
from backend.models import LoadedModels
from backend.outputs import MetricsLog
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller, StepOutput
from backend.psd.guidance import Weighting, distillation_loss
from backend.psd.negative import NegativeConfig, NegativeEmbedding
from backend.psd.schedule import DreamTimeSchedule
from backend.render.camera import OrbitSpec
from backend.render.integral_noise import IntegralNoise, IntegralNoiseConfig, surface_points
from backend.pipelines.cfd import CFD_CAMERAS, CFD_LOSS_SCALE
from backend.pipelines.stage import DistillationStage
from backend.pipelines.views import ViewPrompts, resize_for_prior
from backend.render.ops import RasterContext
from backend.render.shading import rasterize_views, render_lambertian, render_normals


class Primitive(str, Enum):
    SPHERE = "sphere"
    ELLIPSOID = "ellipsoid"


@dataclass(frozen=True)
class GeometrySettings:
    """The DMTet geometry stage, from ``configs/cfd/sd-mesh-geometry-stage2.yaml`` (the config
    appendix F.1's 3-stage pipeline ran; "15000 steps at 1024^2"). Each field names its key; the
    fields marked "ours" are not in that config."""

    steps: int = 15000  # trainer.max_steps
    grid_resolution: int = 128  # geometry.isosurface_resolution
    render_size: int = 1024  # data.width / data.height
    prior_size: int = 512  # the guidance resizes renders to 512 before the VAE
    lr: float = 0.01  # optimizer.args.lr
    betas: tuple[float, float] = (0.9, 0.99)  # optimizer.args.betas
    views: int = 1  # data.batch_size
    primitive: Primitive = Primitive.SPHERE  # ours: CFD starts from the stage-1 NeRF
    primitive_radius: float = 0.5  # ours; in the unit frame, where the object spans [-0.5, 0.5]
    normal_consistency_weight: float = 1e4 * CFD_LOSS_SCALE  # loss.lambda_normal_consistency: 10000
    laplacian_weight: float = 1e4 * CFD_LOSS_SCALE  # loss.lambda_laplacian_smoothness: 10000
    sdf_sign_weight: float = 0.0  # not in CFD's config (nvdiffrec's SDF regulariser; 0.2 there)
    # threestudio's prolificdreamer system feeds the geometry stage's guidance ``comp_normal`` only;
    # below 1, the other renders are Lambertian-shaded grey (ours)
    normal_render_probability: float = 1.0
    cameras: OrbitSpec = field(default_factory=lambda: CFD_CAMERAS)
    # guidance.guidance_scale: 50. in threestudio's form, eps(y) + s (eps(y) - eps(u)), is gamma = 51
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(
        method=Method.SDS, guidance_scale=51.0, weighting=Weighting.DMD))  # guidance.weighting_strategy: dmd
    schedule: DreamTimeSchedule = field(default_factory=DreamTimeSchedule)  # t_scheduler.dreamtime_anneal
    snapshot_every: int = 50
    checkpoint_every: int = 200
    # CFD's integral noise (noise_generator: triplane-noise-generator, paper Eq. 17) for SDS's
    # noise; None: random noise
    integral_noise: IntegralNoiseConfig | None = field(default_factory=IntegralNoiseConfig)


class GeometryStage(DistillationStage):
    name = "geometry"
    CHECKPOINT = "checkpoints/geometry.pt"

    def __init__(self, models: LoadedModels, prompt: str, negative_init: torch.Tensor, sdf_init: torch.Tensor,
                 grid: TetGrid, settings: GeometrySettings, seed: int, out_dir: Path, to_world: Callable,
                 ctx: RasterContext | None = None) -> None:
        self.models, self.settings, self.out, self.to_world = models, settings, out_dir, to_world
        prior = models.prior
        self.device = prior.device
        self.ctx = ctx or RasterContext(self.device)
        self.grid = TetGrid(grid.vertices.to(self.device), grid.tets.to(self.device), grid.resolution)
        # half a cell per axis: the grid spans [-1, 1]^3 or, started from a NeRF, its surface's box
        self.half_cell = (self.grid.vertices.amax(0) - self.grid.vertices.amin(0)) / (2 * grid.resolution)
        self.sdf = torch.nn.Parameter(sdf_init.to(self.device).float().clone())
        self.deform = torch.nn.Parameter(torch.zeros_like(self.grid.vertices))
        self.optimizer = torch.optim.Adam([self.sdf, self.deform], lr=settings.lr, betas=settings.betas)
        self.generator = torch.Generator().manual_seed(seed)
        self.views = ViewPrompts(prior, prompt)
        negative = NegativeEmbedding(negative_init, NegativeConfig(lr=0.0))  # SDS here: n stays fixed
        self.distiller = ScoreDistiller(prior=prior, reward=models.target_reward, text_features=None,
                                        y=self.views.front, negative=negative, config=settings.guidance,
                                        generator=self.generator)
        self.cameras = settings.cameras.resized(settings.render_size, settings.render_size)
        # its own generator, so the run's RNG stream is unchanged by turning the noise on
        self.noise = None if settings.integral_noise is None else IntegralNoise(
            settings.integral_noise, torch.Generator().manual_seed(seed))
        self.step = 0
        self.log = MetricsLog()
        self.topology_id = 0
        self._last_faces: torch.Tensor | None = None

    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current surface (unit frame): marching tets on the deformed grid. Deformation is
        bounded to half a cell so tetrahedra cannot invert."""
        offset = torch.tanh(self.deform) * self.half_cell
        verts, faces = marching_tets(self.grid.vertices + offset, self.grid.tets, self.sdf)
        if faces.shape[0] == 0:
            raise NumericalError(f"geometry step {self.step}: the surface vanished (no zero crossing left in the SDF)")
        return verts, faces

    def snapshot(self, verts: torch.Tensor, faces: torch.Tensor) -> MeshSnapshot:
        if self._last_faces is None or not torch.equal(self._last_faces, faces):
            self.topology_id += 1
            self._last_faces = faces.clone()
        world = self.to_world(verts.detach().cpu().numpy()).astype("float32")
        return MeshSnapshot(self.step, world, faces.cpu().numpy().astype("int32"), None, self.topology_id)

    def save_checkpoint(self) -> None:
        atomic_torch_save({"step": self.step, "sdf": self.sdf.detach().cpu(), "deform": self.deform.detach().cpu(),
                           "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                           "metrics": self.log.steps, "topology_id": self.topology_id,
                           "integral_noise": None if self.noise is None else self.noise.state_dict()},
                          self.out / self.CHECKPOINT)

    def load_checkpoint(self) -> bool:
        path = self.out / self.CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.sdf.data.copy_(state["sdf"])
        self.deform.data.copy_(state["deform"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.log.steps, self.step = state["metrics"], state["step"]
        # ids keep rising after a resume: past any the killed run streamed after this checkpoint (at
        # most one new id a step, and one for the stop)
        self.topology_id = max(self.topology_id, int(state.get("topology_id", 0)) + self.settings.checkpoint_every + 1)
        if self.noise is not None and state.get("integral_noise") is not None:
            self.noise.load_state_dict(state["integral_noise"])
        return True

    def update(self, total: int) -> tuple[torch.Tensor, StepOutput, dict]:
        s = self.settings
        verts, faces = self.extract()
        cams, y = self.views.sample(self.cameras, s.views, self.generator)
        frags = rasterize_views(self.ctx, verts, faces.int(), cams)
        if float(torch.rand(1, generator=self.generator)) < s.normal_render_probability:
            images = render_normals(self.ctx, frags, verts, faces, torch.ones(3, device=self.device))
        else:
            light = F.normalize(cams[0].c2w[:3, 3].to(self.device) + torch.randn(3, generator=self.generator).to(self.device) * 0.5, dim=0)
            images = render_lambertian(self.ctx, frags, verts, faces, light)
        prior = self.models.prior
        t = s.schedule.sample(self.step, total, s.views, prior.num_train_timesteps, self.generator).to(self.device)
        x_c = prior.encode_images(resize_for_prior(images, s.prior_size))
        noise = None
        if self.noise is not None:
            points, mask = surface_points(self.ctx, frags, verts, faces.int())
            noise = self.noise.sample(points, mask, tuple(x_c.shape[-2:])).to(x_c.device)
        out = self.distiller.step(x_c, t, self.step, y=y, noise=noise)
        loss = distillation_loss(x_c, out.grad)
        if s.normal_consistency_weight > 0 or s.laplacian_weight > 0:
            edges = mesh_edges(faces)
            loss = loss + s.normal_consistency_weight * normal_consistency(verts, faces, edges) \
                + s.laplacian_weight * laplacian_smoothness(verts, faces, edges)
        if s.sdf_sign_weight > 0:
            loss = loss + s.sdf_sign_weight * sdf_sign_entropy(self.sdf, self.grid.edges)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return t, out, {"faces": int(faces.shape[0])}

    def snapshot_event(self) -> MeshSnapshot:
        with torch.no_grad():
            return self.snapshot(*self.extract())
