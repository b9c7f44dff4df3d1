"""Operators: thin; they gather the settings as plain values, send one request without waiting
for its reply, and report errors in Blender's info area."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import bpy
import numpy as np

from protocol.errors import Psd3dError

from ..core import frames, library
from . import assets, connection, jobs, notices, pump, results, scene, submits
from .notices import messages  # noqa: F401  (scripts/blender_demo.py reads operators.messages)



def spec_fields(s) -> dict:
    """The scene settings as the fields every pipeline's spec takes (protocol/specs.py)."""
    fields = {"prompt": s.prompt.strip(), "method": s.method, "reward": s.reward, "preset": s.preset, "seed": s.seed}
    if s.steps > 0:
        fields["steps"] = s.steps
    if s.negative_prompt.strip():
        fields["negative_prompt"] = s.negative_prompt.strip()
    if s.use_negative_from and s.negative_from.strip():
        fields["negative_embedding"] = s.negative_from.strip()
    return fields


def camera_rig(context, s, world_to_local: np.ndarray) -> dict:
    """The spec's camera rig: orbit ranges, or the scene's cameras in the glTF frame of the object."""
    if s.camera_mode == "ORBIT":
        return {"orbit": {"elevation": list(s.elevation), "azimuth": list(s.azimuth),
                          "distance": list(s.distance), "fov_y": list(s.fov)}}
    cams = [o for o in context.scene.objects if o.type == "CAMERA"]
    if not cams:
        raise scene.SceneError("cameras: the scene has no camera objects; add some or use Orbit")
    render = context.scene.render
    w, h = render.resolution_x, render.resolution_y
    matrices, fovs = [], []
    for cam in cams:
        m = frames.camera_to_gltf(np.array(cam.matrix_world), world_to_local)
        matrices.append([float(v) for v in m.reshape(-1)])
        fovs.append(frames.square_fov_degrees(cam.data.sensor_fit, cam.data.angle_x, cam.data.angle_y, w, h))
    return {"matrices": matrices, "fov_y": fovs}


def add_job(s, pipeline: str, prompt: str, location, submission: str, index: int = 0):
    """List the job now, as "submitting"; its id arrives with the submit's reply."""
    item = s.jobs.add()
    item.pipeline, item.prompt, item.method, item.seed = pipeline, prompt, s.method, s.seed
    item.recipe = s.recipe if pipeline in ("generate", "batch") else ""
    item.state, item.size, item.location, item.submission = "submitting", s.size, location, submission
    item.index = index
    s.active_job = len(s.jobs) - 1
    return item


def submit(session, kind: str, body: dict, arrays: dict | None, submission: str, on_jobs=None,
           batch: str = "") -> None:
    """Send a submit on ``session`` (``connection.session()``, which raises ``AddressError`` for a
    malformed address) for the items listed under ``submission``, keyed by it: ``submits.submit``
    (a lost reply is followed by the same submit again; ids, ``on_jobs`` and ``batch`` as there)."""
    submits.submit(session, kind, body, arrays, submission, on_jobs, batch)
    pump.ensure_timer()


class _Op:
    bl_options = {"REGISTER"}

    def fail(self, exc: Exception) -> set:
        self.report({"ERROR"}, str(exc))
        return {"CANCELLED"}


class PSD_OT_generate(_Op, bpy.types.Operator):
    bl_idname = "psd3d.generate"
    bl_label = "Generate"
    bl_description = "Make a textured prop from the prompt at the 3D cursor; it updates live while PSD runs"

    def execute(self, context):
        s = context.scene.psd3d
        try:
            fields = spec_fields(s)
            if not fields["prompt"]:
                raise scene.SceneError("prompt: is empty; describe the prop to make")
            fields["recipe"] = s.recipe
            cursor = tuple(context.scene.cursor.location)
            fields["cameras"] = camera_rig(context, s, frames.world_to_prop(cursor, s.size))
            session = connection.session()
        except (scene.SceneError, Psd3dError, connection.AddressError) as exc:
            return self.fail(exc)
        submission = jobs.new_submission()
        add_job(s, "generate", fields["prompt"], cursor, submission)

        def acknowledged(items):
            for item in items:
                pump.ensure_object(item.id_data, item)

        submit(session, "generate", {"pipeline": "generate", "spec": fields}, None, submission, acknowledged)
        self.report({"INFO"}, f"psd3d: generating {fields['prompt']!r}")
        return {"FINISHED"}


def refine_targets(context) -> list:
    """The selected meshes, the active one first: what Refine Selected works on."""
    selected = [o for o in context.selected_objects if o.type == "MESH"]
    active = context.active_object
    return sorted(selected, key=lambda o: (o != active, o.name))


class PSD_OT_refine(_Op, bpy.types.Operator):
    bl_idname = "psd3d.refine"
    bl_label = "Refine Selected"
    bl_description = ("Re-texture the selected meshes with PSD, one job each: their active UV maps are kept (a mesh "
                      "without any is unwrapped first), their texture is the start, and the result goes into a new "
                      "image on all their materials (a material other objects share is copied first; Revert puts "
                      "the originals back)")

    @classmethod
    def poll(cls, context):
        if refine_targets(context):
            return True
        cls.poll_message_set("Select one or more mesh objects to refine")
        return False

    def execute(self, context):
        s = context.scene.psd3d
        targets = refine_targets(context)
        try:
            fields = spec_fields(s)
            if not fields["prompt"]:
                raise scene.SceneError("prompt: is empty; describe the texture to make")
            for obj in targets:  # every object is checked before anything is changed or sent
                scene.check_refinable(obj)
            if context.mode != "OBJECT":
                bpy.ops.object.mode_set(mode="OBJECT")  # edit-mode changes reach the mesh data
            requests = [self.request(context, s, obj, fields) for obj in targets]
            session = connection.session()
        except (scene.SceneError, Psd3dError, connection.AddressError) as exc:
            return self.fail(exc)
        for obj_name, job_fields, arrays, uv_map in requests:
            size = arrays["texture"].shape[1::-1] if "texture" in arrays else (1024, 1024)
            submission = jobs.new_submission()
            item = add_job(s, "refine", job_fields["prompt"], tuple(bpy.data.objects[obj_name].location), submission)
            item.target, item.uv_map = obj_name, uv_map

            def acknowledged(items, obj_name=obj_name, arrays=arrays, uv_map=uv_map, size=size):
                target = bpy.data.objects.get(obj_name)
                for item in items if target is not None else ():
                    scene.attach_refine_image(target, item.job_id, *size, uv_map=uv_map)
                    if "texture" in arrays:  # start from the original, as the backend does
                        pump.show_texture(item.job_id, arrays["texture"])

            submit(session, "refine", {"pipeline": "refine", "spec": job_fields}, arrays, submission, acknowledged)
        names = ", ".join(name for name, *_ in requests)
        self.report({"INFO"}, f"psd3d: refining {names}" + (f" ({len(requests)} jobs)" if len(requests) > 1 else ""))
        return {"FINISHED"}

    def request(self, context, s, obj, fields: dict) -> tuple[str, dict, dict, str]:
        """(object name, spec fields, arrays, UV map) of one object's refine."""
        if scene.ensure_uvs(obj):
            self.report({"INFO"}, f"psd3d: {obj.name} had no UV map; unwrapped it into 'PSD UV' (Smart UV Project)")
        uv_map = scene.refine_uv_map(obj)
        # the mesh goes with the object's rotation and scale applied, about its origin: scene cameras stay
        # rigid in that frame (a scaled object would otherwise scale them) and orbits keep the world's up
        linear = np.array(obj.matrix_world.to_3x3())
        arrays = scene.mesh_arrays(obj, context.evaluated_depsgraph_get(), linear, uv_map)
        if "uvs" not in arrays:
            raise scene.SceneError(f"{obj.name}: its evaluated mesh has no UV map {uv_map!r} (a modifier removes it)")
        to_frame = np.eye(4)
        to_frame[:3, 3] = -np.array(obj.matrix_world.translation)
        return obj.name, {**fields, "cameras": camera_rig(context, s, to_frame)}, arrays, uv_map


class PSD_OT_batch(_Op, bpy.types.Operator):
    bl_idname = "psd3d.batch"
    bl_label = "Batch"
    bl_description = ("Generate one prop per prompt line (from a text block or a file); each finished prop becomes "
                      "an asset in a library .blend in the library folder")

    def execute(self, context):
        s = context.scene.psd3d
        try:
            if s.batch_source == "TEXT":
                if s.batch_text is None:
                    raise library.LibraryError("batch_text: choose a text block with one prompt a line")
                prompts = library.parse_prompts(s.batch_text.as_string(), f"text block {s.batch_text.name!r}")
            else:
                path = Path(bpy.path.abspath(s.batch_file))
                if not s.batch_file or not path.is_file():
                    raise library.LibraryError(f"batch_file: {str(path)!r} is not a file")
                prompts = library.parse_prompts(path.read_text(encoding="utf-8"), str(path))
            if not s.library_dir:
                raise library.LibraryError("library_dir: choose a folder for the asset library")
            if s.library_dir.startswith("//") and not bpy.data.filepath:
                raise library.LibraryError("library_dir: is relative to a .blend that is not saved yet; "
                                           "save the file or choose an absolute folder")
            library.clean_catalog_path(s.catalog)
            fields = spec_fields(s)
            fields.pop("prompt")
            fields["recipe"] = s.recipe  # a batch makes props with generate
            cursor = tuple(context.scene.cursor.location)
            if s.camera_mode == "SCENE":  # each prop's own rig: the scene cameras as they see a prop of Size at its grid spot
                rigs = [camera_rig(context, s, frames.world_to_prop(assets.grid_spot(cursor, i, s.size), s.size))
                        for i in range(len(prompts))]
            else:
                fields["cameras"] = camera_rig(context, s, np.eye(4))  # an orbit is the same around every prop
            session = connection.session()
        except (scene.SceneError, library.LibraryError, Psd3dError, connection.AddressError) as exc:
            return self.fail(exc)
        folder = Path(bpy.path.abspath(s.library_dir))
        stamp = time.strftime("%Y%m%d_%H%M%S")

        def acknowledged(items):
            for item in items:  # the batch's one library .blend
                item.library = str(folder / f"psd3d_{stamp}_{item.batch[:8]}.blend")

        if s.camera_mode == "SCENE":
            # one spec per prop (a batch submit shares one): one submit each, grouped under the add-on's batch id
            batch = uuid.uuid4().hex
            for i, (prompt, rig) in enumerate(zip(prompts, rigs)):
                submission = jobs.new_submission()
                add_job(s, "generate", prompt, cursor, submission, index=i)
                submit(session, "batch", {"pipeline": "generate", "spec": {**fields, "prompt": prompt, "cameras": rig}},
                       None, submission, acknowledged, batch=batch)
        else:
            submission = jobs.new_submission()
            for i, prompt in enumerate(prompts):
                add_job(s, "generate", prompt, cursor, submission, index=i)
            submit(session, "batch", {"pipeline": "generate", "spec": fields, "prompts": prompts}, None, submission,
                   acknowledged)
        self.report({"INFO"}, f"psd3d: batch of {len(prompts)} prompts submitted")
        return {"FINISHED"}


def _selected_job(context):
    s = context.scene.psd3d
    if 0 <= s.active_job < len(s.jobs):
        return s.jobs[s.active_job]
    return None


class _OnSelectedJob(_Op):
    """An operator on the job selected in the list, available when ``accepts`` it (greyed out, with
    ``refusal`` as the reason, when not)."""

    refusal = ""

    @classmethod
    def poll(cls, context):
        item = _selected_job(context)
        if item is None:
            cls.poll_message_set("Select a job in the list")
            return False
        if not cls.accepts(item):
            cls.poll_message_set(cls.refusal.format(state=item.state))
            return False
        return True

    @staticmethod
    def accepts(item) -> bool:
        return True


class _JobControl(_OnSelectedJob):
    request = ""
    refusal = "The selected job is {state}: only a queued or running job can be stopped"

    @staticmethod
    def accepts(item) -> bool:
        return item.active and bool(item.job_id)

    def execute(self, context):
        item = _selected_job(context)
        job = item.job_id
        try:
            session = connection.session()
        except connection.AddressError as exc:
            return self.fail(exc)
        session.request(self.request, {"job": job}, on_error=lambda exc: notices.post(f"{self.request} {job[:8]}: {exc}"))
        pump.ensure_timer()
        self.report({"INFO"}, f"psd3d: {self.request} {job[:8]}")
        return {"FINISHED"}


class PSD_OT_cancel(_JobControl, bpy.types.Operator):
    bl_idname = "psd3d.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the selected job within one optimisation step and discard it"
    request = "cancel"


class PSD_OT_finish(_JobControl, bpy.types.Operator):
    bl_idname = "psd3d.finish"
    bl_label = "Stop & Keep"
    bl_description = "Stop the selected job now and keep its current state as the result"
    request = "finish"


class PSD_OT_revert(_Op, bpy.types.Operator):
    bl_idname = "psd3d.revert"
    bl_label = "Revert Texture"
    bl_description = "Put back the materials and images the active object had before it was refined"

    @classmethod
    def poll(cls, context):
        if scene.refined(context.active_object):
            return True
        cls.poll_message_set("The active object was not refined by psd3d: nothing to put back")
        return False

    def execute(self, context):
        try:
            names = scene.revert(context.active_object)
        except scene.SceneError as exc:
            return self.fail(exc)
        self.report({"INFO"}, f"psd3d: restored {', '.join(n or 'no image' for n in names)}")
        return {"FINISHED"}


class _OnFinishedJob(_OnSelectedJob):
    refusal = "The selected job is {state}: only a finished job has results"

    @staticmethod
    def accepts(item) -> bool:
        return item.state == "done"


class PSD_OT_use_negative(_OnFinishedJob, bpy.types.Operator):
    bl_idname = "psd3d.use_negative"
    bl_label = "Reuse Its Learned Embedding"
    bl_description = ("Start the next jobs from the embedding the selected finished job learned (PSD's learned "
                      "negative embedding)")

    def execute(self, context):
        s = context.scene.psd3d
        s.negative_from, s.use_negative_from = _selected_job(context).job_id, True
        return {"FINISHED"}


class PSD_OT_remove_job(_OnSelectedJob, bpy.types.Operator):
    bl_idname = "psd3d.remove_job"
    bl_label = "Remove From List"
    bl_description = "Forget the selected job in this file (its object and the backend's files stay)"

    def execute(self, context):
        s = context.scene.psd3d
        item = _selected_job(context)
        if connection.current() is not None:
            connection.current().unfollow(item.job_id)
        s.jobs.remove(s.active_job)
        s.active_job = max(0, min(s.active_job, len(s.jobs) - 1))
        return {"FINISHED"}


class PSD_OT_fetch_results(_OnFinishedJob, bpy.types.Operator):
    bl_idname = "psd3d.fetch_results"
    bl_label = "Fetch Results"
    bl_description = "Download the selected finished job's files (GLB, preview, reward curve, metrics) into the results folder"

    def execute(self, context):
        item = _selected_job(context)
        try:
            results.fetch(item.job_id)
        except connection.AddressError as exc:
            return self.fail(exc)
        pump.ensure_timer()
        self.report({"INFO"}, f"psd3d: fetching the results of {item.job_id[:8]} into {results.job_folder(item)}")
        return {"FINISHED"}


class PSD_OT_open_results(_OnSelectedJob, bpy.types.Operator):
    bl_idname = "psd3d.open_results"
    bl_label = "Open Results Folder"
    bl_description = "Show the selected job's files in the system's file browser"
    refusal = "The selected job's files are not fetched yet (Fetch Results)"

    @staticmethod
    def accepts(item) -> bool:
        return bool(item.results_dir) and Path(item.results_dir).is_dir()

    def execute(self, context):
        return bpy.ops.wm.path_open(filepath=_selected_job(context).results_dir)


class PSD_OT_check_connection(_Op, bpy.types.Operator):
    bl_idname = "psd3d.check_connection"
    bl_label = "Check Connection"
    bl_description = ("Ask the backend for its version and what it offers (presets, methods, rewards); "
                      "the answer appears below without blocking Blender")

    def execute(self, context):
        try:
            connection.check()
        except connection.AddressError as exc:  # a malformed address or unreadable CURVE keys
            return self.fail(exc)
        pump.ensure_timer()
        self.report({"INFO"}, f"psd3d: {connection.link.text}")
        return {"FINISHED"}


class PSD_OT_start_server(_Op, bpy.types.Operator):
    bl_idname = "psd3d.start_server"
    bl_label = "Start Local Backend"
    bl_description = "Run `psd3d serve` on this machine (the backend must be installed here)"

    def execute(self, context):
        p = connection.prefs()
        exe = connection.find_psd3d(p.psd3d_path)
        if exe is None:
            return self.fail(Exception("psd3d_path: no `psd3d` command found; install the backend (README) or set "
                                       "its path in the add-on preferences"))
        if not connection.is_local(p.address):
            return self.fail(Exception(f"address: {p.address} is not on this machine; a local backend binds loopback"))
        data = Path(bpy.path.abspath(p.data_dir))
        data.mkdir(parents=True, exist_ok=True)
        proc = connection.start_server(exe, p.address, str(data), data / "serve.log")
        try:
            connection.check()  # answered once the backend has bound its address
        except connection.AddressError as exc:
            return self.fail(exc)
        pump.ensure_timer()
        self.report({"INFO"}, f"psd3d: backend started (pid {proc.pid}); log in {data / 'serve.log'}")
        return {"FINISHED"}


class PSD_OT_dismiss_notice(bpy.types.Operator):
    bl_idname = "psd3d.dismiss_notice"
    bl_label = "Dismiss"
    bl_description = "Remove this message from the panel (-1: all of them)"
    bl_options = {"INTERNAL"}

    index: bpy.props.IntProperty(default=-1)

    def execute(self, context):
        notices.dismiss(None if self.index < 0 else self.index)
        return {"FINISHED"}


CLASSES = (PSD_OT_generate, PSD_OT_dismiss_notice, PSD_OT_refine, PSD_OT_batch, PSD_OT_cancel, PSD_OT_finish, PSD_OT_revert,
           PSD_OT_use_negative, PSD_OT_remove_job, PSD_OT_fetch_results, PSD_OT_open_results, PSD_OT_check_connection,
           PSD_OT_start_server)
