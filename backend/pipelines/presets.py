"""Presets: one name picks the models and the stage settings (DESIGN.md "Presets").

``tiny``       random tiny models of the real classes, built on first use; seconds on a CPU.
``sd21-draft`` SD 2.1 base + HPSv2.1 (+ PickScore unseen), fewer steps.
``sd21-paper`` the paper's settings (appendix F.1; Table 3's 50-step 2D experiment).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from protocol.errors import UnknownNameError
from backend.psd.distill import DecodeConfig, GuidanceConfig, SecondNoise
from backend.psd.loading import Layout, fetch_command, locate, models_dir, size_on_disk
from backend.psd.mvdream import MVDreamSource
from backend.psd.negative import NegativeConfig
from backend.psd.prior import PriorSource
from backend.psd.rewards import HpsSource, PickScoreSource, RewardSource
from backend.psd.schedule import DdimLikeSchedule
from backend.psd.tiny import TINY_CLIP_ARCH, TINY_MVDREAM_CHECKPOINT, TINY_MVDREAM_CONFIG, TINY_NAME
from backend.geometry.nerf import HashGridConfig, NerfConfig
from backend.pipelines.geometry_stage import GeometrySettings
from backend.pipelines.nerf_stage import SD_NERF_STAGE2, NerfSettings
from backend.render.volume import VolumeRenderConfig
from backend.pipelines.texture_stage import TextureSettings


@dataclass(frozen=True)
class ModelSet:
    prior: PriorSource
    target_reward: RewardSource
    unseen_rewards: tuple[RewardSource, ...] = ()
    build_tiny: bool = False  # build the tiny models under $PSD3D_HOME before loading
    mvdream: MVDreamSource | None = None  # the multi-view prior of the coarse stage

    def sources(self) -> list[tuple[str, str, Layout]]:
        """(role, source, layout) of every file set this model set loads, each once."""
        found = self.prior.sources() + self.target_reward.sources("target reward")
        for reward in self.unseen_rewards:
            found += reward.sources("unseen reward")
        if self.mvdream is not None:
            listed = {(source, layout) for _, source, layout in found}  # MVDream's SD 2.1 base is the prior's
            found += [row for row in self.mvdream.sources() if row[1:] not in listed]
        return found


@dataclass(frozen=True)
class Image2dSettings:
    """Algorithm 2 (appendix F.5): a 50-step DDIM-like schedule, Adam on the latent.
    The 2D experiment replaces the loser's noise by the model's own prediction at a noisier
    timestep (section 4.3), so ``second_noise`` is PREDICTED here; delta_cls keeps Algorithm
    1's form (docs/paper-deviations.md says why)."""

    steps: int = 50
    resolution: int = 512  # pixels; the latent is resolution / 8
    lr: float = 0.05  # Adam on the latent (not given by the paper; ours)
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(second_noise=SecondNoise.PREDICTED))
    # Algorithm 2 updates no negative embedding: n stays at its initial descriptors. Learning it
    # (F.1's single-stage rate, NegativeConfig(lr=1e-4)) is a switch, not the 2D default.
    negative: NegativeConfig = field(default_factory=lambda: NegativeConfig(lr=0.0))
    schedule: DdimLikeSchedule = field(default_factory=DdimLikeSchedule)
    snapshot_every: int = 5


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    models: ModelSet
    image2d: Image2dSettings
    geometry: GeometrySettings
    texture: TextureSettings
    single: NerfSettings = field(default_factory=NerfSettings)  # generate --recipe mvdream (and the coarse stage)
    nerf_refine: NerfSettings = SD_NERF_STAGE2  # the 2-stage pipeline's second stage (--recipe mvdream-nerf)


_TINY_ROOT = TINY_NAME  # resolved under $PSD3D_HOME/models
_TINY_PRIOR = PriorSource(model=f"{_TINY_ROOT}/sd", tiny_decoder=f"{_TINY_ROOT}/taesd")
TINY_MODELS = ModelSet(
    prior=_TINY_PRIOR,
    target_reward=HpsSource(arch=TINY_CLIP_ARCH, checkpoint=f"{_TINY_ROOT}/hps/HPS_v2.1_compressed.pt",
                            model_config=f"{_TINY_ROOT}/hps/{TINY_CLIP_ARCH}.json"),
    unseen_rewards=(PickScoreSource(model=f"{_TINY_ROOT}/pickscore", processor=f"{_TINY_ROOT}/pickscore"),),
    build_tiny=True,
    mvdream=MVDreamSource(checkpoint=f"{_TINY_ROOT}/{TINY_MVDREAM_CHECKPOINT}",
                          config=f"{_TINY_ROOT}/{TINY_MVDREAM_CONFIG}", base=_TINY_PRIOR),
)
SD21_MODELS = ModelSet(
    prior=PriorSource(),
    target_reward=HpsSource(),
    unseen_rewards=(PickScoreSource(),),
    mvdream=MVDreamSource(),  # MVDream/MVDream:sd-v2.1-base-4view.pt with backend/psd/mvdream_sd21.yaml
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="random tiny models of the real classes: a plumbing check in seconds on a CPU, not pictures",
        models=TINY_MODELS,
        image2d=Image2dSettings(steps=30, resolution=128, snapshot_every=5,
                                guidance=GuidanceConfig(second_noise=SecondNoise.PREDICTED,
                                                        decode=DecodeConfig(tiny=True))),
        geometry=GeometrySettings(steps=8, grid_resolution=16, render_size=64, prior_size=64, snapshot_every=4),
        texture=TextureSettings(steps=8, render_size=64, prior_size=64, texture_size=64, texture_levels=2,
                                snapshot_every=4, checkpoint_every=4,
                                guidance=replace(TextureSettings().guidance, decode=DecodeConfig(tiny=True))),
        single=NerfSettings(steps=8, render_sizes=(32, 64), objects=(1, 1), prior_size=64,
                            nerf=NerfConfig(hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12),
                                            isosurface_resolution=32),
                            render=VolumeRenderConfig(num_samples_per_ray=64), texture_size=64, init_fit_steps=60,
                            extract_resolution=32, snapshot_every=4, checkpoint_every=4),
        nerf_refine=replace(SD_NERF_STAGE2, steps=8, render_sizes=(64, 64), prior_size=64,
                            render=VolumeRenderConfig(num_samples_per_ray=64), texture_size=64,
                            extract_resolution=32, snapshot_every=4, checkpoint_every=4,
                            guidance=replace(SD_NERF_STAGE2.guidance, decode=DecodeConfig(tiny=True))),
    ),
    "sd21-draft": Preset(
        name="sd21-draft",
        description="Stable Diffusion 2.1 base + HPSv2.1, fewer steps for a quick look",
        models=SD21_MODELS,
        image2d=Image2dSettings(steps=30),
        geometry=GeometrySettings(steps=3000, grid_resolution=64, render_size=256, prior_size=512),
        texture=TextureSettings(steps=3000, render_size=512, texture_size=512),
        # a quicker single stage: fewer steps, one object per step, a 512^2 texture (ours)
        single=NerfSettings(steps=3000, objects=(1, 1), texture_size=512),
        nerf_refine=replace(SD_NERF_STAGE2, steps=3000, texture_size=512),
    ),
    "sd21-paper": Preset(
        name="sd21-paper",
        description="Stable Diffusion 2.1 base + HPSv2.1 with the paper's settings (appendix F.1, F.5)",
        models=SD21_MODELS,
        image2d=Image2dSettings(steps=50),
        geometry=GeometrySettings(),
        texture=TextureSettings(),
    ),
}


def get_preset(name: str, field_name: str = "preset") -> Preset:
    if name not in PRESETS:
        raise UnknownNameError(f"{field_name}: unknown preset {name!r}; choose one of {', '.join(PRESETS)}", field=field_name)
    return PRESETS[name]


def with_overrides(guidance: GuidanceConfig, **overrides) -> GuidanceConfig:
    """A copy with the non-None overrides applied (spec fields left unset keep the preset's)."""
    return replace(guidance, **{k: v for k, v in overrides.items() if v is not None})


def model_report() -> dict:
    """For ``psd3d models``: every preset's models by role, with the source, every place looked,
    whether and where it is present, its bytes on disk and the command that fetches it."""
    presets = []
    for preset in PRESETS.values():
        rows = []
        for role, source, layout in preset.models.sources():
            found = locate(source, layout)
            rows.append({"role": role, "source": source, "looked": list(found.looked), "present": found.present,
                         "path": found.path, "bytes": size_on_disk(found.path),
                         "fetch": None if preset.models.build_tiny else fetch_command(source, layout)})
        presets.append({"preset": preset.name, "description": preset.description,
                        "built_on_first_use": preset.models.build_tiny, "models": rows})
    return {"models_dir": str(models_dir()), "presets": presets}
