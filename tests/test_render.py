"""The torch rasterizer against analytic answers and finite differences; cameras; nvdiffrast agreement (gpu)."""

import math

import pytest
import torch

from backend.render import torch_raster as R
from backend.render.camera import Camera, OrbitSpec, look_at, orbit_position, to_clip, view_suffix
from backend.render.ops import Backend, RasterContext, interpolate, rasterize, texture
from protocol.errors import InvalidInputError

QUAD = torch.tensor([[-1, -1, 0, 1], [1, -1, 0, 1], [1, 1, 0, 1], [-1, 1, 0, 1]], dtype=torch.float32)
QUAD_TRI = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)


def test_full_screen_quad_covers_every_pixel_once():
    rast = R.rasterize(QUAD, QUAD_TRI, (16, 24))
    assert rast.shape == (1, 16, 24, 4)
    assert (rast[..., 3] > 0).all()


def test_half_screen_triangle_coverage_is_analytic():
    tri_pos = torch.tensor([[-1, -1, 0, 1], [1, -1, 0, 1], [-1, 1, 0, 1]], dtype=torch.float32)
    h = w = 32
    rast = R.rasterize(tri_pos, torch.tensor([[0, 1, 2]]), (h, w))
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    expected = (xs / w + ys / h) <= 1.0  # pixel centres on or below the diagonal
    torch.testing.assert_close((rast[0, ..., 3] > 0), expected)


def test_depth_test_keeps_the_nearest_and_rows_start_at_the_bottom():
    near = QUAD.clone(); near[:, 2] = -0.5
    far = QUAD.clone(); far[:, 2] = 0.5
    pos = torch.cat([far, near])
    tri = torch.cat([QUAD_TRI, QUAD_TRI + 4])
    rast = R.rasterize(pos, tri, (8, 8))
    assert set(rast[0, ..., 3].unique().tolist()) <= {3.0, 4.0}  # ids of the near quad, + 1
    torch.testing.assert_close(rast[0, ..., 2], torch.full((8, 8), -0.5))
    # a triangle in the lower half of NDC lands in the first rows (OpenGL / nvdiffrast order)
    low = torch.tensor([[-1, -1, 0, 1], [1, -1, 0, 1], [0, -0.5, 0, 1]], dtype=torch.float32)
    r = R.rasterize(low, torch.tensor([[0, 1, 2]]), (8, 8))
    assert (r[0, :2, :, 3] > 0).any() and not (r[0, 4:, :, 3] > 0).any()


def test_perspective_correct_barycentrics():
    """Clip-space attributes interpolate linearly in 3D, so interpolated x/w and y/w must equal
    the pixel centre's NDC even when w varies across the triangle."""
    pos = torch.tensor([[-2.0, -2.0, 0.0, 2.0], [0.9, -0.8, 0.1, 1.0], [-0.3, 3.0, 0.2, 3.0]])
    tri = torch.tensor([[0, 1, 2]])
    h, w = 40, 40
    rast = R.rasterize(pos, tri, (h, w))
    clip = R.interpolate(pos, rast, tri)
    mask = rast[0, ..., 3] > 0
    assert mask.sum() > 100
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    ndc_x, ndc_y = xs / w * 2 - 1, ys / h * 2 - 1
    torch.testing.assert_close((clip[0, ..., 0] / clip[0, ..., 3])[mask], ndc_x[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close((clip[0, ..., 1] / clip[0, ..., 3])[mask], ndc_y[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close((clip[0, ..., 2] / clip[0, ..., 3])[mask], rast[0, ..., 2][mask], atol=1e-5, rtol=0)


def test_gradients_to_positions_and_attributes_match_finite_differences():
    pos = torch.tensor([[-0.8, -0.7, 0.1, 1.0], [0.9, -0.6, 0.2, 1.2], [0.1, 0.8, 0.3, 0.9]], dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2]])
    attr = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(1, 12, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = (R.rasterize(pos, tri, (12, 12))[..., 3:] > 0).to(torch.float64)

    def f(p, a):
        rast = R.rasterize(p, tri, (12, 12))
        return (R.interpolate(a, rast, tri) * weights * mask).sum()

    p = pos.clone().requires_grad_(True)
    a = attr.clone().requires_grad_(True)
    f(p, a).backward()
    h = 1e-6
    for grad, base, which in ((p.grad, pos, 0), (a.grad, attr, 1)):
        for idx in [(0, 0), (1, 1), (2, 0)] if which == 0 else [(0, 0), (1, 1), (2, 1)]:
            d = torch.zeros_like(base); d[idx] = h
            args_p = [pos + d, attr] if which == 0 else [pos, attr + d]
            args_m = [pos - d, attr] if which == 0 else [pos, attr - d]
            fd = (f(*args_p) - f(*args_m)) / (2 * h)
            assert float(grad[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("boundary", ["wrap", "clamp"])
def test_texture_bilinear_values_and_gradcheck(boundary):
    tex = torch.arange(12, dtype=torch.float64).view(3, 4, 1)  # rows top-first
    # the centre of texel [row 1, col 2] is uv = ((2 + 0.5) / 4, (1 + 0.5) / 3)
    uv = torch.tensor([[[[2.5 / 4, 1.5 / 3]]]], dtype=torch.float64)
    assert float(R.texture(tex, uv, boundary)) == pytest.approx(6.0)
    # halfway between texel centres [1,2] and [1,3]
    uv_mid = torch.tensor([[[[3.0 / 4, 1.5 / 3]]]], dtype=torch.float64)
    assert float(R.texture(tex, uv_mid, boundary)) == pytest.approx(6.5)
    gen = torch.Generator().manual_seed(2)
    t = torch.rand(1, 5, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    u = (torch.rand(1, 4, 4, 2, dtype=torch.float64, generator=gen) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: R.texture(a, b, boundary), (t, u))
    if boundary == "wrap":  # u = 1.0 + x samples like u = x
        torch.testing.assert_close(R.texture(t, u + 1.0, "wrap"), R.texture(t, u, "wrap"))


def test_camera_conventions_on_an_asymmetric_object():
    """A point at +X (right) and one at +Y (up), seen from the front (+Z), land right and top."""
    cam = Camera(look_at(orbit_position(0.0, 0.0, 3.0)), 60.0, 64, 64, 0.0)
    c2w = cam.c2w
    torch.testing.assert_close(c2w[:3, 3], torch.tensor([0.0, 0.0, 3.0]))
    torch.testing.assert_close(c2w[:3, 2], torch.tensor([0.0, 0.0, 1.0]))  # camera looks down -Z toward the origin
    torch.testing.assert_close(c2w[:3, :3] @ c2w[:3, :3].T, torch.eye(3), atol=1e-6, rtol=0)
    pts = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    clip = to_clip(pts, [cam])[0]
    ndc = clip[:, :3] / clip[:, 3:]
    assert ndc[0, 0] > 0.1 and abs(ndc[0, 1]) < 1e-6  # +X is on the right
    assert ndc[1, 1] > 0.1 and abs(ndc[1, 0]) < 1e-6  # +Y is up
    torch.testing.assert_close(ndc[2, :2], torch.zeros(2), atol=1e-6, rtol=0)
    side = Camera(look_at(orbit_position(0.0, 90.0, 3.0)), 60.0, 64, 64, 90.0)  # from +X
    ndc_side = to_clip(pts[:1], [side])[0]
    assert abs(float(ndc_side[0, 0] / ndc_side[0, 3])) < 1e-6  # +X point is dead centre
    assert view_suffix(0.0) == ", front view" and view_suffix(90.0) == ", side view" and view_suffix(180.0) == ", back view"
    cams = OrbitSpec().sample(8, torch.Generator().manual_seed(0))
    for c in cams:
        dist = float(c.c2w[:3, 3].norm())
        assert 1.5 - 1e-5 <= dist <= 2.0 + 1e-5
        torch.testing.assert_close(c.c2w[:3, 2], torch.nn.functional.normalize(c.c2w[:3, 3], dim=0), atol=1e-5, rtol=0)


def test_ops_check_their_inputs():
    ctx = RasterContext("cpu")
    assert ctx.backend is Backend.TORCH
    with pytest.raises(InvalidInputError) as err:
        rasterize(ctx, QUAD[:, :3], QUAD_TRI, (8, 8))
    assert err.value.field == "pos"
    with pytest.raises(InvalidInputError) as err:
        rasterize(ctx, QUAD, QUAD_TRI + 10, (8, 8))
    assert err.value.field == "tri"
    with pytest.raises(InvalidInputError):
        RasterContext("cpu", Backend.NVDIFFRAST)


def _scene(n_side: int = 40, device="cpu"):
    """A bumpy sphere-ish grid mesh seen by two cameras."""
    u, v = torch.meshgrid(torch.linspace(0, 2 * math.pi, n_side), torch.linspace(0.1, math.pi - 0.1, n_side), indexing="ij")
    r = 0.6 + 0.05 * torch.sin(5 * u) * torch.sin(3 * v)
    verts = torch.stack([r * torch.sin(v) * torch.cos(u), r * torch.cos(v), r * torch.sin(v) * torch.sin(u)], -1).reshape(-1, 3)
    i = torch.arange(n_side - 1)
    a = (i[:, None] * n_side + i[None, :]).reshape(-1)
    faces = torch.cat([torch.stack([a, a + 1, a + n_side], 1), torch.stack([a + 1, a + n_side + 1, a + n_side], 1)]).int()
    cams = OrbitSpec(width=96, height=96).turntable(2)
    return to_clip(verts, cams).to(device), faces.to(device), verts.to(device)


@pytest.mark.gpu
def test_nvdiffrast_and_torch_backends_agree():
    pos, faces, verts = _scene(device="cuda")
    nv, tc = RasterContext("cuda", Backend.NVDIFFRAST), RasterContext("cuda", Backend.TORCH)
    r_nv, r_tc = rasterize(nv, pos, faces, (96, 96)), rasterize(tc, pos, faces, (96, 96))
    same_id = (r_nv[..., 3] == r_tc[..., 3]).float().mean()
    assert same_id > 0.995
    both = (r_nv[..., 3] > 0) & (r_nv[..., 3] == r_tc[..., 3])
    torch.testing.assert_close(r_nv[..., :3][both], r_tc[..., :3][both], atol=2e-3, rtol=0)
    a_nv, a_tc = interpolate(nv, verts, r_nv, faces), interpolate(tc, verts, r_nv, faces)
    torch.testing.assert_close(a_nv, a_tc, atol=1e-4, rtol=0)
    tex = torch.rand(1, 32, 32, 3, device="cuda")
    uv = torch.rand(2, 96, 96, 2, device="cuda")
    torch.testing.assert_close(texture(nv, tex, uv), texture(tc, tex, uv), atol=1e-4, rtol=0)
