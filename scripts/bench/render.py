#!/usr/bin/env python
"""Rasterizer cost: rasterize + interpolate (normals) + backward to positions and attributes,
for 10k / 50k / 200k faces at 256^2 and 512^2 on the torch backend, and nvdiffrast vs torch
on the same scenes where CUDA is present.

    .venv/bin/python scripts/bench/render.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from backend.geometry.primitives import uv_sphere  # noqa: E402
from backend.render.camera import OrbitSpec, to_clip  # noqa: E402
from backend.render.ops import Backend, RasterContext, interpolate, nvdiffrast_available, rasterize  # noqa: E402


def scene(faces: int, res: int, device):
    seg = int(math.sqrt(faces / 2)) * 2
    verts, tri, _ = uv_sphere(seg, faces // (2 * seg) + 1, radius=0.6, bumps=0.05)
    cams = OrbitSpec(width=res, height=res, fov_y=(50.0, 50.0), distance=(1.8, 1.8)).turntable(1)
    return verts.to(device), tri.to(device), cams


def time_one(ctx, verts, tri, cams, res, repeats, sync) -> float:
    def run():
        v = verts.clone().requires_grad_(True)
        pos = to_clip(v, cams)
        rast = rasterize(ctx, pos, tri, (res, res))
        attr = interpolate(ctx, v, rast, tri)
        (attr.square().sum() + rast[..., :3].sum()).backward()

    run()  # warm-up (and nvdiffrast's JIT)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    backends = [("torch_cpu", RasterContext("cpu", Backend.TORCH), "cpu")]
    if cuda:
        backends.append(("torch_cuda", RasterContext("cuda", Backend.TORCH), "cuda"))
        if nvdiffrast_available():
            backends.append(("nvdiffrast", RasterContext("cuda", Backend.NVDIFFRAST), "cuda"))
    print(f"threads {torch.get_num_threads()}; rasterize + interpolate + backward, ms per view")
    print(f"{'faces':>8} {'res':>5} " + " ".join(f"{name:>12}" for name, _, _ in backends))
    results = {}
    for faces in (10_000, 50_000, 200_000):
        for res in (256, 512):
            row = []
            for name, ctx, device in backends:
                verts, tri, cams = scene(faces, res, device)
                ms = time_one(ctx, verts, tri, cams, res, args.repeats, sync if device == "cuda" else (lambda: None))
                results[(name, faces, res)] = ms
                row.append(f"{ms:12.1f}")
            print(f"{faces:>8} {res:>5} " + " ".join(row), flush=True)
    line = f"torch_cpu_50k_256={results[('torch_cpu', 50_000, 256)]:.0f}ms"
    if ("nvdiffrast", 50_000, 256) in results:
        line += f" nvdiffrast_speedup={results[('torch_cuda', 50_000, 256)] / results[('nvdiffrast', 50_000, 256)]:.1f}x"
    print(line)


if __name__ == "__main__":
    main()
