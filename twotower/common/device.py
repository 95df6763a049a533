"""The one device and precision policy: which device a model runs on, and which autocast dtype it uses.

Training, index building, retrieval and eval all call these two functions, so a GPU without bf16 gets fp16
everywhere (not bf16 in one verb and fp16 in another), a decoder LLM gets bf16 on a CPU with native bf16 in
every verb, and ``--device`` is parsed one way. torch is imported
inside the functions: the CLI validates ``--device``/``--precision`` with :func:`check_device` and
:func:`check_precision` before any heavy import, and ``--help`` stays fast.
"""
from __future__ import annotations

import os
from typing import Any

DEVICES = ("auto", "cpu", "cuda")  # plus cuda:N
# auto: bf16 on a CUDA GPU that has it, fp16 on one that does not; on the CPU bf16 for a decoder LLM where native,
# else full precision.
# none is the same as fp32 (the spelling `twotower train --amp` has always used).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "none")


def check_device(name: str) -> str:
    """``name`` if it is auto, cpu, cuda or cuda:N (no torch import), else a ValueError naming the choices."""
    if name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"unknown device '{name}': choose {', '.join(DEVICES)} or cuda:N")


def check_precision(precision: str, choices: tuple[str, ...] = PRECISIONS) -> str:
    if precision not in choices:
        raise ValueError(f"unknown precision '{precision}': choose {', '.join(choices)}")
    return precision


def resolve_device(name: str) -> Any:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cpu``, ``cuda``, ``cuda:N`` as given.

    Under torchrun (WORLD_SIZE > 1) a bare ``cuda`` becomes ``cuda:LOCAL_RANK``: one GPU per process.

    Returns:
        a ``torch.device``.

    Raises:
        ValueError: an unknown name, or a CUDA device asked for where torch sees none.
    """
    import torch

    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def autocast_dtype(precision: str, device: Any, decoder: bool = False) -> Any:
    """The ``torch.autocast`` dtype for ``precision`` on ``device``, or None for full precision: the one rule
    that train, index, bench and demo all follow.

    Args:
        precision: auto, fp32/none (None), bf16, fp16. auto = bf16 on a CUDA GPU that supports it, fp16 on one
            that does not; on the CPU, bf16 for a decoder LLM where the CPU computes bf16 natively (its matmuls
            dominate: SmolLM2 on 2 AVX512-BF16 cores trains 1.5x and encodes 1.7-1.9x faster, cosine >= 0.9988
            to float32; docs/speed.md), else full precision (small encoders like MiniLM gain nothing).
        device: a ``torch.device`` or its name.
        decoder: the model is a decoder LLM (SmolLM2 and up).
    """
    import torch

    check_precision(precision)
    device_type = torch.device(device).type
    if precision == "auto":
        if device_type != "cuda":
            return torch.bfloat16 if decoder and cpu_has_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX-BF16, Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:  # not Linux: assume not (float32 is always right, only slower)
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_of(dtype: Any) -> str:
    """The precision name (fp32, bf16, fp16) of an autocast dtype (None = full precision)."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
