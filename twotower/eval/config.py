"""Configs of ``twotower bench`` and ``twotower demo``: dataclasses with a default and a why per field (the CLI
is generated from them). Kept free of torch/faiss imports so ``--help`` stays fast."""
from __future__ import annotations

import dataclasses

from twotower.common.cliargs import check_range, check_required, field
from twotower.common.device import check_device
from twotower.index.query import QueryOptions, check_config_options, options_of, query_fields
from twotower.retrieval.config import MAX_K_CAP
from twotower.towers.config import MAX_TOKENS

LLM_PRECISIONS = ("auto", "fp32", "bf16")
MAX_RANDOM = 10_000  # random docs per query for the similarity plot: a plot needs tens


@dataclasses.dataclass
@query_fields("bench", prefix="hybrid_")
class BenchConfig:
    """Options of ``twotower bench`` (the CLI is generated from these fields; the hybrid systems' ``--hybrid-*``
    options from ``index.query.QueryOptions``, see :meth:`hybrid_options`)."""

    suite: str = field("", "BEIR suite dir (corpus.jsonl, queries.jsonl, qrels/test.tsv), e.g. "
                           "runs/demo/codesearch-py-cpu-small/codesearch-py (built by `twotower demo`)", required=True)
    systems: str = field("raw-llm=smollm2,minilm,bm25",
                         "comma list: towers[:LABEL]=DIR, raw-llm[=MODEL[:last+mean+logits]], minilm, bm25, "
                         "hybrid[:LABEL]=DIR[:rrf+weighted] (towers fused with bm25), hybrid-minilm[=rrf+weighted]")
    out: str = field("REPORT", "report dir to write (report.md, results.json, recall_at_k.png, similarity.png)")
    k_max: int = field(100, "results retrieved per query (recall@k is reported up to this k)")
    batch_size: int = field(64, "texts per batch for the towers and MiniLM")
    llm_batch_size: int = field(16, "texts per batch for the raw LLM (bigger activations)")
    device: str = field("auto", "auto | cpu | cuda | cuda:N (encoders; search is exact faiss on CPU)")
    max_queries: int | None = field(None, "evaluate on a random subset of this many queries")
    max_corpus: int | None = field(None, "keep at most this many docs (all relevant docs of kept queries stay)")
    query_max_length: int = field(64, "query tokens for minilm and raw-llm (trained towers keep their own)")
    doc_max_length: int = field(256, "doc tokens for minilm and raw-llm (raw-llm's prompt comes on top)")
    towers_query_max_length: int | None = field(None, "query tokens for every towers system (default: each "
                                                      "TOWERS dir's recorded inference length)")
    towers_result_max_length: int | None = field(None, "doc tokens for every towers system (default: each "
                                                       "TOWERS dir's recorded inference length)")
    prompt: str = field("promptEOL", "raw-llm prompt: promptEOL, none, or a template with {text}")
    llm_precision: str = field("auto", "precision of the decoder-LLM encoders (raw-llm, and towers on an LLM base): "
                                       "auto (bf16 where the CPU has AVX512-BF16/AMX or on a GPU, else fp32), "
                                       "fp32, bf16", choices=LLM_PRECISIONS)
    reference: str = field("", "row every other row is compared against (paired difference of recall@10 and "
                               "nDCG@10, 95%% bootstrap CI, randomization-test p); default: the best trained "
                               "towers row, else the best row")
    n_random: int = field(10, "random docs per query for the similarity plot")
    seed: int = field(0, "seed for the query/corpus subsample and the random docs")

    def __post_init__(self) -> None:
        check_required(self)
        check_device(self.device)
        check_config_options(self, "bench", prefix="hybrid_")
        for name in ("k_max", "batch_size", "llm_batch_size", "query_max_length", "doc_max_length", "n_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queries", "max_corpus", "towers_query_max_length", "towers_result_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or left unset for all), got "
                                 f"{getattr(self, name)}")
        for name in ("query_max_length", "doc_max_length", "towers_query_max_length", "towers_result_max_length"):
            if getattr(self, name) is not None:  # the tokenizer keeps a length in a usize: 2^64 overflows there
                check_range(self, name, 1, MAX_TOKENS)
        # Both size an allocation of (queries, value): 2^31 random rows per query took 24 GB before it was capped
        check_range(self, "k_max", 1, MAX_K_CAP)
        check_range(self, "n_random", 1, MAX_RANDOM)
        if self.llm_precision not in LLM_PRECISIONS:
            raise ValueError(f"unknown LLM precision '{self.llm_precision}': choose {', '.join(LLM_PRECISIONS)}")

    def hybrid_options(self, fusion: str | None = None) -> QueryOptions:
        """The hybrid systems' query options: ``--hybrid-*``, k = ``k_max``, and ``fusion`` (each system's rows)."""
        return options_of(self, "bench", prefix="hybrid_", mode="hybrid", k=self.k_max, fusion=fusion).resolve()


SUITE_NAMES = ("codesearch-py", "nq", "wiki")
# What `--suite all` runs: one suite per regime (NL->code, NL->NL) that builds from files PyPI serves. nq is left
# out: its sdist is no longer served, it builds only from a copy the user supplies (`--suite nq`).
DEMO_SUITES = ("codesearch-py", "wiki")
# e5-mistral-style instructions of the demo's SmolLM2 towers, one per suite (the towers keep them in twotower.json).
LLM_QUERY_PROMPTS = {
    "codesearch-py": "Instruct: Given a docstring, retrieve the Python function\nQuery: ",
    "nq": "Instruct: Given a question, retrieve Wikipedia passages that answer it\nQuery: ",
    "wiki": "Instruct: Given a short description of a topic, retrieve the encyclopedia article it describes\nQuery: ",
}


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
    query_max_length: int  # training tokens of the towers
    doc_max_length: int  # training tokens of the towers
    eval_every: int
    # SmolLM2 (decoder LLM) towers: fine-tuned on the same pairs; 0 steps = no such row
    llm_max_steps: int = 0
    llm_lr: float = 1e-4
    llm_batch_size: int = 32
    llm_query_max_length: int = 48  # the instruction prompt (~15 tokens) comes out of this budget
    # Inference tokens of the towers and of every baseline: the demo trains short (cheap) and encodes long (issue
    # 15: MiniLM towers trained at 32/64 lost to MiniLM when also used at 32/64, and beat it at 64/256).
    inference_query_max_length: int = 64
    inference_doc_max_length: int = 256
    # Cross-encoder reranker (``twotower train-reranker``) on a seeded sample of the train pairs, negatives mined by
    # the MiniLM towers; the towers-minilm+rerank row reorders their top rerank_n. 0 steps = no such row.
    rerank_steps: int = 0
    rerank_pairs: int | None = None  # train pairs sampled for it (None = all)
    rerank_batch_size: int = 16
    rerank_lr: float = 2e-5
    rerank_negatives: int = 5
    rerank_n: int = 20
    rerank_dev: int | None = 100  # dev pairs whose towers' top rerank_n are reranked at each evaluation


PROFILES: dict[str, Profile] = {
    # Two suites (`--suite all`) in 20 min / 8 GB on 2 cores (docs/bench.md): 400 test queries per suite (enough for
    # the CIs), 1,000 docs; SmolLM2 towers at 16 pairs a step (half the activations of 32: the 2026-12-07 peak RSS of
    # 9.8 GiB was its training step) for 40 steps (about the time of 20 steps of 32); MiniLM towers 80 steps.
    "cpu-small": Profile(max_queries=400, max_corpus=1000, dev_size=200, max_steps=80, batch_size=32, lr=1e-4,
                         temperature=0.05, query_max_length=32, doc_max_length=64, eval_every=0,
                         llm_max_steps=40, llm_lr=1e-4, llm_batch_size=16, llm_query_max_length=48,
                         rerank_steps=80, rerank_pairs=800, rerank_batch_size=8, rerank_lr=1e-4, rerank_negatives=3),
    "full": Profile(max_queries=None, max_corpus=None, dev_size=None, max_steps=0, batch_size=64, lr=5e-5,
                    temperature=0.05, query_max_length=64, doc_max_length=256, eval_every=500,
                    llm_max_steps=1000, llm_lr=5e-5, llm_batch_size=64, llm_query_max_length=80,
                    rerank_steps=1000, rerank_pairs=None, rerank_batch_size=16, rerank_lr=2e-5, rerank_negatives=5),
}


@dataclasses.dataclass
class DemoConfig:
    """Options of ``twotower demo`` (the CLI is generated from these fields)."""

    suite: str = field("all", "suite to build and benchmark; all = one per regime (codesearch-py: NL->code, wiki: "
                              "NL->NL), plus one combined report that says what the results answer",
                       choices=[*SUITE_NAMES, "all"])
    profile: str = field("cpu-small", "cpu-small (fits 20 min on 2 CPU cores) or full (whole suite, for a GPU)",
                         choices=list(PROFILES))
    workdir: str = field("runs/demo", "where the suite, towers, index and report go (one subdir per suite+profile)")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    max_steps: int | None = field(None, "override the profile's training steps")
    raw_llm: str = field("smollm2", "the raw decoder LLM baseline: smollm2, gemma3 or a causal-LM dir")
    llm_towers: bool = field(True, "also fine-tune the raw LLM as two towers on the same pairs (the "
                                   "towers-smollm2 row): the same model before and after contrastive training")
    llm_max_steps: int | None = field(None, "override the profile's LLM towers training steps")
    rerank: bool = field(True, "also train a cross-encoder reranker on the pairs (negatives mined by the MiniLM "
                               "towers) and bench the towers-minilm+rerank row (their top 20 reordered)")
    llm_precision: str = field("auto", "decoder-LLM encoding and training precision: auto (bf16 where the "
                                       "hardware has it), fp32, bf16", choices=LLM_PRECISIONS)

    def __post_init__(self) -> None:
        check_device(self.device)
        if not self.workdir:
            raise ValueError("--workdir is required (the dir that holds every demo run)")
        if self.suite not in (*SUITE_NAMES, "all"):
            raise ValueError(f"unknown suite '{self.suite}': choose {', '.join(SUITE_NAMES)} or all")
        if self.llm_precision not in LLM_PRECISIONS:
            raise ValueError(f"unknown LLM precision '{self.llm_precision}': choose {', '.join(LLM_PRECISIONS)}")
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile '{self.profile}': choose {', '.join(PROFILES)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"--max-steps must be >= 0 (0: one epoch), got {self.max_steps}")
