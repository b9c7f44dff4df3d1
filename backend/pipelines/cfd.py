"""Values the 3D stages take from Consistent Flow Distillation's ``configs/cfd/`` (the configs
appendix F.1's 2- and 3-stage pipelines ran), shared by the stages that cite them."""

from __future__ import annotations

from backend.render.camera import OrbitSpec

# data.*_range of every configs/cfd/sd-*.yaml: the random cameras of CFD's SD stages, in the frame
# of the [-1, 1] isosurface grid (``geometry.radius: 1.0``), which is also ours.
CFD_CAMERAS = OrbitSpec(elevation=(0.0, 40.0), azimuth=(-180.0, 180.0), distance=(1.5, 1.8), fov_y=(60.0, 70.0))

# CFD's SDS loss is ``sum((x - (x - g))^2) / B`` (``reduction: l2``), whose gradient is 2g; ours
# (guidance.distillation_loss) has gradient g. A CFD ``lambda_*`` is therefore half as large here.
CFD_LOSS_SCALE = 0.5

# configs/cfd/sd-nerf-stage2.yaml data.*_range: the 2-stage pipeline's second (NeRF) stage
CFD_NERF_CAMERAS = OrbitSpec(elevation=(0.0, 40.0), azimuth=(-180.0, 180.0), distance=(1.5, 1.8), fov_y=(55.0, 65.0))
