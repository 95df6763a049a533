"""Streaming, validated corpus reading: BEIR ``corpus.jsonl`` / Parquet / saved or hub ``datasets`` / dicts.

Rows are ``{"_id" (or "id"), "title" (optional), "text", ...}``; every other field goes into a JSON
``metadata`` string. Rows are read one at a time so a corpus larger than RAM streams through; errors name
the file and the line (JSONL) or row (other sources) and the field. JSONL is decoded line by line, so a byte
that is not UTF-8 is named by its line too; text fields holding a lone UTF-16 surrogate (JSON can spell
``"\ud800"``, Arrow and the tokenizers cannot take it) are refused here rather than deep inside a build, and so
are docs with no visible character (``common.text.is_blank``), ids that could not travel through an ids file
or a qrels TSV (tabs, newlines: ``common.text.id_problem``) and NaN/Infinity in metadata (not JSON).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from twotower.common.jsonl import iter_utf8_lines, lone_surrogate_at, non_finite_path, parse_json_line
from twotower.common.text import id_problem, is_blank

Corpus = str | Path | Iterable[Mapping[str, Any]]
_RESERVED = ("_id", "id", "title", "text")
CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # the files a corpus dir may hold
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Doc:
    """One validated corpus row; ``metadata`` is a JSON object string of the extra fields."""

    id: str
    title: str
    text: str
    metadata: str

    @property
    def encode_text(self) -> str:
        """What the result tower encodes: ``title + " " + text`` when there is a title, else ``text``."""
        return doc_text(self.title, self.text)


def doc_text(title: str, text: str) -> str:
    return f"{title} {text}" if title else text


def describe(corpus: Corpus) -> str:
    """A short name for the corpus (the file actually read), for messages and the manifest."""
    if not isinstance(corpus, (str, Path)):
        return f"<{type(corpus).__name__} of rows>"
    return str(_resolve(corpus) or corpus)


def count_rows(corpus: Corpus, split: str = "train") -> int | None:
    """Number of rows when cheap to know (list, Dataset, Parquet metadata, a JSONL line count), else None."""
    if isinstance(corpus, (str, Path)):
        path = _resolve(corpus)
        if path is None:
            return None
        if path.is_dir():
            files = corpus_files(path)
            return sum(map(_file_rows, files)) if files is not None else len(_load_saved(path))
        return _file_rows(path)
    return len(corpus) if hasattr(corpus, "__len__") else None  # type: ignore[arg-type]


def _file_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _, line in iter_utf8_lines(path) if line.strip())


def corpus_files(path: Path) -> list[Path] | None:
    """The files of a corpus dir of JSONL / JSONL.gz / Parquet files, in name order (subdirs included, hidden
    ones not), read one after the other as one corpus; None for a saved ``datasets`` dataset."""
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return None
    return sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(CORPUS_SUFFIXES)
                  and not any(part.startswith(".") for part in f.relative_to(path).parts))


def iter_docs(corpus: Corpus, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[Doc]:
    """Yield validated :class:`Doc` rows in corpus order; raises ValueError on the first bad row.

    Duplicate ids in files are caught with a set of 8-byte id hashes (~70 bytes per doc); a hash hit is
    confirmed by re-reading the file, so a hash collision never reports a false duplicate. In-memory rows
    (which may be a one-shot iterator) are checked against a set of the ids themselves.

    Args:
        start / stop: only rows ``[start, stop)`` (0-based, blank JSONL lines not counted; a shard's slice):
            earlier rows are skipped without being parsed, and only these rows are validated and de-duplicated.
    """
    rereadable = isinstance(corpus, (str, Path))
    seen: set[int | str] = set()
    for loc, row in _iter_raw(corpus, split, start, stop):
        doc = _validate(row, corpus, loc)
        h = _id_hash(doc.id) if rereadable else doc.id
        if h in seen and not rereadable:
            raise ValueError(f"{_where(corpus, loc)}: duplicate id '{doc.id}'")
        if h in seen:
            first = _first_location(corpus, split, doc.id, loc, start)
            if first is not None:
                raise ValueError(f"{_where(corpus, loc)}: duplicate id '{doc.id}' (first at "
                                 f"{_label(corpus, first)})")
        seen.add(h)
        yield doc


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


def hash_doc(h: Any, doc: Doc) -> None:
    """Feed one doc's fields into the hashlib object ``h`` (chunk digests, corpus identities)."""
    for part in (doc.id, doc.title, doc.text, doc.metadata):
        h.update(part.encode())
        h.update(b"\0")


def corpus_identity(corpus: Corpus, split: str = "train") -> dict[str, Any]:
    """Rows and a sha256 that tell corpora apart (what every shard of a sharded build records).

    Local files and saved datasets hash their bytes (GB/s, no parsing); hub streams and in-memory rows hash
    every validated doc.
    """
    path = _resolve(corpus) if isinstance(corpus, (str, Path)) else None
    h = hashlib.sha256()
    if path is None:
        rows = 0
        for doc in iter_docs(corpus, split):
            hash_doc(h, doc)
            rows += 1
        return {"name": describe(corpus), "rows": rows, "sha256": h.hexdigest(), "hashed": "docs"}
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as fh:
            while block := fh.read(1 << 23):
                h.update(block)
    return {"name": describe(corpus), "rows": count_rows(corpus, split), "sha256": h.hexdigest(),
            "hashed": "file bytes"}


def _first_location(corpus: Corpus, split: str, doc_id: str, before: int, start: int = 0) -> int | None:
    for loc, row in _iter_raw(corpus, split, start):
        if loc >= before:
            return None
        if str(row.get("_id", row.get("id"))) == doc_id:
            return loc
    return None


def _label(corpus: Corpus, loc: int | tuple[int, int]) -> str:
    """``line N`` for JSONL files (1-based, as editors count), ``row N`` for everything else (0-based); in a
    corpus dir of files (``loc`` = (file number, line or row)) the file's name first."""
    path = _resolve(corpus) if isinstance(corpus, (str, Path)) else None
    if isinstance(loc, tuple):
        file = (corpus_files(path) or [])[loc[0]] if path is not None else None
        assert file is not None, f"a (file, line) location {loc} for a corpus that is not a dir of files"
        return f"{file.relative_to(path)}: {'row' if file.suffix == '.parquet' else 'line'} {loc[1]}"
    is_jsonl = path is not None and path.is_file() and path.suffix != ".parquet"
    return f"{'line' if is_jsonl else 'row'} {loc}"


def _where(corpus: Corpus, loc: int) -> str:
    return f"{describe(corpus)}: {_label(corpus, loc)}"


def _validate(row: Any, corpus: Corpus, loc: int) -> Doc:
    if not isinstance(row, Mapping):
        raise ValueError(f"{_where(corpus, loc)}: expected a JSON object, got {type(row).__name__}")
    key = "_id" if "_id" in row else "id"
    doc_id = row.get(key)
    if doc_id is None:
        raise ValueError(f"{_where(corpus, loc)}: missing field '_id' (or 'id')")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        raise ValueError(f"{_where(corpus, loc)}: field '{key}' must be a non-empty string or integer, got {doc_id!r}")
    problem = id_problem(str(doc_id))
    if problem is not None:
        raise ValueError(f"{_where(corpus, loc)}: field '{key}' {str(doc_id)!r} {problem}")
    text = row.get("text")
    if not isinstance(text, str):
        problem = ("missing field 'text'" if text is None
                   else f"field 'text' must be a string, got {type(text).__name__}")
        raise ValueError(f"{_where(corpus, loc)}: {problem} (id '{doc_id}')")
    title = row.get("title") or ""
    if not isinstance(title, str):
        raise ValueError(f"{_where(corpus, loc)}: field 'title' must be a string, got {type(title).__name__}")
    if is_blank(title) and is_blank(text):  # nothing to encode (or only invisible characters): no query finds it
        raise ValueError(f"{_where(corpus, loc)}: document '{doc_id}' has empty 'title' and 'text' (no visible "
                         f"character)")
    extra = {k: v for k, v in row.items() if k not in _RESERVED}
    if isinstance(extra.get("metadata"), Mapping):  # BEIR nests extras under "metadata": flatten one level
        extra = {**extra.pop("metadata"), **extra}
    bad = non_finite_path(extra)
    if bad is not None:  # JSON has no NaN/Infinity: search results holding one would not parse
        raise ValueError(f"{_where(corpus, loc)}: metadata field '{bad}' is NaN or infinite, which JSON cannot hold; "
                         f"write null for a missing value (id {str(doc_id)!r})")
    metadata = json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)
    for name, value in ((key, str(doc_id)), ("title", title), ("text", text), ("metadata", metadata)):
        at = lone_surrogate_at(value)
        if at is not None:
            what = f"field '{name}'" if name != "metadata" else "an extra (metadata) field"
            raise ValueError(f"{_where(corpus, loc)}: {what} is not valid text: lone UTF-16 surrogate {value[at]!r} "
                             f"at character {at} (id {str(doc_id)!r})")
    return Doc(str(doc_id), title, text, metadata)


def _resolve(corpus: str | Path) -> Path | None:
    """A local file/dir for ``corpus`` (a BEIR dir means its corpus.jsonl), or None for ``hf:NAME[:CONFIG]``."""
    if str(corpus).startswith(HUB_PREFIX):
        return None
    path = Path(corpus)
    if path.is_dir() and (path / "corpus.jsonl").is_file():
        return path / "corpus.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"corpus '{corpus}' does not exist (for a hub dataset write {HUB_PREFIX}NAME[:CONFIG])")
    return path


def check_corpus(corpus: Corpus) -> None:
    """Fail fast, before any model loads, on a corpus path that cannot be read: one that does not exist, or a
    dir that is neither a BEIR folder nor a saved ``datasets`` dataset. Rows are checked when read."""
    if isinstance(corpus, (str, Path)):
        path = _resolve(corpus)
        if path is not None and path.is_dir():
            _check_saved(path)


def _check_saved(path: Path) -> None:
    if corpus_files(path) == []:
        raise ValueError(f"corpus dir '{path}' has neither corpus.jsonl, a saved `datasets` dataset, nor "
                         f"{' / '.join(CORPUS_SUFFIXES)} files")


def _load_saved(path: Path) -> Any:
    _check_saved(path)
    return datasets.load_from_disk(str(path))


def _iter_raw(corpus: Corpus, split: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
    """(location, raw row) of rows ``[start, stop)``: 1-based line numbers for JSONL, 0-based row numbers
    otherwise. Rows before ``start`` are skipped unparsed (JSONL lines, Parquet batches, ``datasets`` rows)."""
    if not isinstance(corpus, (str, Path)):
        yield from itertools.islice(enumerate(corpus), start, stop)
        return
    path = _resolve(corpus)
    if path is None:  # a hub dataset, streamed: "hf:name" or "hf:name:config"
        name, _, config = str(corpus)[len(HUB_PREFIX):].partition(":")
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        yield from itertools.islice(enumerate(stream), start, stop)
    elif path.is_dir() and corpus_files(path) is not None:  # a dir of JSONL / Parquet files, one after another
        row = 0
        for i, file in enumerate(corpus_files(path) or []):
            if stop is not None and row >= stop:
                break
            n = _file_rows(file)
            if row + n > start:
                lo, hi = max(start - row, 0), n if stop is None else min(n, stop - row)
                yield from (((i, loc), raw) for loc, raw in _iter_file(file, lo, hi))
            row += n
    elif path.is_dir():
        ds = _load_saved(path)
        end = len(ds) if stop is None else min(stop, len(ds))
        if start < end:
            yield from enumerate(ds.select(range(start, end)) if (start, end) != (0, len(ds)) else ds, start)
    else:
        yield from _iter_file(path, start, stop)


def _iter_file(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
    """(line or row, raw row) of rows ``[start, stop)`` of one JSONL (plain or .gz) or Parquet file."""
    if path.suffix == ".parquet":
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            if stop is not None and row >= stop:
                break
            lo, hi = max(start - row, 0), batch.num_rows if stop is None else min(batch.num_rows, stop - row)
            if lo < hi:
                yield from enumerate(batch.slice(lo, hi - lo).to_pylist(), row + lo)
            row += batch.num_rows
    else:
        row = 0
        for lineno, line in iter_utf8_lines(path):
            if not line.strip():
                continue
            if stop is not None and row >= stop:
                break
            row += 1
            if row <= start:
                continue
            yield lineno, parse_json_line(line, f"{path}: line {lineno}")
