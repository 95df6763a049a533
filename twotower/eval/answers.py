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
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

METRICS = ("recall@10", "ndcg@10")
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
    return max(names, key=lambda n: results["systems"][n]["metrics"][metric]) if names else None


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


def gains(results: Mapping[str, Any], llm: str = "smollm2") -> dict[str, dict[str, Any]]:
    """Per comparison: before/after row names, their recall@10 and nDCG@10, the absolute gains, and the
    before/after cosine AUC (relevant vs random docs) where both rows have one."""
    out: dict[str, dict[str, Any]] = {}
    for key, (before, after) in comparisons(results, llm).items():
        if before is None or after is None:
            out[key] = {"missing": [n for n, r in (("before", before), ("after", after)) if r is None]}
            continue
        b, a = results["systems"][before], results["systems"][after]
        row: dict[str, Any] = {"before": before, "after": after}
        for m in METRICS:
            row[m] = (b["metrics"][m], a["metrics"][m], a["metrics"][m] - b["metrics"][m])
        if "similarity" in b and "similarity" in a:
            row["auc"] = (b["similarity"]["auc"], a["similarity"]["auc"])
        out[key] = row
    return out


def render(per_suite: Mapping[str, Mapping[str, Any]], llm: str = "smollm2") -> str:
    """Markdown of the section: one table per comparison (a row per suite), then the domain-gap reading."""
    all_gains = {suite: gains(res, llm) for suite, res in per_suite.items()}
    lines = ["## What this answers", "",
             ("Same test queries and corpus per suite; gains are absolute (after - before). "
              "AUC = P(cos(query, relevant doc) > cos(query, random doc))."), ""]
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
            cells = [f"{b:.3f} -> {a:.3f} ({d:+.3f})" for b, a, d in (row[m] for m in METRICS)]
            auc = f"{row['auc'][0]:.3f} -> {row['auc'][1]:.3f}" if "auc" in row else "-"
            lines.append(f"| {suite} | {gap} | {row['before']} | {row['after']} | {cells[0]} | {cells[1]} | {auc} |")
        lines.append("")
    lines += ["### NL->code vs NL->NL", ""]
    lines += _gap_reading(all_gains)
    return "\n".join(lines) + "\n"


def _gap_reading(all_gains: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per comparison: its recall@10 gain on the NL->code suite against the NL->NL suite."""
    by_gap = {SUITE_GAPS.get(s): g for s, g in all_gains.items()}
    code, nl = by_gap.get("NL->code"), by_gap.get("NL->NL")
    if code is None or nl is None:
        return ["Needs one NL->code and one NL->NL suite (`twotower demo --suite all`)."]
    out = []
    for key, title in TITLES.items():
        c, n = code[key], nl[key]
        if "missing" in c or "missing" in n:
            out.append(f"- ({key}) {title}: not measured on both suites.")
            continue
        dc, dn = c["recall@10"][2], n["recall@10"][2]
        larger = "NL->code" if dc > dn else "NL->NL"
        out.append(f"- ({key}) {title}: recall@10 gain {dc:+.3f} on NL->code vs {dn:+.3f} on NL->NL, "
                   f"so training {'helps' if min(dc, dn) > 0 else 'changes'} more where the gap is "
                   f"{larger} ({abs(dc - dn):.3f} apart); before training the NL->code suite starts at "
                   f"{c['recall@10'][0]:.3f}, the NL->NL one at {n['recall@10'][0]:.3f}.")
    return out
