"""codesearch-py: docstring summary -> function code, mined from pinned third-party PyPI wheels.

Wheels are fetched with ``pip download --no-deps`` for one fixed target (CPython 3.11, manylinux2014
x86_64), checked against pinned sha256s and read straight from the zip: nothing is installed or imported,
so the suite does not depend on the machine that builds it. ``ast`` finds module-level functions and
methods with docstrings; the query is the docstring's first paragraph cut at Args:/Parameters/:param/>>>,
the positive is the function source with the docstring lines removed (decorators and signature kept).

Split by package: every function of the test packages is a corpus doc (documented ones also give a
query); the other packages give training pairs, one of them held out as the dev split.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import random
import re
import textwrap
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from twotower.common.pins import WheelPin, fetch_wheels, normalize_name, wheel_project
from twotower.eval.suites.build import BuiltSuite

PINNED_WHEELS: tuple[WheelPin, ...] = (
    WheelPin("numpy", "1.26.4", "666dbfb6ec68962c033a450943ded891bed2d54e6755e35e5835d63f4f6931d5"),
    WheelPin("scipy", "1.13.1", "a78b4b3345f1b6f68a763c6e25c0c9a23a9fd0f39f5f3d200efe8feda560a5fa"),
    WheelPin("sympy", "1.13.3", "54612cf55a62755ee71824ce692986f23c88ffa77207b30c1368eda4a7060f73"),
    WheelPin("networkx", "3.3", "28575580c6ebdaf4505b22c6256a2b9de86b316dc63ba9e93abde3d78dfdbcf2"),
    WheelPin("django", "5.0.6", "8363ac062bb4ef7c3f12d078f6fa5d154031d129a15170a1066412af49d30905"),
    WheelPin("pandas", "2.2.2", "6d2123dc9ad6a814bcdea0f099885276b31b24f7edf40f6cdbc0912672e22eee"),
    WheelPin("scikit-learn", "1.5.1", "689b6f74b2c880276e365fe84fe4f1befd6a774f016339c65655eaff12e10cbf"),
    WheelPin("matplotlib", "3.9.2", "8912ef7c2362f7193b5819d17dae8629b34a95c58603d781329712ada83f9447"),
    WheelPin("astropy", "6.1.2", "f5ee7e334a0601858fcd4b72490b0626174ac97fd591fc3408b496d20167f186"),
    WheelPin("transformers", "4.44.2", "1c02c65e7bfa5e52a634aff3da52138b583fc6f263c1f28d547dc144ba3d412d"),
    WheelPin("twisted", "24.7.0", "734832ef98108136e222b5230075b1079dad8a3fc5637319615619a7725b0c81"),
    WheelPin("sqlalchemy", "2.0.32", "295ff8689544f7ee7e819529633d058bd458c1fd7f7e3eebd0f9268ebc56c2a0"),
    WheelPin("nltk", "3.9.1", "4fa26829c5b00715afe3061398a8989dc643b92ce7dd93fb4585a70930d168a1"),
    WheelPin("statsmodels", "0.14.2", "4864a1c4615c5ea5f2e3b078a75bdedc90dd9da210a37e0738e064b419eccee2"),
    WheelPin("dask", "2024.8.0", "250ea3df30d4a25958290eec4f252850091c6cfaed82d098179c3b25bba18309"),
    WheelPin("xarray", "2024.7.0", "1b0fd51ec408474aa1f4a355d75c00cc1c02bd425d97b2c2e551fd21810e7f64"),
    WheelPin("jax", "0.4.31", "5688703735133d0dc537e99a1d646198a49c9d472d4715fde4bd437c44151bd7"),
    WheelPin("sphinx", "7.4.7", "c2419e2135d11f1951cd994d6eb18a1835bd8fdd8429f9ca375dc1f3281bd239"),
    WheelPin("ipython", "8.26.0", "e6b347c27bdf9c32ee9d31ae85defc525755a1869f14057e900675b9e8d6e6ff"),
    WheelPin("mpmath", "1.3.0", "a0b2b9fe80bbcd81a6647ff13108738cfb482d481d826cc0e02f5b35e5c88d2c"),
    WheelPin("docutils", "0.21.2", "dafca5b9e384f0e419294eb4d2ff9fa826435bf15f15b7bd45723e8ad76811b2"),
    WheelPin("bokeh", "3.5.1", "f8ed2965f03bc1bcd1597bed8d95f3522387beca660a915b11b9311fe6486b54"),
    WheelPin("keras", "3.4.1", "15599c51e2090c12f39de6db6489a0cf265ddf6653f0731b82db5af2bfa19105"),
    WheelPin("numba", "0.60.0", "4142d7ac0210cc86432b818338a2bc368dc773a2f5cf1e32ff7c5b378bd63ee8"),
    WheelPin("scikit-image", "0.24.0", "fa27b3a0dbad807b966b8db2d78da734cb812ca4787f7fbb143764800ce2fa9c"),
    WheelPin("seaborn", "0.13.2", "636f8336facf092165e27924f223d3c62ca560b1f2bb5dff7ab7fad265361987"),
    WheelPin("pytest", "8.3.2", "4ba08f9ae7dcf84ded419494d229b48d0903ea6407b030eaec46df5e6a73bba5"),
    WheelPin("hypothesis", "6.111.0", "7a51f678da3719a04a3ef61cd241384dd93b49f35d7cce22833745c66ac1d507"),
    WheelPin("astroid", "3.2.4", "413658a61eeca6202a59231abb473f932038fbcbf1666587f66d482083413a25"),
    WheelPin("pylint", "3.2.6", "03c8e3baa1d9fb995b12c1dbe00aa6c4bcef210c2a2634374aedeb22fb4a8f8f"),
    WheelPin("werkzeug", "3.0.3", "fc9645dc43e03e4d630d23143a04a7f947a9a3b5727cd535fdfe155a17cc48c8"),
    WheelPin("jinja2", "3.1.4", "bc5dd2abb727a5319567b7a813e6a2e7318c39f4f487cfe6c89c6f9c7d25197d"),
    WheelPin("setuptools", "72.1.0", "5a03e1860cf56bb6ef48ce186b0e557fdba433237481a9a625176c2831be15d1"),
)
# Packages whose functions form the test corpus (never seen in training), and the train package held
# out for dev.jsonl. Chosen for size (~11k test queries, ~25k docs) and topic spread: astronomy/units,
# ORM/SQL, statistics, networking.
TEST_PACKAGES: tuple[str, ...] = ("astropy", "sqlalchemy", "statsmodels", "twisted")
DEV_PACKAGE = "nltk"
MIN_QUERY_WORDS = 3
MAX_QUERY_REPEATS = 3  # a summary seen more often than this is boilerplate ("Return the value.")
MAX_CODE_CHARS = 4000  # positives are cut at a line boundary past this many characters
# Path parts that mark tests, benchmarks or third-party code copied into a package.
SKIP_DIRS = frozenset({
    "tests", "test", "testing", "benchmarks", "conftest", "_vendor", "vendor", "vendored", "_vendored",
    "externals", "_externals", "extern", "_extern", "array_api_compat", "_uarray", "_array_api_compat_vendor",
})

_SECTION = re.compile(
    r"^\s*(args|arguments|parameters|params|keyword args|keyword arguments|other parameters|returns?|yields?|"
    r"raises|examples?|notes?|see also|attributes|references|warnings?|methods|todo)\s*:?\s*$",
    re.IGNORECASE,
)
_UNDERLINE = re.compile(r"^\s*[-=~^*]{3,}\s*$")
_LINE_CUT = re.compile(r"^\s*(\.\. |>>>|:param|:type|:returns?:|:rtype:|:raises?|@param|@return)")
_INLINE_CUT = re.compile(
    r">>>|:param\b|:type\b|:returns?:|:rtype:|:raises?\b|@param\b|@return\b|"
    r"\b(?:Args|Arguments|Parameters|Returns|Yields|Raises|Examples?)\s*:"
)
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")  # a docstring that opens with "f(x, y) -> z"
_ROLE = re.compile(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~numpy.sum` -> numpy.sum


@dataclasses.dataclass(frozen=True)
class CodeFunction:
    """One mined function: where it lives, its query (None when undocumented) and its code."""

    package: str
    path: str
    qualname: str
    query: str | None
    code: str


def docstring_query(doc: str) -> str | None:
    """The docstring's summary as a search query, or None when too short to be one.

    Takes the first paragraph (the second when the first is a bare call signature), stops at a section
    header (Args:, Parameters + underline, Returns, Examples...), a directive (``..``), a field list
    (``:param``) or a doctest (``>>>``), unwraps Sphinx roles and normalises whitespace.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", textwrap.dedent(doc).strip()) if p.strip()]
    if paragraphs and _SIGNATURE.match(" ".join(paragraphs[0].split())):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return None
    kept: list[str] = []
    for line in paragraphs[0].split("\n"):
        if _UNDERLINE.match(line):
            kept = kept[:-1]  # the line above was a numpydoc section header
            break
        if _SECTION.match(line) or _LINE_CUT.match(line):
            break
        kept.append(line)
    text = " ".join(kept)
    cut = _INLINE_CUT.search(text)
    if cut:
        text = text[: cut.start()]
    text = _ROLE.sub(lambda m: m.group(1), text).replace("``", "")
    text = " ".join(text.split())
    return text if len(text.split()) >= MIN_QUERY_WORDS else None


def _is_trivial(body: Sequence[ast.stmt]) -> bool:
    """Nothing to retrieve: empty, ``pass``, ``...`` or ``raise NotImplementedError``."""
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
            continue
        if isinstance(stmt, ast.Raise) and stmt.exc is not None:
            exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _walk_functions(body: Sequence[ast.stmt], prefix: str = "") -> Iterator[tuple[str, Function]]:
    """Module-level functions and methods (nested classes too), not functions nested in functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _walk_functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # `if TYPE_CHECKING:` / `try: import` blocks
            for block in ("body", "orelse", "handlers", "finalbody"):
                for child in getattr(node, block, []):
                    inner = child.body if isinstance(child, ast.ExceptHandler) else [child]
                    yield from _walk_functions(inner, prefix)


def _function_code(lines: list[str], node: Function, has_doc: bool) -> str | None:
    """Source lines of ``node`` (decorators included) minus the docstring's lines; None if not separable."""
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    assert node.end_lineno is not None, "ast nodes carry end positions on Python >= 3.8"
    kept = lines[start - 1 : node.end_lineno]
    if has_doc:
        doc = node.body[0]
        assert doc.end_lineno is not None and doc.end_col_offset is not None, "ast carries end positions"
        # The docstring must sit on lines of its own (col offsets are UTF-8 byte offsets).
        before = lines[doc.lineno - 1].encode()[: doc.col_offset]
        after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :].strip()
        if before.strip() or (after and not after.startswith(b"#")):
            return None
        kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    if len(code) > MAX_CODE_CHARS:
        cut = code.rfind("\n", 0, MAX_CODE_CHARS)
        code = code[: cut if cut > 0 else MAX_CODE_CHARS]
    return code


def skip_path(path: str) -> bool:
    """Tests, benchmarks, conftest and vendored/external code are not mined."""
    parts = path.split("/")
    name = parts[-1]
    return (
        any(p in SKIP_DIRS for p in parts[:-1])
        or name.startswith("test_")
        or name.endswith("_test.py")
        or name in ("conftest.py", "setup.py")
    )


def extract_functions(wheel: Path, stats: collections.Counter[str] | None = None) -> Iterator[CodeFunction]:
    """Mine every non-trivial function of a wheel's ``.py`` files (read from the zip, never imported).

    ``stats`` (optional) counts skipped files and functions by reason.
    """
    stats = stats if stats is not None else collections.Counter()
    package = wheel_project(wheel)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".py") and ".dist-info/" not in n and ".data/" not in n)
        for name in names:
            if skip_path(name):
                stats["files_skipped_tests_vendored"] += 1
                continue
            try:
                source = zf.read(name).decode("utf-8")
                tree = ast.parse(source)
            except (UnicodeDecodeError, SyntaxError, ValueError):
                stats["files_unparsable"] += 1
                continue
            stats["files"] += 1
            lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            for qualname, node in _walk_functions(tree.body):
                doc = ast.get_docstring(node, clean=True)
                body = node.body[1:] if doc is not None else node.body
                short = node.name.startswith("__") and node.name.endswith("__") and len(body) <= 1
                if _is_trivial(body) or short:
                    stats["functions_trivial"] += 1
                    continue
                code = _function_code(lines, node, doc is not None)
                if code is None:
                    stats["functions_inline_docstring"] += 1
                    continue
                query = docstring_query(doc) if doc else None
                yield CodeFunction(package, name, qualname, query, code)


def _code_key(code: str) -> str:
    return hashlib.sha256(" ".join(code.split()).encode()).hexdigest()


def _query_key(query: str) -> str:
    return query.lower().rstrip(".")


def pins() -> list[str]:
    """The pinned sources, as recorded in checksums.json."""
    return [f"{p.name}=={p.version} sha256:{p.sha256}" for p in PINNED_WHEELS]


def fetch(download_dir: Path, wheels: Sequence[WheelPin] = PINNED_WHEELS) -> list[Path]:
    """Download the pinned wheels (cached) with ``pip download --no-deps`` and verify their sha256."""
    return fetch_wheels(download_dir, wheels)


def build(
    wheels: Sequence[Path],
    test_packages: Sequence[str] = TEST_PACKAGES,
    dev_package: str | None = DEV_PACKAGE,
    dev_size: int = 1000,
    seed: int = 0,
) -> BuiltSuite:
    """Mine already-downloaded wheels into train/dev pairs and a BEIR test suite.

    Test corpus = every distinct function of ``test_packages`` (exact duplicates merged); test queries =
    their distinct docstring summaries, each relevant to every doc it summarises. Train pairs come from
    the other packages minus ``dev_package`` (its pairs, up to ``dev_size``, form dev.jsonl); any pair whose
    code or query also occurs in the test packages is dropped, so nothing of the test split is trained on.
    Summaries seen more than ``MAX_QUERY_REPEATS`` times anywhere are boilerplate and dropped everywhere.
    """
    by_package = {wheel_project(w): w for w in wheels}
    unknown = sorted({normalize_name(p) for p in test_packages} - by_package.keys())
    if unknown or (dev_package and normalize_name(dev_package) not in by_package):
        choices = ", ".join(sorted(by_package))
        raise ValueError(f"packages {unknown or [dev_package]} have no wheel: choose from {choices}")
    test_set = {normalize_name(p) for p in test_packages}
    dev_name = normalize_name(dev_package) if dev_package else None
    stats: collections.Counter[str] = collections.Counter()
    functions: list[CodeFunction] = []
    for package in tqdm(sorted(by_package), desc="parse wheels", unit="wheel"):
        functions.extend(extract_functions(by_package[package], stats))
    query_counts = collections.Counter(_query_key(f.query) for f in functions if f.query)
    boilerplate = {q for q, n in query_counts.items() if n > MAX_QUERY_REPEATS}

    # Test side first: exact-duplicate code becomes one doc; a summary is one query for all its docs.
    doc_ids: dict[str, str] = {}  # code hash -> doc id
    used_ids: set[str] = set()
    corpus_rows: list[dict] = []
    queries: dict[str, tuple[str, set[str]]] = {}  # query key -> (text, doc ids)
    for f in functions:
        if f.package not in test_set:
            continue
        key = _code_key(f.code)
        if key not in doc_ids:
            doc_id = f"{f.package}:{f.path[:-3].replace('/', '.')}.{f.qualname}"
            if doc_id in used_ids:  # same name defined twice in one file (e.g. under `if`/`else`)
                doc_id += f"#{key[:8]}"
            used_ids.add(doc_id)
            doc_ids[key] = doc_id
            corpus_rows.append({"_id": doc_id, "title": "", "text": f.code,
                                "metadata": {"package": f.package, "path": f.path, "name": f.qualname}})
        if f.query and _query_key(f.query) not in boilerplate:
            queries.setdefault(_query_key(f.query), (f.query, set()))[1].add(doc_ids[key])
    query_rows, qrels = [], {}
    for i, (text, docs) in enumerate(queries.values()):
        qid = f"q{i:06d}"
        query_rows.append({"_id": qid, "text": text})
        qrels[qid] = {d: 1 for d in sorted(docs)}

    # Train side: drop boilerplate, anything seen in test, and exact duplicate code.
    seen_code = set(doc_ids)
    train, dev = [], []
    for f in functions:
        if f.package in test_set or not f.query:
            continue
        qkey, ckey = _query_key(f.query), _code_key(f.code)
        if qkey in boilerplate or qkey in queries or ckey in seen_code:
            stats["pairs_dropped_boilerplate_or_duplicate"] += 1
            continue
        seen_code.add(ckey)
        (dev if f.package == dev_name else train).append({"query": f.query, "positive": f.code})
    dev_all = len(dev)
    if len(dev) > dev_size:
        dev = [dev[i] for i in sorted(random.Random(seed).sample(range(len(dev)), dev_size))]
    stats.update(functions=len(functions), boilerplate_summaries=len(boilerplate), dev_package_pairs=dev_all)
    return BuiltSuite(
        train=train, dev=dev, corpus=corpus_rows, queries=query_rows, qrels=qrels,
        stats={**dict(sorted(stats.items())), "test_packages": sorted(test_set), "dev_package": dev_name},
    )
