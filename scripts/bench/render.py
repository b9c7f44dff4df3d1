#!/usr/bin/env python
"""Rasterizer cost per view: rasterize + interpolate (a colour per vertex) + antialias + backward
to positions and attributes, for 10k / 50k / 200k faces at 256^2 and 512^2.

Columns: the torch backend on the CPU with antialias (``torch_cpu``) and without it
(``cpu_no_aa``, what antialias adds); where CUDA is present, the torch backend on the GPU and
nvdiffrast, timed in interleaved rounds (one call of each per round, so drift in clocks or
load hits both alike), and their ratio. Each cell is the median over the rounds, in ms.
Then the NeRF coarse stage (backend/render/volume.py over backend/geometry/nerf.py's field at its
mvdream-sd21 defaults, occupancy grid as threestudio keeps one): render + backward of one view at
64^2 and 256^2, the two resolutions of the single-stage schedule, on the CPU (and CUDA when
present), interleaved rounds, median ms, printed as ``nerf_cpu_64=<ms>ms nerf_cpu_256=<ms>ms``
(``nerf_cuda_*`` with a GPU) before the summary.
The last line is the summary that issues quote:
``torch_cpu_50k_256=<ms>ms`` and, with a GPU, ``torch_vs_nvdiffrast=<torch_cuda / nvdiffrast at 50k, 512^2>x``.

    .venv/bin/python scripts/bench/render.py [--rounds 7] [--faces 50000] [--res 256] [--nerf-rounds 3] [--nerf-res 64 256]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from backend.geometry.nerf import NerfConfig, NerfField  # noqa: E402
from backend.geometry.primitives import uv_sphere  # noqa: E402
from backend.render.camera import OrbitSpec, to_clip  # noqa: E402
from backend.render.ops import (Backend, RasterContext, RasterizerUnavailableError, antialias, interpolate,  # noqa: E402
                                rasterize)
from backend.render.volume import OccupancyGrid, VolumeRenderConfig, render_volume  # noqa: E402


def scene(faces: int, res: int, device):
    seg = int(math.sqrt(faces / 2)) * 2
    verts, tri, _ = uv_sphere(seg, faces // (2 * seg) + 1, radius=0.6, bumps=0.05)
    cams = OrbitSpec(width=res, height=res, fov_y=(50.0, 50.0), distance=(1.8, 1.8)).turntable(1)
    colours = torch.rand(verts.shape[0], 3, generator=torch.Generator().manual_seed(0))
    return verts.to(device), tri.to(device), colours.to(device), cams


def step(ctx, verts, tri, colours, cams, res, with_antialias: bool) -> None:
    """One differentiable render and its backward, as a distillation step does it."""
    v = verts.clone().requires_grad_(True)
    c = colours.clone().requires_grad_(True)
    pos = to_clip(v, cams)
    rast = rasterize(ctx, pos, tri, (res, res))
    image = interpolate(ctx, c, rast, tri)
    if with_antialias:
        image = antialias(ctx, image, rast, pos, tri)
    (image.square().sum() + rast[..., :3].sum()).backward()


def nerf_scene(res: int, device):
    """The field at step 0 (threestudio's blob init), its occupancy grid, one camera at the
    single-stage rig's middle (fov 37.5 deg, distance 0.9 / tan(fov / 2), elevation 15 deg)."""
    torch.manual_seed(0)
    field = NerfField(NerfConfig(), device)
    config = VolumeRenderConfig()
    grid = OccupancyGrid(config.radius).to(device)
    grid.update(field.density, 0, config.step_size, torch.Generator().manual_seed(0))
    fov = 37.5
    cams = OrbitSpec(width=res, height=res, fov_y=(fov, fov), distance=(0.9 / math.tan(math.radians(fov / 2)),) * 2
                     ).turntable(1, elevation=15.0)
    return field, config, grid, cams


def nerf_step(field, config, grid, cams, device) -> None:
    """One volume render and its backward, as a coarse-stage step does it (no normals: mvdream-sd21)."""
    field.zero_grad(set_to_none=True)
    out = render_volume(field, cams, config, occupancy=grid, generator=torch.Generator().manual_seed(0), device=device)
    out.rgb.square().mean().backward()


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def bench(runs: dict, rounds: int) -> dict:
    """runs: name -> (callable, sync). One warm-up each (nvdiffrast's JIT, allocator), then
    ``rounds`` rounds calling each once in turn; the median per name, in ms."""
    for fn, sync in runs.values():
        timed(fn, sync)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (fn, sync) in runs.items():
            times[name].append(timed(fn, sync))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--faces", type=int, nargs="*", default=[10_000, 50_000, 200_000])
    ap.add_argument("--res", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--nerf-rounds", type=int, default=3, help="rounds for the NeRF rows (one 256^2 call takes about two minutes on 2 busy CPU cores)")
    ap.add_argument("--nerf-res", type=int, nargs="*", default=[64, 256])
    args = ap.parse_args()
    cpu_sync = lambda: None  # noqa: E731
    contexts = {"torch_cpu": RasterContext("cpu", Backend.TORCH)}
    cuda = torch.cuda.is_available()
    if cuda:
        contexts["torch_cuda"] = RasterContext("cuda", Backend.TORCH)
        try:
            contexts["nvdiffrast"] = RasterContext("cuda", Backend.NVDIFFRAST)
        except RasterizerUnavailableError as err:
            print(f"nvdiffrast: {err.message}")
    columns = ["torch_cpu", "cpu_no_aa"] + [n for n in ("torch_cuda", "nvdiffrast") if n in contexts]
    if "nvdiffrast" in contexts:
        columns.append("ratio")
    device_name = torch.cuda.get_device_name() if cuda else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads (load average {load:.1f}: CPU timings "
          f"need an idle machine), {device_name}; rasterize + interpolate + antialias + backward, median ms per view")
    print(f"{'faces':>8} {'res':>5} " + " ".join(f"{c:>11}" for c in columns))
    results = {}
    for faces in args.faces:
        for res in args.res:
            cpu_scene = scene(faces, res, "cpu")
            row = bench({
                "torch_cpu": (lambda: step(contexts["torch_cpu"], *cpu_scene, res, True), cpu_sync),
                "cpu_no_aa": (lambda: step(contexts["torch_cpu"], *cpu_scene, res, False), cpu_sync),
            }, args.rounds)
            if cuda:
                gpu_scene = scene(faces, res, "cuda")
                row.update(bench({name: (lambda ctx=contexts[name]: step(ctx, *gpu_scene, res, True), torch.cuda.synchronize)
                                  for name in ("torch_cuda", "nvdiffrast") if name in contexts}, args.rounds))
            if "nvdiffrast" in row:
                row["ratio"] = row["torch_cuda"] / row["nvdiffrast"]
            results[(faces, res)] = row
            print(f"{faces:>8} {res:>5} " + " ".join(f"{row[c]:>11.2f}" for c in columns), flush=True)
    nerf_devices = ["cpu"] + (["cuda"] if cuda else [])
    nerf_runs = {}
    for device in nerf_devices:
        sync = torch.cuda.synchronize if device == "cuda" else cpu_sync
        for res in args.nerf_res:
            scene_ = nerf_scene(res, device)
            nerf_runs[f"nerf_{device}_{res}"] = (lambda s=scene_, d=device: nerf_step(*s, d), sync)
    if nerf_runs:
        print("NeRF (hash grid 16 levels, 512 samples per ray): volume render + backward, one view, median ms")
        print(" ".join(f"{name}={ms:.0f}ms" for name, ms in bench(nerf_runs, args.nerf_rounds).items()), flush=True)
    summary = []
    if (50_000, 256) in results:
        summary.append(f"torch_cpu_50k_256={results[(50_000, 256)]['torch_cpu']:.0f}ms")
    if (50_000, 512) in results and "ratio" in results[(50_000, 512)]:
        summary.append(f"torch_vs_nvdiffrast={results[(50_000, 512)]['ratio']:.2f}x")
    print(" ".join(summary) if summary else "no 50k-face row measured")


if __name__ == "__main__":
    main()
