"""Towers at inference time: the one adapter every stage encodes through, and faster inference copies.

``TowerEncoder`` puts one tower on the device and precision of the project's single policy
(:mod:`common.device`) and exposes the encoder protocol (``dim``, ``encode(texts, batch_size)``,
``fingerprint()``). Index building, retrieval and eval all use it, so a query encoded by ``search`` and a
document encoded by ``index build`` go through the same code with the same settings.

The copies trade a little accuracy or a dependency for speed: ``cast_copy`` (weights in bf16/fp16),
``int8_copy`` (CPU dynamic quantisation), and ``towers.onnx.onnx_copy`` (the encoder in ONNX Runtime).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower.common.device import autocast_dtype, resolve_device
from twotower.towers.llm import is_decoder_config
from twotower.towers.model import Tower, TwoTower

SIDES = ("query", "result")


class TowerEncoder:
    """Encoder-protocol view of one tower at inference.

    Args:
        tower: the :class:`~towers.model.Tower` (moved to ``device``; put in eval mode).
        device: auto, cpu, cuda or cuda:N (:func:`common.device.resolve_device`).
        precision: auto (bf16/fp16 autocast on a GPU; on the CPU bf16 for a decoder-LLM tower where native, else
            float32), fp32, bf16 or fp16 (:func:`common.device.autocast_dtype`, the rule training follows).
        max_length: token cap per text (default: the tower's own).
        fingerprint: the vector space this encoder produces (default: the tower's weights hash).
        prompt: prepended to every text (default: the tower's own; a shared tower's result side passes its own).
    """

    def __init__(self, tower: Tower, device: str = "auto", precision: str = "auto", max_length: int | None = None,
                 fingerprint: str | None = None, prompt: str | None = None) -> None:
        self.device = resolve_device(device)
        self.tower = tower.to(self.device).eval()
        self.precision = precision
        encoder = getattr(tower, "encoder", None)  # a static tower has none (and nothing to autocast)
        decoder = encoder is not None and is_decoder_config(encoder.config.to_dict())
        self.amp_dtype = autocast_dtype(precision, self.device, decoder=decoder)
        self.max_length = max_length
        self.prompt = prompt
        self.dim = int(tower.dim)
        self._fingerprint = fingerprint

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """texts -> float32 (n, dim), input order kept."""
        return self.tower.encode(list(texts), batch_size, show_progress=show_progress, amp_dtype=self.amp_dtype,
                                 max_length=self.max_length, prompt=self.prompt)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.tower.fingerprint()  # hashed once, not per chunk
        return self._fingerprint


def tower_encoder(two_tower: TwoTower, side: str = "result", device: str = "auto",
                  precision: str = "auto", max_length: int | None = None) -> TowerEncoder:
    """The query or result side of ``two_tower`` as an encoder, with that side's prompt and its *inference*
    length (``TwoTower.inference_max_length``: recorded in twotower.json, by default the base's max, which
    can be longer than the lengths the towers were trained at); both report the pair's fingerprint (the
    result tower's weights), which is what an index records.

    Args:
        max_length: tokens per text instead of the recorded inference length (the verbs' override options).
    """
    if side not in SIDES:
        raise ValueError(f"unknown tower side '{side}': choose {', '.join(SIDES)}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max length must be >= 1 token, got {max_length}")
    length = max_length or two_tower.inference_max_length(side)
    if side == "result":
        return TowerEncoder(two_tower.result_tower, device, precision, length, two_tower.fingerprint(),
                            two_tower.result_prompt)
    return TowerEncoder(two_tower.query_tower, device, precision, length, two_tower.fingerprint(),
                        two_tower.query_prompt)


def result_encoder(two_tower: TwoTower, device: str = "auto", precision: str = "auto",
                   max_length: int | None = None) -> TowerEncoder:
    """The encoder to index a corpus with: the result tower of ``two_tower`` (``max_length``: override)."""
    return tower_encoder(two_tower, "result", device, precision, max_length)


def query_encoder(two_tower: TwoTower, device: str = "auto", precision: str = "auto",
                  max_length: int | None = None) -> TowerEncoder:
    """The encoder for queries: the query tower of ``two_tower`` (``max_length``: override)."""
    return tower_encoder(two_tower, "query", device, precision, max_length)


def int8_copy(tower: Tower) -> Tower:
    """A CPU copy with int8 dynamic quantisation of every Linear layer (inference only).

    Weights are stored int8 and activations quantised on the fly; see BENCHMARKS.md for the speed-up and
    the cosine error it costs on this machine.
    """
    from torch.ao.quantization import quantize_dynamic  # deprecated module: imported only when asked for

    clone = copy.deepcopy(tower).cpu().eval()
    return quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)


def cast_copy(tower: Tower, dtype: torch.dtype) -> Tower:
    """An inference copy with every weight in ``dtype`` (``torch.bfloat16`` on CPUs with AVX512-BF16 or
    AMX, ``torch.float16``/``torch.bfloat16`` on GPUs), on the tower's device.

    Faster than ``encode(amp_dtype=...)``: autocast keeps layer norms, residual adds and softmax in
    float32 and casts activations back and forth around every matmul, a cast of pure bf16 weights does
    not. Pooling, the projection and the L2 norm stay in float32 (a bf16 norm is only unit to ~4e-3).
    The cost is a little accuracy (MiniLM on code, bf16: max |cos - 1| ~7e-5 vs float32, against ~3e-5
    with autocast); see BENCHMARKS.md.
    """
    clone: Any = copy.deepcopy(tower).to(dtype).eval()
    if clone.proj is not None:
        clone.proj.float()
    return clone
