"""psd3d for Blender: a PSD panel that generates props, refines the selected mesh's texture and
batch-fills an asset library, with the work shown live in the scene.

``core/`` is bpy-free (frames, layouts, library files); ``blender/`` is the bpy layer. The add-on
talks to ``psd3d serve`` only through ``protocol`` (bundled as a wheel) and never imports torch.
"""

from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from .blender import connection, operators, panel, prefs, props, pump, results, scene, submits

CLASSES = (*props.CLASSES, *prefs.CLASSES, *operators.CLASSES, *panel.CLASSES)


@persistent
def _on_load(_dummy) -> None:
    """A file was opened: its jobs (ids saved in the .blend) are followed again by the pump."""
    pump.ensure_timer()


@persistent
def _on_save(_dummy) -> None:
    """The file is being saved: the streamed textures go into it (a generated image is saved only when packed)."""
    pump.flush_textures()  # snapshots still being converted land first
    scene.pack_job_images()


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    props.register_properties()
    bpy.types.STATUSBAR_HT_header.append(panel.draw_status)
    bpy.app.handlers.load_post.append(_on_load)
    bpy.app.handlers.save_pre.append(_on_save)
    pump.ensure_timer()


def unregister() -> None:
    pump.stop_timer()
    if _on_save in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.remove(_on_save)
    if _on_load in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load)
    bpy.types.STATUSBAR_HT_header.remove(panel.draw_status)
    connection.shutdown()
    submits.forget()  # a submit still unanswered is asked about by its key when the add-on is back
    results.clear()
    props.unregister_properties()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
