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
UV_NAME = "UVMap"


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
        image = bpy.data.images.new(f"{name} PSD", width, height, alpha=True)
        image[JOB_KEY] = job
        image.colorspace_settings.name = "sRGB"
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


_pixel_buffer = np.empty(0, np.float32)  # reused between texture snapshots (no 16 MiB allocation per 1024² texture)


def apply_texture(image: bpy.types.Image, rgba: np.ndarray) -> None:
    """Write an (H,W,4) uint8 sRGB texture (row 0 at the top) into ``image`` in place."""
    global _pixel_buffer
    h, w = rgba.shape[:2]
    if tuple(image.size) != (w, h):
        image.scale(w, h)
    if _pixel_buffer.size != rgba.size:
        _pixel_buffer = np.empty(rgba.size, np.float32)
    image.pixels.foreach_set(frames.rgba8_to_blender_pixels(rgba, out=_pixel_buffer))
    image.update()


def image_rgba8(image: bpy.types.Image) -> np.ndarray:
    w, h = image.size
    pixels = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(pixels)
    return frames.blender_pixels_to_rgba8(pixels, w, h)


# -- reading the artist's mesh -----------------------------------------------------------------
def mesh_arrays(obj: bpy.types.Object, depsgraph, linear: np.ndarray | None = None) -> dict:
    """The object's evaluated mesh (modifiers applied), triangulated, as glTF arrays: positions (in its
    local frame, or mapped by the 3x3 ``linear`` first; a mirroring one also reverses the winding, so
    faces keep facing out), faces, and with an active UV map per-corner uvs, with a base-colour image
    the texture."""
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
        layer = me.uv_layers.active
        if layer is not None:
            loop_uv = np.empty(len(me.loops) * 2, np.float32)
            layer.uv.foreach_get("vector", loop_uv)
            arrays["uvs"] = frames.uvs_to_gltf(loop_uv.reshape(-1, 2)[tri_loops], n_tris)
            node = base_color_image_node(obj.active_material)
            if node is not None and node.image is not None and node.image.size[0] > 0:
                arrays["texture"] = image_rgba8(node.image)
        return arrays
    finally:
        evaluated.to_mesh_clear()


def ensure_uvs(obj: bpy.types.Object) -> bool:
    """Give a mesh without a UV map one (Smart UV Project into "PSD UV"), so the backend's texture
    maps back onto the artist's own loops. Returns True when it unwrapped. The object ends in object mode."""
    if obj.data.uv_layers:
        return False
    with bpy.context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                                   selected_editable_objects=[obj]):
        bpy.ops.object.mode_set(mode="EDIT")
        bpy.ops.mesh.select_all(action="SELECT")
        obj.data.uv_layers.new(name="PSD UV")
        bpy.ops.uv.smart_project(island_margin=0.02)
        bpy.ops.object.mode_set(mode="OBJECT")
    return True


# -- refine: a new image on the selected object's material, and back ------------------------------
def attach_refine_image(obj: bpy.types.Object, job: str, width: int, height: int) -> bpy.types.Image:
    """Give the object's material a new image (for the refine job's texture) on Base Color, keeping the
    original image, which ``revert`` puts back. A material is created when the object has none."""
    mat = obj.active_material
    if mat is None:
        mat = bpy.data.materials.new(f"{obj.name} PSD")
        obj.data.materials.append(mat)
    mat.use_nodes = True
    node = base_color_image_node(mat)
    if node is None:
        bsdf = principled(mat)
        node = mat.node_tree.nodes.new("ShaderNodeTexImage")
        node.location = (bsdf.location[0] - 320, bsdf.location[1])
        mat.node_tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    if ORIGINAL_KEY not in mat:  # a second refine keeps the very first original
        mat[ORIGINAL_KEY] = node.image.name if node.image is not None else ""
        if node.image is not None:
            node.image.use_fake_user = True  # kept in the .blend while no node uses it
    image = ensure_image(job, obj.name, width, height)
    node.image = image
    mat[JOB_KEY] = job
    return image


def revert(obj: bpy.types.Object) -> str:
    """Put back the image the object's material had before its first refine. Returns its name."""
    mat = obj.active_material
    if mat is None or ORIGINAL_KEY not in mat:
        raise SceneError(f"{obj.name}: its material was not refined by psd3d; nothing to revert")
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
    del mat[ORIGINAL_KEY]
    return original
