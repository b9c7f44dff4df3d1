"""Volume rendering of an implicit field (NeRF, Mildenhall et al. 2020, Eq. 3) from our cameras,
as threestudio's ``nerf-volume-renderer`` does it for MVDream-threestudio's ``mvdream-sd21(-shading)``.

    field = NerfField(NerfConfig())          # backend/geometry/nerf.py, or any VolumeField
    config, grid = VolumeRenderConfig(), OccupancyGrid()
    grid.update(field.density, step, config.step_size)                       # every step (acts every 16th)
    light = ShadingSchedule().light(step, sample_point_lights(cameras, views_per_object=4), rng)  # -shading
    out = render_volume(field, cameras, config, background=env_map, occupancy=grid, light=light,
                        with_normals=True)                                   # normals: orientation loss
    out.rgb (B,H,W,3), out.opacity (B,H,W,1), out.normal (B,H,W,3)
    loss = sds(out.rgb) + lambda_orient * orientation_loss(out)

For previews: ``VolumeRenderConfig(randomized=False)`` and the background in ``eval()`` mode (no
random background colours).

The renderer only needs a :class:`VolumeField` (density, albedo and normals at points), so
render/ does not import geometry/. Images come out as (B,H,W,C) with row 0 at the top (PNG order,
threestudio's ``get_ray_directions``), in the world frame of the cameras (glTF, +Y up).

What differs from threestudio: it samples with NerfAcc's ``OccGridEstimator`` (packed samples,
CUDA kernels). Here every ray is marched through the box at threestudio's step size
(``render_step_size = 1.732 * 2 * radius / num_samples_per_ray``) with one random offset per ray,
in a dense (rays, steps) layout; samples in cells an optional :class:`OccupancyGrid` marks empty
are dropped (NerfAcc's grid, simplified: all cells re-evaluated at each update); then a no-grad
density pass drops samples whose alpha is below ``alpha_threshold`` or whose transmittance is below
``early_stop_eps`` (NerfAcc's ``alpha_thre`` / ``early_stop_eps``), and only the rest are evaluated
with gradients and composited.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from protocol.errors import InvalidInputError, require
from backend.render.camera import Camera


@dataclass
class FieldOutput:
    density: torch.Tensor  # (N,) activated volume density, >= 0
    albedo: torch.Tensor  # (N,3) in [0,1]
    normal: torch.Tensor | None = None  # (N,3) unit, world frame; None unless asked for


class VolumeField(Protocol):
    """What the renderer needs from a field; points (N,3) in the world frame."""

    def query(self, points: torch.Tensor, with_normals: bool = False) -> FieldOutput: ...

    def density(self, points: torch.Tensor) -> torch.Tensor: ...  # (N,)


@dataclass
class VolumeRenderConfig:
    # mvdream-sd21.yaml system.renderer.radius (= system.geometry.radius): the box [-r, r]^3
    radius: float = 1.0
    # mvdream-sd21.yaml system.renderer.num_samples_per_ray; sets the step size (see module doc)
    num_samples_per_ray: int = 512
    # nerf_volume_renderer.py Config.randomized: one random offset per ray while training
    randomized: bool = True
    # nerf_volume_renderer.py passes alpha_thre=0.01 when prune_alpha_threshold (default True)
    alpha_threshold: float = 0.01
    # NerfAcc OccGridEstimator.sampling's default early_stop_eps
    early_stop_eps: float = 1e-4
    # points per no-grad density call in the pruning pass, and steps per block of its march
    # (memory and speed, not results)
    chunk: int = 1 << 16
    block_steps: int = 64

    @property
    def step_size(self) -> float:
        """nerf_volume_renderer.py: ``render_step_size = 1.732 * 2 * radius / num_samples_per_ray``."""
        return 1.732 * 2 * self.radius / self.num_samples_per_ray


class OccupancyGrid(nn.Module):
    """NerfAcc's OccGridEstimator as threestudio configures it (nerf_volume_renderer.py:
    resolution 32, one level, over the box; update_every_n_steps defaults n 16, ema_decay 0.95,
    occ_thre 0.01): a cell is occupied while the EMA of ``density * render_step_size`` at a jittered
    point in it exceeds ``min(occ_thre, mean)``. Simplified: every update evaluates all cells
    (NerfAcc samples a quarter of them after its 256 warm-up steps). Samples in empty cells are
    dropped before any density evaluation. The caller calls :meth:`update` each step."""

    def __init__(self, radius: float = 1.0, resolution: int = 32, every_n: int = 16, ema_decay: float = 0.95,
                 occ_threshold: float = 0.01) -> None:
        super().__init__()
        self.radius, self.resolution, self.every_n = radius, resolution, every_n
        self.ema_decay, self.occ_threshold = ema_decay, occ_threshold
        self.register_buffer("occupancy", torch.zeros(resolution ** 3))
        self.register_buffer("occupied", torch.ones(resolution ** 3, dtype=torch.bool))

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], step: int, step_size: float,
               generator: torch.Generator | None = None, chunk: int = 1 << 16) -> None:
        """Refresh every ``every_n`` steps (and at step 0) from ``density_fn`` (N,3) -> (N,)."""
        if step % self.every_n:
            return
        r = self.resolution
        idx = torch.arange(r ** 3, device=self.occupancy.device)
        cell = torch.stack([idx % r, idx // r % r, idx // (r * r)], -1).float()
        jitter = torch.rand(cell.shape, generator=generator).to(cell)
        points = ((cell + jitter) / r * 2 - 1) * self.radius
        occ = torch.cat([density_fn(p) for p in points.split(chunk)]) * step_size
        self.occupancy.copy_(torch.maximum(self.occupancy * self.ema_decay, occ))
        self.occupied.copy_(self.occupancy > min(self.occ_threshold, float(self.occupancy.mean())))

    def lookup(self, points: torch.Tensor) -> torch.Tensor:
        """points (...,3) world -> (...,) bool, whether their cell is occupied."""
        r = self.resolution
        cell = ((points + self.radius) / (2 * self.radius) * r).floor().long().clamp(0, r - 1)
        return self.occupied[cell[..., 0] + cell[..., 1] * r + cell[..., 2] * r * r]


@dataclass
class PointLight:
    """Lambertian shading with one point light, threestudio's ``diffuse-with-point-light-material``:
    ``albedo * (ambient + diffuse * max(0, n . l))``. positions (B,3) world, one light per view."""

    positions: torch.Tensor  # (B,3)
    ambient: tuple[float, float, float] = (0.1, 0.1, 0.1)  # diffuse_with_point_light_material.py ambient_light_color
    diffuse: tuple[float, float, float] = (0.9, 0.9, 0.9)  # diffuse_with_point_light_material.py diffuse_light_color
    textureless: bool = False  # shading "textureless": the light alone, albedo ignored


def sample_point_lights(cameras: list[Camera], generator: torch.Generator | None = None,
                        distance_range: tuple[float, float] = (0.8, 1.5), perturb: float = 1.0,
                        views_per_object: int = 1) -> torch.Tensor:
    """Light positions (B,3) by threestudio's "dreamfusion" strategy (data/uncond.py defaults
    ``light_distance_range`` (0.8, 1.5), ``light_position_perturb`` 1.0): direction = normalised camera
    position + N(0, perturb) noise, at a uniform distance. data/random_multiview.py shares one
    noise between the ``views_per_object`` consecutive views of an object (its n_view)."""
    b = len(cameras)
    require(b % views_per_object == 0, "views_per_object", f"{views_per_object} does not divide {b} cameras")
    centres = torch.stack([c.c2w[:3, 3] for c in cameras]).float()
    noise = torch.randn(b // views_per_object, 3, generator=generator).repeat_interleave(views_per_object, 0)
    distance = distance_range[0] + torch.rand(b, generator=generator) * (distance_range[1] - distance_range[0])
    return F.normalize(F.normalize(centres, dim=-1) + noise * perturb, dim=-1) * distance[:, None]


@dataclass
class ShadingSchedule:
    """How a training step picks its shading, mvdream-sd21-shading.yaml system.material (the rest
    diffuse_with_point_light_material.py's defaults): albedo only for the first ``ambient_only_steps``;
    later albedo with probability 1 - diffuse_prob, else textureless with textureless_prob, else
    diffuse; with soft_shading the diffuse share is uniform in [0,1) and ambient = 1 - diffuse."""

    ambient_only_steps: int = 5000  # mvdream-sd21-shading.yaml system.material.ambient_only_steps
    diffuse_prob: float = 0.75  # diffuse_with_point_light_material.py Config.diffuse_prob
    textureless_prob: float = 0.5  # mvdream-sd21-shading.yaml system.material.textureless_prob
    soft_shading: bool = True  # mvdream-sd21-shading.yaml system.material.soft_shading
    ambient: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mvdream-sd21-shading.yaml ambient_light_color
    diffuse: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mvdream-sd21-shading.yaml diffuse_light_color

    def light(self, step: int, light_positions: torch.Tensor, rng: random.Random) -> PointLight | None:
        """The light for this step, or None for albedo only (render without shading)."""
        if step < self.ambient_only_steps or rng.random() > self.diffuse_prob:
            return None
        textureless = rng.random() < self.textureless_prob
        if self.soft_shading:
            d = rng.random()
            return PointLight(light_positions, (1 - d,) * 3, (d,) * 3, textureless)
        return PointLight(light_positions, self.ambient, self.diffuse, textureless)


class EnvironmentMapBackground(nn.Module):
    """threestudio's ``neural-environment-map-background`` as mvdream-sd21.yaml configures it: the
    view direction's degree-3 real spherical harmonics (9 values; tcnn's SphericalHarmonics of
    (d + 1) / 2, which maps back to d) -> MLP 16-16 with ReLU, no biases -> sigmoid colour.
    With ``random_aug`` (mvdream-sd21.yaml background.random_aug: true, share_aug_bg: true) a
    training call returns, with probability ``random_aug_prob`` (0.5, its Config default), one
    random colour shared by the whole batch instead."""

    def __init__(self, random_aug: bool = True, random_aug_prob: float = 0.5, share_aug_bg: bool = True,
                 hidden: int = 16, hidden_layers: int = 2) -> None:
        super().__init__()
        self.random_aug, self.random_aug_prob, self.share_aug_bg = random_aug, random_aug_prob, share_aug_bg
        layers: list[nn.Module] = [nn.Linear(9, hidden, bias=False), nn.ReLU()]
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(hidden, hidden, bias=False), nn.ReLU()]
        layers.append(nn.Linear(hidden, 3, bias=False))
        self.network = nn.Sequential(*layers)

    def forward(self, dirs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """dirs (B,H,W,3) unit ray directions -> colours (B,H,W,3) in [0,1]."""
        color = torch.sigmoid(self.network(spherical_harmonics_3(dirs)))
        if self.training and self.random_aug and float(torch.rand((), generator=generator)) < self.random_aug_prob:
            n = 1 if self.share_aug_bg else dirs.shape[0]
            random_color = torch.rand(n, 1, 1, 3, generator=generator).to(dirs)
            color = color * 0 + random_color.expand_as(color)
        return color


def spherical_harmonics_3(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of bands 0-2 (9 values) of unit vectors d (...,3), tcnn's constants."""
    x, y, z = d.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (xx - yy),
    ], dim=-1)


@dataclass
class VolumeRender:
    """What :func:`render_volume` returns; images (B,H,W,C), row 0 on top. The per-sample tensors
    hold the composited samples only (K of them), as the regularisers need them."""

    rgb: torch.Tensor  # (B,H,W,3) foreground composited over the background
    opacity: torch.Tensor  # (B,H,W,1) sum of weights
    depth: torch.Tensor  # (B,H,W,1) sum of weights * t (not divided by opacity, as threestudio)
    z_variance: torch.Tensor  # (B,H,W,1) sum of weights * (t - depth)^2 (HiFA)
    background: torch.Tensor  # (B,H,W,3)
    normal: torch.Tensor | None  # (B,H,W,3) world, normalised sum of weights * normal; with_normals only
    weights: torch.Tensor  # (K,) compositing weight of each sample
    sample_dirs: torch.Tensor  # (K,3) unit direction of its ray (camera -> point)
    sample_normals: torch.Tensor | None  # (K,3) field normals at the samples
    ray_index: torch.Tensor = field(repr=False)  # (K,) long: flat index into (B,H,W)


def camera_rays(cameras: list[Camera], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions (B,H,W,3) in the world frame through pixel centres, row 0
    at the top (threestudio's get_ray_directions: focal = H / 2 / tan(fov_y / 2), camera looks down -Z)."""
    h, w = cameras[0].height, cameras[0].width
    if any((c.height, c.width) != (h, w) for c in cameras):
        raise InvalidInputError("cameras: all views of one render must share width and height", field="cameras")
    origins, dirs = [], []
    j, i = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                          torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    for cam in cameras:
        focal = 0.5 * h / math.tan(math.radians(cam.fov_y) / 2)
        local = torch.stack([(i - w / 2) / focal, -(j - h / 2) / focal, -torch.ones_like(i)], dim=-1)
        c2w = cam.c2w.to(device=device, dtype=torch.float32)
        dirs.append(F.normalize(local @ c2w[:3, :3].T, dim=-1))
        origins.append(c2w[:3, 3].expand(h, w, 3))
    return torch.stack(origins), torch.stack(dirs)


def ray_box(origins: torch.Tensor, dirs: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab intersection of rays (N,3) with the box [-radius, radius]^3: t_near, t_far (N,), t_near
    clamped at 0 (the ray starts at its origin); a miss has t_far <= t_near."""
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    t0, t1 = (-radius - origins) / safe, (radius - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def exclusive_transmittance(sigma_delta: torch.Tensor) -> torch.Tensor:
    """T_i = exp(-sum_{j<i} sigma_j delta_j) along the last dim (NeRF Eq. 3)."""
    return torch.exp(-(torch.cumsum(sigma_delta, -1) - sigma_delta))


def _march(near: torch.Tensor, far: torch.Tensor, step: float, randomized: bool,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-step intervals along each ray (R rays): starts (R,S), lengths (R,S) (the last one cut
    at far), valid (R,S). One offset per ray, uniform in [0, step) when randomized (NerfAcc's
    stratified near plane), else 0."""
    span = (far - near).clamp(min=0)
    s = max(1, int(math.ceil(float(span.max()) / step))) if span.numel() else 1
    offset = torch.rand(near.shape, generator=generator).to(near) * step if randomized else torch.zeros_like(near)
    starts = near[:, None] + offset[:, None] + torch.arange(s, device=near.device, dtype=near.dtype) * step
    valid = starts < far[:, None]
    lengths = (torch.minimum(starts + step, far[:, None]) - starts).clamp(min=0)
    return starts, lengths, valid


def render_volume(field: VolumeField, cameras: list[Camera], config: VolumeRenderConfig | None = None, *,
                  background: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | None = None,
                  light: PointLight | None = None, with_normals: bool = False,
                  occupancy: OccupancyGrid | None = None, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> VolumeRender:
    """Render ``field`` from each camera (all the same size). background: a module/callable of the
    ray directions (B,H,W,3) -> (B,H,W,3) (e.g. :class:`EnvironmentMapBackground`), a colour (3,)
    or (B,3), or None for white. ``light`` turns on Lambertian shading (needs normals, so it
    implies ``with_normals``). ``occupancy``: skip samples in its empty cells (threestudio's
    grid_prune); the caller updates it. ``generator`` drives the ray offsets (CPU generator)."""
    config = config or VolumeRenderConfig()
    require(config.num_samples_per_ray > 0, "num_samples_per_ray", f"must be positive, got {config.num_samples_per_ray}")
    with_normals = with_normals or light is not None
    origins, dirs = camera_rays(cameras, device)
    b, h, w, _ = dirs.shape
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    near, far = ray_box(o, d, config.radius)
    hit = torch.nonzero(far > near).squeeze(1)  # rays that cross the box
    starts, lengths, valid = _march(near[hit], far[hit], config.step_size, config.randomized, generator)
    mids = starts + lengths / 2
    if occupancy is not None:
        valid = valid & occupancy.lookup(o[hit][:, None, :] + d[hit][:, None, :] * mids[..., None])

    # 1. pruning, without gradients: alpha and transmittance of every sample in the box, marched in
    # blocks of steps so that rays stop being evaluated once their transmittance is below
    # early_stop_eps (the samples past that point are dropped anyway: the same set as a full pass)
    with torch.no_grad():
        o_hit, d_hit = o[hit], d[hit]
        sigma_delta = torch.zeros_like(mids)
        alive = torch.ones(len(hit), dtype=torch.bool, device=mids.device)
        for b0 in range(0, mids.shape[1], config.block_steps):
            rows, cols = torch.nonzero(valid[:, b0:b0 + config.block_steps] & alive[:, None], as_tuple=True)
            cols = cols + b0
            for start in range(0, len(rows), config.chunk):
                r_, c_ = rows[start:start + config.chunk], cols[start:start + config.chunk]
                sigma = field.density(o_hit[r_] + d_hit[r_] * mids[r_, c_, None])
                sigma_delta[r_, c_] = sigma.to(sigma_delta.dtype) * lengths[r_, c_]
            depth_so_far = sigma_delta[:, :b0 + config.block_steps].sum(1)
            alive = torch.exp(-depth_so_far) >= config.early_stop_eps
            if not bool(alive.any()):
                break
        alpha = 1 - torch.exp(-sigma_delta)
        keep = valid & (alpha >= config.alpha_threshold) & (exclusive_transmittance(sigma_delta) >= config.early_stop_eps)
        # the kept samples packed to the left of a (R, Kmax) layout, in ray order
        column = torch.cumsum(keep, 1) - 1
        k_max = int(column.max()) + 1 if keep.any() else 1
        rows, cols = torch.nonzero(keep, as_tuple=True)
        packed_cols = column[rows, cols]

    # 2. the kept samples with gradients
    t_mid, delta = mids[rows, cols], lengths[rows, cols]
    ray = hit[rows]
    sample_dirs = d[ray]
    points = o[ray] + sample_dirs * t_mid[:, None]
    out = field.query(points, with_normals=with_normals)
    color = out.albedo
    if light is not None:
        color = _shade(out.albedo, out.normal, points, light, ray // (h * w))
    r = len(hit)
    sd = out.density.new_zeros(r, k_max).index_put((rows, packed_cols), out.density * delta)  # sigma * delta
    weights_2d = exclusive_transmittance(sd) * (1 - torch.exp(-sd))
    weights = weights_2d[rows, packed_cols]

    def accumulate(values: torch.Tensor) -> torch.Tensor:  # per-sample (K,C) -> per-pixel (B*H*W, C)
        acc = torch.zeros(b * h * w, values.shape[1], dtype=values.dtype, device=values.device)
        return acc.index_add(0, ray, weights[:, None] * values)

    opacity = accumulate(torch.ones_like(t_mid)[:, None])
    depth = accumulate(t_mid[:, None])
    z_variance = accumulate((t_mid[:, None] - depth[ray]) ** 2)
    rgb_fg = accumulate(color)
    bg = _background(background, dirs, generator).reshape(-1, 3)
    rgb = rgb_fg + bg * (1 - opacity)
    normal = None
    if with_normals:
        normal = F.normalize(accumulate(out.normal), dim=-1, eps=1e-12).view(b, h, w, 3)
    return VolumeRender(rgb.view(b, h, w, 3), opacity.view(b, h, w, 1), depth.view(b, h, w, 1),
                        z_variance.view(b, h, w, 1), bg.view(b, h, w, 3), normal, weights, sample_dirs,
                        out.normal, ray)


def _shade(albedo: torch.Tensor, normal: torch.Tensor, points: torch.Tensor, light: PointLight,
           view: torch.Tensor) -> torch.Tensor:
    """diffuse_with_point_light_material.py forward: colour = clamp(albedo) * (ambient + diffuse max(0, n.l))."""
    to_light = F.normalize(light.positions.to(points)[view] - points, dim=-1)
    diffuse = torch.tensor(light.diffuse).to(points) * (normal * to_light).sum(-1, keepdim=True).clamp(min=0)
    textureless = diffuse + torch.tensor(light.ambient).to(points)
    if light.textureless:
        return textureless + albedo * 0
    return albedo.clamp(0, 1) * textureless


def _background(background, dirs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    b = dirs.shape[0]
    if background is None:
        return torch.ones_like(dirs)
    if isinstance(background, torch.Tensor):
        colour = background.to(dirs)
        if colour.shape == (3,):
            colour = colour.expand(b, 3)
        if colour.shape != (b, 3):
            raise InvalidInputError(f"background: expected (3,) or ({b},3) colours, got {tuple(colour.shape)}",
                                    field="background")
        return colour[:, None, None, :].expand_as(dirs)
    if isinstance(background, EnvironmentMapBackground):
        return background(dirs, generator)
    return background(dirs)


# Regularisers, as threestudio/systems/mvdream.py's training_step computes them.

def orientation_loss(render: VolumeRender) -> torch.Tensor:
    """Ref-NeRF's orientation loss as mvdream.py writes it: ``sum(w.detach() * max(0, n . d)^2) /
    #(opacity > 0)``: visible samples whose normal faces away from the camera (d = ray direction)
    are penalised. Needs ``with_normals=True``."""
    if render.sample_normals is None:
        raise InvalidInputError("orientation_loss: render with with_normals=True", field="with_normals")
    facing = (render.sample_normals * render.sample_dirs).sum(-1).clamp(min=0)
    return (render.weights.detach() * facing ** 2).sum() / (render.opacity > 0).sum().clamp(min=1)


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """mvdream.py ``loss_sparsity = sqrt(opacity^2 + 0.01).mean()``."""
    return (opacity ** 2 + 0.01).sqrt().mean()


def opaque_loss(opacity: torch.Tensor) -> torch.Tensor:
    """mvdream.py ``loss_opaque``: the binary entropy of the opacity clamped to [1e-3, 1 - 1e-3]
    (``binary_cross_entropy(o, o)``), low where pixels are fully empty or fully covered."""
    o = opacity.clamp(1e-3, 1 - 1e-3)
    return -(o * torch.log(o) + (1 - o) * torch.log(1 - o)).mean()


def z_variance_loss(render: VolumeRender) -> torch.Tensor:
    """mvdream.py ``loss_z_variance`` (HiFA): the depth variance along rays with opacity > 0.5."""
    solid = render.opacity > 0.5
    if not bool(solid.any()):
        return render.z_variance.sum() * 0
    return render.z_variance[solid].mean()
