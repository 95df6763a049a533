"""Where and with what a measurement ran: CPU model and flags, cores, load average, torch threads, GPU, and
the versions of the libraries in use. Benchmarks (``scripts/``) and eval reports write these next to every
figure, so a number can be read against the machine and the load it was measured under.
"""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VERSION_PACKAGES = ("torch", "transformers", "sentence_transformers", "faiss", "numpy", "tokenizers")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: platform's answer is the best there is
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str] = ("avx512f", "avx512_bf16", "amx_bf16", "avx2")) -> list[str]:
    """Which of ``wanted`` the CPU advertises (the kernels torch and faiss can use)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def versions(packages: Sequence[str] = VERSION_PACKAGES) -> dict[str, str]:
    """``{package: version}`` of the packages that are already imported (importing one just to report it
    would slow every caller down), and Python's."""
    out = {"python": platform.python_version()}
    for name in packages:
        module = sys.modules.get(name)
        if module is not None:
            out[name] = str(getattr(module, "__version__", "?"))
    return out


def machine(device: str = "cpu") -> dict[str, Any]:
    """Machine facts: CPU model, cores, CPU flags, 1-minute load average, torch threads and the GPU's name
    (the last two only when torch is already imported)."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
                            "load_avg_1m": round(os.getloadavg()[0], 2)}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info
