"""The guidance math of PSD and its baselines, as plain functions on tensors.

Shapes: ``eps``-like tensors are (N,C,h,w) — N samples (views, particles), latent C x h x w.
Per-sample scalars are (N,). Norms in beta_r are per sample over (C,h,w).
Equation numbers refer to the paper (../shared/paper/preference-score-distillation.txt).
"""

from __future__ import annotations

from enum import Enum

import torch


class PrefForm(str, Enum):
    """How delta_pref is formed (a knob the paper leaves implicit).

    PAPER: ``eps~(x_w) - eps~(x_l)`` (Eq. 10 term B, Alg. 1 line 8; Eq. 15's q_theta terms dropped).
    FULL:  ``(eps~(x_w) - eps_w) - (eps~(x_l) - eps_l)`` (Eq. 15 with the q_theta terms kept,
    i.e. the DreamDPO difference of Eq. 22)."""

    PAPER = "paper"
    FULL = "full"


class ClsForm(str, Enum):
    """delta_cls: ALGORITHM1 ``eps(x_w, y) - eps(x_w, n)`` (Alg. 1 line 8, Eq. 3, Eq. 12);
    ALGORITHM2 ``eps(x_w, y) - eps(x_l, y)`` (as Alg. 2 line 9 is printed)."""

    ALGORITHM1 = "algorithm1"
    ALGORITHM2 = "algorithm2"


def per_sample(x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N,1,1,1) for broadcasting against latents."""
    return x.view(-1, *([1] * 3))


def sample_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample: (N,...) -> (N,)."""
    return x.flatten(1).norm(dim=1)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Forward process, Eq. 1: ``x_t = a_t x_0 + s_t eps``."""
    return alpha * x0 + sigma * eps


def cfg(eps_y: torch.Tensor, eps_n: torch.Tensor, gamma: float) -> torch.Tensor:
    """Classifier-free guidance with a negative embedding, Eq. 3:
    ``eps~ = eps(n) + gamma (eps(y) - eps(n))`` so that ``eps~ - eps = delta_gen + gamma delta_cls``.
    (threestudio's ``eps(y) + s (eps(y) - eps(u))`` is this with ``gamma = s + 1``.)"""
    return eps_n + gamma * (eps_y - eps_n)


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One-step prediction by Tweedie's formula (section 3.1): ``x0 = (x_t - s_t eps) / a_t``."""
    return (x_t - sigma * eps) / alpha


def rescaled_cfg(eps_cfg: torch.Tensor, eps_y: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                 sigma: torch.Tensor, views: int, phi: float) -> torch.Tensor:
    """MVDream's CFG rescale (MVDream-threestudio multiview_diffusion_guidance.py, ``recon_std_rescale``;
    Lin et al. 2024's rescale in x0 form): the one-step prediction of eps~ is scaled by
    ``std(x0(eps(y))) / std(x0(eps~))`` over each object's ``views`` (unbiased std, +1e-8), blended with
    the unscaled one by ``phi``; returned as the eps that predicts that x0 (Tweedie inverted)."""
    x0_cfg = tweedie_x0(x_t, eps_cfg, alpha, sigma)
    x0_y = tweedie_x0(x_t, eps_y, alpha, sigma)
    objects = x_t.shape[0] // views
    factor = (x0_y.reshape(objects, -1).std(dim=1) + 1e-8) / (x0_cfg.reshape(objects, -1).std(dim=1) + 1e-8)
    x0 = phi * x0_cfg * per_sample(factor.repeat_interleave(views)) + (1 - phi) * x0_cfg
    return (x_t - alpha * x0) / sigma


def winner_mask(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """True where sample 1 wins (Alg. 1 line 7: the higher reward of x0 is the winner); ties go to 1."""
    return r1 >= r2


def pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: ``a`` where mask else ``b`` (mask (N,), a/b (N,...))."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def delta_gen(eps_n_w: torch.Tensor, eps_w: torch.Tensor) -> torch.Tensor:
    """Eq. 12 / Alg. 1 line 8: ``delta_gen = eps(x_w, n) - eps`` (the negative branch is the
    'unconditional' one, section 2)."""
    return eps_n_w - eps_w


def delta_cls(eps_y_w: torch.Tensor, eps_n_w: torch.Tensor, eps_y_l: torch.Tensor, form: ClsForm = ClsForm.ALGORITHM1) -> torch.Tensor:
    """Implicit classifier, Eq. 3 / Alg. 1 line 8 (or Alg. 2 line 9, see :class:`ClsForm`)."""
    if form is ClsForm.ALGORITHM1:
        return eps_y_w - eps_n_w
    return eps_y_w - eps_y_l


def delta_pref(
    eps_cfg_w: torch.Tensor, eps_cfg_l: torch.Tensor, eps_w: torch.Tensor, eps_l: torch.Tensor, form: PrefForm = PrefForm.PAPER
) -> torch.Tensor:
    """Preference score guidance, Eq. 10 term (B) with CFG applied (section 3.1, last paragraph)."""
    if form is PrefForm.PAPER:
        return eps_cfg_w - eps_cfg_l
    return (eps_cfg_w - eps_w) - (eps_cfg_l - eps_l)


def beta_r(
    d_cls: torch.Tensor, d_pref: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor, gamma: float, reward_scale: float = 1.0
) -> torch.Tensor:
    """Alg. 1 line 9 / section 3.2: ``beta_r = gamma |d_cls| / |d_pref| * sigmoid(k_r (r_l - r_w))``
    per sample (N,). ``reward_scale`` k_r = 1 is the paper's form; 0 where ``d_pref`` vanishes."""
    ratio = sample_norm(d_cls) / sample_norm(d_pref).clamp_min(torch.finfo(d_pref.dtype).tiny)
    ratio = torch.where(sample_norm(d_pref) > 0, ratio, torch.zeros_like(ratio))
    return gamma * ratio * torch.sigmoid(reward_scale * (r_l - r_w).to(ratio.dtype))


def psd_direction(d_gen: torch.Tensor, d_cls: torch.Tensor, d_pref: torch.Tensor, gamma: float, beta: torch.Tensor) -> torch.Tensor:
    """Eq. 12 (before w(t)): ``delta_gen + gamma delta_cls + beta_r delta_pref``."""
    return d_gen + gamma * d_cls + per_sample(beta) * d_pref


def sds_direction(eps_cfg: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """SDS, Eq. 14 (before w(t)): ``eps~ - eps = delta_gen + gamma delta_cls``."""
    return eps_cfg - eps


def dreamdpo_direction(eps_cfg_w: torch.Tensor, eps_w: torch.Tensor, eps_cfg_l: torch.Tensor, eps_l: torch.Tensor) -> torch.Tensor:
    """DreamDPO, Eq. 22 (before w(t); its threshold tau ignored as the paper does):
    ``(eps~(x_w) - eps_w) - (eps~(x_l) - eps_l)``."""
    return (eps_cfg_w - eps_w) - (eps_cfg_l - eps_l)


class Weighting(str, Enum):
    """w(t) in Eq. 12 (the paper leaves it open). SDS: ``s_t^2`` (DreamFusion). DMD: the
    per-sample normalisation of DMD (Yin et al. 2024) that CFD's configs use
    (``weighting_strategy: dmd`` in configs/cfd/sd-mesh-*.yaml). RECON: ``s_t / a_t``, MVDream's
    x0-reconstruction loss (MVDream paper section 3.2; MVDream-threestudio
    multiview_diffusion_guidance.py ``recon_loss: true``), whose gradient ``x_0 - x0(eps~)`` is
    ``(s_t / a_t)(eps~ - eps)``."""

    SDS = "sds"
    DMD = "dmd"
    RECON = "recon"


def sds_weight(sigma: torch.Tensor) -> torch.Tensor:
    """w(t) = s_t^2 = 1 - abar_t (DreamFusion, Poole et al. 2022, appendix A.4; threestudio's
    ``weighting_strategy: sds``)."""
    return sigma**2


def dmd_weight(eps_cfg: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """w = 1 / (1e-8 + mean |eps~ - eps|) per sample (N,1,1,1), as CFD's
    ``stable_diffusion_unified_guidance`` computes it for ``weighting_strategy: dmd``: the SDS part
    of the update gets unit mean magnitude at every t. For PSD ``eps~ - eps`` is the winner's."""
    return 1.0 / (1e-8 + (eps_cfg - eps).abs().mean(dim=tuple(range(1, eps.dim())), keepdim=True))


def recon_weight(sigma: torch.Tensor) -> torch.Tensor:
    """w(t) = s_t / a_t: ``x_0 - (x_t - s_t eps~) / a_t = (s_t / a_t)(eps~ - eps)`` (Eq. 1, Tweedie)."""
    return sigma / (1 - sigma**2).clamp_min(1e-12).sqrt()


def step_weight(weighting: Weighting, sigma: torch.Tensor, eps_cfg: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """w(t) of Eq. 12 for ``weighting``; ``eps_cfg - eps`` is the sample's SDS direction."""
    if weighting is Weighting.DMD:
        return dmd_weight(eps_cfg, eps)
    if weighting is Weighting.RECON:
        return recon_weight(sigma)
    return sds_weight(sigma)


def distillation_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """SDS-style surrogate whose gradient w.r.t. ``x`` is ``grad`` (summed over the batch):
    backpropagating it applies Eq. 12's chain rule ``grad * dg/dtheta``."""
    return (grad.detach() * x).sum()
