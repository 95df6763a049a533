"""What a training run writes to ``--out``: checkpoints that a crash (or SIGKILL) at any moment can never leave
looking complete, ``train_log.jsonl``, and the final TOWERS files.

Layout of ``<out>/checkpoints/step-N/``::

    model.safetensors   trainable weights (towers + temperature)
    trainer.pt          optimizer, LR scheduler, GradScaler and torch RNG states (tensors and numbers only;
                        read back with ``torch.load(weights_only=True)``); under DDP also every rank's RNG
    state.json          step, sampler position, numpy / python RNG states (per rank under DDP), config,
                        data fingerprint
    COMPLETE.json       written last: sha256 of every file above

The directory is built under a temp name and renamed into place (``common.atomic.atomic_dir``); on top of
that, a checkpoint only counts when ``COMPLETE.json`` exists and every checksum matches, so a half-copied
or truncated one is skipped rather than resumed from. Only rank 0 of a data-parallel run calls the writers.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from twotower.common.atomic import MACHINE_ERRNOS, atomic_dir, write_bytes_atomic
from twotower.common.hashing import file_sha256
from twotower.common.jsonl import dumps_strict

if TYPE_CHECKING:
    from twotower.towers.loss import Temperature
    from twotower.towers.model import TwoTower

MARKER = "COMPLETE.json"
LOG_NAME = "train_log.jsonl"
CKPT_DIR = "checkpoints"
# The TOWERS files (towers, metadata, the sentence-transformers Router files at the top) and the run's own.
TOWERS_FILES = ("query_tower", "result_tower", "modules.json", "router_config.json",
                "config_sentence_transformers.json", "twotower.json")
RUN_FILES = (*TOWERS_FILES, CKPT_DIR, LOG_NAME)
DRY_SAVE_PREFIX = ".dry-save-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(root: str | Path, step: int, weights: dict[str, torch.Tensor], trainer: dict[str, Any],
                    state: dict[str, Any]) -> Path:
    """Write ``root/step-<step>`` atomically, completion marker last. Returns its path."""
    dest = Path(root) / f"step-{step}"
    with atomic_dir(dest) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        torch.save(trainer, tmp / "trainer.pt")
        state_text = dumps_strict({"step": step, **state}, indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(tmp / "state.json", state_text.encode())
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        marker = json.dumps({"step": step, "sha256": files}, indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(tmp / MARKER, marker.encode())
    return dest


def check_complete(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else why it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER}"
    try:
        files = json.loads(marker.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"unreadable {MARKER} ({exc})"
    for name in ("model.safetensors", "trainer.pt", "state.json"):
        if name not in files:
            return f"{MARKER} does not list {name}"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if file_sha256(path / name) != digest:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step-N`` dir under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are reported and skipped, never resumed from."""
    for step, path in reversed(list_checkpoints(root)):
        reason = check_complete(path)
        if reason is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=2)
    return None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                                              dict[str, Any]]:
    """(weights, trainer state, state.json) of a complete checkpoint."""
    reason = check_complete(path)
    if reason is not None:
        raise ValueError(f"checkpoint {path} is incomplete: {reason}")
    weights = load_file(path / "model.safetensors", device=str(device))
    trainer = torch.load(path / "trainer.pt", map_location=device, weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return weights, trainer, state


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and leftovers of interrupted writes or deletes)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():  # temp dirs of a write or a delete that a crash interrupted
        if p.name.startswith((".step-",)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep <= 0:
        return
    for _, path in list_checkpoints(root)[:-keep]:
        # Rename first: a kill during rmtree leaves a dot-dir that is cleaned next time, never a
        # half-deleted step-N that looks like a checkpoint.
        trash = path.with_name(f".{path.name}.deleting")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


# ---- RNG states ---------------------------------------------------------------------------------------
def rng_state(device: torch.device | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part for trainer.pt, JSON part for state.json) of the torch / CUDA / numpy / python RNGs.

    With a CUDA ``device`` only that GPU's generator is saved (a DDP rank must not touch the others' GPUs);
    without one, every visible GPU's.
    """
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    elif device is None and torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {"numpy": [name, keys.tolist(), pos, has_gauss, cached], "python": [version, list(internal), gauss]}
    return tensors, plain


def set_rng_state(tensors: dict[str, Any], plain: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(tensors["torch"].cpu())
    if "cuda" in tensors and torch.cuda.is_available():
        if isinstance(tensors["cuda"], torch.Tensor):  # one device's generator (see rng_state)
            if device is not None and device.type == "cuda":
                torch.cuda.set_rng_state(tensors["cuda"].cpu(), device)
        else:
            torch.cuda.set_rng_state_all([t.cpu() for t in tensors["cuda"]])
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- model weights -------------------------------------------------------------------------------------
def model_weights(model: TwoTower, temp: Temperature) -> dict[str, torch.Tensor]:
    """Trainable state for a checkpoint (a shared tower once: safetensors refuses aliased tensors)."""
    out = {f"query_tower.{k}": v for k, v in model.query_tower.state_dict().items()}
    if not model.shared:
        out.update({f"result_tower.{k}": v for k, v in model.result_tower.state_dict().items()})
    out["temperature.log_t"] = temp.log_t.detach()
    return out


def load_model_weights(model: TwoTower, temp: Temperature, weights: dict[str, torch.Tensor]) -> None:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    model.query_tower.load_state_dict(part("query_tower."))
    if not model.shared:
        model.result_tower.load_state_dict(part("result_tower."))
    with torch.no_grad():
        temp.log_t.copy_(weights["temperature.log_t"])


# ---- the run directory ---------------------------------------------------------------------------------
def prepare_out(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create ``out``; one that holds a run needs ``resume`` (kept) or ``overwrite`` (its run files deleted)."""
    out = Path(out)
    existing = [n for n in RUN_FILES if (out / n).exists()]
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(f"--out '{out}' already holds a training run ({', '.join(existing)}); pass --resume "
                                  "to continue it, --overwrite to start over, or choose another --out")
        for name in existing:
            (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
    out.mkdir(parents=True, exist_ok=True)
    return out


class TrainLog:
    """Append-only ``train_log.jsonl``; on resume, records past the checkpoint's step are dropped.

    ``enabled=False`` (DDP ranks other than 0) makes it a no-op that never touches the file.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
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
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(dumps_strict(record) + "\n")  # a diverged loss is null, not NaN


def dry_save(model: TwoTower, out: Path, base: str) -> None:
    """Save the freshly built towers into a temp dir under ``out``, then delete it: a run whose towers cannot be
    saved (a base whose config says it is quantised, a full disk, an unwritable ``out``) fails before its first
    step rather than after its last.

    Raises:
        ValueError: the towers did not save (the message names the base and the cause).
    """
    for leftover in out.glob(DRY_SAVE_PREFIX + "*"):  # from a dry save that a kill interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=DRY_SAVE_PREFIX, dir=out))
    try:
        model.save(tmp / "towers")
    except OSError as exc:
        if exc.errno in MACHINE_ERRNOS:  # the disk, not the base: one line naming the path and the error
            raise
        raise ValueError(f"--base {base}: the towers built on it cannot be saved, so nothing was trained "
                         f"({type(exc).__name__}: {exc})") from exc
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"--base {base}: the towers built on it cannot be saved, so nothing was trained "
                         f"({type(exc).__name__}: {exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_towers(model: TwoTower, out: Path) -> None:
    """Put the TOWERS files into ``out`` next to checkpoints/ and the log; ``twotower.json`` goes last, so
    ``out`` is never a loadable TOWERS dir with half its files."""
    staged = out / ".towers-final"
    for leftover in out.glob("*.towers-final*"):  # from a publish that a kill interrupted
        shutil.rmtree(leftover)
    model.save(staged)  # atomic: complete or absent
    (out / "twotower.json").unlink(missing_ok=True)
    for name in TOWERS_FILES[:-1]:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        if (staged / name).exists():
            os.replace(staged / name, out / name)
    os.replace(staged / "twotower.json", out / "twotower.json")
    shutil.rmtree(staged)
