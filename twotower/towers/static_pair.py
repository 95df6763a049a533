"""The asymmetric pair of ``twotower train --query-tower static``: a static query tower and a transformer result
tower, built either from existing TOWERS (result tower frozen) or from the base (both trained jointly).

Frozen (``--result-tower-from TOWERS``): the result tower is the given towers' own, unchanged, so an index
built with them stays valid (same fingerprint); the static tower is distilled from their query tower, which
already lives in the result tower's space. Joint: both start from ``--base``; the static tower is
distilled from the base itself.
"""
from __future__ import annotations

from pathlib import Path

from twotower.towers.bases import resolve_base
from twotower.towers.config import TrainConfig
from twotower.towers.llm import default_pooling
from twotower.towers.model import Tower, TwoTower, read_towers_meta
from twotower.towers.static import StaticTower, distill, is_static_dir


def check_static_options(config: TrainConfig) -> None:
    """(Before any model loads.) ``--result-tower-from`` is a TOWERS dir whose query tower a static tower of
    the result tower's width can come from.

    Raises:
        FileNotFoundError / ValueError: one line naming the option and what was expected.
    """
    if not config.result_tower_from:
        return
    meta = read_towers_meta(config.result_tower_from)  # no twotower.json: one line naming the dir
    source = Path(config.result_tower_from) / "query_tower"
    if is_static_dir(source):
        return  # a static tower already: it is trained on as is (TwoTower.load checks its width)
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(source).hidden_size
    if hidden != meta.get("dim"):
        raise ValueError(f"--result-tower-from {config.result_tower_from}: its result tower has {meta.get('dim')} "
                         f"dims but its query tower's encoder {hidden}, and a static tower distilled from it has "
                         "no projection; use towers trained without --proj-dim")


def build_static_pair(config: TrainConfig, device: str = "cpu") -> TwoTower:
    """The untrained pair: distilled static query tower + result tower (frozen or trainable, see the module)."""
    if config.result_tower_from:
        src = TwoTower.load(config.result_tower_from)
        source = Path(config.result_tower_from) / "query_tower"
        prompt = config.query_prompt or src.query_prompt
        if isinstance(src.query_tower, StaticTower):
            query = src.query_tower
            query.max_length, query.prompt = int(config.query_max_length), prompt
        else:
            query = distill(source, src.result_tower.dim, int(config.query_max_length), prompt, device)
        model = TwoTower(query, src.result_tower, base=src.base, result_prompt=src.result_prompt,
                         freeze_result=True)
        model.inference_max_lengths = {"query": config.inference_query_max_length or src.inference_max_length("query"),
                                       "result": src.inference_max_length("result")}
        return model
    path = resolve_base(config.base)
    pooling = config.pooling or default_pooling(path)
    eos = pooling == "last" if config.append_eos is None else config.append_eos
    result = Tower.from_base(path, pooling, int(config.result_max_length), None, True, config.result_prompt, eos)
    query = distill(path, result.dim, int(config.query_max_length), config.query_prompt, device)
    return TwoTower(query, result, base=config.base)
