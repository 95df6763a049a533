"""twotower installs under one top-level name: the wheel built from this checkout holds only ``twotower``, installs
into a fresh venv, answers ``twotower --help``, exports the public API, and puts no generic name (``common``,
``index``, ``eval``...) into site-packages.

The default test installs the wheel with ``--no-deps`` and lends the fresh venv this venv's installed packages
through a ``.pth`` path line (a path line executes no other ``.pth`` file, so this checkout's editable finder is
not inherited); the ``slow`` variant resolves the dependencies for real, reusing the CPU torch wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = "from twotower import TwoTower, Retriever, build_index, run_bench; print(Retriever.__module__)"


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the tracked tree, so the checkout gets no build/ or egg-info and parallel runs don't
    collide."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    src = tmp / "src"
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():  # tracked but deleted in the work tree: skip
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    dist = tmp / "dist"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = dist.glob("twotower-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_only_twotower(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["twotower"]
    roots = {n.split("/")[0] for n in names}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"twotower"}, sorted(roots)
    # every stage is in it, and nothing from tests/ or scripts/
    for stage in ("towers", "index", "retrieval", "eval", "common", "eval/suites"):
        assert f"twotower/{stage}/__init__.py" in names, stage
    assert "twotower/cli.py" in names and not any("/tests/" in n or "scripts/" in n for n in names)


def _fresh_venv(tmp: Path) -> tuple[Path, Path]:
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=True).create(env_dir)
    return env_dir / "bin" / "python", env_dir


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point Python at the checkout (another test may have set
    PYTHONPATH for its subprocesses)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _check_installed(py: Path, env_dir: Path, cwd: Path) -> None:
    env = _clean_env()
    help_run = subprocess.run([str(env_dir / "bin" / "twotower"), "--help"], capture_output=True, text=True,
                              cwd=cwd, timeout=120, env=env)
    assert help_run.returncode == 0 and "usage: twotower" in help_run.stdout, help_run.stderr[-2000:]
    api = subprocess.run([str(py), "-c", PUBLIC + "; import twotower; print(twotower.__file__)"],
                         capture_output=True, text=True, cwd=cwd, timeout=300, env=env)
    assert api.returncode == 0, api.stderr[-2000:]
    module, where = api.stdout.split()
    assert module == "twotower.retrieval.retriever" and Path(where).is_relative_to(env_dir), api.stdout
    for generic in ("common", "towers", "index", "retrieval", "eval"):
        probe = subprocess.run([str(py), "-c", f"import {generic}"], capture_output=True, text=True, cwd=cwd,
                               env=env)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (generic, probe.stdout)


def test_wheel_installs_into_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    py, env_dir = _fresh_venv(tmp_path)
    # a clean env: with PYTHONPATH at the checkout, pip would see its twotower.egg-info and skip the install
    run = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=_clean_env())
    assert run.returncode == 0, run.stderr[-3000:]
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # this venv's dependencies (torch, faiss, ...), after the fresh venv's own site-packages in sys.path
    # (every site dir this interpreter sees: a venv that borrows its packages through a .pth path line too)
    lent = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "deps.pth").write_text("\n".join(lent) + "\n")
    _check_installed(py, env_dir, tmp_path)


@pytest.mark.slow
def test_wheel_installs_with_its_dependencies(wheel: Path, tmp_path: Path) -> None:
    """The real thing: pip resolves every dependency from the registry (torch: the CPU wheel, as the Makefile)."""
    py, env_dir = _fresh_venv(tmp_path)
    for args in (["torch==2.13.0"], [str(wheel)]):
        run = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                             timeout=1800, env=_clean_env())
        assert run.returncode == 0, run.stderr[-3000:]
    _check_installed(py, env_dir, tmp_path)
