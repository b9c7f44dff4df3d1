"""CFD's integral noise (paper Eq. 17), in pure PyTorch.

    G(p) = 1/sqrt(|Omega_p|) * sum_{A_i in Omega_p} W(A_i)

W is a pre-set constant white-noise field over cells of the object's space; Omega_p is the set of
cells that latent pixel p's footprint covers once it is carried onto the surface the pixel sees.
Because W is i.i.d. N(0, 1) over cells and the cells in Omega_p are distinct, G(p) is exactly
N(0, 1) for any geometry and any view, while two views that see the same surface patch share the
same W terms and so get correlated noise.

Consistent Flow Distillation (``threestudio/models/noise_generator.py``, ``triplane-noise-generator``)
builds a (H+1)x(W+1) quad mesh from the surface points at the latent pixels' corners and rasterises
it with nvdiffrast into six 2048^2 noise planes (three axis permutations x two signs, each mapped by
``sph2sqr``), peeled into ``peel_depth`` radial layers, counting the noise texels each latent quad
covers. Ours differs (no CUDA extension):

* Omega_p is the set of DISTINCT cells hit by the pixel's render sub-pixels (an 8x8 block at 512^2
  renders for a 64^2 latent), found by one ``torch.unique`` over (pixel, cell) keys, rather than the
  texels a rasterised quad covers. Fine cells -> each sub-pixel its own cell; coarse cells -> a
  pixel's sub-pixels share one.
* One parameterisation instead of six planes: the direction from ``centre`` is mapped by the same
  equal-area concentric map as CFD's ``sph2sqr`` (d = sqrt(1 - cos theta), square rings by
  azimuth), one square per hemisphere (z >= 0, z < 0), ``resolution``^2 cells each; the radius
  |x - centre| / ``radius`` picks one of ``peel_depth`` layers (CFD peels by the same |z| bins).
* W is not a stored 2 x 4 x 2048^2 x 4 tensor (512 MB) but a counter-based hash of (key, cell,
  channel): the same i.i.d. N(0,1) field, fixed by a 63-bit key that a ``torch.Generator`` draws,
  so the state (and the checkpoint) is a few integers.
* Background: sub-pixels that see no surface count in the same normalisation with their own
  N(0,1) terms, so a half-covered pixel is still exactly N(0,1). With ``noise_background_fix``
  (CFD's default) those terms are a fixed per-latent-position noise (CFD uses its fixed
  ``noise_background`` for any pixel whose four corners are not all opaque); without it they are
  fresh every call.
* Not implemented: CFD's ``weight_decay`` (SDE re-noising of W each step), ``sqrt_beta`` < 1 (its
  configs use 1.0: fully determined noise) and ``smooth_regularization`` (corner smoothing, which a
  per-sub-pixel footprint does not need).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class IntegralNoiseConfig:
    """Defaults from CFD's ``configs/cfd/sd-*.yaml`` ``noise_generator`` blocks
    (``triplane-noise-generator``)."""

    channels: int = 4  # noise_c (NoiseGenerator default), the SD latent's channels
    resolution: int = 2048  # noise_ptc_resolution: cells per side of each direction square
    peel_depth: int = 4  # peel_depth: radial layers
    noise_background_fix: bool = True  # noise_background_fix
    radius: float = 1.0  # radius: the box [-1, 1]^3 (our unit frame) the layers span
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ours: CFD's sph2sqr is about the origin


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 32-bit x held in int64 without overflowing it."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_normal(key: int, index: torch.Tensor, channels: int) -> torch.Tensor:
    """i.i.d. N(0, 1) values (N, channels) that depend only on (key, index, channel); index int64 >= 0
    below 2^62."""
    k_lo, k_hi = key & _M32, (key >> 32) & _M32
    base = _hash32(_hash32((index >> 31) ^ k_hi) ^ (index & 0x7FFFFFFF) ^ k_lo)  # (N,)
    streams = torch.arange(channels, device=index.device, dtype=torch.int64)
    bits = _hash32(base[:, None] ^ _hash32(streams * 0x9E3779B9 + 0x68E31DA4)[None])  # (N, C)
    u = ((bits >> 9).float() + 0.5) * 2.0 ** -23  # (0, 1), 23 bits: exact in float32
    return torch.special.ndtri(u)


class IntegralNoise:
    """The fixed reference noise W and Eq. 17's sampler. ``generator`` draws W's key (and seeds the
    fresh background draws), so one seed fixes everything."""

    def __init__(self, config: IntegralNoiseConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.config = config or IntegralNoiseConfig()
        g = generator or torch.Generator().manual_seed(0)
        self.key = int(torch.randint(0, 2 ** 62, (1,), generator=g, dtype=torch.int64))
        self.background_key = int(torch.randint(0, 2 ** 62, (1,), generator=g, dtype=torch.int64))
        self.fresh = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=g, dtype=torch.int64)))

    @property
    def cells(self) -> int:
        c = self.config
        return 2 * c.peel_depth * c.resolution * c.resolution

    # ---- checkpoints
    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "key": self.key, "background_key": self.background_key,
                "fresh": self.fresh.get_state()}

    def load_state_dict(self, state: dict) -> None:
        cfg = dict(state["config"])
        cfg["centre"] = tuple(cfg["centre"])
        self.config = IntegralNoiseConfig(**cfg)
        self.key, self.background_key = int(state["key"]), int(state["background_key"])
        self.fresh.set_state(state["fresh"])

    # ---- the reference field
    def cell_index(self, points: torch.Tensor) -> torch.Tensor:
        """points (..., 3) -> int64 cell ids in [0, cells): hemisphere, radial layer, then the
        equal-area concentric square (CFD's sph2sqr) of the direction from the centre."""
        c = self.config
        p = points.float() - torch.tensor(c.centre, dtype=torch.float32, device=points.device)
        x, y, z = p.unbind(-1)
        r = p.norm(dim=-1)
        cos_t = (z.abs() / r.clamp_min(1e-12)).clamp(0.0, 1.0)
        d = torch.sqrt((1.0 - cos_t).clamp_min(0.0))  # in [0, 1]: equal area on the hemisphere
        phi = torch.atan2(y, x) + math.pi  # [0, 2 pi]
        q = torch.floor(phi / (math.pi / 2)).clamp(0, 3).long()
        t = (phi - q * (math.pi / 2)) / (math.pi / 2) * 2.0 - 1.0  # [-1, 1] along the ring's side
        cq = torch.tensor([1.0, 0.0, -1.0, 0.0], device=p.device)[q]  # the side's rotation by q * 90 deg
        sq = torch.tensor([0.0, 1.0, 0.0, -1.0], device=p.device)[q]
        u, v = d * (cq - sq * t), d * (sq + cq * t)  # on the square ring of half-side d
        res = c.resolution
        i = ((u + 1.0) * 0.5 * res).long().clamp(0, res - 1)
        j = ((v + 1.0) * 0.5 * res).long().clamp(0, res - 1)
        layer = (r / c.radius * c.peel_depth).long().clamp(0, c.peel_depth - 1)
        hemi = (z < 0).long()
        return ((hemi * c.peel_depth + layer) * res + i) * res + j

    def reference(self, cells: torch.Tensor) -> torch.Tensor:
        """W at cell ids (N,) -> (N, C)."""
        return hashed_normal(self.key, cells.long(), self.config.channels)

    # ---- Eq. 17
    @torch.no_grad()
    def sample(self, points: torch.Tensor, mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """points (B,H,W,3) the world surface point each render pixel sees (row 0 at the top, the
        latent's order); mask (B,H,W) bool foreground; latent_hw (h, w), H and W multiples of it (else
        resampled, nearest, to the closest multiples).
        Returns (B, C, h, w) float32 on points' device, every pixel exactly N(0, 1) marginally."""
        c = self.config
        B, H, W, _ = points.shape
        h, w = latent_hw
        if H % h or W % w:  # resample (nearest) to a whole number of sub-pixels per latent pixel
            k = max(1, round(H / h)), max(1, round(W / w))
            grid = torch.cat([points.float().permute(0, 3, 1, 2), mask.float()[:, None]], 1)
            grid = torch.nn.functional.interpolate(grid, size=(h * k[0], w * k[1]), mode="nearest")
            points, mask = grid[:, :3].permute(0, 2, 3, 1), grid[:, 3] > 0.5
            B, H, W, _ = points.shape
        sh, sw = H // h, W // w
        device = points.device
        mask = mask.bool() & torch.isfinite(points).all(-1)
        # latent pixel id of every sub-pixel
        rows = torch.arange(H, device=device) // sh
        cols = torch.arange(W, device=device) // sw
        pix = (torch.arange(B, device=device)[:, None, None] * h + rows[None, :, None]) * w + cols[None, None, :]
        n_pix = B * h * w
        fg_pix = pix[mask]
        cells = self.cell_index(points[mask])
        keys = torch.unique(fg_pix * self.cells + cells)  # distinct (pixel, cell) pairs: Omega_p
        k_pix, k_cell = keys // self.cells, keys % self.cells
        total = torch.zeros(n_pix, c.channels, dtype=torch.float32, device=device)
        total.index_add_(0, k_pix, self.reference(k_cell).to(device))
        count = torch.bincount(k_pix, minlength=n_pix).float()
        n_bg = torch.bincount(pix[~mask], minlength=n_pix).float()  # background sub-pixels per pixel
        if c.noise_background_fix:
            bg = hashed_normal(self.background_key, torch.arange(h * w, device=device), c.channels).to(device)
            bg = bg.repeat(B, 1)
        else:
            bg = torch.randn((n_pix, c.channels), generator=self.fresh, dtype=torch.float32).to(device)
        # the sum of n_bg independent N(0,1) terms is sqrt(n_bg) * N(0,1)
        total = total + n_bg.sqrt()[:, None] * bg
        g = total / (count + n_bg).clamp_min(1.0).sqrt()[:, None]
        return g.view(B, h, w, c.channels).permute(0, 3, 1, 2).contiguous()


def surface_points(ctx, frags, positions: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The world point each render pixel sees, from rasterised fragments
    (:func:`backend.render.shading.rasterize_views`): points (B,H,W,3) and mask (B,H,W) bool, rows
    top-first like the renders and latents."""
    from backend.render.ops import interpolate

    with torch.no_grad():
        pts = interpolate(ctx, positions.detach().float(), frags.rast, faces)
    return pts.flip(1), (frags.rast[..., 3] > 0).flip(1)
