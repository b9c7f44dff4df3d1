"""Add-on preferences: where the backend is, its CURVE keys, a local server, and job defaults."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from . import connection, panel
from .props import METHOD_ITEMS, REWARD_ITEMS


class PSD_Preferences(bpy.types.AddonPreferences):
    bl_idname = connection.addon_key()

    address: StringProperty(name="Backend Address", default="tcp://127.0.0.1:5557",
                            description="ZeroMQ endpoint of `psd3d serve` (remote backends need CURVE keys)")
    use_curve: BoolProperty(name="Encrypt (CURVE)", default=False,
                            description="Authenticate and encrypt with ZeroMQ CURVE keys (needed for remote backends)")
    client_key: StringProperty(name="Client Secret Key", subtype="FILE_PATH",
                               description="This machine's .key_secret file (psd3d keys new)")
    server_key: StringProperty(name="Server Public Key", subtype="FILE_PATH",
                               description="The backend's public .key file")
    psd3d_path: StringProperty(name="psd3d Command", subtype="FILE_PATH",
                               description="Path of the `psd3d` command for a local backend (empty: search PATH)")
    data_dir: StringProperty(name="Local Data Folder", subtype="DIR_PATH", default="~/.local/share/psd3d",
                             description="Job store of a backend started from here")
    results_dir: StringProperty(name="Results Folder", subtype="DIR_PATH", default="//psd3d_results",
                                description="Where finished jobs' files go (GLB, preview, reward curve, metrics); "
                                            "// is the .blend's folder (an unsaved file: the local data folder)")
    default_preset: StringProperty(name="Preset", default="tiny")
    default_method: EnumProperty(name="Method", items=METHOD_ITEMS, default="psd")
    default_reward: EnumProperty(name="Reward", items=REWARD_ITEMS, default="hpsv2.1")
    default_seed: IntProperty(name="Seed", min=0, default=0)

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "address")
        col.prop(self, "use_curve")
        sub = col.column()
        sub.enabled = self.use_curve
        sub.prop(self, "client_key")
        sub.prop(self, "server_key")
        row = col.row()
        row.operator("psd3d.check_connection", icon="LINKED")
        row.operator("psd3d.start_server", icon="PLAY")
        if connection.link.text:
            col.label(text=connection.link.text, icon=panel.LINK_ICONS[connection.link.state])
        col.prop(self, "psd3d_path")
        col.prop(self, "data_dir")
        col.prop(self, "results_dir")
        box = layout.box()
        box.label(text="Defaults for new scenes")
        row = box.row()
        row.prop(self, "default_preset")
        row.prop(self, "default_method")
        row.prop(self, "default_reward")
        row.prop(self, "default_seed")


CLASSES = (PSD_Preferences,)
