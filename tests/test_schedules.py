"""t(tau) as the paper's configs run it (CFD's timestep-scheduler), the DMD weighting, and the
stage defaults taken from configs/cfd/sd-mesh-*.yaml."""

import json

import numpy as np
import pytest
import torch

from protocol.errors import InvalidInputError
from protocol.specs import RefineSpec
from protocol.events import Done
from backend.pipelines.geometry_stage import GeometrySettings
from backend.pipelines.mesh3d import run_refine
from backend.pipelines.texture_stage import TextureSettings
from backend.psd import guidance as G
from backend.psd.distill import Method
from backend.psd.schedule import DreamTimeSchedule, LinearAnnealSchedule, dreamtime_fraction


def ts(schedule, total, every=1):
    return [int(schedule.sample(s, total, 1, 1000, None)[0]) for s in range(0, total + 1, every)]


def reference_dreamtime_t(step, total, m1=700, m2=400, s1=100, s2=200):
    """CFD's t_scheduler.py, written independently with numpy (dreamtime_anneal branch)."""
    idx = np.arange(1000)
    w = np.ones(1000)
    w[idx > m1] = np.exp(-((idx - m1) ** 2) / s1**2)[idx > m1]
    w[idx < m2] = np.exp(-((idx - m2) ** 2) / s2**2)[idx < m2]
    tail = 1.0 - np.cumsum(w) / w.sum()
    percentage = 1.0 - np.abs(tail - step / total).argmin() / 1000.0
    return round(1000 * ((0.98 - 0.02) * (1 - percentage) + 0.02))


def test_dreamtime_schedule_is_cfds_deterministic_anneal():
    total = 15000
    got = ts(DreamTimeSchedule(), total, every=250)
    assert got == [reference_dreamtime_t(s, total) for s in range(0, total + 1, 250)]
    assert got[0] == 979 and got[-1] == 20 and all(a >= b for a, b in zip(got, got[1:]))
    # DreamTime lingers where its weight is flat: more steps between t=400 and 700 than a linear ramp
    frac = np.mean([400 <= t <= 700 for t in got])
    assert frac > 0.45, frac
    # the same t for the same step, whatever the generator
    assert DreamTimeSchedule().sample(100, 1000, 3, 1000, torch.Generator().manual_seed(1)).tolist() == \
        DreamTimeSchedule().sample(100, 1000, 3, 1000, torch.Generator().manual_seed(2)).tolist()


def test_texture_schedule_is_cfds_linear_anneal_and_caps():
    got = ts(LinearAnnealSchedule(), 1000, every=100)
    assert got[0] == 404 and got[-1] == 212 and all(a > b for a, b in zip(got, got[1:]))
    capped = LinearAnnealSchedule().capped(0.3)
    assert max(ts(capped, 1000)) == 300 and ts(capped, 1000)[-1] == 212
    assert dreamtime_fraction(1.0, (700, 400, 100, 200)) == pytest.approx(0.02, abs=1e-3)


def test_stage_defaults_are_the_configs_the_paper_ran():
    geo, tex = GeometrySettings(), TextureSettings()
    # sd-mesh-geometry-stage2.yaml: guidance_scale 50 (threestudio form) = gamma 51, dmd, SDS
    assert (geo.guidance.guidance_scale, geo.guidance.weighting, geo.guidance.method) == (51.0, G.Weighting.DMD, Method.SDS)
    assert (geo.steps, geo.grid_resolution, geo.render_size, geo.lr, geo.betas) == (15000, 128, 1024, 0.01, (0.9, 0.99))
    # lambda 1e4 against CFD's l2 SDS loss (gradient 2g) is 5e3 against ours (gradient g)
    assert geo.normal_consistency_weight == geo.laplacian_weight == 5000.0
    assert geo.normal_render_probability == 1.0 and isinstance(geo.schedule, DreamTimeSchedule)
    assert (geo.cameras.elevation, geo.cameras.distance, geo.cameras.fov_y) == ((0.0, 40.0), (1.5, 1.8), (60.0, 70.0))
    # sd-mesh-texture-stage3.yaml: guidance_scale 75 = gamma 76, dmd; F.1's n schedule
    assert (tex.guidance.guidance_scale, tex.guidance.weighting, tex.guidance.method) == (76.0, G.Weighting.DMD, Method.PSD)
    assert (tex.negative.lr, tex.negative.freeze_after) == (1e-5, 1000)
    assert tex.refine_max_t <= 0.5 and tex.schedule.max_fraction() <= tex.refine_max_t + 1e-9


def test_dmd_weight_normalises_the_sds_part_per_sample():
    gen = torch.Generator().manual_seed(0)
    eps_cfg, eps = torch.randn(3, 4, 8, 8, generator=gen) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1), torch.randn(3, 4, 8, 8, generator=gen)
    w = G.step_weight(G.Weighting.DMD, torch.ones(3, 1, 1, 1), eps_cfg, eps)
    assert w.shape == (3, 1, 1, 1)
    torch.testing.assert_close((w * (eps_cfg - eps)).abs().mean(dim=(1, 2, 3)), torch.ones(3), rtol=1e-5, atol=1e-6)
    sigma = torch.tensor([0.3, 0.6, 0.9]).view(3, 1, 1, 1)
    torch.testing.assert_close(G.step_weight(G.Weighting.SDS, sigma, eps_cfg, eps), sigma**2)


@pytest.fixture(scope="module")
def textured_glb(tmp_path_factory):
    from backend.geometry.mesh import Mesh, save_glb
    from backend.geometry.primitives import uv_sphere

    v, f, uv = uv_sphere(16, 8, radius=0.4)
    tex = np.full((32, 32, 4), 200, np.uint8)
    path = tmp_path_factory.mktemp("mesh") / "textured.glb"
    save_glb(Mesh(v, f.long(), uv, tex), path)
    return path


@pytest.mark.parametrize("max_t", [None, 0.25])
def test_refine_never_noises_above_max_t_and_records_every_t(tmp_path, tiny, textured_glb, max_t):
    spec = RefineSpec(mesh=str(textured_glb), prompt="a marble ball", steps=4, max_t=max_t)
    events = list(run_refine(spec, tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    steps = json.loads((tmp_path / "metrics.json").read_text())["steps"]
    t = [s["t"] for s in steps]
    assert len(t) == 4
    cap = max_t if max_t is not None else TextureSettings().refine_max_t
    assert t[0] == round(cap * 1000) and max(t) <= round(cap * 1000)  # starts at the cap, never above it
    assert max(t) <= 500  # refine refines: never above half the schedule
    assert t == sorted(t, reverse=True) and t[-1] == 212


@pytest.mark.parametrize("bad", [0.0, 1.5, float("nan"), "0.3", True])
def test_refine_max_t_is_validated(bad):
    with pytest.raises(InvalidInputError) as err:
        RefineSpec(mesh="m.glb", prompt="x", max_t=bad).validate(("tiny",))
    assert err.value.field == "max_t"

