"""scripts/gpu/check, the one command for a lent GPU machine, runs every section on tiny CPU shapes
(--cpu-smoke), so it works the day a GPU is there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "pytest_gpu", "models", "image2d", "texture", "geometry", "step_cost", "step_cost_mv",
            "half_precision", "render", "nerf")
OPTIONAL_BENCHES = {"half_precision"}  # may be "missing" while scripts/bench/half_precision.py is not written


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, psd3d_home):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PSD3D_CHECK_START", "PYTHONPATH")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PSD3D_HOME=psd3d_home,
               PSD3D_GPU_SITE=str(out / "site"), TMPDIR=str(out))
    proc = subprocess.run([str(REPO / "scripts" / "gpu" / "check"), "--cpu-smoke", str(out / "report")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    path = out / "report" / "report.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text()), out / "report"


@pytest.mark.slow
def test_cpu_smoke_runs_every_section_with_numbers(smoke_report):
    proc, report, _ = smoke_report
    assert report["mode"] == "cpu-smoke"
    assert tuple(report["sections"]) == SECTIONS
    for name, sec in report["sections"].items():
        if name in OPTIONAL_BENCHES and sec["status"] == "missing":
            assert "not in this checkout" in sec["note"]
            continue
        assert sec["status"] == "ok", f"{name}: {sec['status']}\n{sec['error']}"
        assert sec["numbers"], name
        assert all(isinstance(v, (int, float)) for v in sec["numbers"].values()), (name, sec["numbers"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_cpu_smoke_times_each_pipeline_and_parses_the_benches(smoke_report):
    _, report, out = smoke_report
    sections = report["sections"]
    for name in ("image2d", "texture", "geometry"):
        numbers = sections[name]["numbers"]
        assert numbers["steps"] == 2 and numbers["s_per_step"] > 0 and numbers["peak_rss_gib"] > 0, (name, numbers)
    assert sections["texture"]["numbers"]["faces"] == 2000
    assert sections["geometry"]["numbers"]["grid"] == 16
    assert {"psd_k1/sds", "psd_k5/sds", "dreamdpo/sds"} <= set(sections["step_cost"]["numbers"])
    # the multi-view case (MVDream, 4 views per object) and the NeRF render + backward per view
    assert {"psd_k1/sds", "psd_k2/sds", "psd_k5/sds", "dreamdpo/sds"} <= set(sections["step_cost_mv"]["numbers"])
    assert sections["step_cost_mv"]["info"]["last_line"].startswith("mvdream-tiny:")
    assert "mvdream-tiny" in sections["step_cost_mv"]["info"]["command"]
    assert all(sections["step_cost_mv"]["numbers"][k] > 0 for k in ("psd_k1/sds", "dreamdpo/sds"))
    nerf = sections["nerf"]["numbers"]
    assert nerf["nerf_cpu_8_ms"] > 0 and nerf["nerf_cpu_16_ms"] > 0, nerf
    assert (out / "step_cost_mv.log").is_file()
    assert sections["pytest_gpu"]["numbers"]["failed"] == 0
    assert (out / "report.md").read_text().startswith("# psd3d GPU check: cpu-smoke")
    assert (out / "step_cost.log").is_file()
    # minutes per prop for every recipe, from these numbers (the tiny preset's step counts here)
    assert set(report["estimates"]["tiny"]) == {"sd-dmtet", "mvdream", "mvdream-nerf", "mvdream-dmtet"}
    assert all(m["total"] >= 0 for m in report["estimates"]["tiny"].values())
    assert "Estimated minutes per prop, tiny" in (out / "report.md").read_text()


def test_time_per_prop_is_steps_times_the_measured_step_costs():
    """scripts/gpu/estimate.py: each stage's full step count times its measured s/step (the NeRF
    stages: the 2D step per object plus the volume renders of its views)."""
    sys.path.insert(0, str(REPO / "scripts" / "gpu"))
    from estimate import recipe_minutes

    from backend.pipelines.presets import get_preset
    from protocol.specs import RECIPE_STAGES

    numbers = {"image2d": {"s_per_step": 0.2}, "geometry": {"s_per_step": 0.3}, "texture": {"s_per_step": 0.4},
               "nerf": {"nerf_cuda_64_ms": 10.0, "nerf_cuda_256_ms": 40.0}}
    paper = get_preset("sd21-paper")
    got = recipe_minutes(paper, numbers, RECIPE_STAGES)
    assert got["sd-dmtet"]["geometry"] == round(paper.geometry.steps * 0.3 / 60, 1)
    assert got["sd-dmtet"]["texture"] == round(paper.texture.steps * 0.4 / 60, 1)
    # mvdream-sd21.yaml: 5000 steps of 2 objects at 64^2, 5000 of 1 at 256^2, 4 views each
    nerf_s = 5000 * 2 * (0.2 + 4 * 0.010) + 5000 * 1 * (0.2 + 4 * 0.040)
    assert got["mvdream"] == {"nerf": round(nerf_s / 60, 1), "total": round(nerf_s / 60, 1)}
    refine_s = 20_000 * (0.2 + 0.040 * 4)  # 512^2 renders: 4x the 256^2 pixels
    assert got["mvdream-nerf"]["nerf-refine"] == round(refine_s / 60, 1)
    assert got["mvdream-dmtet"]["total"] == round((nerf_s + paper.geometry.steps * 0.3 + paper.texture.steps * 0.4) / 60, 1)
