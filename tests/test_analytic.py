"""The analytic test bed: exact scores, and what PSD does on it (fixed seeds, many particles).

Method comparisons beyond the claims below are measured, not asserted: see
scripts/ablation.py and docs/ablation.md."""

from dataclasses import replace

import pytest
import torch

from backend.psd.analytic import ToyWorld, distill_particles
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller
from backend.psd.guidance import PrefForm
from backend.psd.negative import NegativeConfig, NegativeEmbedding, negative_embedding_reward

WORLD = ToyWorld()
FIXED_N = NegativeConfig(lr=0.0)


def test_mixture_eps_is_the_exact_score():
    prior = WORLD.prior()
    x = torch.randn(16, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    t = torch.randint(1, 999, (16,), generator=torch.Generator().manual_seed(1))
    cond = WORLD.y_embedding().double().expand(16, 1, 2)
    a, s = prior.alpha_sigma(t)
    x_req = x.clone().requires_grad_(True)
    logp = prior.log_density(x_req, cond, a.double(), s.double())
    (score,) = torch.autograd.grad(logp.sum(), x_req)
    torch.testing.assert_close(prior.predict_eps(x, t, cond), -s.double() * score, rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def runs():
    seeds = (0, 1)
    def run(guidance, neg=FIXED_N, reward=None):
        return [distill_particles(WORLD, guidance, neg, seed=s, reward=reward) for s in seeds]
    return {
        "sds": run(GuidanceConfig(method=Method.SDS)),
        "psd": run(GuidanceConfig(), NegativeConfig()),  # the paper's defaults: paper form, k_r 1, n lr 1e-4
    }


def mean(rs, field):
    return float(torch.stack([getattr(r, field).mean() for r in rs]).mean())


def test_a_psd_beats_sds_on_reward_and_keeps_likelihood(runs):
    sds_r, psd_r = mean(runs["sds"], "target"), mean(runs["psd"], "target")
    sds_ll, psd_ll = mean(runs["sds"], "log_likelihood"), mean(runs["psd"], "log_likelihood")
    # clearly higher: more than half of SDS's shortfall from the best attainable reward (0) is closed
    assert psd_r > sds_r / 2, (psd_r, sds_r)
    # stated tolerance: mean log-likelihood under the prompt's prior no more than 0.5 nat below SDS's
    assert psd_ll > sds_ll - 0.5, (psd_ll, sds_ll)


class Negated:
    """The target reward with its sign flipped, so that the pair's winner and loser swap."""

    def __init__(self, reward):
        self.reward = reward

    def score(self, images, text_features=None):
        return -self.reward.score(images, text_features)


def test_b_swapping_winner_and_loser_lowers_the_reward(runs):
    guidance = GuidanceConfig()
    swapped = [distill_particles(WORLD, guidance, FIXED_N, seed=s, reward=Negated(WORLD.target())) for s in (0, 1)]
    normal = [distill_particles(WORLD, guidance, FIXED_N, seed=s) for s in (0, 1)]
    assert mean(swapped, "target") < mean(normal, "target") - 1.0


def test_c_a_negative_embedding_step_raises_the_reward_of_x0():
    prior, reward = WORLD.prior(), WORLD.target()
    gen = torch.Generator().manual_seed(3)
    gains = []
    for trial in range(8):
        x_t = torch.randn(64, 2, 1, 1, generator=gen) * 1.5
        t = torch.full((64,), int(torch.randint(100, 900, (1,), generator=gen)))
        eps_y = prior.predict_eps(x_t, t, WORLD.y_embedding().expand(64, 1, 2))
        neg = NegativeEmbedding(WORLD.n0_embedding(), NegativeConfig(lr=1e-2))
        before = negative_embedding_reward(prior, reward, None, x_t, t, eps_y, neg.value.detach(), 3.0, {}).mean()
        neg.update(prior, reward, None, x_t, t, eps_y, 3.0, {}, step=0)
        after = negative_embedding_reward(prior, reward, None, x_t, t, eps_y, neg.value.detach(), 3.0, {}).mean()
        gains.append(float(after - before))
    assert sum(gains) / len(gains) > 0, gains
    assert sum(g > 0 for g in gains) >= 6, gains


def test_d_the_full_form_preference_term_raises_the_reward_over_winner_selection():
    """End to end: the preference term, in the form that moves renders toward the winner's noise
    (PrefForm.FULL), ends with a clearly higher target reward than the same runs without it
    (winner selection only, beta_r = 0): measured +0.12 on these seeds, and -0.15 with the term's
    sign flipped. (The paper's form moves toward the loser's noise on this exact prior; its
    end-to-end effect here is small, so it is pinned step by step below, not by the reward.)"""
    full = GuidanceConfig(pref_form=PrefForm.FULL)
    with_term = [distill_particles(WORLD, full, FIXED_N, seed=s) for s in (0, 1)]
    winner_only = [distill_particles(WORLD, replace(full, preference_guidance=False), FIXED_N, seed=s) for s in (0, 1)]
    gain = mean(with_term, "target") - mean(winner_only, "target")
    assert gain > 0.05, gain


# --- The preference term itself. test_a and test_b pass with beta_r = 0, with delta_pref's sign
# flipped and with it scaled by 10: the winner's SDS term alone closes most of SDS's reward gap
# on this toy, so they pin winner selection. test_d and the tests below pin the term, the latter
# exactly, on the analytic prior, through the real ScoreDistiller.


def algorithm1_by_hand(theta, t, seed, gamma=WORLD.guidance_scale, full_form=False):
    """One step of Algorithm 1 (lines 3-10) written out from the paper with plain tensor ops,
    none of backend.psd.guidance: the noises are the distiller's two draws from a generator
    seeded with ``seed`` (eps, then eps'; Alg. 1 line 3), n is the world's n0, w(t) = s_t^2.
    Returns the per-sample quantities as a dict."""
    prior, reward = WORLD.prior(), WORLD.target()
    n_samples = theta.shape[0]
    gen = torch.Generator().manual_seed(seed)
    eps = [torch.randn(theta.shape, generator=gen) for _ in range(2)]
    a, s = prior.alpha_sigma(t)
    y, n = WORLD.y_embedding().expand(n_samples, 1, 2), WORLD.n0_embedding().expand(n_samples, 1, 2)
    x = [a * theta + s * e for e in eps]
    e_y = [prior.predict_eps(xi, t, y) for xi in x]
    e_n = [prior.predict_eps(xi, t, n) for xi in x]
    e_cfg = [en + gamma * (ey - en) for ey, en in zip(e_y, e_n)]  # Eq. 3
    r = [reward.score((xi - s * ec) / a) for xi, ec in zip(x, e_cfg)]  # Tweedie, then the reward
    first = (r[0] >= r[1]).view(-1, 1, 1, 1)  # Alg. 1 line 7
    w_, l_ = (lambda u: torch.where(first, u[0], u[1])), (lambda u: torch.where(first, u[1], u[0]))
    d_gen = w_(e_n) - w_(eps)  # Alg. 1 line 8
    d_cls = w_(e_y) - w_(e_n)
    d_pref = w_(e_cfg) - l_(e_cfg)
    if full_form:
        d_pref = d_pref - (w_(eps) - l_(eps))
    r_w, r_l = torch.maximum(r[0], r[1]), torch.minimum(r[0], r[1])
    norm = lambda v: v.flatten(1).norm(dim=1)  # noqa: E731
    beta = gamma * norm(d_cls) / norm(d_pref) * torch.sigmoid(r_l - r_w)  # Alg. 1 line 9
    weight = s**2
    return {"grad": weight * (d_gen + gamma * d_cls + beta.view(-1, 1, 1, 1) * d_pref),  # Eq. 12
            "pref_term": weight * beta.view(-1, 1, 1, 1) * d_pref, "beta": beta, "r_w": r_w, "r_l": r_l,
            "d_cls": d_cls, "weight": weight, "eps_w": w_(eps), "eps_l": l_(eps)}


def distiller_step(theta, t, seed, negative=FIXED_N, **guidance):
    config = GuidanceConfig(guidance_scale=WORLD.guidance_scale, **guidance)
    distiller = ScoreDistiller(prior=WORLD.prior(), reward=WORLD.target(), text_features=None, y=WORLD.y_embedding(),
                               negative=NegativeEmbedding(WORLD.n0_embedding(), negative), config=config,
                               generator=torch.Generator().manual_seed(seed))
    return distiller.step(theta, t, 0)


def particles_and_times(count=256, seed=11):
    """Particles spread over the toy's modes and the gaps between them, one random t in [50, 950) each."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(count, 2, 1, 1, generator=gen) * 1.5 + torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    return theta, torch.randint(50, 950, (count,), generator=gen)


@pytest.mark.parametrize("negative", [FIXED_N, NegativeConfig()], ids=["n-fixed", "n-trained"])
def test_psd_step_is_algorithm1_written_out(negative):
    """The distiller's PSD gradient, beta_r and rewards equal Algorithm 1 computed by hand (both
    code paths: n fixed, and n trained from the ranking pass's graph)."""
    theta, t = particles_and_times()
    out = distiller_step(theta, t, seed=5, negative=negative)
    ref = algorithm1_by_hand(theta, t, seed=5)
    torch.testing.assert_close(out.reward_w, ref["r_w"])
    torch.testing.assert_close(out.reward_l, ref["r_l"])
    torch.testing.assert_close(out.beta_r, ref["beta"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.grad, ref["grad"], rtol=1e-5, atol=1e-6)
    # the comparison can see the preference term: on most particles it is far above the tolerance
    share = ref["pref_term"].flatten(1).norm(dim=1) / ref["grad"].flatten(1).norm(dim=1)
    assert float((share > 1e-3).float().mean()) > 0.5, share


@pytest.mark.parametrize("full_form", [False, True], ids=["paper", "full"])
def test_preference_term_balances_cfg_and_moves_toward_the_right_noise(full_form):
    """Section 3.2: beta_r makes the preference term as large as the CFG term gamma d_cls, times
    sigmoid(r_l - r_w), whatever the size of d_pref. Its direction on an exact prior (DESIGN.md,
    test_guidance's Gaussian case): the paper's form moves the render toward the loser's noise,
    the full form toward the winner's. Measured as PSD's gradient minus the same step without
    the preference term (preference_guidance=False: winner selection only)."""
    theta, t = particles_and_times()
    form = PrefForm.FULL if full_form else PrefForm.PAPER
    with_pref = distiller_step(theta, t, seed=5, pref_form=form)
    without = distiller_step(theta, t, seed=5, pref_form=form, preference_guidance=False)
    ref = algorithm1_by_hand(theta, t, seed=5, full_form=full_form)
    pref_term = with_pref.grad - without.grad
    norm = lambda v: v.flatten(1).norm(dim=1)  # noqa: E731
    balanced = ref["weight"].flatten() * WORLD.guidance_scale * norm(ref["d_cls"]) * torch.sigmoid(ref["r_l"] - ref["r_w"])
    torch.testing.assert_close(norm(pref_term), balanced, rtol=1e-4, atol=1e-5)
    seen = balanced > 1e-3 * norm(without.grad)  # particles where the term stands out of float noise
    assert float(seen.float().mean()) > 0.5
    # theta moves along -grad; the term's component along (loser's noise - winner's noise)
    toward_loser = (-pref_term * (ref["eps_l"] - ref["eps_w"])).flatten(1).sum(1)[seen]
    agree = float(((toward_loser > 0) if not full_form else (toward_loser < 0)).float().mean())
    # exact on a Gaussian; on this mixture CFG makes eps~ non-monotone between the modes, so a
    # majority: measured 0.89 (paper) and 0.74 (full); a flipped term gives 0.11 and 0.26
    assert agree > 2 / 3, agree
