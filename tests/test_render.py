"""The torch rasterizer and antialiasing against analytic answers, a loop reference and finite
differences; cameras; backend choice; nvdiffrast agreement, forward and gradients (gpu)."""

import math
import sys
import types
import warnings
from collections import defaultdict

import pytest
import torch

from backend.render import ops
from backend.render import torch_raster as R
from backend.render.antialias import antialias as torch_antialias
from backend.render.antialias import edge_topology
from backend.render.camera import Camera, OrbitSpec, look_at, orbit_position, to_clip, view_suffix
from backend.render.ops import (Backend, RasterContext, RasterizerUnavailableError, antialias, interpolate, rasterize,
                                texture)
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
    rast = rasterize(ctx, QUAD, QUAD_TRI, (8, 8))
    with pytest.raises(InvalidInputError) as err:
        antialias(ctx, torch.zeros(1, 8, 6, 3), rast, QUAD, QUAD_TRI)
    assert err.value.field == "color"
    with pytest.raises(InvalidInputError) as err:
        antialias(ctx, torch.zeros(2, 8, 8, 3), torch.cat([rast, rast]), torch.stack([QUAD] * 3), QUAD_TRI)
    assert err.value.field == "pos"


# ---------------------------------------------------------------------------------------------
# Backend choice


@pytest.fixture
def broken_nvdiffrast(monkeypatch):
    """An installed nvdiffrast whose JIT build fails in the context constructor, as on a machine
    without nvcc or ninja; ops' per-process memory of the failure and the warning start fresh."""
    calls = []

    class RasterizeCudaContext:
        def __init__(self, device=None):
            calls.append(device)
            raise RuntimeError("Error building extension 'nvdiffrast_plugin': ninja: command not found")

    package = types.ModuleType("nvdiffrast")
    package.torch = types.ModuleType("nvdiffrast.torch")
    package.torch.RasterizeCudaContext = RasterizeCudaContext
    monkeypatch.setitem(sys.modules, "nvdiffrast", package)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", package.torch)
    monkeypatch.setattr(ops, "_nvdiffrast_failure", None)
    monkeypatch.setattr(ops, "_fallback_warned", False)
    return calls


def test_default_backend_falls_back_to_torch_with_one_warning_when_nvdiffrast_cannot_build(broken_nvdiffrast):
    with pytest.warns(RuntimeWarning, match="nvdiffrast cannot run here.*ninja.*pure-PyTorch") as record:
        ctx = RasterContext("cuda")
    assert ctx.backend is Backend.TORCH and ctx.device.type == "cuda"
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second context neither warns nor retries the build
        assert RasterContext("cuda").backend is Backend.TORCH
    assert len(broken_nvdiffrast) == 1
    assert RasterContext("cpu").backend is Backend.TORCH


def test_explicit_nvdiffrast_that_cannot_run_names_the_rasterizer_field(broken_nvdiffrast):
    with pytest.raises(RasterizerUnavailableError) as err:
        RasterContext("cuda", Backend.NVDIFFRAST)
    assert err.value.field == "rasterizer" and "ninja" in err.value.message
    assert isinstance(err.value, InvalidInputError) and err.value.code == "rasterizer_unavailable"
    with pytest.raises(RasterizerUnavailableError) as err:
        RasterContext("cpu", Backend.NVDIFFRAST)
    assert err.value.field == "rasterizer" and "CUDA" in err.value.message
    assert RasterContext("cuda", Backend.TORCH).backend is Backend.TORCH
    assert RasterContext("cpu", "torch").backend is Backend.TORCH  # the value, as a spec or the CLI holds it
    with pytest.raises(InvalidInputError) as err:
        RasterContext("cpu", "opengl")
    assert err.value.field == "rasterizer" and "nvdiffrast" in err.value.message


# ---------------------------------------------------------------------------------------------
# Antialiasing


def _reference_antialias(color, rast, pos, tri):
    """The antialias semantics (backend/render/antialias.py's docstring) transcribed as plain
    loops over pixel pairs, with autograd through the same scalar formulas. Small images only."""
    batch, height, width, _ = color.shape
    if pos.dim() == 2:
        pos = pos[None].expand(batch, *pos.shape)
    faces = tri.tolist()
    sharing = defaultdict(list)  # edge -> [(face, its corner opposite the edge)]
    for f, corners in enumerate(faces):
        if len(set(corners)) == 3:
            for k in range(3):
                sharing[frozenset((corners[(k + 1) % 3], corners[(k + 2) % 3]))].append((f, corners[k]))

    def far_vertex(f, k):
        shared = sharing[frozenset((faces[f][(k + 1) % 3], faces[f][(k + 2) % 3]))]
        if len(shared) != 2:
            return None
        return shared[1][1] if shared[0][0] == f else shared[0][1]

    def pixel(b, vertex):
        p = pos[b, vertex]
        return torch.stack([(p[0] / p[3] + 1) * width / 2, (p[1] / p[3] + 1) * height / 2])

    def cross(a, b, c):
        return ((b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])).item()

    out = color.clone()
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                for dx, dy in ((1, 0), (0, 1)):
                    if x + dx >= width or y + dy >= height:
                        continue
                    first, second = (y, x), (y + dy, x + dx)
                    id0, id1 = int(rast[b, y, x, 3]), int(rast[b, y + dy, x + dx, 3])
                    if id0 == id1:
                        continue
                    if id0 and (not id1 or rast[b, y, x, 2] < rast[b, y + dy, x + dx, 2]):
                        f, c, o, sign = id0 - 1, first, second, 1.0
                    else:
                        f, c, o, sign = id1 - 1, second, first, -1.0
                    centre = torch.tensor([c[1] + 0.5, c[0] + 0.5], dtype=pos.dtype)
                    rel = [pixel(b, v) - centre for v in faces[f]]
                    if dy:
                        rel = [r.flip(0) for r in rel]  # (along the axis, across it)
                    best = None
                    for k in range(3):
                        (ua, wa), (ub, wb) = rel[(k + 1) % 3], rel[(k + 2) % 3]
                        if math.copysign(1, wa.item()) == math.copysign(1, wb.item()):
                            continue
                        t = sign * (ua * wb - wa * ub) / (wb - wa)
                        if best is None or t.item() > best[0].item():
                            best = (t, k)
                    if best is None:
                        continue
                    t, k = best
                    (ua, wa), (ub, wb) = rel[(k + 1) % 3], rel[(k + 2) % 3]
                    far = far_vertex(f, k)
                    if far is not None:
                        corners = [pixel(b, v) for v in faces[f]]
                        own = cross(*corners)
                        wing = cross(pixel(b, far), corners[(k + 1) % 3], corners[(k + 2) % 3])
                        if math.copysign(1, wing) != math.copysign(1, own):
                            continue
                    if abs((wb - wa).item()) < abs((ub - ua).item()) or not -1 / 16 < t.item() < 1 + 1 / 16:
                        continue
                    t = t.clamp(0, 1)
                    if t.item() < 0.5:
                        out[b, c[0], c[1]] = out[b, c[0], c[1]] + (0.5 - t) * (color[b, o[0], o[1]] - color[b, c[0], c[1]])
                    else:
                        out[b, o[0], o[1]] = out[b, o[0], o[1]] + (t - 0.5) * (color[b, c[0], c[1]] - color[b, o[0], o[1]])
    return out


def _edge_scene(position: float, side: str, axis: str, size: int = 8):
    """One triangle whose only edge inside the image is straight, at pixel coordinate
    ``position`` across the given axis; the triangle lies on ``side`` of it."""
    e = position / size * 2 - 1
    far = -20.0 if side == "low" else 20.0
    pos = torch.tensor([[e, -5.0, 0.0, 1.0], [e, 5.0, 0.0, 1.0], [far, 0.0, 0.0, 1.0]], dtype=torch.float64)
    if axis == "y":
        pos = pos[:, [1, 0, 2, 3]]
    return pos, torch.tensor([[0, 1, 2]], dtype=torch.int32)


def _flat_colour(rast, tri, inside=(0.9, 0.1), outside=(0.2, 0.5)):
    mask = (rast[..., 3:] > 0).to(rast.dtype)
    return mask * torch.tensor(inside, dtype=rast.dtype) + (1 - mask) * torch.tensor(outside, dtype=rast.dtype)


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("side", ["low", "high"])
@pytest.mark.parametrize("position", [4.3, 3.8, 5.5])
def test_antialias_blends_a_straight_edge_by_the_covered_fraction(position, side, axis):
    """The pixel the edge passes through gets its exact coverage: the triangle's colour times
    the fraction of the pixel on the triangle's side, the background's times the rest."""
    pos, tri = _edge_scene(position, side, axis)
    rast = R.rasterize(pos, tri, (8, 8))
    color = _flat_colour(rast, tri)
    out = torch_antialias(color, rast, pos, tri)
    cell = math.floor(position)
    coverage = position - cell if side == "low" else 1 - (position - cell)
    expected = color.clone()
    blend = coverage * torch.tensor([0.9, 0.1], dtype=torch.float64) + (1 - coverage) * torch.tensor([0.2, 0.5], dtype=torch.float64)
    if axis == "x":
        expected[0, :, cell] = blend
    else:
        expected[0, cell, :] = blend
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, _reference_antialias(color, rast, pos, tri), atol=1e-12, rtol=0)


def test_crossings_just_past_a_pixel_centre_clamp_and_farther_ones_are_ignored():
    """Raster and geometry may disagree by rounding: an edge found up to 1/16 px beyond the
    other pixel's centre counts as exactly there (half blend, no pos gradient, as in
    nvdiffrast); one farther beyond is not a crossing of this pair at all."""
    rast = R.rasterize(_edge_scene(4.49, "low", "x")[0], torch.tensor([[0, 1, 2]]), (8, 8))
    color = _flat_colour(rast, None)
    for position, expected in ((4.52, 0.5), (4.6, 0.0)):
        pos, tri = _edge_scene(position, "low", "x")
        pos.requires_grad_(True)
        out = torch_antialias(color, rast, pos, tri)
        blend = expected * torch.tensor([0.9, 0.1], dtype=torch.float64) + (1 - expected) * torch.tensor([0.2, 0.5], dtype=torch.float64)
        torch.testing.assert_close(out[0, :, 4].detach(), blend.expand(8, 2), atol=1e-12, rtol=0)
        if out.requires_grad:  # (only when a crossing counted)
            out.sum().backward()
            assert pos.grad.abs().max() == 0


def test_antialias_leaves_interior_edges_and_plain_images_alone():
    """Two faces of one quad with different colours: their shared diagonal is no silhouette,
    so only the quad's outline blends; an image without triangle edges is returned as is."""
    quad = torch.tensor([[-0.52, -0.61, 0, 1], [0.47, -0.58, 0, 1], [0.55, 0.49, 0, 1], [-0.49, 0.57, 0, 1]], dtype=torch.float64)
    rast = R.rasterize(quad, QUAD_TRI, (16, 16))
    ids = rast[0, ..., 3]
    colour = torch.stack([torch.zeros(16, 16), (ids == 1).double(), (ids == 2).double()], -1)[None].double()
    out = torch_antialias(colour, rast, quad, QUAD_TRI)
    changed = (out != colour).any(-1)[0]
    outline = torch.zeros(16, 16, dtype=torch.bool)  # pixels next to the background, either side
    bg = ids == 0
    outline[:, :-1] |= bg[:, :-1] != bg[:, 1:]
    outline[:, 1:] |= bg[:, :-1] != bg[:, 1:]
    outline[:-1] |= bg[:-1] != bg[1:]
    outline[1:] |= bg[:-1] != bg[1:]
    assert changed.any() and not (changed & ~outline).any()
    full = R.rasterize(QUAD, QUAD_TRI, (8, 8))
    plain = torch.rand(1, 8, 8, 3, dtype=torch.float64)
    torch.testing.assert_close(torch_antialias(plain, full, QUAD, QUAD_TRI), plain, atol=0, rtol=0)


def test_edge_topology_links_exactly_two_faces_per_edge():
    torch.testing.assert_close(edge_topology(QUAD_TRI).opposite, torch.tensor([[-1, 3, -1], [-1, -1, 1]]))
    # three faces on the edge (0, 1) are all silhouettes there; a degenerate face links nothing
    fan = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4], [2, 2, 1]])
    opposite = edge_topology(fan).opposite
    assert opposite[0, 2] == opposite[1, 2] == opposite[2, 2] == -1
    assert (opposite[3] == -1).all()


def _sphere(n_side: int = 10, radius: float = 0.6, centre=(0.0, 0.0, 0.0)):
    """A closed, watertight UV sphere (poles shared, seam welded): every edge has two faces."""
    rings, segments = n_side, n_side
    theta = torch.arange(segments, dtype=torch.float64) / segments * 2 * math.pi
    phi = torch.arange(1, rings, dtype=torch.float64) / rings * math.pi
    ring = torch.stack([torch.sin(phi)[:, None] * torch.cos(theta), torch.cos(phi)[:, None].expand(-1, segments),
                        torch.sin(phi)[:, None] * torch.sin(theta)], -1).reshape(-1, 3)
    verts = torch.cat([torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), ring,
                       torch.tensor([[0.0, -1.0, 0.0]], dtype=torch.float64)]) * radius + torch.tensor(centre, dtype=torch.float64)
    south = verts.shape[0] - 1
    faces = []
    for s in range(segments):
        t = (s + 1) % segments
        faces.append([0, 1 + t, 1 + s])
        for r in range(rings - 2):
            a, b = 1 + r * segments + s, 1 + r * segments + t
            faces += [[a, b, a + segments], [b, b + segments, a + segments]]
        last = 1 + (rings - 2) * segments
        faces.append([south, last + s, last + t])
    return verts, torch.tensor(faces, dtype=torch.int32)


def _views(verts, size, azimuths=(20.0, 200.0)):
    cams = [Camera(look_at(orbit_position(15.0, a, 2.2)), 45.0, size, size, a) for a in azimuths]
    return to_clip(verts, cams).double()


def _antialias_scenes():
    """(pos, tri, colour attributes): a closed sphere in two views, a sphere partly hidden by
    another one (silhouettes over geometry), and a soup of loose, overlapping triangles."""
    gen = torch.Generator().manual_seed(3)
    verts, faces = _sphere()
    sphere = (_views(verts, 20), faces, torch.rand(verts.shape[0], 3, dtype=torch.float64, generator=gen))
    near, near_faces = _sphere(8, 0.35, (0.25, 0.15, 0.7))
    both = torch.cat([verts, near])
    two = (_views(both, 20, (0.0,)), torch.cat([faces, near_faces + verts.shape[0]]),
           torch.rand(both.shape[0], 3, dtype=torch.float64, generator=gen))
    soup_pos = torch.cat([torch.rand(15, 2, dtype=torch.float64, generator=gen) * 1.6 - 0.8,
                          torch.rand(15, 1, dtype=torch.float64, generator=gen), 1 + torch.rand(15, 1, dtype=torch.float64, generator=gen)], 1)
    soup_pos[:, :3] *= soup_pos[:, 3:]  # clip space with varying w
    soup = (soup_pos[None], torch.arange(15, dtype=torch.int32).view(5, 3), torch.rand(15, 3, dtype=torch.float64, generator=gen))
    return {"sphere": sphere, "occluded": two, "soup": soup}


@pytest.mark.parametrize("name", ["sphere", "occluded", "soup"])
def test_antialias_matches_the_loop_reference_forward_and_backward(name):
    pos, tri, attr = _antialias_scenes()[name]
    rast = R.rasterize(pos, tri, (20, 20))
    weights = torch.randn(pos.shape[0], 20, 20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (torch_antialias, _reference_antialias):
        p = pos.clone().requires_grad_(True)
        a = attr.clone().requires_grad_(True)
        colour = R.interpolate(a, rast, tri) + (rast[..., 3:] == 0).double() * 0.3
        out = fn(colour, rast, p, tri)
        (out * weights).sum().backward()
        results.append((out.detach(), p.grad, a.grad))
    assert (results[0][0] != colour.detach()).any()  # something was blended
    for mine, reference in zip(results[0], results[1]):
        torch.testing.assert_close(mine, reference, atol=1e-10, rtol=1e-10)
    assert results[0][1].abs().max() > 0


def _silhouette_loss(pos, tri, size, weights, use_antialias=True):
    """A flat-coloured mesh over a different background: pos reaches the image only through
    the silhouette (interpolating a constant has no gradient)."""
    rast = R.rasterize(pos, tri, (size, size))
    colour = R.interpolate(torch.ones(pos.shape[-2], 1, dtype=pos.dtype), rast, tri) * torch.tensor([0.9, 0.2, 0.4], dtype=pos.dtype)
    colour = colour + (rast[..., 3:] == 0).to(pos.dtype) * torch.tensor([0.1, 0.7, 0.3], dtype=pos.dtype)
    if use_antialias:
        colour = torch_antialias(colour, rast, pos, tri)
    return (colour * weights).sum()


@pytest.mark.parametrize("name", ["triangle", "sphere", "occluded"])
def test_silhouette_gradients_match_central_finite_differences(name):
    if name == "triangle":  # perspective: w differs per vertex
        pos = torch.tensor([[[-0.71, -0.63, 0.1, 1.0], [0.77 * 1.3, -0.41 * 1.3, 0.2, 1.3], [-0.13 * 0.8, 0.83 * 0.8, 0.3, 0.8]]],
                           dtype=torch.float64)
        tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    else:
        pos, tri, _ = _antialias_scenes()[name]
    size = 24
    weights = torch.rand(pos.shape[0], size, size, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    p = pos.clone().requires_grad_(True)
    _silhouette_loss(p, tri, size, weights).backward()
    grad = p.grad
    h = 1e-6
    gen = torch.Generator().manual_seed(6)
    # the entries with the largest gradients, and a few at random
    candidates = torch.cat([grad.abs().flatten().topk(6).indices, torch.randint(0, grad.numel(), (6,), generator=gen)])
    for index in candidates.tolist():
        d = torch.zeros(grad.numel(), dtype=torch.float64)
        d[index] = h
        d = d.view_as(pos)
        fd = (_silhouette_loss(pos + d, tri, size, weights) - _silhouette_loss(pos - d, tri, size, weights)) / (2 * h)
        assert float(grad.flatten()[index]) == pytest.approx(float(fd), rel=1e-5, abs=1e-6), index
    assert grad.abs().max() > 1.0


def test_silhouettes_move_only_with_antialias_and_in_the_right_direction():
    """Without antialiasing a flat-coloured triangle gives its vertices no gradient at all;
    with it, the summed coverage grows as a vertex moves away from the others: the gradient
    follows the exact area's, in direction and (within the approximation) size."""
    size = 64
    pos = torch.tensor([[-0.71, -0.63, 0.1, 1.0], [0.77, -0.41, 0.2, 1.0], [-0.13, 0.83, 0.3, 1.0]], dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    ones = torch.ones(1, size, size, 1, dtype=torch.float64)

    def coverage(p, use_antialias):
        rast = R.rasterize(p, tri, (size, size))
        mask = R.interpolate(torch.ones(3, 1, dtype=torch.float64), rast, tri)
        return (torch_antialias(mask, rast, p, tri) if use_antialias else mask * ones).sum()

    p = pos.clone().requires_grad_(True)
    coverage(p, False).backward()
    assert p.grad.abs().max() < 1e-9
    p = pos.clone().requires_grad_(True)
    total = coverage(p, True)
    total.backward()
    xy = (pos[:, :2] / pos[:, 3:] + 1) * size / 2
    q = pos.clone().requires_grad_(True)
    xyq = (q[:, :2] / q[:, 3:] + 1) * size / 2
    area = 0.5 * ((xyq[1, 0] - xyq[0, 0]) * (xyq[2, 1] - xyq[0, 1]) - (xyq[2, 0] - xyq[0, 0]) * (xyq[1, 1] - xyq[0, 1]))
    area.backward()
    assert total.item() == pytest.approx(area.item(), rel=2e-3)
    outward = xy - xy.mean(0)
    assert ((p.grad[:, :2] * outward).sum(1) > 0).all()
    cosine = torch.nn.functional.cosine_similarity(p.grad[:, :2].flatten(), q.grad[:, :2].flatten(), dim=0)
    assert cosine > 0.995
    assert float(p.grad[:, :2].norm() / q.grad[:, :2].norm()) == pytest.approx(1.0, abs=0.05)


def test_ops_antialias_on_the_torch_backend_uses_a_prebuilt_topology():
    ctx = RasterContext("cpu")
    pos, tri, attr = _antialias_scenes()["sphere"]
    rast = rasterize(ctx, pos, tri, (20, 20))
    colour = interpolate(ctx, attr, rast, tri)
    topology = ops.antialias_topology(ctx, tri)
    torch.testing.assert_close(antialias(ctx, colour, rast, pos, tri, topology), torch_antialias(colour, rast, pos, tri))


# ---------------------------------------------------------------------------------------------
# nvdiffrast agreement (gpu)


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


def _gpu_scenes():
    """(pos (B,V,4), tri, per-vertex attributes, per-corner uvs, resolution) on CUDA: an open
    bumpy grid (boundary silhouettes) in two views, a closed sphere half hidden by another,
    and a dense sphere with sub-pixel triangles."""
    gen = torch.Generator().manual_seed(7)
    pos, faces, verts = _scene()
    grid = (pos, faces, verts, (96, 96))
    big, big_faces = _sphere(24)
    small, small_faces = _sphere(16, 0.35, (0.25, 0.15, 0.7))
    both = torch.cat([big, small]).float()
    occluded = (_views(both, 80, (0.0, 130.0)).float(), torch.cat([big_faces, small_faces + big.shape[0]]), both, (80, 80))
    dense, dense_faces = _sphere(120)
    dense = (_views(dense, 64, (35.0,)).float(), dense_faces, dense.float(), (64, 64))
    scenes = []
    for p, f, attr, res in (grid, occluded, dense):
        uv = torch.rand(f.shape[0] * 3, 2, generator=gen)
        scenes.append((p.cuda().contiguous(), f.int().cuda(), attr.float().cuda(), uv.cuda(), res))
    return scenes


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _close(a, b, rel):
    """Relative agreement of two gradient tensors as a whole (per-entry noise allowed)."""
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) <= rel


@pytest.mark.gpu
@pytest.mark.parametrize("scene", [0, 1, 2])
def test_nvdiffrast_and_torch_ops_agree_forward_and_backward(scene):
    """Each op with identical inputs on both backends (nvdiffrast's raster output fed to both):
    outputs and the gradients to pos, attributes, texture, uv and colour, antialias included."""
    pos, faces, attr, uvs, res = _gpu_scenes()[scene]
    nv, tc = RasterContext("cuda", Backend.NVDIFFRAST), RasterContext("cuda", Backend.TORCH)
    gen = torch.Generator(device="cuda").manual_seed(8)
    batch = pos.shape[0]

    # rasterize: same ids almost everywhere; (u, v, z/w) and their gradients where ids agree
    outs = {}
    for name, ctx in (("nv", nv), ("tc", tc)):
        p = pos.clone().requires_grad_(True)
        rast = rasterize(ctx, p, faces, res)
        outs[name] = (p, rast)
    r_nv, r_tc = outs["nv"][1], outs["tc"][1]
    same = r_nv[..., 3] == r_tc[..., 3]
    assert same.float().mean() > 0.995
    both = same & (r_nv[..., 3] > 0)
    torch.testing.assert_close(r_nv[..., :3][both], r_tc[..., :3][both], atol=2e-3, rtol=0)
    # nvdiffrast passes gradients of (u, v) to pos, not of z/w
    w = torch.randn(*r_nv.shape[:3], 2, device="cuda", generator=gen) * both[..., None]
    g_nv, = _grads((r_nv[..., :2] * w).sum(), outs["nv"][0])
    g_tc, = _grads((r_tc[..., :2] * w).sum(), outs["tc"][0])
    assert _close(g_tc, g_nv, 1e-2)

    rast = r_nv.detach()
    # interpolate: gradients to attributes and to the raster's (u, v)
    w = torch.randn(*rast.shape[:3], attr.shape[1], device="cuda", generator=gen)
    results = []
    for ctx in (nv, tc):
        a, r = attr.clone().requires_grad_(True), rast.clone().requires_grad_(True)
        out = interpolate(ctx, a, r, faces)
        results.append((out.detach(), *_grads((out * w).sum(), a, r)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=0)
    assert _close(results[1][1], results[0][1], 1e-4)
    covered = rast[..., 3] > 0  # nvdiffrast leaves background (u, v) gradients at zero too
    assert _close(results[1][2][..., :2][covered], results[0][2][..., :2][covered], 1e-4)

    # texture: gradients to the texels and to uv
    corner_tri = torch.arange(faces.shape[0] * 3, device="cuda", dtype=torch.int32).view(-1, 3)
    uv = interpolate(nv, uvs, rast, corner_tri).detach()
    tex = torch.rand(1, 32, 32, 3, device="cuda", generator=gen)
    w = torch.randn(*rast.shape[:3], 3, device="cuda", generator=gen)
    results = []
    for ctx in (nv, tc):
        t, u = tex.clone().requires_grad_(True), uv.clone().requires_grad_(True)
        out = texture(ctx, t, u)
        results.append((out.detach(), *_grads((out * w).sum(), t, u)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=0)
    assert _close(results[1][1], results[0][1], 1e-4)
    assert _close(results[1][2], results[0][2], 1e-3)

    # antialias: same blend, same gradients to colour and pos. Near-degenerate silhouette tests
    # (a neighbour seen edge-on) may round the other way in one backend: allow a few such
    # pairs, and compare colour gradients away from them. nvdiffrast also adds 1e-3 px to an
    # edge's extent in its pos gradient; this backend differentiates exactly.
    colour = (interpolate(nv, attr, rast, faces) + (rast[..., 3:] == 0) * 0.5).detach()
    w = torch.randn(*colour.shape, device="cuda", generator=gen)
    results = []
    for ctx in (nv, tc):
        c, p = colour.clone().requires_grad_(True), pos.clone().requires_grad_(True)
        out = antialias(ctx, c, rast, p, faces)
        results.append((out.detach(), *_grads((out * w).sum(), c, p)))
    (out_nv, gc_nv, gp_nv), (out_tc, gc_tc, gp_tc) = results
    blended = (out_nv != colour).any(-1)
    # sub-pixel triangles (scene 2) rarely own the silhouette edge that their pixel pair
    # crosses, so little or nothing blends there, in nvdiffrast as here
    assert blended.sum() > 20 or scene == 2
    differs = ((out_tc - out_nv).abs() > 1e-4).any(-1)
    assert differs.sum() <= max(2, 0.02 * blended.sum())
    near = torch.nn.functional.max_pool2d(differs[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    torch.testing.assert_close(out_tc[~near], out_nv[~near], atol=1e-4, rtol=0)
    torch.testing.assert_close(gc_tc[~near], gc_nv[~near], atol=1e-4, rtol=0)
    if blended.sum() == 0:
        assert all(g is None or g.abs().max() == 0 for g in (gp_tc, gp_nv))  # (None: nothing reached pos)
        return
    assert torch.nn.functional.cosine_similarity(gp_tc.flatten(), gp_nv.flatten(), dim=0) > 0.99
    assert float(gp_tc.norm() / gp_nv.norm()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("scene", [0, 1, 2])
def test_nvdiffrast_and_torch_render_alike_end_to_end(scene):
    """The whole chain on each backend (rasterize, interpolate, texture, antialias): images
    agree but for the few pixels whose triangle differs, and the gradients to pos, attributes
    and texture point the same way."""
    pos, faces, attr, uvs, res = _gpu_scenes()[scene]
    gen = torch.Generator(device="cuda").manual_seed(9)
    tex = torch.rand(1, 32, 32, 3, device="cuda", generator=gen)
    corner_tri = torch.arange(faces.shape[0] * 3, device="cuda", dtype=torch.int32).view(-1, 3)
    w = torch.rand(pos.shape[0], *res, 3, device="cuda", generator=gen)
    results = []
    for backend in (Backend.NVDIFFRAST, Backend.TORCH):
        ctx = RasterContext("cuda", backend)
        p, a, t = pos.clone().requires_grad_(True), attr.clone().requires_grad_(True), tex.clone().requires_grad_(True)
        rast = rasterize(ctx, p, faces, res)
        colour = texture(ctx, t, interpolate(ctx, uvs, rast, corner_tri)) * interpolate(ctx, a, rast, faces)
        colour = torch.where(rast[..., 3:] > 0, colour, torch.full_like(colour, 0.5))
        image = antialias(ctx, colour, rast, p, faces)
        results.append((image.detach(), *_grads((image * w).sum(), p, a, t)))
    (img_nv, *g_nv), (img_tc, *g_tc) = results
    assert ((img_nv - img_tc).abs() > 1e-3).float().mean() < 0.02
    for mine, theirs in zip(g_tc, g_nv):
        assert torch.nn.functional.cosine_similarity(mine.flatten(), theirs.flatten(), dim=0) > 0.98
