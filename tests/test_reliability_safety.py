"""Nothing unsafe is loaded: no pickle of any file, weights only through safetensors or
``torch.load(weights_only=True)``, no code run from data or from a model repo.

The check walks the syntax tree (not the text) of every .py file in the packages, the scripts and the CLI, so
docstrings and comments that *mention* ``torch.load`` are not flagged and ``model.eval()`` is not ``eval``.
Import aliases are followed (``import numpy as np`` -> ``numpy.load``, ``from torch import load``).
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("twotower", "scripts")

# Modules whose loaders execute arbitrary code from the bytes they read (any use is refused).
UNSAFE_MODULES = ("pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle")
# Qualified calls that unpickle whatever file they are given.
UNSAFE_CALLS = ("pandas.read_pickle", "numpy.lib.format.read_array", "yaml.unsafe_load", "yaml.full_load")


def python_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


class _Scanner(ast.NodeVisitor):
    """Collects ``(line, problem)`` for every unsafe construct of one module."""

    def __init__(self) -> None:
        self.alias: dict[str, str] = {}  # local name -> qualified name
        self.problems: list[tuple[int, str]] = []

    # -- imports --------------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.alias[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            self._check_module(a.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        self._check_module(module, node.lineno)
        for a in node.names:
            self.alias[a.asname or a.name] = f"{module}.{a.name}"

    def _check_module(self, module: str, line: int) -> None:
        if module.split(".")[0] in UNSAFE_MODULES:
            self.problems.append((line, f"imports {module} (it runs code from the bytes it loads)"))

    # -- calls ----------------------------------------------------------------------------------------
    def qualified(self, node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return self.alias.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            return f"{self.qualified(node.value)}.{node.attr}"
        return "?"

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualified(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        line = node.lineno
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in self.alias:
            self.problems.append((line, f"calls {node.func.id}() (runs text as code)"))
        if name.split(".")[0] in UNSAFE_MODULES:
            self.problems.append((line, f"calls {name}"))
        if name in UNSAFE_CALLS or name.endswith(".read_pickle"):
            self.problems.append((line, f"calls {name} (unpickles its input)"))
        if name == "torch.load" and not _is_true(kw.get("weights_only")):
            self.problems.append((line, "torch.load without weights_only=True (unpickles arbitrary objects)"))
        if name in ("numpy.load", "numpy.lib.npyio.load") and "allow_pickle" in kw \
                and not _is_false(kw["allow_pickle"]):
            self.problems.append((line, "numpy.load with allow_pickle other than False"))
        if name == "yaml.load" and not _safe_yaml_loader(kw.get("Loader")):
            self.problems.append((line, "yaml.load without Loader=yaml.SafeLoader"))
        if "trust_remote_code" in kw and not _is_false(kw["trust_remote_code"]):
            self.problems.append((line, f"{name}(trust_remote_code=...) (runs code shipped with a model)"))
        self.generic_visit(node)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _safe_yaml_loader(node: ast.AST | None) -> bool:
    return isinstance(node, (ast.Attribute, ast.Name)) and ast.unparse(node).split(".")[-1] in ("SafeLoader",
                                                                                               "CSafeLoader")


def scan_source(source: str, filename: str) -> Iterator[str]:
    """``file:line: problem`` for each unsafe construct in ``source``."""
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename))
    for line, problem in sorted(scanner.problems):
        yield f"{filename}:{line}: {problem}"


def test_no_unsafe_loading_anywhere() -> None:
    files = python_files()
    assert len(files) > 40, f"expected the packages' files, found {len(files)}"
    problems = [p for f in files for p in scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not problems, "unsafe loading (see .notes/README-reliability.md, safety rules):\n  " + "\n  ".join(problems)


BAD = '''\
import pickle
import numpy as np
import torch
from torch import load as tload
import joblib
import yaml
from transformers import AutoModel
x = pickle.loads(b"")
y = torch.load("f.pt")
z = torch.load("f.pt", weights_only=False)
w = tload("f.pt")
a = np.load("f.npy", allow_pickle=True)
eval("1 + 1")
exec(data)
m = AutoModel.from_pretrained("dir", trust_remote_code=True)
d = yaml.load(text)
import pandas as pd
df = pd.read_pickle("f.pkl")
'''

GOOD = '''\
import numpy as np
import torch
import yaml
model = torch.nn.Linear(2, 2).eval()
t = torch.load("f.pt", map_location="cpu", weights_only=True)
a = np.load("f.npy")
b = np.load("f.npy", allow_pickle=False, mmap_mode="r")
c = yaml.load(text, Loader=yaml.SafeLoader)
"""torch.load(path) and pickle.load in a docstring are fine"""
'''


def test_scanner_finds_each_unsafe_construct_with_its_line() -> None:
    found = list(scan_source(BAD, "bad.py"))
    expected_lines = [1, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18]
    assert sorted({int(p.split(":")[1]) for p in found}) == expected_lines, "\n".join(found)
    assert "bad.py:9: torch.load without weights_only=True" in "\n".join(found)
    assert "bad.py:12: numpy.load with allow_pickle" in "\n".join(found)
    assert list(scan_source(GOOD, "good.py")) == []


@pytest.mark.parametrize("rel", ["twotower/towers/checkpoint.py", "twotower/index/store.py"])
def test_the_loaders_that_exist_are_the_safe_forms(rel: str) -> None:
    """The two places that read tensors/arrays written by twotower itself use the safe forms (not vacuous)."""
    source = (ROOT / rel).read_text(encoding="utf-8")
    assert ("weights_only=True" in source) if "/towers/" in rel else ("allow_pickle=False" in source)
    assert list(scan_source(source, rel)) == []
