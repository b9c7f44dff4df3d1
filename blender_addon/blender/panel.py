"""The "PSD" tab of the 3D viewport's sidebar, and a progress line in the status bar."""

from __future__ import annotations

import bpy

from . import connection, jobs, notices, pump, results
from .props import STATE_ICONS


class PSD_UL_jobs(bpy.types.UIList):
    bl_idname = "PSD_UL_jobs"

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index):
        row = layout.row(align=True)
        row.label(text=item.prompt or item.job_id[:8], icon=STATE_ICONS.get(item.state, "DOT"))
        if item.state == "running" and item.total:
            stages = jobs.job_stages(item)
            stage = item.stage[:3]
            if len(stages) > 1 and item.stage in stages:
                stage = f"{stages.index(item.stage) + 1}/{len(stages)} {stage}"
            row.label(text=f"{stage} {item.step}/{item.total}")
        else:
            row.label(text=item.state)
        row.label(text=f"{item.reward:.3f}" if item.reward else "")  # the column headed REWARD_HEADER


REWARD_HEADER = "Winner Reward"  # the list's last column: the latest reward of the pair's winner
MESSAGE_ICONS = {"failed": "ERROR", "lost": "ERROR", "cancelled": "INFO"}  # the artist's own Cancel is no error


class _Panel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "PSD"


class PSD_PT_main(_Panel, bpy.types.Panel):
    bl_idname = "PSD_PT_main"
    bl_label = "PSD 3D"

    def draw(self, context):
        s = context.scene.psd3d
        layout = self.layout
        layout.prop(s, "prompt", text="")
        layout.prop(s, "negative_prompt")
        col = layout.column(align=True)
        col.prop(s, "method")
        col.prop(s, "recipe")
        col.prop(s, "reward")
        col.prop(s, "preset")
        row = col.row(align=True)
        row.prop(s, "seed")
        row.prop(s, "steps")
        col.prop(s, "size")
        if s.negative_from:
            row = layout.row()
            row.prop(s, "use_negative_from")
            sub = row.row()
            sub.enabled = s.use_negative_from
            sub.label(text=learned_from(s))
        row = layout.row(align=True)
        row.scale_y = 1.4
        row.operator("psd3d.generate", icon="MESH_MONKEY")
        row.operator("psd3d.refine", icon="TEXTURE")
        draw_link(layout)


def learned_from(s) -> str:
    """The job whose learned embedding the next jobs start from, by its prompt (its id when not in the list)."""
    for item in s.jobs:
        if item.job_id == s.negative_from:
            return f"of {item.prompt!r}"
    return f"of job {s.negative_from[:8]}"


LINK_ICONS = {"unknown": "LINKED", "checking": "TIME", "ok": "CHECKMARK", "failed": "ERROR"}


def draw_link(layout) -> None:
    """The backend's state as the add-on last learned it, and the button to ask again."""
    link = connection.link
    row = layout.row()
    row.operator("psd3d.check_connection", icon="LINKED", text="" if link.text else "Check Connection")
    if link.text:
        row.label(text=link.text, icon=LINK_ICONS[link.state])


class PSD_PT_cameras(_Panel, bpy.types.Panel):
    bl_idname = "PSD_PT_cameras"
    bl_label = "Cameras"
    bl_parent_id = "PSD_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        s = context.scene.psd3d
        layout = self.layout
        layout.prop(s, "camera_mode", expand=True)
        if s.camera_mode == "ORBIT":
            col = layout.column(align=True)
            for name in ("elevation", "azimuth", "distance", "fov"):
                col.prop(s, name)
        else:
            n = sum(1 for o in context.scene.objects if o.type == "CAMERA")
            layout.label(text=f"{n} camera(s) in the scene", icon="CAMERA_DATA" if n else "ERROR")
            if n:
                layout.label(text="Square views cover each camera's whole frame", icon="INFO")


class PSD_PT_batch(_Panel, bpy.types.Panel):
    bl_idname = "PSD_PT_batch"
    bl_label = "Batch → Asset Library"
    bl_parent_id = "PSD_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        s = context.scene.psd3d
        layout = self.layout
        layout.prop(s, "batch_source", expand=True)
        layout.prop(s, "batch_text" if s.batch_source == "TEXT" else "batch_file")
        layout.prop(s, "library_dir")
        layout.prop(s, "catalog")
        layout.operator("psd3d.batch", icon="ASSET_MANAGER")


class PSD_PT_jobs(_Panel, bpy.types.Panel):
    bl_idname = "PSD_PT_jobs"
    bl_label = "Jobs"
    bl_parent_id = "PSD_PT_main"

    def draw(self, context):
        s = context.scene.psd3d
        layout = self.layout
        header = layout.row(align=True)
        for text in ("Job", "Progress", REWARD_HEADER):
            header.label(text=text)
        layout.template_list("PSD_UL_jobs", "", s, "jobs", s, "active_job", rows=3)
        if 0 <= s.active_job < len(s.jobs):
            item = s.jobs[s.active_job]
            if item.active or item.state == "done":
                frac, text = jobs.progress(item)
                layout.progress(factor=frac, type="BAR", text=text)
            if item.message:
                layout.label(text=item.message, icon=MESSAGE_ICONS.get(item.state, "INFO"))
            if item.state == "done":
                if item.final_reward:
                    layout.label(text=f"Final reward (target): {item.final_reward:.4f}")
                draw_results(layout, item)
        row = layout.row(align=True)
        row.operator("psd3d.cancel", icon="CANCEL")
        row.operator("psd3d.finish", icon="PAUSE")
        row = layout.row(align=True)
        row.operator("psd3d.revert", icon="LOOP_BACK")
        row.operator("psd3d.use_negative", text="Reuse Embedding", icon="COPYDOWN")
        row.operator("psd3d.remove_job", text="", icon="X")
        draw_notices(layout)


def draw_notices(layout) -> None:
    """The notices, each with its dismiss button, and one to dismiss them all."""
    shown = notices.notices()
    for i, notice in enumerate(shown):
        row = layout.row(align=True)
        row.label(text=notice.text, icon=notice.level)
        row.operator("psd3d.dismiss_notice", text="", icon="X", emboss=False).index = i
    if len(shown) > 1:
        layout.operator("psd3d.dismiss_notice", text="Dismiss All", icon="X").index = -1


def draw_results(layout, item) -> None:
    """The finished job's pictures (turntable preview, reward curve) and where its files are."""
    box = layout.box()
    icons = [(name, results.icon(item, name)) for name in results.PICTURES]
    if not any(icon for _, icon in icons):
        box.operator("psd3d.fetch_results", icon="IMPORT")
        return
    row = box.row()
    for name, icon in icons:
        if icon:
            col = row.column()
            col.template_icon(icon_value=icon, scale=6.0)
            col.label(text=name.removesuffix(".png").replace("_", " "))
    box.operator("psd3d.open_results", icon="FILE_FOLDER")


def draw_status(self, context):
    summary = pump.running_summary()
    if summary is not None:
        text, frac = summary
        self.layout.progress(factor=frac, type="BAR", text=text)


CLASSES = (PSD_UL_jobs, PSD_PT_main, PSD_PT_cameras, PSD_PT_batch, PSD_PT_jobs)
