"""Corpus-level text-generation metrics on the host: ROUGE-1/2/L/Lsum, BLEU and chrF, in 0..100.

Decoded predictions and their references are scored once over the whole evaluation set (the way
flax `examples/wmt` scores BLEU after decoding), never averaged over batches:

    generation_metrics(["the cat sat on the mat"], ["a cat sat on the mat"])
    # {"rouge1": 83.3, "rouge2": 80.0, "rougeL": 83.3, "rougeLsum": 83.3, "bleu": 75.98}

ROUGE comes from Google's `rouge-score` package with Porter stemming ("running" and "runs" both
count as "run"). Its corpus figure is the mean over examples of each example's F-measure. Hugging
Face `evaluate`'s "rouge" with `use_aggregator=True` reports the median of bootstrap resamples of
that same mean (`BootstrapAggregator().aggregate()[type].mid.fmeasure`), which differs from it only
by resampling noise; the plain mean is exact and repeatable, so it is what is reported here.

rougeLsum is the summary-level LCS over sentences, and `rouge-score` takes sentences to be the
lines of the text. nltk's punkt sentence splitter needs data that is not available offline, so both
sides are split by a regex instead: a sentence ends at ".", "!" or "?" followed by whitespace, and an
existing newline also ends one. The split changes only whitespace, and ROUGE-1/2/L tokenize every
whitespace run the same way, so one scorer on the split texts gives all four ROUGE figures.

BLEU and chrF are sacrebleu's corpus scores with its defaults (BLEU: 13a tokenization, exponential
smoothing, one reference per prediction).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
KNOWN_METRICS = (*ROUGE_METRICS, "bleu", "chrf", "exact_match", "answer_accuracy")
DEFAULT_METRICS = (*ROUGE_METRICS, "bleu")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def split_sentences(text: str) -> str:
    """The text with one sentence per line, as rougeLsum expects."""
    return "\n".join(part for part in _SENTENCE_END.split(text.strip()) if part)


def generation_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    names: Sequence[str] = DEFAULT_METRICS,
    answers: Sequence[str] = (),
) -> dict[str, float]:
    """Corpus-level scores (0..100) of `predictions` against one reference each, keyed by name.

    names: any of "rouge1", "rouge2", "rougeL", "rougeLsum" (each the mean over examples of the
      stemmed ROUGE F-measure), "bleu" (sacrebleu corpus BLEU), "chrf" (sacrebleu corpus chrF)
      "exact_match" (the share of predictions equal to their reference after lower-casing
      and collapsing whitespace: short answers such as "true" or "solution2") and
      "answer_accuracy" (the share whose first answer word, the first of `answers` found in
      the prediction as a whole word, is the reference: a model that answers and then goes on
      talking is right where exact match says it is wrong).
    answers: the task's answer words ("true", "false"), which answer_accuracy needs.
    """
    unknown = [name for name in names if name not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known metrics: {list(KNOWN_METRICS)}")
    if "answer_accuracy" in names and not answers:
        raise ValueError(
            "answer_accuracy needs the task's answer words (answers=...); tasks with a fixed set "
            "of answers (the commonsense and SuperGLUE sets) give them"
        )
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: "
            "each prediction needs exactly one reference"
        )
    if not predictions:
        raise ValueError("no predictions to score: corpus metrics need at least one example")
    for side, texts in (("predictions", predictions), ("references", references)):
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"{side}[{row}] is {type(text).__name__}, not str: decode token ids first"
                )

    results: dict[str, float] = {}
    rouge_types = [name for name in ROUGE_METRICS if name in names]
    if rouge_types:
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=True)
        fmeasures = {name: [] for name in rouge_types}
        for prediction, reference in zip(predictions, references, strict=True):
            scores = scorer.score(split_sentences(reference), split_sentences(prediction))
            for name in rouge_types:
                fmeasures[name].append(scores[name].fmeasure)
        results.update({name: 100.0 * float(np.mean(fmeasures[name])) for name in rouge_types})
    if "bleu" in names:
        results["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    if "chrf" in names:
        results["chrf"] = float(sacrebleu.corpus_chrf(predictions, [references]).score)
    if "exact_match" in names:
        same = [_normal(p) == _normal(r) for p, r in zip(predictions, references, strict=True)]
        results["exact_match"] = 100.0 * float(np.mean(same))
    if "answer_accuracy" in names:
        from pifi_jax.data.olmo_eval import first_answer  # noqa: PLC0415

        pairs = zip(predictions, references, strict=True)
        right = [first_answer(p, answers) == _normal(r) for p, r in pairs]
        results["answer_accuracy"] = 100.0 * float(np.mean(right))
    return {name: results[name] for name in names}


def _normal(text: str) -> str:
    return " ".join(text.lower().split())
