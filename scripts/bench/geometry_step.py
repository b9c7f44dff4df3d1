#!/usr/bin/env python
"""Cost of one geometry-stage step (DMTet, 3-stage pipeline) and where it goes.

Runs the real :class:`~backend.pipelines.geometry_stage.GeometryStage` (the stage's own
settings, with the grid, render and prior sizes below) on the tiny preset's models, on a CPU
with the torch rasterizer, one view. Each part of the step is timed by wrapping the function the
stage calls (marching tets, rasterize, shade, VAE encode, the distiller's UNet/reward step, the
regularisers, ``Tensor.backward``, Adam); the rest of ``update`` is "other". The tiny prior is
far cheaper than SD 2.1, so on a real run the prior's share is larger: this bench is about the
geometry side (grid, marching, rasterizer, regularisers). The last line is the median step.

    .venv/bin/python scripts/bench/geometry_step.py            # grid 128, 256^2
    .venv/bin/python scripts/bench/geometry_step.py --grid 64 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from backend.geometry.dmtet import TetGrid, sphere_sdf  # noqa: E402
from backend.geometry.sdf import sdf_sign_entropy  # noqa: E402
from backend.pipelines import geometry_stage  # noqa: E402
from backend.pipelines.geometry_stage import GeometrySettings, GeometryStage  # noqa: E402

PROMPT = "a ceramic teapot"
NEGATIVE = "low quality"
# The parts of a step, each the module-level functions of geometry_stage that make it up (names
# that the stage does not import are skipped, so the bench follows the stage as it changes).
PARTS = {
    "marching tets": ("marching_tets",),
    "rasterize": ("rasterize_views",),
    "shade": ("render_normals", "render_lambertian"),
    "regularisers": ("normal_consistency", "laplacian_smoothness", "mesh_edges", "sdf_sign_entropy"),
}


class StepTimer:
    """Accumulates wall time per part while a step runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
        return timed


def build_stage(args, out: Path) -> GeometryStage:
    from backend.models import load_models, quiet_libraries
    from backend.pipelines.presets import TINY_MODELS

    quiet_libraries()
    models = load_models(TINY_MODELS, device=torch.device("cpu"), dtype=torch.float32)
    settings = replace(GeometrySettings(), grid_resolution=args.grid, render_size=args.render_size,
                       prior_size=args.prior_size, views=1)
    if args.sdf_sign_weight is not None:
        settings = replace(settings, sdf_sign_weight=args.sdf_sign_weight)
    start = time.perf_counter()
    grid = TetGrid.cube(settings.grid_resolution)
    sdf0 = sphere_sdf(grid.vertices, settings.primitive_radius)
    n0 = models.prior.encode_text([NEGATIVE])
    stage = GeometryStage(models, PROMPT, n0, sdf0, grid, settings, seed=0, out_dir=out, to_world=lambda v: v)
    _ = stage.grid.edges  # built once with the grid, as the first step would
    print(f"set-up: grid {args.grid} ({grid.tets.shape[0]:,} tets, {stage.grid.edges.shape[0]:,} edges) "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"settings: render {settings.render_size}^2 -> prior {settings.prior_size}^2, {settings.views} view, "
          f"normal_consistency {settings.normal_consistency_weight:g}, laplacian {getattr(settings, 'laplacian_weight', 0):g}, "
          f"sdf_sign {settings.sdf_sign_weight:g}")
    return stage


def instrument(stage: GeometryStage, timer: StepTimer) -> None:
    for part, names in PARTS.items():
        for name in names:
            if hasattr(geometry_stage, name):
                setattr(geometry_stage, name, timer.wrap(part, getattr(geometry_stage, name)))
    prior = stage.models.prior
    prior.encode_images = timer.wrap("prior: VAE encode", prior.encode_images)
    stage.distiller.step = timer.wrap("prior: UNet + guidance", stage.distiller.step)
    stage.optimizer.step = timer.wrap("adam", stage.optimizer.step)
    torch.Tensor.backward = timer.wrap("backward", torch.Tensor.backward)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--render-size", type=int, default=256)
    ap.add_argument("--prior-size", type=int, default=64, help="the tiny preset's; the VAE encodes this size")
    ap.add_argument("--steps", type=int, default=5, help="timed steps, after --warmup")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sdf-sign-weight", type=float, default=None, help="default: the stage's setting")
    args = ap.parse_args()
    os.environ.setdefault("PSD3D_HOME", tempfile.mkdtemp(prefix="psd3d_bench_"))
    print(f"threads {torch.get_num_threads()}; PSD3D_HOME {os.environ['PSD3D_HOME']}")
    with tempfile.TemporaryDirectory() as out:
        stage = build_stage(args, Path(out))
        timer = StepTimer()
        instrument(stage, timer)
        totals, parts = [], []
        for i in range(args.warmup + args.steps):
            timer.seconds.clear()
            start = time.perf_counter()
            _, _, extra = stage.update(total=15000)
            stage.step += 1
            if i >= args.warmup:
                totals.append(time.perf_counter() - start)
                parts.append(dict(timer.seconds))
        faces = extra["faces"]
        # sdf_sign_entropy on the whole grid, forward + backward, whether or not the stage uses it
        sdf = stage.sdf.detach().clone().requires_grad_(True)
        reg = []
        for _ in range(5):
            start = time.perf_counter()
            sdf_sign_entropy(sdf, stage.grid.edges).backward()
            reg.append(time.perf_counter() - start)

    names = list(dict.fromkeys(name for p in parts for name in p))
    step = statistics.median(totals)
    print(f"\none step, median of {len(totals)} ({faces:,} faces), seconds:")
    rows = [(name, statistics.median(p.get(name, 0.0) for p in parts)) for name in names]
    rows.append(("other", step - sum(s for _, s in rows)))
    for name, s in rows:
        print(f"  {name:<24} {s:8.3f}  {100 * s / step:5.1f}%")
    print(f"  {'(sdf_sign_entropy alone, fwd + bwd)':<24} {statistics.median(reg):8.3f}")
    print(f"geometry_step_s_grid{args.grid}={step:.2f}")


if __name__ == "__main__":
    main()
