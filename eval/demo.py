"""The main job: build a suite, train towers from MiniLM, index the corpus, benchmark against the baselines.

Every step is cached so a rerun is quick: the suite build is skipped when built alike, training when the
TOWERS dir is complete with the same settings (an interrupted run resumes from its last checkpoint), the
index when it matches the towers' fingerprint, and the raw LLM's embeddings come from the on-disk cache.

Profiles: ``cpu-small`` fits 20 minutes on 2 CPU cores (SmolLM2 encodes ~2-3 docs/s there, which sizes
the corpus); ``full`` runs the whole suite (meant for a GPU).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from towers.cliargs import field

SUITE_NAMES = ("codesearch-py", "nq")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and training settings of one demo profile."""

    max_queries: int | None  # test queries kept (None = all)
    max_corpus: int | None  # test corpus docs kept (all relevant docs of kept queries stay)
    dev_size: int | None  # dev pairs for dev recall@10 before/after training (None = all)
    max_steps: int  # training steps (0 = one epoch)
    batch_size: int
    lr: float
    temperature: float
    query_max_length: int  # for the towers and every baseline
    doc_max_length: int  # for the towers and every baseline
    eval_every: int


PROFILES: dict[str, Profile] = {
    "cpu-small": Profile(max_queries=500, max_corpus=1500, dev_size=300, max_steps=100, batch_size=32, lr=1e-4,
                         temperature=0.05, query_max_length=32, doc_max_length=64, eval_every=0),
    "full": Profile(max_queries=None, max_corpus=None, dev_size=None, max_steps=0, batch_size=64, lr=5e-5,
                    temperature=0.05, query_max_length=64, doc_max_length=256, eval_every=500),
}


@dataclasses.dataclass
class DemoConfig:
    """Options of ``twotower demo`` (the CLI is generated from these fields)."""

    suite: str = field("codesearch-py", "suite to build and benchmark", choices=list(SUITE_NAMES))
    profile: str = field("cpu-small", "cpu-small (fits 20 min on 2 CPU cores) or full (whole suite, for a GPU)",
                         choices=list(PROFILES))
    workdir: str = field("runs/demo", "where the suite, towers, index and report go (one subdir per suite+profile)")
    device: str = field("auto", "auto | cpu | cuda", choices=["auto", "cpu", "cuda"])
    max_steps: int | None = field(None, "override the profile's training steps")
    raw_llm: str = field("smollm2", "the raw decoder LLM baseline: smollm2, gemma3 or a causal-LM dir")


def _dev_subset(dev: Path, n: int | None, out: Path) -> Path:
    """The first ``n`` dev pairs (dev recall is measured twice; all 1000 would cost a minute on CPU)."""
    if n is None:
        return dev
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    data = "".join(lines).encode()
    if not out.exists() or out.read_bytes() != data:
        from towers.atomic import write_bytes_atomic

        write_bytes_atomic(out, data)
    return out


def _train_towers(cfg: Any, out: Path) -> str:
    """Train unless ``out`` holds towers trained with the same settings; returns what happened."""
    from towers import checkpoint as ckpt
    from towers.model import read_towers_meta
    from towers.train import train

    if (out / "twotower.json").exists():
        mismatches = cfg.resume_mismatches(read_towers_meta(out).get("train_config") or {})
        if not mismatches:
            return "cached"
        print("demo: towers settings changed, retraining:\n  " + "\n  ".join(mismatches), file=sys.stderr)
        cfg = dataclasses.replace(cfg, overwrite=True)
    elif out.is_dir() and any(out.iterdir()):
        latest = ckpt.latest_complete(out / "checkpoints")
        saved = json.loads((latest / "state.json").read_text())["config"] if latest else None
        if saved is not None and not cfg.resume_mismatches(saved):
            cfg = dataclasses.replace(cfg, resume=True)  # an interrupted demo picks up where it stopped
        else:
            why = "settings changed" if saved is not None else "no complete checkpoint"
            print(f"demo: {out} holds an unfinished run ({why}); starting over", file=sys.stderr)
            cfg = dataclasses.replace(cfg, overwrite=True)
    train(cfg)
    return "resumed" if cfg.resume else "trained"


def _build_index(towers_dir: Path, corpus: Path, out: Path, batch_size: int, device: str) -> str:
    from index.build import IndexBuildConfig, build_index, result_encoder
    from towers.model import TwoTower, read_towers_meta

    manifest = out / "manifest.json"
    fingerprint = read_towers_meta(towers_dir)["fingerprint"]
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return "cached"
    encoder = result_encoder(TwoTower.load(towers_dir), device=device)
    build_index(encoder, corpus, out, IndexBuildConfig(batch_size=batch_size, overwrite=True, device=device),
                towers_dir=towers_dir)
    return "built"


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Suite -> towers -> index -> bench -> report; prints the table. Returns the bench results."""
    from eval.bench import run_bench
    from eval.report import format_table
    from eval.suites.build import build_suite
    from eval.systems import resolve_device
    from towers.train import TrainConfig

    if config.suite not in SUITE_NAMES:
        raise ValueError(f"unknown suite '{config.suite}': choose {', '.join(SUITE_NAMES)}")
    if config.profile not in PROFILES:
        raise ValueError(f"unknown profile '{config.profile}': choose {', '.join(PROFILES)}")
    prof = PROFILES[config.profile]
    device = resolve_device(config.device)
    work = Path(config.workdir) / f"{config.suite}-{config.profile}"
    steps: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()

    def step(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        print(f"demo [{name}] ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        steps[name] = {"seconds": round(time.perf_counter() - t0, 1),
                       "status": result if isinstance(result, str) else "done"}
        print(f"demo [{name}] {steps[name]['status']} in {steps[name]['seconds']} s", file=sys.stderr, flush=True)
        return result

    suite_dir = step("suite", build_suite, config.suite, work / config.suite, prof.max_queries, prof.max_corpus)
    dev = _dev_subset(Path(suite_dir) / "dev.jsonl", prof.dev_size, work / "dev-subset.jsonl")
    towers_dir = work / "towers"
    train_cfg = TrainConfig(
        pairs=str(Path(suite_dir) / "train.jsonl"), out=str(towers_dir), base="minilm", dev=str(dev),
        max_steps=config.max_steps if config.max_steps is not None else prof.max_steps, epochs=1,
        batch_size=prof.batch_size, lr=prof.lr, temperature=prof.temperature,
        query_max_length=prof.query_max_length, result_max_length=prof.doc_max_length,
        eval_every=prof.eval_every, checkpoint_every=100, device=device, seed=42)
    step("train", _train_towers, train_cfg, towers_dir)
    step("index", _build_index, towers_dir, Path(suite_dir) / "corpus.jsonl", work / "index", 64, device)
    systems = f"towers={towers_dir},raw-llm={config.raw_llm},minilm,bm25"
    extra = {"demo": {"suite": config.suite, "profile": config.profile, "profile_settings": dataclasses.asdict(prof),
                      "steps": steps, "towers": str(towers_dir), "index": str(work / "index")}}
    results = step("bench", run_bench, suite_dir, systems, work / "report", 100, 64, device, None, None,
                   query_max_length=prof.query_max_length, doc_max_length=prof.doc_max_length, extra=extra)
    total = round(time.perf_counter() - t_all, 1)
    print(f"\n{format_table(results)}\n")
    print("steps: " + ", ".join(f"{k} {v['seconds']} s ({v['status']})" for k, v in steps.items())
          + f"; total {total} s")
    print(f"report: {work / 'report' / 'report.md'}")
    print(f"search it: twotower search --index {work / 'index'} \"your query\" -k 5")
    return results
