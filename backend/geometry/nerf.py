"""The NeRF coarse representation: threestudio's ``implicit-volume`` as MVDream-threestudio's
``configs/mvdream-sd21.yaml`` (and ``-shading``) configures it, in plain PyTorch.

    field = NerfField(NerfConfig())                       # density + albedo on a hash grid
    out = render_volume(field, cameras, ...)              # backend/render/volume.py
    verts, faces = extract_mesh(field, resolution=128)    # density 25 level set, marching tets
    mesh = bake_albedo(field, Mesh(verts, faces), 1024)   # xatlas UVs + albedo texture

Positions live in the world box [-radius, radius]^3; the hash grid sees them scaled to [0, 1]
(threestudio's ``contract_to_unisphere`` without contraction). Checkpoints are ``state_dict()``
plus the config (``dataclasses.asdict``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from protocol.errors import InvalidInputError, require, require_choice
from backend.geometry.dmtet import TetGrid, marching_tets
from backend.geometry.mesh import Mesh
from backend.geometry.sdf import mesh_sdf, sample_surface
from backend.geometry.uv import UNWRAP_MAX_FACES, dilate, unwrap
from backend.render.ops import RasterContext, interpolate, rasterize
from backend.render.volume import FieldOutput

log = logging.getLogger(__name__)

# instant-NGP's spatial hash (Mueller et al. 2022, Eq. 4): xor of the coordinates times these
HASH_PRIMES = (1, 2654435761, 805459861)
_PRIMES32 = tuple(p - (1 << 32) if p >= 1 << 31 else p for p in HASH_PRIMES)  # the same bits as int32


@dataclass
class HashGridConfig:
    # all: mvdream-sd21.yaml system.geometry.pos_encoding_config (otype HashGrid)
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378  # finest level 16 * 1.447^15 = 4096
    # tiny-cuda-nn's HashGrid when it imports and the device is CUDA; else (always by default) ours
    use_tcnn: bool = False


class HashGrid(nn.Module):
    """Multiresolution hash encoding (instant-NGP, Mueller et al. 2022, section 3) with
    tiny-cuda-nn's layout: level l has ``scale_l = base * per_level_scale^l - 1`` and
    ``ceil(scale_l) + 1`` vertices per axis; a point x in [0,1]^3 sits at ``x * scale_l + 0.5``
    in its grid; a level whose vertices fit its table (at most 2^log2_hashmap_size, rounded up
    to 8) is indexed densely, the others through the spatial hash; features are trilinearly
    interpolated from the cell's 8 corners and the levels concatenated. Tables start uniform in
    [-1e-4, 1e-4] as in tcnn. forward: x (N,3) -> (N, n_levels * n_features_per_level), twice
    differentiable in x (the orientation loss trains through analytic normals)."""

    def __init__(self, config: HashGridConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or HashGridConfig()
        require(c.n_levels > 0 and c.n_features_per_level > 0, "hash_grid", "needs at least one level and feature")
        max_size = 2 ** c.log2_hashmap_size
        scales, resolutions, sizes, offsets = [], [], [], [0]
        for level in range(c.n_levels):
            scale = 2.0 ** (level * math.log2(c.per_level_scale)) * c.base_resolution - 1.0
            res = int(math.ceil(scale)) + 1
            size = min(max_size, (res ** 3 + 7) // 8 * 8)
            scales.append(scale), resolutions.append(res), sizes.append(size), offsets.append(offsets[-1] + size)
        self.n_output_dims = c.n_levels * c.n_features_per_level
        self.embeddings = nn.Parameter(torch.empty(offsets[-1], c.n_features_per_level).uniform_(-1e-4, 1e-4))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.int32), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.int32), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets[:-1], dtype=torch.int32), persistent=False)
        hashed = [r ** 3 > s for r, s in zip(resolutions, sizes)]
        self.n_dense = hashed.count(False)  # levels indexed densely: the coarsest ones
        require(hashed == [False] * self.n_dense + [True] * (c.n_levels - self.n_dense), "per_level_scale",
                f"must be >= 1 (levels coarse to fine), got {c.per_level_scale}")
        self.register_buffer("hashed", torch.tensor(hashed), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        pos = x[:, None, :] * self.scales[None, :, None] + 0.5  # (N,L,3)
        cell = torch.floor(pos.detach())
        frac = pos - cell  # differentiable in x
        # per axis: the cell's lower and upper vertex (N,L,2) and their trilinear weights
        lo = cell.to(torch.int32)
        g = [torch.stack([lo[..., a], lo[..., a] + 1], -1) for a in range(3)]
        wa = [torch.stack([1 - frac[..., a], frac[..., a]], -1) for a in range(3)]
        # the 8 corners as (N,L,2,2,2) -> (N,L,8), corner index x + 2y + 4z: the dense levels (the
        # first ones) by position, the others by the hash; int32 products wrap like tcnn's uint32
        # ones, so the low bits (all the table index uses) agree
        k = self.n_dense
        gx, gy, gz = g[0][..., None, None, :], g[1][..., None, :, None], g[2][..., :, None, None]
        parts = []
        if k > 0:
            res = self.resolutions[:k, None, None, None]
            dense = (gx[:, :k] + gy[:, :k] * res + gz[:, :k] * res * res).remainder(self.sizes[:k, None, None, None])
            parts.append(dense + self.offsets[:k, None, None, None])
        if k < self.config.n_levels:
            hashed = gx[:, k:] * _PRIMES32[0] ^ gy[:, k:] * _PRIMES32[1] ^ gz[:, k:] * _PRIMES32[2]
            parts.append((hashed & (self.sizes[k:, None, None, None] - 1)) + self.offsets[k:, None, None, None])
        index = torch.cat(parts, 1).reshape(n, self.config.n_levels, 8)
        w = wa[0][..., None, None, :] * wa[1][..., None, :, None] * wa[2][..., :, None, None]
        w = w.reshape(n, self.config.n_levels, 8)
        features = F.embedding(index, self.embeddings)  # (N,L,8,F)
        return torch.einsum("nlc,nlcf->nlf", w, features).reshape(n, self.n_output_dims)


class _TcnnHashGrid(nn.Module):
    """tiny-cuda-nn's encoding with the same config (its own parameter layout: checkpoints do not
    move between the two)."""

    def __init__(self, config: HashGridConfig, tcnn) -> None:
        super().__init__()
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": config.n_levels, "n_features_per_level": config.n_features_per_level,
            "log2_hashmap_size": config.log2_hashmap_size, "base_resolution": config.base_resolution,
            "per_level_scale": config.per_level_scale})
        self.n_output_dims = self.encoding.n_output_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x).float()


def make_hash_grid(config: HashGridConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Ours, or tiny-cuda-nn's when ``use_tcnn`` and it imports on a CUDA device (never required)."""
    if config.use_tcnn and torch.device(device).type == "cuda":
        try:
            import tinycudann as tcnn  # optional: not a dependency
        except Exception as exc:  # ImportError, or its CUDA build failing at import
            log.info("tiny-cuda-nn unavailable (%s); using the PyTorch hash grid", exc)
        else:
            return _TcnnHashGrid(config, tcnn)
    return HashGrid(config)


DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion")
DENSITY_ACTIVATIONS = ("softplus", "exp", "shifted_softplus")


@dataclass
class NerfConfig:
    radius: float = 1.0  # mvdream-sd21.yaml system.geometry.radius: the box [-1, 1]^3
    hash_grid: HashGridConfig = field(default_factory=HashGridConfig)
    # implicit_volume.py Config.mlp_network_config: VanillaMLP, 64 neurons, 1 hidden layer, ReLU,
    # no biases (networks.py VanillaMLP.make_linear), one for density and one for the features
    mlp_neurons: int = 64
    mlp_hidden_layers: int = 1
    density_bias: str | float = "blob_magic3d"  # mvdream-sd21.yaml system.geometry.density_bias
    density_activation: str = "softplus"  # mvdream-sd21.yaml system.geometry.density_activation
    density_blob_scale: float = 10.0  # mvdream-sd21.yaml system.geometry.density_blob_scale
    density_blob_std: float = 0.5  # mvdream-sd21.yaml system.geometry.density_blob_std
    isosurface_threshold: float = 25.0  # implicit_volume.py Config.isosurface_threshold
    isosurface_resolution: int = 128  # geometry/base.py BaseImplicitGeometry.Config.isosurface_resolution

    def __post_init__(self) -> None:
        if isinstance(self.hash_grid, dict):  # rebuilt from dataclasses.asdict in a checkpoint
            self.hash_grid = HashGridConfig(**self.hash_grid)
        if not isinstance(self.density_bias, (int, float)):
            require_choice(self.density_bias, DENSITY_BIASES, "density_bias")
        require_choice(self.density_activation, DENSITY_ACTIVATIONS, "density_activation")
        require(self.radius > 0, "radius", f"must be positive, got {self.radius}")


def _mlp(n_in: int, n_out: int, neurons: int, hidden_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, neurons, bias=False), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(neurons, neurons, bias=False), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(neurons, n_out, bias=False))


def density_bias(points: torch.Tensor, config: NerfConfig) -> torch.Tensor:
    """The pre-activation density bias at world points (N,3) -> (N,) (implicit_volume.py
    get_activated_density): blob_magic3d ``scale * (1 - |p| / std)``, blob_dreamfusion
    ``scale * exp(-|p|^2 / (2 std^2))``, or a constant."""
    if isinstance(config.density_bias, (int, float)):
        return points.new_full(points.shape[:-1], float(config.density_bias))
    if config.density_bias == "blob_magic3d":
        return config.density_blob_scale * (1 - points.norm(dim=-1) / config.density_blob_std)
    return config.density_blob_scale * torch.exp(-0.5 * points.square().sum(-1) / config.density_blob_std ** 2)


def activate_density(raw: torch.Tensor, activation: str) -> torch.Tensor:
    """threestudio utils/ops.py get_activation for the density activations we offer."""
    if activation == "softplus":
        return F.softplus(raw)
    if activation == "shifted_softplus":
        return F.softplus(raw - 1.0)
    return torch.exp(raw)


class NerfField(nn.Module):
    """Density and albedo at world points (threestudio's ImplicitVolume with no-material /
    diffuse-with-point-light albedo): a hash grid encoding feeds two small MLPs; density =
    activation(mlp + blob bias), albedo = sigmoid(mlp). Normals are 'analytic' (implicit_volume.py
    normal_type 'analytic', as mvdream-sd21-shading.yaml sets it): ``-normalize(d density / d p)``,
    built with create_graph so losses on normals train the field. A :class:`VolumeField`."""

    def __init__(self, config: NerfConfig | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = c = config or NerfConfig()
        self.encoding = make_hash_grid(c.hash_grid, device)
        self.density_network = _mlp(self.encoding.n_output_dims, 1, c.mlp_neurons, c.mlp_hidden_layers)
        self.feature_network = _mlp(self.encoding.n_output_dims, 3, c.mlp_neurons, c.mlp_hidden_layers)
        self.to(device)

    def _encode(self, points: torch.Tensor) -> torch.Tensor:
        return self.encoding((points + self.config.radius) / (2 * self.config.radius))

    def _density(self, points: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        raw = self.density_network(enc)[:, 0] + density_bias(points, self.config)
        return activate_density(raw, self.config.density_activation)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """points (N,3) world -> activated density (N,)."""
        return self._density(points, self._encode(points))

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """points (N,3) world -> albedo (N,3) in [0,1]."""
        return torch.sigmoid(self.feature_network(self._encode(points)))

    def query(self, points: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        """Density (N,), albedo (N,3) and, with ``with_normals``, analytic normals (N,3)."""
        if not with_normals:
            enc = self._encode(points)
            return FieldOutput(self._density(points, enc), torch.sigmoid(self.feature_network(enc)))
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            p = points if points.requires_grad else points.detach().requires_grad_(True)
            enc = self._encode(p)
            sigma = self._density(p, enc)
            grad, = torch.autograd.grad(sigma.sum(), p, create_graph=outer_grad)
            normal = -F.normalize(grad, dim=-1)
            albedo = torch.sigmoid(self.feature_network(enc))
        if not outer_grad:
            sigma, albedo, normal = sigma.detach(), albedo.detach(), normal.detach()
        return FieldOutput(sigma, albedo, normal)

    def forward(self, points: torch.Tensor, with_normals: bool = False) -> FieldOutput:
        return self.query(points, with_normals)


def param_groups(field: NerfField, background: nn.Module | None = None, encoding_lr: float = 0.01,
                 network_lr: float = 0.001, background_lr: float = 0.001) -> list[dict]:
    """Optimiser groups with mvdream-sd21.yaml's learning rates (system.optimizer.params:
    geometry.encoding 0.01, geometry.density_network and feature_network 0.001, background 0.001;
    its optimizer is AdamW with betas (0.9, 0.99), eps 1e-15)."""
    groups = [{"params": list(field.encoding.parameters()), "lr": encoding_lr},
              {"params": list(field.density_network.parameters()) + list(field.feature_network.parameters()),
               "lr": network_lr}]
    if background is not None:
        groups.append({"params": list(background.parameters()), "lr": background_lr})
    return groups


def _evaluate(fn, points: torch.Tensor, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(p) for p in points.split(chunk)]) if len(points) else points.new_zeros(0)


def extract_mesh(field: NerfField, resolution: int | None = None, threshold: float | None = None,
                 remove_outliers: float = 0.01, coarse_to_fine: bool = True,
                 chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The surface where density = ``threshold`` (NerfConfig.isosurface_threshold, 25 by default)
    by marching tetrahedra (backend/geometry/dmtet.py) on a ``resolution``^3 grid
    (NerfConfig.isosurface_resolution, 128), in the field's (world) frame, faces wound outward.
    As threestudio's BaseImplicitGeometry.isosurface (geometry/base.py): connected pieces with
    fewer than ``remove_outliers`` of the faces are dropped (isosurface_remove_outliers,
    isosurface_outlier_n_faces_threshold 0.01), and with ``coarse_to_fine``
    (isosurface_coarse_to_fine) a first pass over the whole box finds the surface's bounds, grown
    by 10% of their size, and a second pass marches that tighter box. Returns positions (V,3)
    float32 and faces (F,3) int64 on the CPU; raises InvalidInputError when no surface crosses
    the threshold."""
    c = field.config
    resolution = resolution or c.isosurface_resolution
    threshold = c.isosurface_threshold if threshold is None else threshold
    require(2 <= resolution <= 512, "resolution", f"must lie in 2..512, got {resolution}")
    box = torch.tensor([[-c.radius] * 3, [c.radius] * 3])
    verts, faces = _isosurface(field, box, resolution, threshold, remove_outliers, chunk)
    if coarse_to_fine:
        lo, hi = verts.amin(0), verts.amax(0)
        box = torch.stack([torch.maximum(lo - (hi - lo) * 0.1, box[0]), torch.minimum(hi + (hi - lo) * 0.1, box[1])])
        verts, faces = _isosurface(field, box, resolution, threshold, remove_outliers, chunk)
    return verts, faces


def _isosurface(field: NerfField, box: torch.Tensor, resolution: int, threshold: float, remove_outliers: float,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One marching-tets pass over the axis-aligned ``box`` (2,3): (lower corner, upper corner)."""
    device = next(field.parameters()).device
    grid = TetGrid.cube(resolution, device)
    lo, hi = box.to(device)
    points = lo + (grid.vertices + 1) / 2 * (hi - lo)
    sdf = threshold - _evaluate(field.density, points, chunk)  # < 0 inside, as marching_tets expects
    verts, faces = marching_tets(points, grid.tets, sdf)
    if faces.shape[0] == 0:
        raise InvalidInputError(f"threshold: no surface, the density stays on one side of {threshold} "
                                f"(range {float(threshold - sdf.max()):.3g}..{float(threshold - sdf.min()):.3g})",
                                field="threshold")
    verts, faces = verts.float().cpu(), faces.cpu()
    if remove_outliers > 0:
        faces = _drop_small_components(faces, verts.shape[0], remove_outliers)
    used, faces = torch.unique(faces, return_inverse=True)  # compact to the vertices the kept faces use
    return verts[used].contiguous(), faces.reshape(-1, 3)


def _drop_small_components(faces: torch.Tensor, n_vertices: int, fraction: float) -> torch.Tensor:
    """Faces of the connected pieces holding at least ``fraction`` of all faces (min-label
    propagation over the edges with pointer jumping)."""
    label = torch.arange(n_vertices)
    a = faces.reshape(-1)
    b = faces[:, [1, 2, 0]].reshape(-1)
    while True:
        low = torch.minimum(label[a], label[b])
        new = label.scatter_reduce(0, a, low, "amin").scatter_reduce(0, b, low, "amin")
        new = new[new]
        if torch.equal(new, label):
            break
        label = new
    face_label = label[faces[:, 0]]
    counts = torch.bincount(face_label, minlength=n_vertices)
    return faces[counts[face_label] >= fraction * faces.shape[0]]


def bake_albedo(field: NerfField, mesh: Mesh, texture_size: int = 1024, ctx: RasterContext | None = None,
                max_faces: int | None = UNWRAP_MAX_FACES, chunk: int = 1 << 16) -> Mesh:
    """xatlas UVs for ``mesh`` (decimated above ``max_faces``, backend/geometry/uv.py) and the
    field's albedo baked into a ``texture_size``^2 uint8 sRGB RGBA texture: each texel a chart
    covers takes the albedo at the surface point the rasterised UV layout puts there, then charts
    are dilated over the seams. The albedo is what the diffusion prior saw, so its values are
    stored as they are (sRGB). Returns a new Mesh with per-corner UVs and the texture."""
    require(8 <= texture_size <= 8192, "texture_size", f"must lie in 8..8192, got {texture_size}")
    device = next(field.parameters()).device
    ctx = ctx or RasterContext(device, "torch")
    out, _ = unwrap(mesh, max_faces=max_faces, resolution=texture_size)
    uvs = out.uvs.to(ctx.device).reshape(-1, 2)
    corner_tri = torch.arange(uvs.shape[0], device=ctx.device, dtype=torch.int32).view(-1, 3)
    # UV layout as clip positions: texel row 0 is v = 0 (glTF's top), NDC y = -1 is the raster's row 0
    clip = torch.cat([uvs * 2 - 1, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], dim=1)
    rast = rasterize(ctx, clip[None], corner_tri, (texture_size, texture_size))
    corner_pos = out.positions.to(ctx.device)[out.faces.to(ctx.device)].reshape(-1, 3)
    surface = interpolate(ctx, corner_pos, rast, corner_tri)[0]  # (H,W,3)
    mask = rast[0, ..., 3] > 0
    colour = torch.zeros(texture_size, texture_size, 3, device=device)
    colour[mask.to(device)] = _evaluate(field.albedo, surface[mask].to(device), chunk)
    # a face smaller than a texel covers no texel centre: the texel under its UV centroid takes the
    # albedo at its 3D centroid, so that no face samples an empty texel (black specks)
    centre_uv = out.uvs.mean(dim=1)
    col = (centre_uv[:, 0] * texture_size).long().clamp(0, texture_size - 1)
    row = (centre_uv[:, 1] * texture_size).long().clamp(0, texture_size - 1)
    missed = torch.nonzero(~mask.cpu()[row, col]).squeeze(1)
    if len(missed):
        flat, where = torch.unique(row[missed] * texture_size + col[missed], return_inverse=True)
        first = torch.full((len(flat),), len(missed)).scatter_reduce(0, where, torch.arange(len(missed)), "amin")
        faces = missed[first]  # one face per texel, the lowest index: the same bake every time
        centres = out.positions[out.faces[faces]].mean(dim=1)
        colour[row[faces].to(device), col[faces].to(device)] = _evaluate(field.albedo, centres.to(device), chunk)
        mask = mask.cpu().clone()
        mask[row[faces], col[faces]] = True
    colour = dilate(colour.cpu(), mask.cpu(), iterations=max(8, texture_size // 64))
    rgba = np.full((texture_size, texture_size, 4), 255, dtype=np.uint8)
    rgba[..., :3] = (colour.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    return Mesh(out.positions, out.faces, out.uvs, rgba, out.topology_id)


def dmtet_from_field(field: NerfField, resolution: int, threshold: float, margin: float = 0.1,
                     chunk: int = 1 << 16) -> tuple[TetGrid, torch.Tensor]:
    """The DMTet stage's start from a coarse NeRF, as threestudio's ``TetrahedraSDFGrid.create_from``
    does it: a ``resolution`` tet grid over the tight bounding box of the surface at ``threshold``
    grown by ``margin`` of its size on every side (within the NeRF's box), and the SDF
    ``clamp(-(density - threshold), -1, 1)`` at its vertices (negative inside). Returns the grid (its
    vertices in the NeRF's frame, the lattice layout of :meth:`TetGrid.cube`) and the SDF (V,)."""
    verts, _ = extract_mesh(field, resolution, threshold, coarse_to_fine=False, chunk=chunk)
    lo, hi = verts.amin(0), verts.amax(0)
    r = field.config.radius
    lo, hi = (lo - margin * (hi - lo)).clamp(min=-r), (hi + margin * (hi - lo)).clamp(max=r)
    device = next(field.parameters()).device
    cube = TetGrid.cube(resolution, device)
    vertices = lo.to(device) + (cube.vertices + 1) / 2 * (hi - lo).to(device)
    sdf = (threshold - _evaluate(field.density, vertices, chunk)).clamp(-1, 1)
    return TetGrid(vertices, cube.tets, resolution), sdf


def fit_field_to_mesh(field: NerfField, vertices: torch.Tensor, faces: torch.Tensor, steps: int = 300,
                      width: float = 0.02, lr: float = 0.01, points: int = 1 << 15, batch: int = 1 << 13,
                      seed: int = 0) -> float:
    """Start a NeRF from an artist's block-out (vertices in the field's frame): Adam on the field so
    its density is ``2 * isosurface_threshold * sigmoid(-sdf / width)`` (the threshold on the
    block-out's surface), on a fixed pool of points, half uniform in the box and half near the
    surface. Ours: threestudio starts every NeRF from a blob. Returns the last mean squared error
    (in units of the threshold)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(field.parameters()).device
    c = field.config
    surface = sample_surface(vertices, faces, points // 2, gen)
    near = surface + torch.randn(surface.shape, generator=gen) * 4 * width
    uniform = (torch.rand(points // 2, 3, generator=gen) * 2 - 1) * c.radius
    pool = torch.cat([uniform, near.clamp(-c.radius, c.radius)])
    target = 2 * torch.sigmoid(-mesh_sdf(pool, vertices, faces, samples=8192, seed=seed) / width)
    pool, target = pool.to(device), target.to(device)
    optimizer = torch.optim.Adam(field.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        pick = torch.randint(len(pool), (batch,), generator=gen).to(device)
        loss = (field.density(pool[pick]) / c.isosurface_threshold - target[pick]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())
