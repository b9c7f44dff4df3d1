"""Gradients through a float16 prior: the negative embedding's (Eq. 31-32) and the render's
survive, because each float16 module's backward runs on a rescaled gradient
(``prior.HalfGradSpan``); and point where float32's does, in float16 and bfloat16, when the reward
path runs in float32 (``prior.float32_reward_path``, ``GuidanceConfig.float32_reward_path``). A CPU runs float16, so these run everywhere on the tiny models;
``scripts/bench/half_precision.py`` measures the same on every t and on SD 2.1's shapes."""

import copy

import pytest
import torch

from backend.models import load_models
from backend.pipelines.presets import TINY_MODELS
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller
from backend.psd.guidance import add_noise, distillation_loss, sds_direction, cfg as cfg_eps, sds_weight
from backend.psd.negative import NegativeConfig, NegativeEmbedding, negative_embedding_reward
from backend.psd.prior import HALF_GRAD_PEAK, DiffusionPrior, HalfGradSpan, half_grad_scale

LATENT = 8  # 64 px pictures: float16 convolutions on a CPU are slow
SMALL = 2.0**-12  # a reward whose pixel gradient is 2**-12 of the tiny HPS twin's


def centred(prior) -> DiffusionPrior:
    """The prior with a copy of its TAESD whose pictures are centred: the tiny twin decodes every
    latent to about -0.05, so the reward path's clamp to [0, 1] would pass gradient through ~0.1 %
    of the pixels (scripts/bench/half_precision.py, ``centre_tiny_decoder``)."""
    taesd = copy.deepcopy(prior.tiny_decoder)
    with torch.no_grad():
        taesd.decoder.layers[-1].bias += 0.5
    return DiffusionPrior(prior.unet, prior.vae, prior.text_encoder, prior.tokenizer, prior.alphas_cumprod, taesd)


class ScaledReward:
    def __init__(self, reward, scale: float) -> None:
        self.reward, self.scale = reward, scale

    def score(self, images, text_features):
        return self.scale * self.reward.score(images, text_features)


@pytest.fixture(scope="module")
def priors(tiny):
    half = load_models(TINY_MODELS, device=torch.device("cpu"), dtype=torch.float16)
    return centred(tiny.prior), centred(half.prior)


@pytest.fixture(scope="module")
def bf16_prior():
    return centred(load_models(TINY_MODELS, device=torch.device("cpu"), dtype=torch.bfloat16).prior)


def cosine_and_lost(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Cosine, and the fraction of ``ref``'s nonzero elements that are zero in ``other``."""
    a, b = ref.flatten().double(), other.flatten().double()
    nonzero = a != 0
    cos = a @ b / (a.norm() * b.norm())  # not F.cosine_similarity: its eps 1e-8 floors these tiny norms
    return float(cos), float(((b == 0) & nonzero).sum() / nonzero.sum())


def n_grad(prior, reward, t: int = 400) -> torch.Tensor:
    """Eq. 31-32: d r(y, x0(n)) / d n through the prior's n branch and TAESD."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, LATENT, LATENT, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    feats = reward.reward.text_features("a small boat")
    tt = torch.tensor([t])
    a, s = prior.alpha_sigma(tt)
    x_t = add_noise(x0, eps, a, s)
    with torch.no_grad():
        eps_y = prior.predict_eps(x_t, tt, prior.encode_text(["a small boat"]))
    n = prior.encode_text(["blurry, ugly"]).float().requires_grad_(True)
    r = negative_embedding_reward(prior, reward, feats, x_t, tt, eps_y, n, 7.5, dict(tiny=True))
    return torch.autograd.grad(r.sum(), n)[0]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_float32_reward_path_gives_float32s_negative_embedding_gradient(tiny, priors, bf16_prior, dtype):
    """The half forward's rounding, times gamma s_t / a_t in x0, turns n's gradient (bfloat16:
    cosine 0.93..0.98 here at t = 400..950); with the UNet calls and TAESD of the reward path in
    float32 it points where float32's does (0.993 or more; float16 0.999) and loses no element."""
    full, half = priors[0], priors[1] if dtype == "fp16" else bf16_prior
    small = ScaledReward(tiny.target_reward, SMALL)
    for t in (400, 700, 950):
        with half.float32_reward_path():
            cos, lost = cosine_and_lost(n_grad(full, small, t), n_grad(half, small, t))
        assert lost <= 0.01 and cos >= 0.99, (t, cos, lost)
    assert all(m.dtype == torch.float32 for m in half._float32_copies.values())
    assert half.unet.dtype != torch.float32 and half.tiny_decoder.dtype != torch.float32


def test_the_config_runs_a_pair_steps_reward_path_in_float32_and_an_sds_step_half(tiny, bf16_prior):
    """``GuidanceConfig.float32_reward_path``, on by default: every UNet call of a PSD pair step
    (eps(y), eps(n) of both noisings, the n branch) runs the float32 copy; a plain SDS step stays
    bfloat16."""
    prior = copy.copy(bf16_prior)
    seen = []
    plain = prior.predict_eps

    def spy(*args, **kwargs):
        seen.append(prior.active_unet().dtype)
        return plain(*args, **kwargs)

    prior.predict_eps = spy
    feats = tiny.target_reward.text_features("a cup")
    y, n = tiny.prior.encode_text(["a cup"]), tiny.prior.encode_text(["blurry"])
    x_c = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    for method, expected in ((Method.PSD, torch.float32), (Method.SDS, torch.bfloat16)):
        seen.clear()
        config = GuidanceConfig(method=method)  # the default: the reward path in float32
        distiller = ScoreDistiller(prior=prior, reward=tiny.target_reward, text_features=feats, y=y,
                                   negative=NegativeEmbedding(n), config=config,
                                   generator=torch.Generator().manual_seed(1))
        distiller.step(x_c, t, 0)
        assert seen and set(seen) == {expected}, (method, seen)


def test_negative_embedding_gradient_survives_float16(tiny, priors):
    """Float16's backward, rescaled per module, loses no element of a small reward's gradient,
    and points where float32's does up to float16's forward rounding (which moves x0 by
    (s/a)(gamma - 1) times it; the bench's ``fp32 @ fp16 eps(y)`` row)."""
    full, half = priors
    small = ScaledReward(tiny.target_reward, SMALL)
    cos, lost = cosine_and_lost(n_grad(full, small), n_grad(half, small))
    assert lost <= 0.01 and cos >= 0.98, (cos, lost)


def test_float16_negative_embedding_gradient_does_not_depend_on_the_reward_scale(tiny, priors):
    """Each module's backward is rescaled from the gradient that enters it, so scaling the reward
    by a power of two scales n's gradient by exactly that power."""
    half = priors[1]
    plain = n_grad(half, ScaledReward(tiny.target_reward, 1.0))
    assert torch.equal(n_grad(half, ScaledReward(tiny.target_reward, SMALL)) / SMALL, plain)


def test_unscaled_float16_loses_a_small_gradient(tiny, priors):
    """What the rescaling is for: with it off, float16's backward underflows to zero."""
    full, half = priors
    small = ScaledReward(tiny.target_reward, SMALL)
    half.half_grad_peak = None
    try:
        cos, lost = cosine_and_lost(n_grad(full, small), n_grad(half, small))
    finally:
        half.half_grad_peak = HALF_GRAD_PEAK
    assert lost > 0.5, (cos, lost)


def test_render_gradient_survives_float16(tiny, priors):
    """d L_SDS / d render through the VAE encoder (the distillation grad is O(1): no underflow)."""
    image = torch.rand(1, 3, 8 * LATENT, 8 * LATENT, generator=torch.Generator().manual_seed(0))
    y, n = tiny.prior.encode_text(["a cup"]), tiny.prior.encode_text(["blurry"])
    grads = []
    for prior in priors:
        x = image.clone().requires_grad_(True)
        x_c = prior.encode_images(x)
        t = torch.tensor([400])
        a, s = prior.alpha_sigma(t)
        eps = torch.randn(x_c.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            x_t = add_noise(x_c, eps, a, s)
            e_y, e_n = prior.predict_eps(torch.cat([x_t, x_t]), t.repeat(2), torch.cat([y, n])).chunk(2)
        distillation_loss(x_c, sds_weight(s) * sds_direction(cfg_eps(e_y, e_n, 7.5), eps)).backward()
        grads.append(x.grad)
    cos, lost = cosine_and_lost(*grads)
    assert lost <= 0.01 and cos >= 0.999, (cos, lost)


def test_half_grad_scale_is_a_power_of_two_that_puts_the_peak_below_target():
    for top in (3e-9, 1.0, 5e4):
        grad = torch.tensor([top, -top / 3, 0.0])
        scale = float(half_grad_scale(grad, 16.0))
        assert scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())
        assert 8.0 <= top * scale < 16.0
    assert float(half_grad_scale(torch.zeros(3), 16.0)) == 1.0
    assert float(half_grad_scale(torch.tensor([1.0, float("inf")]), 16.0)) == 1.0


def test_half_grad_span_is_exact_where_nothing_underflows():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64)
    span = HalfGradSpan(16.0)
    (plain,) = torch.autograd.grad((torch.sin(x) * w * 1e-6).sum(), x)
    (spanned,) = torch.autograd.grad((span.output(torch.sin(span.inputs(x))) * w * 1e-6).sum(), x)
    assert span.scale is not None and float(span.scale) > 1
    assert torch.equal(spanned, plain)


def test_an_overflowed_gradient_leaves_n_and_adam_unchanged():
    neg = NegativeEmbedding(torch.zeros(1, 3, 2), NegativeConfig(lr=0.1))
    good = (neg.value * torch.ones(1, 3, 2)).sum()
    neg.ascend(good, 0)
    before = neg.value.detach().clone()
    state = {k: v.clone() for k, v in neg.optimizer.state[neg.value].items()}
    neg.ascend((neg.value * torch.full((1, 3, 2), float("inf"))).sum(), 1)
    assert torch.equal(neg.value.detach(), before) and (neg.updates, neg.skipped) == (1, 1)
    assert all(torch.equal(neg.optimizer.state[neg.value][k], v) for k, v in state.items())
