"""generate --recipe mvdream (the paper's single stage, Table 1) on the tiny twins, end to end:
NeRF on MVDream's four views, streamed meshes, a baked textured GLB, Stop & Keep, resume."""

import json

import numpy as np
import pytest
import torch

from protocol.errors import InvalidInputError
from protocol.events import Done, MeshSnapshot, Progress, TextureSnapshot
from protocol.specs import GenerateSpec
from backend.geometry.mesh import load_mesh
from backend.pipelines.mesh3d import run_generate
from backend.pipelines.nerf_stage import SD_NERF_STAGE2, NerfSettings
from backend.pipelines.presets import PRESETS


@pytest.mark.parametrize("method", ["psd", "sds", "dreamdpo"])
def test_single_stage_streams_meshes_and_ends_in_a_textured_glb(tmp_path, tiny, method):
    steps = 4 if method == "psd" else 2
    events = list(run_generate(GenerateSpec(prompt="a wooden chair", recipe="mvdream", method=method, steps=steps, seed=3),
                               tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.stage for e in progress] == ["nerf"] * steps
    meshes = [e for e in events if isinstance(e, MeshSnapshot)]
    assert len(meshes) >= 2 and meshes[0].uvs is None and meshes[-1].uvs is not None  # streamed, then the baked one
    last_texture = max(i for i, e in enumerate(events) if isinstance(e, TextureSnapshot))
    assert last_texture > max(i for i, e in enumerate(events) if isinstance(e, MeshSnapshot))
    out = load_mesh(tmp_path / "out.glb")
    assert out.uvs is not None and out.texture is not None and out.faces.shape[0] > 100
    assert np.abs(out.positions.numpy()).max() <= 1.0 + 1e-5  # inside the NeRF's box, the DMTet grid's frame
    assert np.array_equal(events[last_texture].image, out.texture)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["steps"]] == ["nerf"] * steps
    if method == "psd":
        assert all(s["reward_w"] is not None for s in metrics["steps"])
        n = torch.load(tmp_path / "negative_embedding.pt", weights_only=True)
        assert n["updates"] == steps  # appendix F.1: n learns at every step of the single stage
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["recipe"] == "mvdream" and spec["guidance"]["guidance_scale"] == 51.0


def test_stop_and_keep_gives_a_textured_mesh(tmp_path, tiny, stop_after):
    events = list(run_generate(GenerateSpec(prompt="a lamp", recipe="mvdream", steps=6, seed=1), tmp_path, models=tiny,
                               should_stop=stop_after(2)))
    assert isinstance(events[-1], Done), events[-1]
    assert events[-1].final["steps_done"] == 2
    out = load_mesh(tmp_path / "out.glb")
    assert out.texture is not None and out.uvs is not None


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny, stop_after):
    spec = GenerateSpec(prompt="a mug", recipe="mvdream", steps=6, seed=2)
    straight = list(run_generate(spec, tmp_path / "a", models=tiny))[-1]
    assert isinstance(straight, Done)
    # stopped after step 3 (before the periodic checkpoint at 4): the stage saves its state when it stops
    list(run_generate(spec, tmp_path / "b", models=tiny, should_stop=stop_after(3)))
    resumed = list(run_generate(spec, tmp_path / "b", models=tiny, resume=True))
    assert [e.step for e in resumed if isinstance(e, Progress)] == [4, 5, 6]
    a, b = load_mesh(tmp_path / "a" / "out.glb"), load_mesh(tmp_path / "b" / "out.glb")
    assert torch.equal(a.positions, b.positions) and np.array_equal(a.texture, b.texture)


def test_an_unknown_recipe_is_refused_naming_the_field():
    GenerateSpec(prompt="a cup", recipe="mvdream", init_mesh="block.glb").validate(tuple(PRESETS))  # a block-out starts any recipe
    with pytest.raises(InvalidInputError) as err:
        GenerateSpec(prompt="a cup", recipe="nerf").validate(tuple(PRESETS))
    assert err.value.field == "recipe"


def test_paper_settings_come_from_mvdream_sd21_yaml():
    s = PRESETS["sd21-paper"].single
    assert s == NerfSettings() and PRESETS["sd21-paper"].nerf_refine == SD_NERF_STAGE2
    assert s.steps == 10000 and s.render_sizes == (64, 256) and s.objects == (2, 1) and s.prior_size == 256
    assert s.guidance.guidance_scale == 51.0 and s.negative.lr == 1e-4
    assert (s.render_size(4999, 10000), s.render_size(5000, 10000)) == (64, 256)
    assert s.orient_weight(0, 10000) == 10.0 and s.orient_weight(2500, 10000) == pytest.approx(505.0)
    assert s.orient_weight(9000, 10000) == 1000.0
    gen = torch.Generator().manual_seed(0)
    first = s.schedule.sample(0, 10000, 4, 1000, gen)
    assert first.tolist() == [980] * 4  # min and max both start at 0.98
    late = torch.stack([s.schedule.sample(9000, 10000, 1, 1000, gen) for _ in range(200)])
    assert 20 <= int(late.min()) and int(late.max()) <= 500  # [0.02, 0.50] after 8000 of 10000 steps
    # one t per step, shared by every view of every object (multiview_diffusion_guidance.py: t of shape [1])
    assert all(len(set(s.schedule.sample(k, 10000, 8, 1000, gen).tolist())) == 1 for k in range(0, 10000, 500))
    # loss.lambda_sparsity / lambda_opaque: 0.; no shading (appendix F.1), so the albedo is what MVDream sees
    assert (s.sparsity, s.opaque, s.shading) == (0.0, 0.0, None)


def test_shading_sparsity_and_opaque_options_reach_the_nerf_step(tmp_path, tiny, monkeypatch):
    """-shading.yaml's Lambertian material and mvdream.py's sparsity / opaque terms, off in the paper's
    settings, are options of the stage: a point light per view (one perturbation per object) reaches the
    renderer, both terms reach the loss, and the shading draws come back from the checkpoint."""
    from dataclasses import replace

    from backend.models import load_multiview
    from backend.pipelines import nerf_stage as ns
    from backend.render.volume import PointLight, ShadingSchedule

    settings = replace(PRESETS["tiny"].single, sparsity=0.5, opaque=0.25,
                       shading=ShadingSchedule(ambient_only_steps=0, diffuse_prob=1.0))
    prior = load_multiview(PRESETS["tiny"].models, device=tiny.prior.device, dtype=tiny.prior.dtype)
    n0 = prior.encode_text(["blurry"])
    seen = {"sparsity": 0, "opaque": 0}
    real_render, real_sparsity, real_opaque = ns.render_volume, ns.sparsity_loss, ns.opaque_loss

    def render(*args, **kwargs):
        seen["light"] = kwargs["light"]
        return real_render(*args, **kwargs)

    def counted(name, fn):
        def wrapped(opacity):
            seen[name] += 1
            return fn(opacity)
        return wrapped

    monkeypatch.setattr(ns, "render_volume", render)
    monkeypatch.setattr(ns, "sparsity_loss", counted("sparsity", real_sparsity))
    monkeypatch.setattr(ns, "opaque_loss", counted("opaque", real_opaque))
    stage = ns.NerfStage(tiny, prior, "a mug", n0, settings, settings.guidance, 3, tmp_path, lambda p: p)
    stage.update(settings.steps)
    light = seen["light"]
    assert isinstance(light, PointLight) and light.positions.shape == (4, 3)  # one object x 4 views
    assert seen["sparsity"] == 1 and seen["opaque"] == 1
    stage.save_checkpoint()
    draws = [stage.shading_rng.random() for _ in range(3)]
    again = ns.NerfStage(tiny, prior, "a mug", n0, settings, settings.guidance, 4, tmp_path, lambda p: p)
    assert again.load_checkpoint() and [again.shading_rng.random() for _ in range(3)] == draws


def test_three_stage_pipeline_runs_nerf_then_dmtet_then_texture(tmp_path, tiny):
    events = list(run_generate(GenerateSpec(prompt="a teapot", recipe="mvdream-dmtet", steps=2, seed=4), tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    assert [e.stage for e in events if isinstance(e, Progress)] == ["nerf"] * 2 + ["geometry"] * 2 + ["texture"] * 2
    out = load_mesh(tmp_path / "out.glb")
    assert out.uvs is not None and out.texture is not None
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["recipe"] == "mvdream-dmtet"


def test_stop_in_the_coarse_stage_of_three_keeps_the_baked_nerf(tmp_path, tiny, stop_after):
    events = list(run_generate(GenerateSpec(prompt="a teapot", recipe="mvdream-dmtet", steps=4, seed=4), tmp_path,
                               models=tiny, should_stop=stop_after(2)))
    assert isinstance(events[-1], Done), events[-1]
    assert {e.stage for e in events if isinstance(e, Progress)} == {"nerf"}
    assert load_mesh(tmp_path / "out.glb").texture is not None


def test_two_stage_pipeline_refines_the_mvdream_nerf_on_sd(tmp_path, tiny):
    events = list(run_generate(GenerateSpec(prompt="a vase", recipe="mvdream-nerf", steps=2, seed=5), tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    assert [e.stage for e in events if isinstance(e, Progress)] == ["nerf"] * 2 + ["nerf-refine"] * 2
    out = load_mesh(tmp_path / "out.glb")
    assert out.uvs is not None and out.texture is not None
    assert (tmp_path / "checkpoints" / "nerf.pt").is_file() and (tmp_path / "checkpoints" / "nerf-refine.pt").is_file()


def test_sd_nerf_stage2_settings_and_the_decaying_negative_rate():
    from backend.psd.negative import NegativeEmbedding

    s = SD_NERF_STAGE2
    assert (s.steps, s.render_sizes, s.guidance.guidance_scale) == (20_000, (512, 512), 71.0)
    assert (s.z_variance, s.normal_smooth) == (5.0, 500.0)  # CFD's 10 and 1000, halved (CFD_LOSS_SCALE)
    n = NegativeEmbedding(torch.zeros(1, 2, 3), s.negative)
    assert [n.lr_at(k) for k in (0, 500, 1000, 5000)] == [1e-4, 5e-5, 0.0, 0.0]


def test_stage_labels_name_the_stage_and_its_number():
    from protocol.specs import RECIPE_STAGES, RECIPES, job_stages, stage_label, stage_position

    assert set(RECIPES) == set(RECIPE_STAGES)
    three = job_stages("mvdream-dmtet")
    assert stage_label(three, "geometry") == "stage 2 of 3: geometry"
    assert stage_label(job_stages("mvdream"), "nerf") == "nerf" and stage_label((), "texture") == "texture"
    assert stage_position(job_stages(None), "texture") == (2, 2) and stage_position(job_stages("sd-dmtet"), "nerf") is None
    # a block-out skips mvdream-dmtet's coarse stage: geometry is then stage 1 of 2, unless sent through it
    skipped = GenerateSpec(prompt="a", recipe="mvdream-dmtet", init_mesh="b.glb").stages
    assert skipped == ("geometry", "texture") and stage_label(skipped, "geometry") == "stage 1 of 2: geometry"
    through = GenerateSpec(prompt="a", recipe="mvdream-dmtet", init_mesh="b.glb", init_mesh_through_coarse=True)
    assert through.stages == three and GenerateSpec(prompt="a", recipe="mvdream-nerf", init_mesh="b.glb").stages == \
        ("nerf", "nerf-refine")


@pytest.fixture(scope="module")
def block_out(tmp_path_factory):
    """An off-centre, stretched sphere: a block-out in its own frame."""
    from backend.geometry.mesh import Mesh, save_glb
    from backend.geometry.primitives import uv_sphere

    v, f, _ = uv_sphere(24, 12, radius=0.3)
    v = v * torch.tensor([2.0, 1.0, 1.0]) + torch.tensor([3.0, 1.0, -2.0])
    path = tmp_path_factory.mktemp("blockout") / "block.glb"
    save_glb(Mesh(v, f.long()), path)
    return path


def test_the_nerf_starts_from_the_block_out_and_the_result_keeps_its_frame(tmp_path, tiny, block_out):
    events = list(run_generate(GenerateSpec(prompt="a rugby ball", recipe="mvdream", steps=2, seed=1,
                                            init_mesh=str(block_out)), tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    assert events[-1].final["init_fit_error"] < 0.1
    out = load_mesh(tmp_path / "out.glb").positions
    lo, hi = out.amin(0), out.amax(0)
    # the block-out spans x 2.4..3.6, y 0.7..1.3, z -2.3..-1.7: the result sits there, at its size
    assert torch.allclose((lo + hi) / 2, torch.tensor([3.0, 1.0, -2.0]), atol=0.15)
    assert 0.9 < float(hi[0] - lo[0]) < 1.5 and float(hi[1] - lo[1]) < 0.9


def test_mvdream_dmtet_skips_its_coarse_stage_for_a_block_out_unless_asked(tmp_path, tiny, block_out):
    for through, stages in ((False, ["geometry", "texture"]), (True, ["nerf", "geometry", "texture"])):
        spec = GenerateSpec(prompt="a rugby ball", recipe="mvdream-dmtet", steps=1, seed=1, init_mesh=str(block_out),
                            init_mesh_through_coarse=through)
        events = list(run_generate(spec, tmp_path / str(through), models=tiny))
        assert isinstance(events[-1], Done), events[-1]
        assert [e.stage for e in events if isinstance(e, Progress)] == stages == list(spec.stages)
    with pytest.raises(InvalidInputError) as err:
        GenerateSpec(prompt="a", recipe="mvdream", init_mesh="b.glb", init_mesh_through_coarse=True).validate(tuple(PRESETS))
    assert err.value.field == "init_mesh_through_coarse"


def test_the_sd_nerf_stage_noises_with_integral_noise_through_the_surface_it_renders(tmp_path, tiny):
    """sd-nerf-stage2.yaml's noise_generator in the 2-stage pipeline's second stage: the first noising
    of each step is Eq. 17's sample at the points the rays' expected depths land on; the noise key
    comes back from the checkpoint (so a resumed stage draws the same field)."""
    from backend.pipelines import nerf_stage as ns
    from backend.pipelines.nerf_stage import NerfStage, volume_surface_points

    settings = PRESETS["tiny"].nerf_refine
    assert settings.integral_noise is not None and NerfSettings().integral_noise is None  # MVDream's stage: none
    n0 = tiny.prior.encode_text(["blurry"])

    def stage(seed):
        return NerfStage(tiny, tiny.prior, "a mug", n0, settings, settings.guidance, seed, tmp_path, lambda p: p)

    first = stage(4)
    seen = {}
    real_sample, real_step = first.noise.sample, first.distiller.step

    def sample(points, mask, hw):
        seen["points"], seen["mask"], seen["sample"] = points, mask, real_sample(points, mask, hw)
        return seen["sample"]

    def step(*args, **kwargs):
        seen["noise"] = kwargs["noise"]
        return real_step(*args, **kwargs)

    first.noise.sample, first.distiller.step = sample, step
    first.update(settings.steps)
    assert seen["noise"] is not None and torch.equal(seen["noise"], seen["sample"])
    assert seen["noise"].shape == (1, 4, 8, 8)
    # the blob the field starts as (density_blob_std 0.5): the masked points lie near its surface
    radius = seen["points"][seen["mask"]].norm(dim=-1)
    assert seen["mask"].float().mean() > 0.05 and float(radius.max()) < 0.6

    first.save_checkpoint()
    second = stage(5)
    assert second.noise.key != first.noise.key
    assert second.load_checkpoint() and second.noise.key == first.noise.key
