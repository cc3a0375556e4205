"""Losses (jax.numpy, inside the train step) and evaluation metrics (numpy, on the host).

Batches are padded to fixed shapes so the step compiles once; padding rows carry weight 0.
Losses are weighted means, defined as 0 for a batch whose weights sum to 0 (an all-padding batch
on one data shard must not turn the step's loss into NaN). Metrics use the weights only as a mask:
rows with weight 0 are dropped, the others count equally.

Undefined correlations (a constant prediction or label column, fewer than two rows) are reported
as 0 rather than NaN, the convention scikit-learn uses for the Matthews correlation, so that model
selection on these metrics never compares against NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

# f1: the F1 score of class 1 (scikit-learn's binary f1_score), as GLUE reports it for MRPC and QQP.
METRICS = ("accuracy", "f1_macro", "mcc", "f1", "pearson", "spearman")


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    total = jnp.sum(weights)
    # Dividing by a guarded denominator (not jnp.where on the quotient) keeps gradients finite.
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, jnp.sum(values * weights) / safe_total, 0.0)


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
) -> jax.Array:
    """Weighted mean cross-entropy, with label smoothing as in PyTorch's ``CrossEntropyLoss``.

    The target of a row with label ``y`` is ``(1 - eps) * onehot(y) + eps / num_classes``.
    logits: [..., num_classes]; labels (int) and weights: [...]. Computed in float32.
    """
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} classes, expected {num_classes}.")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [..., classes]
    targets = (1.0 - label_smoothing) * jax.nn.one_hot(labels, num_classes) + (
        label_smoothing / num_classes
    )  # [..., classes]
    per_row = -jnp.sum(targets * log_probs, axis=-1)  # [...]
    return _weighted_mean(per_row, weights.astype(jnp.float32))


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(weighted sum of the token negative log-likelihoods, weight sum) over any leading shape.

    logits: [..., vocab] (any float dtype; reduced in float32); targets (int), weights: [...].
    The target logit is picked with a gather and normalised with logsumexp, so no one-hot
    [..., vocab] tensor is built (forward or backward: the gather's gradient is a scatter-add),
    which matters for vocabularies of 32k-262k tokens. A sum, not a mean, so that micro-batches
    and data shards add up exactly; divide by the weight sum for the mean.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    # logsumexp with the max held constant: its gradient is then the softmax alone, without the
    # [..., vocab] argmax mask that differentiating through the max would build.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [..., 1]
    log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[..., 0]
    nll = log_normaliser - picked  # [...]
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def next_token_loss(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Causal-LM loss with the shift: position t predicts token t + 1, counted where
    `loss_mask[:, t + 1]` is 1 (e.g. the answer tokens only; prompt and padding 0).

    logits: [batch, length, vocab]; input_ids, loss_mask: [batch, length].
    Returns (sum of the NLLs, number of counted tokens), as token_cross_entropy.
    """
    return token_cross_entropy(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def mean_next_token_loss(logits, input_ids, loss_mask) -> jax.Array:
    """The mean of next_token_loss over the counted tokens (0 when none is counted)."""
    total, count = next_token_loss(logits, input_ids, loss_mask)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def mse_loss(preds: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean squared error; ``preds`` may carry a regression head's trailing axis of 1."""
    if preds.ndim == labels.ndim + 1 and preds.shape[-1] == 1:
        preds = preds[..., 0]
    if preds.shape != labels.shape:
        # Refused rather than broadcast: [batch] - [batch, 1] would silently give [batch, batch].
        raise ValueError(f"preds shape {preds.shape} does not match labels shape {labels.shape}.")
    errors = (preds.astype(jnp.float32) - labels.astype(jnp.float32)) ** 2
    return _weighted_mean(errors, weights.astype(jnp.float32))


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def _confusion(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[true class, predicted class] counts over the classes seen in either array."""
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    n = len(labels)
    matrix = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(matrix, (codes[:n], codes[n:]), 1.0)
    return matrix


def _f1_macro(predictions: np.ndarray, labels: np.ndarray) -> float:
    matrix = _confusion(predictions, labels)
    true_pos = np.diag(matrix)
    # Every class here was seen as a label or a prediction, so 2tp + fp + fn > 0.
    per_class = 2 * true_pos / (matrix.sum(axis=0) + matrix.sum(axis=1))
    return float(np.mean(per_class))


def _f1_positive(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 against the rest, 2tp / (2tp + fp + fn); 0 when class 1 is neither predicted
    nor a label (scikit-learn's zero_division default)."""
    predicted, actual = predictions == 1, labels == 1
    true_pos = np.sum(predicted & actual)
    denominator = np.sum(predicted) + np.sum(actual)  # = 2tp + fp + fn
    return float(2 * true_pos / denominator) if denominator > 0 else 0.0


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K); 2 classes give the usual MCC."""
    matrix = _confusion(predictions, labels)
    true_count, pred_count = matrix.sum(axis=1), matrix.sum(axis=0)
    total, correct = matrix.sum(), np.trace(matrix)
    numerator = correct * total - pred_count @ true_count
    denominator = np.sqrt(
        (total**2 - pred_count @ pred_count) * (total**2 - true_count @ true_count)
    )
    return float(numerator / denominator) if denominator > 0 else 0.0


def _correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(predictions.astype(np.float64), labels.astype(np.float64)).statistic)


_METRIC_FNS = {
    "accuracy": _accuracy,
    "f1_macro": _f1_macro,
    "mcc": _mcc,
    "f1": _f1_positive,
    "pearson": lambda p, y: _correlation(stats.pearsonr, p, y),
    "spearman": lambda p, y: _correlation(stats.spearmanr, p, y),
}


def compute_metrics(
    names: Sequence[str],
    predictions: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """``{name: value}`` over the rows with nonzero weight.

    predictions: class ids (classification) or floats (regression), same shape as labels.
    """
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {METRICS}.")
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if predictions.shape != labels.shape:
        raise ValueError(
            f"{predictions.size} predictions for {labels.size} labels; they must match."
        )
    if weights is not None:
        keep = np.asarray(weights).ravel() != 0
        predictions, labels = predictions[keep], labels[keep]
    if labels.size == 0:
        raise ValueError("No rows with nonzero weight to compute metrics on.")
    return {name: _METRIC_FNS[name](predictions, labels) for name in names}
