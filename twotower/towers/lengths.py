"""Token budgets of a training run: ``--*-max-length auto`` and the inference lengths' default.

Training lengths make training cheap; inference lengths decide what the index holds. They are separate on
purpose: towers trained at 32/64 tokens and used at 64/256 were better on unseen code than at 32/64 (issue 15's
measurement; docs/train.md has the table), and a user cannot see that without building an eval suite.
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

AUTO_SAMPLE = 1000  # texts tokenised to measure an auto length: the 95th percentile is stable to a token or two
AUTO_PERCENTILE = 95
# A base that declares no sentence-transformers max_seq_length (decoder LLMs: 8k tokens and more) is used at
# inference with at most this many tokens: longer costs quadratic attention for texts that rarely need it.
DEFAULT_INFERENCE_CAP = 512
MIN_AUTO_LENGTH = 8  # room for the special tokens and a few words


def base_max_length(base_dir: str | Path, tokenizer: Any) -> int:
    """The longest input the base is meant for: sentence-transformers' ``max_seq_length`` when the base dir has
    ``sentence_bert_config.json`` (256 for all-MiniLM-L6-v2), else the tokenizer's / the model's position limit,
    at most :data:`DEFAULT_INFERENCE_CAP`."""
    st = Path(base_dir) / "sentence_bert_config.json"
    if st.is_file():
        value = json.loads(st.read_text()).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limits = [DEFAULT_INFERENCE_CAP]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 10**8:  # transformers' "no limit" is ~1e30
        limits.append(model_max)
    config = Path(base_dir) / "config.json"
    if config.is_file():
        positions = json.loads(config.read_text()).get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
    return min(limits)


def auto_max_length(tokenizer: Any, texts: Sequence[str], cap: int, seed: int = 0, prompt: str = "",
                    sample: int = AUTO_SAMPLE) -> tuple[int, dict[str, Any]]:
    """The 95th percentile of the token counts (prompt and special tokens included) of up to ``sample`` texts
    drawn with ``seed``, capped by ``cap``.

    Returns:
        (length, details for twotower.json and the printed line: percentile, cap, sample size, longest).
    """
    rows = list(range(len(texts)))
    if len(rows) > sample:
        rows = sorted(random.Random(seed).sample(rows, sample))
    counts = [len(ids) for ids in tokenizer([prompt + texts[i] for i in rows], truncation=False)["input_ids"]]
    p95 = int(np.ceil(np.percentile(counts, AUTO_PERCENTILE))) if counts else MIN_AUTO_LENGTH
    length = max(MIN_AUTO_LENGTH, min(p95, cap))
    return length, {"length": length, f"p{AUTO_PERCENTILE}": p95, "cap": cap, "sample": len(rows),
                    "longest": max(counts, default=0)}


def resolve_lengths(config: Any, queries: Sequence[str], positives: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """``config`` (a ``TrainConfig``) with ``auto`` training lengths measured on the pairs and unset inference
    lengths set to the base's max (at least the training length).

    Returns:
        (the resolved config, what was measured: ``{"query": {...}, "result": {...}, "base_max_length": N}``).
    """
    from transformers import AutoTokenizer

    from twotower.towers.bases import resolve_base
    from twotower.towers.config import AUTO

    base_dir = resolve_base(config.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    cap = base_max_length(base_dir, tokenizer)
    info: dict[str, Any] = {"base_max_length": cap}
    values: dict[str, int] = {}
    for side, texts, prompt in (("query", queries, config.query_prompt), ("result", positives, config.result_prompt)):
        length = getattr(config, f"{side}_max_length")
        if length == AUTO:
            length, info[side] = auto_max_length(tokenizer, texts, cap, config.seed, prompt)
        values[f"{side}_max_length"] = length
        inference = getattr(config, f"inference_{side}_max_length")
        values[f"inference_{side}_max_length"] = inference or max(cap, length)
    return dataclasses.replace(config, **values), info


def describe_auto(side: str, details: dict[str, Any]) -> str:
    """The printed line of an auto length."""
    return (f"--{side}-max-length auto: {details['length']} tokens (95th percentile of {details['sample']} "
            f"sampled {side} texts: {details['p95']}, longest {details['longest']}; cap {details['cap']})")
