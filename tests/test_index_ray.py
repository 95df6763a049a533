"""``index build --engine ray``: a pool of Ray encoder actors (Ray Data ``map_batches``) on a local 2-CPU Ray
builds the shards, the merge gives the INDEX a single-process build gives; a killed driver's rerun reuses the
finished shards. One Ray session for the module (starting Ray costs seconds).

Bit-equal vectors need equal encoder batches (a doc padded to another length in another batch differs by an
ulp), so the builds compared here cut the corpus into the same chunks (--chunk-size 50 divides every shard).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from tests.conftest import make_corpus  # noqa: E402
from twotower.index.build import build_index  # noqa: E402
from twotower.index.config import EncodeConfig, IndexBuildConfig, RayBuildConfig, ShardConfig  # noqa: E402
from twotower.index.load import load_index  # noqa: E402
from twotower.index.ray_build import default_shards_dir, ray_build_index  # noqa: E402
from twotower.index.shard import SHARD_MANIFEST  # noqa: E402
from twotower.towers.inference import result_encoder  # noqa: E402
from twotower.towers.model import TwoTower  # noqa: E402

N_DOCS = 2000
CHUNK = 50  # divides the shards of 500 (4 shards) and 100 (20 shards): every build encodes the same chunks
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with 2 CPUs, as the smallest laptop or CI box has (workers import this checkout)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _tiny_models) -> dict[str, Path]:
    """A TOWERS dir (tiny random BERT), a 2k-doc JSONL corpus, and the single-process Flat INDEX of it."""
    root = tmp_path_factory.mktemp("ray_build")
    towers = root / "towers"
    TwoTower.from_base(str(_tiny_models["bert"]), shared=False, query_max_length=32, result_max_length=64).save(towers)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in make_corpus(N_DOCS, seed=1)))
    torch.set_num_threads(1)  # as each 1-CPU actor
    single = build_index(result_encoder(TwoTower.load(towers), "cpu"), corpus, root / "single",
                         IndexBuildConfig(factory="Flat"), EncodeConfig(progress=False, chunk_size=CHUNK),
                         towers_dir=towers)
    return {"root": root, "towers": towers, "corpus": corpus, "single": single}


def assert_same_index(a: Path, b: Path) -> None:
    """Same docs in the same rows and the same Flat answers (D and I) to 200 queries."""
    ia, ib = load_index(a, "cpu"), load_index(b, "cpu")
    assert ia.ntotal == ib.ntotal == N_DOCS and ia.docs["id"] == ib.docs["id"]
    xq = ia.cpu_index.reconstruct_n(0, 200) + np.float32(0.01)
    Da, Ia = ia.search(xq, 10)
    Db, Ib = ib.search(xq, 10)
    np.testing.assert_array_equal(Ia, Ib)
    np.testing.assert_array_equal(Da, Db)


def test_ray_build_with_two_actors_equals_single_process_build(ray_session, setup):
    out = setup["root"] / "ray-index"
    ray_cfg = RayBuildConfig(engine="ray", num_encoders=2)
    ray_build_index(setup["towers"], setup["corpus"], out, IndexBuildConfig(factory="Flat"),
                    EncodeConfig(progress=False, chunk_size=CHUNK), ShardConfig(), ray_cfg)
    assert_same_index(out, setup["single"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [[0, 500], [500, 1000], [1000, 1500], [1500, 2000]]  # 2/actor
    assert not default_shards_dir(out).exists()  # the default shards dir goes once merged


def test_killed_driver_rerun_reuses_finished_shards(ray_session, setup):
    root, shards = setup["root"] / "killed", setup["root"] / "killed" / "shards"
    out = root / "index"
    cmd = [sys.executable, "-m", "twotower.cli", "index", "build", "--towers", str(setup["towers"]), "--corpus",
           str(setup["corpus"]), "--out", str(out), "--engine", "ray", "--ray-address", ray_session,
           "--num-encoders", "1", "--num-shards", "20", "--chunk-size", str(CHUNK), "--shards-dir", str(shards),
           "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(shards.glob(f"shard-*/{SHARD_MANIFEST}")):  # the first shard is published: kill the driver
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no shard finished within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: (p.parent / SHARD_MANIFEST).stat().st_mtime_ns
                for p in shards.glob(f"shard-*/{SHARD_MANIFEST}")}
    assert 0 < len(finished) < 20 and not out.exists()
    ray_build_index(setup["towers"], setup["corpus"], out, IndexBuildConfig(factory="Flat"),
                    EncodeConfig(progress=False, chunk_size=CHUNK),
                    ShardConfig(num_shards=20), RayBuildConfig(engine="ray", num_encoders=1, shards_dir=str(shards)))
    for name, mtime in finished.items():  # reused as they were, not encoded again
        assert (shards / name / SHARD_MANIFEST).stat().st_mtime_ns == mtime
    assert len(list(shards.glob(f"shard-*/{SHARD_MANIFEST}"))) == 20  # an explicit --shards-dir is kept
    assert_same_index(out, setup["single"])


def test_ray_build_refuses_bad_options_before_starting(ray_session, setup, tmp_path):
    towers, corpus = setup["towers"], setup["corpus"]
    with pytest.raises(ValueError, match="--shard-id 0: --engine ray builds every shard"):
        ray_build_index(towers, corpus, tmp_path / "o", shard=ShardConfig(0, 2), ray_cfg=RayBuildConfig(engine="ray"))
    with pytest.raises(ValueError, match="fewer than --num-shards 5000"):
        ray_build_index(towers, corpus, tmp_path / "o", shard=ShardConfig(num_shards=5000),
                        ray_cfg=RayBuildConfig(engine="ray"))
    with pytest.raises(ValueError, match="need 6 CPUs .* the Ray cluster has 2 CPUs"):
        ray_build_index(towers, corpus, tmp_path / "o", encode=EncodeConfig(progress=False),
                        ray_cfg=RayBuildConfig(engine="ray", num_encoders=3, cpus_per_encoder=2))
    with pytest.raises(ValueError, match="only with --engine ray"):
        RayBuildConfig(num_encoders=2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--shards-dir .* twotower did not make"):
        ray_build_index(towers, corpus, tmp_path / "o", ray_cfg=RayBuildConfig(engine="ray",
                                                                               shards_dir=str(tmp_path / "mine")))


def test_bad_corpus_row_in_an_actor_is_one_line_exit_2(ray_session, setup, tmp_path, capsys):
    from twotower.cli import main

    bad = tmp_path / "bad.jsonl"
    rows = make_corpus(40)
    rows[33]["text"] = 7
    bad.write_text("".join(json.dumps(d) + "\n" for d in rows))
    code = main(["index", "build", "--towers", str(setup["towers"]), "--corpus", str(bad), "--out",
                 str(tmp_path / "o"), "--engine", "ray", "--ray-address", ray_session, "--num-encoders", "1",
                 "--num-shards", "2", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl: line 34: field 'text' must be a string, got int" in err
    assert "Traceback" not in err
