"""An analytic test bed: a diffusion prior whose noise prediction is exact.

The "latent" is a point in R^d, stored as (N, d, 1, 1) so that the real guidance code runs on
it unchanged. The data distribution under an embedding c is a Gaussian mixture
``p_0(x | c) = sum_k pi_k(c) N(x; mu_k, s_k^2 I)`` with weights ``pi(c) = softmax(W c)``, so
``p_t(x | c) = sum_k pi_k(c) N(x; a_t mu_k, (a_t^2 s_k^2 + s_t^2) I)`` in closed form and
``eps(x_t, c, t) = -s_t grad log p_t(x_t | c)`` exactly, differentiable in c (for the
negative-embedding gradient). The "decoder" is the identity; rewards are smooth functions of x.
It uses SD's noise schedule (scaled-linear betas 0.00085..0.012, 1000 steps).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class GaussianMixturePrior:
    """Exact eps for a conditional Gaussian mixture. means (K,d), stds (K,), weight_map (K,E)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weight_map: torch.Tensor) -> None:
        self.means = means.double()
        self.stds = stds.double()
        self.weight_map = weight_map.double()
        self.alphas_cumprod = sd_alphas_cumprod()
        self.num_train_timesteps = self.alphas_cumprod.shape[0]
        self.dim = means.shape[1]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod[t.long()]
        return abar.sqrt().float().view(-1, 1, 1, 1), (1 - abar).sqrt().float().view(-1, 1, 1, 1)

    def weights(self, cond: torch.Tensor) -> torch.Tensor:
        """Mixture weights (N,K) from embeddings (N,1,E) (or (N,E))."""
        return torch.softmax(cond.reshape(cond.shape[0], -1).double() @ self.weight_map.T, dim=-1)

    def _components(self, x: torch.Tensor, cond, alpha, sigma):
        """Per component k of p_t: offsets x - a mu_k (N,K,d), variances (N,K), and
        log pi_k(c) + log N(x; a mu_k, var_k I) (N,K)."""
        x = x.reshape(x.shape[0], -1).double()
        a, s = alpha.reshape(-1, 1).double(), sigma.reshape(-1, 1).double()
        var = a**2 * self.stds.view(1, -1) ** 2 + s**2
        diff = x[:, None, :] - a[:, :, None] * self.means[None]
        log_comp = -0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * torch.pi * var)
        return diff, var, torch.log(self.weights(cond)) + log_comp

    def log_density(self, x: torch.Tensor, cond: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p_t(x | c): x (N,d[,1,1]), alpha/sigma broadcastable to (N,1) -> (N,)."""
        return torch.logsumexp(self._components(x, cond, alpha, sigma)[2], dim=-1)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """eps = -s_t grad_x log p_t(x | c), computed in closed form (float64 inside)."""
        a, s = self.alpha_sigma(t)
        diff, var, log_joint = self._components(x_t, cond, a, s)
        resp = torch.softmax(log_joint, dim=-1)  # (N,K) posterior over components
        score = -(resp[:, :, None] * diff / var[:, :, None]).sum(1)  # (N,d)
        eps = -s.reshape(-1, 1).double() * score
        return eps.to(x_t.dtype if x_t.dtype == torch.float64 else torch.float32).view_as(x_t)

    def decode_for_reward(self, latents: torch.Tensor, **_: object) -> torch.Tensor:
        return latents

    def log_likelihood(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p_0(x0 | c) (N,): how plausible a sample is under the prompt's prior."""
        one = torch.ones(x0.shape[0], 1)
        return self.log_density(x0, cond.expand(x0.shape[0], *cond.shape[1:]), one, 0 * one)


class QuadraticReward:
    """r(x) = -|x - goal|^2 / scale: prefers the region around ``goal``."""

    def __init__(self, goal, scale: float = 1.0, name: str = "quadratic") -> None:
        self.goal = torch.as_tensor(goal, dtype=torch.float64)
        self.scale = scale
        self.name = name

    def text_features(self, prompt: str) -> torch.Tensor:
        return torch.zeros(1)

    def score(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        x = images.reshape(images.shape[0], -1).double()
        return (-((x - self.goal) ** 2).sum(-1) / self.scale).to(images.dtype)


class BumpReward:
    """r(x) = exp(-|x - centre|^2 / (2 width^2)): a second, differently shaped preference."""

    def __init__(self, centre, width: float = 1.0, name: str = "bump") -> None:
        self.centre = torch.as_tensor(centre, dtype=torch.float64)
        self.width = width
        self.name = name

    def text_features(self, prompt: str) -> torch.Tensor:
        return torch.zeros(1)

    def score(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        x = images.reshape(images.shape[0], -1).double()
        return torch.exp(-((x - self.centre) ** 2).sum(-1) / (2 * self.width**2)).to(images.dtype)


@dataclass(frozen=True)
class ToyWorld:
    """The fixed toy used by the tests and docs/ablation.md (chosen once, not tuned to a result):
    three modes in 2-D; the prompt embedding y puts weight on the left and right modes, the
    initial negative embedding n0 on the top mode. The target reward prefers a point near the
    right mode, slightly off it; the unseen reward is a bump centred on the right mode itself."""

    means: tuple = ((-2.0, 0.0), (2.0, 0.0), (0.0, 2.5))
    stds: tuple = (0.5, 0.5, 0.5)
    weight_map: tuple = ((1.0, 0.0), (1.0, 0.0), (0.0, 1.0))  # (K,E): logit_k = W_k . c
    y: tuple = (2.0, 0.0)
    n0: tuple = (0.0, 2.0)
    target_goal: tuple = (2.0, 0.7)
    unseen_centre: tuple = (2.0, 0.0)
    # Run settings, calibrated on SDS alone (before any PSD run was compared) so that SDS
    # particles settle on the prompt's modes: gamma 3, 200 Adam steps of lr 0.05, Alg. 1's
    # annealed t(tau). With gamma 7.5 or Alg. 2's DDIM-like grid a third of SDS's particles
    # stay between the modes, and log-likelihoods say little.
    guidance_scale: float = 3.0
    steps: int = 200
    lr: float = 0.05

    def prior(self) -> GaussianMixturePrior:
        return GaussianMixturePrior(torch.tensor(self.means), torch.tensor(self.stds), torch.tensor(self.weight_map))

    def y_embedding(self) -> torch.Tensor:
        return torch.tensor(self.y, dtype=torch.float32).view(1, 1, -1)

    def n0_embedding(self) -> torch.Tensor:
        return torch.tensor(self.n0, dtype=torch.float32).view(1, 1, -1)

    def target(self) -> QuadraticReward:
        return QuadraticReward(self.target_goal, name="target")

    def unseen(self) -> BumpReward:
        return BumpReward(self.unseen_centre, width=1.0, name="unseen")


@dataclass
class ParticleRun:
    x: torch.Tensor  # (N,d) final particles
    target: torch.Tensor  # (N,) target reward
    unseen: torch.Tensor  # (N,) unseen reward
    log_likelihood: torch.Tensor  # (N,) log p_0(x | y)
    negative: torch.Tensor  # final n (1,1,E)
    beta_mean: float | None  # mean beta_r over the pair steps (None without pairs)


def distill_particles(world: ToyWorld, guidance, negative_config, particles: int = 256, seed: int = 0,
                      reward=None) -> ParticleRun:
    """Run the real :class:`~backend.psd.distill.ScoreDistiller` on N independent particles,
    each a parameterised 'image' theta ~ N(0, I) in R^d, with Adam and Alg. 1's annealed t.
    ``guidance.guidance_scale`` is replaced by the world's; ``reward`` overrides the target
    used for ranking (the reported target reward is always the world's)."""
    from backend.psd.distill import ScoreDistiller
    from backend.psd.guidance import distillation_loss
    from backend.psd.negative import NegativeEmbedding
    from backend.psd.schedule import RandomAnnealedSchedule

    schedule, steps = RandomAnnealedSchedule(), world.steps
    guidance = replace(guidance, guidance_scale=world.guidance_scale)
    prior, target = world.prior(), world.target()
    reward = reward or target
    generator = torch.Generator().manual_seed(seed)
    theta = torch.nn.Parameter(torch.randn((particles, prior.dim, 1, 1), generator=generator))
    optimizer = torch.optim.Adam([theta], lr=world.lr)
    negative = NegativeEmbedding(world.n0_embedding(), negative_config)
    distiller = ScoreDistiller(prior=prior, reward=reward, text_features=None, y=world.y_embedding(),
                               negative=negative, config=guidance, generator=generator)
    betas = []
    for i in range(steps):
        t = schedule.sample(i, steps, particles, prior.num_train_timesteps, generator)
        out = distiller.step(theta, t, i)
        if out.beta_r is not None:
            betas.append(float(out.beta_r.mean()))
        optimizer.zero_grad(set_to_none=True)
        distillation_loss(theta, out.grad).backward()
        optimizer.step()
    x = theta.detach().reshape(particles, -1)
    return ParticleRun(x=x, target=target.score(x), unseen=world.unseen().score(x),
                       log_likelihood=prior.log_likelihood(x, world.y_embedding()),
                       negative=negative.value.detach().clone(),
                       beta_mean=sum(betas) / len(betas) if betas else None)
