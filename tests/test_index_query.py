"""One query vocabulary: QueryOptions' fields and checks are what the CLI, HTTP body, bench and index build show."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from twotower.index.query import QUERY_DEFAULTS, QueryOptionError, QueryOptions, options_of, surface_fields


def _names(surface: str, prefix: str = "") -> list[str]:
    return [prefix + f.name for f in surface_fields(surface)]


def test_every_surface_is_generated_from_query_options() -> None:
    from twotower.common.cliargs import add_dataclass_args
    from twotower.eval.config import BenchConfig
    from twotower.index.config import IndexBuildConfig
    from twotower.retrieval.config import SearchConfig
    from twotower.retrieval.server import SearchRequest

    every = [f.name for f in dataclasses.fields(QueryOptions)]
    assert _names("search") == every  # search carries every option, HTTP every one but the reranker's dir
    assert _names("http") == [n for n in every if n != "reranker"]  # a client never names a dir to load
    config_fields = {cls: [f.name for f in dataclasses.fields(cls)] for cls in (SearchConfig, BenchConfig,
                                                                                IndexBuildConfig)}
    assert set(_names("search")) <= set(config_fields[SearchConfig])
    assert [n for n in config_fields[BenchConfig] if n.startswith("hybrid_")] == _names("bench", "hybrid_") == \
        ["hybrid_alpha", "hybrid_norm", "hybrid_depth"]
    assert [n for n in config_fields[IndexBuildConfig] if n.startswith("default_")] == \
        _names("manifest", "default_") == ["default_mode", "default_fusion", "default_alpha", "default_norm",
                                           "default_reranker", "default_rerank"]
    assert list(SearchRequest.model_fields) == ["queries", *_names("http")]
    # the --flags, their help and choices come from the same fields
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, SearchConfig)
    actions = {a.dest: a for a in parser._actions}
    for f in surface_fields("search"):
        assert actions[f.name].help.startswith(f.metadata["help"])
        assert actions[f.name].choices == f.metadata.get("choices")
    assert "-k" in actions["k"].option_strings
    assert SearchRequest.model_fields["fusion"].description.startswith(QueryOptions.__dataclass_fields__["fusion"]
                                                                       .metadata["help"])
    # concrete defaults where a default is recorded (manifest) or run (bench): the fields' fallbacks
    assert IndexBuildConfig().query_defaults() == QUERY_DEFAULTS
    b = BenchConfig(suite="s")
    assert (b.hybrid_alpha, b.hybrid_norm, b.hybrid_depth) == (0.5, "minmax", 10)


@pytest.mark.parametrize("field, value, message", [
    ("mode", "sparse", "unknown mode 'sparse': choose dense, bm25, hybrid"),
    ("fusion", "max", "unknown fusion 'max': choose rrf, weighted"),
    ("norm", "l2", "unknown norm 'l2': choose minmax, zscore"),
    ("alpha", 1.5, "alpha must be a number between 0 and 1 (the dense side's weight), got 1.5"),
    ("alpha", True, "alpha must be a number between 0 and 1"),
    ("depth", 0, "depth must be an integer between 1 and 100, got 0"),
    ("depth", 2.0, "depth must be an integer between 1 and 100, got 2.0"),
    ("nprobe", 0, "nprobe must be a positive integer"),
    ("rescore", 1001, "rescore must be an integer between 0 and 1000 or None, got 1001"),
    ("k", 0, "k must be between 1 and 100000 (the cap), got 0"),
    ("filter", "{bad", "--filter: not valid JSON"),
    ("filter", ["a"], "filter must be a JSON object"),
])
def test_one_check_per_option_same_words_everywhere(field, value, message) -> None:
    """The Python API and the bench/index-build flags say the same sentence (the flags name themselves)."""
    with pytest.raises(QueryOptionError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as exc:
        QueryOptions(**{field: value})
    assert exc.value.name == field
    from twotower.eval.config import BenchConfig
    from twotower.index.config import IndexBuildConfig

    for cls, surface, prefix in ((BenchConfig, "bench", "hybrid_"), (IndexBuildConfig, "manifest", "default_")):
        if field in _names(surface):
            with pytest.raises(ValueError) as flagged:
                cls(**({"suite": "s"} if cls is BenchConfig else {}), **{prefix + field: value})
            assert str(flagged.value) == str(exc.value).replace(field, f"--{prefix.replace('_', '-')}{field}", 1)


def test_every_field_has_its_check_and_a_surface() -> None:
    from twotower.index.query import CHECKS

    assert set(CHECKS) == {f.name for f in dataclasses.fields(QueryOptions)}
    assert all(f.metadata["surfaces"] and f.metadata["help"] for f in dataclasses.fields(QueryOptions))


def test_resolve_fills_defaults_and_keys_group_equal_requests() -> None:
    given = QueryOptions(k=5, alpha=0.9, filter='{"package": "numpy"}')
    assert given.mode is None and given.filter == {"package": "numpy"}  # JSON text is parsed
    resolved = given.resolve({"mode": "hybrid", "fusion": "weighted", "alpha": 0.2})
    assert (resolved.mode, resolved.fusion, resolved.alpha, resolved.norm, resolved.depth) == \
        ("hybrid", "weighted", 0.9, "minmax", 10)  # given beats the manifest, the manifest the fallback
    assert resolved.nprobe is None and resolved.rescore is None  # the index decides at search time
    assert resolved.key() == given.replace(mode=None).resolve({"mode": "hybrid", "fusion": "weighted"}).key()
    assert resolved.key() != resolved.replace(k=6).key()
    with pytest.raises(QueryOptionError, match="unknown fusion 'x'"):
        QueryOptions().resolve({"fusion": "x"})  # a bad manifest default is named too
    bench = options_of(dataclasses.make_dataclass("C", [("hybrid_alpha", float, 0.3), ("hybrid_norm", str, "zscore"),
                                                        ("hybrid_depth", int, 2)])(), "bench", "hybrid_")
    assert (bench.alpha, bench.norm, bench.depth) == (0.3, "zscore", 2)
