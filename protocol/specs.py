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
        require(isinstance(self.prompt, str), "prompt", "must be a string")
        require(self.prompt.strip() != "", "prompt", "is empty; describe what to make")
        require(len(self.prompt) <= MAX_PROMPT_CHARS, "prompt", f"has {len(self.prompt)} characters, at most {MAX_PROMPT_CHARS}")
        require_choice(self.method, METHODS, "method")
        require_choice(self.reward, REWARDS, "reward")
        require_choice(self.preset, presets, "preset")
        if self.steps is not None:
            require(isinstance(self.steps, int) and 1 <= self.steps <= MAX_STEPS, "steps",
                    f"must be an integer in 1..{MAX_STEPS}, got {self.steps!r}")
        require(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", f"must be a non-negative integer, got {self.seed!r}")
        for name in ("guidance_scale", "reward_scale"):
            value = getattr(self, name)
            if value is not None:
                require(isinstance(value, (int, float)) and math.isfinite(value), name, f"must be a finite number, got {value!r}")
                require(value >= 0, name, f"must be >= 0, got {value!r}")
        if self.interval is not None:
            require(isinstance(self.interval, int) and self.interval >= 1, "interval", f"must be an integer >= 1, got {self.interval!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class Image2dSpec(JobSpec):
    """Algorithm 2: optimise one image latent by score distillation (the 2D experiment)."""


@dataclass(kw_only=True)
class RefineSpec(JobSpec):
    """Re-texture a mesh: its UVs kept (unwrapped if it has none), its texture the start."""

    mesh: str  # path of a GLB/glTF/OBJ/PLY file on the backend's machine

    def validate(self, presets: tuple[str, ...]) -> None:
        require(isinstance(self.mesh, str) and self.mesh.strip() != "", "mesh", "must name a mesh file")
        super().validate(presets)


@dataclass(kw_only=True)
class GenerateSpec(JobSpec):
    """Text to a textured mesh: DMTet geometry (from a primitive or a blocked-out mesh), then texture."""

    init_mesh: str | None = None  # a blocked-out mesh; its frame and scale are kept

    def validate(self, presets: tuple[str, ...]) -> None:
        super().validate(presets)
        if self.init_mesh is not None:
            require(isinstance(self.init_mesh, str) and self.init_mesh.strip() != "", "init_mesh", "must name a mesh file")
