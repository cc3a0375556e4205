"""Extractive question answering on the host: answer spans from start/end logits, SQuAD scores.

Post-processing (`best_answers`) follows the usual recipe for SQuAD-style models: a long context
is split into overlapping windows (data.spans), each window gets start and end logits over its
tokens, and an example's answer is the best span over all its windows:
  - in each window, the `n_best` highest start logits and the `n_best` highest end logits among
    the CONTEXT tokens (question, special and padding tokens never start or end an answer) are
    paired;
  - a pair is a candidate when end >= start and it spans at most `max_answer_tokens` tokens; its
    score is start logit + end logit;
  - the best candidate of every window competes; its text is the context's characters from the
    start token's first character to the end token's last (the tokenizer's offset mapping), so
    the answer is an exact substring of the context, whitespace and case as written there.
An example with no candidate (every window too short of context) answers "".

Scores (`squad_scores`) are SQuAD's official ones, in 0..100: a prediction and each gold answer
are normalised (lower case; punctuation removed; the articles "a", "an", "the" removed as words;
whitespace collapsed), exact match is 1 when the normalised strings are equal, F1 is the harmonic
mean of precision and recall of the normalised tokens (a bag: repeated tokens count as often as
they repeat in both); each example takes its best over its gold answers, and the corpus figure is
the mean over examples. As in SQuAD 2.0's script, when a normalised prediction or gold answer is
empty F1 is 1 if both are, else 0 (SQuAD 1.1's script never meets an empty gold answer).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings."""
    ours, theirs = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not ours or not theirs:
        return float(ours == theirs)
    same = sum((collections.Counter(ours) & collections.Counter(theirs)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(ours), same / len(theirs)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in 0..100: the mean over examples of the best score over each
    example's gold answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    em, f = [], []
    for row, (prediction, gold) in enumerate(zip(predictions, answers, strict=True)):
        if isinstance(gold, str) or not gold:
            raise ValueError(
                f"answers[{row}] must be a non-empty list of gold answers, got {gold!r}"
            )
        em.append(max(exact_match(prediction, g) for g in gold))
        f.append(max(f1(prediction, g) for g in gold))
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f))}


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    is_context: np.ndarray,
    n_best: int = 20,
    max_answer_tokens: int = 30,
) -> tuple[float, int, int] | None:
    """The best (score, start, end) token span of one window, or None when it has no candidate.

    start_logits, end_logits: [length]; is_context: [length] bool, the tokens that may start or
    end an answer.
    """
    context = np.flatnonzero(is_context)
    if context.size == 0:
        return None
    k = min(n_best, context.size)
    starts = context[np.argsort(-start_logits[context], kind="stable")[:k]]
    ends = context[np.argsort(-end_logits[context], kind="stable")[:k]]
    best = None
    for s in starts:
        for e in ends:
            if e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, int(s), int(e))
    return best


def best_answers(
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    offsets: Sequence[np.ndarray],
    window_example: np.ndarray,
    contexts: Sequence[str],
    n_best: int = 20,
    max_answer_tokens: int = 30,
) -> list[str]:
    """Each example's answer text from its windows' logits (see the module docstring).

    start_logits / end_logits: per window, [length] (at least the window's tokens);
    offsets: per window, [tokens, 2] character offsets into its example's context, (-1, -1) for
    tokens outside the context; window_example: [windows] the example of each window;
    contexts: per example, the context text.
    """
    best: dict[int, tuple[float, int, int, int]] = {}
    for w, example in enumerate(np.asarray(window_example)):
        spans = np.asarray(offsets[w])
        tokens = len(spans)
        found = best_span(
            np.asarray(start_logits[w])[:tokens],
            np.asarray(end_logits[w])[:tokens],
            spans[:, 0] >= 0,
            n_best,
            max_answer_tokens,
        )
        if found is not None and (example not in best or found[0] > best[example][0]):
            best[int(example)] = (*found, w)
    answers = []
    for example, context in enumerate(contexts):
        if example not in best:
            answers.append("")
            continue
        _, s, e, w = best[example]
        spans = np.asarray(offsets[w])
        answers.append(context[int(spans[s, 0]) : int(spans[e, 1])])
    return answers
