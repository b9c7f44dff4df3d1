"""The Blender extension zip built by scripts/build_addon: its contents, and an install the way a
user does it ("Install from Disk") in a fresh headless Blender (the bpy module), in a subprocess
so the bpy state of this pytest process is untouched.

The wheels come from .wheels/addon/ (filled by the first build, which needs PyPI; offline after).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "blender_addon"
PLATFORMS = {"linux-x64", "linux-arm64", "macos-arm64", "macos-x64", "windows-x64"}
REPO_MODULE = "psd3d_test_repo"
ADDON_KEY = f"bl_ext.{REPO_MODULE}.psd3d"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower()] = version.split("#")[0].strip()
    return pins


def _wheel_platforms(filename: str) -> set[str]:
    """Blender platforms a wheel serves, by its platform tag (the same rules as Blender's filter)."""
    out = set()
    for tag in filename[:-4].split("-")[-1].split("."):
        if tag == "any":
            out |= PLATFORMS
        elif tag.startswith("manylinux") and tag.endswith("_x86_64"):
            out.add("linux-x64")
        elif tag.startswith("manylinux") and tag.endswith("_aarch64"):
            out.add("linux-arm64")
        elif tag.startswith("macosx_") and tag.endswith(("_arm64", "_universal2")):
            out.add("macos-arm64")
        if tag.startswith("macosx_") and tag.endswith(("_x86_64", "_universal2")):
            out.add("macos-x64")
        if tag == "win_amd64":
            out.add("windows-x64")
    return out


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("addon_dist")
    # --no-validate: Blender's strict manifest check has a test of its own, below.
    run = subprocess.run(["bash", str(ROOT / "scripts" / "build_addon"), "--out", str(out), "--no-validate"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"scripts/build_addon failed:\n{run.stdout}\n{run.stderr}"
    version = tomllib.loads((ADDON / "blender_manifest.toml").read_text())["version"]
    path = out / f"psd3d_blender-{version}.zip"
    assert path.is_file() and path.name in run.stdout, run.stdout
    return path


def test_zip_holds_the_addon_and_a_wheel_of_each_dependency_for_every_platform(addon_zip):
    with zipfile.ZipFile(addon_zip) as zf:
        names = set(zf.namelist())
        manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
        files = {n: zf.read(n) for n in names}
    source_manifest = tomllib.loads((ADDON / "blender_manifest.toml").read_text())

    # The add-on at the zip root, byte for byte, and nothing compiled.
    addon_files = {p.relative_to(ADDON).as_posix() for p in ADDON.rglob("*.py") if "__pycache__" not in p.parts}
    assert {"__init__.py", "blender_manifest.toml"} <= names
    assert any(n.startswith("core/") for n in names) and any(n.startswith("blender/") for n in names)
    for rel in addon_files:
        assert files[rel] == (ADDON / rel).read_bytes(), rel
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert names - addon_files - {"blender_manifest.toml"} == {n for n in names if n.startswith("wheels/")}

    # The manifest is the source one with `wheels` filled in, and lists exactly the bundled wheels.
    assert {k: v for k, v in manifest.items() if k != "wheels"} == \
        {k: v for k, v in source_manifest.items() if k != "wheels"}
    wheels = manifest["wheels"]
    assert sorted(f"./{n}" for n in names if n.startswith("wheels/")) == sorted(wheels)
    assert all(w.startswith("./wheels/") and w.endswith(".whl") for w in wheels)
    assert set(manifest["platforms"]) == PLATFORMS

    pins = _pins()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    expected = {"pyzmq": pins["pyzmq"], "msgpack": pins["msgpack"], "psd3d_protocol": version}
    names_of = [w.rsplit("/", 1)[1] for w in wheels]
    assert not [n for n in names_of if n.startswith("numpy-")]  # Blender ships numpy
    for platform in manifest["platforms"]:
        for dist, ver in expected.items():
            match = [n for n in names_of if n.startswith(f"{dist}-{ver}-") and platform in _wheel_platforms(n)]
            assert len(match) == 1, (platform, dist, match)
            python_tag, abi_tag = match[0][:-4].split("-")[2:4]
            assert (python_tag, abi_tag) in {("cp311", "cp311"), ("py3", "none")}, match[0]
    assert {n.split("-")[0] for n in names_of} == set(expected)

    # Our protocol wheel: every protocol module, a valid RECORD, importable metadata.
    whl = files[f"wheels/psd3d_protocol-{version}-py3-none-any.whl"]
    with zipfile.ZipFile(io.BytesIO(whl)) as wz:
        inner = {n: wz.read(n) for n in wz.namelist()}
    dist_info = f"psd3d_protocol-{version}.dist-info"
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "protocol").rglob("*.py") if "__pycache__" not in p.parts}
    assert {n for n in inner if not n.startswith(dist_info + "/")} == source
    for rel in source:
        assert inner[rel] == (ROOT / rel).read_bytes(), rel
    metadata = inner[f"{dist_info}/METADATA"].decode()
    assert "Name: psd3d_protocol\n" in metadata and f"Version: {version}\n" in metadata
    assert "Root-Is-Purelib: true" in inner[f"{dist_info}/WHEEL"].decode()
    assert "Tag: py3-none-any" in inner[f"{dist_info}/WHEEL"].decode()
    rows = list(csv.reader(inner[f"{dist_info}/RECORD"].decode().splitlines()))
    assert {r[0] for r in rows} == set(inner)
    for name, digest, size in rows:
        if name.endswith("/RECORD"):
            continue
        data = inner[name]
        expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert (digest, int(size)) == (f"sha256={expect}", len(data)), name


def test_a_rebuild_is_offline_and_byte_identical(addon_zip, tmp_path):
    """The wheel cache is filled now: a second build must not reach PyPI (a dead proxy and index
    make any download fail) and, with fixed zip timestamps, gives the same bytes."""
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "build_addon"), "--out", str(tmp_path), "--no-validate"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert (tmp_path / addon_zip.name).read_bytes() == addon_zip.read_bytes()


def test_blenders_strict_validation_accepts_the_zip(addon_zip):
    """What `blender --command extension validate` (and `extension build`, and the upload to
    extensions.blender.org) checks. Install from Disk only checks loosely: e.g. it accepts
    [permissions] reasons over 64 characters, which the strict check rejects."""
    import importlib.util

    spec = importlib.util.find_spec("bpy")  # the module's location, without importing it
    if spec is None:
        pytest.skip("bpy is not installed")
    tools = sorted(t for p in spec.submodule_search_locations for t in
                   Path(p).glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    assert tools, "bl_pkg/cli/blender_ext.py not found in the bpy package"
    run = subprocess.run([sys.executable, str(tools[-1]), "validate", str(addon_zip)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.stdout + run.stderr).strip()


# Runs in a fresh interpreter: hides every copy of protocol, zmq and msgpack outside the extension
# (the repo's editable install, the venv's site-packages), installs the zip with Blender's own
# operator, enables it, checks what it registered and where its imports came from, then disables
# and uninstalls it. Prints one JSON line of facts for the test to judge.
INSTALL_CHECK = r'''
import importlib, importlib.machinery, json, os, site, sys

zip_path, repo_root, repo_dir, repo_module = sys.argv[1:5]
BUNDLED = ("protocol", "zmq", "msgpack")
facts = {}

# 1. The repo's protocol (editable install: a meta-path finder and a path hook) must not be found.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
real = lambda p: os.path.realpath(p or os.getcwd())
sys.path[:] = [p for p in sys.path if "__editable__" not in p and real(p) != real(repo_root)]
sys.path_importer_cache.clear()
blocked = {real(repo_root), *map(real, site.getsitepackages())}

class OnlyBundled:
    """protocol, zmq and msgpack only from sys.path entries outside the repo and the venv's
    site-packages: after the install, that is Blender's extension site-packages."""
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in BUNDLED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if real(p) not in blocked])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (outside the repo and venv)", name=name)
        return spec

sys.meta_path.insert(0, OnlyBundled)

def importable(name):
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False

facts["importable_before"] = {n: importable(n) for n in BUNDLED}

import bpy  # noqa: E402
import addon_utils  # noqa: E402

prefs = bpy.context.preferences
facts["user_extensions"] = bpy.utils.user_resource("EXTENSIONS")
site_packages = os.path.join(facts["user_extensions"], ".local", "lib",
                             "python{}.{}".format(*sys.version_info[:2]), "site-packages")
facts["site_packages"] = site_packages

repo = prefs.extensions.repos.new(name="psd3d test", module=repo_module, custom_directory=repo_dir, source="USER")
facts["repo_directory"] = repo.directory

# 2. Install from disk, enabled on install (what the Preferences' "Install from Disk" runs).
facts["install_result"] = sorted(bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo=repo_module, enable_on_install=True))
key = f"bl_ext.{repo_module}.psd3d"
facts["enabled"] = key in prefs.addons
facts["addon_prefs"] = type(prefs.addons[key].preferences).__name__ if key in prefs.addons else None
facts["scene_prop"] = hasattr(bpy.types.Scene, "psd3d")
facts["scene_settings"] = type(bpy.context.scene.psd3d).__name__ if facts["scene_prop"] else None
facts["operators"] = sorted(dir(bpy.ops.psd3d))
facts["panels"] = sorted(n for n in dir(bpy.types) if n.startswith("PSD_"))
addon = sys.modules.get(key)
facts["addon_file"] = getattr(addon, "__file__", None)
facts["module_files"] = {n: getattr(sys.modules.get(n), "__file__", None) for n in BUNDLED}
conn = sys.modules.get(key + ".blender.connection")
facts["addon_uses_installed_protocol"] = bool(conn) and conn.Session is sys.modules["protocol.session"].Session
facts["site_packages_entries"] = sorted(os.listdir(site_packages)) if os.path.isdir(site_packages) else []

# 3. The bundled stack works: a message through protocol's wire format over a zmq socket pair.
if facts["enabled"]:
    import numpy as np, zmq
    from protocol.wire import Message, decode, encode
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://psd3d-test"); b.connect("inproc://psd3d-test")
    a.send_multipart(encode(Message("ping", id="1", body={"x": [1, 2]}, arrays={"v": np.arange(3, dtype=np.float32)})))
    got = decode(b.recv_multipart())
    facts["round_trip"] = [got.type, got.id, got.body, got.arrays["v"].tolist()]
    a.close(); b.close(); ctx.term()

# 4. Disable: nothing of the add-on may stay registered (the same probes see it while enabled).
def registered():
    pump = sys.modules.get(key + ".blender.pump")
    return {
        "enabled": key in prefs.addons,
        "scene_prop": hasattr(bpy.types.Scene, "psd3d"),
        "operators": sorted(dir(bpy.ops.psd3d)),
        "types": sorted(n for n in dir(bpy.types) if n.startswith("PSD_")),
        "status_bar": [f.__module__ for f in bpy.types.STATUSBAR_HT_header._dyn_ui_initialize()
                       if "psd3d" in getattr(f, "__module__", "")],
        "load_post": [f.__module__ for f in bpy.app.handlers.load_post if "psd3d" in getattr(f, "__module__", "")],
        "timers": bool(pump) and bpy.app.timers.is_registered(pump.tick),
    }

facts["while_enabled"] = registered()
addon_utils.disable(key, default_set=True, handle_error=lambda ex: facts.setdefault("disable_error", str(ex)))
facts["after_disable"] = registered()

# 5. Uninstall: the package and its wheels leave the disk.
facts["uninstall_result"] = sorted(bpy.ops.extensions.package_uninstall(repo_directory=repo_dir, pkg_id="psd3d"))
facts["after_uninstall"] = {
    "package_dir": os.path.exists(os.path.join(repo_dir, "psd3d")),
    "enabled": key in prefs.addons,
    "site_packages_entries": sorted(os.listdir(site_packages)) if os.path.isdir(site_packages) else [],
}
print("FACTS " + json.dumps(facts))
'''


@pytest.mark.slow
def test_blender_installs_the_zip_and_the_addon_runs_on_its_bundled_wheels(addon_zip, tmp_path):
    home = tmp_path / "blender_home"
    repo_dir = tmp_path / "extension_repo"
    script = tmp_path / "install_check.py"
    script.write_text(INSTALL_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLENDER_", "PYTHON"))}
    env.update({  # a throwaway Blender home: the real user's config and extensions stay untouched
        "BLENDER_USER_RESOURCES": str(home / "resources"),
        "BLENDER_USER_CONFIG": str(home / "config"),
        "BLENDER_USER_SCRIPTS": str(home / "scripts"),
        "BLENDER_USER_DATAFILES": str(home / "datafiles"),
        "BLENDER_USER_EXTENSIONS": str(home / "extensions"),
        "PYTHONNOUSERSITE": "1",
    })
    run = subprocess.run([sys.executable, str(script), str(addon_zip), str(ROOT), str(repo_dir), REPO_MODULE],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert run.returncode == 0, log
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("FACTS ")]
    assert lines, log
    facts = json.loads(lines[-1][len("FACTS "):])

    assert facts["importable_before"] == {"protocol": False, "zmq": False, "msgpack": False}, log
    assert Path(facts["user_extensions"]).resolve() == (home / "extensions").resolve()
    assert Path(facts["repo_directory"]).resolve() == repo_dir.resolve()

    assert facts["install_result"] == ["FINISHED"], log
    assert facts["enabled"], log
    assert facts["addon_prefs"] == "PSD_Preferences"
    assert facts["scene_prop"] and facts["scene_settings"] == "PSD_Settings"
    assert {"generate", "refine", "batch", "cancel"} <= set(facts["operators"])
    assert "PSD_PT_main" in facts["panels"]
    assert Path(facts["addon_file"]).resolve() == (repo_dir / "psd3d" / "__init__.py").resolve()
    site_packages = Path(facts["site_packages"]).resolve()
    for name, file in facts["module_files"].items():  # from the installed wheels, not the repo or venv
        assert file and site_packages in Path(file).resolve().parents, (name, file)
        assert ROOT not in Path(file).resolve().parents, (name, file)
    assert facts["addon_uses_installed_protocol"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    pins = _pins()
    assert {f"psd3d_protocol-{version}.dist-info", f"pyzmq-{pins['pyzmq']}.dist-info",
            f"msgpack-{pins['msgpack']}.dist-info", "protocol", "zmq", "msgpack"} <= set(facts["site_packages_entries"])
    assert facts["round_trip"] == ["ping", "1", {"x": [1, 2]}, [0.0, 1.0, 2.0]]

    on = facts["while_enabled"]
    assert on["enabled"] and on["scene_prop"] and on["operators"] and on["types"], on
    assert on["status_bar"] and on["load_post"] and on["timers"], on
    assert "disable_error" not in facts, facts.get("disable_error")
    assert facts["after_disable"] == {"enabled": False, "scene_prop": False, "operators": [], "types": [],
                                      "status_bar": [], "load_post": [], "timers": False}, log

    assert facts["uninstall_result"] == ["FINISHED"], log
    assert facts["after_uninstall"]["package_dir"] is False
    assert facts["after_uninstall"]["enabled"] is False
    assert not {"protocol", "zmq", "msgpack"} & set(facts["after_uninstall"]["site_packages_entries"]), log
