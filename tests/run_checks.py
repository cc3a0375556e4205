"""Checks of a finished run: the metrics it reports, recomputed from what it predicted example by
example (predictions_<split>.jsonl), and those predictions matched with the data files' rows.

A range check (0 <= accuracy <= 1) passes whatever the metric computes; these fail when the
metric, the labels or the rows scored are wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest


def read_predictions(workdir, split: str) -> list[dict]:
    """The rows of `workdir`/predictions_<split>.jsonl."""
    lines = (Path(workdir) / f"predictions_{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def read_column(data_file, column: str) -> list[str]:
    with open(data_file, newline="", encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f)]


def _check_rows(rows: list[dict], truth: list, key: str, rows_expected: int | None) -> None:
    """One prediction per example (`rows_expected`, or every row of the data file), each exactly
    once, carrying the data file's own label / reference for its row."""
    indices = [row["index"] for row in rows]
    assert len(set(indices)) == len(indices), "an example is predicted twice"
    assert len(rows) == (len(truth) if rows_expected is None else rows_expected)
    assert all(0 <= i < len(truth) for i in indices)
    assert [row[key] for row in rows] == [truth[i] for i in indices], f"{key}s do not match"


def f1_macro(predictions: list, labels: list) -> float:
    """Unweighted mean over the classes seen of 2 tp / (2 tp + fp + fn)."""
    scores = []
    for c in sorted(set(predictions) | set(labels)):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def assert_classification_results(
    workdir, results: dict, split: str, data_file=None, rows_expected: int | None = None
) -> list[dict]:
    """results[split/accuracy] (and f1_macro, if reported) equal those recomputed from the
    run's predictions; with `data_file` (text,label csv), the predictions are that file's rows,
    with its labels."""
    rows = read_predictions(workdir, split)
    assert rows, f"no predictions for {split}"
    if data_file is not None:
        labels = [int(y) for y in read_column(data_file, "label")]
        _check_rows(rows, labels, "label", rows_expected)
    elif rows_expected is not None:
        assert len(rows) == rows_expected
    predictions, labels = [r["prediction"] for r in rows], [r["label"] for r in rows]
    accuracy = float(np.mean([p == y for p, y in zip(predictions, labels, strict=True)]))
    assert results[f"{split}/accuracy"] == pytest.approx(accuracy, abs=1e-9), split
    if f"{split}/f1_macro" in results:
        assert results[f"{split}/f1_macro"] == pytest.approx(
            f1_macro(predictions, labels), abs=1e-9
        )
    return rows


def assert_generation_results(
    workdir, results: dict, split: str, metric: str, data_file, rows_expected: int | None = None
) -> list[dict]:
    """results[split/metric] equals the metric recomputed from the run's generated texts, and
    their references are the data file's (source,target csv) targets of the same rows."""
    from pifi_jax.train.text_metrics import generation_metrics

    rows = read_predictions(workdir, split)
    assert rows, f"no predictions for {split}"
    _check_rows(rows, read_column(data_file, "target"), "reference", rows_expected)
    score = generation_metrics(
        [r["prediction"] for r in rows], [r["reference"] for r in rows], [metric]
    )[metric]
    assert results[f"{split}/{metric}"] == pytest.approx(score, abs=1e-6), split
    return rows
