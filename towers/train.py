"""Contrastive training of a :class:`~towers.model.TwoTower`: one visible loop, resumable exactly.

The pieces are separable on purpose (a data-parallel or GradCache variant swaps one of them):
``collate`` (rows -> texts) -> ``embed`` (texts -> q, p, negs) -> ``info_nce`` -> ``optimizer_step``.
``train`` wires them together with AdamW, warm-up + linear decay, gradient clipping, ``torch.amp``,
dev recall@10, ``train_log.jsonl`` and atomic checkpoints (see ``towers.checkpoint``).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from towers import checkpoint as ckpt
from towers.atomic import write_bytes_atomic
from towers.config import TrainConfig
from towers.data import load_pairs, pairs_fingerprint
from towers.loss import Temperature, info_nce
from towers.model import Tower, TwoTower
from towers.sampler import NoDuplicatesBatchSampler, conflict_keys

__all__ = ["TrainConfig", "train", "Batch", "collate", "embed", "optimizer_step", "dev_recall"]
LOG_NAME = "train_log.jsonl"
CKPT_DIR = "checkpoints"
_RUN_FILES = ("query_tower", "result_tower", "twotower.json", CKPT_DIR, LOG_NAME)


@dataclass
class Batch:
    queries: list[str]
    positives: list[str]
    negatives: list[str]  # flattened hard negatives of the whole batch (scored by every query)


def collate(rows: np.ndarray, queries: list[str], positives: list[str], negatives: list[list[str]] | None,
            epoch: int, per_query: int) -> Batch:
    """Texts of ``rows``. Hard negatives cycle through each row's list epoch by epoch; one that equals a
    positive in the batch is dropped (it would be a false negative for that positive's query)."""
    qs, ps = [queries[i] for i in rows], [positives[i] for i in rows]
    negs: list[str] = []
    if negatives is not None and per_query > 0:
        in_batch = set(ps)
        for i in rows:
            row = negatives[i]
            take = [row[(epoch * per_query + j) % len(row)] for j in range(min(per_query, len(row)))]
            negs += [n for n in take if n not in in_batch]
    return Batch(qs, ps, negs)


def _features(tower: Tower, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tower.tokenize(texts, max_length).items()}


def embed(model: TwoTower, batch: Batch, device: torch.device, amp_dtype: torch.dtype | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q (B, d), p (B, d), negs (M, d) or None) in float32, with autocast when ``amp_dtype`` is set."""
    q_len, r_len = model.query_tower.max_length, model.result_max_length
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        q = model.query_tower(**_features(model.query_tower, batch.queries, q_len, device))
        # positives and negatives go through the result tower in one forward pass: (B + M, d)
        r = model.result_tower(**_features(model.result_tower, batch.positives + batch.negatives, r_len, device))
    q, r = q.float(), r.float()
    return q, r[: len(batch.positives)], (r[len(batch.positives):] if batch.negatives else None)


def optimizer_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: Any, scaler: torch.amp.GradScaler, max_grad_norm: float) -> None:
    """Backward, unscale, clip, step, schedule, zero (GradScaler is a no-op unless fp16)."""
    scaler.scale(loss).backward()
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def dev_recall(model: TwoTower, queries: list[str], positives: list[str], k: int = 10, batch_size: int = 64) -> float:
    """Recall@k of exact search over the dev positives (a text shared by several rows is one doc, relevant
    to each of them; a query text repeated with different positives has all of them relevant)."""
    from eval.metrics import recall_at_k

    doc_of: dict[str, int] = {}
    relevant_of: dict[str, dict[int, float]] = {}
    for q, p in zip(queries, positives):
        relevant_of.setdefault(q, {})[doc_of.setdefault(p, len(doc_of))] = 1.0
    uq = list(relevant_of)
    xq = model.encode_queries(uq, batch_size)  # (nq, d)
    xb = model.encode_results(list(doc_of), batch_size)  # (nb, d)
    k = min(k, len(xb))
    I = np.concatenate([_top_k(xq[i:i + 1024] @ xb.T, k) for i in range(0, len(xq), 1024)])  # (nq, k)
    return recall_at_k(I, [relevant_of[q] for q in uq], k)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best scores per row, best first: (n, m) -> (n, k)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


# ---- the run -----------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}': choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _prepare_out(config: TrainConfig) -> Path:
    out = Path(config.out)
    existing = [n for n in _RUN_FILES if (out / n).exists()]
    if existing and not config.resume:
        if not config.overwrite:
            raise FileExistsError(f"--out '{out}' already holds a training run ({', '.join(existing)}); pass --resume "
                                  "to continue it, --overwrite to start over, or choose another --out")
        for name in existing:
            (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
    out.mkdir(parents=True, exist_ok=True)
    return out


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
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if config.learn_temperature:
        groups.append({"params": [temp.log_t], "weight_decay": 0.0, "lr": config.temperature_lr})
    return groups


def _weights(model: TwoTower, temp: Temperature) -> dict[str, torch.Tensor]:
    """Trainable state for a checkpoint (a shared tower once: safetensors refuses aliased tensors)."""
    out = {f"query_tower.{k}": v for k, v in model.query_tower.state_dict().items()}
    if not model.shared:
        out.update({f"result_tower.{k}": v for k, v in model.result_tower.state_dict().items()})
    out["temperature.log_t"] = temp.log_t.detach()
    return out


def _load_weights(model: TwoTower, temp: Temperature, weights: dict[str, torch.Tensor]) -> None:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    model.query_tower.load_state_dict(part("query_tower."))
    if not model.shared:
        model.result_tower.load_state_dict(part("result_tower."))
    with torch.no_grad():
        temp.log_t.copy_(weights["temperature.log_t"])


def _check_resumable(config: TrainConfig, state: dict[str, Any], fingerprint: str, path: Path) -> None:
    problems = config.resume_mismatches(state["config"])
    if state["data_fingerprint"] != fingerprint:
        problems.append(f"pairs data: checkpoint has fingerprint {state['data_fingerprint']}, "
                        f"{config.pairs} has {fingerprint}")
    if problems:
        raise ValueError(f"--resume: {path} was trained with other settings; rerun with them or choose a new "
                         "--out:\n  " + "\n  ".join(problems))


class _Log:
    """Append-only ``train_log.jsonl``; on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line + "\n")
            write_bytes_atomic(path, "".join(keep).encode())  # a kill here must not lose the kept records
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _publish(model: TwoTower, out: Path) -> None:
    """Put the TOWERS files into ``out`` next to checkpoints/ and the log; ``twotower.json`` goes last, so
    ``out`` is never a loadable TOWERS dir with half its files."""
    staged = out / ".towers-final"
    for leftover in out.glob("*.towers-final*"):  # from a publish that a kill interrupted
        shutil.rmtree(leftover)
    model.save(staged)  # atomic: complete or absent
    (out / "twotower.json").unlink(missing_ok=True)
    for name in ("query_tower", "result_tower"):
        if (out / name).exists():
            shutil.rmtree(out / name)
        os.replace(staged / name, out / name)
    os.replace(staged / "twotower.json", out / "twotower.json")
    shutil.rmtree(staged)


def train(config: TrainConfig) -> TwoTower:
    """Train a TwoTower on ``config.pairs`` and save it as a TOWERS dir at ``config.out``.

    Every input is validated before anything is trained. With ``config.resume`` the run continues from the
    newest complete checkpoint in ``out/checkpoints`` with the same weights, optimizer and scheduler state,
    data position and RNG states, so it ends with the weights an uninterrupted run would have.

    Returns:
        The trained model (also saved, with this config in ``twotower.json``).
    """
    from transformers import get_linear_schedule_with_warmup

    device, cols = _device(config.device), (config.query_column, config.positive_column, config.negatives_column)
    amp_dtype = _amp_dtype(config.amp, device)
    pairs = load_pairs(config.pairs, *cols)
    dev = load_pairs(config.dev, *cols) if config.dev else None
    queries, positives = list(pairs["query"]), list(pairs["positive"])
    negatives = [list(n) for n in pairs["negatives"]] if "negatives" in pairs.column_names else None
    fingerprint = pairs_fingerprint(pairs)
    sampler = NoDuplicatesBatchSampler(conflict_keys(queries, positives), config.batch_size, config.seed)
    if len(sampler) == 0:
        raise ValueError(f"{config.pairs}: {len(queries)} rows make no batch of {config.batch_size} pairs with "
                         "distinct queries and positives; lower --batch-size")
    total = config.max_steps or config.epochs * len(sampler)
    out = _prepare_out(config)
    resume_from = ckpt.latest_complete(out / CKPT_DIR) if config.resume else None
    if config.resume and resume_from is None:
        warnings.warn(f"--resume: no complete checkpoint in {out / CKPT_DIR}; starting from step 0", stacklevel=2)
    if resume_from is not None:  # refuse a different run before spending time on building the model
        _check_resumable(config, json.loads((resume_from / "state.json").read_text()), fingerprint, resume_from)

    _seed_all(config.seed)
    model = TwoTower.from_base(config.base, config.shared, config.pooling, config.query_max_length,
                               config.result_max_length, config.proj_dim)
    model.train_config = config.to_dict()  # also tells a shared tower its result max length
    temp = Temperature(config.temperature, config.learn_temperature)
    model.to(device).train()
    temp.to(device)
    if config.gradient_checkpointing:
        for tower in {model.query_tower, model.result_tower}:
            _enable_checkpointing(tower.encoder)
    optimizer = torch.optim.AdamW(_param_groups(model, temp, config), lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    step = 0
    losses: list[float] = []  # loss of each step since the last log record (their mean is logged)
    if resume_from is not None:
        weights, trainer, state = ckpt.load_checkpoint(resume_from)
        _load_weights(model, temp, weights)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        scaler.load_state_dict(trainer["scaler"])
        sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(trainer["rng"], state["rng"])
        step, losses = int(state["step"]), list(state["loss_window"])
    log = _Log(out / LOG_NAME, step if resume_from is not None else None)
    saved_step, evaluated_step, recall = (step if resume_from is not None else -1), -1, None

    def save_checkpoint() -> None:
        rng_tensors, rng_plain = ckpt.rng_state()
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "rng": rng_tensors}
        state = {"sampler": sampler.state_dict(), "rng": rng_plain, "config": config.to_dict(),
                 "data_fingerprint": fingerprint, "loss_window": losses}
        ckpt.save_checkpoint(out / CKPT_DIR, step, _weights(model, temp), trainer, state)
        ckpt.prune(out / CKPT_DIR, config.keep_checkpoints)

    def evaluate() -> float:
        assert dev is not None, "evaluate() needs a dev set"
        value = dev_recall(model, list(dev["query"]), list(dev["positive"]), 10, config.eval_batch_size)
        log.write({"step": step, "dev_recall@10": value})
        tqdm.write(f"step {step}: dev recall@10 = {value:.4f}")
        return value

    if dev is not None and step == 0:
        recall, evaluated_step = evaluate(), 0
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    window_start, window_pairs = time.perf_counter(), 0
    while step < total:
        rows = sampler.next_batch()
        batch = collate(rows, queries, positives, negatives, sampler.epoch, config.negatives_per_query)
        q, p, negs = embed(model, batch, device, amp_dtype)  # (B, d), (B, d), (M, d) | None
        loss = info_nce(q, p, negs, temp(), config.symmetric)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {step + 1}; lower --lr or use --amp bf16/none")
        optimizer_step(loss, params, optimizer, scheduler, scaler, config.max_grad_norm)
        step += 1
        losses.append(loss.item())
        window_pairs += len(rows)
        rate = window_pairs / max(time.perf_counter() - window_start, 1e-9)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", pairs_s=f"{rate:.0f}", refresh=False)
        bar.update()
        if step % config.log_every == 0 or step == total:
            log.write({"step": step, "epoch": sampler.epoch, "loss": float(np.mean(losses)),
                       "lr": scheduler.get_last_lr()[0], "temperature": float(temp().detach()), "pairs_per_s": rate})
            losses, window_start, window_pairs = [], time.perf_counter(), 0
        if dev is not None and config.eval_every and step % config.eval_every == 0:
            recall, evaluated_step = evaluate(), step
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint()
            saved_step = step
    bar.close()
    if dev is not None and evaluated_step != step:
        recall = evaluate()
    if config.checkpoint_every and saved_step != step:
        save_checkpoint()  # a --resume of a finished run then has nothing left to redo
    model.train_config = {**config.to_dict(), "steps": step, "final_temperature": float(temp().detach()),
                          "data_fingerprint": fingerprint, "dev_recall@10": recall}
    model.eval()
    _publish(model, out)
    return model
