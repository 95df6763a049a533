"""``TrainConfig``: every knob of ``twotower train``, one field each (the CLI is generated from it).

Kept free of torch/datasets imports so ``twotower train --help`` stays fast; ``towers.train`` re-exports it.
Fields marked ``resume_ok`` may change between a run and its ``--resume`` (they do not change the maths);
any other difference is refused, because the resumed run would silently not be the run it claims to continue.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from twotower.common.cliargs import check_required, field
from twotower.common.device import check_device

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
MAX_TOKENS = 131_072  # the longest context of any base twotower knows; beyond it a length is a typo
BACKEND_CHOICES = ("auto", "gloo", "nccl")  # towers.distributed.BACKENDS (not imported: keeps --help free of torch)
SELECT_CHOICES = ("best", "last")
# Hard-negative mining's defaults (``twotower mine`` and ``train --hard-negatives``): candidates up to rank 50, none
# scoring above 95% of the positive's score (NV-Retriever's TopK-PercPos).
MINE_RANGE_MAX, MINE_RELATIVE_MARGIN = 50, 0.05
DEV_AUTO, DEV_NONE = "auto", "none"
RECIPE_FIELDS = ("lr", "query_prompt")  # None = the base's recipe (towers.recipe fills them in)
AUTO = "auto"  # a max length measured on the pairs (towers.lengths)
TOWER_KINDS = ("transformer", "static")  # towers.static.TOWER_KINDS (not imported: keeps --help free of torch)


def parse_length(text: str) -> int | str:
    """argparse type of a max-length option: a token count or ``auto``."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {text!r}") from None


parse_length.__name__ = "length"


def split_list(values: Any, flag: str) -> list[str]:
    """``[384, 256]``, ``["384,256"]`` or ``"384,256"`` -> ``["384", "256"]`` (a number that is no number:
    ValueError)."""
    items = [values] if isinstance(values, (str, int, float)) else list(values or [])
    out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    for part in out:
        try:
            float(part)
        except ValueError:
            raise ValueError(f"{flag}: '{part}' is not a number") from None
    return out


@dataclass
class TrainConfig:
    """Configuration of one contrastive training run (see ``twotower train --help``)."""

    pairs: str = field("", "training pairs: .jsonl/.csv/.parquet file or a datasets hub name", required=True,
                       resume_ok=True)
    out: str = field("", "output TOWERS dir (also holds checkpoints/ and train_log.jsonl)", required=True,
                     resume_ok=True)
    base: str = field("minilm", "base model: minilm, smollm2, gemma3 or a local Hugging Face model dir")
    dev: str | None = field(DEV_AUTO, "dev pairs: auto (hold out min(2%%, 1000) pairs of --pairs, grouped so no "
                                      "query and no positive is in both), none (no dev evaluation), or a pairs "
                                      "file; dev recall@10 and nDCG@10 are measured before training and every "
                                      "--eval-every steps", resume_ok=True)
    query_column: str = field("query", "column holding the query text", resume_ok=True)
    positive_column: str = field("positive", "column holding the positive (relevant result) text", resume_ok=True)
    negatives_column: str = field("negatives", "column holding a list of hard-negative texts (optional)",
                                  resume_ok=True)
    negatives_per_query: int = field(1, "hard negatives used per query per step (cycled through each row's list "
                                        "epoch by epoch); 0 ignores the column")
    # Model
    query_tower: str = field("transformer", "kind of query tower: transformer (the base, fine-tuned) or static (a "
                                            "token table + mean pooling distilled from the base's query tower with "
                                            "model2vec, then trained against the result tower: near-free query "
                                            "encoding on CPU; see docs/static.md)", choices=TOWER_KINDS)
    result_tower_from: str | None = field(None, "with --query-tower static: take the result tower from this "
                                                "TOWERS dir, frozen (its index stays valid), and distil the static "
                                                "tower from its query tower; unset = both trained jointly from "
                                                "--base")
    static_lr: float = field(2e-3, "AdamW learning rate of a static query tower's table (a lookup table needs a "
                                   "far larger step than a transformer's 2e-5; no weight decay on it)")
    shared: bool = field(False, "tie the query and result towers (one set of weights)")
    pooling: str | None = field(None, "pooling: mean, cls, last or max; unset = last for decoder LLMs, mean otherwise",
                                choices=("mean", "cls", "last", "max"))
    proj_dim: int | None = field(None, "add a trained linear projection to this many dims; unset = none")
    query_prompt: str | None = field(None, "instruction prepended to every query, e5-style, e.g. 'Instruct: Given a "
                                           "docstring, retrieve the Python function\\nQuery: ' (kept in the TOWERS dir "
                                           "and applied wherever the towers encode; counts into --query-max-length); "
                                           "unset = the base's recipe: a generic instruction for a decoder LLM, none "
                                           "for an encoder; '' = none")
    result_prompt: str = field("", "prompt prepended to every result text (as --query-prompt, for results)")
    append_eos: bool | None = field(None, "end every input with the tokenizer's EOS token (kept in the saved "
                                          "tokenizer); unset = on with last pooling, the decoder-LLM default")
    lora_r: int = field(0, "train LoRA adapters of this rank on the encoders (peft) instead of every weight; "
                           "the TOWERS dir gets the merged weights; 0 = full fine-tuning")
    lora_alpha: float | None = field(None, "LoRA scale alpha (the update is alpha/r x B A); unset = 2 x --lora-r")
    lora_targets: str = field("all-linear", "modules that get LoRA adapters: all-linear or a comma list of "
                                            "module names, e.g. q_proj,k_proj,v_proj,o_proj")
    query_max_length: int | str = field(64, "max query tokens in training (shorter is faster), or auto: the 95th "
                                            "percentile of the tokenised queries of a sample of --pairs, capped "
                                            "by the base's max (printed)", arg_type=parse_length)
    result_max_length: int | str = field(256, "max result tokens in training, or auto (as --query-max-length)",
                                         arg_type=parse_length)
    inference_query_max_length: int | None = field(None, "query tokens at inference (index build, search, serve, "
                                                         "bench, mine, dev evaluation), recorded in the TOWERS "
                                                         "dir; unset = the base's max (256 for minilm)",
                                                   resume_ok=True)
    inference_result_max_length: int | None = field(None, "result tokens at inference (as "
                                                          "--inference-query-max-length); unset = the base's max",
                                                    resume_ok=True)
    hard_negatives: int = field(0, "mine this many hard negatives per pair with the base towers before training "
                                   "(twotower mine's rules: ranks 0-50 among the pairs' positives, none within "
                                   "5%% of the positive's score); they replace the pairs' negatives; 0 = off")
    hard_negatives_rounds: int = field(1, "with --hard-negatives: mining rounds of --max-steps (or --epochs) "
                                          "each; 2 re-mines with the first round's towers and trains on")
    teacher: str = field("", "RERANKER dir (twotower train-reranker) to distil from: adds a margin-MSE term "
                             "(Hofstatter et al. 2020) matching (q.p - q.n) / temperature to the reranker's "
                             "logit margin over each hard negative; needs --hard-negatives N or a negatives "
                             "column; empty = off")
    teacher_weight: float = field(1.0, "weight of the --teacher margin-MSE term next to InfoNCE")
    # Optimisation
    max_steps: int = field(0, "optimizer steps; 0 = --epochs passes over the pairs")
    epochs: int = field(1, "passes over the pairs when --max-steps is 0")
    batch_size: int = field(32, "pairs per step over all processes (each of N encodes batch-size / N); every "
                                "other pair's positive is an in-batch negative, so bigger batches give a harder "
                                "task")
    lr: float | None = field(None, "peak AdamW learning rate; unset = the base's recipe: 1e-4 for a decoder LLM (the "
                                   "demo's SmolLM2 towers), 2e-5 for an encoder (sentence-transformers' default)")
    warmup_ratio: float = field(0.1, "fraction of steps with linear LR warm-up (then linear decay to 0)")
    weight_decay: float = field(0.01, "AdamW weight decay (not applied to biases, norms or the temperature)")
    max_grad_norm: float = field(1.0, "clip the gradient norm to this (0 = no clipping)")
    temperature: float = field(0.05, "softmax temperature of the InfoNCE scores (0.05 = sbert's scale 20)")
    learn_temperature: bool = field(False, "learn the temperature (as log t, clamped to [0.01, 1])")
    temperature_lr: float = field(1e-3, "learning rate of the log-temperature with --learn-temperature (the "
                                        "encoder's LR would barely move it)")
    symmetric: bool = field(False, "add the result->query InfoNCE term (each positive picks its query)")
    matryoshka_dims: list[int] = field([], "Matryoshka: also train these prefix dims, e.g. 384 256 128 64 (a "
                                           "comma list works too); the loss is the weighted sum of InfoNCE at "
                                           "each dim, each prefix re-normalised; index them with `index build "
                                           "--dim`; empty = off", nargs="+", arg_type=str)
    matryoshka_weights: list[float] = field([], "Matryoshka: one loss weight per --matryoshka-dims value "
                                                "(empty = 1 each)", nargs="+", arg_type=str)
    seed: int = field(42, "seed of the data order, dropout and initialisation")
    # Machine
    device: str = field("auto", "auto (cuda when available), cpu, cuda or cuda:N", resume_ok=True)
    amp: str = field("auto", "mixed precision: auto (bf16 or fp16 on CUDA; on a CPU bf16 for a decoder LLM where "
                             "the CPU has it natively, else none: the rule index/bench/demo follow), bf16, fp16, none",
                     choices=AMP_CHOICES)
    gradient_checkpointing: bool = field(False, "recompute activations in backward: less memory, ~30%% slower",
                                         resume_ok=True)
    cache_chunk_size: int = field(0, "GradCache: encode each step's batch in chunks of this many rows per tower "
                                     "(no graph), then re-encode chunk by chunk backpropagating the cached "
                                     "embedding gradients; memory of one chunk, gradients of the whole batch, "
                                     "one extra forward pass; 0 = off", resume_ok=True)
    # Data parallelism (torch.distributed; --batch-size is the global batch, split evenly over the processes)
    nproc: int = field(1, "launch this many processes on this machine with torchrun (one per GPU; gloo on CPU); "
                          "1 = this process only; leave it at 1 when you start torchrun yourself", resume_ok=True)
    backend: str = field("auto", "torch.distributed backend under torchrun: auto (nccl on CUDA, gloo on CPU), "
                                 "nccl or gloo", choices=BACKEND_CHOICES, resume_ok=True)
    dist_timeout: float = field(30.0, "minutes a process waits for the others at a collective (rank 0's dev "
                                      "evaluation and checkpoint writes included) before failing", resume_ok=True)
    # Monitoring and checkpoints
    log_every: int = field(10, "write loss, LR and pairs/s to train_log.jsonl every N steps", resume_ok=True)
    eval_every: int = field(100, "measure dev recall@10 and nDCG@10 every N steps (also before and after "
                                 "training); 0 = only before and after", resume_ok=True)
    select: str = field("best", "weights saved as the TOWERS: best (the evaluation with the highest dev "
                                "nDCG@10) or last", choices=SELECT_CHOICES, resume_ok=True)
    patience: int = field(0, "stop after this many dev evaluations in a row without a new best nDCG@10; "
                             "0 = never stop early", resume_ok=True)
    allow_no_gain: bool = field(False, "exit 0 even when the towers do not beat the untrained base on dev "
                                       "(default: the towers are saved, flagged \"improved\": false, exit 3)",
                                resume_ok=True)
    eval_batch_size: int = field(64, "encoding batch size for the dev evaluation", resume_ok=True)
    checkpoint_every: int = field(100, "write a resumable checkpoint every N steps (0 = never)", resume_ok=True)
    keep_checkpoints: int = field(2, "keep only the newest N checkpoints (0 = keep all)", resume_ok=True)
    resume: bool = field(False, "continue from the newest complete checkpoint in --out", resume_ok=True)
    overwrite: bool = field(False, "start over in an --out that already holds a run (deletes its checkpoints)",
                            resume_ok=True)

    def __post_init__(self) -> None:
        check_required(self)
        check_device(self.device)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        positive = ("batch_size", "temperature", "log_every", "eval_batch_size", "temperature_lr",
                    "hard_negatives_rounds", "teacher_weight")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "epochs", "negatives_per_query", "weight_decay", "max_grad_norm", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "cache_chunk_size", "lora_r", "patience",
                     "hard_negatives"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (in-batch negatives need other rows), got {self.batch_size}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("give --max-steps or --epochs (both are 0)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        for name in ("query_max_length", "result_max_length", "inference_query_max_length",
                     "inference_result_max_length"):
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value is None or (value == AUTO and not name.startswith("inference")):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                auto = "" if name.startswith("inference") else " or auto"
                raise ValueError(f"{flag} must be a number of tokens{auto}, got {value!r}")
            if value <= 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
            if value > MAX_TOKENS:
                raise ValueError(f"{flag} must be <= {MAX_TOKENS} tokens, got {value}")
        if self.dev is None:  # the Python API's "no dev file" before the automatic split existed
            self.dev = DEV_NONE
        if not self.dev:
            raise ValueError(f"--dev is empty: give {DEV_AUTO}, {DEV_NONE} or a pairs file")
        if self.select not in SELECT_CHOICES:
            raise ValueError(f"unknown select '{self.select}': choose {', '.join(SELECT_CHOICES)}")
        if self.hard_negatives_rounds > 1 and not self.hard_negatives:
            raise ValueError("--hard-negatives-rounds needs --hard-negatives N (negatives per pair to mine)")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown backend '{self.backend}': choose {', '.join(BACKEND_CHOICES)}")
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0, got {self.dist_timeout}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"unknown amp '{self.amp}': choose {', '.join(AMP_CHOICES)}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not self.lora_targets.strip(", "):
            raise ValueError("--lora-targets is empty: give all-linear or module names such as q_proj,v_proj")
        self.matryoshka_dims = [int(d) for d in split_list(self.matryoshka_dims, "--matryoshka-dims")]
        self.matryoshka_weights = [float(w) for w in split_list(self.matryoshka_weights, "--matryoshka-weights")]
        if any(d < 1 for d in self.matryoshka_dims) or len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
            raise ValueError(f"--matryoshka-dims must be distinct positive dims, got {self.matryoshka_dims}")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka_dims):
            raise ValueError(f"--matryoshka-weights needs one weight per --matryoshka-dims value: "
                             f"{len(self.matryoshka_dims)} dims, {len(self.matryoshka_weights)} weights")
        if any(not w >= 0 or w != w or w == float("inf") for w in self.matryoshka_weights):
            raise ValueError(f"--matryoshka-weights must be finite and >= 0, got {self.matryoshka_weights}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one")
        self._check_query_tower()

    def _check_query_tower(self) -> None:
        """A static query tower's incompatible options, refused before anything loads."""
        if self.query_tower not in TOWER_KINDS:
            raise ValueError(f"unknown query tower '{self.query_tower}': choose {', '.join(TOWER_KINDS)}")
        if not self.static_lr > 0:
            raise ValueError(f"--static-lr must be > 0, got {self.static_lr}")
        if self.query_tower != "static":
            if self.result_tower_from:
                raise ValueError("--result-tower-from needs --query-tower static")
            return
        for flag, on in (("--shared", self.shared), ("--lora-r", self.lora_r), ("--proj-dim", self.proj_dim)):
            if on:
                raise ValueError(f"--query-tower static cannot be combined with {flag}: a static tower is one "
                                 "token table with no encoder, no adapters and no projection")

    def matryoshka(self) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """(dims, weights) of the Matryoshka loss, or None when it is off."""
        if not self.matryoshka_dims:
            return None
        return tuple(self.matryoshka_dims), tuple(self.matryoshka_weights or [1.0] * len(self.matryoshka_dims))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def dev_file(self) -> str | None:
        """The ``--dev`` pairs file, or None for ``auto`` / ``none``."""
        return None if self.dev in (DEV_AUTO, DEV_NONE) else self.dev

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Human-readable differences from a checkpoint's config in fields that change the training maths."""
        out = []
        for f in dataclasses.fields(self):
            if f.metadata.get("resume_ok") or f.name not in saved:
                continue
            if getattr(self, f.name) is None and f.name in RECIPE_FIELDS:  # unset: the same base gives the same value
                continue
            if saved[f.name] != getattr(self, f.name):
                out.append(f"{f.name}: checkpoint has {saved[f.name]!r}, this run has {getattr(self, f.name)!r}")
        return out
