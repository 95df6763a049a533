"""Decoder-LLM towers the way the field builds them (e5-mistral, Tevatron ``--pooling eos --append_eos_token``):
an EOS token closes every input, and the tower pools the last token's hidden state, which has then read the
whole text.

The EOS lives in the tokenizer itself (its post-processor template), not in twotower's code: the TOWERS dir
then tokenises the same way wherever it is loaded (``Tower``, ``AutoTokenizer``, ``SentenceTransformer``), and
truncation to ``max_length`` keeps the EOS (a tokenizer counts its special tokens into the budget).

Left padding (what decoder tokenizers often use) shifts a text's positions by its pad count; RoPE models
(Llama, Gemma) do not see it, absolute-position models (GPT-2) do. :func:`position_ids` numbers the real tokens
from 0 whatever the padding side, so a text gets the same vector padded left, right or not at all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import processors

# model_type values of decoder-only LLMs whose config.json does not say is_decoder.
DECODER_MODEL_TYPES = ("llama", "gpt2", "gemma", "gemma2", "gemma3_text", "gemma3", "qwen2", "qwen3", "mistral",
                       "phi3", "olmo2", "smollm3")


def is_decoder_config(config: dict[str, Any]) -> bool:
    """True for a decoder-only LLM's ``config.json`` (causal-LM architecture, is_decoder or a known model type)."""
    return bool(config.get("is_decoder") or any("CausalLM" in a for a in config.get("architectures") or [])
                or config.get("model_type") in DECODER_MODEL_TYPES)


def is_decoder_dir(model_dir: str | Path) -> bool:
    return is_decoder_config(json.loads((Path(model_dir) / "config.json").read_text()))


def default_pooling(model_dir: str | Path) -> str:
    """``last`` (the EOS token's state) for decoder LLMs, ``mean`` for encoders like BERT/MiniLM."""
    return "last" if is_decoder_dir(model_dir) else "mean"


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(special ids the tokenizer puts before a text, after it, the text's own ids) for a probe text."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return with_special[:i], with_special[i + len(plain):], plain
    raise ValueError("the tokenizer adds tokens inside the text; cannot tell where a text ends")


def appends_eos(tokenizer: Any) -> bool:
    """True when the tokenizer ends every input with its EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    _, tail, _ = _special_frame(tokenizer)
    return bool(tail) and tail[-1] == eos


def append_eos(tokenizer: Any) -> bool:
    """Make a fast tokenizer end every input with its EOS token (kept by ``save_pretrained``).

    The tokenizer's own special tokens (a BOS, say) stay where they were; the EOS goes after them. A no-op
    when the tokenizer already ends inputs with its EOS.

    Returns:
        True when inputs now end with EOS; False when the tokenizer has no EOS token (BERT-style tokenizers
        close inputs with [SEP] already).

    Raises:
        ValueError: a slow (Python) tokenizer, whose template cannot be changed.
    """
    if tokenizer.eos_token_id is None:
        return False
    if appends_eos(tokenizer):
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"cannot append EOS with a slow tokenizer ({type(tokenizer).__name__}); use a fast one")
    head, tail, _ = _special_frame(tokenizer)
    ids = head + tail + [tokenizer.eos_token_id]
    tokens = tokenizer.convert_ids_to_tokens(ids)

    def part(seq: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in tokens[:len(head)]] + [f"${seq}:{type_id}"] + \
            [f"{t}:{type_id}" for t in tokens[len(head):]]

    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(part("A", 0)), pair=" ".join(part("A", 0) + part("B", 1)),
        special_tokens=sorted(set(zip(tokens, ids))))
    if not appends_eos(tokenizer):
        raise ValueError(f"could not make {type(tokenizer).__name__} append its EOS token")
    return True


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only: a text's first token is 0 whether padded left or right."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def left_padded(attention_mask: torch.Tensor) -> bool:
    """True when some row starts with padding (its positions must then be given explicitly)."""
    return bool(attention_mask.shape[1]) and not bool(attention_mask[:, 0].all())
