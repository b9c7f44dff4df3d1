#!/usr/bin/env python
"""Cost of one texture-stage step: SDS vs PSD (k = 1, 2, 5) vs DreamDPO, side by side.

Each step does the work a real texture step does: encode the render (a 3-channel image that
requires grad, standing in for the rasterised UV texture) with the VAE encoder, noise, the
UNet, decode the one-step predictions for the reward, the reward, the n update on pair
steps, and the backward of the distillation loss through the encoder.

Timing is interleaved so that the machine's load falls on every method alike: each round runs
one step of every method, in an order rotated by one each round. PSD with interval k runs its
pair step every k-th step, so a method's cost per step is taken over its complete k-cycles (the
mean of k consecutive steps; a trailing incomplete cycle is dropped), and its ratio to SDS is
taken per cycle against SDS's steps in the same rounds. Reported: the median over cycles with
the interquartile range [q1, q3]. On a CPU the same ratios are also taken over this process's
CPU time (``time.process_time``, all its threads), which another process's load does not inflate:
the last line then ends in ``cpu_<method>/sds=`` keys beside the wall-time ones.

Shapes: ``tiny`` (the tiny preset's models) and ``sd21-shape`` (random weights with Stable
Diffusion 2.1 base's UNet / VAE / text-encoder configs, TAESD's config, and an open_clip
ViT-H-14 reward: the real cost structure; 32x32 latents on a CPU, 64x64 on a GPU).

The multi-view case (MVDream, issue 13): ``mvdream-tiny`` (the tiny preset's MVDream twin, loaded
as the pipeline loads it) and ``mvdream-shape`` (random weights with the real sd-v2.1-base-4view
UNet config, backend/psd/mvdream_sd21.yaml, through ``unet_from_params``; VAE, text encoder, TAESD
and the ViT-H-14 reward as sd21-shape). A step there is ``--objects`` objects x 4 views (one t
shared by an object's views, a camera per view from MultiViewOrbit), as the single-stage
pipeline runs it; the render is one 3-channel image per view.

    .venv/bin/python scripts/bench/step_cost.py --shape tiny
    .venv/bin/python scripts/bench/step_cost.py --shape sd21-shape --rounds 10
    .venv/bin/python scripts/bench/step_cost.py --shape mvdream-tiny --rounds 5
    .venv/bin/python scripts/bench/step_cost.py --shape mvdream-shape --rounds 10 --no-variants
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller  # noqa: E402
from backend.psd.guidance import distillation_loss  # noqa: E402
from backend.psd.negative import NegativeConfig, NegativeEmbedding  # noqa: E402
from backend.psd.prior import DiffusionPrior  # noqa: E402
from backend.psd.rewards import HpsReward  # noqa: E402

PROMPT = "A DSLR photo of a plate of fried chicken and waffles with maple syrup on them"


def tiny_models(device, dtype):
    from backend.models import load_models, quiet_libraries
    from backend.pipelines.presets import TINY_MODELS

    quiet_libraries()
    m = load_models(TINY_MODELS, device=device, dtype=dtype)
    return m.prior, m.target_reward


def mvdream_tiny_models(device, dtype):
    from backend.models import load_models, load_multiview, quiet_libraries
    from backend.pipelines.presets import TINY_MODELS

    quiet_libraries()
    m = load_models(TINY_MODELS, device=device, dtype=dtype)
    return load_multiview(TINY_MODELS, device=device, dtype=dtype), m.target_reward


@dataclass
class Sd21ShapeModules:
    """float32 modules on the CPU with random weights and the real sizes."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module
    taesd: torch.nn.Module
    clip: torch.nn.Module
    multiview: bool = False  # unet is a MultiViewUNet (MVDream): the prior is a MultiViewPrior

    def prior(self, device, dtype) -> DiffusionPrior:
        """A prior of copies of these modules in ``dtype`` on ``device`` (the same weights for every dtype)."""
        from backend.psd.analytic import sd_alphas_cumprod
        from backend.psd.tiny import clip_tokenizer

        def cast(m):
            return copy.deepcopy(m).to(device, dtype)

        from backend.psd.mvdream import MultiViewPrior

        cls = MultiViewPrior if self.multiview else DiffusionPrior
        return cls(cast(self.unet), cast(self.vae), cast(self.text), clip_tokenizer(),
                              sd_alphas_cumprod().float(), cast(self.taesd))

    def reward(self, device) -> HpsReward:
        """The ViT-H-14 reward in float32, as ``backend.models.load_models`` loads it."""
        import open_clip

        return HpsReward(self.clip.to(device, torch.float32), open_clip.get_tokenizer("ViT-H-14"))


def sd21_shape_modules(seed: int = 0, multiview: bool = False) -> Sd21ShapeModules:
    """Random weights, real shapes: SD 2.1 base's configs (stabilityai/stable-diffusion-2-1-base
    unet/vae/text_encoder config.json), TAESD's (diffusers AutoencoderTiny defaults), open_clip ViT-H-14.
    ``multiview``: the UNet is MVDream's instead (backend/psd/mvdream_sd21.yaml, the config of
    sd-v2.1-base-4view.pt, via unet_from_params: SD 2.1 base's UNet plus the camera MLP, attn1 over 4 views)."""
    import open_clip
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.models import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    if multiview:
        from backend.psd.mvdream import SD21_MVDREAM_CONFIG, read_unet_params, unet_from_params

        unet = unet_from_params(read_unet_params(SD21_MVDREAM_CONFIG))
    else:
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
    modules = Sd21ShapeModules(unet, vae, text, AutoencoderTiny(), open_clip.create_model("ViT-H-14", pretrained=None),
                               multiview=multiview)
    counts = {name: sum(p.numel() for p in getattr(modules, name).parameters()) / 1e6
              for name in ("unet", "vae", "text", "taesd", "clip")}
    print("parameters (M): " + ", ".join(f"{k} {v:.0f}" for k, v in counts.items()))
    return modules


def sd21_shape_models(device, dtype):
    modules = sd21_shape_modules()
    return modules.prior(device, dtype), modules.reward(device)


def mvdream_shape_models(device, dtype):
    modules = sd21_shape_modules(multiview=True)
    return modules.prior(device, dtype), modules.reward(device)


SHAPES = {"tiny": tiny_models, "sd21-shape": sd21_shape_models, "mvdream-tiny": mvdream_tiny_models,
          "mvdream-shape": mvdream_shape_models}


class ShrunkLatentPrior:
    """The reward path before issue 11: latents shrunk to 28x28 (224 px), then decoded.
    Kept here only to measure what decoding the full-size latent costs."""

    def __init__(self, prior, latent_size: int = 28) -> None:
        self._prior, self._size = prior, latent_size

    def __getattr__(self, name):
        return getattr(self._prior, name)

    def decode_for_reward(self, latents, **decode):
        if latents.shape[-1] != self._size:
            latents = F.interpolate(latents, size=(self._size, self._size), mode="bilinear",
                                    align_corners=False, antialias=True)
        return self._prior.decode_for_reward(latents, **decode)


class Timers:
    """Wall time per (method, region); wraps the prior's and reward's methods once, and books
    each call under the method that is running (``current``)."""

    def __init__(self, sync) -> None:
        self.total = defaultdict(lambda: defaultdict(float))
        self.current = ""
        self.sync = sync

    @contextmanager
    def region(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.total[self.current][name] += time.perf_counter() - start

    def wrap(self, obj, method: str, name: str) -> None:
        fn = getattr(obj, method)

        def timed(*args, **kwargs):
            with self.region(name):
                return fn(*args, **kwargs)

        setattr(obj, method, timed)


class Runner:
    """One method's state: its distiller (own n and Adam, own noise), its render, its step times."""

    def __init__(self, label, prior, reward, guidance, size, device, timers, n0, y, feats, objects: int = 1) -> None:
        self.label, self.prior, self.timers = label, prior, timers
        self.negative = NegativeEmbedding(n0, NegativeConfig())
        timers.wrap(self.negative, "ascend", "n backward + Adam")
        views = int(getattr(prior, "num_frames", 1))  # MVDream: 4 consecutive rows per object
        self.distiller = ScoreDistiller(prior=prior, reward=reward, text_features=feats, y=y, negative=self.negative,
                                        config=guidance, generator=torch.Generator().manual_seed(0), views=views)
        self.interval = guidance.interval if guidance.method is Method.PSD else 1
        side = size * prior.vae_scale
        rows = objects * views
        self.render = torch.rand(rows, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_(True)
        self.t = torch.full((rows,), 500, dtype=torch.long, device=device)  # one t, shared by an object's views
        self.camera = None
        if views > 1:
            from backend.psd.mvdream import mvdream_camera
            from backend.render.camera import MultiViewOrbit

            cams = MultiViewOrbit(views=views, width=side, height=side).sample(objects, torch.Generator().manual_seed(2))
            self.camera = mvdream_camera(torch.stack([c.c2w for c in cams])).to(device)
        self.steps = 0
        self.times: list[float] = []  # wall seconds, one per timed step, in round order
        self.cpu: list[float] = []  # this process's CPU seconds for the same steps (all its threads)

    def step(self, timed: bool = True) -> None:
        self.timers.current = self.label if timed else ""
        self.timers.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        x_c = self.prior.encode_images(self.render)
        out = self.distiller.step(x_c, self.t, self.steps, camera=self.camera)
        with self.timers.region("backward (render)"):
            distillation_loss(x_c, out.grad).backward()
        self.render.grad = None
        self.timers.sync()
        if timed:
            self.times.append(time.perf_counter() - start)
            self.cpu.append(time.process_time() - cpu_start)
        self.steps += 1

    def cycles(self) -> list[range]:
        """The rounds of each complete k-cycle of timed steps."""
        k, n = self.interval, len(self.times)
        return [range(i, i + k) for i in range(0, n - n % k, k)]


def ratio_to(runner: Runner, sds: Runner, clock: str = "times") -> tuple[float, float, float]:
    """Quartiles of the runner's cost per step over SDS's in the same rounds, one value per k-cycle."""
    mine, base = getattr(runner, clock), getattr(sds, clock)
    return quartiles([statistics.fmean(mine[i] for i in c) / statistics.fmean(base[i] for i in c)
                      for c in runner.cycles()])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--rounds", type=int, default=30,
                    help="rounds of one step per method; a multiple of 10 keeps whole cycles of k = 1, 2 and 5")
    ap.add_argument("--latent", type=int, nargs="+", default=None,
                    help="latent size (default 16 tiny and mvdream-tiny, 32 CPU / 64 GPU sd21-shape and mvdream-shape); "
                         "several sizes run one after the other on the same models, each ending in a line "
                         "'<shape> latent<size>: ...'")
    ap.add_argument("--objects", type=int, default=1,
                    help="multi-view shapes: objects per step, 4 views each (the single stage: 2 at 64^2 renders, then 1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="default cuda when present, else cpu")
    ap.add_argument("--no-variants", action="store_true",
                    help="only sds, psd_k1/2/5 and dreamdpo (sd21-shape on a CPU: a round of all eight takes minutes)")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error("--rounds must be at least 5 (one whole cycle of k = 5)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    prior, reward = SHAPES[args.shape](device, dtype)
    sizes = args.latent or [16 if args.shape.endswith("tiny") else (64 if device.type == "cuda" else 32)]
    views = int(getattr(prior, "num_frames", 1))
    batch = f", {args.objects} object(s) x {views} views per step" if views > 1 else ""
    print(f"{args.shape}: models ready in {time.perf_counter() - start:.0f} s; device {device} {dtype}, "
          f"{torch.get_num_threads()} threads, latent {', '.join(f'{z}x{z}' for z in sizes)}{batch}, {args.rounds} interleaved rounds")
    with torch.no_grad():
        y = prior.encode_text([PROMPT])
        n0 = prior.encode_text(["low quality, blurry, ugly"])
    feats = reward.text_features(PROMPT)

    timers = Timers(sync)
    timers.wrap(prior, "predict_eps", "unet")
    timers.wrap(prior, "decode_for_reward", "decode x0")
    timers.wrap(reward, "score", "reward")
    timers.wrap(prior, "encode_images", "encode render")
    base = GuidanceConfig()  # the reward path: TAESD on the full-size latent, reuse of the winner's forward
    methods = [
        ("sds", prior, replace(base, method=Method.SDS)),
        ("psd_k1", prior, replace(base, interval=1)),
        ("psd_k2", prior, replace(base, interval=2)),
        ("psd_k5", prior, replace(base, interval=5)),
        ("dreamdpo", prior, replace(base, method=Method.DREAMDPO)),
        ("psd_k1_recompute", prior, replace(base, interval=1, reuse_winner_forward=False)),
        ("psd_k1_fullvae", prior, replace(base, interval=1, decode=replace(base.decode, tiny=False))),
        ("psd_k1_latent28", ShrunkLatentPrior(prior), replace(base, interval=1)),
        ("psd_k1_allhalf", prior, replace(base, interval=1, float32_reward_path=False)),  # a half prior only
    ]
    if args.no_variants:
        methods = methods[:5]
    for size in sizes:
        timers.total.clear()
        prefix = args.shape if len(sizes) == 1 else f"{args.shape} latent{size}"
        if len(sizes) > 1:
            print(f"latent {size}x{size}:", flush=True)
        runners = [Runner(label, p, reward, g, size, device, timers, n0, y, feats, args.objects) for label, p, g in methods]
        for runner in runners:  # warm-up: one pair step and one plain step (allocations, kernels)
            runner.step(timed=False)
            runner.step(timed=False)
        for r in range(args.rounds):
            shift = r % len(runners)
            start = time.perf_counter()
            for runner in runners[shift:] + runners[:shift]:
                runner.step()
            print(f"  round {r + 1}/{args.rounds}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

        sds = runners[0]
        ratios = {}
        print(f"  {'method':18s} {'s/step median [q1, q3]':>30s}   {'/sds median [q1, q3]':>24s}   cycles   per-step parts (s)")
        for runner in runners:
            cycles = runner.cycles()
            per_step = [statistics.fmean(runner.times[i] for i in c) for c in cycles]
            q = quartiles(per_step)
            qr = ratio_to(runner, sds)
            ratios[runner.label] = qr[1]
            parts = ", ".join(f"{k} {v / len(runner.times):.3f}" for k, v in
                              sorted(timers.total[runner.label].items(), key=lambda kv: -kv[1]))
            print(f"  {runner.label:18s} {q[1]:9.3f} [{q[0]:8.3f}, {q[2]:8.3f}]   {qr[1]:10.2f}x [{qr[0]:5.2f}, {qr[2]:5.2f}]"
                  f"   {len(cycles):3d}x{runner.interval}   [{parts}]", flush=True)
        if not args.no_variants:
            print(f"  (variants of psd_k1 / psd_k1: n-gradient recomputed instead of reusing the winner's forward "
                  f"{ratios['psd_k1_recompute'] / ratios['psd_k1']:.2f}x; full VAE decoder on the reward path "
                  f"{ratios['psd_k1_fullvae'] / ratios['psd_k1']:.2f}x; the old reward path, latent shrunk to 28x28 "
                  f"before TAESD, {ratios['psd_k1_latent28'] / ratios['psd_k1']:.2f}x; the reward path in the prior's half "
                  f"precision instead of float32 (GuidanceConfig.float32_reward_path=False; 1.00 on a float32 prior) "
                  f"{ratios['psd_k1_allhalf'] / ratios['psd_k1']:.2f}x)")
        labels = ("psd_k1", "psd_k2", "psd_k5", "dreamdpo")
        line = " ".join(f"{k}/sds={ratios[k]:.2f}" for k in labels)
        if device.type == "cpu":  # CPU time: what this process computed, whatever else shares the machine
            by_label = {r.label: r for r in runners}
            cpu = {k: ratio_to(by_label[k], sds, "cpu") for k in labels}
            print("  cpu time /sds median [q1, q3]: " + ", ".join(
                f"{k} {q[1]:.2f}x [{q[0]:.2f}, {q[2]:.2f}]" for k, q in cpu.items()))
            line += " " + " ".join(f"cpu_{k}/sds={q[1]:.2f}" for k, q in cpu.items())
        print(f"{prefix}: {line}")


if __name__ == "__main__":
    main()
