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


def _check_common(spec, presets: tuple[str, ...]) -> None:
    """Fields every pipeline spec shares: prompt, method, preset, steps, seed, scales."""
    require(isinstance(spec.prompt, str), "prompt", "must be a string")
    require(spec.prompt.strip() != "", "prompt", "is empty; describe what to make")
    require(len(spec.prompt) <= MAX_PROMPT_CHARS, "prompt", f"has {len(spec.prompt)} characters, at most {MAX_PROMPT_CHARS}")
    require_choice(spec.method, METHODS, "method")
    require_choice(spec.reward, REWARDS, "reward")
    require_choice(spec.preset, presets, "preset")
    if spec.steps is not None:
        require(isinstance(spec.steps, int) and 1 <= spec.steps <= MAX_STEPS, "steps", f"must be an integer in 1..{MAX_STEPS}, got {spec.steps!r}")
    require(isinstance(spec.seed, int) and 0 <= spec.seed < 2**63, "seed", f"must be a non-negative integer, got {spec.seed!r}")
    for name in ("guidance_scale", "reward_scale"):
        value = getattr(spec, name, None)
        if value is not None:
            require(isinstance(value, (int, float)) and math.isfinite(value), name, f"must be a finite number, got {value!r}")
            require(value >= 0, name, f"must be >= 0, got {value!r}")
    interval = getattr(spec, "interval", None)
    if interval is not None:
        require(isinstance(interval, int) and interval >= 1, "interval", f"must be an integer >= 1, got {interval!r}")


@dataclass
class Image2dSpec:
    """Algorithm 2: optimise one image latent by score distillation (the 2D experiment)."""

    prompt: str
    method: str = "psd"
    reward: str = "hpsv2.1"
    preset: str = "tiny"
    steps: int | None = None  # None: the preset's
    seed: int = 0
    negative_prompt: str | None = None  # None: the default negative descriptors
    negative_embedding: str | None = None  # path of a learned n from an earlier job
    guidance_scale: float | None = None  # None: the preset's
    reward_scale: float | None = None
    interval: int | None = None

    def validate(self, presets: tuple[str, ...]) -> None:
        _check_common(self, presets)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RefineSpec:
    """Re-texture a mesh: its UVs kept (unwrapped if it has none), its texture the start."""

    mesh: str  # path of a GLB/glTF/OBJ/PLY file on the backend's machine
    prompt: str
    method: str = "psd"
    reward: str = "hpsv2.1"
    preset: str = "tiny"
    steps: int | None = None  # texture steps; None: the preset's
    seed: int = 0
    negative_prompt: str | None = None
    negative_embedding: str | None = None
    guidance_scale: float | None = None
    reward_scale: float | None = None
    interval: int | None = None

    def validate(self, presets: tuple[str, ...]) -> None:
        require(isinstance(self.mesh, str) and self.mesh.strip() != "", "mesh", "must name a mesh file")
        _check_common(self, presets)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateSpec:
    """Text to a textured mesh: DMTet geometry (from a primitive or a blocked-out mesh), then texture."""

    prompt: str
    method: str = "psd"
    reward: str = "hpsv2.1"
    preset: str = "tiny"
    init_mesh: str | None = None  # a blocked-out mesh; its frame and scale are kept
    steps: int | None = None  # overrides both stages' step counts (for drafts and tests)
    seed: int = 0
    negative_prompt: str | None = None
    negative_embedding: str | None = None
    guidance_scale: float | None = None
    reward_scale: float | None = None
    interval: int | None = None

    def validate(self, presets: tuple[str, ...]) -> None:
        _check_common(self, presets)
        if self.init_mesh is not None:
            require(isinstance(self.init_mesh, str) and self.init_mesh.strip() != "", "init_mesh", "must name a mesh file")

    def to_dict(self) -> dict:
        return asdict(self)
