"""Where converted models, downloads, built suites and embedding caches live."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TWOTOWER_CACHE``, or ``~/.cache/twotower``."""
    return Path(os.environ.get("TWOTOWER_CACHE", Path.home() / ".cache" / "twotower"))
