"""Extractive QA encoding: (question, context) -> overlapping windows with answer token spans.

A context longer than fits next to its question is cut into windows of at most `max_length`
tokens (question + context part + the tokenizer's specials); consecutive windows share `stride`
context tokens, so an answer cut by one window's edge lies whole in the next. Each window is one
row of the "span" layout:
  input_ids, token_type_ids   the tokenizer's pair encoding (question first; segment ids where
                              the tokenizer has them, else 0)
  start_positions, end_positions
                              the first and last token of the example's first gold answer when
                              the window holds all of it, else 0 and 0 (the first token, [CLS]:
                              "no answer here", as transformers' QA heads are trained)
  offsets                     per token, its characters [begin, end) in the context; (-1, -1)
                              for question, special and padding tokens
The answer's characters are the source's `answer_start` when it has one (hub SQuAD); otherwise
the first occurrence of the answer text in the context (exact, then ignoring case), which is how
the offline SQuAD rows (answers as texts only) are located; a training answer found nowhere in its
context is refused naming the file and row.
"""

from __future__ import annotations

import numpy as np

from pifi_jax.data.sources import Examples
from pifi_jax.data.tokenize import Encoded, pad_id_of


def answer_span(context: str, answer: str, start: int | None) -> tuple[int, int] | None:
    """[begin, end) characters of `answer` in `context`: at `start` when given (and matching),
    else its first occurrence (exact, then case-insensitive); None if it is not there."""
    if start is not None and start >= 0 and context[start : start + len(answer)] == answer:
        return start, start + len(answer)
    found = context.find(answer)
    if found < 0:
        found = context.lower().find(answer.lower())
    return None if found < 0 else (found, found + len(answer))


def encode_spans(
    tokenizer, examples: Examples, max_length: int, stride: int = 128, *, train: bool = True
) -> Encoded:
    """Windows of every example (see the module docstring); `train` refuses answers that are not
    in their context (evaluation keeps them: scoring needs only the texts). Examples without
    answers (inputs to predict) get windows only."""
    questions, contexts = examples.texts
    rows = examples.rows if examples.rows is not None else np.arange(len(examples))
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if stride >= max_length - specials:
        raise ValueError(f"data.doc_stride={stride} must be below data.max_length={max_length}")
    room = max_length - specials - stride
    question_ids = tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(question_ids):
        if len(ids) >= room:
            raise ValueError(
                f"{examples.origin}: row {rows[i]}: the question is {len(ids)} tokens; with "
                f"data.max_length={max_length} and data.doc_stride={stride} at most {room - 1} "
                "fit beside a part of the context (raise max_length or lower doc_stride)"
            )
    spans = []
    golds = examples.answers if examples.answers is not None else [None] * len(examples)
    if examples.answers is None and train:
        raise ValueError(f"{examples.origin}: training windows need answers")
    for i, (context, gold) in enumerate(zip(contexts, golds, strict=True)):
        if gold is None:  # inputs to predict: no answer to locate
            spans.append(None)
            continue
        start = None if examples.answer_starts is None else examples.answer_starts[i]
        span = answer_span(context, gold[0], start)
        if span is None and train:
            raise ValueError(
                f"{examples.origin}: row {rows[i]}: the answer {gold[0]!r} is not in its context"
            )
        spans.append(span)
    out = tokenizer(
        list(questions),
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    input_ids, token_types, offsets, starts, ends = [], [], [], [], []
    window_example = np.asarray(out["overflow_to_sample_mapping"], np.int32)
    for w, example in enumerate(window_example):
        ids = np.asarray(out["input_ids"][w], np.int32)
        sequence = out.sequence_ids(w)
        spans_w = np.asarray(out["offset_mapping"][w], np.int64).reshape(-1, 2)
        in_context = np.array([s == 1 for s in sequence])
        spans_w[~in_context] = -1
        input_ids.append(ids)
        types = out["token_type_ids"][w] if "token_type_ids" in out else np.zeros_like(ids)
        token_types.append(np.asarray(types, np.int32))
        offsets.append(spans_w)
        s = e = 0
        span = spans[example]
        context_tokens = np.flatnonzero(in_context)
        if span is not None and context_tokens.size:
            first, last = context_tokens[0], context_tokens[-1]
            if spans_w[first, 0] <= span[0] and spans_w[last, 1] >= span[1]:
                # first token ending after the answer's start, last token starting before its end
                s = int(context_tokens[np.argmax(spans_w[context_tokens, 1] > span[0])])
                e = int(context_tokens[np.flatnonzero(spans_w[context_tokens, 0] < span[1])[-1]])
        starts.append(s)
        ends.append(e)
    return Encoded(
        input_ids,
        token_types,
        None,
        pad_id_of(tokenizer),
        layout="span",
        start_positions=np.asarray(starts, np.int32),
        end_positions=np.asarray(ends, np.int32),
        window_example=window_example,
        offsets=offsets,
        contexts=list(contexts),
        answers=None if examples.answers is None else [tuple(a) for a in examples.answers],
    )
