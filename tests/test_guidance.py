"""Each guidance equation against an independent, element-by-element computation."""

import math

import numpy as np
import pytest
import torch

from backend.psd import guidance as G


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cfg_with_negative_embedding_matches_eq3():
    eps_y, eps_n = rand(3, 4, 2, 2, seed=1), rand(3, 4, 2, 2, seed=2)
    out = G.cfg(eps_y, eps_n, 7.5).numpy()
    y, n = eps_y.numpy(), eps_n.numpy()
    for idx in np.ndindex(*y.shape):
        assert out[idx] == pytest.approx(n[idx] + 7.5 * (y[idx] - n[idx]))
    # eps~ - eps == delta_gen + gamma delta_cls (the identity Algorithm 1 relies on)
    eps = rand(3, 4, 2, 2, seed=3)
    lhs = G.cfg(eps_y, eps_n, 7.5) - eps
    rhs = G.delta_gen(eps_n, eps) + 7.5 * G.delta_cls(eps_y, eps_n, None)
    torch.testing.assert_close(lhs, rhs)


def test_threestudio_scale_is_gamma_minus_one():
    eps_y, eps_u = rand(2, 4, 2, 2, seed=4), rand(2, 4, 2, 2, seed=5)
    s = 100.0
    threestudio = eps_y + s * (eps_y - eps_u)
    torch.testing.assert_close(G.cfg(eps_y, eps_u, s + 1), threestudio)


def test_tweedie_inverts_forward_process():
    x0, eps = rand(2, 4, 3, 3, seed=6), rand(2, 4, 3, 3, seed=7)
    abar = torch.tensor([0.9, 0.1], dtype=torch.float64)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x_t = G.add_noise(x0, eps, a, s)
    for i in range(2):
        expected = (x_t[i].numpy() - math.sqrt(1 - abar[i].item()) * eps[i].numpy()) / math.sqrt(abar[i].item())
        np.testing.assert_allclose(G.tweedie_x0(x_t, eps, a, s)[i].numpy(), expected, rtol=1e-12)
        np.testing.assert_allclose(expected, x0[i].numpy(), rtol=1e-9, atol=1e-12)


def test_winner_choice_and_swap():
    r1 = torch.tensor([0.3, 0.1, 0.5])
    r2 = torch.tensor([0.2, 0.4, 0.5])
    mask = G.winner_mask(r1, r2)
    assert mask.tolist() == [True, False, True]  # ties go to the first sample
    a, b = rand(3, 2, 1, 1, seed=8), rand(3, 2, 1, 1, seed=9)
    w, l = G.pick(mask, a, b), G.pick(mask, b, a)
    for i, m in enumerate(mask.tolist()):
        torch.testing.assert_close(w[i], a[i] if m else b[i])
        torch.testing.assert_close(l[i], b[i] if m else a[i])
    # swapping the rewards swaps winner and loser on every sample that is not tied
    swapped = G.winner_mask(r2, r1)
    assert swapped.tolist() == [False, True, True]


def test_beta_r_matches_algorithm1_line9_per_sample():
    d_cls, d_pref = rand(4, 4, 2, 2, seed=10), rand(4, 4, 2, 2, seed=11)
    r_w = torch.tensor([0.30, 0.25, 0.2, 0.9], dtype=torch.float64)
    r_l = torch.tensor([0.29, 0.10, 0.2, -0.5], dtype=torch.float64)
    for k_r in (1.0, 100.0):
        beta = G.beta_r(d_cls, d_pref, r_w, r_l, gamma=7.5, reward_scale=k_r)
        for i in range(4):
            ncls = math.sqrt(sum(v * v for v in d_cls[i].flatten().tolist()))
            npref = math.sqrt(sum(v * v for v in d_pref[i].flatten().tolist()))
            sig = 1 / (1 + math.exp(-k_r * (r_l[i].item() - r_w[i].item())))
            assert beta[i].item() == pytest.approx(7.5 * ncls / npref * sig, rel=1e-10)


def test_beta_r_paper_scale_is_half_for_hps_sized_gaps():
    d = rand(1, 4, 2, 2, seed=12)
    beta1 = G.beta_r(d, d, torch.tensor([0.27]), torch.tensor([0.26]), gamma=1.0, reward_scale=1.0)
    beta100 = G.beta_r(d, d, torch.tensor([0.27]), torch.tensor([0.26]), gamma=1.0, reward_scale=100.0)
    assert beta1.item() == pytest.approx(0.4975, abs=1e-3)  # sigmoid(-0.01)
    assert beta100.item() == pytest.approx(1 / (1 + math.e), abs=1e-3)  # sigmoid(-1)


def test_beta_r_is_zero_when_pref_vanishes():
    d = rand(2, 4, 2, 2, seed=13)
    assert G.beta_r(d, torch.zeros_like(d), torch.ones(2), torch.zeros(2), 7.5).tolist() == [0.0, 0.0]


def test_psd_sds_dreamdpo_directions():
    e = {k: rand(2, 4, 2, 2, seed=20 + i) for i, k in enumerate(["y_w", "n_w", "y_l", "n_l", "w", "l"])}
    gamma = 7.5
    cfg_w, cfg_l = G.cfg(e["y_w"], e["n_w"], gamma), G.cfg(e["y_l"], e["n_l"], gamma)
    d_gen = G.delta_gen(e["n_w"], e["w"])
    d_cls = G.delta_cls(e["y_w"], e["n_w"], e["y_l"])
    d_pref = G.delta_pref(cfg_w, cfg_l, e["w"], e["l"])
    beta = torch.tensor([0.5, 2.0], dtype=torch.float64)
    psd = G.psd_direction(d_gen, d_cls, d_pref, gamma, beta)
    for i in range(2):
        expected = (e["n_w"][i] - e["w"][i]) + gamma * (e["y_w"][i] - e["n_w"][i]) + beta[i] * (cfg_w[i] - cfg_l[i])
        torch.testing.assert_close(psd[i], expected)
    # with beta = 0 PSD is SDS at the winner's noise (Eq. 14)
    torch.testing.assert_close(G.psd_direction(d_gen, d_cls, d_pref, gamma, torch.zeros(2, dtype=torch.float64)),
                               G.sds_direction(cfg_w, e["w"]))
    # DreamDPO, Eq. 22, equals the FULL delta_pref form
    torch.testing.assert_close(G.dreamdpo_direction(cfg_w, e["w"], cfg_l, e["l"]),
                               G.delta_pref(cfg_w, cfg_l, e["w"], e["l"], G.PrefForm.FULL))
    # Algorithm 2's printed delta_cls
    torch.testing.assert_close(G.delta_cls(e["y_w"], e["n_w"], e["y_l"], G.ClsForm.ALGORITHM2), e["y_w"] - e["y_l"])


def test_distillation_loss_gradient_is_the_guidance():
    x = rand(2, 4, 2, 2, seed=30).requires_grad_(True)
    g = rand(2, 4, 2, 2, seed=31)
    G.distillation_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g)


@pytest.mark.parametrize("form,sign", [(G.PrefForm.PAPER, +1), (G.PrefForm.FULL, -1)])
def test_delta_pref_direction_in_a_gaussian_prior(form, sign):
    """(d) For a Gaussian prior N(mu, v I) the exact eps(x_t) = s_t (x_t - a_t mu) / (a_t^2 v + s_t^2).
    With x_i = a x_c + s eps_i the paper's form is c (eps_w - eps_l), c = s^2 / (a^2 v + s^2) in (0, 1),
    so the update theta -= lr * beta * delta_pref moves theta toward the LOSER's noise; the full form
    is (c - 1)(eps_w - eps_l) and moves it toward the WINNER's."""
    mu, v = rand(1, 4, 2, 2, seed=40), 0.3
    x_c = rand(1, 4, 2, 2, seed=41)
    eps_w, eps_l = rand(1, 4, 2, 2, seed=42), rand(1, 4, 2, 2, seed=43)
    abar = 0.5
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    eps_fn = lambda x: s * (x - a * mu) / (a * a * v + s * s)  # noqa: E731
    x_w, x_l = a * x_c + s * eps_w, a * x_c + s * eps_l
    d = G.delta_pref(eps_fn(x_w), eps_fn(x_l), eps_w, eps_l, form)
    c = s * s / (a * a * v + s * s)
    coefficient = c if form is G.PrefForm.PAPER else c - 1
    torch.testing.assert_close(d, coefficient * (eps_w - eps_l))
    step = -d  # the direction theta moves in
    toward_winner = float((step * (eps_w - eps_l)).sum())
    assert np.sign(toward_winner) == -sign


def test_preference_term_has_the_cfg_terms_size_whatever_the_scale_of_d_pref():
    """Section 3.2: beta_r 'balances the gradient produced by CFG and our preference score
    guidance': |beta_r d_pref| = gamma |d_cls| sigmoid(r_l - r_w) per sample, for any size of d_pref
    (so scaling d_pref changes the reported beta_r, never the step)."""
    d_cls, d_pref = rand(3, 4, 2, 2, seed=50), rand(3, 4, 2, 2, seed=51)
    zero = torch.zeros_like(d_cls)
    r_w = torch.tensor([0.3, 0.2, 0.9], dtype=torch.float64)
    r_l = torch.tensor([0.1, 0.2, -0.5], dtype=torch.float64)
    expected = 7.5 * d_cls.flatten(1).norm(dim=1) * torch.sigmoid(r_l - r_w)
    for k in (0.1, 1.0, 10.0):
        beta = G.beta_r(d_cls, k * d_pref, r_w, r_l, gamma=7.5)
        term = G.psd_direction(zero, zero, k * d_pref, 7.5, beta)
        torch.testing.assert_close(term.flatten(1).norm(dim=1), expected)
        torch.testing.assert_close(term, G.per_sample(expected / d_pref.flatten(1).norm(dim=1)) * d_pref)
