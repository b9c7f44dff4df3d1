"""Multi-view distillation (MVDream, issue 13 item 4): G objects x V views per step, the pair is two
noisings of all of an object's views, a noising's reward is the mean over the object's views, the
winner and beta_r are per object, and every prior call gets the views' cameras."""

from __future__ import annotations

import torch

from backend.psd import guidance as G
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller
from backend.psd.negative import NegativeConfig, NegativeEmbedding

OBJECTS, VIEWS = 3, 4
GAMMA = 7.5


class StubMultiViewPrior:
    """eps depends on x, the condition, the camera and on the other views of the same object."""

    num_train_timesteps = 1000

    def __init__(self) -> None:
        self.calls = 0

    def alpha_sigma(self, t):
        abar = 1 - t.double().view(-1, 1, 1, 1) / 1000
        return abar.sqrt().float(), (1 - abar).sqrt().float()

    def predict_eps(self, x, t, cond, camera=None):
        assert camera is not None and camera.shape == (x.shape[0], 16), "every call needs the views' cameras"
        self.calls += 1
        objects = x.reshape(-1, VIEWS, *x.shape[1:])
        joint = objects.mean(dim=1, keepdim=True).expand_as(objects).reshape(x.shape)  # the views see each other
        c = cond.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(0.7 * x + 0.3 * joint + c + 0.05 * camera[:, :1].view(-1, 1, 1, 1))

    def decode_for_reward(self, latents, tiny=True):
        return latents


class StubReward:
    def score(self, images, text_features):
        return images.flatten(1).mean(dim=1) - 0.3 * images.flatten(1).std(dim=1)


def make(method=Method.PSD, lr=0.0):
    y = torch.full((1, 2, 3), 0.2)
    negative = NegativeEmbedding(torch.full((1, 2, 3), -0.1), NegativeConfig(lr=lr))
    return ScoreDistiller(prior=StubMultiViewPrior(), reward=StubReward(), text_features=None, y=y, negative=negative,
                          config=GuidanceConfig(method=method, guidance_scale=GAMMA, reuse_winner_forward=False),
                          generator=torch.Generator().manual_seed(5), views=VIEWS)


def inputs():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(OBJECTS * VIEWS, 4, 3, 3, generator=gen)
    t = torch.tensor([700, 400, 250]).repeat_interleave(VIEWS)
    camera = torch.randn(OBJECTS * VIEWS, 16, generator=gen)
    return x0, t, camera


def reference_psd(prior, reward, x0, t, camera, y, n, eps1, eps2, phi=0.0):
    """Algorithm 1 written out object by object, independently of ScoreDistiller; ``phi`` > 0:
    MVDream's CFG rescale on eps~ and the s/a (x0 reconstruction) weighting."""
    a, s = prior.alpha_sigma(t)
    out, rw, rl, betas = [], [], [], []
    for g in range(OBJECTS):
        rows = slice(g * VIEWS, (g + 1) * VIEWS)
        cam = camera[rows]
        per = []
        for eps in (eps1[rows], eps2[rows]):
            x = a[rows] * x0[rows] + s[rows] * eps
            e_y = prior.predict_eps(x, t[rows], y.expand(VIEWS, -1, -1), cam)
            e_n = prior.predict_eps(x, t[rows], n.expand(VIEWS, -1, -1), cam)
            guided = e_n + GAMMA * (e_y - e_n)
            x0hat = (x - s[rows] * guided) / a[rows]
            r = float(reward.score(x0hat, None).mean())
            if phi > 0:
                x0_text = (x - s[rows] * e_y) / a[rows]
                x0hat = phi * x0hat * x0_text.std() / x0hat.std() + (1 - phi) * x0hat
                guided = (x - a[rows] * x0hat) / s[rows]
            per.append(dict(eps=eps, e_y=e_y, e_n=e_n, guided=guided, r=r))
        w, l = (per[0], per[1]) if per[0]["r"] >= per[1]["r"] else (per[1], per[0])
        d_cls, d_pref = w["e_y"] - w["e_n"], w["guided"] - l["guided"]
        beta = GAMMA * d_cls.norm() / d_pref.norm() * torch.sigmoid(torch.tensor(l["r"] - w["r"]))
        weight = s[rows] / a[rows] if phi > 0 else s[rows] ** 2
        out.append(weight * (w["guided"] - w["eps"] + beta * d_pref))
        rw.append(w["r"]), rl.append(l["r"]), betas.append(float(beta))
    return torch.cat(out), torch.tensor(rw), torch.tensor(rl), torch.tensor(betas)


def test_psd_step_picks_the_winner_per_object_and_weights_it_per_object():
    d = make()
    x0, t, camera = inputs()
    gen = torch.Generator().manual_seed(5)
    eps1, eps2 = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    out = d.step(x0, t, step=0, camera=camera)
    ref_grad, rw, rl, betas = reference_psd(StubMultiViewPrior(), StubReward(), x0, t, camera, d.y, d.negative.value.detach(), eps1, eps2)

    torch.testing.assert_close(out.reward_w, rw.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reward_l, rl.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.beta_r, betas.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert out.reward_w.shape == (OBJECTS,) and out.beta_r.shape == (OBJECTS,)


def test_some_view_disagrees_with_its_objects_winner():
    """Precondition of the test above: per-view winners would give another gradient."""
    prior, reward = StubMultiViewPrior(), StubReward()
    x0, t, camera = inputs()
    gen = torch.Generator().manual_seed(5)
    eps1, eps2 = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    a, s = prior.alpha_sigma(t)
    y, n = torch.full((1, 2, 3), 0.2), torch.full((1, 2, 3), -0.1)
    rewards = []
    for eps in (eps1, eps2):
        x = a * x0 + s * eps
        guided = G.cfg(prior.predict_eps(x, t, y.expand(len(x), -1, -1), camera),
                       prior.predict_eps(x, t, n.expand(len(x), -1, -1), camera), GAMMA)
        rewards.append(reward.score((x - s * guided) / a, None))
    per_view = rewards[0] >= rewards[1]
    per_obj = (rewards[0].view(OBJECTS, VIEWS).mean(1) >= rewards[1].view(OBJECTS, VIEWS).mean(1)).repeat_interleave(VIEWS)
    assert (per_view != per_obj).any()


def test_negative_embedding_learns_through_the_cameras_in_both_paths():
    for reuse in (True, False):
        d = make(lr=1e-2)
        d.config = GuidanceConfig(method=Method.PSD, guidance_scale=GAMMA, reuse_winner_forward=reuse)
        x0, t, camera = inputs()
        before = d.negative.value.detach().clone()
        out = d.step(x0, t, step=0, camera=camera)
        assert out.negative_reward is not None
        assert not torch.equal(before, d.negative.value.detach())


def test_dreamdpo_and_sds_run_on_views():
    for method in (Method.DREAMDPO, Method.SDS):
        d = make(method=method)
        x0, t, camera = inputs()
        out = d.step(x0, t, step=0, camera=camera)
        assert out.grad.shape == x0.shape and torch.isfinite(out.grad).all()


def test_mvdream_cfg_rescale_gives_its_x0_reconstruction_gradient():
    """With Weighting.RECON and cfg_rescale 0.5 an SDS step is MVDream-threestudio's recon loss gradient:
    x0 - (0.5 * x0_cfg * std(x0_text) / std(x0_cfg) + 0.5 * x0_cfg), the stds over each object's views."""
    from backend.psd.guidance import Weighting, rescaled_cfg

    prior = StubMultiViewPrior()
    y, n = torch.full((1, 2, 3), 0.2), torch.full((1, 2, 3), -0.1)
    d = ScoreDistiller(prior=prior, reward=StubReward(), text_features=None, y=y,
                       negative=NegativeEmbedding(n, NegativeConfig(lr=0.0)),
                       config=GuidanceConfig(method=Method.SDS, guidance_scale=GAMMA, weighting=Weighting.RECON, cfg_rescale=0.5),
                       generator=torch.Generator().manual_seed(5), views=VIEWS)
    x0, t, camera = inputs()
    out = d.step(x0, t, step=0, camera=camera)

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    a, s = prior.alpha_sigma(t)
    x_t = a * x0 + s * eps
    text = prior.predict_eps(x_t, t, y.expand(len(x_t), -1, -1), camera)
    uncond = prior.predict_eps(x_t, t, n.expand(len(x_t), -1, -1), camera)
    x0_cfg = (x_t - s * (uncond + GAMMA * (text - uncond))) / a
    x0_text = (x_t - s * text) / a
    shape = (OBJECTS, VIEWS, *x0.shape[1:])
    factor = (x0_text.view(shape).std(dim=[1, 2, 3, 4], keepdim=True) + 1e-8) / (x0_cfg.view(shape).std(dim=[1, 2, 3, 4], keepdim=True) + 1e-8)
    x0_adj = 0.5 * (x0_cfg.view(shape) * factor).view(x0.shape) + 0.5 * x0_cfg
    torch.testing.assert_close(out.grad, x0 - x0_adj, rtol=1e-4, atol=1e-5)
    # phi = 0 is Eq. 3's eps~ unchanged
    guided = uncond + GAMMA * (text - uncond)
    torch.testing.assert_close(rescaled_cfg(guided, text, x_t, a, s, VIEWS, 0.0), guided, rtol=1e-5, atol=1e-5)


def test_psd_with_the_rescale_moves_only_eps_tilde():
    """PSD's direction with the rescale is (eps~' - eps) + beta_r (eps~'_w - eps~'_l), eps~' the rescaled CFG."""
    from backend.psd.guidance import Weighting

    base = dict(method=Method.PSD, guidance_scale=GAMMA, weighting=Weighting.RECON, reuse_winner_forward=False)
    outs = {}
    for phi in (0.0, 0.5):
        d = make()
        d.config = GuidanceConfig(**base, cfg_rescale=phi)
        x0, t, camera = inputs()
        outs[phi] = d.step(x0, t, step=0, camera=camera)
    assert torch.equal(outs[0.0].reward_w, outs[0.5].reward_w)  # ranking is untouched
    assert not torch.allclose(outs[0.0].grad, outs[0.5].grad)
    x0, t, camera = inputs()
    gen = torch.Generator().manual_seed(5)
    eps1, eps2 = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    ref_grad, rw, _, betas = reference_psd(StubMultiViewPrior(), StubReward(), x0, t, camera, torch.full((1, 2, 3), 0.2),
                                           torch.full((1, 2, 3), -0.1), eps1, eps2, phi=0.5)
    torch.testing.assert_close(outs[0.5].beta_r, betas.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(outs[0.5].grad, ref_grad, rtol=1e-4, atol=1e-5)
