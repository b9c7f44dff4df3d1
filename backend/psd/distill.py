"""One score-distillation step — PSD (Algorithm 1), SDS or DreamDPO — on any latent x_c.

:class:`ScoreDistiller` owns the per-run state (prompt embedding y, negative embedding n
and its optimiser, the reward's text features) and turns a batch of clean latents x_c
(renders encoded by the VAE, or an image latent in the 2D experiment) into the gradient
of Eq. 12 (or Eq. 14 / Eq. 22). The caller applies it with
:func:`backend.psd.guidance.distillation_loss`.

The prior needs ``num_train_timesteps``, ``alpha_sigma(t)``, ``predict_eps(x_t, t, cond)``
and ``decode_for_reward(latents, **decode)``; the reward needs ``score(images, text_features)``.
The real :class:`~backend.psd.prior.DiffusionPrior` and the analytic test bed both fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from protocol.errors import NumericalError
from backend.psd import guidance as G
from backend.psd.negative import NegativeEmbedding


class Method(str, Enum):
    PSD = "psd"
    SDS = "sds"
    DREAMDPO = "dreamdpo"


class SecondNoise(str, Enum):
    """The loser's noise: RANDOM, an independent N(0, I) draw (Eq. 11, Alg. 1 line 3); or
    PREDICTED, ``eps_phi(x_s, y, s)`` at a noisier timestep s = t + ``predicted_noise_offset``
    (section 4.3 and Alg. 2, following [38])."""

    RANDOM = "random"
    PREDICTED = "predicted"


@dataclass(frozen=True)
class DecodeConfig:
    """How one-step predictions are decoded for the reward. ``tiny``: AutoencoderTiny (TAESD)
    when the prior has one, else the full VAE decoder. The full-size latent is decoded and the
    reward shrinks the picture to its input in pixel space (``rewards.clip_preprocess``)."""

    tiny: bool = True


@dataclass(frozen=True)
class GuidanceConfig:
    """Defaults are Algorithm 1's. ``guidance_scale`` gamma in Eq. 3's form; 7.5 is diffusers'
    ``StableDiffusionPipeline`` default in that same form (a threestudio scale s is gamma = s + 1)."""

    method: Method = Method.PSD
    guidance_scale: float = 7.5
    reward_scale: float = 1.0
    pref_form: G.PrefForm = G.PrefForm.PAPER
    cls_form: G.ClsForm = G.ClsForm.ALGORITHM1
    second_noise: SecondNoise = SecondNoise.RANDOM
    predicted_noise_offset: int = 20
    interval: int = 1
    weighting: G.Weighting = G.Weighting.SDS  # w(t); the 3D stages use CFD's DMD weighting
    preference_guidance: bool = True  # False: winner selection only (beta_r = 0), an ablation
    # On PSD steps that update n: run the n branch of the ranking pass with a graph and
    # backpropagate the winner's reward through it (no second UNet/decode/reward forward),
    # at the cost of keeping both samples' graphs until the winner is known. False: rank
    # without graphs, then recompute the winner's n branch with one.
    reuse_winner_forward: bool = True
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # gamma of the CFG in the one-step prediction x0 the reward ranks and n ascends on (Alg. 1
    # line 7, Eq. 13). None: ``guidance_scale``, as Algorithm 1. At a large gamma x0 is far off
    # the latent manifold (docs/paper-deviations.md, "reward on x0").
    reward_guidance_scale: float | None = None

    @property
    def reward_gamma(self) -> float:
        return self.guidance_scale if self.reward_guidance_scale is None else self.reward_guidance_scale


@dataclass
class StepOutput:
    grad: torch.Tensor  # (N,C,h,w) w(t) * direction, to apply to x_c
    t: torch.Tensor  # (N,)
    pair: bool  # True on steps that ran the win/lose pair
    reward_w: torch.Tensor | None = None  # (N,)
    reward_l: torch.Tensor | None = None
    beta_r: torch.Tensor | None = None
    negative_reward: float | None = None  # reward of x0_w before the n update


class ScoreDistiller:
    """Per-run state and the step of Algorithm 1 (and its baselines)."""

    def __init__(self, prior, reward, text_features: torch.Tensor, y: torch.Tensor,
                 negative: NegativeEmbedding, config: GuidanceConfig, generator: torch.Generator) -> None:
        self.prior, self.reward, self.config = prior, reward, config
        self.text_features = text_features
        self.y = y  # (1,L,D)
        self.negative = negative
        self.generator = generator

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=torch.float32).to(like.device)

    def _eps(self, xs: list[torch.Tensor], t: torch.Tensor, conds: list[torch.Tensor]) -> list[torch.Tensor]:
        """One batched UNet call over every (x, cond) pair; returns the chunks in order."""
        n = xs[0].shape[0]
        x = torch.cat(xs)
        cond = torch.cat([c.expand(n, *c.shape[1:]) for c in conds])
        with torch.no_grad():
            out = self.prior.predict_eps(x, t.repeat(len(xs)), cond)
        return list(out.chunk(len(xs)))

    def is_pair_step(self, step: int) -> bool:
        return self.config.method is not Method.SDS and step % self.config.interval == 0

    def step(self, x_c: torch.Tensor, t: torch.Tensor, step: int, y: torch.Tensor | None = None) -> StepOutput:
        """x_c (N,C,h,w) clean latents; t (N,) integer timesteps; step the iteration index;
        ``y`` (N,L,D) per-view prompt embeddings (view-dependent prompts), default the run's."""
        cfg = self.config
        y = self.y if y is None else y
        x0 = x_c.detach().float()
        if not torch.isfinite(x0).all():
            raise NumericalError(f"step {step}: the latent holds NaN or inf")
        a, s = self.prior.alpha_sigma(t)
        n = self.negative.value.detach()
        eps1 = self._randn(x0)
        x1 = G.add_noise(x0, eps1, a, s)

        if not self.is_pair_step(step):  # plain SDS, Eq. 14
            eps_y, eps_n = self._eps([x1, x1], t, [y, n])
            eps_cfg = G.cfg(eps_y, eps_n, cfg.guidance_scale)
            grad = G.step_weight(cfg.weighting, s, eps_cfg, eps1) * G.sds_direction(eps_cfg, eps1)
            return StepOutput(grad=grad, t=t, pair=False)

        eps2 = self._second_noise(x0, t, y)
        x2 = G.add_noise(x0, eps2, a, s)
        update_n = cfg.method is Method.PSD and self.negative.trainable(step)
        if update_n and cfg.reuse_winner_forward:
            (eps_y1, eps_y2, eps_n1, eps_n2), (r1, r2), neg_r = self._rank_and_update_n(x1, x2, t, a, s, step, y)
        else:
            # Alg. 1 line 7 + section 3.1: one batched call gives eps(x_i, y) and eps(x_i, n) for both.
            eps_y1, eps_y2, eps_n1, eps_n2 = self._eps([x1, x2, x1, x2], t, [y, y, n, n])
            r1, r2 = self._rank(x1, x2, eps_y1, eps_y2, eps_n1, eps_n2, a, s)
            neg_r = None
        cfg1, cfg2 = G.cfg(eps_y1, eps_n1, cfg.guidance_scale), G.cfg(eps_y2, eps_n2, cfg.guidance_scale)
        win = G.winner_mask(r1, r2)
        pw = lambda u, v: G.pick(win, u, v)  # noqa: E731 - winner's / loser's value
        x_w, eps_w, eps_l = pw(x1, x2), pw(eps1, eps2), pw(eps2, eps1)
        eps_y_w, eps_y_l = pw(eps_y1, eps_y2), pw(eps_y2, eps_y1)
        eps_n_w = pw(eps_n1, eps_n2)
        cfg_w, cfg_l = pw(cfg1, cfg2), pw(cfg2, cfg1)
        r_w, r_l = torch.maximum(r1, r2), torch.minimum(r1, r2)

        beta = None
        if cfg.method is Method.DREAMDPO:
            direction = G.dreamdpo_direction(cfg_w, eps_w, cfg_l, eps_l)
        else:
            d_gen = G.delta_gen(eps_n_w, eps_w)
            d_cls = G.delta_cls(eps_y_w, eps_n_w, eps_y_l, cfg.cls_form)
            d_pref = G.delta_pref(cfg_w, cfg_l, eps_w, eps_l, cfg.pref_form)
            beta = G.beta_r(d_cls, d_pref, r_w, r_l, cfg.guidance_scale, cfg.reward_scale)
            if not cfg.preference_guidance:
                beta = torch.zeros_like(beta)
            direction = G.psd_direction(d_gen, d_cls, d_pref, cfg.guidance_scale, beta)
        grad = G.step_weight(cfg.weighting, s, cfg_w, eps_w) * direction
        if not torch.isfinite(grad).all():
            raise NumericalError(f"step {step}: the guidance holds NaN or inf (t={t.tolist()})")

        if update_n and not cfg.reuse_winner_forward:  # Alg. 1 line 11, Eq. 13
            neg_r = self.negative.update(self.prior, self.reward, self.text_features, x_w, t, eps_y_w,
                                         cfg.reward_gamma, vars(cfg.decode), step)
        return StepOutput(grad=grad, t=t, pair=True, reward_w=r_w, reward_l=r_l, beta_r=beta, negative_reward=neg_r)

    def _rank(self, x1, x2, eps_y1, eps_y2, eps_n1, eps_n2, a, s) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (N,) of both samples' one-step predictions x0 = Tweedie(x_i, eps~_i) (Alg. 1 line 7)."""
        g = self.config.reward_gamma
        with torch.no_grad():
            x0hat = G.tweedie_x0(torch.cat([x1, x2]), torch.cat([G.cfg(eps_y1, eps_n1, g), G.cfg(eps_y2, eps_n2, g)]),
                                 a.repeat(2, 1, 1, 1), s.repeat(2, 1, 1, 1))
            images = self.prior.decode_for_reward(x0hat, **vars(self.config.decode))
            r1, r2 = self.reward.score(images, self.text_features).float().chunk(2)
        return r1, r2

    def _rank_and_update_n(self, x1, x2, t, a, s, step, y):
        """Rank the pair and take the n step (Eq. 13) from one forward: the n branch, Tweedie,
        decode and reward of each sample keep their graphs; only the winners' rewards are
        backpropagated (a sample set that won no view is never traversed)."""
        g = self.config.reward_gamma
        eps_y1, eps_y2 = self._eps([x1, x2], t, [y, y])
        n = self.negative.value
        eps_n, rewards = [], []
        with torch.enable_grad():
            for x_i, eps_y in ((x1, eps_y1), (x2, eps_y2)):
                e_n = self.prior.predict_eps(x_i, t, n.expand(x_i.shape[0], *n.shape[1:]))
                x0hat = G.tweedie_x0(x_i, G.cfg(eps_y, e_n, g), a, s)
                r = self.reward.score(self.prior.decode_for_reward(x0hat, **vars(self.config.decode)), self.text_features)
                eps_n.append(e_n)
                rewards.append(r.float())
            win = G.winner_mask(rewards[0].detach(), rewards[1].detach())
            terms = [r[m].sum() for r, m in ((rewards[0], win), (rewards[1], ~win)) if m.any()]
            neg_r = self.negative.ascend(sum(terms) / win.numel(), step)
        return (eps_y1, eps_y2, eps_n[0].detach(), eps_n[1].detach()), (rewards[0].detach(), rewards[1].detach()), neg_r

    def _second_noise(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.config.second_noise is SecondNoise.RANDOM:
            return self._randn(x0)
        s_t = (t + self.config.predicted_noise_offset).clamp(max=self.prior.num_train_timesteps - 1)
        a, s = self.prior.alpha_sigma(s_t)
        x_s = G.add_noise(x0, self._randn(x0), a, s)
        (eps,) = self._eps([x_s], s_t, [y])
        return eps
