"""Generate a prop through the add-on in headless Blender (the `bpy` module) against a running
backend, then render it with Cycles: what an artist sees, as a picture.

    .venv/bin/psd3d serve &                              # the backend (tiny preset works on a CPU)
    .venv/bin/python scripts/blender_demo.py --prompt "a red teapot" --out docs/img/blender_tiny_generate.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bpy
import addon_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="a red teapot")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=0, help="0: the preset's")
    ap.add_argument("--server", default="tcp://127.0.0.1:5557")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("out/blender_demo.png"))
    args = ap.parse_args()

    bpy.ops.wm.read_factory_settings(use_empty=False)
    bpy.data.objects.remove(bpy.data.objects["Cube"])
    addon_utils.enable("blender_addon", default_set=True)
    prefs = bpy.context.preferences.addons["blender_addon"].preferences
    prefs.address, prefs.results_dir = args.server, str(args.out.resolve().parent / "psd3d_results")
    from blender_addon.blender import operators, pump

    s = bpy.context.scene.psd3d
    s.prompt, s.preset, s.steps = args.prompt, args.preset, args.steps
    bpy.ops.psd3d.generate()
    t0, shown = time.monotonic(), None
    while not (len(s.jobs) and not s.jobs[0].active):
        if operators.messages():
            print(operators.messages()[-1], file=sys.stderr)
            return 2
        pump.pump(0.05)
        if len(s.jobs) and (s.jobs[0].stage, s.jobs[0].step) != shown:
            shown = (s.jobs[0].stage, s.jobs[0].step)
            print(f"\r{s.jobs[0].state} {shown[0]} {shown[1]}/{s.jobs[0].total}  ", end="", file=sys.stderr)
    item = s.jobs[0]
    print(f"\n{item.state} in {time.monotonic() - t0:.0f} s, reward {item.reward:.4f}", file=sys.stderr)
    while item.state == "done" and not item.results_dir and not operators.messages():
        pump.pump(0.05)  # the job's files (GLB, preview, reward curve, metrics) come next
    print(f"results in {item.results_dir}", file=sys.stderr)
    scene = bpy.context.scene
    cam = bpy.data.objects["Camera"]
    cam.location, cam.rotation_euler = (2.0, -2.0, 1.5), (1.1, 0.0, 0.785)
    bpy.data.objects["Light"].location = (2.0, -1.0, 3.0)
    scene.world.color = (0.05, 0.05, 0.06)
    scene.render.engine, scene.cycles.device, scene.cycles.samples = "CYCLES", "CPU", args.samples
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 640, 480, 100
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scene.render.filepath = str(args.out.resolve())
    bpy.ops.render.render(write_still=True)
    print(f"rendered {args.out}", file=sys.stderr)
    return 0 if item.state == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
