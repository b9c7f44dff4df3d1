"""One spec dataclass per pipeline: the fields a client sends, the CLI's flags, what a job stores.

Only standard-library types, so the add-on and the CLI can build and validate specs without
torch. The backend validates further (prompt length by the tokenizer) before it runs one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from protocol.errors import require, require_choice

METHODS = ("psd", "sds", "dreamdpo")
REWARDS = ("hpsv2.1", "pickscore")  # the target reward; the others are reported as unseen
MAX_PROMPT_CHARS = 1000  # a cheap bound before tokenising; the tokenizer's 77-token limit is checked too
MAX_STEPS = 100_000
MAX_SEED = 2**63 - 1  # seeds are integers in 0..MAX_SEED
MIN_T, MAX_T = 0.02, 0.98  # the timestep range score distillation draws from, as fractions of T
MAX_PATH_CHARS = 4096


def is_int(x) -> bool:
    """An integer that is not a bool (msgpack's true would pass ``isinstance(x, int)``)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _kind(x) -> str:
    return {dict: "a map", list: "a list", bool: "a boolean", type(None): "null"}.get(type(x), type(x).__name__)


def check_path(value, field: str, what: str) -> None:
    """A file name a spec carries: a non-blank string without NUL bytes (which no file system takes)."""
    require(isinstance(value, str) and value.strip() != "", field, f"must name {what}, got {_kind(value)}")
    require("\0" not in value, field, "contains a NUL byte")
    require(len(value) <= MAX_PATH_CHARS, field, f"has {len(value)} characters, at most {MAX_PATH_CHARS}")


@dataclass(kw_only=True)
class JobSpec:
    """The fields every pipeline takes (the CLI's shared flags)."""

    prompt: str
    method: str = "psd"
    reward: str = "hpsv2.1"  # the target reward; the others are reported as unseen
    preset: str = "tiny"
    steps: int | None = None  # None: the preset's; for generate it overrides both stages
    seed: int = 0
    negative_prompt: str | None = None  # None: the default negative descriptors
    negative_embedding: str | None = None  # path of a learned n from an earlier job
    guidance_scale: float | None = None  # None: the preset's
    reward_scale: float | None = None
    interval: int | None = None

    def validate(self, presets: tuple[str, ...]) -> None:
        """Every field's type and range: a spec that passes runs (nothing is acknowledged that fails
        later on its own input). Booleans are not numbers here, although Python says they are."""
        require(isinstance(self.prompt, str), "prompt", f"must be a string, got {_kind(self.prompt)}")
        require(self.prompt.strip() != "", "prompt", "is empty; describe what to make")
        require(len(self.prompt) <= MAX_PROMPT_CHARS, "prompt", f"has {len(self.prompt)} characters, at most {MAX_PROMPT_CHARS}")
        require_choice(self.method, METHODS, "method")
        require_choice(self.reward, REWARDS, "reward")
        require_choice(self.preset, presets, "preset")
        if self.steps is not None:
            require(is_int(self.steps) and 1 <= self.steps <= MAX_STEPS, "steps",
                    f"must be an integer in 1..{MAX_STEPS}, got {self.steps!r}")
        require(is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed",
                f"must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        if self.negative_prompt is not None:
            require(isinstance(self.negative_prompt, str), "negative_prompt",
                    f"must be a string or null, got {_kind(self.negative_prompt)}")
            require(len(self.negative_prompt) <= MAX_PROMPT_CHARS, "negative_prompt",
                    f"has {len(self.negative_prompt)} characters, at most {MAX_PROMPT_CHARS}")
        if self.negative_embedding is not None:
            check_path(self.negative_embedding, "negative_embedding", "a finished job's id or a file path")
        for name in ("guidance_scale", "reward_scale"):
            value = getattr(self, name)
            if value is not None:
                require(is_number(value), name, f"must be a finite number, got {value!r}")
                require(value >= 0, name, f"must be >= 0, got {value!r}")
        if self.interval is not None:
            require(is_int(self.interval) and 1 <= self.interval <= MAX_STEPS, "interval",
                    f"must be an integer in 1..{MAX_STEPS}, got {self.interval!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class Image2dSpec(JobSpec):
    """Algorithm 2: optimise one image latent by score distillation (the 2D experiment)."""


MAX_CAMERAS = 256


def check_camera_rig(rig) -> None:
    """A rig is ``{"orbit": {"elevation": [lo, hi], "azimuth": [lo, hi], "distance": [lo, hi], "fov_y": [lo, hi]}}``
    (degrees; distance in units of the normalised object, which spans 1) or ``{"matrices": [[16 floats,
    row-major camera-to-world, OpenGL camera looking down -Z, in the input's glTF frame], ...], "fov_y": [deg, ...]}``."""
    number = is_number
    shape = "must be {'orbit': {...}} or {'matrices': [...], 'fov_y': [...]}"
    require(isinstance(rig, dict) and (set(rig) == {"orbit"} or set(rig) == {"matrices", "fov_y"}), "cameras", shape)
    if "orbit" in rig:
        orbit = rig["orbit"]
        require(isinstance(orbit, dict), "cameras.orbit", "must be a map of ranges")
        limits = {"elevation": (-90, 90), "azimuth": (-360, 360), "distance": (0.1, 100), "fov_y": (1, 170)}
        for key, value in orbit.items():
            require(key in limits, f"cameras.orbit.{key}", f"unknown; use {', '.join(limits)}")
            lo, hi = limits[key]
            require(isinstance(value, list) and len(value) == 2 and all(number(v) and lo <= v <= hi for v in value)
                    and value[0] <= value[1], f"cameras.orbit.{key}", f"must be [low, high] within [{lo}, {hi}]")
        return
    matrices, fovs = rig.get("matrices"), rig.get("fov_y")
    require(isinstance(matrices, list) and 0 < len(matrices) <= MAX_CAMERAS, "cameras.matrices",
            f"must be a list of 1..{MAX_CAMERAS} matrices")
    require(isinstance(fovs, list) and len(fovs) == len(matrices) and all(number(f) and 1 <= f <= 170 for f in fovs),
            "cameras.fov_y", "must give one vertical field of view in 1..170 degrees per matrix")
    for i, m in enumerate(matrices):
        require(isinstance(m, list) and len(m) == 16 and all(number(v) for v in m), f"cameras.matrices[{i}]",
                "must be 16 finite numbers (row-major 4x4)")
        require(m[12:] == [0, 0, 0, 1], f"cameras.matrices[{i}]", "last row must be 0 0 0 1 (a rigid camera-to-world)")


RASTERIZERS = ("torch", "nvdiffrast")  # nvdiffrast: CUDA only, NVIDIA's non-commercial licence


@dataclass(kw_only=True)
class MeshJobSpec(JobSpec):
    """What the 3D pipelines add: a camera rig and the rasterizer."""

    cameras: dict | None = None  # a camera rig (see check_camera_rig); None: the preset's orbit
    # None: nvdiffrast on CUDA when it builds, else torch. "torch" is the permissively licensed path.
    rasterizer: str | None = None

    def validate(self, presets: tuple[str, ...]) -> None:
        super().validate(presets)
        if self.cameras is not None:
            check_camera_rig(self.cameras)
        if self.rasterizer is not None:
            require_choice(self.rasterizer, RASTERIZERS, "rasterizer")


@dataclass(kw_only=True)
class RefineSpec(MeshJobSpec):
    """Re-texture a mesh: its UVs kept (unwrapped if it has none), its texture the start."""

    mesh: str  # path of a GLB/glTF/OBJ/PLY file on the backend's machine
    # The largest noise level t / T refine may use on a textured mesh (its strength); None: the
    # preset's (0.404, the start of the paper's texture stage). Lower keeps more of the texture.
    max_t: float | None = None

    def validate(self, presets: tuple[str, ...]) -> None:
        check_path(self.mesh, "mesh", "a mesh file")
        super().validate(presets)
        if self.max_t is not None:
            require(is_number(self.max_t) and MIN_T <= self.max_t <= MAX_T, "max_t",
                    f"must be a number in [{MIN_T}, {MAX_T}] (a fraction of the diffusion schedule), got {self.max_t!r}")


# How generate makes a prop. "sd-dmtet": DMTet geometry on Stable Diffusion from a primitive or a
# block-out, then a PSD texture stage (Fantasia3D's recipe). "mvdream": the paper's single stage
# (Table 1): a NeRF distilled from MVDream's four joint views, extracted and baked to a textured mesh.
# "mvdream-dmtet": the paper's 3-stage pipeline (Table 2): that NeRF starts the DMTet geometry stage
# on Stable Diffusion, then the PSD texture stage. "mvdream-nerf": the paper's 2-stage pipeline
# (Table 2): that NeRF refined on Stable Diffusion at 512², then baked.
# The stages each recipe runs, in order: the ``stage`` of its Progress events.
RECIPE_STAGES = {
    "sd-dmtet": ("geometry", "texture"),
    "mvdream": ("nerf",),
    "mvdream-nerf": ("nerf", "nerf-refine"),
    "mvdream-dmtet": ("nerf", "geometry", "texture"),
}
RECIPES = tuple(RECIPE_STAGES)


def job_stages(recipe: str | None, block_out: bool = False, through_coarse: bool = False) -> tuple[str, ...]:
    """The stages a generate job runs, in order: its recipe's (default sd-dmtet), less mvdream-dmtet's
    coarse MVDream stage when an artist's block-out starts the DMTet directly (``block_out`` without
    ``through_coarse``)."""
    stages = RECIPE_STAGES.get(recipe or "sd-dmtet", ())
    if recipe == "mvdream-dmtet" and block_out and not through_coarse:
        return stages[1:]
    return stages


def stage_position(stages: tuple[str, ...], stage: str) -> tuple[int, int] | None:
    """(k, n): ``stage`` is stage k of the job's n (1-based); None when ``stages`` does not list it."""
    return (stages.index(stage) + 1, len(stages)) if stage in stages else None


def stage_label(stages: tuple[str, ...], stage: str) -> str:
    """"stage 2 of 3: geometry" for a multi-stage job, else the stage's name."""
    position = stage_position(stages, stage)
    return f"stage {position[0]} of {position[1]}: {stage}" if position and position[1] > 1 else stage


@dataclass(kw_only=True)
class GenerateSpec(MeshJobSpec):
    """Text to a textured mesh by one of RECIPES."""

    recipe: str = "sd-dmtet"
    # a blocked-out mesh; its frame and scale are kept. It starts the first stage: DMTet (sd-dmtet,
    # and mvdream-dmtet, which then skips its MVDream stage) or the NeRF (mvdream, mvdream-nerf)
    init_mesh: str | None = None
    # mvdream-dmtet with an init_mesh: start the MVDream stage's NeRF from it instead of skipping that stage
    init_mesh_through_coarse: bool = False

    def validate(self, presets: tuple[str, ...]) -> None:
        super().validate(presets)
        require_choice(self.recipe, RECIPES, "recipe")
        if self.init_mesh is not None:
            check_path(self.init_mesh, "init_mesh", "a mesh file")
        require(isinstance(self.init_mesh_through_coarse, bool), "init_mesh_through_coarse",
                f"must be true or false, got {self.init_mesh_through_coarse!r}")
        if self.init_mesh_through_coarse:
            require(self.recipe == "mvdream-dmtet" and self.init_mesh is not None, "init_mesh_through_coarse",
                    "applies to an init_mesh with the mvdream-dmtet recipe (the others start their first stage from it)")

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this job runs (:func:`job_stages`)."""
        return job_stages(self.recipe, self.init_mesh is not None, self.init_mesh_through_coarse)


MAX_BATCH = 1000


@dataclass(kw_only=True)
class BatchSpec:
    """Many prompts, one job each, followed together by one batch id (filling an asset library).
    The per-job fields other than the prompt travel as that pipeline's spec."""

    prompts: list
    pipeline: str = "generate"

    def validate(self) -> None:
        require(isinstance(self.prompts, list) and 0 < len(self.prompts) <= MAX_BATCH, "prompts",
                f"must be a list of 1..{MAX_BATCH} prompts")
        for i, p in enumerate(self.prompts):
            require(isinstance(p, str) and p.strip() != "", f"prompts[{i}]", "must be a non-empty string")
        require_choice(self.pipeline, ("image2d", "generate"), "pipeline")

    def to_dict(self) -> dict:
        return asdict(self)
