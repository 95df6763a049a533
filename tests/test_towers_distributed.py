"""Data-parallel training on CPU: 2 processes spawned by the test, gloo, tiny random BERT, bounded in time.

The reference is always one process over the concatenated global batch: gathered negatives must give the same
loss and the same gradients after DDP's all-reduce, and 2-rank training must end where 1 process ends.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import twotower.towers.train as train_mod
from twotower.towers.cli import add_train_parser, config_argv, torchrun_command
from twotower.towers.distributed import global_mean, init_distributed, unused_parameters, wrap_ddp
from twotower.towers.loss import Temperature
from twotower.towers.model import TwoTower
from twotower.towers.sampler import NoDuplicatesBatchSampler, conflict_keys
from twotower.towers.train import Batch, TowerForward, TrainConfig, collate, features, forward_backward, train

WORDS = ("apple banana cherry grape lemon mango orange peach pear plum kiwi melon lime fig date olive "
         "berry walnut corn rice bean pea oat rye").split()
QUERIES = WORDS
POSITIVES = [f"all about the {w} {w}" for w in WORDS]
# row i's hard negatives: the next row's positive (dropped when that row is in the same global batch, so
# ranks end up with different numbers of negatives) and a text no row has
NEGATIVES = [[POSITIVES[(i + 1) % len(WORDS)], f"nothing on {WORDS[(i + 1) % len(WORDS)]}"] for i in range(len(WORDS))]
WORLD = 2


# ---- process plumbing -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, timeout: float = 90.0) -> None:
    """Run ``fn(rank, port, *args)`` in 2 fresh processes; fail (and kill them) after ``timeout`` seconds.

    forkserver: one clean server process imports torch + transformers once (seconds on 2 cores), and every
    worker forks from it; plain fork of the pytest process could inherit OpenMP thread pools that hang.
    """
    import multiprocessing.forkserver

    multiprocessing.forkserver.set_forkserver_preload(["twotower.towers.train",
                                                       "transformers.models.bert.modeling_bert"])
    ctx = mp.start_processes(fn, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout} s")


def _join_group(rank: int, port: int) -> None:
    """What torchrun does for a worker: the env:// variables; then the same set-up train() uses."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    env = init_distributed("auto", torch.device("cpu"))
    assert (env.rank, env.world_size, env.owns_group) == (rank, WORLD, True)


# ---- (1) gathered negatives == one process over the concatenated batch -------------------------------------
def _model(base: str, shared: bool) -> tuple[TwoTower, Temperature]:
    torch.manual_seed(0)
    model = TwoTower.from_base(base, shared=shared, query_max_length=16, result_max_length=16, proj_dim=8)
    model.eval()  # no dropout: ranks draw other masks than one process would
    return model, Temperature(0.05, learnable=True)


def _batch(rows: np.ndarray, global_rows: np.ndarray) -> Batch:
    return collate(rows, QUERIES, POSITIVES, NEGATIVES, epoch=0, per_query=2,
                   exclude={POSITIVES[i] for i in global_rows})


def _step_grads(forward, model: TwoTower, temp: Temperature, batch: Batch, chunk: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    temp.zero_grad(set_to_none=True)
    loss = forward_backward(forward, model, batch, torch.device("cpu"), temp, symmetric=True, cache_chunk_size=chunk)
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["temperature"] = temp.log_t.grad.clone()
    out["loss"] = torch.tensor(global_mean(loss))
    return out


CASES = [(shared, chunk) for shared in (False, True) for chunk in (0, 3)]  # chunk 3: GradCache, uneven chunks


def _gathered_worker(rank: int, port: int, base: str, out: str) -> None:
    _join_group(rank, port)
    global_rows = np.arange(8)
    rows = np.array_split(global_rows, WORLD)[rank]
    for shared, chunk in CASES:
        model, temp = _model(base, shared)
        batch = _batch(rows, global_rows)
        probe = features(model, Batch(["probe"], ["probe"], []), torch.device("cpu"))
        forward = TowerForward(model)
        forward = wrap_ddp(forward, torch.device("cpu"), bool(unused_parameters(forward, *probe)))
        grads = _step_grads(forward, model, temp, batch, chunk)
        grads["negatives"] = torch.tensor(len(batch.negatives))
        save_file(grads, f"{out}/rank{rank}-shared{int(shared)}-chunk{chunk}.safetensors")


def test_gathered_negatives_give_single_process_loss_and_gradients(tiny_bert_dir, tmp_path):
    _spawn(_gathered_worker, str(tiny_bert_dir), str(tmp_path))
    global_rows = np.arange(8)
    for shared, chunk in CASES:
        model, temp = _model(str(tiny_bert_dir), shared)
        want = _step_grads(TowerForward(model), model, temp, _batch(global_rows, global_rows), chunk=0)
        got = [load_file(tmp_path / f"rank{r}-shared{int(shared)}-chunk{chunk}.safetensors") for r in range(WORLD)]
        # the ranks held different numbers of hard negatives: the variable-size gather was exercised
        assert [int(g.pop("negatives")) for g in got] == [4, 5]
        for rank, grads in enumerate(got):
            assert grads["loss"].item() == pytest.approx(want["loss"].item(), abs=1e-6), (shared, chunk, rank)
            assert grads.keys() == want.keys(), sorted(grads.keys() ^ want.keys())
            for name in want:
                assert torch.allclose(grads[name], want[name], atol=1e-5, rtol=1e-4), (shared, chunk, rank, name)


# ---- (2) the real train(): end to end, one TOWERS dir, equal to one process, exact resume ---------------------
def _pairs_file(path: Path) -> Path:
    with path.open("w") as fh:
        for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES):
            fh.write(json.dumps({"query": q, "positive": p, "negatives": n}) + "\n")
    return path


def _config(pairs: Path, out: Path, base: Path, **kw) -> TrainConfig:
    defaults = dict(batch_size=8, max_steps=4, lr=1e-3, warmup_ratio=0.25, log_every=1, checkpoint_every=2,
                    keep_checkpoints=0, eval_every=0, device="cpu", query_max_length=16, result_max_length=16,
                    negatives_per_query=2, symmetric=True, learn_temperature=True, temperature_lr=1e-2)
    return TrainConfig(pairs=str(pairs), out=str(out), base=str(base), **{**defaults, **kw})


def _no_dropout_copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _train_worker(rank: int, port: int, pairs: str, base: str, base_nodrop: str, root: str) -> None:
    _join_group(rank, port)
    root_ = Path(root)
    # 2 ranks vs 1 process (no dropout), with a dev set, GradCache and a shared tower in the second run
    train(_config(Path(pairs), root_ / "nodrop", Path(base_nodrop), dev=pairs, eval_every=2))
    train(_config(Path(pairs), root_ / "cached", Path(base_nodrop), shared=True, cache_chunk_size=3))
    # exact resume with dropout: every rank must continue its own RNG stream
    train(_config(Path(pairs), root_ / "straight", Path(base)))
    real_step, calls = train_mod.optimizer_step, []

    def dies_during_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_step(*args, **kwargs)

    train_mod.optimizer_step = dies_during_step_4
    try:
        train(_config(Path(pairs), root_ / "resumed", Path(base)))
    except KeyboardInterrupt:
        pass
    finally:
        train_mod.optimizer_step = real_step
    train(_config(Path(pairs), root_ / "resumed", Path(base), resume=True))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_rank_training_saves_one_towers_dir_equal_to_one_process_and_resumes_exactly(tiny_bert_dir, tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    nodrop = _no_dropout_copy(tiny_bert_dir, tmp_path / "nodrop-bert")
    _spawn(_train_worker, str(pairs), str(tiny_bert_dir), str(nodrop), str(tmp_path))

    for name, kw in (("nodrop", dict(dev=str(pairs), eval_every=2)), ("cached", dict(shared=True))):
        out = tmp_path / name
        two = TwoTower.load(out)  # one loadable TOWERS dir
        meta = json.loads((out / "twotower.json").read_text())
        assert meta["train_config"]["world_size"] == 2 and meta["train_config"]["steps"] == 4
        records = _records(out)  # only rank 0 wrote: one record per step, no duplicates
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
        assert not list(out.glob(".*")), list(out.glob(".*"))  # no leftovers of an atomic write
        one = train(_config(pairs, tmp_path / f"{name}-1proc", nodrop, **kw))
        # Adam divides by sqrt(v): a coordinate whose gradient is float noise can move by a fraction of lr
        # (1e-3) either way, so weights compare at 1e-4; the losses and test (1)'s gradients are the tight check.
        for (key, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=1e-4), (name, key, (a - b).abs().max())
        ones = [r["loss"] for r in _records(tmp_path / f"{name}-1proc") if "loss" in r]
        assert np.allclose([r["loss"] for r in records if "loss" in r], ones, atol=1e-5)
    assert [r["step"] for r in _records(tmp_path / "nodrop") if "dev_recall@10" in r] == [0, 2, 4]

    straight, resumed = TwoTower.load(tmp_path / "straight"), TwoTower.load(tmp_path / "resumed")
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    def timeless(name: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in _records(tmp_path / name)]

    assert timeless("straight") == timeless("resumed")  # same losses, LR and temperature at every step
    trainer = torch.load(tmp_path / "resumed" / "checkpoints" / "step-2" / "trainer.pt", weights_only=True)
    assert len(trainer["rng_ranks"]) == 2  # each rank's own dropout stream was saved, and they differ
    assert not torch.equal(trainer["rng_ranks"][0]["torch"], trainer["rng_ranks"][1]["torch"])


# ---- (4) sampler: shards of one global batch, no duplicates -------------------------------------------------
def test_sampler_shards_global_batches_without_duplicates_or_shared_rows():
    rng = np.random.default_rng(0)
    # 200 rows over 60 query texts and 80 positive texts: many rows conflict with each other
    queries = [f"q{i}" for i in rng.integers(0, 60, 200)]
    positives = [f"p{i}" for i in rng.integers(0, 80, 200)]
    keys = conflict_keys(queries, positives)
    single = NoDuplicatesBatchSampler(keys, batch_size=8, seed=3)
    ranks = [NoDuplicatesBatchSampler(keys, batch_size=8, seed=3, rank=r, world_size=WORLD) for r in range(WORLD)]
    n = len(single)
    assert n > 5 and all(len(s) == n for s in ranks)
    seen: list[set[int]] = [set(), set()]
    for _ in range(n):
        whole = single.next_batch()
        shards = [s.next_batch() for s in ranks]
        assert all(len(s) == 4 for s in shards)  # the global batch split evenly
        assert np.array_equal(np.concatenate(shards), whole)  # same global batches as one process
        assert len({queries[i] for i in whole}) == 8 and len({positives[i] for i in whole}) == 8
        for r, shard in enumerate(shards):
            assert seen[r].isdisjoint(shard.tolist())  # no row twice in an epoch on one rank
            seen[r].update(shard.tolist())
    assert seen[0].isdisjoint(seen[1])  # no row given to both ranks
    assert all(s.epoch == 0 for s in ranks)
    with pytest.raises(ValueError, match="not divisible"):
        NoDuplicatesBatchSampler(keys, batch_size=9, rank=0, world_size=WORLD)


# ---- launcher ----------------------------------------------------------------------------------------------
def test_torchrun_command_rebuilds_the_config_without_nproc():
    import argparse

    config = TrainConfig(pairs="p.jsonl", out="o", nproc=4, shared=True, lr=3e-4, pooling="cls", resume=True,
                         cache_chunk_size=16, matryoshka_dims=[384, 128], matryoshka_weights=[1.0, 0.5])
    cmd = torchrun_command(config)
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=4" in cmd and not any(a.startswith("--nproc") and "=" not in a for a in cmd)
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    child = cmd[cmd.index("twotower.towers.cli") + 1:]
    from twotower.common.cliargs import dataclass_from_args

    rebuilt = dataclass_from_args(TrainConfig, parser.parse_args(["train", *child]))
    assert rebuilt == TrainConfig(**{**config.to_dict(), "nproc": 1})
    assert config_argv(TrainConfig(pairs="p", out="o")) == ["--pairs", "p", "--out", "o"]


def test_nproc_outside_torchrun_and_missing_rendezvous_are_refused(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="--nproc 2: the processes are started by"):
        train(TrainConfig(pairs="p.jsonl", out=str(tmp_path / "o"), nproc=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--nproc 3, but torchrun started 2 processes"):
        train(TrainConfig(pairs="p.jsonl", out=str(tmp_path / "o"), nproc=3))
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT is not"):
        train(TrainConfig(pairs="p.jsonl", out=str(tmp_path / "o"), device="cpu"))


@pytest.mark.slow
def test_cli_nproc_launches_torchrun(tiny_bert_dir, tmp_path):
    """`twotower train --nproc 2` end to end (3 fresh interpreters: ~15 s on 2 cores, hence slow)."""
    import subprocess

    pairs = _pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "towers"
    cmd = [sys.executable, "-m", "twotower.cli", "train", "--pairs", str(pairs), "--out", str(out), "--base",
           str(tiny_bert_dir), "--nproc", "2", "--batch-size", "8", "--max-steps", "2", "--device", "cpu",
           "--query-max-length", "16", "--result-max-length", "16"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved TOWERS dir") == 1  # rank 0 alone reports
    assert json.loads((out / "twotower.json").read_text())["train_config"]["world_size"] == 2
    TwoTower.load(out)
