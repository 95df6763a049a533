"""Malformed metadata (issue 24, class 1): every on-disk metadata file is checked against its schema at load.

The damages are generated from the schemas themselves (``twotower.common.schemas``): every field of every file
replaced by a wrong type, null, a negative and a huge number, or deleted; every file replaced by ``42``, ``[]``,
nothing, bytes that are not UTF-8, or its own first half. Each load either refuses with one line naming the file
(ValueError / FileNotFoundError, which the CLI prints as one line with exit 2) or gives exactly the undamaged
counts and results: never a TypeError, never a silently wrong count. The default run takes a fixed sample of the
cases; ``-m slow`` runs them all.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import build_tiny_index
from twotower import cli as twotower_cli
from twotower.common import schemas

WHOLE_FILE = {"42": b"42", "[]": b"[]", "empty": b"", "not-utf8": b"\xff\xfe{", "null": b"null"}


@pytest.fixture(scope="module")
def built(_tiny_models, tmp_path_factory) -> dict[str, Any]:
    from twotower.index.load import load_index
    from twotower.index.mutate import remove_docs
    from twotower.towers.model import TwoTower

    root = tmp_path_factory.mktemp("schemas")
    towers, index = build_tiny_index(root, _tiny_models["bert"])
    remove_docs(index, ["doc-3", "doc-7"])  # removed.npy and n_removed are part of what is checked
    other = root / "other-towers"
    import torch

    torch.manual_seed(1)
    run = TwoTower.from_base(str(_tiny_models["bert"]), shared=False, query_max_length=32, result_max_length=64)
    with torch.no_grad():  # another run: same base and dims, other (trained) weights
        for p in run.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run.save(other)
    loaded = load_index(index, device="cpu")
    xq = np.random.default_rng(0).standard_normal((3, loaded.dim)).astype(np.float32)
    return {"towers": towers, "index": index, "other": other, "xq": xq, "ntotal": loaded.ntotal,
            "removed": loaded.removed.copy(), "hits": loaded.search(xq, 5)[1],
            "src1": int(loaded.allowed({"source": "src-1"}).sum())}


# ---- the loads: each reads the damaged file the way the verbs do ---------------------------------------------
def _load_index(built: dict[str, Any], index: Path, towers: Path) -> None:
    from twotower.index.load import load_index

    loaded = load_index(index, device="cpu")
    assert loaded.ntotal == built["ntotal"] and np.array_equal(loaded.removed, built["removed"])
    assert np.array_equal(loaded.search(built["xq"], 5)[1], built["hits"])
    assert loaded.bm25.ntotal == built["ntotal"]  # the BM25 side loads with the same row count
    assert int(loaded.allowed({"source": "src-1"}).sum()) == built["src1"]  # and the filter map, same rows


def _load_towers(built: dict[str, Any], index: Path, towers: Path) -> None:
    from twotower.towers.model import TwoTower

    model = TwoTower.load(towers)
    assert model.fingerprint() == json.loads((built["towers"] / "twotower.json").read_text())["fingerprint"]


FILES: dict[str, tuple[str, Any, Callable[..., None]]] = {  # name -> (path in the fixture, schema, load)
    "manifest.json": ("index/manifest.json", schemas.IndexManifest, _load_index),
    "bm25/params.json": ("index/bm25/params.json", schemas.BM25Params, _load_index),
    "bm25/vocab.json": ("index/bm25/vocab.json", list[str], _load_index),
    "removed.npy": ("index/removed.npy", None, _load_index),
    "filters.arrow": ("index/filters.arrow", None, _load_index),
    "twotower.json": ("towers/twotower.json", schemas.TowersMeta, _load_towers),
    "sentence_bert_config.json": ("towers/query_tower/sentence_bert_config.json", schemas.STTransformerConfig,
                                  _load_towers),
    "1_Pooling/config.json": ("towers/result_tower/1_Pooling/config.json", schemas.STPoolingConfig, _load_towers),
    "modules.json": ("towers/query_tower/modules.json", list[schemas.STModule], _load_towers),
}


def _bad_values(annotation: Any) -> dict[str, Any]:
    """Values of the wrong type for a field, plus null, negative and huge numbers."""
    text = str(annotation)
    wrong = 7 if "str" in text and "int" not in text else "7"
    return {"wrong-type": wrong, "null": None, "negative": -1, "huge": 10**30, "list": [1], "float": 1.5}


def _cases() -> list[tuple[str, str, Any]]:
    """(file, case id, damage): the damage is bytes for the whole file, or (field, value) / (field, DELETE)."""
    cases: list[tuple[str, str, Any]] = []
    for name, (_, schema, _) in FILES.items():
        cases += [(name, f"file={k}", v) for k, v in WHOLE_FILE.items()] + [(name, "file=truncated", "truncate")]
        if isinstance(schema, type):
            for field, info in schema.model_fields.items():
                cases.append((name, f"{field}=deleted", (field, "DELETE")))
                cases += [(name, f"{field}={k}", (field, v)) for k, v in _bad_values(info.annotation).items()]
        elif schema is not None:  # a list file: damage its first element
            cases += [(name, f"[0]={k}", (0, v)) for k, v in {"null": None, "number": 7, "object": {}}.items()]
    for kind, array in {"duplicates": np.array([3, 3], np.int64), "negative": np.array([-1, 3], np.int64),
                        "beyond-ntotal": np.array([3, 60], np.int64), "floats": np.array([3.0, 7.0]),
                        "2-d": np.array([[3, 7]], np.int64), "too-few": np.array([3], np.int64),
                        "unsorted": np.array([7, 3], np.int64)}.items():
        cases.append(("removed.npy", f"rows={kind}", array))
    for kind, table in _filter_tables().items():
        cases.append(("filters.arrow", kind, table))
    return cases


def _filter_tables() -> dict[str, Any]:
    """Arrow files in the place of the filter map: other columns, other types, rows beyond ntotal, bad kinds."""
    import pyarrow as pa

    good = {"field": pa.array(["source"]), "kind": pa.array(["str"]), "text": pa.array(["src-1"]),
            "number": pa.array([None], pa.float64()), "rows": pa.array([[1, 5]], pa.list_(pa.int64()))}
    return {"no-rows-column": pa.table({k: v for k, v in good.items() if k != "rows"}),
            "rows-int32": pa.table({**good, "rows": pa.array([[1, 5]], pa.list_(pa.int32()))}),
            "rows-as-text": pa.table({**good, "rows": pa.array(["1,5"])}),
            "row-beyond-ntotal": pa.table({**good, "rows": pa.array([[1, 60]], pa.list_(pa.int64()))}),
            "negative-row": pa.table({**good, "rows": pa.array([[-1, 5]], pa.list_(pa.int64()))}),
            "unknown-kind": pa.table({**good, "kind": pa.array(["date"])}),
            "docs-table": pa.table({"id": pa.array(["a"]), "text": pa.array(["b"])})}


CASES = _cases()
SAMPLE = sorted(random.Random(24).sample(range(len(CASES)), 60))
PARAMS = [pytest.param(*CASES[i], id=f"{CASES[i][0]}:{CASES[i][1]}") for i in SAMPLE]
PARAMS += [pytest.param(*c, id=f"{c[0]}:{c[1]}", marks=pytest.mark.slow) for i, c in enumerate(CASES)
           if i not in SAMPLE]


def _damage(path: Path, damage: Any) -> None:
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    elif isinstance(damage, np.ndarray):
        np.save(path, damage)
    elif type(damage).__name__ == "Table":  # a pyarrow table: written as an Arrow IPC file, as the map is
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, damage.schema) as writer:
            writer.write_table(damage)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        key, value = damage
        obj = json.loads(path.read_text())
        if value == "DELETE":
            obj.pop(key, None) if isinstance(obj, dict) else obj.pop(key)
        else:
            obj[key] = value
        path.write_text(json.dumps(obj))


@pytest.mark.parametrize("name, case, damage", PARAMS)
def test_a_damaged_file_is_refused_in_one_line_or_loads_exactly(built, tmp_path, name, case, damage) -> None:
    root = tmp_path / "copy"
    shutil.copytree(built["index"], root / "index")
    shutil.copytree(built["towers"], root / "towers")
    rel, _, load = FILES[name]
    _damage(root / rel, damage)
    try:
        load(built, root / "index", root / "towers")
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert str(root) in message, f"the error does not name the file: {message}"
        return
    # Accepted: only a damage the schema allows (an optional field deleted, an unknown one) may load, and the
    # load above checked it gives the undamaged counts and results.


def test_every_file_and_field_is_enumerated() -> None:
    names = {c[0] for c in CASES}
    assert names == set(FILES)
    assert len(CASES) > 150 and len([c for c in CASES if c[0] == "manifest.json"]) >= 7 * 19


# ---- the message: file, field, found, expected ---------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"ntotal": -3}, r"manifest\.json: field 'ntotal': found -3, expected greater than or equal to 0"),
    ({"format_version": "1"}, r"manifest\.json: field 'format_version': found \"1\", expected a valid integer"),
    ({"n_removed": None}, r"manifest\.json: field 'n_removed': found null, expected a valid integer"),
    ({"dim": True}, r"manifest\.json: field 'dim': found true, expected a valid integer"),
    ({"search_defaults": {"nprobe": -1}}, r"field 'search_defaults\.nprobe': found -1, expected greater than"),
    ({"n_removed": 61}, r"field 'n_removed': found 61, expected at most ntotal 60"),
])
def test_a_manifest_error_names_file_field_found_and_expected(built, tmp_path, capsys, change, message) -> None:
    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    path = index / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    rc = twotower_cli.main(["search", "--index", str(index), "--towers", str(built["towers"]), "--device", "cpu",
                            "sort a list"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize("content, message", [
    (b"42", r"twotower\.json: found 42, expected a JSON object"),
    (b"[]", r"twotower\.json: found \[\], expected a JSON object"),
    (b'{"format_ver', r"twotower\.json: malformed JSON .*truncated"),
    (b'{"format_version": 1, "dim": NaN}', r"twotower\.json: NaN is not JSON"),
])
def test_a_towers_json_error_is_one_line(built, tmp_path, capsys, content, message) -> None:
    towers = tmp_path / "towers"
    shutil.copytree(built["towers"], towers)
    (towers / "twotower.json").write_bytes(content)
    rc = twotower_cli.main(["search", "--index", str(built["index"]), "--towers", str(towers), "--device", "cpu",
                            "sort a list"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


# ---- cross-checks between files ----------------------------------------------------------------------------
def test_ntotal_against_the_faiss_index_names_both_values(built, tmp_path) -> None:
    from twotower.index.load import load_index

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    path = index / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "ntotal": 59}))
    with pytest.raises(ValueError, match=r"index\.faiss: 60 vectors but manifest\.json says 59 \(ntotal\)"):
        load_index(index, device="cpu")


def test_rows_against_the_doc_store_name_both_values(built, tmp_path, _tiny_models) -> None:
    from twotower.index.load import load_index

    _, small = build_tiny_index(tmp_path / "small", _tiny_models["bert"], n_docs=20)
    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    shutil.rmtree(index / "docs")
    shutil.copytree(small / "docs", index / "docs")
    with pytest.raises(ValueError, match=r"index\.faiss holds 60 vectors but docs/ has 20 ids"):
        load_index(index, device="cpu")


def test_duplicate_removed_rows_are_refused_not_miscounted(built, tmp_path) -> None:
    from twotower.index.load import load_index

    index = tmp_path / "index"
    shutil.copytree(built["index"], index)
    np.save(index / "removed.npy", np.array([3, 3], np.int64))
    with pytest.raises(ValueError, match=r"removed\.npy: found row 3 2 times, expected each removed row once"):
        load_index(index, device="cpu")


# ---- a tower from another run ------------------------------------------------------------------------------
def test_a_query_tower_from_another_run_is_refused(built, tmp_path, capsys) -> None:
    towers = tmp_path / "towers"
    shutil.copytree(built["towers"], towers)
    shutil.rmtree(towers / "query_tower")
    shutil.copytree(built["other"] / "query_tower", towers / "query_tower")  # same dims, another run's weights
    argv = ["search", "--index", str(built["index"]), "--towers", str(towers), "--device", "cpu", "sort a list",
            "--json"]
    assert twotower_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the weights loader's progress bar)
    assert err.startswith("twotower search: error: ") and "query_tower: query tower fingerprint" in err, err
    assert "--allow-mixed-towers" in err
    assert twotower_cli.main([*argv, "--allow-mixed-towers"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"]


def test_the_whole_towers_dir_checks_its_query_tower_too(built, tmp_path) -> None:
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    shutil.copytree(built["towers"], towers)
    shutil.rmtree(towers / "query_tower")
    shutil.copytree(built["other"] / "query_tower", towers / "query_tower")
    with pytest.raises(ValueError, match="a tower from another run"):
        TwoTower.load(towers)
    assert TwoTower.load(towers, allow_mixed_towers=True).fingerprint() == TwoTower.load(built["towers"]).fingerprint()
