"""Time per prop, estimated from one GPU check's per-step numbers and a preset's step counts
(issue 14 item 8). A recipe's time is the sum over its stages of steps x seconds per step:

* ``geometry``, ``texture``: the check's own stage sections (s/step at the paper's sizes).
* ``nerf`` (MVDream's stage): per object, the prior's step is taken as the 2D experiment's step
  (image2d, one 64^2 latent: the same SD 2.1-sized UNet over the same 4096 latent pixels as four
  32^2 views), plus the volume render + backward of its 4 views at the stage's render size
  (the nerf section's ms at 64^2 and 256^2).
* ``nerf-refine``: the 2D step (a 512^2 render is one 64^2 latent) plus one 512^2 volume render,
  scaled from 256^2 by pixel count.

An estimate, not a measurement: snapshots, checkpoints and the bake add a few percent; the
check's 20-step runs leave the first step out."""

from __future__ import annotations


def _nerf_ms(nerf: dict, size: int) -> float:
    """Volume render + backward of one view at ``size``^2, from the nerf section's measured sizes:
    the nearest measured size at or above it, else the largest scaled by pixel count."""
    measured = sorted((int(k.split("_")[2]), float(v)) for k, v in nerf.items()
                      if k.startswith("nerf_") and k.endswith("_ms"))
    if not measured:
        raise KeyError("nerf: no nerf_<device>_<size>_ms numbers")
    for res, ms in measured:
        if res >= size:
            return ms
    res, ms = measured[-1]
    return ms * (size / res) ** 2


def stage_seconds(preset, numbers: dict[str, dict]) -> dict[str, float]:
    """Seconds each stage of ``preset`` takes (its full step count), from a check's section numbers
    ``{section: {key: value}}``."""
    image2d = float(numbers["image2d"]["s_per_step"])
    out = {"geometry": preset.geometry.steps * float(numbers["geometry"]["s_per_step"]),
           "texture": preset.texture.steps * float(numbers["texture"]["s_per_step"])}
    single = preset.single
    switch = int(single.size_switch * single.steps)
    views = getattr(single.cameras, "views", 1)
    total = 0.0
    for steps, size, objects in ((switch, single.render_sizes[0], single.objects[0]),
                                 (single.steps - switch, single.render_sizes[1], single.objects[1])):
        total += steps * objects * (image2d + views * _nerf_ms(numbers["nerf"], size) / 1000)
    out["nerf"] = total
    refine = preset.nerf_refine
    out["nerf-refine"] = refine.steps * refine.objects[1] * (image2d + _nerf_ms(numbers["nerf"], refine.render_sizes[1]) / 1000)
    return out


def recipe_minutes(preset, numbers: dict[str, dict], recipes: dict[str, tuple[str, ...]]) -> dict[str, dict[str, float]]:
    """``{recipe: {stage: minutes, ..., "total": minutes}}`` for every recipe whose stages were measured."""
    per_stage = stage_seconds(preset, numbers)
    out = {}
    for recipe, stages in recipes.items():
        minutes = {stage: round(per_stage[stage] / 60, 1) for stage in stages}
        minutes["total"] = round(sum(per_stage[stage] for stage in stages) / 60, 1)
        out[recipe] = minutes
    return out
