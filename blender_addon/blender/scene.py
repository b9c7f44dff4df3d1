"""Backend snapshots into Blender data, in place: one object, mesh, material and image per job,
found again by the job id stored on them (never by held Python references, which undo and file
reloads invalidate). Bulk ``foreach_set`` only; no importer operators."""

from __future__ import annotations

import bpy
import numpy as np

from ..core import frames

JOB_KEY = "psd3d_job"  # custom property on objects, meshes, images and materials
TOPOLOGY_KEY = "psd3d_topology"  # on the mesh: the topology_id its faces came from
ORIGINAL_KEY = "psd3d_original_image"  # on a refined material: the image Revert puts back ("" = none)
ORIGINAL_MATERIAL_KEY = "psd3d_original_material"  # on a refine's copy of a shared material: the one Revert puts back
UV_NAME = "UVMap"
UV_NODE = "PSD UV Map"  # a refined material's UV Map node: the image is sampled with the UV map that was sent


class SceneError(Exception):
    """A selection or scene state the add-on cannot work with (reported in Blender's info area)."""


# -- finding things by job id -------------------------------------------------------------------
def find_by_job(collection, job: str):
    for item in collection:
        if item.get(JOB_KEY) == job:
            return item
    return None


def job_object(job: str) -> bpy.types.Object | None:
    return find_by_job(bpy.data.objects, job)


def job_image(job: str) -> bpy.types.Image | None:
    return find_by_job(bpy.data.images, job)


# -- creating the prop ----------------------------------------------------------------------------
def new_job_object(job: str, name: str, location, collection: bpy.types.Collection) -> bpy.types.Object:
    """An empty mesh object for a generate job at ``location`` (the 3D cursor), with its material."""
    mesh = bpy.data.meshes.new(name)
    mesh[JOB_KEY] = job
    obj = bpy.data.objects.new(name, mesh)
    obj[JOB_KEY] = job
    obj.location = location
    collection.objects.link(obj)
    mesh.materials.append(job_material(job, name, ensure_image(job, name, 4, 4)))
    return obj


def ensure_image(job: str, name: str, width: int, height: int) -> bpy.types.Image:
    image = job_image(job)
    if image is None:
        # a float buffer takes Image.pixels.foreach_set without Blender's float -> byte conversion (1.9 ms
        # instead of 7.9 for 1024^2, scripts/bench/blender_import.py); it holds linear colour (Blender's
        # float convention, kept as it is when the image is packed as EXR), decoded from the snapshots'
        # sRGB off the main thread (core/pixels)
        image = bpy.data.images.new(f"{name} PSD", width, height, alpha=True, float_buffer=True)
        image.alpha_mode = "CHANNEL_PACKED"  # packed as EXR without premultiplying: a save keeps colour and alpha exactly
        image[JOB_KEY] = job
    return image


def job_material(job: str, name: str, image: bpy.types.Image) -> bpy.types.Material:
    """A Principled BSDF with ``image`` on Base Color (sRGB)."""
    mat = bpy.data.materials.new(f"{name} PSD")
    mat[JOB_KEY] = job
    mat.use_nodes = True
    bsdf = principled(mat)
    node = mat.node_tree.nodes.new("ShaderNodeTexImage")
    node.image = image
    node.location = (bsdf.location[0] - 320, bsdf.location[1])
    mat.node_tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    return mat


def principled(mat: bpy.types.Material) -> bpy.types.Node:
    for node in mat.node_tree.nodes:
        if node.type == "BSDF_PRINCIPLED":
            return node
    bsdf = mat.node_tree.nodes.new("ShaderNodeBsdfPrincipled")
    out = next((n for n in mat.node_tree.nodes if n.type == "OUTPUT_MATERIAL"), None) or \
        mat.node_tree.nodes.new("ShaderNodeOutputMaterial")
    mat.node_tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    return bsdf


def base_color_image_node(mat: bpy.types.Material | None) -> bpy.types.Node | None:
    """The Image Texture node feeding the Principled BSDF's Base Color, if any."""
    if mat is None or not mat.use_nodes:
        return None
    for link in mat.node_tree.links:
        if link.to_socket.name == "Base Color" and link.to_node.type == "BSDF_PRINCIPLED" \
                and link.from_node.type == "TEX_IMAGE":
            return link.from_node
    return None


# -- snapshots ------------------------------------------------------------------------------------
def apply_mesh(mesh: bpy.types.Mesh, positions: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None,
               topology_id: int, scale: float = 1.0) -> str:
    """Write a mesh snapshot (glTF frame) into ``mesh``. Positions alone when the topology is the one
    already there; else the geometry is rebuilt in the same datablock. Returns "positions" or "full"."""
    co = frames.points_to_blender(positions)
    if scale != 1.0:
        co *= np.float32(scale)
    if mesh.get(TOPOLOGY_KEY) == topology_id and len(mesh.vertices) == len(co):
        _attribute(mesh, "position", "FLOAT_VECTOR", "POINT").data.foreach_set("vector", co.reshape(-1))
        mesh.update()
        return "positions"
    loops, starts, _ = frames.triangle_loops(faces)
    mesh.clear_geometry()
    mesh.vertices.add(len(co))
    mesh.loops.add(len(loops))
    mesh.polygons.add(len(starts))
    # the attribute arrays are copied in bulk; MeshVertex.co / MeshLoop.vertex_index go item by item (10x slower)
    _attribute(mesh, "position", "FLOAT_VECTOR", "POINT").data.foreach_set("vector", co.reshape(-1))
    _attribute(mesh, ".corner_vert", "INT", "CORNER").data.foreach_set("value", loops)
    mesh.polygons.foreach_set("loop_start", starts)
    if uvs is not None:
        layer = mesh.uv_layers.get(UV_NAME) or mesh.uv_layers.new(name=UV_NAME)
        layer.uv.foreach_set("vector", frames.uvs_to_blender(uvs).reshape(-1))
    mesh.update(calc_edges=True)
    mesh.shade_smooth()
    mesh[TOPOLOGY_KEY] = topology_id
    return "full"


def _attribute(mesh: bpy.types.Mesh, name: str, kind: str, domain: str):
    return mesh.attributes.get(name) or mesh.attributes.new(name, kind, domain)


def apply_pixels(image: bpy.types.Image, pixels: np.ndarray, width: int, height: int) -> None:
    """Write ready pixels (flat float32 RGBA, row 0 at the bottom: ``core.pixels`` converts a texture
    snapshot into them off the main thread) into ``image`` in place. The main thread's whole share of
    a texture snapshot: a resize when the size changed, Blender's ``foreach_set``, the update."""
    if pixels.dtype != np.float32 or pixels.size != width * height * 4:
        raise ValueError(f"pixels: expected {width * height * 4} float32, got {pixels.size} {pixels.dtype}")
    if tuple(image.size) != (width, height):
        image.scale(width, height)
    if not holds_linear(image):  # a byte job image from an older file: its codes, not linear colour
        pixels = frames.rgba8_to_blender_pixels(frames.blender_pixels_to_rgba8(pixels, width, height, linear=True))
    image.pixels.foreach_set(pixels)
    image.update()


def pack_job_images() -> int:
    """Pack every job image that holds a streamed texture (a save keeps a generated image only when it
    is packed; a reopened file would show the 4x4 placeholder until the backend sent it again).
    Returns how many were packed."""
    packed = 0
    for image in bpy.data.images:
        if JOB_KEY in image and image.size[0] > 4 and (image.is_dirty or image.packed_file is None):
            image.pack()
            packed += 1
    return packed


def image_rgba8(image: bpy.types.Image) -> np.ndarray:
    w, h = image.size
    pixels = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(pixels)
    return frames.blender_pixels_to_rgba8(pixels, w, h, linear=holds_linear(image))


def holds_linear(image: bpy.types.Image) -> bool:
    """Whether ``Image.pixels`` holds linear colour: a float buffer not tagged sRGB (a byte image
    holds its sRGB codes / 255)."""
    return image.is_float and image.colorspace_settings.name != "sRGB"


# -- reading the artist's mesh -----------------------------------------------------------------
def mesh_arrays(obj: bpy.types.Object, depsgraph, linear: np.ndarray | None = None, uv_map: str | None = None) -> dict:
    """The object's evaluated mesh (modifiers applied), triangulated, as glTF arrays: positions (in its
    local frame, or mapped by the 3x3 ``linear`` first; a mirroring one also reverses the winding, so
    faces keep facing out), faces, and with the UV map ``uv_map`` (default: the active one) per-corner
    uvs, with a base-colour image (``start_image``) the texture."""
    evaluated = obj.evaluated_get(depsgraph)
    me = evaluated.to_mesh()
    try:
        me.calc_loop_triangles()
        n_tris = len(me.loop_triangles)
        if n_tris == 0:
            raise SceneError(f"{obj.name}: has no faces to texture")
        co = np.empty(len(me.vertices) * 3, np.float32)
        me.vertices.foreach_get("co", co)
        tri_verts = np.empty(n_tris * 3, np.int32)
        me.loop_triangles.foreach_get("vertices", tri_verts)
        tri_loops = np.empty(n_tris * 3, np.int32)
        me.loop_triangles.foreach_get("loops", tri_loops)
        co = co.reshape(-1, 3)
        if linear is not None:
            co = co @ np.asarray(linear, np.float32).T
            if np.linalg.det(linear) < 0:  # mirrored: corners in reverse order
                tri_verts = np.ascontiguousarray(tri_verts.reshape(-1, 3)[:, ::-1]).reshape(-1)
                tri_loops = np.ascontiguousarray(tri_loops.reshape(-1, 3)[:, ::-1]).reshape(-1)
        arrays = {"positions": frames.points_to_gltf(co),
                  "faces": tri_verts.reshape(-1, 3)}
        layer = me.uv_layers.get(uv_map) if uv_map else me.uv_layers.active
        if layer is not None:
            loop_uv = np.empty(len(me.loops) * 2, np.float32)
            layer.uv.foreach_get("vector", loop_uv)
            arrays["uvs"] = frames.uvs_to_gltf(loop_uv.reshape(-1, 2)[tri_loops], n_tris)
            image = start_image(obj)
            if image is not None:
                arrays["texture"] = image_rgba8(image)
        return arrays
    finally:
        evaluated.to_mesh_clear()


def start_image(obj: bpy.types.Object) -> bpy.types.Image | None:
    """The image a refine starts from: the active slot's base-colour image, else the first slot's that has one."""
    slots = [obj.active_material] + [slot.material for slot in obj.material_slots]
    for mat in slots:
        node = base_color_image_node(mat)
        if node is not None and node.image is not None and node.image.size[0] > 0:
            return node.image
    return None


def refine_uv_map(obj: bpy.types.Object) -> str:
    """The UV map a refine sends and the result is shown with: the active one (the UV editor's)."""
    return obj.data.uv_layers.active.name


def check_refinable(obj: bpy.types.Object) -> None:
    if obj.type != "MESH":
        raise SceneError(f"{obj.name}: is a {obj.type.lower()}, not a mesh")
    if len(obj.data.polygons) == 0:
        raise SceneError(f"{obj.name}: has no faces to texture (only vertices or edges)")


def ensure_uvs(obj: bpy.types.Object) -> bool:
    """Give a mesh without a UV map one (Smart UV Project into "PSD UV"), so the backend's texture
    maps back onto the artist's own loops. Returns True when it unwrapped. The object ends in object
    mode, also when the unwrap fails (then without the new layer)."""
    if obj.data.uv_layers:
        return False
    check_refinable(obj)
    # edit mode takes in every selected mesh (and Smart UV Project unwraps them all): only this one, for now
    view_layer = bpy.context.view_layer
    selected, active = [o for o in view_layer.objects if o.select_get()], view_layer.objects.active
    for o in selected:
        o.select_set(False)
    obj.select_set(True)
    view_layer.objects.active = obj
    try:
        with bpy.context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                                       selected_editable_objects=[obj]):
            bpy.ops.object.mode_set(mode="EDIT")
            try:
                bpy.ops.mesh.select_all(action="SELECT")
                obj.data.uv_layers.new(name="PSD UV")
                bpy.ops.uv.smart_project(island_margin=0.02)
            except RuntimeError as exc:
                bpy.ops.object.mode_set(mode="OBJECT")
                layer = obj.data.uv_layers.get("PSD UV")
                if layer is not None:
                    obj.data.uv_layers.remove(layer)
                raise SceneError(f"{obj.name}: could not be unwrapped ({exc}); give it a UV map") from exc
            bpy.ops.object.mode_set(mode="OBJECT")
    finally:
        obj.select_set(obj in selected)
        for o in selected:
            o.select_set(True)
        view_layer.objects.active = active
    return True


# -- refine: a new image on the selected object's materials, and back ---------------------------
def used_elsewhere(obj: bpy.types.Object, mat: bpy.types.Material) -> bool:
    """Whether an object other than ``obj`` shows ``mat``."""
    return any(o != obj and any(slot.material == mat for slot in o.material_slots) for o in bpy.data.objects)


def own_materials(obj: bpy.types.Object) -> list[bpy.types.Material]:
    """The object's materials, one per slot, made its own so that a refine changes no other object:
    an object without materials gets one, an empty slot a new one, and a material another object
    shows is replaced (in this object's slot only) by a copy, which Revert swaps back."""
    if not obj.material_slots:
        obj.data.materials.append(None)
    shared_mesh = obj.data.users > 1
    copies: dict[str, bpy.types.Material] = {}
    out: list[bpy.types.Material] = []
    for slot in obj.material_slots:
        mat = slot.material
        if mat is None or used_elsewhere(obj, mat):
            if mat is None:
                new = bpy.data.materials.new(f"{obj.name} PSD")
            else:
                new = copies.get(mat.name)
                if new is None:
                    new = copies[mat.name] = mat.copy()
                    new[ORIGINAL_MATERIAL_KEY] = mat.name
            if shared_mesh and slot.link == "DATA":  # the mesh's slots are the other objects' too
                slot.link = "OBJECT"
            slot.material = mat = new
        if mat not in out:
            out.append(mat)
    return out


def attach_refine_image(obj: bpy.types.Object, job: str, width: int, height: int,
                        uv_map: str | None = None) -> bpy.types.Image:
    """Show a new image (for the refine job's texture) on the Base Color of every material of the
    object, sampled with the UV map that was sent (``uv_map``, default the active one), keeping each
    original image, which ``revert`` puts back."""
    uv_map = uv_map or refine_uv_map(obj)
    image = ensure_image(job, obj.name, width, height)
    for mat in own_materials(obj):
        _show_image(mat, image, uv_map)
        mat[JOB_KEY] = job
    return image


def _show_image(mat: bpy.types.Material, image: bpy.types.Image, uv_map: str) -> None:
    mat.use_nodes = True
    tree = mat.node_tree
    node = base_color_image_node(mat)
    if node is None:
        bsdf = principled(mat)
        node = tree.nodes.new("ShaderNodeTexImage")
        node.location = (bsdf.location[0] - 320, bsdf.location[1])
        tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    if ORIGINAL_KEY not in mat:  # a second refine keeps the very first original
        mat[ORIGINAL_KEY] = node.image.name if node.image is not None else ""
        if node.image is not None:
            node.image.use_fake_user = True  # kept in the .blend while no node uses it
    node.image = image
    vector = node.inputs["Vector"]
    if not vector.is_linked or vector.links[0].from_node.name == UV_NODE:  # an artist's mapping stays
        uv_node = tree.nodes.get(UV_NODE) or tree.nodes.new("ShaderNodeUVMap")
        uv_node.name = uv_node.label = UV_NODE
        uv_node.uv_map = uv_map
        uv_node.location = (node.location[0] - 220, node.location[1])
        tree.links.new(uv_node.outputs["UV"], vector)


def refined(obj: bpy.types.Object | None) -> bool:
    """Whether a refine changed one of the object's materials (so Revert has something to put back)."""
    return obj is not None and any(slot.material is not None and (ORIGINAL_KEY in slot.material or
                                   ORIGINAL_MATERIAL_KEY in slot.material) for slot in obj.material_slots)


def revert(obj: bpy.types.Object) -> list[str]:
    """Put back, in every slot, the material or image it had before the object's first refine.
    Returns the names put back ("" for a slot that had no image)."""
    if not refined(obj):
        raise SceneError(f"{obj.name}: its materials were not refined by psd3d; nothing to revert")
    restored = []
    for slot in obj.material_slots:
        mat = slot.material
        if mat is None:
            continue
        if ORIGINAL_MATERIAL_KEY in mat:  # a copy of a shared material: the shared one comes back
            original = bpy.data.materials.get(mat[ORIGINAL_MATERIAL_KEY])
            if original is None:
                raise SceneError(f"{obj.name}: the original material {mat[ORIGINAL_MATERIAL_KEY]!r} is no longer in this file")
            slot.material = original
            if mat.users == 0:
                bpy.data.materials.remove(mat)
            restored.append(original.name)
        elif ORIGINAL_KEY in mat:
            restored.append(_restore_image(obj, mat))
    return restored


def _restore_image(obj: bpy.types.Object, mat: bpy.types.Material) -> str:
    node = base_color_image_node(mat)
    original = mat[ORIGINAL_KEY]
    if node is not None:
        if original:
            image = bpy.data.images.get(original)
            if image is None:
                raise SceneError(f"{obj.name}: the original image {original!r} is no longer in this file")
            node.image = image
        else:  # there was no image: remove the node we added
            mat.node_tree.nodes.remove(node)
    uv_node = mat.node_tree.nodes.get(UV_NODE)
    if uv_node is not None:
        mat.node_tree.nodes.remove(uv_node)
    del mat[ORIGINAL_KEY]
    return original
