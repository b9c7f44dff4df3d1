"""generate and refine on the tiny preset, end to end: GLB validity, frames, UVs, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.events import Done, Failed, MeshSnapshot, Progress, TextureSnapshot
from protocol.specs import GenerateSpec, RefineSpec
from backend.geometry.mesh import Mesh, load_mesh, save_glb
from backend.geometry.primitives import uv_sphere
from backend.pipelines.mesh3d import run_generate, run_refine


@pytest.fixture(scope="module")
def asymmetric_glb(tmp_path_factory):
    """An off-centre, stretched sphere with UVs and a gradient texture of an odd size."""
    v, f, uv = uv_sphere(24, 12, radius=0.3)
    v = v * torch.tensor([2.0, 1.0, 1.0]) + torch.tensor([3.0, 1.0, -2.0])
    tex = np.zeros((32, 48, 4), np.uint8)
    tex[..., 0] = np.arange(48)[None] * 5
    tex[..., 1] = np.arange(32)[:, None] * 7
    tex[..., 3] = 255
    folder = tmp_path_factory.mktemp("meshes")
    save_glb(Mesh(v, f.long(), uv, tex), folder / "asym.glb")
    save_glb(Mesh(v, f.long()), folder / "asym_nouv.glb")
    return folder


def trimesh_check(path: Path):
    import trimesh

    scene = trimesh.load(path)
    geom = list(scene.geometry.values())[0]
    assert isinstance(geom.visual, trimesh.visual.TextureVisuals)
    assert geom.visual.uv is not None and geom.visual.material.baseColorTexture is not None
    return geom


def test_refine_keeps_frame_uvs_and_starts_from_the_input(tmp_path, tiny, asymmetric_glb):
    src = load_mesh(asymmetric_glb / "asym.glb")
    events = list(run_refine(RefineSpec(mesh=str(asymmetric_glb / "asym.glb"), prompt="a striped rugby ball", steps=3),
                             tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    first_tex = next(e for e in events if isinstance(e, TextureSnapshot))
    assert first_tex.step == 0 and np.array_equal(first_tex.image, src.texture)  # step 0 = the input texture
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3]
    out = load_mesh(tmp_path / "out.glb")
    assert torch.equal(out.uvs, src.uvs)  # byte-equal UVs, same face order
    torch.testing.assert_close(out.positions[out.faces], src.positions[src.faces], rtol=0, atol=0)  # its own frame
    assert out.texture.shape == src.texture.shape
    trimesh_check(tmp_path / "out.glb")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["steps"]) == 3 and "unseen_pickscore" in metrics["final"]
    assert (tmp_path / "preview.png").is_file() and (tmp_path / "reward_curve.png").is_file()


def test_refine_unwraps_a_mesh_without_uvs(tmp_path, tiny, asymmetric_glb):
    events = list(run_refine(RefineSpec(mesh=str(asymmetric_glb / "asym_nouv.glb"), prompt="a stone", steps=2), tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    geom = trimesh_check(tmp_path / "out.glb")
    src = load_mesh(asymmetric_glb / "asym_nouv.glb")
    np.testing.assert_allclose(geom.bounds, np.stack([src.positions.numpy().min(0), src.positions.numpy().max(0)]), atol=1e-6)
    assert json.loads((tmp_path / "unwrap.json").read_text())["faces_out"] > 0


def test_resume_gives_the_same_texture(tmp_path, tiny, asymmetric_glb, stop_after):
    spec = RefineSpec(mesh=str(asymmetric_glb / "asym.glb"), prompt="a rugby ball", steps=8, seed=3)
    done = list(run_refine(spec, tmp_path / "straight", models=tiny))[-1]
    assert isinstance(done, Done)
    partial = list(run_refine(spec, tmp_path / "resumed", models=tiny, should_stop=stop_after(6)))
    assert not any(isinstance(e, Progress) and e.step > 6 for e in partial)
    resumed = list(run_refine(spec, tmp_path / "resumed", models=tiny, resume=True))
    steps = [e.step for e in resumed if isinstance(e, Progress)]
    assert steps == [5, 6, 7, 8]  # continued from the checkpoint at step 4
    a = load_mesh(tmp_path / "straight" / "out.glb").texture
    b = load_mesh(tmp_path / "resumed" / "out.glb").texture
    assert np.array_equal(a, b)


def test_generate_streams_mesh_then_texture_and_writes_a_textured_glb(tmp_path, tiny):
    events = list(run_generate(GenerateSpec(prompt="a ceramic teapot", steps=4, seed=1), tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert stages == ["geometry"] * 4 + ["texture"] * 4
    meshes = [e for e in events if isinstance(e, MeshSnapshot)]
    assert meshes and meshes[-1].uvs is not None and meshes[-1].faces.dtype == np.int32
    assert any(isinstance(e, TextureSnapshot) for e in events)
    geom = trimesh_check(tmp_path / "out.glb")
    assert len(geom.faces) > 100
    assert np.all(np.abs(geom.bounds) < 1.0)  # the unit frame when no init mesh is given


# polls of should_stop: one before each step, one between the 3-stage recipe's coarse and DMTet stages
@pytest.mark.parametrize("recipe,polls,stage", [("sd-dmtet", 2, "geometry"), ("sd-dmtet", 6, "texture"),
                                                ("mvdream-dmtet", 2, "nerf"), ("mvdream-dmtet", 7, "geometry"),
                                                ("mvdream-dmtet", 11, "texture")],
                         ids=["in-geometry", "in-texture", "3-stage-in-nerf", "3-stage-in-geometry", "3-stage-in-texture"])
def test_stop_and_keep_streams_exactly_the_kept_result(tmp_path, tiny, recipe, polls, stage, stop_after):
    """Stopped in any stage of any recipe, the last mesh and texture snapshots are out.glb (no black
    prop, nothing behind); meshes stream through every stage, one topology id per set of faces."""
    events = list(run_generate(GenerateSpec(prompt="a teapot", recipe=recipe, steps=4, seed=1), tmp_path, models=tiny,
                               should_stop=stop_after(polls)))
    assert isinstance(events[-1], Done), events[-1]
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].stage == stage and progress[-1].step == 2
    ran, planned = [e.stage for e in progress], GenerateSpec(prompt="a", recipe=recipe).stages
    assert sorted(set(ran), key=planned.index) == list(planned[:planned.index(stage) + 1])  # every stage up to it
    snapshots = [e for e in events if isinstance(e, MeshSnapshot)]
    ids = [e.topology_id for e in snapshots]
    assert ids == sorted(ids)  # a new set of faces gets a new id; the add-on moves vertices within one
    for a, b in zip(snapshots, snapshots[1:]):
        if a.topology_id == b.topology_id:
            assert np.array_equal(a.faces, b.faces)
    last_mesh = max(i for i, e in enumerate(events) if isinstance(e, MeshSnapshot))
    last_texture = max(i for i, e in enumerate(events) if isinstance(e, TextureSnapshot))
    assert last_texture > last_mesh  # the kept mesh is textured after it arrives
    mesh, texture = events[last_mesh], events[last_texture]
    out = load_mesh(tmp_path / "out.glb")
    assert np.array_equal(texture.image, out.texture)
    assert mesh.faces.shape[0] == out.faces.shape[0]
    np.testing.assert_allclose(mesh.positions[mesh.faces], out.positions[out.faces].numpy(), atol=1e-6)


def test_the_preview_frames_the_whole_object(tmp_path, tiny):
    """A cube's corners reach furthest from its centre: no view of the turntable may cut them off."""
    import trimesh

    box = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
    v = torch.from_numpy(np.asarray(box.vertices, np.float32))
    f = torch.from_numpy(np.asarray(box.faces, np.int64))
    uv = torch.full((f.shape[0], 3, 2), 0.5)
    save_glb(Mesh(v, f, uv, np.full((8, 8, 4), 40, np.uint8)), tmp_path / "cube.glb")
    done = list(run_refine(RefineSpec(mesh=str(tmp_path / "cube.glb"), prompt="a dark crate", steps=1), tmp_path / "out",
                           models=tiny))[-1]
    assert isinstance(done, Done), done
    from PIL import Image

    strip = np.asarray(Image.open(tmp_path / "out" / "preview.png").convert("RGB")).astype(int)
    h, w = strip.shape[:2]
    views = [strip[:, i * h:(i + 1) * h] for i in range(w // h)]
    assert len(views) == 8
    for view in views:
        border = np.concatenate([view[0], view[-1], view[:, 0], view[:, -1]])
        assert (border.min(axis=1) > 200).all()  # only the white background on every edge
        assert (view.max(axis=2) < 150).mean() > 0.1  # and the crate is in the picture


def test_generate_from_a_blocked_out_mesh_stays_in_its_frame(tmp_path, tiny, asymmetric_glb):
    events = list(run_generate(GenerateSpec(prompt="a rugby ball", steps=2, init_mesh=str(asymmetric_glb / "asym_nouv.glb")),
                               tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    geom = trimesh_check(tmp_path / "out.glb")
    centre = geom.bounds.mean(0)
    np.testing.assert_allclose(centre, [3.0, 1.0, -2.0], atol=0.15)
    extent = geom.bounds[1] - geom.bounds[0]
    assert extent[0] > 1.5 * extent[1]  # still stretched along x like the block-out


@pytest.mark.parametrize("make,field", [
    (lambda d: RefineSpec(mesh=str(d / "missing.glb"), prompt="x"), "mesh"),
    (lambda d: RefineSpec(mesh=str(d / "asym.glb"), prompt=""), "prompt"),
    (lambda d: GenerateSpec(prompt="a cat", init_mesh=str(d / "missing.obj")), "init_mesh"),
    (lambda d: RefineSpec(mesh=str(d / "broken.glb"), prompt="x"), "mesh"),
])
def test_bad_input_names_the_field(tmp_path, tiny, asymmetric_glb, make, field):
    (asymmetric_glb / "broken.glb").write_bytes(b"glTF not really")
    spec = make(asymmetric_glb)
    run = run_refine if isinstance(spec, RefineSpec) else run_generate
    events = list(run(spec, tmp_path, models=tiny))
    assert len(events) == 1 and isinstance(events[0], Failed), events
    assert events[0].field == field


def test_eval_script_plumbing(tmp_path, tiny, psd3d_home):
    """scripts/eval.py on two prompts with the tiny preset: a table and a CSV, labelled as plumbing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_script", Path(__file__).parents[1] / "scripts" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red chair\na blue lamp\n")
    assert module.main(["--preset", "tiny", "--prompts", str(prompts), "--steps", "2", "--methods", "psd",
                        "--recipe", "mvdream", "--out", str(tmp_path / "eval")]) == 0
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "PLUMBING CHECK" in table and "| psd |" in table and "pipeline mvdream" in table
    rows = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert rows[0] == "method,prompt,hpsv2.1,pickscore" and len(rows) == 3


def test_degenerate_faces_are_removed_with_a_warning(tmp_path, tiny):
    v, f, uv = uv_sphere(12, 6, radius=0.4)
    f = torch.cat([f.long(), torch.tensor([[0, 0, 1], [2, 3, 2]])])
    uv = torch.cat([uv, torch.zeros(2, 3, 2)])
    tex = np.full((16, 16, 4), 200, np.uint8)
    save_glb(Mesh(v, f, uv, tex), tmp_path / "degenerate.glb")
    events = list(run_refine(RefineSpec(mesh=str(tmp_path / "degenerate.glb"), prompt="a ball", steps=1), tmp_path / "job",
                             models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    assert any("degenerate" in w for w in events[-1].final["warnings"])
    assert len(load_mesh(tmp_path / "job" / "out.glb").faces) == len(f) - 2


def test_pickscore_as_the_target_reward(tmp_path, tiny, asymmetric_glb):
    events = list(run_refine(RefineSpec(mesh=str(asymmetric_glb / "asym.glb"), prompt="a ball", steps=1, reward="pickscore"),
                             tmp_path, models=tiny))
    final = events[-1].final
    assert final["target_reward_name"] == "pickscore" and "unseen_hpsv2.1" in final
    bad = list(run_refine(RefineSpec(mesh=str(asymmetric_glb / "asym.glb"), prompt="a ball", reward="imagereward"),
                          tmp_path / "bad", models=tiny))
    assert isinstance(bad[0], Failed) and bad[0].field == "reward"


def test_generate_resume_matches_an_uninterrupted_run(tmp_path, tiny, stop_after):
    spec = GenerateSpec(prompt="a mug", steps=6, seed=2)
    straight = list(run_generate(spec, tmp_path / "a", models=tiny))[-1]
    assert isinstance(straight, Done)
    # stop in the texture stage, after its checkpoint at step 4 (6 geometry steps, then 5 texture steps)
    list(run_generate(spec, tmp_path / "b", models=tiny, should_stop=stop_after(6 + 5)))
    resumed = list(run_generate(spec, tmp_path / "b", models=tiny, resume=True))
    assert [e.step for e in resumed if isinstance(e, Progress)] == [5, 6]  # geometry done, texture from step 4
    assert np.array_equal(load_mesh(tmp_path / "a" / "out.glb").texture, load_mesh(tmp_path / "b" / "out.glb").texture)
    assert torch.equal(load_mesh(tmp_path / "a" / "out.glb").positions, load_mesh(tmp_path / "b" / "out.glb").positions)


def test_refine_with_the_artists_own_cameras(tmp_path, tiny, asymmetric_glb):
    from backend.render.camera import look_at, rig_from_spec, to_clip

    centre = torch.tensor([3.0, 1.0, -2.0])
    eyes = [centre + torch.tensor(d) for d in ([0.0, 0.3, 2.0], [2.0, 0.5, 0.0], [0.0, 0.2, -2.0])]
    rig = {"matrices": [look_at(e.tolist(), centre.tolist()).reshape(-1).tolist() for e in eyes], "fov_y": [50.0] * 3}
    # in the unit frame, each camera still looks at the object's centre
    src = load_mesh(asymmetric_glb / "asym.glb")
    from backend.geometry.mesh import Normalisation

    norm = Normalisation.fit(src.positions.numpy().astype(np.float64))
    cams = rig_from_spec(rig, tuple(norm.centre), norm.scale).cameras
    ndc = to_clip(torch.zeros(1, 3), list(cams))
    torch.testing.assert_close(ndc[:, 0, :2] / ndc[:, 0, 3:], torch.zeros(3, 2), atol=0.02, rtol=0)
    assert [c.azimuth for c in cams][0] == pytest.approx(0.0, abs=1e-3)
    events = list(run_refine(RefineSpec(mesh=str(asymmetric_glb / "asym.glb"), prompt="a ball", steps=2, cameras=rig),
                             tmp_path, models=tiny))
    assert isinstance(events[-1], Done), events[-1]
    bad = dict(rig, matrices=[rig["matrices"][0][:15]] + rig["matrices"][1:])
    failed = list(run_refine(RefineSpec(mesh=str(asymmetric_glb / "asym.glb"), prompt="a ball", cameras=bad), tmp_path / "bad",
                             models=tiny))
    assert isinstance(failed[0], Failed) and failed[0].field == "cameras.matrices[0]"
