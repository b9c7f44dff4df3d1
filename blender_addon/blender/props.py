"""Scene settings and the job list, saved in the .blend (so a reopened file resumes its jobs)."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, FloatVectorProperty,
                       IntProperty, PointerProperty, StringProperty)

from . import connection

METHOD_ITEMS = [("psd", "PSD", "Preference Score Distillation: SDS steered towards the reward's preferred sample"),
                ("sds", "SDS", "Score Distillation Sampling (DreamFusion), the baseline"),
                ("dreamdpo", "DreamDPO", "Preference optimisation by a reward-ranked pair (Eq. 22)")]
REWARD_ITEMS = [("hpsv2.1", "HPSv2.1", "Human Preference Score v2.1 (the paper's target reward)"),
                ("pickscore", "PickScore", "PickScore (CLIP-H fine-tuned on Pick-a-Pic)")]
RECIPE_ITEMS = [("sd-dmtet", "SD + DMTet", "DMTet geometry on Stable Diffusion from a sphere, then the PSD texture stage"),
                ("mvdream", "MVDream", "The paper's single stage: a NeRF distilled from MVDream's four joint views "
                                       "(one front, one back), baked to a textured mesh"),
                ("mvdream-nerf", "MVDream + NeRF", "The paper's 2-stage pipeline: the MVDream NeRF refined on "
                                                   "Stable Diffusion at 512², then baked"),
                ("mvdream-dmtet", "MVDream + DMTet", "The paper's 3-stage pipeline: the MVDream NeRF's shape refined as DMTet "
                                                     "on Stable Diffusion, then the PSD texture stage (slowest, most detail)")]
CAMERA_ITEMS = [("ORBIT", "Orbit", "Sample views on an orbit around the object"),
                ("SCENE", "Scene Cameras", "Use the scene's camera objects as the views")]
BATCH_SOURCE_ITEMS = [("TEXT", "Text Block", "One prompt a line, from a text block in this file"),
                      ("FILE", "File", "One prompt a line, from a text file")]
STATE_ICONS = {"submitting": "EXPORT", "queued": "SORTTIME", "running": "PLAY", "done": "CHECKMARK",
               "failed": "ERROR", "cancelled": "CANCEL", "lost": "QUESTION"}


def _preset_items(self, context):
    return connection.preset_items()


class PSD_JobItem(bpy.types.PropertyGroup):
    job_id: StringProperty(name="Job", description="The backend's job id")
    pipeline: StringProperty(name="Pipeline")
    recipe: StringProperty(name="Recipe", description="generate's recipe (its stages); empty for refine")
    prompt: StringProperty(name="Prompt")
    method: StringProperty(name="Method")
    seed: IntProperty(name="Seed")
    state: StringProperty(name="State", default="queued")
    stage: StringProperty(name="Stage")
    step: IntProperty(name="Step")
    total: IntProperty(name="Total")
    reward: FloatProperty(name="Reward", description="The latest reward of the winner of the preference pair")
    final_reward: FloatProperty(name="Final Reward", description="The target reward of the finished result (0: not known)")
    last_seq: IntProperty(name="Last event", description="The last progress/done event applied (resume point)")
    batch: StringProperty(name="Batch")
    library: StringProperty(name="Library", description="The .blend this batch job's asset is saved into", subtype="FILE_PATH")
    message: StringProperty(name="Message")
    size: FloatProperty(name="Size", default=1.0, description="Largest extent of the new prop")
    mesh_scale: FloatProperty(name="Mesh Scale", default=0.0,
                              description="Backend units to metres of the latest mesh (0: none yet)")
    location: FloatVectorProperty(name="Location", size=3, subtype="TRANSLATION",
                                  description="Where the prop appears (the 3D cursor when submitted)")
    index: IntProperty(name="Index", description="Position in its batch")
    submission: StringProperty(name="Submission", options={"HIDDEN"},
                               description="The submit request that asked for this job, also its idempotency key")
    target: StringProperty(name="Target", options={"HIDDEN"}, description="The object a refine job textures")
    uv_map: StringProperty(name="UV Map", options={"HIDDEN"}, description="The UV map a refine job was sent with")
    results_dir: StringProperty(name="Results", subtype="DIR_PATH",
                                description="Where the job's files (GLB, preview, reward curve, metrics) were saved")

    @property
    def active(self) -> bool:
        return self.state in ("submitting", "queued", "running")


class PSD_Settings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to make: a short description of the prop",
                           default="a wooden treasure chest with iron bands")
    negative_prompt: StringProperty(name="Negative Prompt", description="Words to steer away from: they initialise the "
                                    "embedding PSD learns (empty: the backend's defaults)")
    method: EnumProperty(name="Method", items=METHOD_ITEMS, default="psd")
    recipe: EnumProperty(name="Recipe", items=RECIPE_ITEMS, default="sd-dmtet",
                         description="How Generate and Batch make a prop (Refine only re-textures)")
    reward: EnumProperty(name="Reward", items=REWARD_ITEMS, default="hpsv2.1")
    preset: EnumProperty(name="Preset", items=_preset_items,
                         description="Models and stage settings, as offered by the backend (Check Connection)")
    seed: IntProperty(name="Seed", min=0, default=0)
    steps: IntProperty(name="Steps", min=0, default=0, description="Optimisation steps per stage (0: the preset's)")
    size: FloatProperty(name="Size", min=0.001, default=1.0, unit="LENGTH",
                        description="Largest extent of a new prop, placed at the 3D cursor")
    use_negative_from: BoolProperty(name="Learned Embedding", default=False,
                                    description="Start from the embedding a finished job learned (Jobs: Reuse Its "
                                                "Learned Embedding)")
    negative_from: StringProperty(name="From Job", description="Id of the finished job whose learned embedding to start from")
    camera_mode: EnumProperty(name="Cameras", items=CAMERA_ITEMS, default="ORBIT")
    elevation: FloatVectorProperty(name="Elevation", size=2, default=(-10.0, 45.0), min=-90, max=90,
                                   description="Range of camera elevations, degrees")
    azimuth: FloatVectorProperty(name="Azimuth", size=2, default=(-180.0, 180.0), min=-360, max=360,
                                 description="Range of camera azimuths, degrees")
    distance: FloatVectorProperty(name="Distance", size=2, default=(1.8, 2.4), min=0.1, max=100,
                                  description="Range of camera distances, in units of the object's size")
    fov: FloatVectorProperty(name="Field of View", size=2, default=(40.0, 70.0), min=1, max=170,
                             description="Range of vertical fields of view, degrees")
    batch_source: EnumProperty(name="Prompts From", items=BATCH_SOURCE_ITEMS, default="TEXT")
    batch_text: PointerProperty(name="Text", type=bpy.types.Text, description="A text block, one prompt a line")
    batch_file: StringProperty(name="File", subtype="FILE_PATH", description="A text file, one prompt a line")
    library_dir: StringProperty(name="Library Folder", subtype="DIR_PATH", default="//psd3d_library/",
                                description="Folder of the asset library; each batch saves one .blend into it")
    catalog: StringProperty(name="Catalog", default="PSD3D/Props", description="Asset catalog path for batch results")
    jobs: CollectionProperty(type=PSD_JobItem)
    active_job: IntProperty(name="Active Job", default=0)
    defaults_applied: BoolProperty(default=False, options={"HIDDEN"})

    def apply_defaults(self, p) -> None:
        """Once per scene: the method, reward, preset and seed from the add-on preferences."""
        self.method, self.reward, self.seed = p.default_method, p.default_reward, p.default_seed
        if p.default_preset in [item[0] for item in connection.preset_items()]:
            self.preset = p.default_preset
        self.defaults_applied = True


CLASSES = (PSD_JobItem, PSD_Settings)


def register_properties() -> None:
    bpy.types.Scene.psd3d = PointerProperty(type=PSD_Settings)


def unregister_properties() -> None:
    del bpy.types.Scene.psd3d
