"""codesearch-py on tiny wheels built in code: query extraction, positives, skips, dedupe, leak-free split."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from twotower.eval.suites import codesearch
from twotower.eval.suites.beir import file_sha256, load_beir
from twotower.eval.suites.build import build_suite, verify_suite
from twotower.eval.suites.codesearch import CodeFunction, WheelPin, docstring_query, extract_functions

BOILER = '    """Return the value."""\n'

CORE = '''
import functools


@functools.lru_cache
def google_style(a, b):
    """Add two numbers
    and return the total.

    Args:
        a: first.
    """
    return a + b


def numpy_style(x):
    """Square every element of an array
    Parameters
    ----------
    x : array
    """
    return x * x


def with_doctest(n):
    """Count the set bits of an integer. >>> with_doctest(3)"""
    return bin(n).count("1")


def undocumented(y):
    z = y + 1
    return z


def stub():
    """Do nothing at all here."""
    raise NotImplementedError


class Graph:
    """A graph."""

    def __repr__(self):
        """Representation of the graph object."""
        return "Graph()"

    def add_edge(self, u, v):
        """Add an edge between :func:`~pkg.nodes` u and ``v``.

        :param u: a node
        """
        self.edges.append((u, v))
        return self
'''


def boilerplate(prefix: str, n: int) -> str:
    return "".join(f"\ndef {prefix}{i}(self):\n{BOILER}    return self._v{i}\n" for i in range(n))


def make_wheel(root: Path, name: str, files: dict[str, str]) -> Path:
    path = root / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
        zf.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\nVersion: 1.0\n")
    return path


SHARED_CODE = "def shared_helper(items):\n    \"\"\"{doc}\"\"\"\n    return sorted(set(items))\n"


@pytest.fixture
def wheels(tmp_path: Path) -> list[Path]:
    test_pkg = make_wheel(tmp_path, "testpkg", {
        "testpkg/__init__.py": "",
        "testpkg/core.py": CORE,
        "testpkg/util.py": SHARED_CODE.format(doc="Sort the unique items of a list.") + boilerplate("get_a", 2),
        "testpkg/util2.py": SHARED_CODE.format(doc="Deduplicate and order the items."),  # same code, new doc
        "testpkg/tests/test_core.py":
            'def test_add():\n    """Check that adding numbers works."""\n    assert 1 + 1 == 2\n',
        "testpkg/conftest.py": 'def fixture_x():\n    """Provide the fixture value x."""\n    return 1\n',
        "testpkg/_vendor/six.py": 'def vendored(a):\n    """A vendored helper function here."""\n    return a\n',
    })
    train_pkg = make_wheel(tmp_path, "trainpkg", {
        "trainpkg/a.py": SHARED_CODE.format(doc="Same code as a test doc, other words.")
        + '\ndef same_query(q):\n    """Sort the unique items of a list."""\n    return list(q)\n'
        + '\ndef train_only(s):\n    """Reverse the characters of a string."""\n    return s[::-1]\n'
        + boilerplate("get_b", 2),
        "trainpkg/b.py":
            'def train_only(s):\n    """Reverse the characters of a string again."""\n    return s[::-1]\n',
    })
    dev_pkg = make_wheel(tmp_path, "devpkg", {
        "devpkg/m.py": "".join(f'\ndef dev_{i}(x):\n    """Dev function number {i} here."""\n    return x + {i}\n'
                               for i in range(5)),
    })
    return [test_pkg, train_pkg, dev_pkg]


OPTIONS = {"test_packages": ["testpkg"], "dev_package": "devpkg", "dev_size": 3}


@pytest.mark.parametrize(
    ("doc", "query"),
    [
        ("Add two numbers\nand return the total.\n\nArgs:\n    a: first.", "Add two numbers and return the total."),
        ("Compute things fast.\nArgs:\n    x: input", "Compute things fast."),
        ("Square every element\nParameters\n----------\nx : array", "Square every element"),
        ("Count the set bits of n. >>> f(3)", "Count the set bits of n."),
        ("Open the file for reading :param path: where", "Open the file for reading"),
        ("Load it from disk now.\n.. versionadded:: 1.2", "Load it from disk now."),
        ("Sum over :func:`~numpy.sum` and :class:`Foo <pkg.Foo>` of ``x``.", "Sum over numpy.sum and Foo of x."),
        ("f(x, y) -> z\n\nReturn the ratio of x to y.", "Return the ratio of x to y."),
        ("Return it.", None),  # fewer than 3 words
        ("Args:\n    x: nothing before the section", None),
    ],
)
def test_docstring_query(doc: str, query: str | None) -> None:
    assert docstring_query(doc) == query


def functions_of(wheel: Path) -> dict[str, CodeFunction]:
    return {f.qualname: f for f in extract_functions(wheel)}


def test_extract_queries_positives_and_skips(wheels: list[Path]) -> None:
    funcs = functions_of(wheels[0])
    g = funcs["google_style"]
    assert g.query == "Add two numbers and return the total."
    assert g.code.startswith("@functools.lru_cache\ndef google_style(a, b):\n")  # decorator + signature kept
    assert '"""' not in g.code and "Args" not in g.code and g.code.rstrip().endswith("return a + b")
    assert funcs["numpy_style"].query == "Square every element of an array"
    assert funcs["with_doctest"].query == "Count the set bits of an integer."
    assert funcs["undocumented"].query is None  # still a corpus doc
    assert funcs["Graph.add_edge"].query == "Add an edge between pkg.nodes u and v."
    assert "param" not in funcs["Graph.add_edge"].code
    for skipped in ("stub", "Graph.__repr__", "test_add", "fixture_x", "vendored"):
        assert skipped not in funcs, skipped
    assert {f.path for f in extract_functions(wheels[0])} == {"testpkg/core.py", "testpkg/util.py", "testpkg/util2.py"}


def test_split_by_package_leaks_nothing(wheels: list[Path]) -> None:
    built = codesearch.build(wheels, **OPTIONS)
    test_code = {r["text"] for r in built.corpus}
    test_queries = {r["text"] for r in built.queries}
    pairs = built.train + built.dev
    assert pairs and not any(p["positive"] in test_code for p in pairs)
    assert not any(p["query"] in test_queries for p in pairs)
    assert {r["metadata"]["package"] for r in built.corpus} == {"testpkg"}
    # dev comes from the dev package only and is capped; the rest of it is not trained on either
    assert len(built.dev) == 3 and all(p["query"].startswith("Dev function") for p in built.dev)
    assert not any(p["query"].startswith("Dev function") for p in built.train)
    assert [p["query"] for p in built.train] == ["Reverse the characters of a string."]  # b.py: same code


def test_dedupe_and_boilerplate(wheels: list[Path]) -> None:
    built = codesearch.build(wheels, **OPTIONS)
    texts = [r["text"] for r in built.queries]
    assert "Return the value." not in texts  # 4 occurrences > MAX_QUERY_REPEATS: dropped everywhere
    codes = [" ".join(r["text"].split()) for r in built.corpus]
    assert len(codes) == len(set(codes))
    # util2.shared_helper has the same code as util.shared_helper: one doc, relevant to both summaries
    by_text = {r["text"]: r["_id"] for r in built.queries}
    rel_a = built.qrels[by_text["Sort the unique items of a list."]]
    rel_b = built.qrels[by_text["Deduplicate and order the items."]]
    assert rel_a == rel_b and len(rel_a) == 1
    # the undocumented function and the boilerplate getters stay as distractors
    names = {r["metadata"]["name"] for r in built.corpus}
    assert {"undocumented", "get_a0", "get_a1"} <= names
    assert all(set(rel) <= {r["_id"] for r in built.corpus} for rel in built.qrels.values())


def test_build_suite_end_to_end(wheels: list[Path], tmp_path: Path) -> None:
    out = build_suite("codesearch-py", tmp_path / "cs", sources=wheels, options=OPTIONS)
    suite = load_beir(out)
    assert len(suite.query_ids) == len(suite.qrels) > 0
    record = verify_suite(out)
    assert record["counts"]["test_queries"] == len(suite.query_ids)
    assert record["params"]["options"] == OPTIONS
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert train and set(train[0]) == {"query", "positive"}
    stamp = (out / "checksums.json").stat().st_mtime_ns
    build_suite("codesearch-py", out, sources=wheels, options=OPTIONS)  # cached: not rebuilt
    assert (out / "checksums.json").stat().st_mtime_ns == stamp
    small = load_beir(build_suite("codesearch-py", out, max_queries=2, max_corpus=3, sources=wheels, options=OPTIONS))
    assert len(small.query_ids) == 2 and len(small.corpus_ids) <= 3
    (out / "corpus.jsonl").write_text("tampered\n")
    with pytest.raises(ValueError, match="differs from checksums.json"):
        verify_suite(out)


def test_build_suite_refuses_unrelated_folder(wheels: list[Path], tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not make \\(not a suite built by `twotower data build`\\)"):
        build_suite("codesearch-py", tmp_path / "mine", sources=wheels, options=OPTIONS)
    with pytest.raises(ValueError, match="unknown suite 'code': choose codesearch-py, nq"):
        build_suite("code", tmp_path / "x")
    with pytest.raises(ValueError, match="have no wheel: choose from devpkg, testpkg, trainpkg"):
        codesearch.build(wheels, test_packages=["numpy"], dev_package="devpkg")


def test_fetch_checks_pinned_sha256(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "fakepkg", {"fakepkg/__init__.py": ""})
    pin = WheelPin("fakepkg", "1.0", "0" * 64)  # file present: no download attempted
    with pytest.raises(ValueError, match=f"fakepkg==1.0: {wheel.name} sha256 [0-9a-f]{{64}} in .*expected sha256 0000"):
        codesearch.fetch(tmp_path, wheels=[pin])
    assert codesearch.fetch(tmp_path, wheels=[WheelPin("fakepkg", "1.0", file_sha256(wheel))]) == [wheel]


def test_pins_are_exact_and_cover_split() -> None:
    names = {p.name for p in codesearch.PINNED_WHEELS}
    assert set(codesearch.TEST_PACKAGES) <= names and codesearch.DEV_PACKAGE in names
    assert all(len(p.sha256) == 64 and p.name == codesearch.normalize_name(p.name) for p in codesearch.PINNED_WHEELS)
    assert len(names) == len(codesearch.PINNED_WHEELS)
