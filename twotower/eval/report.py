"""The REPORT dir: report.md (system x metric table, best bolded), results.json, recall_at_k.png, similarity.png.

Everything is written into a temp dir and renamed (``common.atomic.atomic_dir``): a crash leaves either
the previous report or none, never half of one. Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.common.atomic import atomic_dir
from twotower.common.jsonl import dumps_strict
from twotower.common.machine import cpu_model
from twotower.common.metrics import REPORT_METRICS
from twotower.eval.answers import comparisons
from twotower.eval.significance import format_p, verdict

METRIC_COLUMNS = REPORT_METRICS
PACKAGES = ("twotower", "torch", "transformers", "faiss-cpu", "faiss-gpu-cu12", "datasets", "numpy",
            "sentence-transformers", "bm25s", "tokenizers", "safetensors")


def environment(device: str) -> dict[str, Any]:
    """Date, machine, device and package versions (None = not installed) for results.json."""
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "device": device, "gpu": gpu, "packages": versions,
    }


def similarity_summary(sim: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means/stds of cos(q, relevant) and cos(q, random), and the AUC P(cos_relevant > cos_random).

    AUC 0.5 = the two distributions overlap completely; 1.0 = every relevant doc beats every random doc.
    """
    pos, neg = np.sort(sim["relevant"]), np.sort(sim["random"])
    if not len(pos) or not len(neg):
        return {"relevant_mean": float("nan"), "random_mean": float("nan"), "auc": float("nan")}
    # Mann-Whitney U: for each relevant cosine count random ones below it (ties count half).
    below = np.searchsorted(neg, pos, side="left") + 0.5 * (np.searchsorted(neg, pos, side="right")
                                                           - np.searchsorted(neg, pos, side="left"))
    return {"relevant_mean": float(pos.mean()), "relevant_std": float(pos.std()), "random_mean": float(neg.mean()),
            "random_std": float(neg.std()), "auc": float(below.sum() / (len(pos) * len(neg)))}


def format_table(results: Mapping[str, Any], columns: tuple[str, ...] | None = None) -> str:
    """Markdown table system x metric; the best value per column is bolded (ties all bolded). Default columns:
    the report metrics every row has (only what was computed: ``--k-max 5`` has no recall@100 column)."""
    systems = results["systems"]
    if columns is None:
        columns = tuple(c for c in METRIC_COLUMNS if all(c in s["metrics"] for s in systems.values()))
    best = {c: max(s["metrics"][c] for s in systems.values()) for c in columns}
    lines = ["| system | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, s in systems.items():
        cells = []
        for c in columns:
            v = f"{s['metrics'][c]:.3f}"
            cells.append(f"**{v}**" if round(s["metrics"][c], 3) == round(best[c], 3) else v)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_significance(results: Mapping[str, Any]) -> str:
    """Markdown table: every row against the reference row, per CI metric the difference (row - reference) with
    its 95% bootstrap CI, the randomization-test p and the verdict; "" when the bench computed none."""
    sig = results.get("significance")
    if not sig or not sig.get("metrics") or not sig.get("rows"):
        return ""
    ref, metrics = sig["reference"], sig["metrics"]
    n_queries = next(iter(sig["rows"].values()))[metrics[0]]["n"]  # every comparison pairs the same queries
    lines = [f"Each row minus **{ref}** on the same {n_queries} queries: difference with its "
             f"{round(100 * sig['level'])}% bootstrap CI over queries "
             f"({sig['n_resamples']:,} resamples, seed {sig['seed']}) and the paired randomization-test p; "
             "a difference counts only where the CI excludes 0 and p < 0.05.", "",
             "| system | " + " | ".join(f"{m} diff (95% CI) | p" for m in metrics) + " | verdict |",
             "|---|" + "---:|---:|" * len(metrics) + "---|"]
    for name, row in sig["rows"].items():
        cells = [f"{row[m]['diff']:+.3f} ({row[m]['ci_low']:+.3f}..{row[m]['ci_high']:+.3f}) | "
                 f"{format_p(row[m]['p_value'])}" for m in metrics]
        verdicts = sorted({verdict(row[m]) for m in metrics})
        says = verdicts[0] if len(verdicts) == 1 else "mixed: " + ", ".join(
            f"{m} {verdict(row[m])}" for m in metrics)
        says = {"better": f"better than {ref}", "worse": f"worse than {ref}"}.get(says, says)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {says} |")
    return "\n".join(lines)


def _config_line(cfg: Mapping[str, Any]) -> str:
    skip = {"train_config", "prompt_template"}
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in skip and v is not None)


def render_markdown(results: Mapping[str, Any]) -> str:
    suite, env = results["suite"], results["environment"]
    m = env["machine"]
    sub = ""
    if suite.get("max_queries") or suite.get("max_corpus"):
        sub = (f" (subsample: max_queries={suite['max_queries']}, max_corpus={suite['max_corpus']}, "
               f"seed={suite['seed']})")
    out = [
        f"# Retrieval benchmark: {suite['name']}",
        "",
        f"- Date: {env['date']}",
        f"- Machine: {m['cpu']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), {m['platform']}",
        f"- Device: {env['device']}" + (f" ({env['gpu']})" if env.get("gpu") else ""),
        f"- Suite: `{suite['path']}`: {suite['queries']} queries, {suite['corpus']} docs, "
        f"{suite['relevant_per_query']} relevant/query{sub}",
        f"- Suite checksum: `{suite['checksum'][:16]}`"
        + (f" (before subsampling: `{suite['full_checksum'][:16]}`)"
           if suite["full_checksum"] != suite["checksum"] else ""),
        f"- Search: {results['bench']['search']}, k = {results['bench']['k_max']}",
        "",
        format_table(results),
        "",
    ]
    if suite.get("queries_without_relevant"):
        out += [f"{len(suite['queries_without_relevant'])} queries have no relevant doc in the qrels (score > 0) and "
                "are left out of every metric.", ""]
    significance = format_significance(results)
    if significance:
        out += ["## Differences against the reference row", "", significance, ""]
    out += [
        "## Query-document cosine separation",
        "",
        "cos(query, relevant doc) vs cos(query, random doc); AUC = P(relevant > random), 0.5 = no separation.",
        "",
        "| system | cos relevant | cos random | AUC |",
        "|---|---:|---:|---:|",
    ]
    for name, s in results["systems"].items():
        if "similarity" in s:
            sim = s["similarity"]
            out.append(f"| {name} | {sim['relevant_mean']:.3f} | {sim['random_mean']:.3f} | {sim['auc']:.3f} |")
    out += ["", "## Timings", "", "Raw-LLM rows share one forward pass; bm25's docs/s is its indexing rate.", "",
            "| system | encode docs (s) | docs/s | encode queries (s) | index (s) | search (s) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, s in results["systems"].items():
        t = s["timings"]
        cached = f" ({t['docs_from_cache']} cached)" if t.get("docs_from_cache") else ""
        enc_docs = f"{t['encode_docs_s']:.1f}" if "encode_docs_s" in t else "-"
        enc_queries = f"{t['encode_queries_s']:.1f}" if "encode_queries_s" in t else "-"
        out.append(f"| {name} | {enc_docs}{cached} | {t['docs_per_s']:.0f} | {enc_queries} | {t['index_s']:.2f} | "
                   f"{t['search_s']:.2f} |")
    out += ["", "## Systems", ""]
    out += [f"- **{name}**: {_config_line(s['config'])}" for name, s in results["systems"].items()]
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    out += ["", f"Packages: {pk}.", "", "![recall@k](recall_at_k.png)", "", "![similarity](similarity.png)", ""]
    return "\n".join(out)


def plot_recall(results: Mapping[str, Any]) -> bytes:
    import matplotlib  # optional extra `.[bench]` (plots only): imported where used

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, s in results["systems"].items():
        curve = s["recall_curve"]
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name, lw=1.8)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"recall@k on {results['suite']['name']} ({results['suite']['queries']} queries, "
                 f"{results['suite']['corpus']} docs)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def similarity_panels(results: Mapping[str, Any], names: list[str]) -> tuple[list[str], dict[str, str], int]:
    """Panel order, per-panel tag and column count of the similarity plot: each before/after pair of
    ``eval.answers.comparisons`` (raw SmolLM2 | fine-tuned SmolLM2, MiniLM | MiniLM towers) side by side on its
    own row, then the other rows; without such pairs, the bench order in rows of three."""
    pairs = comparisons(results)
    pairs = [pairs[key] for key in ("b", "a") if pairs[key][0] in names and pairs[key][1] in names]  # LLM first
    if not pairs:
        return names, {}, min(3, max(len(names), 1))
    order = [n for pair in pairs for n in pair]
    tags = {n: tag for pair in pairs for n, tag in zip(pair, ("before", "after"))}
    return order + [n for n in names if n not in order], tags, 2


def plot_similarity(results: Mapping[str, Any], similarity: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, tags, ncols = similarity_panels(results, list(similarity))
    nrows = max(1, -(-len(names) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), dpi=110, squeeze=False)
    for ax, name in zip(axes.flat, names):
        sim = similarity[name]
        both = np.concatenate([sim["relevant"], sim["random"]])
        bins = np.linspace(float(both.min()), float(both.max()) + 1e-6, 50) if both.size else 10
        ax.hist(sim["random"], bins=bins, density=True, alpha=0.55, label="random doc", color="tab:gray")
        ax.hist(sim["relevant"], bins=bins, density=True, alpha=0.55, label="relevant doc", color="tab:green")
        auc = results["systems"][name].get("similarity", {}).get("auc", float("nan"))
        tag = f" ({tags[name]} training)" if name in tags else ""
        ax.set_title(f"{name}{tag}\nAUC {auc:.3f}", fontsize=9)
        ax.set_xlabel("cos(query, doc)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if names:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(results: Mapping[str, Any], out: str | Path,
                 similarity: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Path:
    """Write report.md, results.json, recall_at_k.png, similarity.png (+ similarity.npz) atomically to ``out``."""
    similarity = similarity or {}
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text(dumps_strict(results, indent=2, default=_json_default) + "\n")
        (tmp / "report.md").write_text(render_markdown(results))
        (tmp / "recall_at_k.png").write_bytes(plot_recall(results))
        (tmp / "similarity.png").write_bytes(plot_similarity(results, similarity))
        if similarity:  # raw cosines behind the plot, row-name-prefixed arrays (no pickle)
            np.savez(tmp / "similarity.npz", **{f"{n}/{k}": v for n, sim in similarity.items() for k, v in sim.items()})
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"results.json cannot hold a {type(obj).__name__}")
