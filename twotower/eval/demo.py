"""The main job: build a suite, train towers from MiniLM and from the raw LLM (SmolLM2), index the corpus,
benchmark against the baselines, and say what the results answer.

Per suite: MiniLM towers (``towers-minilm``) and SmolLM2 fine-tuned as two towers on the same pairs
(``towers-smollm2``: EOS + last-token pooling, an e5-style query instruction, bf16 where the hardware has it),
a static query tower trained against the MiniLM result tower, frozen (``towers-static-query``: near-free
query encoding; docs/static.md),
next to the raw SmolLM2 rows, the untrained MiniLM and BM25. ``--suite all`` runs every suite and writes one
combined report whose section "What this answers" (``eval.answers``) reads the gains off the tables.

Every step is cached so a rerun is quick: the suite build is skipped when built alike, training when the
TOWERS dir is complete with the same settings (an interrupted run resumes from its last checkpoint), the
index when it matches the towers' fingerprint, and the raw LLM's embeddings come from the on-disk cache.

Profiles: ``cpu-small`` fits 20 minutes on 2 quiet CPU cores (docs/bench.md has the measured budget); ``full``
runs the whole suite (meant for a GPU).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from twotower.common.atomic import atomic_dir, write_bytes_atomic
from twotower.common.device import autocast_dtype, precision_of, resolve_device
from twotower.common.outputs import DEMO_MARKER, check_out_dir, mark_work_dir
from twotower.eval.answers import render as render_answers
from twotower.eval.bench import run_bench
from twotower.eval.config import DEMO_SUITES, LLM_QUERY_PROMPTS, PROFILES, BenchConfig, DemoConfig, Profile
from twotower.eval.report import format_significance, format_table
from twotower.eval.suites.build import build_suite
from twotower.index.build import build_index
from twotower.index.config import EncodeConfig, IndexBuildConfig
from twotower.towers import checkpoint as ckpt
from twotower.towers.inference import result_encoder
from twotower.towers.model import TwoTower, read_towers_meta
from twotower.towers.reranker_config import RerankerTrainConfig
from twotower.towers.train import TrainConfig, train


def _dev_subset(dev: Path, n: int | None, out: Path) -> Path:
    """The first ``n`` dev pairs (dev recall is measured twice; all 1000 would cost a minute on CPU)."""
    if n is None:
        return dev
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    data = "".join(lines).encode()
    if not out.exists() or out.read_bytes() != data:
        write_bytes_atomic(out, data)
    return out


def _train_towers(cfg: Any, out: Path) -> str:
    """Train unless ``out`` holds towers trained with the same settings; returns what happened."""
    if (out / "twotower.json").exists():
        meta = read_towers_meta(out)
        mismatches = cfg.resume_mismatches(meta.get("train_config") or {})
        for side in ("query", "result"):  # recorded in the TOWERS dir, not a setting of the maths
            wanted, recorded = getattr(cfg, f"inference_{side}_max_length"), meta.get(f"inference_{side}_max_length")
            if wanted is not None and recorded != wanted:
                mismatches.append(f"inference_{side}_max_length: towers have {recorded}, the demo wants {wanted}")
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


def _pair_sample(pairs: Path, n: int | None, out: Path, seed: int = 0) -> Path:
    """``n`` train pairs drawn with a fixed seed (the file is ordered by package: its head is one package)."""
    if n is None:
        return pairs
    lines = pairs.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = sorted(np.random.default_rng(seed).permutation(len(lines))[:n].tolist())
    data = "".join(lines[i] for i in keep).encode()
    if not out.exists() or out.read_bytes() != data:
        write_bytes_atomic(out, data)
    return out


def _train_reranker(cfg: RerankerTrainConfig, out: Path) -> str:
    """Train unless ``out`` holds a reranker trained with the same settings (and the same towers)."""
    meta_path = out / "reranker.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        same = {k: v for k, v in (meta.get("train_config") or {}).items() if k not in ("overwrite", "progress")} == \
            {k: v for k, v in cfg.to_dict().items() if k not in ("overwrite", "progress")}
        if same and meta.get("towers") == read_towers_meta(cfg.towers).get("fingerprint"):
            return "cached"
        cfg = dataclasses.replace(cfg, overwrite=True)
    from twotower.towers.reranker_train import train_reranker

    _, meta = train_reranker(cfg)
    print(f"demo: {meta.get('verdict', 'reranker trained (no dev verdict)')}", file=sys.stderr)
    return "trained"


def _build_index(towers_dir: Path, corpus: Path, out: Path, batch_size: int, device: str) -> str:
    manifest = out / "manifest.json"
    fingerprint = read_towers_meta(towers_dir)["fingerprint"]
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return "cached"
    encoder = result_encoder(TwoTower.load(towers_dir), device=device)
    build_index(encoder, corpus, out, IndexBuildConfig(overwrite=True),
                EncodeConfig(batch_size=batch_size, device=device), towers_dir=towers_dir)
    return "built"


def _llm_train_config(config: DemoConfig, prof: Profile, suite_dir: Path, out: Path, device: str) -> TrainConfig:
    """SmolLM2 towers on the suite's train pairs: same pairs, temperature and doc length as the MiniLM towers;
    the LLM's own steps, lr and query budget (its instruction prompt comes out of it); bf16 where native."""
    # in --amp's names (none, not fp32)
    amp = precision_of(autocast_dtype(config.llm_precision, device, decoder=True)).replace("fp32", "none")
    return TrainConfig(
        pairs=str(suite_dir / "train.jsonl"), out=str(out), base=config.raw_llm,
        max_steps=config.llm_max_steps if config.llm_max_steps is not None else prof.llm_max_steps,
        batch_size=prof.llm_batch_size, lr=prof.llm_lr, temperature=prof.temperature,
        query_max_length=prof.llm_query_max_length, result_max_length=prof.doc_max_length,
        inference_query_max_length=prof.inference_query_max_length,
        inference_result_max_length=prof.inference_doc_max_length,
        query_prompt=LLM_QUERY_PROMPTS[config.suite], eval_every=0, checkpoint_every=24, amp=amp, device=device,
        seed=42, dev="none")


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Every suite of ``config`` (``all`` = each in turn), then the combined report with "What this answers".

    Returns:
        ``{suite: bench results}``.
    """
    suites = DEMO_SUITES if config.suite == "all" else (config.suite,)
    per_suite = {s: run_suite(dataclasses.replace(config, suite=s)) for s in suites}
    out = Path(config.workdir) / f"report-{config.suite}-{config.profile}"
    write_combined_report(per_suite, out)
    print(f"\ncombined report: {out / 'report.md'}")
    return per_suite


def write_combined_report(per_suite: dict[str, dict[str, Any]], out: Path) -> Path:
    """report.md (per suite: the table, cosine separation, step timings; then "What this answers") and
    results.json (``per_suite``: every suite's results), written atomically over a previous report only."""
    lines = ["# twotower demo: towers vs the raw LLM, per suite", ""]
    for suite, res in per_suite.items():
        demo = res.get("extra", {}).get("demo", {})
        s = res["suite"]
        lines += [f"## {suite} ({demo.get('profile', '?')}: {s['queries']} queries, {s['corpus']} docs)", "",
                  format_table(res), "", format_significance(res), "",
                  "| system | cos relevant | cos random | AUC |", "|---|---:|---:|---:|"]
        for name, row in res["systems"].items():
            if "similarity" in row:
                sim = row["similarity"]
                lines.append(f"| {name} | {sim['relevant_mean']:.3f} | {sim['random_mean']:.3f} | {sim['auc']:.3f} |")
        steps = demo.get("steps", {})
        lines += ["", "Steps: " + ", ".join(f"{k} {v['seconds']} s ({v['status']})" for k, v in steps.items()), ""]
    lines.append(render_answers(per_suite))
    check_out_dir(out, ("report",), flag="combined report dir", verb="demo")  # replaces only a report of ours
    with atomic_dir(out) as tmp:
        (tmp / "report.md").write_text("\n".join(lines))
        # "suite" and "systems" at the top, as every report's results.json (what marks the dir as a report)
        combined = {"suite": "+".join(per_suite),
                    "systems": sorted({n for r in per_suite.values() for n in r["systems"]}), "per_suite": per_suite}
        (tmp / "results.json").write_text(json.dumps(combined, indent=2, default=str) + "\n")
    return out


def run_suite(config: DemoConfig) -> dict[str, Any]:
    """Suite -> towers (MiniLM, SmolLM2) -> index -> bench -> report; prints the table. Returns the results."""
    prof = PROFILES[config.profile]
    device = str(resolve_device(config.device))
    work = Path(config.workdir) / f"{config.suite}-{config.profile}"
    check_out_dir(work, ("demo",), flag="demo dir", verb="demo")  # its parts are checked again as they are made
    mark_work_dir(work, DEMO_MARKER)
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
        inference_query_max_length=prof.inference_query_max_length,
        inference_result_max_length=prof.inference_doc_max_length,
        eval_every=prof.eval_every, checkpoint_every=100, device=device, seed=42)
    step("train", _train_towers, train_cfg, towers_dir)
    llm_name = Path(config.raw_llm).name
    # Raw and fine-tuned LLM first, then MiniLM untrained and trained: the similarity plot pairs them up.
    systems = [f"raw-llm={config.raw_llm}"]
    llm_dir = work / f"towers-{llm_name}"
    if config.llm_towers and (config.llm_max_steps if config.llm_max_steps is not None else prof.llm_max_steps):
        step(f"train-{llm_name}", _train_towers, _llm_train_config(config, prof, Path(suite_dir), llm_dir, device),
             llm_dir)
        systems.append(f"towers:towers-{llm_name}={llm_dir}")
    step("index", _build_index, towers_dir, Path(suite_dir) / "corpus.jsonl", work / "index", 64, device)
    static_dir = work / "towers-static-query"  # a static query tower against the MiniLM result tower, frozen
    step("train-static-query", _train_towers, dataclasses.replace(
        train_cfg, out=str(static_dir), query_tower="static", result_tower_from=str(towers_dir)), static_dir)
    systems += ["minilm", f"towers:towers-minilm={towers_dir}", f"towers:towers-static-query={static_dir}", "bm25"]
    if config.rerank and prof.rerank_steps:
        reranker_dir = work / "reranker"
        rr_cfg = RerankerTrainConfig(
            pairs=str(_pair_sample(Path(suite_dir) / "train.jsonl", prof.rerank_pairs, work / "rerank-pairs.jsonl")),
            towers=str(towers_dir), out=str(reranker_dir), dev=str(_dev_subset(dev, prof.rerank_dev,
                                                                                work / "rerank-dev.jsonl")),
            hard_negatives=prof.rerank_negatives, max_steps=prof.rerank_steps, batch_size=prof.rerank_batch_size,
            lr=prof.rerank_lr, max_length=prof.inference_doc_max_length, rerank_depth=prof.rerank_n,
            eval_every=max(prof.rerank_steps // 2, 1), allow_no_gain=True, device=device, seed=42)
        step("train-reranker", _train_reranker, rr_cfg, reranker_dir)
        systems.append(f"towers+rerank:towers-minilm+rerank={towers_dir}:{reranker_dir}:{prof.rerank_n}")
    extra = {"demo": {"suite": config.suite, "profile": config.profile, "profile_settings": dataclasses.asdict(prof),
                      "steps": steps, "towers": str(towers_dir), "index": str(work / "index")}}
    bench = BenchConfig(suite=str(suite_dir), systems=",".join(systems), out=str(work / "report"), k_max=100,
                        batch_size=64, device=device, query_max_length=prof.inference_query_max_length,
                        doc_max_length=prof.inference_doc_max_length, llm_precision=config.llm_precision)
    results = step("bench", run_bench, bench, extra=extra)
    total = round(time.perf_counter() - t_all, 1)
    print(f"\n{format_table(results)}\n")
    print("steps: " + ", ".join(f"{k} {v['seconds']} s ({v['status']})" for k, v in steps.items())
          + f"; total {total} s")
    print(f"report: {work / 'report' / 'report.md'}")
    print(f"search it: twotower search --index {work / 'index'} \"your query\" -k 5")
    return results
