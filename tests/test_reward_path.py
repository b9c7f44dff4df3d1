"""The reward's view of a one-step prediction: the full-size latent decoded, the picture shrunk
once in pixel space by the reward; the CFG scale of that prediction (Alg. 1 line 7)."""

import torch

from backend.psd import guidance as G
from backend.psd.distill import GuidanceConfig, ScoreDistiller
from backend.psd.negative import NegativeConfig, NegativeEmbedding


def test_reward_decodes_the_full_size_latent(tiny):
    prior = tiny.prior
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = prior.decode_for_reward(lat)
    assert images.shape == (2, 3, 128, 128)
    with torch.no_grad():
        direct = prior.tiny_decoder.decode(lat / prior.tiny_decoder.config.scaling_factor).sample
    torch.testing.assert_close(images, ((direct + 1) / 2).clamp(0, 1))
    assert prior.decode_for_reward(lat, tiny=False).shape == (2, 3, 128, 128)


def test_reward_resizes_in_pixel_space_differentiably(tiny):
    """The reward shrinks a 512 px picture to 224 once; its gradient reaches every pixel region."""
    reward = tiny.target_reward
    images = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    (grad,) = torch.autograd.grad(reward.score(images, reward.text_features("a cup")).sum(), images)
    blocks = grad.abs().sum(1)[0].unfold(0, 64, 64).unfold(1, 64, 64).sum((-1, -2))  # 8x8 blocks of 64 px
    assert (blocks > 0).all()


class RecordingPrior:
    """The tiny prior, recording every batch of latents sent to the reward's decoder."""

    def __init__(self, prior) -> None:
        self.prior, self.decoded = prior, []

    def __getattr__(self, name):
        return getattr(self.prior, name)

    def decode_for_reward(self, latents, **decode):
        self.decoded.append(latents.detach().clone())
        return self.prior.decode_for_reward(latents, **decode)


def _ranked_x0(tiny, guidance: GuidanceConfig, x: torch.Tensor, t: torch.Tensor, y, n0) -> torch.Tensor:
    """The one-step predictions of both samples that the reward ranked on a pair step."""
    prior = RecordingPrior(tiny.prior)
    neg = NegativeEmbedding(n0, NegativeConfig())
    d = ScoreDistiller(prior=prior, reward=tiny.target_reward, text_features=tiny.target_reward.text_features("a cup"),
                       y=y, negative=neg, config=guidance, generator=torch.Generator().manual_seed(0))
    d.step(x, t, 0)
    return prior.decoded[0]


def test_reward_guidance_scale_sets_the_cfg_of_the_ranked_prediction(tiny):
    y, n0 = tiny.prior.encode_text(["a cup"]), tiny.prior.encode_text(["blurry"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([400])
    a, s = tiny.prior.alpha_sigma(t)
    gen = torch.Generator().manual_seed(0)  # the distiller's draws: eps1, then eps2
    noises = [torch.randn(x.shape, generator=gen) for _ in range(2)]
    for reward_gamma, gamma in ((None, 7.5), (3.0, 3.0)):  # None: Algorithm 1's gamma, the guidance's
        cfg = GuidanceConfig(guidance_scale=7.5, reward_guidance_scale=reward_gamma, reuse_winner_forward=False)
        expected = []
        with torch.no_grad():
            for eps in noises:
                x_t = G.add_noise(x, eps, a, s)
                eps_y, eps_n = tiny.prior.predict_eps(x_t, t, y), tiny.prior.predict_eps(x_t, t, n0)
                expected.append(G.tweedie_x0(x_t, G.cfg(eps_y, eps_n, gamma), a, s))
        torch.testing.assert_close(_ranked_x0(tiny, cfg, x, t, y, n0), torch.cat(expected), rtol=1e-4, atol=1e-4)
