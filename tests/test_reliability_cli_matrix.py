"""Every verb with every bad value class for every option: one line and exit 2 (or a normal run), never a
traceback; and the values that are wrong on their face are refused before any model or index loads.

The options are read from the real argparse tree (``twotower_cli.build_parser``), so an option added later is
covered without touching this file. Each verb starts from a valid command line over tiny real artefacts, and
one option at a time gets a bad value of its type: ints (-1, 0, 10**20), floats (nan, inf, -1), paths (a
file where a dir goes or a dir where a file goes, a missing path, an empty string), other strings (empty,
zero-width, a NUL byte).

"Before any model or index loads" is checked with tripwires on the loaders (``AutoModel.from_pretrained``,
``faiss.read_index``, the suite downloads, the hub client): a command that reaches one has accepted all of its
options, and the test stops it there (nothing is faked: a value that passes runs into the real loader's call).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import pytest
import transformers

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli

PATH_DESTS = {"out", "corpus", "towers", "index", "pairs", "dev", "suite", "ids_file", "queries_file", "work_dir",
              "shards", "workdir", "base", "dir"}


class Tripped(BaseException):
    """A loader was reached: every option was accepted (BaseException: no ``except Exception`` swallows it)."""


@pytest.fixture
def tripwires(monkeypatch, tmp_path):
    def trip(*args, **kwargs):
        raise Tripped()

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", trip)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trip)
    monkeypatch.setattr(faiss, "read_index", trip)
    import datasets

    import twotower.eval.suites.codesearch
    import twotower.eval.suites.nq
    import twotower.towers.cli

    monkeypatch.setattr(datasets, "load_dataset", trip)  # the hub (local files are read without it)
    monkeypatch.setattr(twotower.eval.suites.codesearch, "fetch", trip)  # downloads
    monkeypatch.setattr(twotower.eval.suites.nq, "fetch", trip)
    monkeypatch.setattr(twotower.towers.cli, "launch_torchrun", trip)  # processes
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def inputs(_tiny_models, tmp_path_factory) -> dict[str, Path]:
    from tests.conftest import make_corpus
    from twotower.eval.suites.beir import write_beir
    from twotower.index.config import EncodeConfig, ShardConfig
    from twotower.index.shard import build_shard
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower

    root = tmp_path_factory.mktemp("matrix")
    towers, index = build_tiny_index(root, _tiny_models["bert"], n_docs=12)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"n{i}", "text": f"new doc {i}"}) + "\n" for i in range(4)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q {i}", "positive": f"p {i}"}) + "\n" for i in range(6)))
    suite = write_beir(root / "suite", [{"_id": "d1", "title": "", "text": "sort a list"},
                                        {"_id": "d2", "title": "", "text": "open a file"}],
                       [{"_id": "q1", "text": "sorting"}], {"q1": {"d1": 1}})
    enc = result_encoder(TwoTower.load(towers), "cpu")
    rows = make_corpus(8)
    for i in range(2):
        build_shard(enc, rows, root / "shards", ShardConfig(i, 2), EncodeConfig(progress=False), towers_dir=towers)
    (root / "empty-dir").mkdir()
    (root / "a-file.txt").write_text("just a file\n")
    return {"towers": towers, "index": index, "corpus": corpus, "pairs": pairs, "suite": suite,
            "shards": root / "shards", "base": _tiny_models["bert"], "dir": root / "empty-dir",
            "file": root / "a-file.txt"}


def base_argv(verb: str, a: dict[str, Path], work: Path) -> list[str]:
    """A valid command line for ``verb`` over the tiny artefacts (writing only under ``work``)."""
    idx = work / "idx"
    out = str(work / "out")
    return {
        "data build": ["data", "build", "codesearch-py", "--out", out],
        "data info": ["data", "info", str(a["suite"]), "--json"],
        "train": ["train", "--pairs", str(a["pairs"]), "--out", out, "--base", str(a["base"]), "--device", "cpu",
                  "--batch-size", "2", "--max-steps", "1"],
        "index build": ["index", "build", "--towers", str(a["towers"]), "--corpus", str(a["corpus"]), "--out", out,
                        "--device", "cpu", "--no-progress"],
        "index merge": ["index", "merge", "--shards", str(a["shards"]), "--out", out, "--no-progress"],
        "index add": ["index", "add", str(idx), "--corpus", str(a["corpus"]), "--device", "cpu", "--no-progress"],
        "index remove": ["index", "remove", str(idx), "--ids", "doc-1"],
        "index info": ["index", "info", str(idx), "--json"],
        "mine": ["mine", "--towers", str(a["towers"]), "--pairs", str(a["pairs"]), "--out", out + ".jsonl",
                 "--device", "cpu", "--no-progress"],
        "search": ["search", "--index", str(idx), "--device", "cpu", "a query"],
        "serve": ["serve", "--index", str(idx), "--device", "cpu", "--port", "8765"],
        "bench": ["bench", "--suite", str(a["suite"]), "--systems", "bm25", "--out", out, "--device", "cpu"],
        "demo": ["demo", "--workdir", str(work / "demo"), "--device", "cpu"],
    }[verb]


POSITIONAL_PATH = {"index add": "INDEX", "index remove": "INDEX", "index info": "INDEX", "data info": "DIR"}
VERBS = ["data build", "data info", "train", "index build", "index merge", "index add", "index remove", "index info",
         "mine", "search", "serve", "bench", "demo"]


def options(verb: str) -> Iterator[argparse.Action]:
    """The options of ``verb`` (as the real parser defines them), help and flags without a value excluded."""
    parser = twotower_cli.build_parser()
    for word in verb.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and not isinstance(action, (argparse._HelpAction,
                                                                                  argparse.BooleanOptionalAction)):
            yield action


def bad_values(action: argparse.Action, a: dict[str, Path], work: Path) -> list[str]:
    if action.choices is not None:
        return ["no-such-choice"]
    kind = getattr(action.type, "__name__", None)
    if kind == "int":
        return ["-1", "0", str(10**20)]
    if kind == "float":
        return ["nan", "inf", "-1", "1e308"]
    if action.dest in PATH_DESTS:
        return [str(a["file"]), str(a["dir"]), str(work / "missing" / "path"), ""]
    return ["", "\u200b", "bad\x00value"]


def with_value(argv: list[str], action: argparse.Action, value: str) -> list[str]:
    flag = action.option_strings[-1]
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        end = i + 2
        while action.nargs in ("+", "*") and end < len(argv) and not argv[end].startswith("-"):
            end += 1
        del argv[i:end]
    positional = [i for i, x in enumerate(argv) if x == "a query"]  # keep search's QUERY after the options
    at = positional[0] if positional else len(argv)
    return argv[:at] + [f"{flag}={value}"] + argv[at:]


def run(argv: list[str], capsys) -> tuple[str, str]:
    """('tripped' | exit status, stderr)."""
    try:
        rc = twotower_cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    except Tripped:
        rc = "tripped"
    return str(rc), capsys.readouterr().err


def fresh(a: dict[str, Path], work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(a["index"], work / "idx")


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_with_every_bad_value_class_never_shows_a_traceback(verb, inputs, tripwires, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path value means the current dir: keep it inside the test's dir
    work = tmp_path / "w"
    fresh(inputs, work)
    rc, err = run(base_argv(verb, inputs, work), capsys)
    assert rc in ("0", "tripped"), f"the base command of {verb} must be valid: {rc}\n{err}"
    problems, outcomes = [], []

    def check(label: str, argv: list[str]) -> None:
        rc, err = run(argv, capsys)
        outcomes.append(rc)
        lines = err.strip().splitlines()
        if "Traceback" in err or rc not in ("0", "2", "tripped"):
            problems.append(f"{label}: rc {rc}\n{err[-1500:]}")
        elif rc == "2" and not (lines and lines[-1].startswith(("twotower", "usage:"))):
            problems.append(f"{label}: the error is not one twotower line: {lines[-3:]}")

    for action in options(verb):
        for value in bad_values(action, inputs, work):
            fresh(inputs, work)
            check(f"{action.option_strings[-1]}={value!r}", with_value(base_argv(verb, inputs, work), action, value))
    if verb in POSITIONAL_PATH:  # INDEX of index add/remove/info, DIR of data info
        for value in [str(inputs["file"]), str(inputs["dir"]), str(work / "missing"), ""]:
            fresh(inputs, work)
            argv = base_argv(verb, inputs, work)
            check(f"{POSITIONAL_PATH[verb]}={value!r}", argv[:2] + [value] + argv[3:])
    assert outcomes, f"{verb}: no options found"
    assert "2" in outcomes, f"{verb}: no bad value was refused, the matrix tests nothing: {outcomes}"
    assert not problems, f"{len(problems)} of {len(outcomes)} runs of `twotower {verb}`:\n" + "\n".join(problems)


# Values wrong on their face: refused with exit 2 before anything loads (no tripwire reached).
MUST_REFUSE = [
    ("serve", "--port", "70000", r"--port must be between 1 and 65535"),
    ("serve", "--port", "0", r"--port must be between 1 and 65535"),
    ("serve", "--max-batch", "0", r"--max-batch must be between 1"),
    ("serve", "--threads", "-1", r"--threads must be between 0"),
    ("serve", "--threads", str(10**20), r"--threads must be between 0"),
    ("serve", "--max-queue", "0", r"--max-queue must be"),
    ("serve", "--max-queries", "0", r"--max-queries must be"),
    ("serve", "--max-query-chars", "0", r"--max-query-chars must be"),
    ("serve", "--max-k", "0", r"--max-k must be"),
    ("serve", "--max-wait-ms", "-1", r"--max-wait-ms must be"),
    ("serve", "--max-body-bytes", "-1", r"--max-body-bytes must be"),
    ("serve", "--reload-interval", "-1", r"--reload-interval must be"),
    ("serve", "--max-wait-ms", "nan", r"expected a finite number"),
    ("search", "-k", "0", r"k must be between 1 and 1000"),
    ("search", "--nprobe", "0", r"nprobe must be a positive integer"),
    ("search", "--batch-size", "0", r"--batch-size must be between 1"),
    ("search", "--queries-file", "{dir}", r"--queries-file '.*' is a directory; expected a file"),
    ("search", "--queries-file", "{missing}", r"--queries-file '.*' does not exist"),
    ("index remove", "--ids-file", "{dir}", r"--ids-file '.*' is a directory; expected a file"),
    ("index remove", "--wait", "-1", r"--wait must be >= 0"),
    ("index add", "--batch-size", "0", r"--batch-size must be >= 1"),
    ("index add", "--corpus", "{dir}", r"corpus dir '.*' has neither corpus\.jsonl, a saved"),
    ("index add", "--corpus", "{missing}", r"corpus '.*' does not exist"),
    ("index add", "--towers", "{missing}", r"towers dir '.*' has no twotower\.json"),
    ("index build", "--chunk-size", "0", r"--chunk-size must be >= 1"),
    ("index build", "--corpus", "{missing}", r"corpus '.*' does not exist"),
    ("index build", "--towers", "{file}", r"towers dir '.*' has no twotower\.json"),
    ("index build", "--out", "{file}", r"--out '.*' is a file"),
    ("index build", "--work-dir", "{file}", r"--work-dir '.*' is a file"),
    ("index build", "--wait", "inf", r"expected a finite number"),
    ("train", "--batch-size", "1", r"--batch-size must be >= 2"),
    ("train", "--lr", "-1", r"--lr must be > 0"),
    ("train", "--nproc", "0", r"--nproc must be >= 1"),
    ("train", "--query-max-length", str(10**9), r"--query-max-length must be <= 131072"),
    ("train", "--pairs", "pairs", r"no such file 'pairs'; a hub dataset needs owner/name"),
    ("train", "--dev", "{dir}", r"pairs path '.*' is a directory"),
    ("train", "--out", "{file}", r"--out '.*' is a file"),
    ("mine", "--num-negatives", "0", r"num_negatives must be >= 1"),
    ("mine", "--range-max", str(10**9), r"--range-max must be <= 100000"),
    ("mine", "--out", "{dir}", r"--out '.*' is a directory"),
    ("bench", "--k-max", "0", r"--k-max must be >= 1"),
    ("bench", "--max-queries", "0", r"--max-queries must be >= 1"),
    ("bench", "--n-random", "0", r"--n-random must be >= 1"),
    ("bench", "--n-random", str(2**31), r"--n-random must be between 1 and 10000"),  # was 24 GB, then OOM-killed
    ("bench", "--k-max", str(10**9), r"--k-max must be between 1 and 100000"),
    ("bench", "--out", "{file}", r"--out '.*' is a file"),
    ("data build", "--max-queries", "0", r"--max-queries must be >= 1"),
    ("data build", "--out", "{file}", r"--out '.*' is a file"),
    ("demo", "--max-steps", "-1", r"--max-steps must be >= 0"),
    ("index merge", "--out", "{file}", r"--out '.*' is a file"),
]


@pytest.mark.parametrize("verb, flag, value, message", MUST_REFUSE,
                         ids=[f"{v}{f}={x}" for v, f, x, _ in MUST_REFUSE])
def test_values_wrong_on_their_face_are_refused_before_anything_loads(verb, flag, value, message, inputs, tripwires,
                                                                      tmp_path, capsys):
    work = tmp_path / "w"
    fresh(inputs, work)
    value = value.format(dir=inputs["dir"], file=inputs["file"], missing=work / "missing" / "x")
    action = next(a for a in options(verb) if flag in a.option_strings)
    rc, err = run(with_value(base_argv(verb, inputs, work), action, value), capsys)
    assert rc == "2", f"rc {rc}: {err}"
    assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err


def test_os_errors_are_one_line_naming_the_path(inputs, tripwires, tmp_path, capsys):
    """Errors of the machine rather than of a value: a name too long for the filesystem, a path through a
    file, a lock file that cannot be created (sysfs takes no new files, not even from root)."""
    work = tmp_path / "w"
    fresh(inputs, work)
    cases = [
        (work / ("x" * 300), "File name too long"),
        (inputs["file"] / "sub" / "idx", "Not a directory"),
        (Path("/sys/twotower-test-index"), "'/sys/.twotower-test-index.lock'"),
    ]
    for out, message in cases:
        argv = ["index", "merge", "--shards", str(inputs["shards"]), "--out", str(out), "--no-progress"]
        rc, err = run(argv, capsys)
        assert rc == "2" and "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("twotower index: error: ") and message in line, line
