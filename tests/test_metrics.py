"""Metrics against scikit-learn / scipy, and the losses against direct formulas and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pifi_jax.train.metrics import METRICS, compute_metrics, cross_entropy_loss, mse_loss


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(num_classes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, 200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, num_classes, 200))
    weights = (rng.random(200) < 0.8).astype(np.float32)
    # Padding rows carry junk, including a class that only they contain.
    labels[weights == 0] = num_classes + 3
    keep = weights > 0

    got = compute_metrics(["accuracy", "f1_macro", "mcc"], predictions, labels, weights)
    y, p = labels[keep], predictions[keep]
    assert got["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert got["f1_macro"] == pytest.approx(f1_score(y, p, average="macro"))
    assert got["mcc"] == pytest.approx(matthews_corrcoef(y, p))


def test_f1_classes_are_the_union_of_labels_and_predictions():
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 2, 1, 1])  # class 2 only predicted; class 3 never seen
    got = compute_metrics(["f1_macro"], predictions, labels)
    assert got["f1_macro"] == pytest.approx(f1_score(labels, predictions, average="macro"))


def test_mcc_is_zero_when_undefined():
    assert compute_metrics(["mcc"], np.ones(5, int), np.array([0, 1, 0, 1, 1]))["mcc"] == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.normal(size=300)
    predictions = labels + rng.normal(size=300)
    weights = np.ones(300)
    weights[::7] = 0
    predictions[::7] = 1e6  # padding junk that would dominate if it were kept
    keep = weights > 0
    got = compute_metrics(["pearson", "spearman"], predictions, labels, weights)
    assert got["pearson"] == pytest.approx(stats.pearsonr(predictions[keep], labels[keep])[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(predictions[keep], labels[keep])[0])


def test_constant_predictions_give_zero_correlation():
    got = compute_metrics(["pearson", "spearman"], np.ones(4), np.arange(4.0))
    assert got == {"pearson": 0.0, "spearman": 0.0}


def test_metric_errors():
    with pytest.raises(ValueError, match="'auc'.*accuracy"):
        compute_metrics(["auc"], np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="nonzero weight"):
        compute_metrics(["accuracy"], np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="must match"):
        compute_metrics(["accuracy"], np.zeros(3), np.zeros(2))
    assert set(METRICS) == {"accuracy", "f1", "f1_macro", "mcc", "pearson", "spearman"}


def _smoothed_ce(logits, labels, weights, eps):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_row = -(1 - eps) * log_probs[np.arange(len(labels)), labels] - eps * log_probs.mean(-1)
    return (per_row * weights).sum() / weights.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_with_label_smoothing(eps):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, 16)
    weights = (rng.random(16) < 0.7).astype(np.float32)
    got = float(cross_entropy_loss(logits, labels, weights, eps, 4))
    assert got == pytest.approx(_smoothed_ce(logits, labels, weights, eps), rel=1e-5)


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 10)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=0.2
    ).item()
    got = float(cross_entropy_loss(logits, labels, np.ones(10), 0.2, 3))
    assert got == pytest.approx(expected, rel=1e-5)


def test_losses_are_zero_with_finite_gradient_when_all_weights_are_zero():
    logits, labels, weights = jnp.ones((3, 2)), jnp.zeros(3, int), jnp.zeros(3)
    loss, grad = jax.value_and_grad(cross_entropy_loss)(logits, labels, weights, 0.1, 2)
    assert float(loss) == 0.0 and bool(jnp.all(jnp.isfinite(grad)))
    loss, grad = jax.value_and_grad(mse_loss)(jnp.ones(3), jnp.zeros(3), weights)
    assert float(loss) == 0.0 and bool(jnp.all(jnp.isfinite(grad)))


def test_mse_weighted_mean_and_shapes():
    preds = jnp.array([[1.0], [2.0], [5.0]])  # a regression head's [batch, 1]
    labels = jnp.array([0.0, 0.0, 0.0])
    weights = jnp.array([1.0, 1.0, 0.0])
    assert float(mse_loss(preds, labels, weights)) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="shape"):
        mse_loss(jnp.ones((3, 2)), labels, weights)
