"""The add-on's bpy-free core: frames, layouts and library files (no Blender needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blender_addon.core import frames, library, pixels, text  # noqa: E402
from protocol import specs  # noqa: E402


def test_points_round_trip_and_y_up_becomes_z_up():
    p = np.array([[1, 2, 3], [-4, 5, 0.5]], np.float32)
    b = frames.points_to_blender(p)
    assert np.allclose(b, [[1, -3, 2], [-4, -0.5, 5]])
    assert np.allclose(frames.points_to_gltf(b), p)
    assert np.allclose(frames.GLTF_TO_BLENDER[:3, :3] @ p.T, b.T)


def test_a_blender_camera_becomes_a_gltf_camera_looking_the_same_way():
    # a Blender camera 5 m along -Y (in front of the origin), looking at it (+Y), Z up
    c2w = np.array([[1, 0, 0, 0], [0, 0, -1, -5], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)
    g = frames.camera_to_gltf(c2w, np.eye(4))
    assert np.allclose(g[:3, 3], [0, 0, 5])  # glTF: in front = +Z
    assert np.allclose(g[:3, :3] @ [0, 0, -1], [0, 0, -1])  # looks down -Z towards the origin
    assert np.allclose(g[:3, :3] @ [0, 1, 0], [0, 1, 0])  # its up is glTF's up
    shifted = frames.camera_to_gltf(c2w, np.array([[1, 0, 0, -2], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    assert np.allclose(shifted[:3, 3], [-2, 0, 5])  # into the frame of an object at x = 2


def test_a_scaled_camera_object_gives_a_rigid_camera():
    c2w = np.array([[1, 0, 0, 0], [0, 0, -1, -5], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)
    scaled = c2w @ np.diag([2.0, 0.5, 3.0, 1.0])  # the camera object scaled (2, 0.5, 3)
    g = frames.camera_to_gltf(scaled, np.eye(4))
    assert np.allclose(g[:3, :3] @ g[:3, :3].T, np.eye(3)) and np.isclose(np.linalg.det(g[:3, :3]), 1.0)
    assert np.allclose(g, frames.camera_to_gltf(c2w, np.eye(4)))  # the same view as the unscaled camera
    for mirror in ([-1.0, 1, 1], [-2.0, 1, 1], [1.0, -1, 1], [1.0, 1, -3]):  # mirrored (a rig scaled -1)
        g = frames.camera_to_gltf(c2w @ np.diag([*mirror, 1.0]), np.eye(4))
        assert np.isclose(np.linalg.det(g[:3, :3]), 1.0)
        # the view direction and the up it renders with are the matrix's own -Z and +Y, unit length
        m = (frames.BLENDER_TO_GLTF @ c2w @ np.diag([*mirror, 1.0]))[:3, :3]
        assert np.allclose(g[:3, 2], m[:, 2] / np.linalg.norm(m[:, 2]))
        assert np.allclose(g[:3, 1], m[:, 1] / np.linalg.norm(m[:, 1]))


def test_square_renders_cover_the_whole_camera_frame():
    ax = np.radians(60)
    assert frames.square_fov_degrees("AUTO", ax, 0.0, 100, 100) == pytest.approx(60)
    assert frames.square_fov_degrees("AUTO", ax, 0.0, 200, 100) == pytest.approx(60)  # wide: its horizontal fov
    assert frames.square_fov_degrees("AUTO", ax, 0.0, 100, 200) == pytest.approx(60)  # tall: its vertical fov
    fov_y = frames.fov_y_degrees("VERTICAL", ax, np.radians(40), 200, 100)
    wide = np.degrees(2 * np.arctan(np.tan(np.radians(fov_y) / 2) * 2))
    assert frames.square_fov_degrees("VERTICAL", ax, np.radians(40), 200, 100) == pytest.approx(wide)


def test_vertical_field_of_view_follows_blenders_sensor_fit():
    ax = np.radians(60)
    assert frames.fov_y_degrees("AUTO", ax, 0.0, 100, 100) == pytest.approx(60)
    assert frames.fov_y_degrees("AUTO", ax, 0.0, 200, 100) == pytest.approx(np.degrees(2 * np.arctan(np.tan(ax / 2) / 2)))
    assert frames.fov_y_degrees("AUTO", ax, 0.0, 100, 200) == pytest.approx(60)
    assert frames.fov_y_degrees("VERTICAL", ax, np.radians(40), 200, 100) == pytest.approx(40)


def test_uvs_and_pixels_flip_and_round_trip():
    uvs = np.random.default_rng(0).random((5, 3, 2)).astype(np.float32)
    loops = frames.uvs_to_blender(uvs)
    assert loops.shape == (15, 2) and np.allclose(loops[:, 1], 1 - uvs.reshape(-1, 2)[:, 1])
    assert np.allclose(frames.uvs_to_gltf(loops, 5), uvs)
    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    px = frames.rgba8_to_blender_pixels(rgba)
    assert px.dtype == np.float32 and np.allclose(px.reshape(3, 4, 4)[0], rgba[2] / 255)  # bottom row first
    assert np.array_equal(frames.blender_pixels_to_rgba8(px, 4, 3), rgba)
    tall = np.random.default_rng(2).integers(0, 256, (2 * frames.PIXEL_CHUNK_ROWS + 3, 5, 4), dtype=np.uint8)
    expected = (tall[::-1].reshape(-1) / np.float32(255)).astype(np.float32)  # across chunk boundaries
    assert np.allclose(frames.rgba8_to_blender_pixels(tall), expected, atol=1e-7)
    assert frames.rgba8_to_blender_pixels(np.zeros((0, 4, 4), np.uint8)).size == 0
    big = np.random.default_rng(3).integers(0, 256, (700, 513, 4), dtype=np.uint8)  # banded on threads
    expected = (big[::-1].reshape(-1) / np.float32(255)).astype(np.float32)
    assert np.allclose(frames.rgba8_to_blender_pixels(big), expected, atol=1e-7)


def test_texture_snapshots_are_converted_on_the_converters_thread_newest_first():
    """Item 9: the uint8 -> float conversion runs on the converter's worker thread, never the caller's
    (Blender's main thread); what comes back is ready for ``foreach_set``: flat float32 in 0..1, rows
    bottom-up, colour not premultiplied by alpha; a snapshot still waiting is replaced by a newer one."""
    import threading

    threads: list[threading.Thread] = []
    original = frames.rgba8_to_blender_pixels

    def recording(rgba, out=None, linear=False):
        threads.append(threading.current_thread())
        return original(rgba, out=out, linear=linear)

    frames.rgba8_to_blender_pixels = recording
    converter = pixels.TextureConverter()
    try:
        rgba = np.random.default_rng(4).integers(0, 256, (6, 5, 4), dtype=np.uint8)
        rgba[..., 3] = 0  # transparent: a premultiplying conversion would zero the colour
        converter.submit("a", rgba)
        assert converter.wait(timeout=10)
        [done] = converter.ready()
        assert threads and threading.current_thread() not in threads
        assert (done.key, done.width, done.height, done.error) == ("a", 5, 6, None)
        assert done.pixels.dtype == np.float32 and done.pixels.shape == (6 * 5 * 4,)
        # linear colour for the job's float image (sRGB decoded), alpha as it is
        c = rgba[::-1] / 255.0
        expected = np.concatenate([np.where(c[..., :3] <= 0.04045, c[..., :3] / 12.92, ((c[..., :3] + 0.055) / 1.055) ** 2.4),
                                   c[..., 3:]], axis=-1)
        np.testing.assert_allclose(done.pixels.reshape(6, 5, 4), expected, atol=1e-7)
        assert np.array_equal(frames.blender_pixels_to_rgba8(done.pixels, 5, 6, linear=True), rgba)
        assert not converter.pending()
        buffer = done.pixels
        converter.release(done)
        assert done.pixels is None

        gate = threading.Event()  # hold the worker on a first snapshot while three more of one key arrive
        frames.rgba8_to_blender_pixels = lambda rgba, out=None, linear=False: (gate.wait(10), recording(rgba, out, linear))[1]
        converter.submit("b", np.zeros((2, 2, 4), np.uint8))
        for value in (10, 20, 30):
            converter.submit("a", np.full((6, 5, 4), value, np.uint8))
        assert converter.pending("a") and converter.pending("b")
        gate.set()
        assert converter.wait(timeout=10)
        done = {c.key: c for c in converter.ready()}
        newest = frames.blender_pixels_to_rgba8(done["a"].pixels, 5, 6, linear=True)
        assert set(done) == {"a", "b"} and np.all(newest == 30)  # only the newest of "a"
        assert done["a"].pixels is buffer  # the released buffer was reused: no new allocation
        assert threading.current_thread() not in threads

        converter.submit("c", np.zeros((2, 2, 3), np.uint8))  # a malformed snapshot is reported, not raised
        assert converter.wait(timeout=10)
        [bad] = converter.ready()
        assert bad.pixels is None and isinstance(bad.error, ValueError)
    finally:
        frames.rgba8_to_blender_pixels = original
        converter.close()


def test_triangle_loops_and_fit_size():
    loops, starts, totals = frames.triangle_loops(np.array([[0, 1, 2], [2, 1, 3]]))
    assert loops.tolist() == [0, 1, 2, 2, 1, 3] and starts.tolist() == [0, 3] and totals.tolist() == [3, 3]
    assert frames.fit_size(np.array([[0, 0, 0], [2, 1, 0.5]]), 1.0) == pytest.approx(0.5)
    assert frames.fit_size(np.zeros((3, 3)), 1.0) == 1.0


def test_prompt_lists_name_the_source_and_the_reason():
    assert library.parse_prompts("a\n\n# no\n  b  \n", "f.txt") == ["a", "b"]
    with pytest.raises(library.LibraryError, match="f.txt: has no prompts"):
        library.parse_prompts("# only a comment\n", "f.txt")
    with pytest.raises(library.LibraryError, match=f"at most {specs.MAX_BATCH}"):
        library.parse_prompts("x\n" * (specs.MAX_BATCH + 1), "big.txt")
    assert len(library.parse_prompts("x\n" * specs.MAX_BATCH, "full.txt")) == specs.MAX_BATCH


def test_the_addon_imports_the_protocols_limits_and_copies_none():
    """Item 13: a limit has one owner (protocol/specs.py); the add-on imports it, never a copy."""
    import ast

    assert library.MAX_BATCH is specs.MAX_BATCH
    owned = {name for name, value in vars(specs).items() if name.startswith("MAX_") and isinstance(value, int)}
    for path in (Path(__file__).resolve().parents[1] / "blender_addon").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                assert not names & owned, f"{path.name}: defines {names & owned}, which protocol.specs owns"
                assert not {n for n in names if "PROMPT" in n and n.startswith("MAX")}, f"{path.name}: a copied limit"


def test_catalogs_are_created_once_with_their_parents(tmp_path):
    first = library.ensure_catalog(tmp_path, "PSD3D / Props")
    again = library.ensure_catalog(tmp_path, "PSD3D/Props")
    assert first == again
    text = (tmp_path / library.CATALOG_FILE).read_text()
    assert "VERSION 1" in text and f"{first}:PSD3D/Props:PSD3D-Props" in text
    assert set(library.read_catalogs(tmp_path)) == {"PSD3D", "PSD3D/Props"}
    with pytest.raises(library.LibraryError, match="catalog"):
        library.ensure_catalog(tmp_path, "bad:name")
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, then renamed


def test_tags_and_slugs():
    assert library.asset_tags("psd", 3, "hpsv2.1", 0.25) == ["psd3d", "method:psd", "seed:3", "hpsv2.1:0.2500"]
    assert library.slug("A  wooden chest, with iron!") == "a_wooden_chest_with_iron"
    assert library.slug("!!!") == "prop"


# The bpy layer's modules as layers, bottom first: a module imports only modules of lower layers
# (DESIGN.md: no import circles, no imports hidden inside functions to dodge one).
BPY_LAYERS = (
    {"connection", "jobs", "notices"},  # the session, the job index, notices and redraws
    {"props", "scene"},  # settings; snapshots into Blender data
    {"assets", "submits"},  # batch results as assets; submits tracked or never delivered
    {"results"},  # a finished job's files
    {"pump"},  # the timer: events into the scene
    {"operators"},
    {"panel"},
    {"prefs"},
)


def _relative_imports(tree):
    """(module name imported, line, inside a function) for each ``from . import`` / ``from .x import``."""
    import ast

    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                if child.level == 1 and child.module:
                    names = [child.module.split(".")[0]]
                elif child.level == 1:
                    names = [alias.name for alias in child.names]
                else:
                    names = [f"..{child.module or ''}"]
                out.extend((name, child.lineno, nested) for name in names)
            visit(child, nested)

    visit(tree, False)
    return out


def test_the_bpy_layer_imports_downwards_only_and_at_module_level():
    import ast

    folder = Path(__file__).resolve().parents[1] / "blender_addon" / "blender"
    layer = {name: i for i, names in enumerate(BPY_LAYERS) for name in names}
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert modules == set(layer), f"place every module in BPY_LAYERS: {sorted(modules ^ set(layer))}"
    problems = []
    for name in sorted(modules):
        tree = ast.parse((folder / f"{name}.py").read_text(), f"{name}.py")
        for imported, line, in_function in _relative_imports(tree):
            if in_function:
                problems.append(f"{name}.py:{line} imports {imported} inside a function")
            elif imported.startswith(".."):
                if imported not in ("..core",):  # the bpy-free core sits below the whole bpy layer
                    problems.append(f"{name}.py:{line} imports {imported}")
            elif layer.get(imported, len(BPY_LAYERS)) >= layer[name]:
                problems.append(f"{name}.py:{line} imports {imported} (layer {layer.get(imported)}, "
                                f"not below {name}'s {layer[name]})")
    assert not problems, "\n".join(problems)
    for path in (folder.parent / "core").glob("*.py"):  # the core never reaches up into bpy
        imports = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not [n for n in imports if isinstance(n, ast.ImportFrom) and n.level > 1], path.name
        assert not [a.name for n in imports if isinstance(n, ast.Import) for a in n.names if a.name.startswith("bpy")]


def test_messages_lose_the_servers_file_paths():
    assert text.without_paths("cannot read /srv/psd3d/jobs/ab12/spec.json: no such file") == \
        "cannot read …/spec.json: no such file"
    assert text.without_paths(r"bad C:\data\jobs\x.glb") == "bad …/x.glb"
    assert text.without_paths("no backend at tcp://127.0.0.1:5557") == "no backend at tcp://127.0.0.1:5557"
    assert text.without_paths("steps: must be > 0 (got -1)") == "steps: must be > 0 (got -1)"


def test_no_module_of_the_bpy_layer_is_imported_by_name_or_dynamically():
    """Item 12: the layering test reads relative imports; an absolute or dynamic import would slip past it."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "blender_addon" / "blender"
    problems = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__"):
                problems.append(f"{path.name}:{node.lineno} imports dynamically")
            absolute = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(name.split(".")[0] == "blender_addon" for name in absolute):
                problems.append(f"{path.name}:{node.lineno} imports the add-on by its absolute name")
    assert not problems, "\n".join(problems)


def test_the_batch_limit_the_addon_enforces_is_the_name_it_imports(monkeypatch):
    """Item 13: parse_prompts enforces the imported MAX_BATCH, not a copy under another name."""
    monkeypatch.setattr(library, "MAX_BATCH", 3)
    assert len(library.parse_prompts("x\n" * 3, "ok.txt")) == 3
    with pytest.raises(library.LibraryError, match="at most 3"):
        library.parse_prompts("x\n" * 4, "big.txt")
