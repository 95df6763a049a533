"""One schema per on-disk metadata file, checked at load (pydantic v2, strict: ``"1"`` is not 1, ``true`` is not 1).

Every JSON file twotower reads back (an INDEX dir's ``manifest.json``, a TOWERS dir's ``twotower.json``, each
tower's sentence-transformers files, the BM25 side's ``params.json``/``vocab.json``) and ``removed.npy`` go
through :func:`read_json_file` / :func:`check_removed`, so a damaged or hand-edited file is always reported the
same way, in one line: the file, the field, what was found and what was expected::

    INDEX/manifest.json: field 'ntotal': found -3, expected an integer >= 0

Unknown keys are kept (a newer twotower may add some; ``format_version`` says when it cannot be read). The
models live here, below every stage, so each stage validates the files it owns without importing another.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

M = TypeVar("M", bound=BaseModel)
MAX_ROWS = 1 << 40  # far above any corpus: a count beyond it is damage, not data
MAX_DIM = 1 << 16
MAX_TOKENS = 1 << 20

Count = Annotated[int, Field(ge=0, le=MAX_ROWS)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,64}$")]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class QueryDefaults(_Schema):
    """``query_defaults`` of a manifest: what a query does when it names no mode/fusion."""

    mode: Name = "dense"
    fusion: Name = "rrf"
    norm: Name = "minmax"
    alpha: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.5
    depth: Annotated[int, Field(ge=1, le=MAX_ROWS)] = 10


class IndexManifest(_Schema):
    """An INDEX dir's ``manifest.json`` (written by ``index.build``/``mutate``/``merge``)."""

    format_version: Annotated[int, Field(ge=1, le=1000)]
    dim: Dim
    metric: Name
    factory: Name
    ntotal: Count
    search_defaults: dict[str, Annotated[int, Field(ge=1, le=MAX_ROWS)]]
    n_removed: Count = 0
    generation: Annotated[int, Field(ge=1, le=MAX_ROWS)] = 1
    fingerprint: Name | None = None  # any encoder's (a towers pair's is hex, a test encoder may name itself)
    towers_dir: Name | None = None
    towers_dim: Dim | None = None
    truncate_dim: Dim | None = None
    rescore: Annotated[int, Field(ge=0, le=1000)] = 0
    vectors: Name | None = None
    ivfdata: Name | None = None
    bm25: dict[str, Any] | None = None
    filters: dict[str, Any] | None = None
    query_defaults: QueryDefaults | None = None
    history: list[dict[str, Any]] = []


class TowersMeta(_Schema):
    """A TOWERS dir's ``twotower.json`` (written by ``towers.model.TwoTower.save``). Fields added by later
    rounds have defaults so older TOWERS dirs still load."""

    format_version: Annotated[int, Field(ge=1, le=1000)]
    dim: Dim
    fingerprint: Fingerprint
    query_fingerprint: Fingerprint | None = None  # absent before issue 24: the query tower is then not checked
    base: str = ""
    shared: bool = False
    pooling: Name | None = None
    normalize: bool = True
    metric: Name | None = None
    query_max_length: Tokens | None = None
    result_max_length: Tokens | None = None
    inference_query_max_length: Tokens | None = None
    inference_result_max_length: Tokens | None = None
    query_prompt: str = ""
    result_prompt: str = ""
    append_eos: bool = False
    train_config: dict[str, Any] = {}


class STModule(_Schema):
    """One entry of a tower's sentence-transformers ``modules.json``."""

    idx: Annotated[int, Field(ge=0, le=100)]
    name: str
    path: str
    type: Name


class STTransformerConfig(_Schema):
    """A tower's ``sentence_bert_config.json``: its token cap."""

    max_seq_length: Tokens


class STPoolingConfig(_Schema):
    """A tower's ``1_Pooling/config.json``."""

    word_embedding_dimension: Dim


class BM25Params(_Schema):
    """The BM25 side's ``params.json`` (``index.bm25.BM25Index.config``)."""

    rows: Count
    vocab: Count
    k1: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    b: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    stopwords: str | None  # required: None means no stopword list


def read_json_file(path: str | Path, schema: type[M] | Any) -> Any:
    """The JSON value of ``path`` checked against ``schema`` (a model, or a type such as ``list[STModule]``);
    returns the parsed JSON as written (a dict keeps its unknown keys). Unreadable text, malformed or truncated
    JSON and any field that breaks the schema are one-line ValueErrors (see :func:`schema_error`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a JSON file written "
                         f"by twotower") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg} (truncated or "
                         f"edited?)") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # NaN / Infinity
        raise ValueError(f"{path}: {exc}") from None
    check_value(value, schema, path)
    return value


def check_value(value: Any, schema: type[M] | Any, path: str | Path) -> None:
    """``value`` (already parsed from ``path``) checked against ``schema``; a one-line ValueError if it fails."""
    from pydantic import TypeAdapter

    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            schema.model_validate(value)
        else:
            TypeAdapter(schema, config=ConfigDict(strict=True)).validate_python(value)
    except ValidationError as exc:
        raise ValueError(schema_error(path, exc)) from None


def schema_error(path: str | Path, exc: ValidationError) -> str:
    """One line for the first error of ``exc``: the file, the field (dotted path), what was found and what was
    expected (``"... found '1', expected a valid integer"``)."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    expected = err["msg"].removeprefix("Input should be ").removeprefix("Value should be ")
    if err["type"] == "missing":
        return f"{path}: field '{loc}' is missing (required)"
    if err["type"] in ("model_type", "dict_type") and not loc:
        return f"{path}: found {_show(err.get('input'))}, expected a JSON object"
    where = f"field '{loc}'" if loc else "the file"
    return f"{path}: {where}: found {_show(err.get('input'))}, expected {expected}"


def check_removed(path: str | Path, ntotal: int, n_removed: int) -> np.ndarray:
    """``removed.npy`` (the tombstoned rows) read without pickles and checked: a 1-D integer array of unique
    rows in ``[0, ntotal)``, as many as the manifest's ``n_removed``. Returns the rows sorted, int64."""
    path = Path(path)
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a readable .npy array ({first}); expected the int64 rows removed by "
                         f"`twotower index remove`") from None
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise ValueError(f"{path}: found a {rows.dtype} array of shape {rows.shape}, expected a 1-D integer array")
    rows = rows.astype(np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= ntotal):
        bad = int(rows.min()) if rows.min() < 0 else int(rows.max())
        raise ValueError(f"{path}: found row {bad}, expected rows in [0, {ntotal}) (manifest.json ntotal {ntotal})")
    rows = np.sort(rows)
    dup = np.flatnonzero(rows[1:] == rows[:-1])
    if len(dup):
        raise ValueError(f"{path}: found row {int(rows[dup[0]])} {int(np.sum(rows == rows[dup[0]]))} times, "
                         f"expected each removed row once")
    if len(rows) != n_removed:
        raise ValueError(f"{path}: found {len(rows)} removed rows, expected {n_removed} (manifest.json n_removed)")
    return rows


def check_arrow_schema(path: str | Path, found: Any, expected: Any) -> None:
    """An Arrow file's schema (``pyarrow.Schema``) against the one twotower writes: each expected column present
    with its type; one line naming the file and the first column that differs."""
    for field in expected:
        i = found.get_field_index(field.name)
        if i < 0:
            raise ValueError(f"{path}: column '{field.name}' is missing (expected {field.type}; found columns "
                             f"{', '.join(found.names) or 'none'})")
        if not found.field(i).type.equals(field.type):
            raise ValueError(f"{path}: column '{field.name}': found {found.field(i).type}, expected {field.type}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
