#!/usr/bin/env python
"""Do the gradients survive half precision? float16 and bfloat16 priors against float32.

Two gradients, each computed by the code the pipelines run, from the same inputs in every dtype:

* ``n``: the negative embedding's gradient, Eq. 13 / 31-32 (``negative_embedding_reward``):
  the reward (float32) of the one-step prediction, back through the decoder (TAESD), Tweedie,
  CFG and the UNet's n branch. ``eps(y)`` is computed by the same prior.
* ``render``: the gradient of the distillation loss (an SDS step, ``ScoreDistiller``) with
  respect to the image fed to the VAE encoder: back through the encoder only.

For each dtype and t: the cosine to float32's gradient, and the fraction of elements that are
zero where float32's are not. Rows: ``fp16`` and ``bf16`` are the shipped code: a half prior whose
pair steps run the reward path — the UNet calls (eps(y) and the n branch) and TAESD — in float32
(``prior.float32_reward_path``; ``GuidanceConfig.float32_reward_path``, on by default), the VAE
half. ``fp16 all-half`` and ``bf16 all-half`` switch that off; ``fp16 unscaled`` is all-half with
the prior's gradient rescaling off too (``half_grad_peak=None``). ``fp32 @ fp16 eps(y)`` is
float32 throughout except ``eps(y)``, taken from the float16 prior — how far the float32 gradient
itself moves when the point it is taken at moves by float16's forward rounding (amplified by
(s_t / a_t)(gamma - 1) in x0), the bound no all-half backward can beat.
The last column: seconds per n gradient (mean over t) on this device.

Where the rounding comes from (tiny, bfloat16, cosine at t = 400 / 700 / 950): float32 for a
single part of the bfloat16 UNet leaves the cosine at 0.93..0.97 whichever part it is (conv_out and
its norm, the time embedding, cross-attention, self-attention, the transformer blocks, the
resnets, every norm, every Linear); TAESD in float32 with the UNet bfloat16: 0.96 / 0.92 / 0.94;
eps(y) alone in float32: 0.98 / 0.95 / 0.96; the UNet in float32 from the bfloat16-rounded
weights: 0.999 / 0.998 / 0.995. The error is the whole UNet's forward rounding, not one op.

    .venv/bin/python scripts/bench/half_precision.py --shape tiny
    .venv/bin/python scripts/bench/half_precision.py --shape sd21-shape --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller  # noqa: E402
from backend.psd.guidance import add_noise, distillation_loss  # noqa: E402
from backend.psd.negative import NegativeConfig, NegativeEmbedding, negative_embedding_reward  # noqa: E402
from step_cost import PROMPT, sd21_shape_modules  # noqa: E402

TIMESTEPS = (100, 400, 700, 950)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def centre_tiny_decoder(prior) -> None:
    """The tiny TAESD twin decodes every latent to about -0.05 +- 0.03, so the reward path's
    clamp to [0, 1] passes gradient through ~0.1 % of its pixels and the n gradient is set by
    which few pixels those are. Its last convolution's bias + 0.5 centres its pictures (another
    random twin, not a fix): the gradient then flows through the decoder as it does with TAESD's
    real weights. In place: the bench's own process only."""
    with torch.no_grad():
        prior.tiny_decoder.decoder.layers[-1].bias += 0.5


def tiny_priors(device, centre: bool = True):
    from backend.models import load_models, quiet_libraries
    from backend.pipelines.presets import TINY_MODELS

    quiet_libraries()
    loaded = {name: load_models(TINY_MODELS, device=device, dtype=dtype) for name, dtype in DTYPES.items()}
    for m in loaded.values():
        if centre:
            centre_tiny_decoder(m.prior)
    return {name: m.prior for name, m in loaded.items()}, loaded["fp32"].target_reward


def sd21_shape_priors(device):
    modules = sd21_shape_modules()
    return {name: modules.prior(device, dtype) for name, dtype in DTYPES.items()}, modules.reward(device)


class Case:
    """The inputs shared by every dtype: a smooth random picture (the render), a unit-variance
    latent x0 (SD's scaled latents have about unit variance; a random VAE's encoding has not), y, n, noise."""

    def __init__(self, prior32, reward, size: int, device, gamma: float) -> None:
        gen = torch.Generator().manual_seed(0)
        side = size * prior32.vae_scale
        coarse = torch.rand(1, 3, max(2, side // 16), max(2, side // 16), generator=gen)
        self.image = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic").clamp(0, 1).to(device)
        self.x0 = torch.randn(1, prior32.latent_channels, size, size, generator=gen).to(device)
        self.eps = torch.randn(self.x0.shape, generator=gen).to(device)
        with torch.no_grad():
            self.y = prior32.encode_text([PROMPT])
            self.n = prior32.encode_text(["low quality, blurry, ugly"])
        self.feats = reward.text_features(PROMPT)
        self.reward, self.gamma, self.device = reward, gamma, device

    def n_grad(self, prior, t: int, eps_y_prior=None, float32_path: bool = False) -> torch.Tensor:
        """d r(y, x0(n)) / d n (Eq. 31-32) at x_t = a x0 + s eps; ``eps_y_prior`` computes eps(y) (default
        ``prior``); ``float32_path``: eps(y), the n branch and TAESD in float32, as a pair step
        with ``GuidanceConfig.float32_reward_path`` runs them."""
        tt = torch.tensor([t], device=self.device)
        a, s = prior.alpha_sigma(tt)
        x_t = add_noise(self.x0, self.eps, a, s)
        with prior.float32_reward_path() if float32_path else contextlib.nullcontext():
            with torch.no_grad():
                eps_y = (eps_y_prior or prior).predict_eps(x_t, tt, self.y)
            n = self.n.clone().requires_grad_(True)
            r = negative_embedding_reward(prior, self.reward, self.feats, x_t, tt, eps_y, n, self.gamma, dict(tiny=True))
            (grad,) = torch.autograd.grad(r.sum(), n)
        return grad

    def render_grad(self, prior, t: int) -> torch.Tensor:
        """d L_SDS / d image, the image fed to the VAE encoder (one SDS step of ``ScoreDistiller``)."""
        image = self.image.clone().requires_grad_(True)
        negative = NegativeEmbedding(self.n, NegativeConfig(lr=0.0))
        guidance = GuidanceConfig(method=Method.SDS, guidance_scale=self.gamma)
        distiller = ScoreDistiller(prior=prior, reward=self.reward, text_features=self.feats, y=self.y,
                                   negative=negative, config=guidance, generator=torch.Generator().manual_seed(1))
        x_c = prior.encode_images(image)
        out = distiller.step(x_c, torch.tensor([t], device=self.device), 0)
        distillation_loss(x_c, out.grad).backward()
        return image.grad


def compare(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(cosine, fraction of ref's nonzero elements that are zero in ``other``), in float64."""
    a, b = ref.flatten().double(), other.flatten().double()
    if not torch.isfinite(b).all():
        return float("nan"), float("nan")
    norms = a.norm() * b.norm()
    cos = float(a @ b / norms) if norms > 0 else 0.0  # not F.cosine_similarity: its eps 1e-8 floors tiny norms
    nonzero = a != 0
    lost = float(((b == 0) & nonzero).sum() / nonzero.sum().clamp_min(1))
    return cos, lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["tiny", "sd21-shape"], default="tiny")
    ap.add_argument("--device", default=None, help="default cuda when present, else cpu")
    ap.add_argument("--latent", type=int, default=None, help="latent size (default 16 tiny, 32 CPU / 64 GPU sd21-shape)")
    ap.add_argument("--gamma", type=float, default=7.5, help="CFG scale in Eq. 3's form")
    ap.add_argument("--as-built-tiny-decoder", action="store_true",
                    help="tiny: keep the TAESD twin as built (its pictures almost all clamp to 0)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    if args.shape == "tiny":
        priors, reward = tiny_priors(device, centre=not args.as_built_tiny_decoder)
    else:
        priors, reward = sd21_shape_priors(device)
    size = args.latent or (16 if args.shape == "tiny" else (64 if device.type == "cuda" else 32))
    case = Case(priors["fp32"], reward, size, device, args.gamma)
    print(f"{args.shape}: models ready in {time.perf_counter() - start:.0f} s; device {device}, latent {size}x{size}, "
          f"gamma {args.gamma}; each cell: cosine to fp32 / fraction of fp32's nonzero elements lost to zero")

    fp16, bf16 = priors["fp16"], priors["bf16"]

    def unscaled(fn):
        peak, fp16.half_grad_peak = fp16.half_grad_peak, None
        try:
            return fn()
        finally:
            fp16.half_grad_peak = peak

    rows = {  # label -> (gradient kind, function of t)
        "n      fp16 unscaled": ("n", lambda t: unscaled(lambda: case.n_grad(fp16, t))),
        "n      fp16": ("n", lambda t: case.n_grad(fp16, t, float32_path=True)),
        "n      bf16": ("n", lambda t: case.n_grad(bf16, t, float32_path=True)),
        "n      fp16 all-half": ("n", lambda t: case.n_grad(fp16, t)),
        "n      bf16 all-half": ("n", lambda t: case.n_grad(bf16, t)),
        "n      fp32 @ fp16 eps(y)": ("n", lambda t: case.n_grad(priors["fp32"], t, eps_y_prior=fp16)),
        "n      fp32 @ bf16 eps(y)": ("n", lambda t: case.n_grad(priors["fp32"], t, eps_y_prior=bf16)),
        "render fp16 unscaled": ("render", lambda t: unscaled(lambda: case.render_grad(fp16, t))),
        "render fp16": ("render", lambda t: case.render_grad(fp16, t)),
        "render bf16": ("render", lambda t: case.render_grad(bf16, t)),
    }
    def timed(fn, t):
        begin = time.perf_counter()
        return fn(t), time.perf_counter() - begin

    refs = {t: {"n": case.n_grad(priors["fp32"], t), "render": case.render_grad(priors["fp32"], t)} for t in TIMESTEPS}
    print(f"  {'':26s}" + "".join(f"{'t=' + str(t):>18s}" for t in TIMESTEPS) + "   s/grad")
    results = {}
    for label, (kind, fn) in rows.items():
        grads = [timed(fn, t) for t in TIMESTEPS]
        results[label] = [compare(refs[t][kind], g) for t, (g, _) in zip(TIMESTEPS, grads)]
        seconds = sum(dt for _, dt in grads) / len(grads)
        print(f"  {label:26s}" + "".join(f"{c:10.4f} {z:6.1%}" for c, z in results[label]) + f"   {seconds:6.2f}", flush=True)
    summary = []
    for name in ("fp16", "bf16", "fp16 all-half", "bf16 all-half"):
        cells, key = results[f"n      {name}"], name.replace(" all-half", "_allhalf")
        summary += [f"n_grad_cos_min_{key}={min(c for c, _ in cells):.4f}", f"n_grad_zero_max_{key}={max(z for _, z in cells):.4f}"]
    print(" ".join(summary))


if __name__ == "__main__":
    main()
