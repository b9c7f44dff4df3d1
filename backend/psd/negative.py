"""The learnable negative embedding n (section 3.3, Eq. 13, 31-32).

n starts as the text-encoder output of hand-made negative descriptors and is updated by
gradient ascent on the reward of the winner's one-step prediction, through CFG, the
UNet's n branch and the decoder. It is saved with the job and can be loaded into another
job whose prior shares the text encoder (appendix H.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from protocol.errors import InvalidInputError
from backend.files import atomic_torch_save
from backend.psd.guidance import cfg, tweedie_x0

# ReNeg-style hand-crafted negative descriptors (the paper initialises n from such a list).
DEFAULT_NEGATIVE_DESCRIPTORS = (
    "low quality, worst quality, blurry, ugly, deformed, disfigured, distorted, bad anatomy, "
    "oversaturated, low resolution, jpeg artifacts, watermark, text"
)


@dataclass(frozen=True)
class NegativeConfig:
    """Appendix F.1: lr 1e-4 constant (single stage, and the 2D experiment);
    the DMTet texture stage uses lr 1e-5 for the first 1000 steps, then n is frozen
    (``freeze_after=1000``). ``lr = 0`` keeps n fixed (the 'w/o n' ablation of Table 4)."""

    descriptors: str = DEFAULT_NEGATIVE_DESCRIPTORS
    lr: float = 1e-4
    freeze_after: int | None = None
    # the 2-stage NeRF's second stage (F.1): lr falls linearly from ``lr`` to 0 over these steps
    linear_decay: int | None = None


def negative_embedding_reward(prior, reward, text_features, x_t, t, eps_y, n, gamma: float, decode: dict,
                              camera: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 13's integrand for each sample: ``r(y, x0(n))`` with
    ``x0 = (x_t - s_t eps~(n)) / a_t`` (Tweedie) and ``eps~ = eps(n) + gamma (eps(y) - eps(n))`` (Eq. 3).
    Only the n branch is recomputed with a graph; ``eps_y`` (N,C,h,w) is a constant here.
    ``camera`` (N,16) for a multi-view prior. Returns (N,); its gradient w.r.t. n is Eq. 31-32."""
    a, s = prior.alpha_sigma(t)
    cond = n.expand(x_t.shape[0], *n.shape[1:])
    eps_n = prior.predict_eps(x_t, t, cond) if camera is None else prior.predict_eps(x_t, t, cond, camera=camera)
    x0 = tweedie_x0(x_t, cfg(eps_y, eps_n, gamma), a, s)
    return reward.score(prior.decode_for_reward(x0, **decode), text_features)


class NegativeEmbedding:
    """n as a float32 master parameter (1, L, D) with its Adam state (float32 whatever the
    prior's dtype: the gradient reaches it through float16 modules rescaled by the prior,
    ``prior.HalfGradSpan``, and is cast up before Adam sees it)."""

    def __init__(self, init: torch.Tensor, config: NegativeConfig = NegativeConfig()) -> None:
        if not torch.isfinite(init).all():
            raise InvalidInputError("negative_embedding: contains NaN or inf", field="negative_embedding")
        self.config = config
        self.value = torch.nn.Parameter(init.detach().clone().float())
        self.optimizer = torch.optim.Adam([self.value], lr=max(config.lr, 1e-12))
        self.updates = 0
        self.skipped = 0  # steps whose gradient overflowed (float16) and left n unchanged

    def lr_at(self, step: int) -> float:
        if self.config.freeze_after is not None and step >= self.config.freeze_after:
            return 0.0
        if self.config.linear_decay is not None:
            return self.config.lr * max(0.0, 1.0 - step / self.config.linear_decay)
        return self.config.lr

    def trainable(self, step: int) -> bool:
        return self.lr_at(step) > 0

    def ascend(self, reward: torch.Tensor, step: int) -> float:
        """One Adam ascent step on a scalar reward whose graph reaches ``self.value``. A gradient
        that is not finite (an overflow inside a float16 module) is dropped, as torch.amp's
        GradScaler drops such a step: n and its Adam moments stay as they were."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        (-reward).backward()
        if torch.isfinite(self.value.grad).all():
            self.optimizer.step()
            self.updates += 1
        else:
            self.skipped += 1
        return float(reward.detach())

    def update(self, prior, reward, text_features, x_t, t, eps_y, gamma: float, decode: dict, step: int,
               camera: torch.Tensor | None = None) -> float:
        """One Adam ascent step on Eq. 13 (mean over samples and views), recomputing the n branch
        at x_t. Returns the reward before the step."""
        with torch.enable_grad():
            r = negative_embedding_reward(prior, reward, text_features, x_t, t, eps_y, self.value, gamma, decode, camera)
            return self.ascend(r.mean(), step)

    # -- persistence: the learned n travels between jobs (appendix H.1) -------------------
    def save(self, path: str | Path) -> None:
        payload = {"embedding": self.value.detach().cpu(), "config": asdict(self.config), "updates": self.updates}
        atomic_torch_save(payload, Path(path))

    @staticmethod
    def load_tensor(path: str | Path, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read a saved n; checks shape against the prior's text encoder (field ``negative_embedding``)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"negative_embedding: no file at {path}", field="negative_embedding")
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)["embedding"]
        except Exception as exc:  # corrupt or foreign file
            raise InvalidInputError(f"negative_embedding: {path} is not a psd3d negative embedding ({exc})",
                                    field="negative_embedding") from exc
        if expected_shape is not None and tuple(tensor.shape) != tuple(expected_shape):
            raise InvalidInputError(
                f"negative_embedding: shape {tuple(tensor.shape)} does not fit this prior's text encoder "
                f"{tuple(expected_shape)}; n transfers only between priors that share the text encoder",
                field="negative_embedding",
            )
        return tensor

