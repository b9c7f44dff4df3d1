"""The 2D experiment (Algorithm 2, appendix F.5): optimise one image latent by score distillation.

Reads top to bottom: check the spec, load models, encode prompt and negative descriptors,
then the loop — sample t, one guidance step, Adam on the latent — yielding events, then
write ``image.png``, ``metrics.json``, ``reward_curve.png`` and ``negative_embedding.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from protocol.errors import Psd3dError
from protocol.events import Done, Event, Failed, ImageSnapshot, Progress
from protocol.specs import Image2dSpec
from backend.files import atomic_write_json
from backend.pipelines.common import internal_failure
from backend.models import LoadedModels, load_models
from backend.outputs import MetricsLog, config_to_json, plot_reward_curve, save_png, to_rgba8
from backend.pipelines.presets import PRESETS, get_preset, with_overrides
from backend.psd.distill import Method, ScoreDistiller
from backend.psd.guidance import distillation_loss
from backend.psd.negative import DEFAULT_NEGATIVE_DESCRIPTORS, NegativeEmbedding


def run_image2d(spec: Image2dSpec, out_dir: str | Path, models: LoadedModels | None = None,
                should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
    """Yield Progress per step, ImageSnapshot every few steps, then Done (or Failed).

    ``should_stop`` is polled once per step; when it returns True the run ends early and
    keeps the current image as the result (the protocol's "finish")."""
    try:
        yield from _run(spec, Path(out_dir), models, should_stop)
    except Psd3dError as exc:
        yield Failed(exc.code, exc.message, exc.field)
    except Exception as exc:  # a bug, not bad input: keep the traceback for the report
        yield internal_failure(exc, Path(out_dir))


def _run(spec: Image2dSpec, out: Path, models: LoadedModels | None, should_stop) -> Iterator[Event]:
    # 1. check inputs
    spec.validate(tuple(PRESETS))
    preset = get_preset(spec.preset)
    settings = preset.image2d
    steps = spec.steps or settings.steps
    models = (models or load_models(preset.models)).with_target(spec.reward)
    prior, target = models.prior, models.target_reward
    prior.check_prompt(spec.prompt, "prompt")
    negative_prompt = spec.negative_prompt if spec.negative_prompt is not None else DEFAULT_NEGATIVE_DESCRIPTORS
    if negative_prompt.strip():
        prior.check_prompt(negative_prompt, "negative_prompt")
    guidance = with_overrides(settings.guidance, method=Method(spec.method), guidance_scale=spec.guidance_scale,
                              reward_scale=spec.reward_scale, interval=spec.interval)

    # 2. embeddings: y, n (from descriptors or a learned n), the reward's text features
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    y = prior.encode_text([spec.prompt])
    if spec.negative_embedding:
        n0 = NegativeEmbedding.load_tensor(spec.negative_embedding, tuple(y.shape)).to(prior.device)
    else:
        n0 = prior.encode_text([negative_prompt], field="negative_prompt")
    negative = NegativeEmbedding(n0, settings.negative)
    text_features = target.text_features(spec.prompt)
    distiller = ScoreDistiller(prior=prior, reward=target, text_features=text_features, y=y, negative=negative,
                               config=guidance, generator=generator)

    # 3. the latent theta ~ N(0, I) (Alg. 2 line 1), Adam
    size = settings.resolution // prior.vae_scale
    latent = torch.randn((1, prior.latent_channels, size, size), generator=generator).to(prior.device)
    latent = torch.nn.Parameter(latent)
    optimizer = torch.optim.Adam([latent], lr=settings.lr)
    log = MetricsLog()
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    atomic_write_json(out / "spec.json", {"spec": spec.to_dict(), "steps": steps, "guidance": config_to_json(guidance)})

    # 4. the loop (Alg. 2 lines 4-13)
    done_steps, snapshot = 0, False
    for i in range(steps):
        if should_stop():
            break
        start = time.perf_counter()
        t = settings.schedule.sample(i, steps, 1, prior.num_train_timesteps, generator).to(prior.device)
        result = distiller.step(latent, t, i)
        optimizer.zero_grad(set_to_none=True)
        distillation_loss(latent, result.grad).backward()
        optimizer.step()
        done_steps = i + 1
        extra = {}
        snapshot = done_steps % settings.snapshot_every == 0 or done_steps == steps
        if snapshot:
            with torch.no_grad():
                extra["reward_current"] = float(target.score(prior.decode_for_reward(latent.detach(), **vars(guidance.decode)), text_features).mean())
        record = log.add(i, int(t[0]), result.reward_w, result.reward_l, result.beta_r,
                         time.perf_counter() - start, **extra)
        yield Progress(done_steps, steps, "image2d", record)
        if snapshot:
            with torch.no_grad():
                yield ImageSnapshot(done_steps, to_rgba8(prior.decode_latents(latent.detach())))

    # 5. results (a stopped run's last snapshot is the kept image)
    with torch.no_grad():
        image = prior.decode_latents(latent.detach())
    if not snapshot:
        yield ImageSnapshot(done_steps, to_rgba8(image))
    with torch.no_grad():
        log.final["steps_done"] = done_steps
        log.final["target_reward"] = float(target.score(image, text_features).mean())
        log.final["target_reward_name"] = target.name
        for reward in models.unseen_rewards:
            log.final[f"unseen_{reward.name}"] = float(reward.score(image, reward.text_features(spec.prompt)).mean())
    outputs = {
        "image": save_png(to_rgba8(image), out / "image.png"),
        "metrics": log.write(out / "metrics.json"),
        "reward_curve": plot_reward_curve(log.to_dict(), out / "reward_curve.png", f"{spec.method}: {spec.prompt}"),
        "negative_embedding": out / "negative_embedding.pt",
    }
    negative.save(outputs["negative_embedding"])
    yield Done({k: str(v) for k, v in outputs.items()}, log.to_dict()["final"])

