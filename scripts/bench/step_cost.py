#!/usr/bin/env python
"""Cost of one texture-stage step: SDS vs PSD (k = 1, 2, 5) vs DreamDPO, side by side.

Each step does the work a real texture step does: encode the render (a 3-channel image that
requires grad, standing in for the rasterised UV texture) with the VAE encoder, noise, the
UNet, decode the one-step predictions for the reward, the reward, the n update on pair
steps, and the backward of the distillation loss through the encoder. Every method runs in
the same process on the same models, and its time is the mean over whole k-cycles (10 steps
by default, a multiple of 1, 2 and 5), so the one PSD step in five is counted.

Shapes: ``tiny`` (the tiny preset's models) and ``sd21-shape`` (random weights with Stable
Diffusion 2.1 base's UNet / VAE / text-encoder configs, TAESD's config, and an open_clip
ViT-H-14 reward: the real cost structure; 32x32 latents on a CPU, 64x64 on a GPU).

    .venv/bin/python scripts/bench/step_cost.py --shape tiny
    .venv/bin/python scripts/bench/step_cost.py --shape sd21-shape --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller  # noqa: E402
from backend.psd.guidance import distillation_loss  # noqa: E402
from backend.psd.negative import NegativeConfig, NegativeEmbedding  # noqa: E402
from backend.psd.prior import DiffusionPrior  # noqa: E402
from backend.psd.rewards import HpsReward  # noqa: E402

PROMPT = "A DSLR photo of a plate of fried chicken and waffles with maple syrup on them"


def tiny_models(device, dtype):
    from backend.models import load_models, quiet_libraries
    from backend.presets import TINY_MODELS

    quiet_libraries()
    m = load_models(TINY_MODELS, device=device, dtype=dtype)
    return m.prior, m.target_reward


def sd21_shape_models(device, dtype):
    """Random weights, real shapes: SD 2.1 base's configs (stabilityai/stable-diffusion-2-1-base
    unet/vae/text_encoder config.json), TAESD's (diffusers AutoencoderTiny defaults), open_clip ViT-H-14."""
    import open_clip
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.models import quiet_libraries
    from backend.psd.analytic import sd_alphas_cumprod
    from backend.psd.tiny import clip_tokenizer

    quiet_libraries()
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=768, scaling_factor=0.18215,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
    ))
    taesd = AutoencoderTiny()
    clip = open_clip.create_model("ViT-H-14", pretrained=None)
    counts = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text), ("taesd", taesd), ("reward ViT-H-14", clip))}
    print("parameters (M): " + ", ".join(f"{k} {v:.0f}" for k, v in counts.items()))
    prior = DiffusionPrior(unet.to(device, dtype), vae.to(device, dtype), text.to(device, dtype), clip_tokenizer(),
                           sd_alphas_cumprod().float(), taesd.to(device, dtype))
    reward = HpsReward(clip.to(device, dtype if device.type == "cuda" else torch.float32),
                       open_clip.get_tokenizer("ViT-H-14"))
    return prior, reward


class Timers:
    """Wall time per labelled region; wraps the prior's and reward's methods of one instance."""

    def __init__(self, sync) -> None:
        self.total = defaultdict(float)
        self.sync = sync

    @contextmanager
    def region(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.total[name] += time.perf_counter() - start

    def wrap(self, obj, method: str, name: str) -> None:
        fn = getattr(obj, method)

        def timed(*args, **kwargs):
            with self.region(name):
                return fn(*args, **kwargs)

        setattr(obj, method, timed)


def run_method(prior, reward, label, guidance, steps, size, device, sync, n0, y, feats):
    timers = Timers(sync)
    timers.wrap(prior, "predict_eps", "unet")
    timers.wrap(prior, "decode_for_reward", "decode x0")
    timers.wrap(reward, "score", "reward")
    timers.wrap(prior, "encode_images", "encode render")
    negative = NegativeEmbedding(n0, NegativeConfig())
    timers.wrap(negative, "ascend", "n backward + Adam")
    distiller = ScoreDistiller(prior, reward, feats, y, negative, guidance, torch.Generator().manual_seed(0))
    render = torch.rand(1, 3, size * prior.vae_scale, size * prior.vae_scale, device=device, requires_grad=True)
    t = torch.full((1,), 500, dtype=torch.long, device=device)
    # warm-up: one pair step and one plain step (allocations, kernels)
    for s in range(2):
        distillation_loss(prior.encode_images(render), distiller.step(prior.encode_images(render), t, s).grad).backward()
    timers.total.clear()
    sync()
    start = time.perf_counter()
    for s in range(steps):
        x_c = prior.encode_images(render)
        out = distiller.step(x_c, t, s)
        with timers.region("backward (render)"):
            distillation_loss(x_c, out.grad).backward()
    sync()
    per_step = (time.perf_counter() - start) / steps
    for attr in ("predict_eps", "decode_for_reward", "encode_images"):
        delattr(prior, attr)
    delattr(reward, "score")
    return per_step, {k: v / steps for k, v in timers.total.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["tiny", "sd21-shape"], default="tiny")
    ap.add_argument("--steps", type=int, default=10, help="steps per method; a multiple of 10 keeps whole k-cycles")
    ap.add_argument("--latent", type=int, default=None, help="latent size (default 16 tiny, 32 CPU / 64 GPU sd21-shape)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.steps % 10:
        ap.error("--steps must be a multiple of 10 (whole cycles of k = 1, 2 and 5)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    prior, reward = (tiny_models if args.shape == "tiny" else sd21_shape_models)(device, dtype)
    size = args.latent or (16 if args.shape == "tiny" else (64 if device.type == "cuda" else 32))
    print(f"{args.shape}: models ready in {time.perf_counter() - start:.0f} s; device {device} {dtype}, "
          f"{torch.get_num_threads()} threads, latent {size}x{size}, {args.steps} steps per method")
    with torch.no_grad():
        y = prior.encode_text([PROMPT])
        n0 = prior.encode_text(["low quality, blurry, ugly"])
    feats = reward.text_features(PROMPT)
    base = GuidanceConfig()  # the reward path: TAESD at 224 px (latent 28), reuse of the winner's forward
    methods = [
        ("sds", replace(base, method=Method.SDS)),
        ("psd_k1", replace(base, interval=1)),
        ("psd_k2", replace(base, interval=2)),
        ("psd_k5", replace(base, interval=5)),
        ("dreamdpo", replace(base, method=Method.DREAMDPO)),
        ("psd_k1_recompute", replace(base, interval=1, reuse_winner_forward=False)),
        ("psd_k1_fullvae", replace(base, interval=1, decode=replace(base.decode, tiny=False, latent_size=None))),
    ]
    results = {}
    for label, guidance in methods:
        per_step, parts = run_method(prior, reward, label, guidance, args.steps, size, device, sync, n0, y, feats)
        results[label] = per_step
        where = ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  {label:18s} {per_step:8.3f} s/step   [{where}]", flush=True)
    sds = results["sds"]
    print(f"  (variants: psd_k1 with the n-gradient recomputed instead of reusing the winner's forward: "
          f"{results['psd_k1_recompute'] / sds:.2f}x; with the full VAE decoder on the reward path: "
          f"{results['psd_k1_fullvae'] / sds:.2f}x)")
    print(f"{args.shape}: psd_k1/sds={results['psd_k1'] / sds:.2f} psd_k2/sds={results['psd_k2'] / sds:.2f} "
          f"psd_k5/sds={results['psd_k5'] / sds:.2f} dreamdpo/sds={results['dreamdpo'] / sds:.2f}")


if __name__ == "__main__":
    main()
