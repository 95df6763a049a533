"""RawLLMEncoder on a tiny random Llama: poolings are what they claim, padding side does not matter, cache works."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.eval.raw_llm import LLM_POOLINGS, RawLLMEncoder

TEXTS = ["a short one", "a much longer text with many more tokens in it than the first", "mid length text"]


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _manual(model_dir, enc: RawLLMEncoder, text: str) -> dict[str, np.ndarray]:
    """Forward one text alone (no padding at all) and pool by hand."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc._load_model()
    ids = torch.tensor([enc._prompt_ids([text])[0]])
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][0]  # (T, H) final layer, after the final norm
    vecs = {"last": hidden[-1], "mean": hidden.mean(0), "logits": out.logits[0, -1]}
    return {p: torch.nn.functional.normalize(v, dim=-1).numpy() for p, v in vecs.items()}


@pytest.mark.parametrize("side", ["left", "right"])
def test_poolings_match_single_text_forward(tiny_llama_dir, cache_env, side: str) -> None:
    # float32 (auto is bf16 on CPUs with native bf16): the reference forward below is float32
    enc = RawLLMEncoder(str(tiny_llama_dir), prompt="promptEOL", max_length=64, batch_size=8, cache=False,
                        precision="fp32")
    enc._load_model()
    enc._tokenizer.padding_side = side
    got = enc.encode_all_poolings(TEXTS)
    vocab = enc._model.get_output_embeddings().out_features
    assert got["logits"].shape == (3, vocab) and got["last"].shape == (3, 32) and got["mean"].shape == (3, 32)
    for i, text in enumerate(TEXTS):
        ref = _manual(tiny_llama_dir, enc, text)
        for p in LLM_POOLINGS:
            np.testing.assert_allclose(got[p][i], ref[p], atol=2e-5, err_msg=f"{p} row {i} ({side} padding)")
    for p in LLM_POOLINGS:
        np.testing.assert_allclose(np.linalg.norm(got[p], axis=1), 1.0, atol=1e-5)


def test_encode_single_pooling_and_dim(tiny_llama_dir, cache_env) -> None:
    enc = RawLLMEncoder(str(tiny_llama_dir), pooling="logits", prompt=None, max_length=32, cache=False)
    x = enc.encode(TEXTS)
    assert x.dtype == np.float32 and x.shape == (3, enc.dim) and enc.dim == enc.vocab_size
    assert RawLLMEncoder(str(tiny_llama_dir), pooling="mean", cache=False).dim == 32


def test_prompt_survives_truncation(tiny_llama_dir, cache_env) -> None:
    enc = RawLLMEncoder(str(tiny_llama_dir), max_length=24, cache=False)
    enc._load_model()
    (ids,) = enc._prompt_ids(["word " * 200])
    tok = enc._tokenizer
    head = tok('This sentence : "', add_special_tokens=False)["input_ids"]
    tail = tok('" means in one word:"', add_special_tokens=False)["input_ids"]
    word = tok("word", add_special_tokens=False)["input_ids"]
    # The tiny model borrows a BERT tokenizer: [CLS] first, [SEP] last (the tokenizer's own convention).
    assert ids == [tok.cls_token_id, *head, *(word * 24), *tail, tok.sep_token_id]


def test_cache_returns_identical_arrays_without_the_model(tiny_llama_dir, cache_env) -> None:
    first = RawLLMEncoder(str(tiny_llama_dir), max_length=32).encode_all_poolings(TEXTS)
    again = RawLLMEncoder(str(tiny_llama_dir), max_length=32)

    def no_model() -> None:
        raise AssertionError("the model must not be loaded when every text is cached")

    again._load_model = no_model  # type: ignore[method-assign]
    second = again.encode_all_poolings(list(reversed(TEXTS)))
    for p in LLM_POOLINGS:
        np.testing.assert_array_equal(second[p], first[p][::-1])
    # A different max length is a different cache key: the model runs again.
    other = RawLLMEncoder(str(tiny_llama_dir), max_length=16)
    other._load_model = no_model  # type: ignore[method-assign]
    with pytest.raises(AssertionError, match="must not be loaded"):
        other.encode(TEXTS)


def test_partial_cache_hit_encodes_only_new_texts(tiny_llama_dir, cache_env) -> None:
    enc = RawLLMEncoder(str(tiny_llama_dir), max_length=32)
    a = enc.encode_all_poolings(TEXTS[:2], ("last",))["last"]
    b = enc.encode_all_poolings(TEXTS, ("last",))["last"]
    np.testing.assert_array_equal(b[:2], a)
    fresh = RawLLMEncoder(str(tiny_llama_dir), max_length=32, cache=False).encode(TEXTS)
    np.testing.assert_allclose(b, fresh, atol=1e-5)


def test_errors_name_the_choices(tiny_llama_dir, cache_env) -> None:
    with pytest.raises(ValueError, match="unknown raw-llm pooling 'avg': choose last, mean, logits"):
        RawLLMEncoder(str(tiny_llama_dir), pooling="avg")
    with pytest.raises(ValueError, match="unknown prompt 'eol'"):
        RawLLMEncoder(str(tiny_llama_dir), prompt="eol")
    with pytest.raises(ValueError, match="unknown base model"):
        RawLLMEncoder("no-such-model")


def test_per_call_max_length_is_its_own_cache(tiny_llama_dir, cache_env) -> None:
    enc = RawLLMEncoder(str(tiny_llama_dir), pooling="last", max_length=32)
    short = enc.encode_all_poolings(TEXTS, ("last",), max_length=3)["last"]
    ref = RawLLMEncoder(str(tiny_llama_dir), pooling="last", max_length=3, cache=False).encode(TEXTS)
    np.testing.assert_allclose(short, ref, atol=1e-5)
    long = enc.encode(TEXTS)
    assert not np.allclose(long[1], short[1])  # the long text differs once truncated to 3 tokens
