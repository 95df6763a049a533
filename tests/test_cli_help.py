"""Every verb answers --help without loading torch, faiss or transformers (the CLI modules import only the
config dataclasses at the top; the heavy stages load when a verb runs)."""
from __future__ import annotations

import subprocess
import sys

import pytest

VERBS = [["data", "build"], ["data", "info"], ["train"], ["index", "build"], ["index", "add"], ["index", "remove"],
         ["index", "info"], ["index", "merge"], ["mine"], ["train-reranker"], ["search"], ["serve"], ["bench"],
         ["demo"]]
HEAVY = ("torch", "faiss", "transformers", "datasets")


def test_every_verb_has_help_and_none_loads_a_heavy_package() -> None:
    code = ("import sys, contextlib, io\n"
            "from twotower.cli import build_parser\n"
            f"for verb in {VERBS!r} + [[]]:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        try:\n"
            "            build_parser().parse_args([*verb, '--help'])\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, verb\n"
            "    assert 'usage: twotower' in out.getvalue(), verb\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_help_lists_options(verb: list[str], capsys) -> None:
    from twotower.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*verb, "--help"])
    assert exc.value.code == 0 and "--" in capsys.readouterr().out
