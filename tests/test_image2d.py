"""The 2D pipeline (Algorithm 2) end to end on the tiny preset, and the distiller's step structure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.errors import InvalidInputError, NumericalError
from protocol.events import Done, Failed, ImageSnapshot, Progress
from protocol.specs import Image2dSpec
from backend.pipelines.image2d import run_image2d
from backend.psd.distill import GuidanceConfig, Method, ScoreDistiller
from backend.geometry.mesh import png_to_rgba
from backend.psd.negative import NegativeConfig, NegativeEmbedding

STEP_KEYS = {"step", "t", "reward_w", "reward_l", "beta_r", "seconds"}


def run(spec, out, tiny, **kw):
    return list(run_image2d(spec, out, models=tiny, **kw))


@pytest.mark.parametrize("method", ["psd", "sds", "dreamdpo"])
def test_each_method_writes_the_shared_outputs(tmp_path, tiny, method):
    events = run(Image2dSpec(prompt="a wooden treasure chest", method=method, steps=4, seed=1), tmp_path, tiny)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert any(isinstance(e, ImageSnapshot) and e.image.shape == (128, 128, 4) and e.image.dtype.name == "uint8" for e in events)
    done = events[-1]
    assert isinstance(done, Done), events[-1]
    for name in ("image", "metrics", "reward_curve", "negative_embedding"):
        assert Path(done.outputs[name]).is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["steps"]) == 4 and all(STEP_KEYS <= set(r) for r in metrics["steps"])
    assert isinstance(metrics["final"]["target_reward"], float) and "unseen_pickscore" in metrics["final"]
    paired = [r["reward_w"] is not None for r in metrics["steps"]]
    assert all(paired) if method != "sds" else not any(paired)
    if method == "psd":
        # two distinct samples were ranked (one noise used twice would tie) and the preference term was on
        assert all(r["reward_w"] > r["reward_l"] and r["beta_r"] > 0 for r in metrics["steps"])


def test_same_seed_same_result(tmp_path, tiny):
    spec = Image2dSpec(prompt="a lamp", steps=3, seed=7)
    a = run(spec, tmp_path / "a", tiny)[-1].final["target_reward"]
    b = run(spec, tmp_path / "b", tiny)[-1].final["target_reward"]
    assert a == b


def test_finish_early_keeps_the_current_result(tmp_path, tiny):
    calls = []
    events = run(Image2dSpec(prompt="a lamp", steps=20), tmp_path, tiny, should_stop=lambda: len(calls.append(1) or calls) > 3)
    assert isinstance(events[-1], Done) and events[-1].final["steps_done"] == 3
    assert (tmp_path / "image.png").is_file()
    last = [e for e in events if isinstance(e, ImageSnapshot)][-1]  # the client holds the kept image
    assert last.step == 3
    assert np.array_equal(last.image, png_to_rgba((tmp_path / "image.png").read_bytes()))


def test_learned_negative_embedding_loads_into_another_job(tmp_path, tiny):
    first = run(Image2dSpec(prompt="a lamp", steps=3), tmp_path / "a", tiny)[-1]
    saved = NegativeEmbedding.load_tensor(first.outputs["negative_embedding"])
    initial = tiny.prior.encode_text(["low quality"]).shape
    assert saved.shape == initial
    second = run(Image2dSpec(prompt="a chair", steps=2, negative_embedding=first.outputs["negative_embedding"]), tmp_path / "b", tiny)
    assert isinstance(second[-1], Done)
    bad = tmp_path / "bad.pt"
    torch.save({"embedding": torch.zeros(1, 5, 7)}, bad)
    failed = run(Image2dSpec(prompt="a chair", steps=2, negative_embedding=str(bad)), tmp_path / "c", tiny)[-1]
    assert isinstance(failed, Failed) and failed.field == "negative_embedding" and "text encoder" in failed.message


@pytest.mark.parametrize("spec,field", [
    (Image2dSpec(prompt=""), "prompt"),
    (Image2dSpec(prompt="a cat " * 60), "prompt"),
    (Image2dSpec(prompt="a cat", method="vsd"), "method"),
    (Image2dSpec(prompt="a cat", preset="sdxl"), "preset"),
    (Image2dSpec(prompt="a cat", steps=0), "steps"),
    (Image2dSpec(prompt="a cat", guidance_scale=float("nan")), "guidance_scale"),
    (Image2dSpec(prompt="a cat", reward_scale=float("inf")), "reward_scale"),
    (Image2dSpec(prompt="a cat", negative_prompt="x " * 100), "negative_prompt"),
])
def test_bad_input_fails_with_the_field_named(tmp_path, tiny, spec, field):
    events = run(spec, tmp_path, tiny)
    assert len(events) == 1 and isinstance(events[0], Failed), events
    assert events[0].field == field and events[0].code in ("invalid_input", "unknown_name")
    assert not (tmp_path / "metrics.json").exists()


class CountingPrior:
    """Wraps a prior and records the batch size of every UNet call."""

    def __init__(self, prior):
        self.prior, self.batches = prior, []

    def __getattr__(self, name):
        return getattr(self.prior, name)

    def predict_eps(self, x_t, t, cond):
        self.batches.append((x_t.shape[0], torch.is_grad_enabled() and cond.requires_grad))
        return self.prior.predict_eps(x_t, t, cond)


@pytest.mark.parametrize("method,interval,reuse", [("psd", 1, True), ("psd", 2, True), ("psd", 5, True),
                                                   ("psd", 2, False), ("sds", 1, True), ("dreamdpo", 1, True)])
def test_step_structure_and_interval(tiny, method, interval, reuse):
    prior = CountingPrior(tiny.prior)
    y = tiny.prior.encode_text(["a cup"])
    neg = NegativeEmbedding(tiny.prior.encode_text(["blurry"]), NegativeConfig())
    feats = tiny.target_reward.text_features("a cup")
    d = ScoreDistiller(prior=prior, reward=tiny.target_reward, text_features=feats, y=y, negative=neg,
                       config=GuidanceConfig(method=Method(method), interval=interval, reuse_winner_forward=reuse),
                       generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 16, 16)  # two views
    n_before = neg.value.detach().clone()
    pairs = []
    for step in range(5):
        prior.batches.clear()
        out = d.step(x, torch.tensor([500, 500]), step)
        pairs.append(out.pair)
        assert out.grad.shape == x.shape and torch.isfinite(out.grad).all()
        if out.pair and method == "psd" and reuse:
            # y branch for both samples without a graph; each sample's n branch with one (reused for the n step)
            assert prior.batches == [(4, False), (2, True), (2, True)]
        elif out.pair:
            assert prior.batches[0] == (8, False)  # one batched call: 2 views x {x1, x2} x {y, n}
            if method == "psd":
                assert prior.batches[1:] == [(2, True)]  # the winner's n branch again, with a graph
            else:
                assert prior.batches[1:] == []
        else:
            assert prior.batches == [(4, False)]  # plain SDS: 2 views x {y, n}
    expected = [method != "sds" and s % interval == 0 for s in range(5)]
    assert pairs == expected
    assert (neg.updates > 0) == (method == "psd")
    assert torch.equal(neg.value.detach(), n_before) == (method != "psd")


def test_nan_latent_is_a_numerical_error(tiny):
    y = tiny.prior.encode_text(["a cup"])
    d = ScoreDistiller(prior=tiny.prior, reward=tiny.target_reward,
                       text_features=tiny.target_reward.text_features("a cup"), y=y,
                       negative=NegativeEmbedding(y.clone()), config=GuidanceConfig(),
                       generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 4, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError):
        d.step(x, torch.tensor([500]), 0)
    with pytest.raises(InvalidInputError):
        NegativeEmbedding(torch.full((1, 77, 32), float("inf")))


def test_cli_runs_a_tiny_job(tmp_path, psd3d_home):
    env = dict(os.environ, PSD3D_HOME=psd3d_home)
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "image2d", "--prompt", "a red teapot", "--steps", "3",
                           "--out", str(tmp_path / "job")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "target reward" in proc.stdout and (tmp_path / "job" / "reward_curve.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "backend.cli", "image2d", "--prompt", " ", "--steps", "3",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "prompt" in bad.stderr and "Traceback" not in bad.stderr


def test_reusing_the_winners_forward_gives_the_same_n_step_and_guidance(tiny):
    y = tiny.prior.encode_text(["a cup"])
    n0 = tiny.prior.encode_text(["blurry"])
    feats = tiny.target_reward.text_features("a cup")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    outs, ns = [], []
    for reuse in (True, False):
        neg = NegativeEmbedding(n0, NegativeConfig(lr=1e-2))
        d = ScoreDistiller(prior=tiny.prior, reward=tiny.target_reward, text_features=feats, y=y, negative=neg,
                           config=GuidanceConfig(reuse_winner_forward=reuse),
                           generator=torch.Generator().manual_seed(0))
        outs.append(d.step(x, torch.tensor([300, 300]), 0))
        ns.append(neg.value.detach())
    torch.testing.assert_close(outs[0].grad, outs[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0].reward_w, outs[1].reward_w, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ns[0], n0)
    torch.testing.assert_close(ns[0], ns[1], rtol=1e-4, atol=1e-6)
