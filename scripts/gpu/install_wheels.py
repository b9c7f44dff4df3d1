#!/usr/bin/env python
"""Install the wheels of ``.wheels/`` (made by ``scripts/gpu/prepare``) that this Python lacks.

Standard library only: it runs before anything of the project can be imported. A wheel whose
distribution is already installed is left out, so the machine's own versions (its torch,
transformers, huggingface_hub, ...) are never replaced. The rest go, without dependencies and
without an index, into a fresh ``--site`` folder; the folder is printed on stdout (nothing when no
wheel was needed), for the caller to put on PYTHONPATH. A JSON record of what happened goes to
``--record``.

    python scripts/gpu/install_wheels.py --wheels .wheels --site /tmp/psd3d-gpu-site --record /tmp/install.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def distribution_of(wheel: Path) -> str:
    """A wheel file's distribution name (the part before the first '-', PEP 427)."""
    return wheel.name.split("-", 1)[0]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install(wheels: list[Path], site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, wheels)],
                          capture_output=True, text=True)


def install(wheel_dir: Path, site: Path) -> dict:
    start = time.perf_counter()
    record: dict = {"wheels_dir": str(wheel_dir), "site": "", "installed": [], "present": {}, "failed": {}}
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        record["note"] = f"no wheels in {wheel_dir} (run scripts/gpu/prepare on a machine with pip access)"
    needed = []
    for wheel in wheels:
        version = installed_version(distribution_of(wheel))
        if version is None:
            needed.append(wheel)
        else:
            record["present"][distribution_of(wheel)] = version
    if needed:
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        result = pip_install(needed, site)
        if result.returncode == 0:
            record["installed"] = [w.name for w in needed]
        else:  # one wheel that does not fit this Python stops pip's whole call: try them one by one
            for wheel in needed:
                one = pip_install([wheel], site)
                if one.returncode == 0:
                    record["installed"].append(wheel.name)
                else:
                    record["failed"][wheel.name] = (one.stderr or one.stdout).strip()[-500:]
        if record["installed"]:
            record["site"] = str(site)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--record", type=Path, required=True)
    args = ap.parse_args()
    record = install(args.wheels, args.site)
    args.record.write_text(json.dumps(record, indent=1))
    for name, error in record["failed"].items():
        print(f"install_wheels: {name} failed: {error}", file=sys.stderr)
    print(f"install_wheels: {len(record['installed'])} installed, {len(record['present'])} already present, "
          f"{len(record['failed'])} failed ({record['seconds']} s)", file=sys.stderr)
    print(record["site"])


if __name__ == "__main__":
    main()
