"""Load a preset's models once per process and keep them for later jobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.errors import UnknownNameError
from backend.psd.mvdream import MultiViewPrior
from backend.psd.prior import DiffusionPrior
from backend.psd.rewards import RewardModel, load_reward
from backend.psd.tiny import ensure_tiny_models

_CACHE: dict[tuple, "LoadedModels"] = {}
_MULTIVIEW: dict[tuple, MultiViewPrior] = {}


@dataclass
class LoadedModels:
    prior: DiffusionPrior
    target_reward: RewardModel
    unseen_rewards: list[RewardModel]

    def with_target(self, name: str) -> "LoadedModels":
        """The same models with reward ``name`` as the target and every other one unseen."""
        rewards = [self.target_reward, *self.unseen_rewards]
        chosen = [r for r in rewards if r.name == name]
        if not chosen:
            raise UnknownNameError(f"reward: {name!r} is not loaded by this preset; choose one of "
                                   f"{', '.join(r.name for r in rewards)}", field="reward")
        return LoadedModels(self.prior, chosen[0], [r for r in rewards if r.name != name])


def quiet_libraries() -> None:
    """Keep diffusers/transformers/open_clip chatter (load bars, 'initialised randomly' for
    the tiny twins) out of the CLI's output; errors still show."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.ERROR)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device() -> str:
    """What jobs run on, for the server's hello: "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"."""
    device = default_device()
    return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})" if device.type == "cuda" else "cpu"


# The prior's dtype on CUDA (the rewards stay float32). float16 with its backward rescaled per
# module (``prior.HalfGradSpan``) keeps the gradients: on the tiny models, t 100..950, the
# negative embedding's gradient loses no element and has cosine 0.987-0.999 to float32's (float32
# taken with float16's eps(y) gets 0.989-0.999: the rest is the forward's rounding), the render's
# 1.0000. bfloat16 needs no rescaling, but its 8-bit mantissa gives the n gradient 0.93-0.99 and
# the render's 0.997 (scripts/bench/half_precision.py).
CUDA_PRIOR_DTYPE = torch.float16


def _placement(models, device: torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype, tuple]:
    """Device, prior dtype (``CUDA_PRIOR_DTYPE`` on CUDA, float32 on a CPU, unless ``dtype`` says
    otherwise) and the cache key."""
    device = device or default_device()
    dtype = dtype or (CUDA_PRIOR_DTYPE if device.type == "cuda" else torch.float32)
    return device, dtype, (models, str(device), dtype)


def load_models(models, device: torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModels:
    """``models`` is a :class:`backend.pipelines.presets.ModelSet`; the prior placed as :func:`_placement` says."""
    device, dtype, key = _placement(models, device, dtype)
    if key not in _CACHE:
        if models.build_tiny:
            ensure_tiny_models()
        prior = DiffusionPrior.from_pretrained(models.prior, device=device, dtype=dtype)
        target = load_reward(models.target_reward, device=device)
        unseen = [load_reward(src, device=device) for src in models.unseen_rewards]
        _CACHE[key] = LoadedModels(prior, target, unseen)
    return _CACHE[key]



def load_multiview(models, device: torch.device | None = None, dtype: torch.dtype | None = None) -> MultiViewPrior:
    """The model set's MVDream prior (loaded on first use, then kept), in the dtype
    :func:`load_models` gives the SD prior."""
    if models.mvdream is None:
        raise UnknownNameError("recipe: this preset has no multi-view prior (MVDream)", field="recipe")
    device, dtype, key = _placement(models, device, dtype)
    if key not in _MULTIVIEW:
        if models.build_tiny:
            ensure_tiny_models()
        _MULTIVIEW[key] = MultiViewPrior.from_source(models.mvdream, device=device, dtype=dtype)
    return _MULTIVIEW[key]
