"""The NeRF coarse representation: hash grid, volume rendering, analytic normals, the
regularisers, mesh extraction and albedo baking (backend/geometry/nerf.py, backend/render/volume.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.geometry.mesh import Mesh, load_mesh, save_glb
from backend.geometry.nerf import (HashGrid, HashGridConfig, NerfConfig, NerfField, bake_albedo, extract_mesh,
                                  param_groups)
from backend.render.camera import Camera, look_at
from backend.render.volume import (EnvironmentMapBackground, FieldOutput, OccupancyGrid, PointLight, ShadingSchedule,
                                   VolumeRenderConfig, camera_rays, opaque_loss, orientation_loss, render_volume,
                                   sample_point_lights, sparsity_loss)

SMALL_GRID = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)


def small_field(**kwargs) -> NerfField:
    torch.manual_seed(0)
    return NerfField(NerfConfig(hash_grid=SMALL_GRID, **kwargs))


class SphereField:
    """Constant density ``sigma`` inside a sphere of ``radius`` about the origin, a constant albedo,
    and a constant normal (for the orientation loss)."""

    def __init__(self, sigma=3.0, radius=0.5, albedo=(0.2, 0.4, 0.6), normal=(0.0, 0.0, 1.0)):
        self.sigma, self.radius = sigma, radius
        self.albedo_value, self.normal_value = torch.tensor(albedo), torch.tensor(normal)

    def density(self, points):
        return (points.norm(dim=-1) < self.radius).float() * self.sigma

    def query(self, points, with_normals=False):
        n = points.shape[0]
        normal = self.normal_value.expand(n, 3) if with_normals else None
        return FieldOutput(self.density(points), self.albedo_value.expand(n, 3), normal)


def front_camera(res=24, distance=2.5, fov=40.0) -> Camera:
    return Camera(look_at((0.0, 0.0, distance)), fov, res, res)


def test_hash_grid_levels_and_shapes():
    grid = HashGrid(SMALL_GRID)
    assert grid.resolutions.tolist() == [4, 8, 16, 32]  # ceil(4 * 2^l - 1) + 1
    assert grid.hashed.tolist() == [False, False, True, True]  # 16^3 > 2^10
    assert grid.sizes.tolist() == [64, 512, 1024, 1024]
    assert grid(torch.rand(5, 3)).shape == (5, 8)
    assert HashGrid().embeddings.shape[0] == 4096 + 13824 + 39304 + 117656 + 357912 + 11 * 2 ** 19  # the paper's config


def test_hash_grid_is_continuous_and_its_gradient_matches_finite_differences():
    torch.manual_seed(0)
    grid = HashGrid(SMALL_GRID).double()
    with torch.no_grad():
        grid.embeddings.uniform_(-1, 1)
    # across a cell boundary of every level (x * scale + 0.5 integer at x = 0.5 / 3 ... for level 0)
    boundary = (1 - 0.5) / grid.scales[0].item()
    x = torch.tensor([[boundary - 1e-9, 0.3, 0.7], [boundary + 1e-9, 0.3, 0.7]], dtype=torch.float64)
    y = grid(x)
    assert (y[0] - y[1]).abs().max() < 1e-7
    points = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(grid, (points,), eps=1e-7, atol=1e-5)


def test_renderer_composites_a_constant_density_sphere_to_the_closed_form_opacity():
    field = SphereField(sigma=3.0, radius=0.5)
    cam = front_camera(res=24)
    config = VolumeRenderConfig(num_samples_per_ray=1024, randomized=False, alpha_threshold=0.0, early_stop_eps=0.0)
    out = render_volume(field, [cam], config, background=torch.tensor([1.0, 0.0, 0.0]))
    origins, dirs = camera_rays([cam])
    b = torch.linalg.cross(origins, dirs).norm(dim=-1)  # distance of each ray from the centre
    chord = 2 * (0.5 ** 2 - b.clamp(max=0.5) ** 2).sqrt()
    expected = 1 - torch.exp(-3.0 * chord)
    inner = b < 0.5 - 2 * config.step_size  # away from the silhouette, where a step straddles it
    assert inner.sum() > 50 and (b > 0.5).sum() > 50
    assert (out.opacity[..., 0][inner] - expected[inner]).abs().max() < 0.02
    assert out.opacity[..., 0][b > 0.5 + 2 * config.step_size].abs().max() == 0
    bg = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(out.rgb, field.albedo_value * out.opacity + bg * (1 - out.opacity), atol=1e-5)
    # rows top-first: the top row looks up (+Y), and depth of the centre ray is near the sphere's front
    assert dirs[0, 0, 0, 1] > 0 > dirs[0, -1, 0, 1]
    centre = out.depth[0, 12, 12, 0] / out.opacity[0, 12, 12, 0]
    assert 2.0 < float(centre) < 2.5
    # the default pruning (alpha >= 0.01, transmittance >= 1e-4) gives nearly the same picture
    pruned = render_volume(field, [cam], VolumeRenderConfig(num_samples_per_ray=128, randomized=False), background=bg)
    assert (pruned.opacity[..., 0][inner] - expected[inner]).abs().max() < 0.03


def test_occupancy_grid_skips_empty_space_without_changing_the_picture():
    field = SphereField(sigma=3.0, radius=0.5)
    config = VolumeRenderConfig(num_samples_per_ray=128, randomized=False)
    grid = OccupancyGrid(resolution=16)
    generator = torch.Generator().manual_seed(0)
    for step in range(0, 20 * grid.every_n, 8):  # every other call is skipped; jitter finds the rim cells
        grid.update(field.density, step, config.step_size, generator)
    assert 0.05 < grid.occupied.float().mean() < 0.3  # the sphere fills 6.5% of the box
    cam = front_camera(res=16)
    plain, skipped = render_volume(field, [cam], config), render_volume(field, [cam], config, occupancy=grid)
    # approximate as NerfAcc's: a rim cell whose jittered points all missed the sphere stays empty
    diff = (plain.opacity - skipped.opacity).abs()
    assert float(diff.mean()) < 0.005 and int((diff > 1e-6).sum()) < 0.05 * diff.numel()


def test_analytic_normals_of_a_blob_point_outward_and_train_through_the_orientation_loss():
    field = small_field()
    points = F.normalize(torch.randn(200, 3), dim=-1) * torch.empty(200, 1).uniform_(0.1, 0.9)
    out = field.query(points, with_normals=True)
    cos = (out.normal * F.normalize(points, dim=-1)).sum(-1)
    assert cos.min() > 0.99
    assert torch.allclose(out.normal.norm(dim=-1), torch.ones(200), atol=1e-5)
    # grad disabled: detached normals, no graph
    with torch.no_grad():
        assert not field.query(points, with_normals=True).normal.requires_grad
    render = render_volume(field, [front_camera(res=12)], VolumeRenderConfig(num_samples_per_ray=64), with_normals=True,
                           generator=torch.Generator().manual_seed(0))
    assert render.normal.shape == (1, 12, 12, 3) and render.sample_normals.shape == render.sample_dirs.shape
    orientation_loss(render).backward(retain_graph=True)  # weights are detached: only the normals carry it
    assert field.encoding.embeddings.grad.abs().sum() > 0 and field.density_network[0].weight.grad.abs().sum() > 0
    assert field.feature_network[0].weight.grad is None
    (render.rgb.mean() + sparsity_loss(render.opacity) + opaque_loss(render.opacity)).backward()
    assert field.feature_network[0].weight.grad.abs().sum() > 0


def test_orientation_loss_is_zero_for_front_facing_normals_and_positive_for_back_facing():
    cam = front_camera(res=12)  # looks down -Z: rays go toward -Z
    config = VolumeRenderConfig(num_samples_per_ray=64, randomized=False)
    facing = render_volume(SphereField(normal=(0.0, 0.0, 1.0)), [cam], config, with_normals=True)
    away = render_volume(SphereField(normal=(0.0, 0.0, -1.0)), [cam], config, with_normals=True)
    assert float(orientation_loss(facing)) == 0.0
    assert float(orientation_loss(away)) > 0.1
    with pytest.raises(Exception, match="with_normals"):
        orientation_loss(render_volume(SphereField(), [cam], config))


def test_sparsity_and_opaque_losses_follow_threestudio():
    o = torch.tensor([0.0, 1.0, 0.5])
    assert torch.isclose(sparsity_loss(o), torch.tensor([0.1, 1.01 ** 0.5, 0.26 ** 0.5]).mean())
    assert opaque_loss(torch.tensor([0.0, 1.0])) < opaque_loss(torch.tensor([0.5, 0.5]))
    assert torch.isclose(opaque_loss(torch.tensor([0.5])), torch.tensor(math.log(2)))


def test_image_loss_reaches_every_part_and_lambertian_light_and_background():
    field = small_field()
    background = EnvironmentMapBackground(random_aug=False)
    cams = [front_camera(res=12), Camera(look_at((2.5, 0.0, 0.0)), 40.0, 12, 12)]
    light = PointLight(torch.stack([c.c2w[:3, 3] for c in cams]))
    out = render_volume(field, cams, VolumeRenderConfig(num_samples_per_ray=64), background=background, light=light,
                        generator=torch.Generator().manual_seed(1))
    assert out.rgb.shape == (2, 12, 12, 3) and out.normal is not None
    assert 0 <= float(out.rgb.detach().min()) and float(out.rgb.detach().max()) <= 1
    augmented = EnvironmentMapBackground(random_aug_prob=1.0)(torch.randn(2, 4, 4, 3))  # one random colour for all
    assert torch.equal(augmented, augmented[:1, :1, :1].expand_as(augmented))
    out.rgb.square().mean().backward()
    for name, p in list(field.named_parameters()) + list(background.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a light behind the object leaves its visible side with the ambient term only
    lit = render_volume(SphereField(normal=(0.0, 0.0, 1.0)), [cams[0]], VolumeRenderConfig(num_samples_per_ray=64),
                        light=PointLight(torch.tensor([[0.0, 0.0, 3.0]]), ambient=(0.0,) * 3, diffuse=(1.0,) * 3,
                                         textureless=True), background=torch.zeros(3))
    dark = render_volume(SphereField(normal=(0.0, 0.0, 1.0)), [cams[0]], VolumeRenderConfig(num_samples_per_ray=64),
                         light=PointLight(torch.tensor([[0.0, 0.0, -3.0]]), ambient=(0.0,) * 3, diffuse=(1.0,) * 3,
                                          textureless=True), background=torch.zeros(3))
    assert float(lit.rgb[0, 6, 6].min()) > 0.5 and float(dark.rgb.max()) == 0


def test_state_dict_checkpoint_round_trip():
    field = small_field()
    with torch.no_grad():
        field.encoding.embeddings.uniform_(-1, 1)
    copy = NerfField(NerfConfig(hash_grid=SMALL_GRID))
    copy.load_state_dict(field.state_dict())
    p = torch.rand(10, 3) * 2 - 1
    assert torch.equal(field.density(p), copy.density(p)) and torch.equal(field.albedo(p), copy.albedo(p))
    assert set(field.state_dict()) == {"encoding.embeddings", "density_network.0.weight", "density_network.2.weight",
                                       "feature_network.0.weight", "feature_network.2.weight"}


class PositionalAlbedo(NerfField):
    """A blob whose albedo is a known function of position."""

    def albedo(self, points):
        return ((points / 0.4 + 1) / 2).clamp(0, 1)


def test_extract_mesh_of_a_blob_is_closed_at_the_threshold_radius_and_bakes_its_albedo(tmp_path):
    torch.manual_seed(0)
    # density softplus(100 (1 - |p| / 0.5)) ~ 25 at |p| = 0.375
    field = PositionalAlbedo(NerfConfig(hash_grid=SMALL_GRID, density_blob_scale=100.0))
    resolution = 32
    coarse, coarse_faces = extract_mesh(field, resolution=resolution, coarse_to_fine=False)
    assert (coarse.norm(dim=-1) - 0.375).abs().max() < 2.0 / resolution  # the grid spacing over the box
    verts, faces = extract_mesh(field, resolution=resolution)  # second pass over the surface's bounds + 10%
    assert (verts.norm(dim=-1) - 0.375).abs().max() < 0.75 * 1.2 / resolution
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    assert bool((counts == 2).all())  # closed and manifold
    p = verts[faces]
    cross = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    outward = (cross * p.mean(1)).sum(-1)
    assert bool((outward[cross.norm(dim=-1) > 1e-9] > 0).all())  # wound outward (a few slivers have no area)
    with pytest.raises(Exception, match="threshold"):
        extract_mesh(field, resolution=8, threshold=1e6)

    size = 512
    baked = bake_albedo(field, Mesh(coarse, coarse_faces), texture_size=size)  # big faces: several texels each
    assert baked.texture.shape == (size, size, 4) and baked.texture.dtype == np.uint8
    baked.validate()
    corners = baked.positions[baked.faces]
    area = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]).norm(dim=-1)
    e1, e2 = (baked.uvs[:, 1] - baked.uvs[:, 0]) * size, (baked.uvs[:, 2] - baked.uvs[:, 0]) * size
    texels = (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs() / 2
    # faces covering a few texels (marching tets' slivers have no area; xatlas puts them at uv (0, 0))
    solid = (area > 1e-3 * area.median()) & (texels > 2)
    assert float(solid.float().mean()) > 0.8
    centroid, uv = corners[solid].mean(1), baked.uvs[solid].mean(1)
    col = (uv[:, 0] * size).long().clamp(0, size - 1)
    row = (uv[:, 1] * size).long().clamp(0, size - 1)  # glTF: v = 0 is the top row
    texel = torch.from_numpy(baked.texture[row.numpy(), col.numpy(), :3]).float() / 255
    error = (texel - field.albedo(centroid)).abs()
    assert float(error.median()) < 0.02 and float(error.max()) < 0.1
    save_glb(baked, tmp_path / "nerf.glb")
    loaded = load_mesh(tmp_path / "nerf.glb")
    assert loaded.texture.shape == (size, size, 4)


class BlobAndSpeck(NerfField):
    """A sphere of density 50 and radius 0.375, and a speck around one grid vertex away from it."""

    def density(self, points):
        speck = (points - torch.tensor([0.75, 0.75, 0.75])).norm(dim=-1) < 0.03
        return ((points.norm(dim=-1) < 0.375) | speck).float() * 50


def test_extract_mesh_drops_pieces_smaller_than_one_percent_of_the_faces():
    field = BlobAndSpeck(NerfConfig(hash_grid=SMALL_GRID))
    both, _ = extract_mesh(field, resolution=40, remove_outliers=0.0, coarse_to_fine=False)
    kept, _ = extract_mesh(field, resolution=40, coarse_to_fine=False)
    assert both.norm(dim=-1).max() > 0.8 and kept.norm(dim=-1).max() < 0.5


def test_param_groups_carry_the_configs_learning_rates():
    field, background = small_field(), EnvironmentMapBackground()
    groups = param_groups(field, background)
    assert [g["lr"] for g in groups] == [0.01, 0.001, 0.001]
    assert sum(len(g["params"]) for g in groups) == len(list(field.parameters())) + len(list(background.parameters()))
    torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-15)


def test_point_lights_and_the_shading_schedule_follow_the_shading_config():
    cams = [Camera(look_at((2.0 * math.sin(a), 0.5, 2.0 * math.cos(a))), 40.0, 8, 8) for a in (0, 1.57, 3.14, 4.71)] * 2
    lights = sample_point_lights(cams, torch.Generator().manual_seed(0), views_per_object=4)
    assert lights.shape == (8, 3)
    assert bool(((lights.norm(dim=-1) >= 0.8 - 1e-6) & (lights.norm(dim=-1) <= 1.5 + 1e-6)).all())
    schedule, rng = ShadingSchedule(), random.Random(0)
    assert all(schedule.light(step, lights, rng) is None for step in range(0, 5000, 500))  # ambient_only_steps
    picks = [schedule.light(6000, lights, rng) for _ in range(400)]
    lit = [p for p in picks if p is not None]
    assert 0.65 < len(lit) / 400 < 0.85  # diffuse_prob 0.75
    assert all(abs(p.ambient[0] + p.diffuse[0] - 1) < 1e-9 for p in lit)  # soft shading


def test_a_view_that_misses_the_box_renders_the_background():
    field = small_field()
    away = Camera(look_at((0.0, 0.0, 3.0), target=(0.0, 0.0, 6.0)), 30.0, 8, 8)
    out = render_volume(field, [away], VolumeRenderConfig(num_samples_per_ray=32), with_normals=True,
                        background=torch.tensor([0.0, 1.0, 0.0]))
    assert float(out.opacity.detach().abs().max()) == 0 and torch.equal(out.rgb.detach()[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert float(orientation_loss(out).detach()) == 0


def test_hashed_levels_use_the_instant_ngp_hash_as_tiny_cuda_nn_does():
    grid = HashGrid(SMALL_GRID)
    level, vertex = 2, (3, 5, 7)  # level 2 of SMALL_GRID is hashed (16^3 > 1024 entries)
    h = (vertex[0] * 1 ^ vertex[1] * 2654435761 ^ vertex[2] * 805459861) & 0xFFFFFFFF  # tcnn: uint32 arithmetic
    row = int(grid.offsets[level]) + h % int(grid.sizes[level])
    with torch.no_grad():
        grid.embeddings.zero_()
        grid.embeddings[row, 0] = 1.0
    scale = grid.scales[level].item()
    x = torch.tensor([[(v - 0.5 + 1e-4) / scale for v in vertex]])  # just past the vertex: weight ~1 there
    out = grid(x).detach().view(SMALL_GRID.n_levels, SMALL_GRID.n_features_per_level)
    assert abs(float(out[level, 0]) - 1) < 1e-3 and float(out[level, 1]) == 0


@pytest.mark.gpu
def test_cuda_render_matches_the_cpu():
    field = small_field()
    with torch.no_grad():
        field.encoding.embeddings.uniform_(-1, 1)
    config = VolumeRenderConfig(num_samples_per_ray=64, randomized=False)
    cpu = render_volume(field, [front_camera(res=16)], config, with_normals=True)
    gpu = render_volume(field.to("cuda"), [front_camera(res=16)], config, with_normals=True, device="cuda")
    assert torch.allclose(cpu.rgb, gpu.rgb.cpu(), atol=1e-4) and torch.allclose(cpu.normal, gpu.normal.cpu(), atol=1e-3)
