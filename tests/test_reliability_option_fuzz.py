"""Option fuzzing past the loaders: every option gets boundary values and the command runs for real.

``test_reliability_cli_matrix.py`` stops each command at the first model or index load (a tripwire), so it
proves options are checked up front but never sees what a value does once FAISS or torch has it. Here the
tiny real models and indexes load and the command runs to its end: a value that argparse and the config
accept but FAISS or torch cannot (``--nprobe -1`` stored in the manifest and overflowing at every search,
``IVF64`` on 30 docs, ``--lr 1e6``) must still end in exit 0 or exit 2 with one line, never a traceback; and an
index that was built (exit 0) must then be searchable.

The options come from the real argparse tree, which is generated from the config dataclasses
(``common.cliargs``), so a new option is fuzzed without touching this file. The default run covers the verbs
whose options reach FAISS/torch directly (search, index build) with the boundary values of each option's type;
``-m slow`` runs every boundary value of every option of every local verb, plus a hypothesis search over
arbitrary ints, floats and text.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import test_reliability_cli_matrix as matrix
from tests.test_reliability_cli_matrix import PATH_DESTS, base_argv, fresh, options, run, with_value

inputs = matrix.inputs  # the cli matrix's tiny TOWERS, INDEX, corpus, pairs, suite and shards (a module fixture)

# Boundary values of each option type: sign, zero, the int32/size_t edges, NaN, infinities, huge and tiny
# floats, empty, text that is not ASCII (Arabic-Indic digits parse as an int in Python), controls.
BOUNDARY = {
    "int": ["-1", "0", "1", str(2**31), str(2**64), str(10**20), "", "\u0661\u0662"],
    "float": ["nan", "inf", "-inf", "-1", "0", "1e6", "1e308", "5e-324", ""],
    "choice": ["", "\u00fcn\u00efc\u00f6d\u00e9"],
    "path": ["{file}", "{dir}", "{missing}", "", "\u00fcn\u00efc\u00f6d\u00e9"],
    "str": ["", "\u200b", "\u00fcn\u00efc\u00f6d\u00e9 \u6f22\u5b57", "bad\x00value", "{dir}", "{missing}"],
}
# Verbs run for real here (serve blocks, data build and demo fetch wheels: the cli matrix covers their options).
DEEP_VERBS = ["search", "index build", "index add", "index remove", "index info", "train", "mine", "bench",
              "data info"]
FAST_VERBS = ["search", "index build"]


def kind_of(action) -> str:
    if action.choices is not None:
        return "choice"
    name = getattr(action.type, "__name__", None)
    if name in ("int", "float"):
        return name
    return "path" if action.dest in PATH_DESTS else "str"


# The default run: the numbers (what reaches FAISS/torch; strings and paths are the cli matrix's), at the edges
# that broke before (a negative stored in the manifest, a size_t/usize overflow, a huge float).
FAST_VALUES = {"int": ["-1", "0", str(2**64)], "float": ["-1", "1e308"]}


def cases(verbs: list[str], values: dict[str, list[str]] = BOUNDARY) -> list[tuple[str, str, str]]:
    return [(verb, action.option_strings[-1], value) for verb in verbs for action in options(verb)
            for value in values.get(kind_of(action), [])]


def deep_argv(verb: str, a: dict[str, Path], work: Path) -> list[str]:
    """The cli matrix's valid command line, with sizes that keep a real run to a second or two."""
    argv = base_argv(verb, a, work)
    if verb == "train":
        argv += ["--checkpoint-every", "1", "--eval-batch-size", "4"]
    return argv


def check_one(verb: str, flag: str, value: str, a: dict[str, Path], work: Path, capsys) -> str | None:
    """Run ``twotower VERB ... FLAG=VALUE`` for real; the problem found, or None."""
    fresh(a, work)
    (work / "empty-dir").mkdir()  # per run: a command that writes into it must not change the next run's input
    (work / "a-file.txt").write_text("just a file\n")
    value = value.format(file=work / "a-file.txt", dir=work / "empty-dir", missing=work / "missing" / "x")
    action = next(x for x in options(verb) if flag in x.option_strings)
    try:
        rc, err = run(with_value(deep_argv(verb, a, work), action, value), capsys)
    except Exception as exc:  # noqa: BLE001 (an uncaught error is the finding: report it with the others)
        rc, err = "raised", f"Traceback: {type(exc).__name__}: {exc}"
    lines = err.strip().splitlines()
    label = f"twotower {verb} {flag}={value!r}"
    if "Traceback" in err or rc not in ("0", "2"):
        return f"{label}: rc {rc}\n{err[-1200:]}"
    if rc == "2" and not (lines and lines[-1].startswith(("twotower", "usage:"))):
        return f"{label}: the error is not one twotower line: {lines[-3:]}"
    if rc == "0" and verb == "index build":  # what was stored must serve: search it, with its own defaults
        out = value if flag == "--out" else str(work / "out")
        rc, err = run(["search", "--index", out, "--device", "cpu", "a query"], capsys)
        if rc != "0":
            return f"{label} built an index that cannot be searched: rc {rc}\n{err[-1200:]}"
    return None


def assert_clean(verb: str, found: list[tuple[str, str, str]], inputs, tmp_path, capsys) -> None:
    problems = [p for v, flag, value in found if v == verb
                if (p := check_one(v, flag, value, inputs, tmp_path / "w", capsys)) is not None]
    assert not problems, f"{len(problems)} runs of `twotower {verb}`:\n" + "\n".join(problems)


@pytest.mark.parametrize("verb", FAST_VERBS)
def test_options_that_reach_faiss_never_end_in_a_traceback(verb, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean(verb, cases([verb], FAST_VALUES), inputs, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("verb", FAST_VERBS)
def test_every_boundary_value_of_search_and_build_options(verb, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean(verb, cases([verb]), inputs, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("verb", [v for v in DEEP_VERBS if v not in FAST_VERBS])
def test_every_option_of_every_local_verb_runs_for_real_without_a_traceback(verb, inputs, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    assert_clean(verb, cases([verb]), inputs, tmp_path, capsys)


NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8))


@pytest.mark.slow
@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hypothesis_over_search_and_build_options(data, inputs, tmp_path_factory, capsys):
    verb = data.draw(st.sampled_from(FAST_VERBS))
    action = data.draw(st.sampled_from([a for a in options(verb) if kind_of(a) in ("int", "float")]))
    value = data.draw(NUMBERS)
    problem = check_one(verb, action.option_strings[-1], value, inputs, tmp_path_factory.mktemp("h") / "w", capsys)
    assert problem is None, problem


# ---- values argparse and the config used to accept that FAISS/torch cannot take -------------------------
# Each is refused in one line with exit 2, before anything is written under --out.
REFUSED_BEFORE_WRITING = [
    (["--factory", "Flat", "--nprobe", "-1"], r"--nprobe must be between 0 and 2147483647, got -1"),
    (["--factory", "HNSW8", "--ef-search", "-5"], r"--ef-search must be between 0 and 2147483647, got -5"),
    (["--factory", "IVF64,Flat"], r"--factory 'IVF64,Flat' needs at least 64 training vectors \(one per IVF list\) "
                                  r"but has 4"),
    (["--factory", "IVF2,PQ8"], r"needs at least 256 training vectors \(256 per PQ sub-quantizer"),
    (["--factory", "OPQ8,Flat"], r"needs at least 256 training vectors \(256 per OPQ sub-quantizer\)"),
    (["--factory", "BIVF16"], r"--factory 'BIVF16' needs at least 16 training vectors"),
    (["--factory", "IVF2,Flat", "--train-size", "1"], r"needs at least 2 training vectors .* but has 1"),
]


@pytest.mark.parametrize("extra, message", REFUSED_BEFORE_WRITING,
                         ids=[" ".join(e) for e, _ in REFUSED_BEFORE_WRITING])
def test_values_faiss_cannot_take_are_refused_before_anything_is_written(extra, message, inputs, tmp_path, capsys):
    import re

    work = tmp_path / "w"
    fresh(inputs, work)
    rc, err = run(base_argv("index build", inputs, work) + extra, capsys)
    assert rc == "2" and "Traceback" not in err, err
    assert re.search(message, err.strip().splitlines()[-1]), err
    assert not (work / "out").exists() and not list(work.glob(".out*")), sorted(p.name for p in work.iterdir())


def test_an_ivf_index_with_as_many_docs_as_lists_builds_and_searches(inputs, tmp_path, capsys):
    """The bound is faiss's own (one training vector per list), not a margin of ours: 4 docs make IVF4."""
    work = tmp_path / "w"
    fresh(inputs, work)
    assert run(base_argv("index build", inputs, work) + ["--factory", "IVF4,Flat", "--nprobe", "2"], capsys)[0] == "0"
    rc, err = run(["search", "--index", str(work / "out"), "--device", "cpu", "--json", "a query"], capsys)
    assert rc == "0", err


def test_a_divergent_loss_is_one_line_and_the_last_good_checkpoint_is_kept(inputs, tmp_path, capsys):
    work = tmp_path / "w"
    fresh(inputs, work)
    argv = deep_argv("train", inputs, work)
    argv[argv.index("--max-steps") + 1] = "6"
    rc, err = run(argv + ["--lr", "1e6", "--log-every", "1"], capsys)
    line = err.strip().splitlines()[-1]
    assert rc == "2" and "Traceback" not in err, err
    assert line.startswith("twotower train: error: training diverged: loss is nan at step ") and "--lr 1e+06" in line
    step = int(line.split(" at step ")[1].split()[0])
    assert f"the last good checkpoint (step {step - 1}) is kept" in line, line
    ckpts = sorted((work / "out" / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name == f"step-{step - 1}", ckpts
    assert (ckpts[-1] / "COMPLETE.json").is_file()
    logged = [json.loads(x)["loss"] for x in (work / "out" / "train_log.jsonl").read_text().splitlines()]
    assert logged and all(v is not None and math.isfinite(v) for v in logged), logged
    assert not (work / "out" / "twotower.json").exists(), "no TOWERS dir is published from a diverged run"
