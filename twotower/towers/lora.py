"""LoRA on the towers' encoders (Hu et al. 2021; Tevatron ``--lora``), through ``peft`` (extra ``.[llm]``).

Each tower's encoder gets its own low-rank adapters (a shared tower one set); the base weights are frozen, the
projection (when there is one) trains in full. A TOWERS dir never holds an adapter: ``Tower.save`` writes the
merged weights (W + B A, ``merge_and_unload``), so ``AutoModel`` and ``SentenceTransformer`` load it as any
other model dir, with no ``peft`` installed. Checkpoints keep the adapted state as is (exact resume).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from twotower.towers.model import TwoTower

# peft's own keyword: every linear layer of the transformer (not an LM head; towers have none).
ALL_LINEAR = "all-linear"


def is_lora(encoder: nn.Module) -> bool:
    """True for an encoder wrapped by ``peft`` (it carries a ``peft_config``)."""
    return getattr(encoder, "peft_config", None) is not None


def plain_encoder(encoder: nn.Module) -> nn.Module:
    """The encoder with its adapters merged in, as a plain transformers model (a merged copy: the adapted
    encoder keeps training); a plain encoder is returned as is."""
    if not is_lora(encoder):
        return encoder
    return copy.deepcopy(encoder).merge_and_unload()


def parse_targets(targets: str) -> str | list[str]:
    """``all-linear`` or a comma list of module names (``q_proj,v_proj``) -> peft's ``target_modules``."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError("--lora-targets is empty: give all-linear or module names such as q_proj,v_proj")
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def apply_lora(model: TwoTower, r: int, alpha: float, targets: str, dropout: float = 0.0) -> None:
    """Wrap each distinct tower encoder of ``model`` with LoRA adapters of rank ``r`` (in place).

    Raises:
        ImportError: peft is not installed.
        ValueError: no module of the encoder matches ``targets``.
    """
    try:
        from peft import LoraConfig, get_peft_model  # optional extra `.[llm]`: only LoRA runs need it
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'twotower[llm]' (or pip install peft)") from None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=parse_targets(targets),
                        bias="none")
    towers = [model.query_tower] if model.shared else [model.query_tower, model.result_tower]
    for tower in towers:
        try:
            tower.encoder = get_peft_model(tower.encoder, config)
        except ValueError as exc:  # peft names the modules it could not find
            raise ValueError(f"--lora-targets {targets!r}: {exc}") from None


def merge_lora(model: TwoTower) -> None:
    """Merge every tower's adapters into its weights, in place (after training: the towers are plain again)."""
    for tower in {id(t): t for t in (model.query_tower, model.result_tower)}.values():
        if is_lora(getattr(tower, "encoder", None)):  # a static tower has no encoder (and no adapters)
            tower.encoder = tower.encoder.merge_and_unload()

