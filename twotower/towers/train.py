"""Contrastive training of a :class:`~towers.model.TwoTower`: one visible loop, resumable exactly.

The pieces are separable on purpose: ``collate`` (rows -> texts) -> ``features`` (texts -> token ids) ->
``TowerForward`` (ids -> q, r; the module DDP wraps) -> ``contrastive_loss`` -> ``optimizer_step``;
``forward_backward`` runs one step's loss and backward, plainly or with GradCache (``towers.gradcache``).
``train`` wires them together with AdamW, warm-up + linear decay, gradient clipping, ``torch.amp``,
``train_log.jsonl`` and atomic checkpoints (see ``towers.checkpoint``): ``_setup`` builds the run's state
(a :class:`RunState`), and ``_train``'s loop, read top to bottom, advances it. Around the loop: a dev split, dev
recall@10 / nDCG@10, the best checkpoint and the verdict (``towers.dev``), auto lengths and inference lengths
(``towers.lengths``), hard negatives mined per round (``towers.negatives``). Under torchrun every process runs
``train``; ``towers.distributed`` holds the data-parallel parts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from twotower.common.device import autocast_dtype, precision_of, resolve_device
from twotower.common.outputs import check_out_dir
from twotower.towers import checkpoint as ckpt
from twotower.towers.bases import resolve_base
from twotower.towers.checkpoint import CKPT_DIR, LOG_NAME, TrainLog, dry_save, prepare_out, publish_towers
from twotower.towers.config import TrainConfig
from twotower.towers.data import DEV_MIN, count_overlap, load_pairs, pairs_fingerprint, split_dev
from twotower.towers.dev import DevState, dev_metrics, load_best, no_gain_reasons, read_best, save_best, verdict
from twotower.towers.distill import Scores, batch_margins, margin_mse, teacher_scores
from twotower.towers.distributed import (
    DistEnv,
    all_gather_object,
    average_gradients,
    check_launch,
    global_mean,
    init_distributed,
    run_collectively,
    shutdown,
    unused_parameters,
    wrap_ddp,
)
from twotower.towers.gradcache import Features, cached_backward
from twotower.towers.lengths import describe_auto, resolve_lengths
from twotower.towers.lora import apply_lora, merge_lora
from twotower.towers.loss import Temperature, contrastive_loss, matryoshka_loss
from twotower.towers.model import Tower, TwoTower
from twotower.towers.negatives import load_mined, mine_for_training, mined_path, mined_stats, save_mined
from twotower.towers.pooling import check_pooling
from twotower.towers.recipe import DECODER, describe_recipe, resolve_recipe
from twotower.towers.reranker import Reranker, check_reranker_dir
from twotower.towers.sampler import NoDuplicatesBatchSampler, conflict_keys
from twotower.towers.static import StaticTower
from twotower.towers.static_pair import build_static_pair, check_static_options

__all__ = ["TrainConfig", "train", "LOG_NAME", "CKPT_DIR", "Batch", "collate", "features", "TowerForward", "embed",
           "forward_backward", "optimizer_step", "dev_recall"]


@dataclass
class Batch:
    queries: list[str]
    positives: list[str]
    negatives: list[str]  # flattened hard negatives of the whole batch (scored by every query)
    owners: list[int] = field(default_factory=list)  # the row each negative was drawn for
    margins: list[float] = field(default_factory=list)  # --teacher: its margin s(q, p) - s(q, n) per negative


def collate(rows: np.ndarray, queries: list[str], positives: list[str], negatives: list[list[str]] | None,
            epoch: int, per_query: int, exclude: Collection[str] | None = None,
            teacher: Scores | None = None) -> Batch:
    """Texts of ``rows``. Hard negatives cycle through each row's list epoch by epoch; one that equals a
    positive in the batch is dropped (it would be a false negative for that positive's query).

    Args:
        exclude: texts never used as hard negatives; default the positives of ``rows``. A data-parallel rank
            passes the positives of the whole *global* batch, since every rank's positives are candidates.
        teacher: ``--teacher``'s scores (``towers.distill``): each negative's teacher margin goes with the batch.
    """
    qs, ps = [queries[i] for i in rows], [positives[i] for i in rows]
    negs: list[str] = []
    owners: list[int] = []
    if negatives is not None and per_query > 0:
        in_batch = set(ps) if exclude is None else set(exclude)
        for b, i in enumerate(rows):
            row = negatives[i]
            take = [row[(epoch * per_query + j) % len(row)] for j in range(min(per_query, len(row)))]
            kept = [n for n in take if n not in in_batch]
            negs += kept
            owners += [b] * len(kept)
    margins = batch_margins(qs, ps, negs, owners, teacher) if teacher is not None else []
    return Batch(qs, ps, negs, owners, margins)


def _features(tower: Tower, texts: list[str], max_length: int, device: torch.device,
              prompt: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tower.tokenize(texts, max_length, prompt).items()}


def features(model: TwoTower, batch: Batch, device: torch.device) -> tuple[Features, Features]:
    """Token ids of the prompted queries (B, T_q) and results, positives then hard negatives (B + M, T_r)."""
    return (_features(model.query_tower, batch.queries, model.query_tower.max_length, device),
            _features(model.result_tower, batch.positives + batch.negatives, model.result_max_length, device,
                      model.result_prompt))


class TowerForward(nn.Module):
    """``(query features | None, result features | None) -> (q (B, d) | None, r (R, d) | None)`` in float32.

    The one module DDP wraps: a single forward (and backward) covers both towers, shared or not, so DDP sees
    every parameter once per step. Autocast lives inside, so DDP and GradCache callers all get it.

    Args:
        group_by_length: run each tower's rows as length groups (``Tower.forward_grouped``): the batch and
            the loss are unchanged, but pad tokens are mostly not computed (codesearch pairs at 32/128
            tokens: ~0.7x the tokens of one padded batch). None = on for CPU, where compute scales with
            tokens and an extra forward pass costs next to nothing; off for GPUs, where small models are
            launch-bound and one wide batch is cheaper.
    """

    def __init__(self, model: TwoTower, amp_dtype: torch.dtype | None = None,
                 group_by_length: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        self.group_by_length = group_by_length

    def _encode(self, tower: Tower, features: Features) -> torch.Tensor:
        grouped = self.group_by_length if self.group_by_length is not None else tower.device.type == "cpu"
        return tower.forward_grouped(**features) if grouped else tower(**features)

    def forward(self, q_features: Features | None, r_features: Features | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        device = self.model.query_tower.device
        with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            q = self._encode(self.model.query_tower, q_features) if q_features is not None else None
            r = self._encode(self.model.result_tower, r_features) if r_features is not None else None
        return (q.float() if q is not None else None), (r.float() if r is not None else None)


def embed(model: TwoTower, batch: Batch, device: torch.device, amp_dtype: torch.dtype | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q (B, d), p (B, d), negs (M, d) or None) in float32, with autocast when ``amp_dtype`` is set."""
    q, r = TowerForward(model, amp_dtype)(*features(model, batch, device))
    assert q is not None and r is not None, "both feature sets were given"
    return q, r[: len(batch.positives)], (r[len(batch.positives):] if batch.negatives else None)


def forward_backward(forward: nn.Module, model: TwoTower, batch: Batch, device: torch.device, temp: Temperature,
                     symmetric: bool = False, scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     cache_chunk_size: int = 0, matryoshka: tuple[tuple[int, ...], tuple[float, ...]] | None = None,
                     teacher_weight: float = 0.0) -> torch.Tensor:
    """One step's loss on this process's rows, with its gradients accumulated into ``.grad``.

    Args:
        forward: a :class:`TowerForward` over ``model``, wrapped in DDP when running distributed (negatives
            are then gathered from every rank, see :func:`towers.loss.contrastive_loss`).
        scale: applied to the loss before backward (``GradScaler.scale``), or None.
        cache_chunk_size: > 0 runs GradCache (``towers.gradcache``) with chunks of that many rows per tower:
            same gradients, memory of one chunk.
        matryoshka: (dims, weights) of the Matryoshka loss (``towers.loss.matryoshka_loss``); None: InfoNCE.
        teacher_weight: weight of the margin-MSE term (``towers.distill``) over ``batch.margins``, when it has any.

    Returns:
        This rank's loss, detached (its mean over ranks is the loss of the whole batch).
    """
    q_features, r_features = features(model, batch, device)
    n = len(batch.positives)

    def loss_of(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # q (B, d), r (B + M, d)
        if matryoshka is not None:
            loss = matryoshka_loss(q, r[:n], r[n:], *matryoshka, temp(), symmetric)
        else:
            loss = contrastive_loss(q, r[:n], r[n:], temp(), symmetric)
        if teacher_weight and batch.margins:
            loss = loss + teacher_weight * margin_mse(q, r[:n], r[n:], batch.owners, batch.margins, temp())
        return loss

    if cache_chunk_size:
        loss = cached_backward(forward, q_features, r_features, loss_of, cache_chunk_size, scale)
    else:
        loss = loss_of(*forward(q_features, r_features))
        (scale(loss) if scale is not None else loss).backward()
    average_gradients(temp.parameters())  # DDP averages the towers' gradients; the temperature is outside it
    return loss.detach()


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   scaler: torch.amp.GradScaler, max_grad_norm: float) -> None:
    """Unscale, clip, step, schedule, zero (GradScaler is a no-op unless fp16); gradients are already in .grad."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def dev_recall(model: TwoTower, queries: list[str], positives: list[str], k: int = 10, batch_size: int = 64,
               amp_dtype: torch.dtype | None = None) -> float:
    """Recall@k of exact search over the dev positives (``towers.dev.dev_metrics``, at the training lengths)."""
    return dev_metrics(model, queries, positives, k, batch_size, amp_dtype)[f"recall@{k}"]


# ---- the run -----------------------------------------------------------------------------------------
def _enable_checkpointing(encoder: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: TwoTower, temp: Temperature, config: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases / norms), temperature in its own group."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() de-duplicates shared towers
    static = {id(p) for p in model.query_tower.parameters()} if isinstance(model.query_tower, StaticTower) else set()
    groups = [{"params": [p for p in params if p.ndim >= 2 and id(p) not in static],
               "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2 and id(p) not in static], "weight_decay": 0.0}]
    if static:  # a token table: its own (much larger) step, no decay pulling rare tokens to zero
        groups.append({"params": [p for p in params if id(p) in static], "weight_decay": 0.0, "lr": config.static_lr})
    if config.learn_temperature:
        groups.append({"params": [temp.log_t], "weight_decay": 0.0, "lr": config.temperature_lr})
    return groups


def _check_resumable(config: TrainConfig, state: dict[str, Any], fingerprint: str, path: Path) -> None:
    problems = config.resume_mismatches(state["config"])
    if state["data_fingerprint"] != fingerprint:
        problems.append(f"pairs data: checkpoint has fingerprint {state['data_fingerprint']}, "
                        f"{config.pairs} has {fingerprint}")
    if problems:
        raise ValueError(f"--resume: {path} was trained with other settings; rerun with them or choose a new "
                         "--out:\n  " + "\n  ".join(problems))


def check_train_out(config: TrainConfig) -> None:
    """Refuse an ``--out`` that is not (or not yet) a TOWERS dir or training run of ours (``common.outputs``)."""
    check_out_dir(config.out, ("towers", "run"), verb="train",
                  inputs={"--pairs": config.pairs, "--dev": config.dev_file, "--base": config.base,
                          "--result-tower-from": config.result_tower_from, "--teacher": config.teacher})


def warn_dev_overlap(config: TrainConfig, pairs: Any, dev: Any) -> None:
    """One warning line when ``--dev`` is ``--pairs`` or shares (query, positive) rows with it."""
    assert config.dev_file is not None, "only a --dev file can overlap --pairs"
    if Path(config.dev).exists() and Path(config.pairs).exists() and \
            Path(config.dev).resolve() == Path(config.pairs).resolve():
        print(f"twotower train: warning: --dev is the same file as --pairs ({config.dev}); dev recall@10 will "
              f"measure memorisation, not unseen queries", file=sys.stderr)
        return
    n = count_overlap(pairs, dev)
    if n:
        print(f"twotower train: warning: {n} of {len(dev)} --dev pairs are also in --pairs (same query and "
              f"positive); dev recall@10 will be optimistic", file=sys.stderr)


def _check_model_options(config: TrainConfig) -> None:
    """An unknown base or pooling fails here, naming the choices (resolving a base is cached, so not wasted)."""
    base = resolve_base(config.base)
    check_static_options(config)
    if config.teacher:
        check_reranker_dir(config.teacher)  # a teacher that does not fit is refused before anything loads
    if config.pooling is not None:
        check_pooling(config.pooling)
    if config.matryoshka_dims:
        from transformers import AutoConfig

        dim = config.proj_dim or AutoConfig.from_pretrained(base).hidden_size
        if max(config.matryoshka_dims) > dim:
            raise ValueError(f"--matryoshka-dims {max(config.matryoshka_dims)} is larger than the towers' dim {dim}")


def _prepare_run(config: TrainConfig, fingerprint: str) -> str | None:
    """(Rank 0 only.) Make ``--out`` ready and pick the checkpoint to resume from: its dir name, or None."""
    out = prepare_out(config.out, config.resume, config.overwrite)
    resume_from = ckpt.latest_complete(out / CKPT_DIR) if config.resume else None
    if config.resume and resume_from is None:
        warnings.warn(f"--resume: no complete checkpoint in {out / CKPT_DIR}; starting from step 0", stacklevel=2)
    if resume_from is not None:  # refuse a different run before spending time on building the model
        _check_resumable(config, json.loads((resume_from / "state.json").read_text()), fingerprint, resume_from)
    return None if resume_from is None else resume_from.name


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A torch seed per rank, so the ranks' dropout masks are independent draws."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _restore_rng(trainer: dict[str, Any], state: dict[str, Any], env: DistEnv, seed: int, step: int,
                 device: torch.device) -> None:
    """Each rank continues its own RNG streams; from a checkpoint of another world size it cannot."""
    saved_world = len(state.get("rng_ranks") or [None])
    if saved_world == env.world_size and env.enabled:
        ckpt.set_rng_state(trainer["rng_ranks"][env.rank], state["rng_ranks"][env.rank], device)
        return
    ckpt.set_rng_state(trainer["rng"], state["rng"], device)
    if saved_world != env.world_size:
        if env.is_main:
            warnings.warn(f"--resume: the checkpoint was written by {saved_world} process(es), this run has "
                          f"{env.world_size}; batches and maths continue exactly, dropout draws do not", stacklevel=3)
        if env.rank:
            torch.manual_seed(_rank_seed(seed, env.rank, step))


def train(config: TrainConfig) -> TwoTower:
    """Train a TwoTower on ``config.pairs`` and save it as a TOWERS dir at ``config.out``.

    Every input is validated before anything is trained. With ``config.resume`` the run continues from the
    newest complete checkpoint in ``out/checkpoints`` with the same weights, optimizer and scheduler state,
    data position and RNG states, so it ends with the weights an uninterrupted run would have.

    Under torchrun (``twotower train --nproc N``, ``torchrun --nproc_per_node N -m towers.cli ...``) every
    process calls this: the towers are wrapped in DDP, each process encodes ``batch_size / N`` rows of every
    global batch, negatives are gathered from all processes (same loss and gradients as one process over the
    whole batch), and rank 0 alone logs, evaluates, checkpoints and saves while the others wait.

    Returns:
        The trained model (also saved, with this config in ``twotower.json``), on every rank.
    """
    check_launch(config.nproc)
    check_train_out(config)
    device = resolve_device(config.device)
    env = init_distributed(config.backend, device, config.dist_timeout)
    try:
        return _train(config, env, device)
    finally:
        shutdown(env)


def _split(config: TrainConfig, pairs: Any, env: DistEnv) -> tuple[Any, Any]:
    """(training pairs, dev pairs or None): ``--dev FILE``, the automatic split of ``--pairs``, or none."""
    cols = (config.query_column, config.positive_column, config.negatives_column)
    if config.dev_file is not None:
        dev = load_pairs(config.dev_file, *cols)
        if env.is_main:
            warn_dev_overlap(config, pairs, dev)
        return pairs, dev
    if config.dev == "none":
        return pairs, None
    train_rows, dev_rows = split_dev(pairs["query"], pairs["positive"], config.seed)
    if len(dev_rows) < DEV_MIN:
        if env.is_main:
            print(f"twotower train: no dev split: {len(pairs)} pairs give {len(dev_rows)} dev pairs (fewer than "
                  f"{DEV_MIN}); no dev evaluation and no verdict, give --dev FILE for them", file=sys.stderr)
        return pairs, None
    if env.is_main:
        print(f"twotower train: dev: held out {len(dev_rows)} of {len(pairs)} pairs (no query or positive shared "
              f"with training; --dev none keeps them all for training)", file=sys.stderr)
    return pairs.select(train_rows), pairs.select(dev_rows)


@dataclass
class RunState:
    """One training run: what ``_setup`` builds (data, model, optimizer; restored on ``--resume``) and what
    ``_train``'s loop advances (step, loss window, dev state, hard-negative round)."""

    config: TrainConfig  # with the resolved lengths
    env: DistEnv
    device: torch.device
    amp_dtype: torch.dtype | None
    out: Path
    queries: list[str]
    positives: list[str]
    negatives: list[list[str]] | None  # the data's, then each round's mined ones
    dev: Any  # dev pairs, or None
    fingerprint: str  # of the training rows
    measured: dict[str, Any]  # auto lengths: what was measured
    sampler: NoDuplicatesBatchSampler
    per_round: int  # steps per hard-negative round (all steps without rounds)
    total: int  # steps in all
    model: TwoTower
    temp: Temperature
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]
    forward: nn.Module  # TowerForward, DDP-wrapped under torchrun
    step: int = 0
    losses: list[float] = field(default_factory=list)  # global loss of each step since the last log record
    dev_state: DevState = field(default_factory=DevState)
    saved_step: int = -1
    evaluated_step: int = -1
    current_round: int = 0
    mined: list[dict[str, Any]] = field(default_factory=list)
    teacher: Reranker | None = None  # --teacher, loaded before the first step
    teacher_scores: Scores | None = None  # its scores of the current negatives ...
    teacher_negatives: list[list[str]] | None = None  # ... which are these
    stopped: str = ""  # why the run stopped early, or ""
    recipe: dict[str, Any] = field(default_factory=dict)  # the recipe in force (towers.recipe), for twotower.json
    log: TrainLog = field(init=False)  # opened by _setup at the step the run continues from


def _sampler(config: TrainConfig, env: DistEnv, queries: list[str], positives: list[str]
             ) -> NoDuplicatesBatchSampler:
    if config.batch_size % env.world_size:
        raise ValueError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
                         f"{env.world_size} processes")
    sampler = NoDuplicatesBatchSampler(conflict_keys(queries, positives), config.batch_size, config.seed,
                                       rank=env.rank, world_size=env.world_size)
    if len(sampler) == 0:
        raise ValueError(f"{config.pairs}: {len(queries)} rows make no batch of {config.batch_size} pairs with "
                         "distinct queries and positives; lower --batch-size")
    return sampler


def _build_model(config: TrainConfig, env: DistEnv, device: torch.device, out: Path
                 ) -> tuple[TwoTower, Temperature]:
    """The towers (LoRA, checkpointing) and the temperature, on ``device``, seeded alike on every rank."""
    _seed_all(config.seed)  # same initialisation on every rank (DDP also broadcasts rank 0's weights)
    if config.query_tower == "static":  # distilled static query tower (towers.static_pair)
        model = build_static_pair(config, str(device))
    else:
        model = TwoTower.from_base(config.base, config.shared, config.pooling, config.query_max_length,
                                   config.result_max_length, config.proj_dim, query_prompt=config.query_prompt,
                                   result_prompt=config.result_prompt, eos=config.append_eos)
        model.inference_max_lengths = {"query": config.inference_query_max_length,
                                       "result": config.inference_result_max_length}
    model.train_config = config.to_dict()  # also tells a shared tower its result max length
    if config.lora_r:
        apply_lora(model, config.lora_r, config.lora_alpha or 2.0 * config.lora_r, config.lora_targets)
    run_collectively(lambda: dry_save(model, out, config.base), main_only=True)  # unsaveable: fail before step 1
    temp = Temperature(config.temperature, config.learn_temperature)
    model.to(device).train()
    temp.to(device)
    if env.rank:
        torch.manual_seed(_rank_seed(config.seed, env.rank))  # independent dropout per rank
    if config.gradient_checkpointing:
        for tower in {model.query_tower, model.result_tower}:
            if isinstance(tower, Tower) and any(p.requires_grad for p in tower.parameters()):  # not static/frozen
                _enable_checkpointing(tower.encoder)
    return model, temp


def _resume(run: RunState, resume_from: Path) -> None:
    """Restore weights, optimizer, scheduler, scaler, data position, RNG and dev state from a checkpoint."""
    # every rank reads it (multi-node: --out on a shared filesystem)
    weights, trainer, state = run_collectively(lambda: ckpt.load_checkpoint(resume_from))
    ckpt.load_model_weights(run.model, run.temp, weights)
    run.optimizer.load_state_dict(trainer["optimizer"])
    run.scheduler.load_state_dict(trainer["scheduler"])
    run.scaler.load_state_dict(trainer["scaler"])
    run.sampler.load_state_dict(state["sampler"])
    run.step, run.losses = int(state["step"]), list(state["loss_window"])
    _restore_rng(trainer, state, run.env, run.config.seed, run.step, run.device)
    run.dev_state = DevState.from_dict(state.get("dev"))
    best = read_best(run.out / CKPT_DIR)
    if best is not None and run.dev_state.best is not None and best["step"] > run.dev_state.best["step"]:
        # a best found after this checkpoint, by this same run (resume is exact): keep it, replay the rest
        run.dev_state.best = {k: v for k, v in best.items() if k != "sha256"}
        run.dev_state.stale = 0


def _setup(config: TrainConfig, env: DistEnv, device: torch.device) -> RunState:
    """Read and check the data, build the model and optimizer, restore ``--resume``'s checkpoint: the run's
    state before its first step. Every check runs before the model loads."""
    cols = (config.query_column, config.positive_column, config.negatives_column)
    pairs = load_pairs(config.pairs, *cols)  # every rank reads and validates: same data, same errors
    pairs, dev = _split(config, pairs, env)
    queries, positives = list(pairs["query"]), list(pairs["positive"])
    negatives = [list(n) for n in pairs["negatives"]] if "negatives" in pairs.column_names else None
    fingerprint = pairs_fingerprint(pairs)  # of the training rows: a resume with another split is refused
    if config.teacher and (config.negatives_per_query == 0 or (negatives is None and not config.hard_negatives)):
        raise ValueError("--teacher distils over hard negatives: give --hard-negatives N (mined) or pairs with a "
                         "negatives column, and --negatives-per-query >= 1")
    sampler = _sampler(config, env, queries, positives)
    rounds = config.hard_negatives_rounds if config.hard_negatives else 1
    per_round = config.max_steps or config.epochs * len(sampler)
    total = per_round * rounds
    out = Path(config.out)
    _check_model_options(config)  # before --out is created: a typo must not leave an empty run dir behind
    config, recipe = resolve_recipe(config, resolve_base(config.base), device)  # unset options: the base's recipe
    amp_dtype = autocast_dtype(config.amp, device, decoder=recipe["recipe"] == DECODER.name)
    if env.is_main:
        print(f"twotower train: {describe_recipe(config.base, recipe)}", file=sys.stderr)
    config, measured = resolve_lengths(config, queries, positives)  # the resolved lengths are the run's
    if env.is_main:
        for side in ("query", "result"):
            if side in measured:
                print(f"twotower train: {describe_auto(side, measured[side])}", file=sys.stderr)
    resume_name = run_collectively(lambda: _prepare_run(config, fingerprint), main_only=True)
    resume_from = out / CKPT_DIR / resume_name if resume_name is not None else None

    model, temp = _build_model(config, env, device, out)
    # Fused AdamW: one kernel over all parameters instead of a Python loop of ~10 ops per tensor (the same
    # update up to float rounding; ~7x faster on CPU, 140 -> 20 ms a step for MiniLM's 23M parameters).
    optimizer = torch.optim.AdamW(_param_groups(model, temp, config), lr=config.lr,
                                  fused=device.type in ("cpu", "cuda") or None)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    forward: nn.Module = TowerForward(model, amp_dtype)
    run = RunState(config, env, device, amp_dtype, out, queries, positives, negatives, dev, fingerprint, measured,
                   sampler, per_round, total, model, temp, optimizer, scheduler, scaler, params, forward, recipe=recipe)
    if resume_from is not None:
        _resume(run, resume_from)
    if env.enabled:  # BERT's pooler is computed but unused: DDP must then look for unused parameters
        probe = features(model, Batch(["probe"], ["probe"], []), device)
        run.forward = wrap_ddp(forward, device, find_unused_parameters=bool(unused_parameters(forward, *probe)))
    run.log = TrainLog(out / LOG_NAME, run.step if resume_from is not None else None, enabled=env.is_main)
    run.saved_step = run.step if resume_from is not None else -1
    return run


def _save_checkpoint(run: RunState) -> None:
    """A complete checkpoint at ``run.step``: weights, trainer state and every rank's RNG streams."""
    rng = all_gather_object(ckpt.rng_state(run.device))  # every rank's RNG streams: exact resume per rank

    def write() -> None:
        trainer = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                   "scaler": run.scaler.state_dict(), "rng": rng[0][0]}
        state = {"sampler": run.sampler.state_dict(), "rng": rng[0][1], "config": run.config.to_dict(),
                 "data_fingerprint": run.fingerprint, "loss_window": run.losses, "dev": run.dev_state.to_dict()}
        if run.env.enabled:
            trainer["rng_ranks"], state["rng_ranks"] = [t for t, _ in rng], [p for _, p in rng]
        ckpt.save_checkpoint(run.out / CKPT_DIR, run.step, ckpt.model_weights(run.model, run.temp), trainer, state)
        ckpt.prune(run.out / CKPT_DIR, run.config.keep_checkpoints)

    run_collectively(write, main_only=True)  # the other ranks wait for it
    run.saved_step = run.step


def _evaluate(run: RunState) -> None:
    """Dev recall@10 / nDCG@10 at ``run.step`` (rank 0), logged; a new best is saved under ``--select best``."""
    assert run.dev is not None, "_evaluate needs a dev set"
    lengths = (run.config.inference_query_max_length, run.config.inference_result_max_length)

    def measure() -> DevState:
        metrics = dev_metrics(run.model, list(run.dev["query"]), list(run.dev["positive"]), 10,
                              run.config.eval_batch_size, run.amp_dtype, lengths)
        run.model.train()
        run.log.write({"step": run.step, **{f"dev_{k}": v for k, v in metrics.items()}})
        tqdm.write(f"step {run.step}: dev recall@10 = {metrics['recall@10']:.4f}, "
                   f"nDCG@10 = {metrics['ndcg@10']:.4f}")
        if run.dev_state.record(run.step, metrics) and run.config.select == "best":
            save_best(run.out / CKPT_DIR, run.step, ckpt.model_weights(run.model, run.temp), metrics)
        return run.dev_state

    run.dev_state = run_collectively(measure, main_only=True)
    run.evaluated_step = run.step


def _hard_negatives(run: RunState, round_: int) -> list[list[str]]:
    """This round's mined negatives: read back when a resumed run already mined them, else mined now."""
    config = run.config

    def get() -> tuple[list[list[str]], dict[str, Any]]:
        path = mined_path(run.out / CKPT_DIR, round_)
        saved = load_mined(path, run.fingerprint, config.hard_negatives)
        if saved is not None:
            return saved
        who = "the base" if round_ == 1 else f"the round-{round_ - 1} towers"
        tqdm.write(f"mining {config.hard_negatives} hard negatives per pair with {who} ({len(run.queries)} pairs)")
        negs, stats = mine_for_training(run.model, run.queries, run.positives, config.hard_negatives,
                                        config.seed + round_, str(run.device), precision_of(run.amp_dtype),
                                        config.eval_batch_size)
        tqdm.write(f"mined: {stats.summary()}")
        save_mined(path, round_, run.step, run.fingerprint, config.hard_negatives, negs, stats)
        return negs, dataclasses.asdict(stats)

    negs, stats = run_collectively(get, main_only=True)
    run.mined.append({"round": round_, "step": run.step, **stats})
    return negs


def _teacher_scores(run: RunState) -> Scores:
    """``--teacher``'s logits of every (query, positive) and (query, negative) pair of the current negatives."""
    assert run.teacher is not None and run.negatives is not None, "only with --teacher and hard negatives"
    tqdm.write(f"--teacher: scoring {len(run.queries)} pairs and their hard negatives with {run.config.teacher}")
    return teacher_scores(run.teacher, run.queries, run.positives, run.negatives, run.config.eval_batch_size)


def _train(config: TrainConfig, env: DistEnv, device: torch.device) -> TwoTower:
    """The training loop, top to bottom: batch -> loss and backward -> optimizer step -> log, dev, checkpoint."""
    run = _setup(config, env, device)
    config, sampler = run.config, run.sampler
    if config.teacher:
        run.teacher = Reranker.load(config.teacher, str(device), precision_of(run.amp_dtype))
    if run.dev is not None and run.step == 0:
        _evaluate(run)
    bar = tqdm(total=run.total, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not env.is_main)
    window_start, window_pairs = time.perf_counter(), 0
    while run.step < run.total:
        if config.hard_negatives and run.step // run.per_round + 1 != run.current_round:
            run.current_round = run.step // run.per_round + 1
            run.negatives = _hard_negatives(run, run.current_round)
        if run.teacher is not None and run.teacher_negatives is not run.negatives:
            run.teacher_scores, run.teacher_negatives = _teacher_scores(run), run.negatives
        global_rows = sampler.next_global_batch()
        batch = collate(sampler.shard(global_rows), run.queries, run.positives, run.negatives, sampler.epoch,
                        config.negatives_per_query, exclude={run.positives[i] for i in global_rows},
                        teacher=run.teacher_scores)
        loss = global_mean(forward_backward(run.forward, run.model, batch, device, run.temp, config.symmetric,
                                            run.scaler.scale, config.cache_chunk_size, config.matryoshka(),
                                            config.teacher_weight if config.teacher else 0.0))
        if not math.isfinite(loss):
            bar.close()  # the bar's last redraw comes before the error line, not after it
            raise ValueError(diverged(run, loss))
        optimizer_step(run.params, run.optimizer, run.scheduler, run.scaler, config.max_grad_norm)
        run.step += 1
        run.losses.append(loss)
        window_pairs += len(global_rows)
        rate = window_pairs / max(time.perf_counter() - window_start, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{rate:.0f}", refresh=False)
        bar.update()
        if run.step % config.log_every == 0 or run.step == run.total:
            run.log.write({"step": run.step, "epoch": sampler.epoch, "loss": float(np.mean(run.losses)),
                           "lr": run.scheduler.get_last_lr()[0], "temperature": float(run.temp().detach()),
                           "pairs_per_s": rate})
            run.losses, window_start, window_pairs = [], time.perf_counter(), 0
        if run.dev is not None and config.eval_every and run.step % config.eval_every == 0:
            _evaluate(run)
            if config.patience and run.dev_state.stale >= config.patience and run.step < run.total:
                run.stopped = f"stopped early: {run.dev_state.stale} evaluations without a new best"
        if config.checkpoint_every and (run.step % config.checkpoint_every == 0 or run.stopped):
            _save_checkpoint(run)
        if run.stopped:
            break
    bar.close()
    if run.dev is not None and run.evaluated_step != run.step:
        _evaluate(run)
    if config.checkpoint_every and run.saved_step != run.step:
        _save_checkpoint(run)  # a --resume of a finished run then has nothing left to redo
    return _finish(run)


def diverged(run: RunState, loss: float) -> str:
    """The one line for a loss that is NaN/inf: the step, the options to change, and what is kept on disk (the
    check runs before the optimizer step, so no checkpoint ever holds the diverged weights)."""
    kept = (f"the last good checkpoint (step {run.saved_step}) is kept in --out" if run.saved_step > 0
            else "no checkpoint was due yet, none was written")
    return (f"training diverged: loss is {loss} at step {run.step + 1} (--lr {run.config.lr:g}); lower --lr or "
            f"use --amp bf16/none; {kept}")


def _dev_summary(run: RunState) -> dict[str, Any]:
    """The verdict of training: the chosen step's dev metrics against the base's (the best's are loaded)."""
    config, dev_state = run.config, run.dev_state
    chosen = dev_state.last
    if config.select == "best" and dev_state.best is not None and dev_state.best["step"] != run.step:
        weights = run_collectively(lambda: load_best(run.out / CKPT_DIR))
        ckpt.load_model_weights(run.model, run.temp, {k: v.to(run.device) for k, v in weights.items()})
        chosen = dev_state.best
    assert chosen is not None and dev_state.base is not None, "dev was evaluated at step 0 and at the end"
    improved = chosen["ndcg@10"] > dev_state.base["ndcg@10"]
    summary = {"improved": improved, "verdict": verdict(dev_state, chosen, run.total),
               "dev_metrics": {"base": dev_state.base, "towers": chosen, "pairs": len(run.dev),
                               "split": config.dev, "select": config.select, "history": dev_state.history},
               "no_gain_reasons": [] if improved else no_gain_reasons(len(run.queries), len(run.dev), config.lr,
                                                                        dev_state)}
    if run.stopped:
        summary["stopped"] = run.stopped
    return summary


def _finish(run: RunState) -> TwoTower:
    """Choose the weights, record the run in ``model.train_config``, merge LoRA and publish the TOWERS dir."""
    config, model = run.config, run.model
    summary = _dev_summary(run) if run.dev is not None else {}
    recall = summary["dev_metrics"]["towers"]["recall@10"] if summary else None
    mined = run.mined
    if config.hard_negatives:  # every round's stats, also those a resumed run read back instead of mining
        mined = [m for r in range(1, run.current_round + 1) if (m := mined_stats(run.out / CKPT_DIR, r)) is not None]
    model.train_config = {**config.to_dict(), "steps": run.step, "final_temperature": float(run.temp().detach()),
                          "data_fingerprint": run.fingerprint, "dev_recall@10": recall,
                          "world_size": run.env.world_size, "lengths_measured": run.measured,
                          "hard_negatives_mined": mined, "recipe": run.recipe, **summary}
    merge_lora(model)  # the TOWERS dir and the returned model hold plain (merged) weights
    model.eval()
    run_collectively(lambda: publish_towers(model, run.out), main_only=True)
    return model
