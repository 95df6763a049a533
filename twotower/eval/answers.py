"""The section "What this answers": the project's question read off the bench results of every suite.

The question: do towers trained on (query, result) pairs beat a GPT-style LLM's embeddings, and does the answer
change with the gap between the query and result domains (natural language -> code vs natural language ->
natural language)? Per suite, three before/after comparisons on the same test queries and corpus:

(a) MiniLM towers over the untrained MiniLM they start from (what training buys a sentence encoder);
(b) fine-tuned SmolLM2 towers over the raw SmolLM2 (its best pooling): the e5-mistral step, same LLM;
(c) the best towers over BM25 (what dense training buys over lexical matching).

Then how each gain differs between an NL->code suite and an NL->NL one. Rows are found by their config
(``kind`` and ``base``), not by label, so any ``--systems`` labelling works; a comparison whose rows are
missing is reported as such.

Every gain carries its 95% bootstrap CI over the suite's queries and a paired randomization-test p
(``eval.significance``, from the per-query scores the bench keeps in ``results["per_query"]``). The words are
drawn from them: a gain whose CI crosses 0 is "no significant difference", never a win; two suites' gains are
called different only when the CI of their difference excludes 0.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from twotower.eval.significance import CI_METRICS, diff_of_gains, format_diff, format_p, paired_many, verdict, why_not

METRICS = CI_METRICS
# What each suite's query -> result gap is.
SUITE_GAPS = {"codesearch-py": "NL->code", "nq": "NL->NL", "wiki": "NL->NL"}


def _rows(results: Mapping[str, Any], kind: str, base: str | None = None) -> list[str]:
    out = []
    for name, s in results["systems"].items():
        cfg = s.get("config", {})
        if cfg.get("kind") != kind:
            continue
        if base is not None and str(cfg.get("base") if kind == "towers" else cfg.get("model")) != base:
            continue
        out.append(name)
    return out


def _best(results: Mapping[str, Any], names: list[str], metric: str = "recall@10") -> str | None:
    return max(names, key=lambda n: results["systems"][n]["metrics"].get(metric, 0.0)) if names else None


def comparisons(results: Mapping[str, Any], llm: str = "smollm2") -> dict[str, tuple[str | None, str | None]]:
    """(before row, after row) of each comparison in one suite's results (None where the row is absent)."""
    towers = _rows(results, "towers")
    return {
        "a": (_best(results, _rows(results, "minilm")), _best(results, _rows(results, "towers", "minilm"))),
        "b": (_best(results, _rows(results, "raw-llm", llm)), _best(results, _rows(results, "towers", llm))),
        "c": (_best(results, _rows(results, "bm25")), _best(results, towers)),
    }


TITLES = {"a": "MiniLM towers vs untrained MiniLM", "b": "fine-tuned SmolLM2 towers vs raw SmolLM2",
          "c": "best towers vs BM25"}


def _scores(results: Mapping[str, Any], row: str, metric: str) -> np.ndarray | None:
    """Per-query scores of ``row`` (``results["per_query"]``), None where the bench kept none."""
    kept = results.get("per_query", {}).get("systems", {}).get(row, {})
    return np.asarray(kept[metric], dtype=np.float64) if metric in kept else None


def gains(results: Mapping[str, Any], llm: str = "smollm2") -> dict[str, dict[str, Any]]:
    """Per comparison: before/after row names, their recall@10 and nDCG@10 and the absolute gains
    ``(before, after, gain)``, ``stats`` (per metric: ``eval.significance.paired`` of after vs before, where
    per-query scores were kept), ``deltas`` (the per-query gains, for the between-suite reading), and the
    before/after cosine AUC (relevant vs random docs) where both rows have one."""
    out: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # (comparison, metric, before, after) scores
    for key, (before, after) in comparisons(results, llm).items():
        if before is None or after is None:
            out[key] = {"missing": [n for n, r in (("before", before), ("after", after)) if r is None]}
            continue
        b, a = results["systems"][before], results["systems"][after]
        row: dict[str, Any] = {"before": before, "after": after, "stats": {}, "deltas": {}}
        for m in METRICS:
            if m not in b["metrics"] or m not in a["metrics"]:
                continue  # not computed (a bench with --k-max < 10): nothing is invented
            row[m] = (b["metrics"][m], a["metrics"][m], a["metrics"][m] - b["metrics"][m])
            sb, sa = _scores(results, before, m), _scores(results, after, m)
            if sb is not None and sa is not None:
                todo.append((key, m, sb, sa))
                row["deltas"][m] = sa - sb
        if "similarity" in b and "similarity" in a:
            row["auc"] = (b["similarity"]["auc"], a["similarity"]["auc"])
        out[key] = row
    if todo:  # every comparison's CI in one pass over the same resampled queries
        stats = paired_many(np.stack([t[2] for t in todo], 1), np.stack([t[3] for t in todo], 1))
        for (key, m, _, _), stat in zip(todo, stats):
            out[key]["stats"][m] = stat
    return out


def render(per_suite: Mapping[str, Mapping[str, Any]], llm: str = "smollm2") -> str:
    """Markdown of the section: one table per comparison (a row per suite), then the domain-gap reading."""
    all_gains = {suite: gains(res, llm) for suite, res in per_suite.items()}
    lines = ["## What this answers", "",
             ("Same test queries and corpus per suite; gains are absolute (after - before), with a 95% bootstrap "
              "CI over the suite's queries; a difference counts only where its CI excludes 0 and the paired "
              "randomization test gives p < 0.05. "
              "AUC = P(cos(query, relevant doc) > cos(query, random doc))."), "",
             summary_table(all_gains), ""]
    for key, title in TITLES.items():
        lines += [f"### ({key}) {title}", "",
                  ("| suite | gap | before | after | recall@10 before -> after (gain) "
                   "| nDCG@10 before -> after (gain) | AUC before -> after |"), "|---|---|---|---|---:|---:|---:|"]
        for suite, g in all_gains.items():
            row = g[key]
            gap = SUITE_GAPS.get(suite, "?")
            if "missing" in row:
                lines.append(f"| {suite} | {gap} | - | - | (no {' / '.join(row['missing'])} row) | | |")
                continue
            cells = [cell(row, m) for m in METRICS]
            auc = f"{row['auc'][0]:.3f} -> {row['auc'][1]:.3f}" if "auc" in row else "-"
            lines.append(f"| {suite} | {gap} | {row['before']} | {row['after']} | {cells[0]} | {cells[1]} | {auc} |")
        lines.append("")
    lines += ["### What the numbers say, per regime", ""]
    for suite, g in all_gains.items():
        lines.append(f"- **{SUITE_GAPS.get(suite, '?')} ({suite})**: " + _regime_reading(g))
    lines += ["", "### NL->code vs NL->NL", ""]
    lines += _gap_reading(all_gains)
    return "\n".join(lines) + "\n"


def summary_table(all_gains: Mapping[str, Mapping[str, Any]], metric: str = "recall@10") -> str:
    """The README's table: a row per comparison, a column per suite, ``before -> after (+gain, 95% CI)`` cells."""
    suites = list(all_gains)
    lines = [f"| comparison ({metric} before -> after) | "
             + " | ".join(f"{s} ({SUITE_GAPS.get(s, '?')})" for s in suites) + " |",
             "|---|" + "---:|" * len(suites)]
    for key, title in TITLES.items():
        cells = [f"no {' / '.join(g[key]['missing'])} row" if "missing" in g[key] else cell(g[key], metric)
                 for g in all_gains.values()]
        lines.append(f"| ({key}) {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(row: Mapping[str, Any], metric: str) -> str:
    """``0.797 -> 0.855 (+0.058, 95% CI +0.031..+0.084)`` (without a CI where no per-query scores were kept)."""
    if metric not in row:
        return f"{metric} not computed"
    b, a, d = row[metric]
    stat = row.get("stats", {}).get(metric)
    return f"{b:.3f} -> {a:.3f} ({format_diff(stat) if stat else f'{d:+.3f}, no CI: no per-query scores'})"


def _says(row: Mapping[str, Any], metric: str = "recall@10") -> str:
    """One clause on one comparison, drawn from its CI: a gain, a loss, or no significant difference."""
    if "missing" in row:
        return "not measured (no " + " / ".join(row["missing"]) + " row)"
    if metric not in row:
        return f"{metric} not computed"
    b, a, d = row[metric]
    stat = row.get("stats", {}).get(metric)
    if stat is None:
        return f"{metric} {b:.3f} -> {a:.3f} ({d:+.3f}; no CI, so no claim either way)"
    ci = f"{metric} {b:.3f} -> {a:.3f}, {format_diff(stat)}, p {format_p(stat['p_value'])}"
    return {"better": f"{row['after']} is better ({ci})", "worse": f"{row['after']} is worse ({ci})"}.get(
        verdict(stat), f"no significant difference ({ci}: {why_not(stat)})")


def _regime_reading(g: Mapping[str, Mapping[str, Any]]) -> str:
    """The trade-off on one suite in plain words: what training buys a sentence encoder, an LLM, and over BM25."""
    return (f"training MiniLM on the pairs (a): {_says(g['a'])}; fine-tuning SmolLM2 as two towers instead of "
            f"using its raw embeddings (b): {_says(g['b'])}; the best towers against BM25 (c): {_says(g['c'])}.")


def _gap_reading(all_gains: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per comparison: its recall@10 gain on the NL->code suite against the NL->NL suite."""
    by_gap = {SUITE_GAPS.get(s): g for s, g in all_gains.items()}
    code, nl = by_gap.get("NL->code"), by_gap.get("NL->NL")
    if code is None or nl is None:
        return ["Needs one NL->code and one NL->NL suite (`twotower demo --suite all`)."]
    out = []
    m = "recall@10"
    for key, title in TITLES.items():
        c, n = code[key], nl[key]
        if "missing" in c or "missing" in n or m not in c or m not in n:
            out.append(f"- ({key}) {title}: not measured on both suites.")
            continue
        dc, dn = c[m][2], n[m][2]
        start = (f"before training the NL->code suite starts at {c[m][0]:.3f}, the NL->NL one at "
                 f"{n[m][0]:.3f}")
        if m not in c["deltas"] or m not in n["deltas"]:
            out.append(f"- ({key}) {title}: {m} gain {dc:+.3f} on NL->code vs {dn:+.3f} on NL->NL (no per-query "
                       f"scores, so no claim on which is larger); {start}.")
            continue
        between = diff_of_gains(c["deltas"][m], n["deltas"][m])
        if verdict(between) == "no significant difference":
            reading = (f"the two gains differ by {format_diff(between)}: no significant difference between the "
                       "regimes")
        else:
            larger = "NL->code" if between["diff"] > 0 else "NL->NL"
            reading = f"training helps more where the gap is {larger} (difference {format_diff(between)})"
        out.append(f"- ({key}) {title}: {m} gain {format_diff(c['stats'][m])} on NL->code vs "
                   f"{format_diff(n['stats'][m])} on NL->NL; {reading}; {start}.")
    return out
