"""The GPU half, run for real: every GPU-side path of twotower, each step independent and timed.

    python -m scripts.gpu_check --out OUT [--dry-run] [--only STEP,...]

Steps, in order (``STEPS``): the gpu-marked tests; FAISS search on the GPU (faiss-gpu Flat and IVF against CPU
results where faiss has GPUs, else the torch exact-search path against faiss-cpu); the INDEX dir's torch fallback
search; filters and re-scoring on the GPU; a Ray Data build with a GPU actor; encode throughput (the fed towers
encoder against sentence-transformers, same model, same texts, one run); training throughput; LLM towers against
MiniLM towers at equal wall time.

After EVERY step ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` are rewritten (atomically), so the figures of the
steps that ran are kept when a later one fails or the machine goes away. A step's exception is recorded with its
type and message and the next step runs. Without CUDA (or with ``--dry-run``) the GPU steps are recorded as
skipped and the summaries are still written: the CPU dry run that the default test suite runs.

Models: the lent GPU machines have no hub and a 64 MiB transfer limit, so the MiniLM *weights* (87 MiB) and
SmolLM2's (GGUF, 100 MiB) cannot travel; throughput steps use a model of MiniLM's exact shape (its config and
tokenizer, random weights: speed does not depend on the weights). ``scripts/gpu_check.sh prepare`` makes that
folder and the wheels the machine lacks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from twotower.common.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]
GPU_SIDE = ROOT / ".gpu"  # what scripts/gpu_check.sh prepare leaves for the GPU machine (git-ignored)
# bf16 dense peak of the cards this may run on (TFLOP/s, without sparsity), for "% of peak"
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def on_gpu(args: argparse.Namespace) -> bool:
    """The steps run on ``args.device``: cuda on the GPU machine; cpu for the CPU smoke run of the test suite."""
    return args.device.startswith("cuda")


def card() -> str:
    import torch

    return torch.cuda.get_device_name(0) if has_cuda() else "none"


# -- steps: each returns a dict of figures; raising records the error ------------------------------------------
def step_gpu_tests(args: argparse.Namespace) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout)
    last = (run.stdout.strip().splitlines() or [""])[-1]
    if run.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited {run.returncode}: {last}\n{run.stdout[-1500:]}{run.stderr[-500:]}")
    return {"summary": last}


def _synthetic(n: int, d: int, nq: int) -> tuple[np.ndarray, np.ndarray]:
    from twotower.index.synthetic import clustered_vectors

    x = clustered_vectors(n + nq, d, seed=1)
    return x[:n], x[n:]


def _qps(fn: Callable[[], Any], nq: int, repeats: int = 3) -> float:
    fn()  # warm-up (GPU kernels, faiss threads)
    best = min(_timed(fn) for _ in range(repeats))
    return nq / best


def _timed(fn: Callable[[], Any]) -> float:
    import torch

    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_faiss_search(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from twotower.index.synthetic import ann_recall, brute_force
    from twotower.index.torch_search import TorchFlatSearcher

    xb, xq = _synthetic(args.n, 384, 1000)
    _, gt = brute_force(xb, xq, 10)
    cpu = faiss.IndexFlatIP(384)
    cpu.add(xb)
    out: dict[str, Any] = {"n": len(xb), "nq": len(xq), "cpu_flat_qps": round(_qps(lambda: cpu.search(xq, 10), 1000))}
    if on_gpu(args) and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
        ivf = faiss.index_factory(384, "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
        ivf.train(xb)
        ivf.add(xb)
        ivf.nprobe = 32
        gpu_ivf = faiss.index_cpu_to_gpu(res, 0, ivf)
        out.update(path="faiss-gpu", gpu_flat_qps=round(_qps(lambda: gpu.search(xq, 10), 1000)),
                   gpu_flat_recall10=ann_recall(gpu.search(xq, 10)[1], gt, 10),
                   gpu_ivf_qps=round(_qps(lambda: gpu_ivf.search(xq, 10), 1000)),
                   gpu_ivf_recall10=ann_recall(gpu_ivf.search(xq, 10)[1], gt, 10),
                   cpu_ivf_recall10=ann_recall(ivf.search(xq, 10)[1], gt, 10))
        return out
    searcher = TorchFlatSearcher(xb, args.device)
    _, I = searcher.search(xq, 10)
    out.update(path=f"torch exact search on {args.device} (faiss has no GPU build here); faiss-cpu for the index parts",
               torch_flat_qps=round(_qps(lambda: searcher.search(xq, 10), 1000)),
               torch_recall10=ann_recall(I, gt, 10), same_ids_as_faiss_cpu=float(np.mean(I == cpu.search(xq, 10)[1])))
    return out


def _build(tmp: Path, name: str, xb: np.ndarray, **config: Any) -> Path:
    from twotower.index.build import build_index
    from twotower.index.config import EncodeConfig, IndexBuildConfig
    from twotower.index.synthetic import TableEncoder

    rows = [{"_id": f"d{i}", "text": f"doc {i}", "bucket": i % 10} for i in range(len(xb))]
    return build_index(TableEncoder(xb), rows, tmp / name, IndexBuildConfig(**config),
                       EncodeConfig(progress=False, device="cpu"))


def step_torch_fallback(args: argparse.Namespace) -> dict[str, Any]:
    from twotower.index.load import load_index

    xb, xq = _synthetic(20_000, 64, 200)
    with tempfile.TemporaryDirectory() as tmp:
        path = _build(Path(tmp), "flat", xb, factory="Flat")
        on_cpu, on_gpu = load_index(path, "cpu"), load_index(path, args.device)
        D0, I0 = on_cpu.search(xq, 10)
        D1, I1 = on_gpu.search(xq, 10)
        return {"gpu_placement": str(on_gpu.device), "same_ids": float(np.mean(I0 == I1)),
                "max_score_diff": float(np.max(np.abs(D0 - D1)))}


def step_filters_rescore(args: argparse.Namespace) -> dict[str, Any]:
    from twotower.index.load import load_index

    xb, xq = _synthetic(20_000, 64, 200)
    allowed = (np.arange(len(xb)) % 10) == 3
    with tempfile.TemporaryDirectory() as tmp:
        path = _build(Path(tmp), "sq", xb, factory="SQ8", rescore=4)
        on_cpu, on_gpu = load_index(path, "cpu"), load_index(path, args.device)
        out: dict[str, Any] = {"gpu_placement": str(on_gpu.device)}
        for name, kw in (("filter", {"allowed": allowed}), ("rescore", {"rescore": 4}),
                         ("filter+rescore", {"allowed": allowed, "rescore": 4})):
            _, I0 = on_cpu.search(xq, 10, **kw)
            _, I1 = on_gpu.search(xq, 10, **kw)
            if "allowed" in kw:
                assert allowed[I1[I1 >= 0]].all(), f"{name}: the GPU path returned a filtered-out row"
            out[f"{name}_same_ids"] = float(np.mean(I0 == I1))
        return out


def _minilm_shaped(tmp: Path) -> Path:
    """MiniLM's config and tokenizer with random weights (``.gpu/minilm-shape``, else the local MiniLM)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    src = GPU_SIDE / "minilm-shape"
    if not src.is_dir():
        from twotower.towers.bases import resolve_base

        src = Path(resolve_base("minilm"))
    out = tmp / "minilm-shape"
    AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _texts(n: int, seed: int = 0) -> list[str]:
    words = ("index tower query vector search encode result train batch token model score rank doc corpus "
             "recall faiss gpu memory length pad mean pool norm layer head attention").split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, int(rng.integers(8, 200)))) for _ in range(n)]


def step_ray_gpu_actor(args: argparse.Namespace) -> dict[str, Any]:
    from twotower.towers.model import TwoTower

    with tempfile.TemporaryDirectory() as tmp:
        base = _minilm_shaped(Path(tmp))
        TwoTower.from_base(str(base)).save(Path(tmp) / "towers")
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(_texts(2000))))
        cmd = [sys.executable, "-m", "twotower.cli", "index", "build", "--towers", str(Path(tmp) / "towers"),
               "--corpus", str(corpus), "--out", str(Path(tmp) / "idx"), "--engine", "ray",
               "--gpus-per-encoder", "1" if on_gpu(args) else "0", "--no-progress"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.step_timeout, cwd=ROOT)
        if run.returncode != 0:
            raise RuntimeError(f"index build --engine ray exited {run.returncode}: {run.stderr[-1500:]}")
        return {"docs": 2000, "seconds": round(time.perf_counter() - t0, 1)}


def step_encode_throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from twotower.towers.feed import BatchFeed
    from twotower.towers.model import Tower

    texts = _texts(args.encode_texts)
    with tempfile.TemporaryDirectory() as tmp:
        base = _minilm_shaped(Path(tmp))
        tower = Tower.from_base(str(base), max_length=256).to(args.device)
        tower.save(Path(tmp) / "tower")
        st = SentenceTransformer(str(Path(tmp) / "tower"), device=args.device)
        if on_gpu(args):
            st.half()  # sentence-transformers' own fast path on a GPU (its efficiency docs: fp16)
        amp = torch.bfloat16 if on_gpu(args) else None
        ours = lambda: tower.encode(texts, batch_size=256, amp_dtype=amp)  # noqa: E731
        theirs = lambda: st.encode(texts, batch_size=256, convert_to_numpy=True)  # noqa: E731
        t_ours = min(_timed(ours) for _ in range(3))
        t_st = min(_timed(theirs) for _ in range(3))
        tok = lambda part: tower.tokenizer(part, truncation=True, max_length=256)["input_ids"]  # noqa: E731
        feed = BatchFeed(tok, texts, 256, tower.tokenizer.pad_token_id)
        for _ in feed:
            pass
        # matmul FLOPs: 2 x (non-embedding parameters) per real token (attention scores left out: a lower bound)
        params = sum(p.numel() for n, p in tower.encoder.named_parameters() if "embeddings" not in n)
        tflops = 2 * params * feed.stats.real_tokens / t_ours / 1e12
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in card()), None)
        return {"texts": len(texts), "ours_texts_per_s": round(len(texts) / t_ours),
                "st_fp16_texts_per_s": round(len(texts) / t_st), "x_sentence_transformers": round(t_st / t_ours, 2),
                "padding_overhead": round(feed.stats.padding_overhead, 3), "matmul_tflops": round(tflops, 1),
                "pct_of_bf16_peak": round(100 * tflops / peak, 2) if peak else None}


def step_train_throughput(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = _minilm_shaped(Path(tmp))
        pairs = Path(tmp) / "pairs.jsonl"
        qs, ds = _texts(4096, 1), _texts(4096, 2)
        pairs.write_text("".join(json.dumps({"query": q[:120], "positive": d}) + "\n" for q, d in zip(qs, ds)))
        cmd = [sys.executable, "-m", "scripts.bench_train", "--pairs", str(pairs), "--device", args.device,
               "--steps", "20", "--batch-size", "64", "--systems", "st-fp32,twotower-fp32,twotower-bf16",
               "--base", str(base)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.step_timeout, cwd=ROOT)
        if run.returncode != 0:
            raise RuntimeError(f"bench_train exited {run.returncode}: {run.stderr[-1500:]}")
        return {"bench_train": json.loads(run.stdout.strip().splitlines()[-1])}


def step_llm_towers(args: argparse.Namespace) -> dict[str, Any]:
    from twotower.towers.bases import resolve_base

    try:
        resolve_base("smollm2")
    except (ValueError, OSError, ImportError) as exc:
        raise RuntimeError("SmolLM2 weights are not on this machine (the GGUF wheel, ~100 MiB, is over the 64 MiB "
                           f"transfer limit of the lent GPU machines): {exc}") from None
    cmd = [sys.executable, "-m", "twotower.cli", "demo", "--profile", "full", "--suite", "codesearch-py",
           "--max-steps", "300", "--llm-max-steps", "300", "--workdir", str(Path(args.out) / "demo")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.step_timeout, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"demo exited {run.returncode}: {run.stderr[-1500:]}")
    return {"tail": run.stdout[-1500:]}


# name -> (function, needs CUDA)
STEPS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], bool]] = {
    "gpu_tests": (step_gpu_tests, True),
    "faiss_search": (step_faiss_search, True),
    "torch_fallback": (step_torch_fallback, True),
    "filters_rescore": (step_filters_rescore, True),
    "ray_gpu_actor": (step_ray_gpu_actor, True),
    "encode_throughput": (step_encode_throughput, True),
    "train_throughput": (step_train_throughput, True),
    "llm_towers": (step_llm_towers, True),
}


def write_summaries(out: Path, results: dict[str, Any]) -> None:
    """OUT/gpu_check.json (strict JSON) and OUT/gpu_check.md, replaced whole each time."""
    text = json.dumps(results, indent=2, allow_nan=False, default=str) + "\n"
    write_bytes_atomic(out / "gpu_check.json", text.encode())
    lines = [f"# gpu_check: {results['card']}", "", f"- started {results['started']}, steps on {results['device']}",
             f"- torch {results['torch']}, CUDA {results['cuda']}", "", "| step | status | seconds | figures |",
             "|---|---|---|---|"]
    for name, r in results["steps"].items():
        figures = r.get("error") or ", ".join(f"{k}={v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {str(figures).replace('|', '/')[:600]} |")
    write_bytes_atomic(out / "gpu_check.md", ("\n".join(lines) + "\n").encode())


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_all = (has_cuda() or not on_gpu(args)) and not args.dry_run
    results: dict[str, Any] = {"card": card(), "device": args.device, "dry_run": not run_all,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                               "torch": torch.__version__, "cuda": torch.version.cuda, "steps": {}}
    only = [s for s in args.only.split(",") if s] or list(STEPS)
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        print(f"gpu_check: error: --only: unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}",
              file=sys.stderr)
        raise SystemExit(2)
    for name in only:
        fn, needs_cuda = STEPS[name]
        if needs_cuda and not run_all:
            results["steps"][name] = {"status": "skipped", "error": "no CUDA GPU (dry run)"}
        else:
            t0 = time.perf_counter()
            try:
                results["steps"][name] = {"status": "ok", "figures": fn(args)}
            except Exception as exc:  # noqa: BLE001 - recorded, and the next step runs
                results["steps"][name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                          "trace": traceback.format_exc(limit=4)}
            results["steps"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        write_summaries(out, results)
        print(f"gpu_check: {name}: {results['steps'][name]['status']}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dir for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="skip every GPU step (what runs without CUDA anyway)")
    ap.add_argument("--only", default="", help=f"comma list of steps (default all): {', '.join(STEPS)}")
    ap.add_argument("--n", type=int, default=200_000, help="vectors of the search steps")
    ap.add_argument("--encode-texts", type=int, default=20_000, help="texts of the encode step")
    ap.add_argument("--device", default="cuda", help="cuda (the GPU run) or cpu (a smoke run of the same steps)")
    ap.add_argument("--step-timeout", type=float, default=240, help="seconds a subprocess step may take")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    results = run_steps(args)
    failed = [n for n, r in results["steps"].items() if r["status"] == "failed"]
    print(f"gpu_check: {len(results['steps']) - len(failed)} of {len(results['steps'])} steps ok or skipped; "
          f"summaries in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
