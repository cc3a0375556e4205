"""Tokenization: examples -> variable-length int32 token arrays (padding happens in batching).

One batched call of a Hugging Face fast tokenizer encodes the whole split; sentence pairs go in as
`tokenizer(a, b)`, so the tokenizer places its own separators and segment ids, and `truncation=True`
(longest first) keeps every sequence within `max_length` including special tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pifi_jax.data.sources import Examples


def load_tokenizer(path_or_hub_id: str):
    """A fast tokenizer from a local directory (works offline) or a hub id."""
    import transformers  # heavy; imported when a tokenizer is needed

    return transformers.AutoTokenizer.from_pretrained(str(path_or_hub_id), use_fast=True)


@dataclasses.dataclass
class Encoded:
    input_ids: list[np.ndarray]  # per example: [length] int32, length <= max_length
    token_type_ids: list[np.ndarray]  # per example: [length] int32
    labels: np.ndarray  # [n]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    output = tokenizer(*examples.texts, truncation=True, max_length=max_length)
    input_ids = [np.asarray(ids, dtype=np.int32) for ids in output["input_ids"]]
    if "token_type_ids" in output:
        token_type_ids = [np.asarray(t, dtype=np.int32) for t in output["token_type_ids"]]
    else:  # e.g. RoBERTa: a single segment embedding, id 0
        token_type_ids = [np.zeros_like(ids) for ids in input_ids]
    # Decoder tokenizers (GPT-2, Llama) define no pad token; padded positions are masked anyway.
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Encoded(input_ids, token_type_ids, examples.labels, int(pad_id))
