"""One score-distillation step — PSD (Algorithm 1), SDS or DreamDPO — on any latent x_c.

:class:`ScoreDistiller` owns the per-run state (prompt embedding y, negative embedding n
and its optimiser, the reward's text features) and turns a batch of clean latents x_c
(renders encoded by the VAE, or an image latent in the 2D experiment) into the gradient
of Eq. 12 (or Eq. 14 / Eq. 22). The caller applies it with
:func:`backend.psd.guidance.distillation_loss`.

The prior needs ``num_train_timesteps``, ``alpha_sigma(t)``, ``predict_eps(x_t, t, cond)``
and ``decode_for_reward(latents, **decode)``; the reward needs ``score(images, text_features)``.
The real :class:`~backend.psd.prior.DiffusionPrior` and the analytic test bed both fit.

Multi-view priors (MVDream) see ``views`` consecutive rows per object, each with its camera
(``predict_eps(x_t, t, cond, camera=...)``): one t per object, both noisings cover all of an
object's views, a noising's reward is the mean over its views, and the winner, beta_r and the
negative embedding's reward are per object.
"""

from __future__ import annotations

from contextlib import nullcontext
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
    # phi of MVDream's CFG rescale (``recon_std_rescale``, guidance.rescaled_cfg): 0 leaves eps~ as
    # Eq. 3 gives it; the single stage on MVDream takes its config's 0.5
    cfg_rescale: float = 0.0
    # On pair steps, run the UNet calls the reward sees (eps(y) and eps(n) of both noisings, and the
    # n branch of Eq. 13) and the reward's TAESD with float32 copies of a half prior's UNet and TAESD
    # (prior.float32_reward_path). On by default (issue 11's target, cosine >= 0.99 to float32's n
    # gradient): all-half, the forward's rounding times gamma s_t / a_t in x0 turns n's gradient to
    # cosine 0.987 (float16) / 0.931 (bfloat16), and float32 n-gradients taken at float16's eps(y) reach
    # only 0.989, so no loss scaling or smaller float32 part can meet it; with the switch 0.999 / 0.993
    # (scripts/bench/half_precision.py --shape tiny). Cost: the UNet's weights once more in float32
    # (3.5 GB for SD 2.1) and float32 UNet calls on pair steps (step_cost.py's psd_k1_allhalf variant
    # prints the ratio). Plain SDS steps stay in the prior's dtype. No effect on a float32 prior (CPU).
    float32_reward_path: bool = True

    @property
    def reward_gamma(self) -> float:
        return self.guidance_scale if self.reward_guidance_scale is None else self.reward_guidance_scale


@dataclass
class StepOutput:
    grad: torch.Tensor  # (N,C,h,w) w(t) * direction, to apply to x_c
    t: torch.Tensor  # (N,)
    pair: bool  # True on steps that ran the win/lose pair
    reward_w: torch.Tensor | None = None  # (G,) per object: the mean over its views
    reward_l: torch.Tensor | None = None
    beta_r: torch.Tensor | None = None  # (G,)
    negative_reward: float | None = None  # reward of x0_w before the n update


@dataclass(kw_only=True)
class Noising:
    """One noising of the batch (Alg. 1 line 3) and what the prior says about it:
    ``x = a_t x_c + s_t eps``, ``eps_y = eps(x, y)`` and ``eps_n = eps(x, n)`` (line 7), and the
    reward of its one-step prediction, one per object (line 7; the mean over the object's views)."""

    eps: torch.Tensor
    x: torch.Tensor
    eps_y: torch.Tensor | None = None
    eps_n: torch.Tensor | None = None
    reward: torch.Tensor | None = None

    def guided(self, gamma: float) -> torch.Tensor:
        """eps~ of Eq. 3 at this noising."""
        return G.cfg(self.eps_y, self.eps_n, gamma)


_ROWS = ("eps", "x", "eps_y", "eps_n")


def winner_and_loser(first: Noising, second: Noising, views: int) -> tuple[Noising, Noising]:
    """Per object, the noising whose one-step prediction the reward prefers (Alg. 1 line 7; ties
    go to the first) and the other. An object's views win or lose together."""
    win = G.winner_mask(first.reward, second.reward).repeat_interleave(views)
    w = Noising(**{f: G.pick(win, getattr(first, f), getattr(second, f)) for f in _ROWS},
                reward=torch.maximum(first.reward, second.reward))
    l = Noising(**{f: G.pick(win, getattr(second, f), getattr(first, f)) for f in _ROWS},  # noqa: E741
                reward=torch.minimum(first.reward, second.reward))
    return w, l


def per_object(x: torch.Tensor, views: int) -> torch.Tensor:
    """(G*V, ...) -> (G, V*...): an object's views as one sample, for beta_r's norms."""
    return x.reshape(x.shape[0] // views, -1)


def object_mean(r: torch.Tensor, views: int) -> torch.Tensor:
    """(G*V,) per-view values -> (G,) per object."""
    return r.reshape(-1, views).mean(dim=1)


class ScoreDistiller:
    """Per-run state and the step of Algorithm 1 (and its baselines).

    Built by keyword only: ``prior`` and ``reward`` (the models), ``text_features`` (the
    reward's prompt), ``y`` (the prompt embedding), ``negative`` (n and its optimiser),
    ``config``, ``generator`` (the noisings' random draws), ``views``: rows per object (MVDream:
    4); the batch is G objects x ``views``, an object's rows consecutive, as the multi-view prior
    wants them."""

    def __init__(self, *, prior, reward, text_features: torch.Tensor | None, y: torch.Tensor,
                 negative: NegativeEmbedding, config: GuidanceConfig, generator: torch.Generator,
                 views: int = 1) -> None:
        self.prior, self.reward, self.config = prior, reward, config
        self.text_features = text_features
        self.y = y  # (1,L,D)
        self.negative = negative
        self.generator = generator
        self.views = views

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=torch.float32).to(like.device)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, camera: torch.Tensor | None) -> torch.Tensor:
        if camera is None:
            return self.prior.predict_eps(x, t, cond)
        return self.prior.predict_eps(x, t, cond, camera=camera)

    def _eps(self, xs: list[torch.Tensor], t: torch.Tensor, conds: list[torch.Tensor],
             camera: torch.Tensor | None) -> list[torch.Tensor]:
        """One batched UNet call over every (x, cond) pair; returns the chunks in order."""
        n = xs[0].shape[0]
        x = torch.cat(xs)
        cond = torch.cat([c.expand(n, *c.shape[1:]) for c in conds])
        cams = None if camera is None else camera.repeat(len(xs), 1)
        with torch.no_grad():
            out = self._predict(x, t.repeat(len(xs)), cond, cams)
        return list(out.chunk(len(xs)))

    def is_pair_step(self, step: int) -> bool:
        return self.config.method is not Method.SDS and step % self.config.interval == 0

    def step(self, x_c: torch.Tensor, t: torch.Tensor, step: int, y: torch.Tensor | None = None,
             camera: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """x_c (N,C,h,w) clean latents; t (N,) integer timesteps (equal within an object); step the
        iteration index; ``y`` (N,L,D) per-view prompt embeddings (view-dependent prompts), default
        the run's; ``camera`` (N,16) for a multi-view prior; ``noise`` (N,C,h,w) the first noising's
        eps instead of a random draw (CFD's integral noise, paper Eq. 17: the pair is then one
        integral-noise sample and one random one, and whichever wins is the winner; SDS steps noise
        with it)."""
        cfg = self.config
        y = self.y if y is None else y
        x0 = x_c.detach().float()
        if not torch.isfinite(x0).all():
            raise NumericalError(f"step {step}: the latent holds NaN or inf")
        if x0.shape[0] % self.views:
            raise ValueError(f"{x0.shape[0]} rows are not whole objects of {self.views} views")
        a, s = self.prior.alpha_sigma(t)
        n = self.negative.value.detach()
        if noise is not None and noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match the latent {tuple(x0.shape)}")
        eps1 = self._randn(x0) if noise is None else noise.detach().to(x0)
        first = self._noising(x0, eps1, a, s)  # Alg. 1 line 3

        if not self.is_pair_step(step):  # plain SDS, Eq. 14
            first.eps_y, first.eps_n = self._eps([first.x, first.x], t, [y, n], camera)
            guided = self._guided(first, a, s)
            grad = G.step_weight(cfg.weighting, s, guided, first.eps) * G.sds_direction(guided, first.eps)
            return StepOutput(grad=grad, t=t, pair=False)

        second = self._noising(x0, self._second_noise(x0, t, y, camera), a, s)
        update_n = cfg.method is Method.PSD and self.negative.trainable(step)
        neg_r = None
        with self._reward_precision():
            if update_n and cfg.reuse_winner_forward:
                neg_r = self._rank_and_update_n(first, second, t, a, s, step, y, camera)
            else:
                # Alg. 1 line 7 + section 3.1: one batched call gives eps(x_i, y) and eps(x_i, n) for both.
                first.eps_y, second.eps_y, first.eps_n, second.eps_n = self._eps(
                    [first.x, second.x, first.x, second.x], t, [y, y, n, n], camera)
                self._rank(first, second, a, s)
        w, l = winner_and_loser(first, second, self.views)  # noqa: E741
        guided_w, guided_l = self._guided(w, a, s), self._guided(l, a, s)

        beta = None
        if cfg.method is Method.DREAMDPO:
            direction = G.dreamdpo_direction(guided_w, w.eps, guided_l, l.eps)
        else:  # Alg. 1 lines 8-10, Eq. 12
            d_gen = G.delta_gen(w.eps_n, w.eps)
            d_cls = G.delta_cls(w.eps_y, w.eps_n, l.eps_y, cfg.cls_form)
            d_pref = G.delta_pref(guided_w, guided_l, w.eps, l.eps, cfg.pref_form)
            beta = G.beta_r(per_object(d_cls, self.views), per_object(d_pref, self.views), w.reward, l.reward,
                            cfg.guidance_scale, cfg.reward_scale)
            if not cfg.preference_guidance:
                beta = torch.zeros_like(beta)
            direction = G.psd_direction(d_gen, d_cls, d_pref, cfg.guidance_scale, beta.repeat_interleave(self.views))
            if cfg.cfg_rescale > 0:  # d_gen + gamma d_cls is eps~ - eps: the rescale moves eps~
                direction = direction + (guided_w - w.guided(cfg.guidance_scale))
        grad = G.step_weight(cfg.weighting, s, guided_w, w.eps) * direction
        if not torch.isfinite(grad).all():
            raise NumericalError(f"step {step}: the guidance holds NaN or inf (t={t.tolist()})")

        if update_n and not cfg.reuse_winner_forward:  # Alg. 1 line 11, Eq. 13
            with self._reward_precision():
                neg_r = self.negative.update(self.prior, self.reward, self.text_features, w.x, t, w.eps_y,
                                             cfg.reward_gamma, vars(cfg.decode), step, camera=camera)
        return StepOutput(grad=grad, t=t, pair=True, reward_w=w.reward, reward_l=l.reward, beta_r=beta,
                          negative_reward=neg_r)

    def _reward_precision(self):
        """The context of the UNet calls the reward sees: float32 when the config asks for it."""
        if self.config.float32_reward_path and hasattr(self.prior, "float32_reward_path"):
            return self.prior.float32_reward_path()
        return nullcontext()

    def _guided(self, noising: Noising, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """eps~ of the guidance (Eq. 3), through MVDream's CFG rescale when the config asks for it."""
        guided = noising.guided(self.config.guidance_scale)
        if self.config.cfg_rescale > 0:
            guided = G.rescaled_cfg(guided, noising.eps_y, noising.x, a, s, self.views, self.config.cfg_rescale)
        return guided

    @staticmethod
    def _noising(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> Noising:
        return Noising(eps=eps, x=G.add_noise(x0, eps, a, s))

    def _score(self, x0hat: torch.Tensor) -> torch.Tensor:
        """Reward of one-step predictions (N,C,h,w) -> (N,) per view, float32."""
        return self.reward.score(self.prior.decode_for_reward(x0hat, **vars(self.config.decode)),
                                 self.text_features).float()

    def _rank(self, first: Noising, second: Noising, a, s) -> None:
        """Rewards of both noisings' one-step predictions x0 = Tweedie(x_i, eps~_i) (Alg. 1 line 7)."""
        g = self.config.reward_gamma
        with torch.no_grad():
            x0hat = G.tweedie_x0(torch.cat([first.x, second.x]), torch.cat([first.guided(g), second.guided(g)]),
                                 a.repeat(2, 1, 1, 1), s.repeat(2, 1, 1, 1))
            r1, r2 = self._score(x0hat).chunk(2)
        first.reward, second.reward = object_mean(r1, self.views), object_mean(r2, self.views)

    def _rank_and_update_n(self, first: Noising, second: Noising, t, a, s, step, y, camera) -> float:
        """Rank the pair and take the n step (Eq. 13) from one forward: the n branch, Tweedie,
        decode and reward of each noising keep their graphs; only the winners' rewards are
        backpropagated (a noising that won no object is never traversed)."""
        g = self.config.reward_gamma
        first.eps_y, second.eps_y = self._eps([first.x, second.x], t, [y, y], camera)
        n = self.negative.value
        rewards = []
        with torch.enable_grad():
            for noising in (first, second):
                noising.eps_n = self._predict(noising.x, t, n.expand(noising.x.shape[0], *n.shape[1:]), camera)
                x0hat = G.tweedie_x0(noising.x, noising.guided(g), a, s)
                rewards.append(object_mean(self._score(x0hat), self.views))
            win = G.winner_mask(rewards[0].detach(), rewards[1].detach())
            terms = [r[m].sum() for r, m in ((rewards[0], win), (rewards[1], ~win)) if m.any()]
            neg_r = self.negative.ascend(sum(terms) / win.numel(), step)
        for noising, r in zip((first, second), rewards):
            noising.eps_n, noising.reward = noising.eps_n.detach(), r.detach()
        return neg_r

    def _second_noise(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, camera: torch.Tensor | None) -> torch.Tensor:
        if self.config.second_noise is SecondNoise.RANDOM:
            return self._randn(x0)
        s_t = (t + self.config.predicted_noise_offset).clamp(max=self.prior.num_train_timesteps - 1)
        a, s = self.prior.alpha_sigma(s_t)
        x_s = G.add_noise(x0, self._randn(x0), a, s)
        (eps,) = self._eps([x_s], s_t, [y], camera)
        return eps
