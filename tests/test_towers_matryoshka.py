"""Matryoshka towers: the MRL loss, prefix truncation + re-normalisation, ``index build --dim`` and the
query side cut alike, and every dim mismatch refused with one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from twotower import cli as twotower_cli

WORDS = ("apple banana cherry grape lemon mango orange peach pear plum kiwi melon lime fig date olive").split()



def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_truncate_renorm_equals_reference() -> None:
    from twotower.common.encoder import truncate_renorm
    from twotower.towers.loss import truncate_renorm as truncate_torch

    x = np.random.default_rng(0).standard_normal((7, 24)).astype(np.float64) * 3
    for dim in (24, 16, 5, 1):
        ref = np.stack([row[:dim] / np.sqrt(sum(v * v for v in row[:dim])) for row in x])  # row by row
        got = truncate_renorm(x, dim)
        assert got.dtype == np.float32 and got.shape == (7, dim) and got.flags.c_contiguous
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        np.testing.assert_allclose(truncate_torch(torch.from_numpy(x), dim).numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot truncate 24-dim vectors to 25 dims"):
        truncate_renorm(x, 25)


def test_mrl_loss_equals_weighted_sum_of_per_dim_info_nce() -> None:
    from twotower.towers.loss import matryoshka_loss

    q, p, negs = _unit(6, 32, 1), _unit(6, 32, 2), _unit(4, 32, 3)
    dims, weights, t = (32, 16, 8), (1.0, 0.5, 2.0), 0.05
    for symmetric in (False, True):
        ref = torch.tensor(0.0, dtype=torch.float64)
        for d, w in zip(dims, weights):
            qd, pd, nd = (x[:, :d].double() / x[:, :d].double().norm(dim=1, keepdim=True) for x in (q, p, negs))
            scores = torch.cat([qd @ pd.T, qd @ nd.T], 1) / t  # (6, 6 + 4)
            term = -(scores.diagonal() - scores.logsumexp(1)).mean()  # InfoNCE written out
            if symmetric:
                back = (qd @ pd.T).T / t  # each positive over the queries
                term = (term - (back.diagonal() - back.logsumexp(1)).mean()) / 2
            ref = ref + w * term
        got = matryoshka_loss(q, p, negs, dims, weights, t, symmetric)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def _pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": w, "positive": f"all about the {w} {w}"}) + "\n" for w in WORDS))
    return path


def test_train_records_matryoshka_and_refuses_bad_dims(tiny_bert_dir, tmp_path, capsys) -> None:
    from twotower.towers.config import TrainConfig

    pairs = _pairs(tmp_path)
    out = tmp_path / "towers"
    rc = twotower_cli.main(["train", "--pairs", str(pairs), "--out", str(out), "--base", str(tiny_bert_dir),
                            "--batch-size", "8", "--max-steps", "2", "--device", "cpu", "--checkpoint-every", "0",
                            "--matryoshka-dims", "32,16", "8", "--matryoshka-weights", "1,1,0.5",
                            "--query-max-length", "16", "--result-max-length", "16"])
    assert rc == 0
    cfg = json.loads((out / "twotower.json").read_text())["train_config"]
    assert cfg["matryoshka_dims"] == [32, 16, 8] and cfg["matryoshka_weights"] == [1.0, 1.0, 0.5]
    capsys.readouterr()
    rc = twotower_cli.main(["train", "--pairs", str(pairs), "--out", str(tmp_path / "x"), "--base", str(tiny_bert_dir),
                            "--batch-size", "8", "--matryoshka-dims", "64,16"])
    assert rc == 2 and "--matryoshka-dims 64 is larger than the towers' dim 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    for bad, message in [({"matryoshka_dims": ["16,x"]}, "'x' is not a number"),
                         ({"matryoshka_dims": [16, 16]}, "distinct positive dims"),
                         ({"matryoshka_dims": [16, 8], "matryoshka_weights": [1.0]}, "one weight per")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(pairs="p", out="o", **bad)


def test_index_dim_truncates_docs_and_queries_alike(tiny_bert_dir, tmp_path, capsys) -> None:
    from twotower.common.encoder import truncate_renorm
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig
    from twotower.retrieval.retriever import Retriever
    from twotower.towers.inference import query_encoder, result_encoder
    from twotower.towers.model import TwoTower

    towers = tmp_path / "towers"
    TwoTower.from_base(str(tiny_bert_dir), shared=False, query_max_length=16, result_max_length=16).save(towers)
    model = TwoTower.load(towers)
    corpus = [{"_id": f"d{i}", "title": "", "text": f"all about the {w} {w}"} for i, w in enumerate(WORDS)]
    out = build_index(result_encoder(model), corpus, tmp_path / "index", IndexBuildConfig(factory="Flat", dim=12),
                      EncodeConfig(progress=False), towers_dir=towers)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["dim"], manifest["truncate_dim"], manifest["towers_dim"]) == (12, 12, 32)
    xb = truncate_renorm(result_encoder(model).encode([d["text"] for d in corpus]), 12)
    retriever = Retriever.load(out, device="cpu")
    queries = ["apple", "lime fig", "pear"]
    xq = truncate_renorm(query_encoder(model).encode(queries), 12)
    np.testing.assert_allclose(retriever.encode(queries), xq, rtol=1e-5, atol=1e-6)
    hits = retriever.search(queries, k=5)
    exact = np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :5]
    assert [[h.id for h in row] for row in hits] == [[f"d{i}" for i in row] for row in exact]

    # A dim the manifest does not explain is another model: refused, in Python and as one CLI line.
    manifest["truncate_dim"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="query tower dim 32 != index dim 12 and the index records no truncation"):
        Retriever.load(out, device="cpu")
    capsys.readouterr()
    assert twotower_cli.main(["search", "--index", str(out), "apple", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "query tower dim 32 != index dim 12" in err
    rc = twotower_cli.main(["index", "build", "--towers", str(towers), "--corpus", str(tmp_path / "none.jsonl"),
                            "--out", str(tmp_path / "i2"), "--dim", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--dim 64 is larger than the towers' dim 32" in err
