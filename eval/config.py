"""Configs of ``twotower bench`` and ``twotower demo``: dataclasses with a default and a why per field (the CLI
is generated from them). Kept free of torch/faiss imports so ``--help`` stays fast."""
from __future__ import annotations

import dataclasses

from common.cliargs import check_required, field
from common.device import check_device


@dataclasses.dataclass
class BenchConfig:
    """Options of ``twotower bench`` (the CLI is generated from these fields)."""

    suite: str = field("", "BEIR suite dir (corpus.jsonl, queries.jsonl, qrels/test.tsv), e.g. "
                           "runs/demo/codesearch-py-cpu-small/codesearch-py (built by `twotower demo`)", required=True)
    systems: str = field("raw-llm=smollm2,minilm,bm25",
                         "comma list: towers[:LABEL]=DIR, raw-llm[=MODEL[:last+mean+logits]], minilm, bm25")
    out: str = field("REPORT", "report dir to write (report.md, results.json, recall_at_k.png, similarity.png)")
    k_max: int = field(100, "results retrieved per query (recall@k is reported up to this k)")
    batch_size: int = field(64, "texts per batch for the towers and MiniLM")
    llm_batch_size: int = field(16, "texts per batch for the raw LLM (bigger activations)")
    device: str = field("auto", "auto | cpu | cuda | cuda:N (encoders; search is exact faiss on CPU)")
    max_queries: int | None = field(None, "evaluate on a random subset of this many queries")
    max_corpus: int | None = field(None, "keep at most this many docs (all relevant docs of kept queries stay)")
    query_max_length: int = field(64, "query tokens for minilm and raw-llm (trained towers keep their own)")
    doc_max_length: int = field(256, "doc tokens for minilm and raw-llm (raw-llm's prompt comes on top)")
    prompt: str = field("promptEOL", "raw-llm prompt: promptEOL, none, or a template with {text}")
    n_random: int = field(10, "random docs per query for the similarity plot")
    seed: int = field(0, "seed for the query/corpus subsample and the random docs")

    def __post_init__(self) -> None:
        check_required(self)
        check_device(self.device)
        for name in ("k_max", "batch_size", "llm_batch_size", "query_max_length", "doc_max_length", "n_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queries", "max_corpus"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or left unset for all), got "
                                 f"{getattr(self, name)}")


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
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    max_steps: int | None = field(None, "override the profile's training steps")
    raw_llm: str = field("smollm2", "the raw decoder LLM baseline: smollm2, gemma3 or a causal-LM dir")

    def __post_init__(self) -> None:
        check_device(self.device)
        if not self.workdir:
            raise ValueError("--workdir is required (the dir that holds every demo run)")
        if self.suite not in SUITE_NAMES:
            raise ValueError(f"unknown suite '{self.suite}': choose {', '.join(SUITE_NAMES)}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile '{self.profile}': choose {', '.join(PROFILES)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0 (0: one epoch), got {self.max_steps}")
