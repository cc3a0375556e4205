"""Tokenization: examples -> variable-length int32 token arrays (padding happens in batching).

One batched call of a Hugging Face fast tokenizer encodes the whole split; sentence pairs go in as
`tokenizer(a, b)`, so the tokenizer places its own separators and segment ids, and `truncation=True`
(longest first) keeps every sequence within `max_length` including special tokens.

Generation tasks (`encode_generation`) come in one of two layouts, which `Batcher` pads:
  causal_lm  input_ids = prompt + target + eos, `prompt_lengths` says where the target starts;
             the prompt is `prompt.format(source=...)` with the tokenizer's own specials (BOS),
             the target is tokenized without specials (a space in front unless the prompt ends
             in whitespace) and closed with eos. Prompts longer than `max_length` lose their
             start (the end of a prompt holds the cue to answer).
  seq2seq    input_ids = the tokenizer's encoding of the prompt (its eos included, truncated to
             `max_length`); target_ids = its encoding of the target (eos included).
A target longer than `max_target_length` tokens is refused, naming the file, column and row:
truncating it would teach the model to stop mid-answer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pifi_jax import assets
from pifi_jax.data.sources import Examples


def load_tokenizer(path_or_hub_id: str):
    """A fast tokenizer from a local directory (works offline), a GGUF file (the tokenizer
    llama.cpp stores in it; transformers reads it offline), an offline asset (`asset:minilm`)
    or a hub id."""
    import transformers  # heavy; imported when a tokenizer is needed

    if str(path_or_hub_id).startswith(assets.PREFIX):
        path_or_hub_id = assets.locate(str(path_or_hub_id))
    path = Path(str(path_or_hub_id)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(str(path_or_hub_id), use_fast=True)


LAYOUTS = ("classification", "causal_lm", "seq2seq", "span")


@dataclasses.dataclass
class Encoded:
    input_ids: list[np.ndarray]  # per example: [length] int32
    token_type_ids: list[np.ndarray] | None  # per example: [length] int32 (classification)
    labels: np.ndarray | None  # [n] (classification / regression)
    pad_id: int
    layout: str = "classification"  # one of LAYOUTS
    prompt_lengths: np.ndarray | None = None  # causal_lm: [n] prompt tokens at the front
    target_ids: list[np.ndarray] | None = None  # seq2seq: per example [target length] int32
    references: list[str] | None = None  # generation: the target texts, for scoring
    # span (extractive QA, data.spans): rows are windows of a question + part of its context.
    start_positions: np.ndarray | None = None  # [windows] the answer's first token (0: none)
    end_positions: np.ndarray | None = None  # [windows] its last token (0: none)
    window_example: np.ndarray | None = None  # [windows] the example of each window
    offsets: list[np.ndarray] | None = None  # per window [tokens, 2] context chars, -1 outside
    contexts: list[str] | None = None  # per example
    answers: list[tuple[str, ...]] | None = None  # per example, every gold answer

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    output = tokenizer(*examples.texts, truncation=True, max_length=max_length)
    input_ids = [np.asarray(ids, dtype=np.int32) for ids in output["input_ids"]]
    if "token_type_ids" in output:
        token_type_ids = [np.asarray(t, dtype=np.int32) for t in output["token_type_ids"]]
    else:  # e.g. RoBERTa: a single segment embedding, id 0
        token_type_ids = [np.zeros_like(ids) for ids in input_ids]
    return Encoded(input_ids, token_type_ids, examples.labels, pad_id_of(tokenizer))


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id; decoder tokenizers (GPT-2, Llama) define none, and padded
    positions are masked anyway, so eos (or 0) stands in."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad_id)


def encode_generation(
    tokenizer,
    examples: Examples,
    *,
    layout: str,
    prompt: str,
    max_length: int,
    max_target_length: int,
    target_column: str = "target",
) -> Encoded:
    """Tokenizes source/target examples for the `causal_lm` or `seq2seq` layout (module
    docstring); `prompt` formats each source (`{source}`)."""
    if layout not in ("causal_lm", "seq2seq"):
        raise ValueError(f"layout {layout!r} is not a generation layout (causal_lm, seq2seq)")
    if examples.targets is None:
        raise ValueError(f"{examples.origin}: the examples have no targets (not a generation task)")
    prompts = [prompt.format(source=s) for s in examples.texts[0]]
    rows = examples.rows if examples.rows is not None else np.arange(len(prompts))
    pad_id = pad_id_of(tokenizer)
    if layout == "seq2seq":
        sources = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
        targets = tokenizer(list(examples.targets))["input_ids"]
        extra = 0
    else:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token: a causal LM could not learn to stop")
        sources = tokenizer(prompts)["input_ids"]
        spaced = [
            t if p[-1:].isspace() else " " + t
            for p, t in zip(prompts, examples.targets, strict=True)
        ]
        targets = tokenizer(spaced, add_special_tokens=False)["input_ids"]
        targets = [list(t) + [eos] for t in targets]
        extra = 1
    for i, target in enumerate(targets):
        if len(target) > max_target_length:
            raise ValueError(
                f"{examples.origin}: column {target_column!r} row {int(rows[i])}: the target has "
                f"{len(target) - extra} tokens{' + eos' if extra else ''}, more than "
                f"max_target_length={max_target_length} (data.max_target_length; the largest "
                "target bucket must hold it too)"
            )
    as_array = lambda ids: np.asarray(ids, dtype=np.int32)  # noqa: E731
    references = list(examples.targets)
    if layout == "seq2seq":
        return Encoded(
            [as_array(s) for s in sources],
            None,
            None,
            pad_id,
            layout="seq2seq",
            target_ids=[as_array(t) for t in targets],
            references=references,
        )
    # Over-long prompts keep their end (the cue to answer), and their BOS in front.
    bos = tokenizer.bos_token_id
    sources = [
        s
        if len(s) <= max_length
        else ([s[0], *s[len(s) - max_length + 1 :]] if s[0] == bos else s[-max_length:])
        for s in sources
    ]
    return Encoded(
        [as_array(list(s) + t) for s, t in zip(sources, targets, strict=True)],
        None,
        None,
        pad_id,
        layout="causal_lm",
        prompt_lengths=np.array([len(s) for s in sources], dtype=np.int64),
        references=references,
    )
