"""The training recipe a base gets by default: what the demo proves for a decoder LLM, sbert's for an encoder.

A decoder-LLM base (SmolLM2, Gemma, any causal-LM dir) trained like a small encoder learns slowly (lr 2e-5) and
in float32 on a CPU; the demo's towers-smollm2 recipe is lr 1e-4, bf16 where the CPU has it natively, last-token
pooling over an appended EOS, and an e5-style query instruction. ``resolve_recipe`` fills every option the user
left unset from the base's recipe (values the user gives always win) and says where each value came from;
``train`` prints that and records it in twotower.json (``train_config.recipe``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twotower.common.device import autocast_dtype, precision_of
from twotower.towers.config import RECIPE_FIELDS, TrainConfig
from twotower.towers.llm import is_decoder_dir

# A query instruction for any task (e5-mistral's format); a suite's own instruction does better (the demo's).
GENERIC_QUERY_PROMPT = "Instruct: Given a search query, retrieve relevant passages that answer it\nQuery: "


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults of one kind of base (a field left unset by the user takes the value here)."""

    name: str
    lr: float
    query_prompt: str


DECODER = Recipe("decoder-llm", lr=1e-4, query_prompt=GENERIC_QUERY_PROMPT)  # the demo's towers-smollm2 recipe
ENCODER = Recipe("encoder", lr=2e-5, query_prompt="")  # sentence-transformers' fine-tuning default


def resolve_recipe(config: TrainConfig, base_dir: str | Path, device: Any) -> tuple[TrainConfig, dict[str, Any]]:
    """``config`` with every recipe field the user left unset filled in, and the recipe in force.

    Args:
        config: the run's options (``lr``/``query_prompt`` None = unset).
        base_dir: the resolved base model dir (its config.json says whether it is a decoder LLM).
        device: the training device (the precision rule depends on it).

    Returns:
        (resolved config, recipe record): the record names the recipe, and per setting its value and whether
        the user gave it or the recipe did (``pooling`` and ``append_eos`` resolve in ``TwoTower.from_base``).
    """
    decoder = is_decoder_dir(base_dir)
    recipe = DECODER if decoder else ENCODER
    given = {name: getattr(config, name) is not None for name in RECIPE_FIELDS}
    config = dataclasses.replace(config, **{name: getattr(recipe, name) for name in RECIPE_FIELDS if not given[name]})
    pooling = config.pooling or ("last" if decoder else "mean")
    record = {
        "recipe": recipe.name,
        "lr": {"value": config.lr, "from": "user" if given["lr"] else "recipe"},
        "query_prompt": {"value": config.query_prompt, "from": "user" if given["query_prompt"] else "recipe"},
        "precision": {"value": precision_of(autocast_dtype(config.amp, device, decoder=decoder)),
                      "from": "user" if config.amp != "auto" else "auto rule (common.device)"},
        "pooling": {"value": pooling, "from": "user" if config.pooling else "base"},
        "append_eos": {"value": pooling == "last" if config.append_eos is None else config.append_eos,
                       "from": "user" if config.append_eos is not None else "base"},
    }
    return config, record


def describe_recipe(base: str, record: dict[str, Any]) -> str:
    """One line for the log: ``recipe decoder-llm for smollm2: lr 0.0001 (recipe), precision bf16 (auto ...)``."""
    parts = []
    for key in ("lr", "precision", "pooling", "append_eos", "query_prompt"):
        value = record[key]["value"]
        shown = repr(value) if key == "query_prompt" else f"{value:g}" if key == "lr" else str(value)
        parts.append(f"{key.replace('_', ' ')} {shown} ({record[key]['from']})")
    return f"recipe {record['recipe']} for base {base}: " + ", ".join(parts)
