"""scripts/ in the house: a package run as ``python -m scripts.NAME`` that edits no ``sys.path``, reads JSONL
and picks devices through ``twotower.common``, and reports the machine with ``twotower.common.machine``."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench_common import check_device, command_line, load_corpus_texts
from twotower.common.jsonl import iter_json_rows
from twotower.common.machine import machine, versions

ROOT = Path(__file__).resolve().parents[1]


def test_no_script_edits_sys_path() -> None:
    for path in sorted((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{path.name}:{node.lineno} touches sys.path; run it as python -m scripts.{path.stem}")


def test_a_script_runs_as_a_module_from_the_checkout() -> None:
    run = subprocess.run([sys.executable, "-m", "scripts.bench_filter", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--selectivity" in run.stdout


def test_iter_json_rows_skips_blank_lines_stops_at_limit_and_names_a_bad_line(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('\ufeff{"a": 1}\r\n\n{"a": 2}\n{"a": 3}\n', encoding="utf-8")
    assert list(iter_json_rows(path)) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert list(iter_json_rows(path, 2)) == [{"a": 1}, {"a": 2}]
    assert list(iter_json_rows(path, 0)) == []
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl: line 2: malformed JSON"):
        list(iter_json_rows(path))


def test_corpus_texts_are_what_the_result_tower_encodes(tmp_path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "title": "T", "text": "x"}\n{"_id": "b", "text": "y"}\n'
                      '{"_id": "c", "text": "z"}\n', encoding="utf-8")
    assert load_corpus_texts(str(corpus), 2) == ["T x", "y"]


def test_device_and_machine_facts_come_from_twotower_common() -> None:
    assert check_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="--device: unknown device 'tpu'"):
        check_device("tpu")
    info = machine()
    assert info["cores"] == os.cpu_count() and isinstance(info["load_avg_1m"], float)
    assert versions()["python"] == ".".join(map(str, sys.version_info[:3]))


def test_the_recorded_command_is_the_module_form_without_machine_paths(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "bench_search.py"), "--n", "10"])
    assert command_line() == "python -m scripts.bench_search --n 10"
