"""The two 3D pipelines, as event generators (DESIGN.md "Pipelines").

``run_refine``: the artist's mesh is the fixed geometry; its UVs are kept (xatlas unwraps it
when it has none) and its texture is the start; only the texture stage runs.
``run_generate``: DMTet from a primitive or a blocked-out mesh -> geometry stage (SDS on
normal / shaded renders) -> extract -> unwrap -> texture stage (PSD) -> export.
Both optimise in a unit frame and write every result back in the input's own frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from protocol.errors import Psd3dError
from protocol.events import Event, Failed, MeshSnapshot, TextureSnapshot
from protocol.specs import GenerateSpec, RefineSpec
from backend.files import atomic_torch_save, atomic_write_json
from backend.geometry.dmtet import TetGrid, ellipsoid_sdf, sphere_sdf
from backend.geometry.mesh import Mesh, Normalisation, load_mesh, repair
from backend.geometry.nerf import dmtet_from_field, fit_field_to_mesh
from backend.geometry.sdf import mesh_sdf
from backend.geometry.uv import unwrap
from backend.models import LoadedModels, load_models, load_multiview
from backend.pipelines.common import internal_failure
from backend.pipelines.geometry_stage import GeometryStage, Primitive
from backend.outputs import config_to_json
from backend.pipelines.results import finish, mesh_snapshot_arrays
from backend.pipelines.nerf_stage import NerfStage
from backend.pipelines.texture_stage import TextureStage
from backend.pipelines.presets import PRESETS, Preset, get_preset, with_overrides
from backend.render.camera import rig_from_spec
from backend.render.ops import Backend, RasterContext
from backend.psd.distill import Method
from backend.psd.negative import DEFAULT_NEGATIVE_DESCRIPTORS, NegativeEmbedding


def _guarded(run, out_dir: Path) -> Iterator[Event]:
    try:
        yield from run
    except Psd3dError as exc:
        yield Failed(exc.code, exc.message, exc.field)
    except Exception as exc:  # a bug, not bad input
        yield internal_failure(exc, out_dir)


def run_refine(spec: RefineSpec, out_dir: str | Path, models: LoadedModels | None = None,
               should_stop: Callable[[], bool] = lambda: False, resume: bool = False) -> Iterator[Event]:
    """Yield events; ``resume`` continues from the job folder's last checkpoint."""
    yield from _guarded(_refine(spec, Path(out_dir), models, should_stop, resume), Path(out_dir))


def run_generate(spec: GenerateSpec, out_dir: str | Path, models: LoadedModels | None = None,
                 should_stop: Callable[[], bool] = lambda: False, resume: bool = False) -> Iterator[Event]:
    yield from _guarded(_generate(spec, Path(out_dir), models, should_stop, resume), Path(out_dir))


def _prepare(spec, out: Path, models: LoadedModels | None) -> tuple[Preset, LoadedModels, torch.Tensor, RasterContext]:
    """Shared checks and set-up: spec, preset, models, prompt, the initial negative embedding, the rasterizer."""
    spec.validate(tuple(PRESETS))
    preset = get_preset(spec.preset)
    models = (models or load_models(preset.models)).with_target(spec.reward)
    prior = models.prior
    prior.check_prompt(spec.prompt, "prompt")
    negative_prompt = spec.negative_prompt if spec.negative_prompt is not None else DEFAULT_NEGATIVE_DESCRIPTORS
    if spec.negative_embedding:
        n0 = NegativeEmbedding.load_tensor(spec.negative_embedding, (1, prior.tokenizer.model_max_length,
                                                                     prior.text_encoder.config.hidden_size))
    else:
        if negative_prompt.strip():
            prior.check_prompt(negative_prompt, "negative_prompt")
        n0 = prior.encode_text([negative_prompt], field="negative_prompt")
    ctx = RasterContext(prior.device, Backend(spec.rasterizer) if spec.rasterizer else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    return preset, models, n0.to(prior.device), ctx


def _texture_guidance(preset: Preset, spec):
    return with_overrides(preset.texture.guidance, method=Method(spec.method), guidance_scale=spec.guidance_scale,
                          reward_scale=spec.reward_scale, interval=spec.interval)


def _refine(spec: RefineSpec, out: Path, models, should_stop, resume) -> Iterator[Event]:
    preset, models, n0, ctx = _prepare(spec, out, models)
    mesh, warnings = repair(load_mesh(spec.mesh, "mesh"), "mesh")
    if mesh.uvs is None:
        mesh, report = unwrap(mesh, max_faces=None)  # the artist's geometry is kept as it is
        atomic_write_json(out / "unwrap.json", report.__dict__)
        warnings.append(f"mesh: had no UVs; unwrapped with xatlas in {report.unwrap_s:.1f} s")
    norm = Normalisation.fit(mesh.positions.numpy().astype(np.float64))
    unit = Mesh(torch.from_numpy(norm.to_unit(mesh.positions.numpy().astype(np.float64)).astype(np.float32)),
                mesh.faces, mesh.uvs, mesh.texture)
    guidance = _texture_guidance(preset, spec)
    total = spec.steps or preset.texture.steps
    atomic_write_json(out / "spec.json", {"pipeline": "refine", "spec": spec.to_dict(), "texture_steps": total,
                                          "guidance": config_to_json(guidance)})
    rig = rig_from_spec(spec.cameras, tuple(norm.centre), norm.scale)
    # refine refines: a textured mesh is never noised above max_t; a mesh without a texture
    # is textured from blank (the stage's blank schedule)
    schedule = None
    if mesh.texture is not None:
        schedule = preset.texture.schedule.capped(spec.max_t if spec.max_t is not None else preset.texture.refine_max_t)
    else:
        warnings.append("mesh: has no texture; refine paints one from blank (full noise range)")
    stage = TextureStage(models, unit, spec.prompt, n0, preset.texture, guidance, spec.seed, out, rig, schedule=schedule,
                         ctx=ctx)
    if resume:
        stage.load_checkpoint()
    stage.log.final["warnings"] = warnings
    pos, faces, uvs = mesh_snapshot_arrays(mesh)
    yield MeshSnapshot(stage.step, pos, faces, uvs, mesh.topology_id)
    yield TextureSnapshot(stage.step, stage.texture_rgba())
    yield from stage.run(total, should_stop, shown=stage.step)
    yield finish(stage, Mesh(mesh.positions, mesh.faces, mesh.uvs), spec.prompt, out, f"refine {spec.method}: {spec.prompt}")


@dataclass
class BlockOut:
    """An artist's block-out in the unit optimisation frame, and the frame it came in."""

    norm: Normalisation
    positions: torch.Tensor  # (V,3) unit frame
    faces: torch.Tensor
    warnings: list[str]


def _block_out(spec: GenerateSpec) -> BlockOut | None:
    if not spec.init_mesh:
        return None
    block, warnings = repair(load_mesh(spec.init_mesh, "init_mesh"), "init_mesh")
    norm = Normalisation.fit(block.positions.numpy().astype(np.float64))
    unit = torch.from_numpy(norm.to_unit(block.positions.numpy().astype(np.float64)).astype(np.float32))
    return BlockOut(norm, unit, block.faces, warnings)


def _generate(spec: GenerateSpec, out: Path, models, should_stop, resume) -> Iterator[Event]:
    if spec.recipe in ("mvdream", "mvdream-nerf"):
        yield from _generate_nerf(spec, out, models, should_stop, resume)
        return
    preset, models, n0, ctx = _prepare(spec, out, models)
    geo = preset.geometry
    grid = TetGrid.cube(geo.grid_resolution)
    block = _block_out(spec)
    topology_id = 0  # the last streamed mesh's id
    # Table 2's 3-stage pipeline: MVDream NeRF -> DMTet geometry -> texture; a block-out skips the
    # coarse stage unless the spec sends it through
    if "nerf" in spec.stages:
        atomic_write_json(out / "spec.json", {"pipeline": "generate", "recipe": spec.recipe, "spec": spec.to_dict()})
        coarse = yield from _coarse_stage(spec, out, preset, models, n0, should_stop, resume, block)
        if should_stop():  # Stop & Keep in the coarse stage keeps the NeRF's result
            yield from _finish_coarse(spec, out, preset, models, n0, ctx, coarse, block)
            return
        grid, sdf0 = dmtet_from_field(coarse.field, geo.grid_resolution, coarse.surface_level())
        norm, warnings = (Normalisation(), []) if block is None else (block.norm, block.warnings)
        topology_id = coarse.topology_id
    elif block is not None:
        norm, warnings = block.norm, block.warnings
        sdf0 = mesh_sdf(grid.vertices, block.positions, block.faces)
    else:
        norm, warnings = Normalisation(), []
        radius = geo.primitive_radius
        sdf0 = sphere_sdf(grid.vertices, radius) if geo.primitive is Primitive.SPHERE else \
            ellipsoid_sdf(grid.vertices, (radius, radius * 0.8, radius * 0.6))
    geo_steps = spec.steps or geo.steps
    tex_steps = spec.steps or preset.texture.steps
    guidance = _texture_guidance(preset, spec)
    atomic_write_json(out / "spec.json", {"pipeline": "generate", "recipe": spec.recipe, "spec": spec.to_dict(),
                                          "geometry_steps": geo_steps, "texture_steps": tex_steps,
                                          "guidance": config_to_json(guidance)})
    to_world = norm.to_world
    geometry = GeometryStage(models, spec.prompt, n0, sdf0, grid, geo, spec.seed, out, to_world, ctx)
    geometry.topology_id = topology_id  # the coarse stage's meshes came first: ids keep rising
    if resume:
        geometry.load_checkpoint()
    yield from geometry.run(geo_steps, should_stop)
    geometry.save_checkpoint()  # a resumed job skips the finished geometry stage
    unwrapped = out / "checkpoints" / "unwrapped.pt"
    saved = torch.load(unwrapped, weights_only=True) if resume and unwrapped.is_file() else None
    if saved is not None and int(saved["geometry_step"]) == geometry.step:  # the layout of this very geometry
        world = Mesh(saved["positions"], saved["faces"], saved["uvs"])
    else:
        with torch.no_grad():
            verts, faces = geometry.extract()
        world = Mesh(torch.from_numpy(to_world(verts.cpu().numpy().astype(np.float64)).astype(np.float32)), faces.cpu())
        world, report = unwrap(world)
        atomic_write_json(out / "unwrap.json", report.__dict__)
        atomic_torch_save({"positions": world.positions, "faces": world.faces, "uvs": world.uvs,
                           "geometry_step": torch.tensor(geometry.step)}, unwrapped)
    unit = Mesh(torch.from_numpy(norm.to_unit(world.positions.numpy().astype(np.float64)).astype(np.float32)),
                world.faces, world.uvs)
    rig = rig_from_spec(spec.cameras, tuple(norm.centre), norm.scale)
    stage = TextureStage(models, unit, spec.prompt, n0, preset.texture, guidance, spec.seed, out, rig,
                         checkpoint_tag=geometry.step, ctx=ctx)
    if resume:
        stage.load_checkpoint()
    stage.log.final["warnings"] = warnings
    pos, f, uvs = mesh_snapshot_arrays(world)
    yield MeshSnapshot(geometry.step, pos, f, uvs, geometry.topology_id + 1)
    yield TextureSnapshot(stage.step, stage.texture_rgba())  # the unwrapped mesh is never shown untextured
    yield from stage.run(tex_steps, should_stop, shown=stage.step)
    yield finish(stage, world, spec.prompt, out, f"generate {spec.method}: {spec.prompt}")


def _coarse_stage(spec: GenerateSpec, out: Path, preset: Preset, models: LoadedModels, n0: torch.Tensor,
                  should_stop, resume, block: BlockOut | None = None) -> Iterator[Event]:
    """Run MVDream's single stage (NeRF) of a job; returns the stage (``yield from`` gives it back).
    Its negative embedding starts from mvdream-sd21.yaml's negative prompt unless the spec names one;
    its NeRF from the artist's block-out when there is one (else threestudio's blob)."""
    settings = preset.single
    mv_prior = load_multiview(preset.models, device=models.prior.device, dtype=models.prior.dtype)
    if spec.negative_prompt is None and not spec.negative_embedding:
        n0 = mv_prior.encode_text([settings.negative_prompt], field="negative_prompt")
    guidance = with_overrides(settings.guidance, method=Method(spec.method), guidance_scale=spec.guidance_scale,
                              reward_scale=spec.reward_scale, interval=spec.interval)
    total = spec.steps or settings.steps
    norm = Normalisation() if block is None else block.norm
    stage = NerfStage(models, mv_prior, spec.prompt, n0, settings, guidance, spec.seed, out, norm.to_world)
    if not (resume and stage.load_checkpoint()) and block is not None:
        stage.log.final["init_fit_error"] = fit_field_to_mesh(stage.field, block.positions.to(stage.device),
                                                              block.faces.to(stage.device), settings.init_fit_steps,
                                                              seed=spec.seed)
    yield from stage.run(total, should_stop)
    stage.save_checkpoint()  # a resumed job skips a finished coarse stage
    return stage


def _finish_coarse(spec: GenerateSpec, out: Path, preset: Preset, models: LoadedModels, n0: torch.Tensor, ctx,
                   stage: NerfStage, block: BlockOut | None = None) -> Iterator[Event]:
    """The NeRF as the job's result: its surface, unwrapped, with the albedo baked, in the
    block-out's frame when the job started from one."""
    baked = stage.textured_mesh()  # the NeRF's frame is the optimisation frame
    norm = Normalisation() if block is None else block.norm
    if block is not None:
        stage.log.final["warnings"] = block.warnings
    # the baked result is rendered (turntable, rewards) by a texture stage that takes no steps
    viewer = TextureStage(models, baked, spec.prompt, n0, preset.texture, _texture_guidance(preset, spec), spec.seed,
                          out, rig_from_spec(spec.cameras, tuple(norm.centre), norm.scale), ctx=ctx)
    world = Mesh(torch.from_numpy(norm.to_world(baked.positions.numpy().astype(np.float64)).astype(np.float32)),
                 baked.faces, baked.uvs)
    pos, faces, uvs = mesh_snapshot_arrays(world)
    yield MeshSnapshot(stage.step, pos, faces, uvs, stage.topology_id + 1)
    yield TextureSnapshot(stage.step, viewer.texture_rgba())
    yield finish(viewer, world, spec.prompt, out, f"generate {spec.recipe} {spec.method}: {spec.prompt}", source=stage)


def _generate_nerf(spec: GenerateSpec, out: Path, models, should_stop, resume) -> Iterator[Event]:
    """The paper's single stage (Table 1, recipe mvdream): NeRF on MVDream; with recipe
    mvdream-nerf, Table 2's 2-stage pipeline: that NeRF refined on SD 2.1 (CFD's sd-nerf-stage2).
    The result: the surface at density 25 with the albedo baked into a UV texture."""
    preset, models, n0, ctx = _prepare(spec, out, models)
    atomic_write_json(out / "spec.json", {"pipeline": "generate", "recipe": spec.recipe, "spec": spec.to_dict(),
                                          "nerf_steps": spec.steps or preset.single.steps,
                                          "guidance": config_to_json(preset.single.guidance)})
    block = _block_out(spec)
    stage = yield from _coarse_stage(spec, out, preset, models, n0, should_stop, resume, block)
    if spec.recipe == "mvdream-nerf" and not should_stop():
        settings = preset.nerf_refine
        if spec.negative_prompt is None and not spec.negative_embedding:
            n0 = models.prior.encode_text([settings.negative_prompt], field="negative_prompt")
        guidance = with_overrides(settings.guidance, method=Method(spec.method), guidance_scale=spec.guidance_scale,
                                  reward_scale=spec.reward_scale, interval=spec.interval)
        refine = NerfStage(models, models.prior, spec.prompt, n0, settings, guidance, spec.seed, out,
                           stage.to_world, start=stage)
        if resume:
            refine.load_checkpoint()
        yield from refine.run(spec.steps or settings.steps, should_stop)
        refine.save_checkpoint()
        stage = refine
    yield from _finish_coarse(spec, out, preset, models, n0, ctx, stage, block)
