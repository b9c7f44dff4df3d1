#!/usr/bin/env python
"""One command checks psd3d on a lent GPU machine: tests, pipelines at the paper's sizes, benches.

Proposed README section ("On a lent GPU machine"):

    The GPU machines this project borrows are bare (Python 3.12 with their own torch and CUDA,
    transformers, timm, numpy 2; no diffusers, open_clip, pyzmq, trimesh, xatlas or nvdiffrast) and
    offline, and take at most 64 MiB with a call. Prepare here, run one command there:

        scripts/gpu/prepare          # here: the missing wheels into .wheels/ (~32 MiB, ignored by git)
        scripts/gpu/check OUT        # there (carry .wheels): report.md + report.json in OUT, <= 8 min on an H100
        scripts/gpu/check --cpu-smoke OUT   # anywhere: the same code paths on tiny shapes (tests/test_gpu_check.py)

    `check` installs only the wheels whose distributions the machine lacks (never replacing its
    own torch, transformers, ...) into a temporary folder on PYTHONPATH, puts the project on
    PYTHONPATH too, and then runs these sections, each on its own time budget; a failure is
    recorded with its traceback and the next section runs:

    | section | what |
    |---|---|
    | environment | GPU, torch/CUDA, nvcc, the versions of every package the project imports |
    | pytest_gpu | nvdiffrast's JIT build (timed), then `pytest -m gpu` on the test files that have gpu tests (nvdiffrast vs the torch rasterizer) |
    | models | random weights of the real sizes: SD 2.1 base UNet/VAE/text encoder and TAESD in fp16, open_clip ViT-H-14 (fp32, as load_models loads rewards) |
    | image2d | 20 steps of the 2D experiment at 64x64 latents (s/step, peak GPU memory) |
    | texture | 20 steps of refine's texture stage: 50k faces, 1024^2 texture, renders 1024 -> 512 |
    | geometry | 20 steps of the DMTet geometry stage, grid 128, renders 1024 -> 512 |
    | step_cost | scripts/bench/step_cost.py --shape sd21-shape: PSD k=1,2,5 and DreamDPO per SDS step |
    | step_cost_mv | scripts/bench/step_cost.py --shape mvdream-shape --latent 32 64: the same on MVDream (1 object x 4 views) |
    | half_precision | scripts/bench/half_precision.py --shape sd21-shape --device cuda |
    | render | scripts/bench/render.py: rasterizer cost, torch vs nvdiffrast (its NeRF rows are the next section) |
    | nerf | the NeRF coarse stage's volume render + backward, one view at 64^2 and 256^2 (render.py's nerf_step, on the GPU) |

    `--only texture,render` reruns some sections (environment always runs; models with any
    pipeline section). With the device tool: `run` with `carry: [".wheels"]`, command
    `scripts/gpu/check $OUT`, timeout_s 600. The subprocess sections' full output comes back
    beside the reports as <section>.log (6 logs; with the two reports 8 files, what the tool returns).

Shapes: ``gpu`` (the default; needs CUDA) uses the sizes above in half precision; ``--cpu-smoke``
uses the tiny preset's models and settings, 2 steps each, a 2000-face mesh and grid 16, fp32;
mvdream-tiny at 8x8 latents; NeRF renders at 8^2 and 16^2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from protocol.events import Failed, Progress  # noqa: E402
from protocol.specs import Image2dSpec  # noqa: E402
from backend.geometry.dmtet import TetGrid, sphere_sdf  # noqa: E402
from backend.geometry.mesh import Mesh, Normalisation  # noqa: E402
from backend.geometry.primitives import uv_sphere  # noqa: E402
from backend.models import LoadedModels, load_models, quiet_libraries  # noqa: E402
from backend.pipelines.geometry_stage import GeometryStage  # noqa: E402
from backend.pipelines.image2d import run_image2d  # noqa: E402
from backend.pipelines.texture_stage import TextureStage  # noqa: E402
from backend.pipelines.presets import TINY_MODELS, get_preset  # noqa: E402
from backend.psd.negative import DEFAULT_NEGATIVE_DESCRIPTORS  # noqa: E402
from backend.render.ops import Backend, RasterContext  # noqa: E402
from protocol.specs import RECIPE_STAGES  # noqa: E402
from estimate import recipe_minutes  # noqa: E402  (scripts/gpu/estimate.py)
from step_cost import sd21_shape_models  # noqa: E402
from render import bench as render_bench, nerf_scene, nerf_step  # noqa: E402  (scripts/bench/render.py)

PROMPT = "a wooden treasure chest with iron bands"
MIN_START_S = 20.0  # a section that cannot have this much is skipped
NVDIFFRAST_BUILD_S = 240.0  # at most this much of pytest_gpu's budget for nvdiffrast's JIT build
BUILD_NVDIFFRAST = "import nvdiffrast.torch as dr; dr.RasterizeCudaContext(device='cuda'); print('nvdiffrast built')"
TAIL = 4000  # characters of a traceback or of a bench's output kept in the report
SECTIONS = ("environment", "pytest_gpu", "models", "image2d", "texture", "geometry", "step_cost", "step_cost_mv",
            "half_precision", "render", "nerf")
PIPELINES = ("image2d", "texture", "geometry")
# modules the project imports (backend, tests, benches); nvdiffrast only where there is CUDA
IMPORTS = ("diffusers", "open_clip", "transformers", "timm", "safetensors", "huggingface_hub", "ftfy", "regex",
           "zmq", "msgpack", "trimesh", "xatlas", "fast_simplification", "matplotlib", "PIL", "pytest")


@dataclass(frozen=True)
class Plan:
    """What one mode runs: sizes, steps and each section's time budget (seconds)."""

    mode: str
    deadline_s: float  # the whole check, the wheel install included
    steps: int  # per pipeline section
    preset: str  # stage settings (and the 2D experiment's resolution) come from this preset
    sphere: tuple[int, int]  # the texture stage's mesh: uv_sphere(segments, rings), 2 * s * (r - 1) faces
    texture_size: int
    render_size: int
    prior_size: int
    grid: int
    step_cost_args: tuple[str, ...]
    step_cost_mv_args: tuple[str, ...]  # the multi-view case (MVDream); one line per latent size
    half_precision_args: tuple[str, ...]
    render_args: tuple[str, ...]  # with an empty --nerf-res: the nerf section times NeRF on this plan's device
    nerf_res: tuple[int, ...]
    nerf_rounds: int
    budgets: dict = field(default_factory=dict)
    threads: int | None = None  # CPU threads, here and in the benches (None: torch's default)


GPU = Plan(
    mode="gpu", deadline_s=480, steps=20, preset="sd21-paper", sphere=(250, 101), texture_size=1024,
    render_size=1024, prior_size=512, grid=128,
    step_cost_args=("--shape", "sd21-shape", "--rounds", "10", "--latent", "64"),
    step_cost_mv_args=("--shape", "mvdream-shape", "--rounds", "5", "--no-variants", "--latent", "32", "64"),
    half_precision_args=("--shape", "sd21-shape", "--device", "cuda"),
    render_args=("--rounds", "5", "--nerf-res"),  # render.py's NeRF rows would time the CPU too (minutes at 256^2)
    nerf_res=(64, 256), nerf_rounds=3,
    # the budgets are caps; the deadline decides: a section that cannot have MIN_START_S is skipped
    budgets={"environment": 60, "pytest_gpu": 200, "models": 90, "image2d": 45, "texture": 60, "geometry": 60,
             "step_cost": 100, "step_cost_mv": 100, "half_precision": 90, "render": 90, "nerf": 40},
)
CPU_SMOKE = Plan(
    mode="cpu-smoke", deadline_s=1200, steps=2, preset="tiny", sphere=(40, 26), texture_size=64,
    render_size=64, prior_size=64, grid=16,  # deadline: for a loaded shared machine; ~2 min on 2 idle cores
    step_cost_args=("--shape", "tiny", "--rounds", "5", "--latent", "8"),
    step_cost_mv_args=("--shape", "mvdream-tiny", "--rounds", "5", "--no-variants", "--latent", "8"),
    half_precision_args=("--shape", "tiny", "--device", "cpu", "--latent", "8"),
    render_args=("--rounds", "1", "--faces", "50000", "--res", "256", "--nerf-res"),
    nerf_res=(8, 16), nerf_rounds=1,
    budgets={"environment": 60, "pytest_gpu": 120, "models": 180, "image2d": 60, "texture": 60, "geometry": 60,
             "step_cost": 300, "step_cost_mv": 300, "half_precision": 300, "render": 300, "nerf": 120},
    threads=1,  # on a shared 2-core machine, two spinning OpenMP threads per process ran the benches 6x slower
)


@dataclass
class Section:
    name: str
    status: str = "ok"  # ok | failed | missing | skipped
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    note: str = ""
    error: str = ""  # traceback tail, or a failed command's output tail


class SectionFailed(Exception):
    """A section's own verdict (a bench that exited non-zero, a pipeline's Failed event)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def tail(text: str, n: int = TAIL) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def parse_numbers(line: str) -> dict[str, float]:
    """``key=value`` pairs of a bench's last line; a unit after the number joins the key
    (``torch_cpu_50k_256=1921ms`` -> ``torch_cpu_50k_256_ms``), an ``x`` (a ratio) does not."""
    numbers = {}
    for key, value, unit in re.findall(r"([A-Za-z_][\w./-]*)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)([A-Za-z%]*)", line):
        name = key if unit in ("", "x") else f"{key}_{unit.replace('%', 'pct')}"
        numbers[name] = float(value)
    return numbers


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's summary line ("3 passed, 1 skipped in 2.1s")."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", line)]
    for count, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b", summary[-1] if summary else ""):
        counts["errors" if word.startswith("error") else word] = int(count)
    return counts


def run_command(cmd: list[str], until: float, log: Path) -> tuple[int, str, str]:
    """Run ``cmd`` in the repository in its own process group, killed (with its children, such as
    a JIT build's compilers) when ``until`` (time.monotonic) passes. Both streams go to ``log``."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=max(1.0, until - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    log.write_text(f"$ {' '.join(cmd)}\n{out}\n--- stderr ---\n{err}")
    if timed_out:
        raise SectionFailed(f"stopped at its time budget ({' '.join(cmd[1:3])})", tail(out + "\n--- stderr ---\n" + err))
    return proc.returncode, out, err


class Check:
    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.out = plan, out
        self.cuda = torch.cuda.is_available() and plan.mode == "gpu"
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.float16 if self.cuda else torch.float32
        self.started = float(os.environ.get("PSD3D_CHECK_START") or time.time())
        self.sections: dict[str, Section] = {}
        self.models: LoadedModels | None = None
        self.rasterizer: Backend | None = None  # None: RasterContext's choice (nvdiffrast on CUDA when it builds)

    # -- the runner ----------------------------------------------------------------------------
    def left(self) -> float:
        return self.started + self.plan.deadline_s - time.time()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, name: str, fn: Callable[[Section, float], None], memory: bool = False) -> Section:
        """Run one section on its budget; whatever it raises is recorded, never propagated."""
        sec = Section(name)
        left = self.left()
        budget = min(self.plan.budgets[name], left - 5)
        if budget < MIN_START_S:
            sec.status = "skipped"
            sec.note = f"out of time: {max(left, 0):.0f} s left of the check's {self.plan.deadline_s:.0f} s"
        else:
            if memory and self.cuda:
                self.sync()
                torch.cuda.reset_peak_memory_stats()
                sec.numbers["resident_gpu_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            start = time.perf_counter()
            try:
                fn(sec, time.monotonic() + budget)
            except SectionFailed as exc:
                sec.status, sec.error = "failed", str(exc) + ("\n" + exc.detail if exc.detail else "")
            except Exception:
                sec.status, sec.error = "failed", tail(traceback.format_exc())
            sec.seconds = round(time.perf_counter() - start, 2)
            if memory and self.cuda:
                sec.numbers["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                sec.numbers["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            elif memory:  # the process's high-water mark so far (Linux: KiB)
                sec.numbers["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        self.sections[name] = sec
        self.write()
        shown = " ".join(f"{k}={v}" for k, v in list(sec.numbers.items())[:8])
        print(f"[check {time.time() - self.started:5.0f} s] {name}: {sec.status} in {sec.seconds} s  {shown}"
              + (f"  ({sec.note})" if sec.note else ""), flush=True)
        if sec.status == "failed":
            print(tail(sec.error, 1500), flush=True)
        return sec

    def run_all(self, only: set[str] | None = None) -> None:
        """Every section in order, or those in ``only`` (with environment, and models when a
        pipeline section is asked for); the others are reported as skipped."""
        steps = [
            ("environment", self.environment, False),
            ("pytest_gpu", self.pytest_gpu, False),
            ("models", self.build_models, True),
            ("image2d", self.image2d, True),
            ("texture", self.texture, True),
            ("geometry", self.geometry, True),
            ("step_cost", lambda sec, until: self.bench(sec, until, "step_cost.py", self.plan.step_cost_args), False),
            ("step_cost_mv", lambda sec, until: self.bench(sec, until, "step_cost.py", self.plan.step_cost_mv_args), False),
            ("half_precision", lambda sec, until: self.bench(sec, until, "half_precision.py", self.plan.half_precision_args), False),
            ("render", lambda sec, until: self.bench(sec, until, "render.py", self.plan.render_args), False),
            ("nerf", self.nerf, True),
        ]
        if only is not None:
            only = only | {"environment"} | ({"models"} if only & set(PIPELINES) else set())
        for name, fn, in_process in steps:
            if name == "step_cost":  # the benches build their own models, in their own processes
                self.models = None
                if self.cuda:
                    torch.cuda.empty_cache()
            if only is None or name in only:
                self.run(name, fn, memory=in_process)
            else:
                self.sections[name] = Section(name, status="skipped", note="not asked for (--only)")
                self.write()

    # -- sections ------------------------------------------------------------------------------
    def environment(self, sec: Section, until: float) -> None:
        record_path = os.environ.get("PSD3D_CHECK_INSTALL_RECORD")
        install = json.loads(Path(record_path).read_text()) if record_path and Path(record_path).is_file() else {}
        sec.numbers.update({
            "cuda_devices": torch.cuda.device_count(),
            "gpu_mem_total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if self.cuda else 0.0,
            "cpu_count": os.cpu_count() or 0,
            "torch_threads": torch.get_num_threads(),
            "wheels_installed": len(install.get("installed", [])),
            "wheels_failed": len(install.get("failed", {})),
            "install_s": install.get("seconds", 0.0),
        })
        sec.info.update({"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                         "numpy": np.__version__, "device": self.describe_device(), "installed": install.get("installed", []),
                         "install_failed": install.get("failed", {}), "install_note": install.get("note", "")})
        try:
            sec.info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                              timeout=20).stdout.strip().splitlines()[-1]
        except (OSError, IndexError, subprocess.SubprocessError):
            sec.info["nvcc"] = "not found"
        missing = {}
        versions = {}
        for module in IMPORTS + (("nvdiffrast.torch",) if self.cuda else ()):
            try:
                mod = importlib.import_module(module)
                versions[module] = str(getattr(mod, "__version__", "") or self.dist_version(module))
            except Exception as exc:  # ImportError, or a package that breaks on import
                missing[module] = f"{type(exc).__name__}: {exc}"[:300]
        sec.info["versions"] = versions
        if missing:
            sec.info["import_errors"] = missing
            raise SectionFailed("these do not import: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))

    def pytest_gpu(self, sec: Section, until: float) -> None:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text(encoding="utf-8"))
        sec.info["files"] = files
        if not files:
            raise SectionFailed("no test file in tests/ has a test marked gpu")
        if self.cuda:
            self.build_nvdiffrast(sec, min(until, time.monotonic() + NVDIFFRAST_BUILD_S))
        rc, out, err = run_command([sys.executable, "-m", "pytest", "-q", "-rfEs", "-m", "gpu", "-p", "no:cacheprovider",
                                    *files], until, self.out / "pytest_gpu.log")
        sec.numbers.update(pytest_counts(out))
        if not self.cuda:
            sec.note = "no CUDA here: the gpu tests are collected and skipped"
        if rc not in (0, 5):  # 5: nothing collected
            raise SectionFailed(f"pytest exited {rc}", tail(out + err))

    def build_nvdiffrast(self, sec: Section, until: float) -> None:
        """nvdiffrast's JIT build (nvcc, ninja) in a process of its own, timed, before the tests and
        the stages load it from torch's extension cache. If it fails, the stages here render with
        the torch rasterizer; if it runs out of time, its build lock is cleared (a killed build
        leaves one, and the next load would wait on it forever) and the tests are not run."""
        start = time.perf_counter()
        try:
            rc, out, err = run_command([sys.executable, "-c", BUILD_NVDIFFRAST], until, self.out / "nvdiffrast_build.log")
        except SectionFailed:
            # imported here: on a machine without CUDA its import logs a warning about CUDA_HOME
            from torch.utils.cpp_extension import get_default_build_root

            for lock in Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()).rglob("lock"):
                lock.unlink(missing_ok=True)
            self.rasterizer = Backend.TORCH
            raise
        sec.numbers["nvdiffrast_build_s"] = round(time.perf_counter() - start, 2)
        if rc != 0:
            self.rasterizer = Backend.TORCH
            sec.info["nvdiffrast_build"] = tail(err or out, 1500)
            sec.note = "nvdiffrast did not build (see nvdiffrast_build.log); the stages here use the torch rasterizer"

    def raster_context(self) -> RasterContext:
        return RasterContext(self.device, self.rasterizer)

    def build_models(self, sec: Section, until: float) -> None:
        start = time.perf_counter()
        if self.plan.mode == "gpu":
            try:  # random init straight on the GPU: seconds instead of a minute of CPU init
                with torch.device(self.device):
                    prior, reward = sd21_shape_models(self.device, self.dtype)
            except Exception as exc:
                sec.note = f"built on the CPU (on the GPU: {type(exc).__name__}: {str(exc)[:200]})"
                prior, reward = sd21_shape_models(self.device, self.dtype)
            self.models = LoadedModels(prior, reward, [])
            sec.info["models"] = "sd21-shape: random weights, SD 2.1 base / TAESD / open_clip ViT-H-14 configs"
        else:
            quiet_libraries()
            self.models = load_models(TINY_MODELS, device=self.device, dtype=self.dtype)
            sec.info["models"] = "the tiny preset's (loaded through from_pretrained)"
        self.sync()
        sec.numbers["build_s"] = round(time.perf_counter() - start, 2)
        prior = self.models.prior
        for label, module in (("unet", prior.unet), ("vae", prior.vae), ("text_encoder", prior.text_encoder),
                              ("tiny_decoder", prior.tiny_decoder), ("reward", getattr(self.models.target_reward, "model", None))):
            if module is not None:
                sec.numbers[f"{label}_params_m"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 1)
        sec.info["dtype"] = str(prior.dtype)

    def require_models(self) -> LoadedModels:
        if self.models is None:
            raise SectionFailed("no models: the models section failed or was skipped")
        return self.models

    def image2d(self, sec: Section, until: float) -> None:
        models = self.require_models()
        spec = Image2dSpec(prompt=PROMPT, preset=self.plan.preset, steps=self.plan.steps, seed=0)
        with tempfile.TemporaryDirectory(prefix="psd3d-check-") as tmp:
            events = run_image2d(spec, tmp, models=models, should_stop=lambda: time.monotonic() > until)
            self.steps_section(sec, events, Path(tmp))
        sec.numbers["latent"] = get_preset(self.plan.preset).image2d.resolution // models.prior.vae_scale

    def texture(self, sec: Section, until: float) -> None:
        models = self.require_models()
        p = self.plan
        settings = replace(get_preset(p.preset).texture, render_size=p.render_size, prior_size=p.prior_size,
                           texture_size=p.texture_size)
        mesh = self.refine_mesh()
        with tempfile.TemporaryDirectory(prefix="psd3d-check-") as tmp:
            stage = TextureStage(models, mesh, PROMPT, self.negative_init(), settings, settings.guidance, 0, Path(tmp),
                                 ctx=self.raster_context())
            self.steps_section(sec, stage.run(p.steps, lambda: time.monotonic() > until), Path(tmp))
        sec.numbers.update(faces=int(mesh.faces.shape[0]), texture=int(mesh.texture.shape[0]), render=settings.render_size,
                           prior=settings.prior_size)
        sec.info["rasterizer"] = stage.ctx.backend.value

    def geometry(self, sec: Section, until: float) -> None:
        models = self.require_models()
        p = self.plan
        settings = replace(get_preset(p.preset).geometry, grid_resolution=p.grid, render_size=p.render_size,
                           prior_size=p.prior_size)
        grid = TetGrid.cube(settings.grid_resolution, device=self.device)
        sdf0 = sphere_sdf(grid.vertices, settings.primitive_radius)
        with tempfile.TemporaryDirectory(prefix="psd3d-check-") as tmp:
            stage = GeometryStage(models, PROMPT, self.negative_init(), sdf0, grid, settings, 0, Path(tmp),
                                  Normalisation().to_world, ctx=self.raster_context())
            records = self.steps_section(sec, stage.run(p.steps, lambda: time.monotonic() > until), Path(tmp))
        sec.numbers.update(grid=settings.grid_resolution, tets=int(grid.tets.shape[0]), render=settings.render_size,
                           prior=settings.prior_size, faces=int(records[-1].get("faces", 0)))
        sec.info["rasterizer"] = stage.ctx.backend.value

    def bench(self, sec: Section, until: float, script: str, args: Iterable[str]) -> None:
        """Run scripts/bench/<script> and take the key=value numbers of its last line."""
        path = BENCH / script
        if not path.is_file():
            sec.status = "missing"
            sec.note = f"scripts/bench/{script} is not in this checkout"
            return
        cmd = [sys.executable, str(path.relative_to(REPO)), *args]
        sec.info["command"] = " ".join(cmd[1:])
        rc, out, err = run_command(cmd, until, self.out / f"{sec.name}.log")
        lines = [line for line in out.splitlines() if line.strip()]
        sec.info["last_line"] = lines[-1] if lines else ""
        sec.info["output_tail"] = tail(out, 1500)
        if rc != 0:
            raise SectionFailed(f"{script} exited {rc}", tail(out + "\n--- stderr ---\n" + err))
        # step_cost.py with several --latent sizes ends each in '<shape> latent<size>: k=v ...': keys get _latent<size>
        per_size = [(m.group(1), line) for line in lines if (m := re.match(r"^\S+ latent(\d+): ", line))]
        if per_size:
            sec.info["last_line"] = " | ".join(line for _, line in per_size)
            for size, line in per_size:
                sec.numbers.update({f"{k}_latent{size}": v for k, v in parse_numbers(line).items()})
        else:
            sec.numbers.update(parse_numbers(sec.info["last_line"]))
        if not sec.numbers:
            raise SectionFailed(f"{script}: no key=value numbers in its last line", tail(out))

    def nerf(self, sec: Section, until: float) -> None:
        """The NeRF coarse stage's volume render + backward of one view (render.py's nerf_scene /
        nerf_step: hash grid, occupancy grid, 512 samples per ray), median ms per resolution."""
        device = str(self.device)
        runs = {}
        for res in self.plan.nerf_res:
            if time.monotonic() > until:
                sec.note = f"stopped by its time budget before {res}^2"
                break
            scene = nerf_scene(res, device)
            runs[f"nerf_{self.device.type}_{res}_ms"] = (lambda s=scene: nerf_step(*s, device), self.sync)
        if not runs:
            raise SectionFailed("no NeRF resolution fitted in the section's time budget")
        for name, ms in render_bench(runs, self.plan.nerf_rounds).items():
            sec.numbers[name] = round(ms, 2)
        sec.info["what"] = "volume render + backward, one view, median ms (render.py's nerf_step)"

    # -- helpers -------------------------------------------------------------------------------
    def steps_section(self, sec: Section, events, job_dir: Path) -> list[dict]:
        """Consume a pipeline's events; s/step from the steps' records (update alone, the first
        step, which builds kernels and caches, left out) and from the wall clock between steps
        (snapshots included)."""
        records, stamps = [], []
        for event in events:
            if isinstance(event, Progress):
                self.sync()
                stamps.append(time.perf_counter())
                records.append(event.metrics)
            elif isinstance(event, Failed):
                error = job_dir / "error.txt"
                raise SectionFailed(f"{event.code}: {event.message}", tail(error.read_text()) if error.is_file() else "")
        if not records:
            raise SectionFailed("no step finished within the section's time budget")
        seconds = [float(r["seconds"]) for r in records]
        steady = seconds[1:] or seconds
        sec.numbers.update(steps=len(records), first_step_s=round(seconds[0], 4),
                           s_per_step=round(sum(steady) / len(steady), 4))
        if len(stamps) > 1:
            sec.numbers["wall_s_per_step"] = round((stamps[-1] - stamps[0]) / (len(stamps) - 1), 4)
        if len(records) < self.plan.steps:
            sec.note = f"stopped by its time budget after {len(records)} of {self.plan.steps} steps"
        return records

    def refine_mesh(self) -> Mesh:
        """A bumpy UV sphere in the unit frame with its own UVs and a texture: refine's input."""
        segments, rings = self.plan.sphere
        verts, faces, uvs = uv_sphere(segments, rings, radius=0.45, bumps=0.05)
        rng = np.random.default_rng(0)
        size = self.plan.texture_size
        texture = np.concatenate([rng.integers(96, 160, (size, size, 3), dtype=np.uint8),
                                  np.full((size, size, 1), 255, np.uint8)], axis=2)
        return Mesh(verts, faces.long(), uvs, texture)

    def negative_init(self) -> torch.Tensor:
        prior = self.require_models().prior
        return prior.encode_text([DEFAULT_NEGATIVE_DESCRIPTORS], field="negative_prompt").to(prior.device)

    def describe_device(self) -> str:
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            return f"cuda:0 ({props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        return f"cpu ({os.cpu_count()} cores)"

    @staticmethod
    def dist_version(module: str) -> str:
        names = importlib.metadata.packages_distributions().get(module.split(".")[0], [])
        return importlib.metadata.version(names[0]) if names else "?"

    # -- the reports ---------------------------------------------------------------------------
    def write(self) -> None:
        elapsed = round(time.time() - self.started, 1)
        report = {
            "mode": self.plan.mode,
            "device": self.describe_device(),
            "started": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": elapsed,
            "deadline_s": self.plan.deadline_s,
            "sections": {name: asdict(sec) for name, sec in self.sections.items()},
            "estimates": self.estimates(),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(self.out / "report.json")
        (self.out / "report.md").write_text(self.markdown(report))

    def estimates(self) -> dict:
        """Minutes per prop for each recipe and preset (scripts/gpu/estimate.py), once the stage
        sections it needs have numbers; the paper's presets on a GPU, the plan's own in a smoke run."""
        needed = ("image2d", "geometry", "texture", "nerf")
        if any(name not in self.sections or self.sections[name].status != "ok" for name in needed):
            return {}
        numbers = {name: self.sections[name].numbers for name in needed}
        presets = ("sd21-draft", "sd21-paper") if self.plan.mode == "gpu" else (self.plan.preset,)
        return {name: recipe_minutes(get_preset(name), numbers, RECIPE_STAGES) for name in presets}

    @staticmethod
    def markdown(report: dict) -> str:
        lines = [f"# psd3d GPU check: {report['mode']}", "",
                 f"{report['device']}; started {report['started']}; {report['elapsed_s']:.0f} s of {report['deadline_s']:.0f} s.", "",
                 "| section | status | seconds | numbers |", "|---|---|---:|---|"]
        for name, sec in report["sections"].items():
            numbers = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sec["numbers"].items())
            lines.append(f"| {name} | {sec['status']} | {sec['seconds']:.1f} | {numbers} |")
        details = []
        for name, sec in report["sections"].items():
            keep = {k: v for k, v in sec["info"].items() if k != "output_tail"}
            if sec["note"] or sec["error"] or keep:
                details += ["", f"## {name} ({sec['status']})"]
                if sec["note"]:
                    details.append(f"Note: {sec['note']}")
                for k, v in keep.items():
                    details.append(f"- {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
                if sec["error"]:
                    details += ["", "```", sec["error"].rstrip(), "```"]
        estimates = []
        for preset, recipes in report.get("estimates", {}).items():
            estimates += ["", f"## Estimated minutes per prop, {preset} (scripts/gpu/estimate.py)", "",
                          "| recipe | stages (minutes) | total |", "|---|---|---:|"]
            for recipe, minutes in recipes.items():
                stages = ", ".join(f"{k} {v:g}" for k, v in minutes.items() if k != "total")
                estimates.append(f"| {recipe} | {stages} | {minutes['total']:g} |")
        return "\n".join(lines + estimates + details) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for report.md, report.json and the benches' logs")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU, 2 steps each (a minute or two)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections to run (a rerun of some): {','.join(SECTIONS)}")
    args = ap.parse_args()
    only = None if args.only is None else {name.strip() for name in args.only.split(",") if name.strip()}
    if only is not None and only - set(SECTIONS):
        ap.error(f"--only: unknown section(s) {', '.join(sorted(only - set(SECTIONS)))}; choose from {', '.join(SECTIONS)}")
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    if plan.mode == "gpu" and not torch.cuda.is_available():
        print("check: no CUDA device here; run with --cpu-smoke for the tiny CPU version", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if plan.threads:  # the benches and pytest inherit it
        torch.set_num_threads(plan.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(plan.threads)
    check = Check(plan, args.out)
    check.run_all(only)
    print()
    print((args.out / "report.md").read_text())
    return 1 if any(sec.status == "failed" for sec in check.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
