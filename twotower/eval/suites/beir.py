"""BEIR-layout suites: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` (header query-id, corpus-id, score).

Any BEIR/MTEB folder a user has loads as is. Files are read line by line; every validation error names the
file, the line number and the field, so a broken row is found without opening the file in an editor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from twotower.common.atomic import atomic_dir
from twotower.common.hashing import file_sha256
from twotower.common.jsonl import dumps_strict, iter_utf8_lines, lone_surrogate_at, parse_json_line
from twotower.common.text import id_problem, is_blank
from twotower.index.corpus import doc_text, iter_docs

QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclasses.dataclass
class Suite:
    """One evaluation split of a BEIR folder, held in memory (rows in file order).

    Attributes:
        name: suite name (the folder name).
        path: the BEIR folder.
        corpus_ids / corpus_titles / corpus_texts: one entry per corpus row; row i = doc i everywhere.
        query_ids / query_texts: the queries named in the split's qrels, in ``queries.jsonl`` order.
        qrels: query id -> {corpus id: grade} (grade > 0 = relevant, as in TREC).
        checksum: sha256 over the three files (or derived from it for a subsample).
    """

    name: str
    path: Path
    corpus_ids: list[str]
    corpus_titles: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    checksum: str

    def doc_texts(self) -> list[str]:
        """Text to encode per corpus row (``index.corpus.doc_text``: the title and the text)."""
        return [doc_text(t, x) for t, x in zip(self.corpus_titles, self.corpus_texts)]

    def relevant_rows(self) -> list[dict[int, int]]:
        """Per query (aligned with ``query_ids``) a {corpus row: grade} dict, as ``common.metrics`` takes."""
        row = {doc_id: i for i, doc_id in enumerate(self.corpus_ids)}
        return [{row[d]: g for d, g in self.qrels[q].items()} for q in self.query_ids]

    def summary(self) -> dict[str, Any]:
        """Counts for ``twotower data info`` and reports."""
        n_rel = [sum(1 for g in self.qrels[q].values() if g > 0) for q in self.query_ids]
        return {
            "name": self.name,
            "corpus": len(self.corpus_ids),
            "queries": len(self.query_ids),
            "qrels": sum(len(self.qrels[q]) for q in self.query_ids),
            "relevant_per_query": round(sum(n_rel) / max(len(n_rel), 1), 3),
            "checksum": self.checksum,
        }

    def subsample(self, max_queries: int | None = None, max_corpus: int | None = None, seed: int = 0) -> Suite:
        """A smaller suite for CPU runs: random queries, all their qrels docs, random distractors.

        Every doc named in a kept query's qrels is kept (so no kept query loses a relevant doc), then
        distractors are drawn at random until ``max_corpus`` docs; if the qrels docs alone exceed
        ``max_corpus`` they are all kept anyway. Deterministic for a given ``seed``; order is preserved.
        """
        for label, value in (("max_queries", max_queries), ("max_corpus", max_corpus)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1 or None, got {value}")
        rng = random.Random(seed)
        q_rows = range(len(self.query_ids))
        if max_queries is not None and max_queries < len(self.query_ids):
            q_rows = sorted(rng.sample(range(len(self.query_ids)), max_queries))
        query_ids = [self.query_ids[i] for i in q_rows]
        row = {doc_id: i for i, doc_id in enumerate(self.corpus_ids)}
        keep = {row[d] for q in query_ids for d in self.qrels[q]}
        if max_corpus is None:
            keep = set(range(len(self.corpus_ids)))
        elif len(keep) < max_corpus:
            others = [i for i in range(len(self.corpus_ids)) if i not in keep]
            keep.update(rng.sample(others, min(max_corpus - len(keep), len(others))))
        rows = sorted(keep)
        tag = f"{self.checksum}|subsample|{max_queries}|{max_corpus}|{seed}"
        return Suite(
            name=self.name,
            path=self.path,
            corpus_ids=[self.corpus_ids[i] for i in rows],
            corpus_titles=[self.corpus_titles[i] for i in rows],
            corpus_texts=[self.corpus_texts[i] for i in rows],
            query_ids=query_ids,
            query_texts=[self.query_texts[i] for i in q_rows],
            qrels={q: dict(self.qrels[q]) for q in query_ids},
            checksum=hashlib.sha256(tag.encode()).hexdigest(),
        )


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) per non-blank line; malformed JSON or a non-object names file:line."""
    for lineno, line in iter_utf8_lines(path):
        if not line.strip():
            continue
        obj = parse_json_line(line, f"{path}:{lineno}")
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def str_field(obj: Mapping[str, Any], key: str, where: str, *, required: bool = True, empty_ok: bool = False) -> str:
    """Read string field ``key`` of a row; ``where`` is "file:line" for the error message."""
    if key not in obj:
        if required:
            raise ValueError(f"{where}: missing field '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{key}' must be a string, got {type(value).__name__} {value!r:.60}")
    if not empty_ok and is_blank(value):
        raise ValueError(f"{where}: field '{key}' is empty (no visible character)")
    at = lone_surrogate_at(value)
    if at is not None:
        raise ValueError(f"{where}: field '{key}' is not valid text: lone UTF-16 surrogate {value[at]!r} at "
                         f"character {at}")
    return value


def check_id(value: str, where: str) -> str:
    """``value`` when it can be an id (``common.text.id_problem``: no tab or newline, which qrels TSV lines
    could not hold), else a ValueError naming ``where``."""
    problem = id_problem(value)
    if problem is not None:
        raise ValueError(f"{where}: field '_id' {value!r} {problem}")
    return value


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """qrels TSV -> {query id: {corpus id: grade}}; checks the header, columns, integer grades, duplicates."""
    qrels: dict[str, dict[str, int]] = {}
    lines = iter_utf8_lines(path)
    header = tuple(next(lines, (1, ""))[1].rstrip("\r\n").split("\t"))
    if header != QRELS_HEADER:
        raise ValueError(f"{path}:1: header must be {'<TAB>'.join(QRELS_HEADER)}, got {header!r}")
    for lineno, line in lines:
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t")
        if len(cols) != 3 or not cols[0] or not cols[1]:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns query-id, corpus-id, score")
        try:
            grade = int(cols[2])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: field 'score' must be an integer, got {cols[2]!r}") from None
        if cols[1] in qrels.setdefault(cols[0], {}):
            raise ValueError(f"{path}:{lineno}: duplicate qrels row for query '{cols[0]}', doc '{cols[1]}'")
        qrels[cols[0]][cols[1]] = grade
    return qrels


def load_beir(path: str | Path, split: str = "test") -> Suite:
    """Load one split of a BEIR folder, validating every row.

    Corpus rows are read by ``index.corpus.iter_docs`` (the same rules as ``twotower index build``: ``_id``
    or ``id``, a string or an integer; string ``text``; optional string ``title``; a row with neither title
    nor text is an error). Query rows need non-empty string ``_id`` and ``text``. Extra fields are ignored.

    Raises:
        FileNotFoundError: a file of the layout is missing (the message lists the expected layout).
        ValueError: malformed JSON, missing/empty/non-string fields, duplicate ids, qrels naming
            unknown query or corpus ids, an empty corpus or an empty split (each names file and line).
    """
    root = Path(path)
    corpus_path, queries_path = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_path = root / "qrels" / f"{split}.tsv"
    for p in (corpus_path, queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"BEIR suite file missing: {p} (expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv)"
            )
    # The corpus is read by the index's reader, so a suite accepts exactly the rows `index build` accepts.
    docs = list(iter_docs(corpus_path))
    ids, titles, texts = [d.id for d in docs], [d.title for d in docs], [d.text for d in docs]
    first_line = set(ids)
    if not ids:
        raise ValueError(f"{corpus_path}: empty corpus (no documents)")
    qrels = read_qrels(qrels_path)
    if not qrels:
        raise ValueError(f"{qrels_path}: no qrels rows for split '{split}'")
    query_ids: list[str] = []
    query_texts: list[str] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(queries_path):
        where = f"{queries_path}:{lineno}"
        qid, text = check_id(str_field(obj, "_id", where), where), str_field(obj, "text", where)
        if qid in seen:
            raise ValueError(f"{where}: duplicate query id '{qid}' (first on line {seen[qid]})")
        seen[qid] = lineno
        if qid in qrels:  # queries.jsonl holds every split's queries; keep this split's
            query_ids.append(qid)
            query_texts.append(text)
    unknown_q = sorted(set(qrels) - seen.keys())
    if unknown_q:
        raise ValueError(f"{qrels_path}: {len(unknown_q)} query ids not in queries.jsonl, e.g. '{unknown_q[0]}'")
    unknown_d = sorted({d for rel in qrels.values() for d in rel} - first_line)
    if unknown_d:
        raise ValueError(f"{qrels_path}: {len(unknown_d)} corpus ids not in corpus.jsonl, e.g. '{unknown_d[0]}'")
    h = hashlib.sha256()
    for p in (corpus_path, queries_path, qrels_path):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return Suite(root.name, root, ids, titles, texts, query_ids, query_texts, qrels, h.hexdigest())


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON Lines (UTF-8, no ASCII escaping); returns the row count."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(dumps_strict(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_beir_files(
    root: Path,
    corpus_rows: Iterable[Mapping[str, Any]],
    query_rows: Iterable[Mapping[str, Any]],
    qrels: Mapping[str, Mapping[str, int]],
    split: str = "test",
) -> None:
    """Write the three BEIR files into an existing dir (the caller owns atomicity; see ``write_beir``)."""
    write_jsonl(root / "corpus.jsonl", corpus_rows)
    write_jsonl(root / "queries.jsonl", query_rows)
    (root / "qrels").mkdir(exist_ok=True)
    with open(root / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as fh:
        fh.write("\t".join(QRELS_HEADER) + "\n")
        for qid, rel in qrels.items():
            for doc_id, grade in rel.items():
                fh.write(f"{qid}\t{doc_id}\t{int(grade)}\n")


def write_beir(
    path: str | Path,
    corpus_rows: Iterable[Mapping[str, Any]],
    query_rows: Iterable[Mapping[str, Any]],
    qrels: Mapping[str, Mapping[str, int]],
    split: str = "test",
) -> Path:
    """Write a BEIR folder atomically (temp dir + rename): rows {"_id","title","text"}, {"_id","text"}.

    Returns:
        The folder path. ``load_beir(path, split)`` reads it back.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_beir_files(tmp, corpus_rows, query_rows, qrels, split)
    return path
