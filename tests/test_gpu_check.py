"""scripts/gpu_check.py: the dry run (no CUDA) skips every GPU step cleanly and still writes both summaries;
the search steps run for real on the CPU (same code as on the GPU, ``--device cpu``), so an API drift between
the script and the library fails here, not on the rare GPU machine."""
from __future__ import annotations

import json

import pytest

from scripts.gpu_check import STEPS, main


def test_dry_run_skips_every_step_and_writes_both_summaries(tmp_path) -> None:
    assert main(["--out", str(tmp_path), "--dry-run"]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results["steps"]) == list(STEPS) and results["dry_run"] is True
    assert {r["status"] for r in results["steps"].values()} == {"skipped"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | skipped |" in md for name in STEPS)


def test_search_steps_run_on_the_cpu(tmp_path) -> None:
    steps = "faiss_search,torch_fallback,filters_rescore"
    assert main(["--out", str(tmp_path), "--device", "cpu", "--only", steps, "--n", "3000"]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert [results[s]["status"] for s in steps.split(",")] == ["ok"] * 3, results
    assert results["faiss_search"]["figures"]["torch_recall10"] == 1.0  # exact search is exact
    assert results["filters_rescore"]["figures"]["filter+rescore_same_ids"] == 1.0


def test_a_failing_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch) -> None:
    def boom(args):
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(STEPS, "faiss_search", (boom, False))
    assert main(["--out", str(tmp_path), "--device", "cpu", "--only", "faiss_search,torch_fallback"]) == 1
    results = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert results["faiss_search"]["status"] == "failed" and "no such kernel" in results["faiss_search"]["error"]
    assert results["torch_fallback"]["status"] == "ok"


def test_unknown_step_is_one_line_exit_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--only", "nope"])
    assert exc.value.code == 2 and "unknown step(s) nope" in capsys.readouterr().err
