"""CFD's integral noise (paper Eq. 17): unit Gaussian per pixel, consistent across views."""

from __future__ import annotations

import math

import torch

from backend.render.integral_noise import IntegralNoise, IntegralNoiseConfig, hashed_normal

SPHERES_ONE = [((0.0, 0.0, 0.0), 0.6)]
# two overlapping balls: a non-convex union (a waist where they meet, self-occlusion from the side)
SPHERES_TWO = [((-0.35, 0.0, 0.0), 0.45), ((0.4, 0.1, 0.0), 0.35)]


def basis(azimuth: float, elevation: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit forward (from the object toward the eye), right, up."""
    f = torch.tensor([math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
                      math.cos(elevation) * math.cos(azimuth)])
    r = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), f)
    r = r / r.norm()
    return f, r, torch.linalg.cross(f, r)


def render_points(spheres, azimuth: float, elevation: float, size: int, half: float = 1.0):
    """Orthographic ray cast: (size, size, 3) first-hit points (row 0 at the top), (size, size) mask."""
    f, r, u = basis(azimuth, elevation)
    s = (torch.arange(size) + 0.5) / size * 2 * half - half
    ys, xs = -s[:, None], s[None, :]
    o = 3.0 * f + xs[..., None] * r + ys[..., None] * u  # (S,S,3)
    d = -f
    best = torch.full((size, size), float("inf"))
    for c, rad in spheres:
        oc = o - torch.tensor(c)
        b = (oc * d).sum(-1)
        disc = b * b - ((oc * oc).sum(-1) - rad * rad)
        tt = -b - disc.clamp_min(0).sqrt()
        tt = torch.where(disc > 0, tt, torch.full_like(tt, float("inf")))
        best = torch.minimum(best, tt)
    mask = torch.isfinite(best)
    pts = o + d * torch.where(mask, best, torch.zeros_like(best))[..., None]
    return pts, mask


def project(point: torch.Tensor, azimuth: float, elevation: float, size: int, half: float = 1.0) -> tuple[int, int]:
    _, r, u = basis(azimuth, elevation)
    x, y = float(point @ r), float(point @ u)
    return int((-y + half) / (2 * half) * size), int((x + half) / (2 * half) * size)


def random_views(spheres, n: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    pts, masks = [], []
    for _ in range(n):
        az = float(torch.rand(1, generator=g)) * 2 * math.pi
        el = (float(torch.rand(1, generator=g)) - 0.5) * math.pi * 0.9
        p, m = render_points(spheres, az, el, size)
        pts.append(p)
        masks.append(m)
    return torch.stack(pts), torch.stack(masks)


def _unit_gaussian_over_views(spheres, resolution: int, broken: bool = False):
    pts, masks = random_views(spheres, 32, 64, seed=3)
    samples = []
    for k in range(6):  # fresh references too: per-pixel statistics over views x references
        noise = IntegralNoise(IntegralNoiseConfig(resolution=resolution, noise_background_fix=False),
                              torch.Generator().manual_seed(100 + k))
        samples.append(noise.sample(pts, masks, (8, 8)))
    g = torch.cat(samples)  # (192, 4, 8, 8)
    fg = masks.view(32, 8, 8, 8, 8).float().mean((2, 4)).repeat(6, 1, 1)  # coverage per latent pixel
    return g, fg


def _check_unit(g: torch.Tensor, fg: torch.Tensor) -> None:
    n = g.shape[0] * g.shape[1]
    per_pixel = g.permute(1, 0, 2, 3).reshape(n, -1)  # samples x pixels
    mean, var = per_pixel.mean(0), per_pixel.var(0)
    # 768 samples per pixel: the s.e. of the mean ~0.036, of the variance ~0.05
    assert mean.abs().max() < 0.15, mean.abs().max()
    assert (var - 1).abs().max() < 0.2, (var.min(), var.max())
    assert abs(float(per_pixel.var()) - 1) < 0.02
    for sel in (fg == 1, (fg > 0) & (fg < 1), fg == 0):  # covered, edge and background pixels
        vals = g.permute(1, 0, 2, 3)[:, sel]
        assert vals.numel() > 2000
        assert abs(float(vals.mean())) < 0.05 and abs(float(vals.var()) - 1) < 0.06, (float(vals.mean()), float(vals.var()))


def test_sphere_pixels_are_unit_gaussian_over_views():
    for resolution in (2048, 32):  # every sub-pixel its own cell / several sub-pixels share one
        _check_unit(*_unit_gaussian_over_views(SPHERES_ONE, resolution))


def test_nonconvex_pixels_are_unit_gaussian_over_views():
    _check_unit(*_unit_gaussian_over_views(SPHERES_TWO, 2048))


def test_normalising_by_count_would_fail():
    """The tolerances above catch Eq. 17 with 1/|Omega| instead of 1/sqrt(|Omega|)."""
    g, fg = _unit_gaussian_over_views(SPHERES_ONE, 2048)
    covered = g.permute(1, 0, 2, 3)[:, fg == 1]
    assert abs(float(covered.var()) - 1) < 0.06
    assert float((covered / 8.0).var()) < 0.1  # 64 sub-pixels, distinct cells: sum/64 = G/8


def _pair_correlation(az_b: float, resolution: int = 96, seeds: int = 150):
    size, az_a = 64, 0.3
    pa, ma = render_points(SPHERES_ONE, az_a, 0.2, size)
    pb, mb = render_points(SPHERES_ONE, az_b, 0.2, size)
    # the latent pixel at the centre of view A, and where its surface point lands in view B
    ra, ca = 28, 28
    point = pa[ra + 4, ca + 4]  # the centre sub-pixel of latent pixel (4, 4)
    ra_l, ca_l = (ra + 4) // 8, (ca + 4) // 8
    rb, cb = project(point, az_b, 0.2, size)
    rb_l, cb_l = rb // 8, cb // 8
    a_vals, b_vals = [], []
    for k in range(seeds):
        noise = IntegralNoise(IntegralNoiseConfig(resolution=resolution), torch.Generator().manual_seed(k))
        g = noise.sample(torch.stack([pa, pb]), torch.stack([ma, mb]), (8, 8))
        a_vals.append(g[0, :, ra_l, ca_l])
        b_vals.append(g[1, :, rb_l, cb_l])
    a, b = torch.cat(a_vals), torch.cat(b_vals)
    seen = bool(mb[rb, cb]) and bool((pb[rb, cb] - point).norm() < 0.05)  # B sees that very point there
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]), seen


def test_same_surface_point_gets_correlated_noise_in_two_views():
    corr, visible = _pair_correlation(0.3 + math.radians(12))
    assert visible
    assert corr > 0.4, corr
    same, _ = _pair_correlation(0.3)
    assert same > 0.99


def test_other_side_is_uncorrelated():
    # view B from behind: the pixel where A's point projects sees the far side of the sphere
    corr, visible = _pair_correlation(0.3 + math.pi)
    assert not visible
    assert abs(corr) < 0.15, corr  # 600 pairs: s.e. ~0.04


def test_background_is_unit_gaussian_and_fresh_each_call():
    pts = torch.zeros(2, 32, 32, 3)
    mask = torch.zeros(2, 32, 32, dtype=torch.bool)
    noise = IntegralNoise(IntegralNoiseConfig(noise_background_fix=False), torch.Generator().manual_seed(0))
    draws = torch.stack([noise.sample(pts, mask, (4, 4)) for _ in range(400)])  # (400, 2, 4, 4, 4)
    flat = draws.flatten()
    assert abs(float(flat.mean())) < 0.03 and abs(float(flat.var()) - 1) < 0.04
    assert abs(float(torch.corrcoef(torch.stack([draws[:-1].flatten(), draws[1:].flatten()]))[0, 1])) < 0.03
    # CFD's noise_background_fix: the same background noise at a latent position every call
    fixed = IntegralNoise(IntegralNoiseConfig(noise_background_fix=True), torch.Generator().manual_seed(0))
    a, b = fixed.sample(pts, mask, (4, 4)), fixed.sample(pts, mask, (4, 4))
    assert torch.equal(a, b) and torch.equal(a[0], a[1])


def test_deterministic_for_a_seed_and_round_trips(tmp_path):
    pts, masks = random_views(SPHERES_TWO, 3, 64, seed=1)
    cfg = IntegralNoiseConfig(noise_background_fix=False)
    a = IntegralNoise(cfg, torch.Generator().manual_seed(7))
    b = IntegralNoise(cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a.sample(pts, masks, (8, 8)), b.sample(pts, masks, (8, 8)))
    other = IntegralNoise(cfg, torch.Generator().manual_seed(8)).sample(pts, masks, (8, 8))
    assert not torch.equal(a.sample(pts, masks, (8, 8)), other)
    torch.save(a.state_dict(), tmp_path / "noise.pt")
    expect = a.sample(pts, masks, (8, 8))
    c = IntegralNoise(IntegralNoiseConfig(resolution=16), torch.Generator().manual_seed(99))
    c.load_state_dict(torch.load(tmp_path / "noise.pt", weights_only=False))
    assert c.config == a.config
    # a's fresh generator advanced by the expect call; reload from before it
    c2 = IntegralNoise(cfg, torch.Generator().manual_seed(99))
    c2.load_state_dict(torch.load(tmp_path / "noise.pt", weights_only=False))
    assert torch.equal(c2.sample(pts, masks, (8, 8)), expect)


def test_reference_field_is_iid_unit_gaussian():
    z = hashed_normal(12345, torch.arange(200000), 4)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.02
    c = torch.corrcoef(torch.stack([z[:-1, 0], z[1:, 0], z[:-1, 1]]))
    assert (c - torch.eye(3)).abs().max() < 0.02
    assert torch.equal(hashed_normal(12345, torch.arange(10), 4), z[:10])


def test_equal_area_cells():
    noise = IntegralNoise(IntegralNoiseConfig(resolution=4, peel_depth=1))
    counts = torch.bincount(noise.cell_index(torch.randn(320000, 3, generator=torch.Generator().manual_seed(0))),
                            minlength=noise.cells).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.05


class _StubPrior:
    num_train_timesteps = 1000

    def alpha_sigma(self, t):
        abar = 1 - t.double().view(-1, 1, 1, 1) / 1000
        return abar.sqrt().float(), (1 - abar).sqrt().float()

    def predict_eps(self, x, t, cond):
        return torch.tanh(0.7 * x + cond.float().mean(dim=(1, 2)).view(-1, 1, 1, 1))

    def decode_for_reward(self, latents, tiny=True):
        return latents


class _StubReward:
    def score(self, images, text_features):
        return images.flatten(1).mean(dim=1)


def _distiller(method, seed):
    from backend.psd.distill import GuidanceConfig, ScoreDistiller
    from backend.psd.negative import NegativeConfig, NegativeEmbedding

    class Recording(ScoreDistiller):
        def _noising(self, x0, eps, a, s):
            self.seen.append(eps.clone())
            return super()._noising(x0, eps, a, s)

    d = Recording(prior=_StubPrior(), reward=_StubReward(), text_features=None, y=torch.full((1, 2, 3), 0.2),
                  negative=NegativeEmbedding(torch.full((1, 2, 3), -0.1), NegativeConfig(lr=0.0)),
                  config=GuidanceConfig(method=method, guidance_scale=7.5, reuse_winner_forward=False),
                  generator=torch.Generator().manual_seed(seed))
    d.seen = []
    return d


def test_distiller_uses_the_given_noise_first():
    from backend.psd.distill import Method

    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([600, 300])
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(11))
    # SDS: the step's noise is the given one, whatever the run's generator
    a, b = _distiller(Method.SDS, 1), _distiller(Method.SDS, 2)
    ga, gb = a.step(x0, t, 0, noise=noise).grad, b.step(x0, t, 0, noise=noise).grad
    assert torch.equal(ga, gb) and torch.equal(a.seen[0], noise)
    # PSD: the pair is the given noise and a random draw
    p = _distiller(Method.PSD, 1)
    out = p.step(x0, t, 0, noise=noise)
    assert out.pair and torch.equal(p.seen[0], noise) and not torch.equal(p.seen[1], noise)
    # without it, a random draw as before
    r = _distiller(Method.PSD, 1)
    r.step(x0, t, 0)
    assert not torch.equal(r.seen[0], noise)


def test_surface_points_from_fragments_line_up_with_the_renders():
    """surface_points rows are top-first like the renders: on a sphere about the origin, the normal
    render at each pixel is the normalised point that pixel sees."""
    from backend.geometry.primitives import uv_sphere
    from backend.render.camera import OrbitSpec
    from backend.render.integral_noise import surface_points
    from backend.render.ops import RasterContext
    from backend.render.shading import rasterize_views, render_normals

    positions, faces, _ = uv_sphere(48, 24, radius=0.5)
    cams = OrbitSpec(width=64, height=64).sample(2, torch.Generator().manual_seed(0))
    ctx = RasterContext("cpu")
    frags = rasterize_views(ctx, positions, faces, cams)
    points, mask = surface_points(ctx, frags, positions, faces)
    normals = render_normals(ctx, frags, positions, faces, torch.ones(3)).permute(0, 2, 3, 1) * 2 - 1
    assert points.shape == (2, 64, 64, 3) and mask.shape == (2, 64, 64) and mask.float().mean() > 0.1
    inner = mask.clone()  # away from the silhouette, where antialiasing blends in the background
    inner[:, 1:-1, 1:-1] &= mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2] & mask[:, 1:-1, 2:]
    inner[:, [0, -1]] = False
    inner[:, :, [0, -1]] = False
    err = (torch.nn.functional.normalize(points[inner], dim=-1) - normals[inner]).norm(dim=-1)
    assert float(err.mean()) < 0.05
    noise = IntegralNoise(IntegralNoiseConfig(), torch.Generator().manual_seed(0)).sample(points, mask, (8, 8))
    assert noise.shape == (2, 4, 8, 8) and torch.isfinite(noise).all()
