"""The query vocabulary: one :class:`QueryOptions` value says how a search ranks, with its choices and checks.

Every surface is derived from its fields, nothing spells them again:

- ``twotower search`` options: ``SearchConfig`` is decorated with ``@query_fields("search")`` (one ``--flag`` per
  field, None = the index's default); ``twotower index build --default-*``: ``@query_fields("manifest",
  prefix="default_")``; ``twotower bench --hybrid-*``: ``@query_fields("bench", prefix="hybrid_")``.
- ``POST /search`` body fields: ``retrieval.server`` builds its pydantic model from :func:`surface_fields`.
- ``Retriever.search(queries, k, options=QueryOptions(...))``, the micro-batcher and the Ray router take it whole.

Light module (no numpy, torch or faiss): the CLI imports it before ``--help``.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from twotower.common.cliargs import field

MODES = ("dense", "bm25", "hybrid")
FUSIONS = ("rrf", "weighted")
NORMS = ("minmax", "zscore")
DEFAULT_DEPTH = 10  # candidates per side = k * depth
MAX_DEPTH = 100
MAX_K_CAP = 100_000  # the highest k any server allows (--max-k); faiss allocates nq x k results per search
# nprobe above the IVF list count is clamped by faiss, so no real request needs more; faiss keeps it in a
# size_t, and a bigger Python int overflows inside faiss (an internal error instead of a 422).
MAX_NPROBE = 2**31 - 1
MAX_RESCORE = 1000  # candidates = k x rescore; beyond this a re-score reads more than a Flat scan would
MAX_RERANK = 1000  # cross-encoder pairs per query: beyond this a rerank costs seconds per query on a GPU

# Where a field shows up: search (CLI + Retriever), http (POST /search), manifest (index build --default-*),
# bench (twotower bench --hybrid-*). Every field is part of the Python API.
ALL = ("search", "http")
FUSING = ("search", "http", "manifest", "bench")
SURFACE_NOTES = {"manifest": "; recorded in the manifest, used when a search names none",
                 "bench": "; for the hybrid systems"}


class QueryOptionError(ValueError):
    """A bad query option; ``name`` is the field (the HTTP error's ``loc``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ValueError "unknown NAME 'x': choose a, b"."""
    if value not in choices:
        raise QueryOptionError(name.lstrip("-").replace("-", "_"),
                               f"unknown {name} {value!r}: choose {', '.join(choices)}")
    return value


def _integer(name: str, value: Any, low: int, high: int, text: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise QueryOptionError(name.lstrip("-").replace("-", "_"), f"{name} must be {text}, got {value!r}")
    return int(value)


def _nonempty_str(name: str, value: Any, text: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise QueryOptionError(name.lstrip("-").replace("-", "_"), f"{name} must be {text}, got {value!r}")
    return value


def check_k(k: Any, max_k: int, name: str = "k") -> int:
    """``k`` as an int in [1, max_k] (the server's cap), else ValueError naming the value and the cap."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise QueryOptionError(name.lstrip("-"), f"{name} must be an integer between 1 and {max_k}, got {k!r}")
    if not 1 <= k <= max_k:
        raise QueryOptionError(name.lstrip("-"), f"{name} must be between 1 and {max_k} (the cap), got {k}")
    return int(k)


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise QueryOptionError(name.lstrip("-").replace("-", "_"), f"{name} must be a number between 0 and 1 "
                                                                   f"(the dense side's weight), got {alpha!r}")
    return float(alpha)


def check_filter(value: Any, name: str = "filter") -> dict[str, Any] | None:
    """A metadata filter dict (or its JSON text, as ``--filter`` gives it); {} is no filter. Whether its fields
    exist is the index's check (``index.filters.FilterMap.allowed``)."""
    if isinstance(value, str):
        from twotower.index.filters import parse_filter  # numpy: not on the --help path

        try:
            value = parse_filter(value, name if name.startswith("-") else "--" + name.replace("_", "-"))
        except ValueError as exc:
            raise QueryOptionError("filter", str(exc)) from None
    if value is not None and not isinstance(value, dict):
        raise QueryOptionError("filter", f"{name} must be a JSON object {{field: value | {{operator: value}}}}, got "
                                         f"{type(value).__name__}")
    return value or None


# One check per field: (value, the name to report) -> the checked value. A None value is never checked here.
CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "k": lambda v, n: check_k(v, MAX_K_CAP, n),
    "nprobe": lambda v, n: _integer(n, v, 1, MAX_NPROBE, f"a positive integer (at most {MAX_NPROBE}) or None"),
    "mode": lambda v, n: check_choice(n, v, MODES),
    "fusion": lambda v, n: check_choice(n, v, FUSIONS),
    "alpha": check_alpha,
    "norm": lambda v, n: check_choice(n, v, NORMS),
    "depth": lambda v, n: _integer(n, v, 1, MAX_DEPTH, f"an integer between 1 and {MAX_DEPTH}"),
    "filter": check_filter,
    "rescore": lambda v, n: _integer(n, v, 0, MAX_RESCORE, f"an integer between 0 and {MAX_RESCORE} or None"),
    "reranker": lambda v, n: _nonempty_str(n, v, "a RERANKER dir (twotower train-reranker)"),
    "rerank": lambda v, n: _integer(n, v, 0, MAX_RERANK, f"an integer between 0 and {MAX_RERANK} or None"),
}


@dataclasses.dataclass(frozen=True)
class QueryOptions:
    """How one search ranks: every query option of twotower, defined once with its choices and checks.

    A field left None takes the INDEX's default (``index build --default-*``, recorded in the manifest's
    ``query_defaults``), else its ``fallback``; :meth:`resolve` fills them in. Construction checks every given
    value (one :class:`QueryOptionError` line naming the field).

    To add an option (e.g. ``reranker``, ``rerank``): add a field here with ``field(default, help, none=...,
    surfaces=(...), fallback=...)``, and its check to :data:`CHECKS`. ``surfaces`` lists where it appears:
    ``search`` (the ``twotower search`` flag, generated by :func:`query_fields`), ``http`` (the ``POST /search``
    body field, generated by ``retrieval.server``), ``manifest`` (``index build --default-NAME``) and ``bench``
    (``twotower bench --hybrid-NAME``). Nothing else needs editing to carry it: the Retriever, the micro-batcher
    and the Ray router pass the whole value along (then use the field where the search runs).
    """

    k: int = field(10, "hits per query", flag="-k", surfaces=ALL)
    nprobe: int | None = field(None, "IVF lists to visit", none="the index's own setting", surfaces=ALL)
    mode: str | None = field(None, "dense (towers), bm25 (the index's BM25 side) or hybrid (both, fused)",
                             none="the index manifest's default", choices=list(MODES), fallback="dense",
                             surfaces=("search", "http", "manifest"))
    fusion: str | None = field(None, "hybrid fusion: rrf (reciprocal rank, k=60) or weighted (alpha * dense + "
                                     "(1 - alpha) * bm25 of per-query normalised scores)",
                               none="the manifest's", choices=list(FUSIONS), fallback="rrf",
                               surfaces=("search", "http", "manifest"))
    alpha: float | None = field(None, "weighted fusion: weight of the dense side, 0..1", none="the manifest's",
                                fallback=0.5, surfaces=FUSING)
    norm: str | None = field(None, "weighted fusion: per-query score normalisation", none="the manifest's",
                             choices=list(NORMS), fallback="minmax", surfaces=FUSING)
    depth: int | None = field(None, f"hybrid: candidates per side = k * depth (1..{MAX_DEPTH})", none="the manifest's",
                              fallback=DEFAULT_DEPTH, surfaces=("search", "http", "bench"))
    filter: dict[str, Any] | None = field(
        None, "metadata filter as JSON, e.g. '{\"package\": \"numpy\"}', '{\"year\": {\"$gte\": 2020}}' (operators "
              "$eq $ne $in $nin $gt $gte $lt $lte)", none="no filter", arg_type=str, surfaces=ALL)
    rescore: int | None = field(None, "re-score k x N candidates with the exact vectors the index keeps "
                                      "(vectors.npy); 0 = off", none="the index's default", surfaces=ALL)
    # Second stage (twotower train-reranker): a client names how many candidates, never which dir to load.
    reranker: str | None = field(None, "RERANKER dir (twotower train-reranker): reorders the first stage's top "
                                       "--rerank (dense or hybrid) with this cross-encoder",
                                 none="the manifest's default", surfaces=("search", "manifest"))
    rerank: int | None = field(None, f"candidates of the first stage the reranker reorders, 0..{MAX_RERANK} "
                                     f"(0 = off); hits past them keep the first stage's order and score",
                               none="the manifest's default, else 0", surfaces=("search", "http", "manifest"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, CHECKS[f.name](value, f.name))

    def replace(self, **changes: Any) -> QueryOptions:
        """A copy with ``changes`` (None values are ignored: they mean "not given")."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def resolve(self, defaults: dict[str, Any] | None = None) -> QueryOptions:
        """Every None that has a default filled in: from ``defaults`` (the manifest's ``query_defaults``), else the
        field's ``fallback``. nprobe, filter and rescore stay None (the index decides at search time)."""
        defaults = {**QUERY_DEFAULTS, **(defaults or {})}
        return dataclasses.replace(self, **{f.name: defaults[f.name] for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is None and f.name in defaults})

    def key(self) -> tuple[Any, ...]:
        """Hashable identity (the micro-batcher searches requests with equal keys together)."""
        return tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
                     for v in dataclasses.astuple(self))


QUERY_DEFAULTS: dict[str, Any] = {f.name: f.metadata["fallback"] for f in dataclasses.fields(QueryOptions)
                                  if "fallback" in f.metadata}

T = TypeVar("T")


def surface_fields(surface: str) -> list[dataclasses.Field]:
    """The fields of :class:`QueryOptions` that appear on ``surface`` (search, http, manifest, bench)."""
    return [f for f in dataclasses.fields(QueryOptions) if surface in f.metadata["surfaces"]]


def query_fields(surface: str, prefix: str = "") -> Callable[[type[T]], type[T]]:
    """Class decorator (put it under ``@dataclass``): adds a config field ``PREFIX + name`` for every
    :class:`QueryOptions` field of ``surface``, with its help and choices. ``search`` fields keep QueryOptions'
    defaults (None: the index's); other surfaces (they record or run a default) take the field's ``fallback``.
    The config checks them with :func:`check_config_options` and reads them with :func:`options_of`."""
    hints = typing.get_type_hints(QueryOptions)

    def add(cls: type[T]) -> type[T]:
        for f in surface_fields(surface):
            meta = dict(f.metadata)
            given = surface == "search"
            default = f.default if given or "fallback" not in meta else meta["fallback"]
            help_text = meta.pop("help") + (f" (None: {meta['none']})" if given and "none" in meta else "") + \
                SURFACE_NOTES.get(surface, "")
            cls.__annotations__[prefix + f.name] = hints[f.name]
            setattr(cls, prefix + f.name, field(default, help_text, **{k: v for k, v in meta.items()
                                                                       if k != "required"}))
        return cls

    return add


def options_of(config: Any, surface: str, prefix: str = "", **extra: Any) -> QueryOptions:
    """The :class:`QueryOptions` a config's generated fields (see :func:`query_fields`) hold, plus ``extra``."""
    return QueryOptions(**{f.name: getattr(config, prefix + f.name) for f in surface_fields(surface)}, **extra)


def check_config_options(config: Any, surface: str, prefix: str = "") -> None:
    """Check a config's generated fields with the QueryOptions checks, each error naming its ``--flag``."""
    for f in surface_fields(surface):
        value = getattr(config, prefix + f.name)
        if value is not None:
            flag = f.metadata.get("flag") if not prefix and "flag" in f.metadata else \
                "--" + (prefix + f.name).replace("_", "-")
            setattr(config, prefix + f.name, CHECKS[f.name](value, flag))
