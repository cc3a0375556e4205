"""IST layer scores (pifi_jax/ist/scores.py, plot.py): sampling laws against exact enumeration,
the score update against a loop transcription of the spec, one compile per mask, the score plot."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pifi_jax.ist.plot import plot_scores, scores_from_metrics
from pifi_jax.ist.scores import (
    active_layers,
    indices_to_mask,
    sample_without_replacement,
    suppression_sets,
    update_scores,
)

NUM_SAMPLES = 20_000
# Each checked frequency f of an event with exact probability q is a mean of NUM_SAMPLES iid
# Bernoulli(q) draws (fixed seeds), so f - q has standard error sqrt(q (1 - q) / N). A bound of
# 4.5 standard errors is exceeded by chance with probability about 7e-6 per check (normal
# approximation), i.e. well under 1e-3 over the few hundred checks below, while a wrong law
# (e.g. inclusion proportional to the weights) misses by many standard errors (checked too).
SIGMAS = 4.5


def _tolerance(q: np.ndarray, num: int) -> np.ndarray:
    return SIGMAS * np.sqrt(q * (1 - q) / num) + 1e-12


def exact_successive(weights, n):
    """Exact law of numpy's successive sampling (np.random.choice(L, n, replace=False, p=w/W)) by
    enumerating every ordered draw: (inclusion probability [L], first-draw probability [L],
    {frozenset: probability of drawing that set})."""
    weights = np.asarray(weights, np.float64)
    num_layers = len(weights)
    inclusion = np.zeros(num_layers)
    first = np.zeros(num_layers)
    sets: dict[frozenset, float] = {}
    for order in itertools.permutations(range(num_layers), n):
        prob, remaining = 1.0, weights.sum()
        for j in order:
            prob *= weights[j] / remaining
            remaining -= weights[j]
        for j in order:
            inclusion[j] += prob
        first[order[0]] += prob
        sets[frozenset(order)] = sets.get(frozenset(order), 0.0) + prob
    return inclusion, first, sets


def _keys(seed: int, num: int = NUM_SAMPLES) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(seed), num)


def _assert_law(masks: np.ndarray, weights, n: int, check_sets: bool = True):
    """masks bool [N, L] drawn iid: n per row, inclusion and set frequencies match the exact law."""
    num, num_layers = masks.shape
    assert (masks.sum(axis=1) == n).all()
    inclusion, _, sets = exact_successive(weights, n)
    assert math.isclose(sum(sets.values()), 1.0) and math.isclose(inclusion.sum(), n)
    freq = masks.mean(axis=0)
    np.testing.assert_array_less(np.abs(freq - inclusion), _tolerance(inclusion, num))
    if check_sets:
        codes = masks.astype(np.int64) @ (1 << np.arange(num_layers))  # one integer per set
        for members, q in sets.items():
            code = sum(1 << j for j in members)
            f = np.mean(codes == code)
            assert abs(f - q) < _tolerance(q, num), (sorted(members), f, q)


WEIGHTS = np.array([0.05, 0.15, 0.3, 0.6, 1.2], np.float32)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sample_without_replacement_matches_successive_sampling(n):
    draw = jax.jit(jax.vmap(lambda key: sample_without_replacement(key, WEIGHTS, n)))
    draws = np.asarray(draw(_keys(n)))  # [N, n]
    assert draws.shape == (NUM_SAMPLES, n) and draws.dtype == np.int32
    assert ((draws >= 0) & (draws < len(WEIGHTS))).all()
    assert (np.diff(np.sort(draws, axis=1), axis=1) > 0).all()  # n distinct indices every time

    masks = np.zeros((NUM_SAMPLES, len(WEIGHTS)), bool)
    np.put_along_axis(masks, draws, True, axis=1)
    _assert_law(masks, WEIGHTS, n)
    # The first index is drawn with probability w / W (draws come in draw order).
    _, first, _ = exact_successive(WEIGHTS, n)
    counts = np.bincount(draws[:, 0], minlength=len(WEIGHTS)) / NUM_SAMPLES
    np.testing.assert_array_less(np.abs(counts - first), _tolerance(first, NUM_SAMPLES))

    # The check has power: for n >= 2, inclusion "proportional to the weights" is far off.
    if n >= 2:
        inclusion, _, _ = exact_successive(WEIGHTS, n)
        naive = n * WEIGHTS / WEIGHTS.sum()
        assert np.max(np.abs(naive - inclusion) / _tolerance(inclusion, NUM_SAMPLES)) > 5


def test_indices_to_mask_and_count_errors():
    mask = indices_to_mask(jnp.array([3, 0], jnp.int32), 5)
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), [True, False, False, True, False])
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"n=6.*L=5"):
        sample_without_replacement(key, WEIGHTS, 6)
    with pytest.raises(ValueError, match=r"n_update=6.*L=5"):
        active_layers(key, jnp.zeros(5), 6, "ist")
    with pytest.raises(ValueError, match=r"n_suppress=9.*L=5"):
        suppression_sets(key, jnp.zeros(5), 9, 3)
    with pytest.raises(ValueError, match=r"'lisa'.*'ist'.*'rst'"):
        active_layers(key, jnp.zeros(5), 2, "lisa")
    # n == L draws every index once.
    full = np.asarray(sample_without_replacement(key, WEIGHTS, 5))
    np.testing.assert_array_equal(np.sort(full), np.arange(5))


SCORES = np.array([-2.0, -1.0, 0.0, 1.0, 2.5], np.float32)


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_active_layers_ist_and_rst_laws(n):
    ist = jax.jit(jax.vmap(lambda key: active_layers(key, SCORES, n, "ist")))
    masks = np.asarray(ist(_keys(10 + n)))  # [N, L]
    assert masks.dtype == bool
    _assert_law(masks, _sigmoid(-SCORES), n)  # low score = important = trained more often

    rst = jax.jit(jax.vmap(lambda key: active_layers(key, SCORES, n, "rst")))
    masks = np.asarray(rst(_keys(20 + n)))
    _assert_law(masks, np.ones(len(SCORES)), n)  # uniform: the scores are ignored
    uniform = np.full(len(SCORES), n / len(SCORES))
    np.testing.assert_array_less(
        np.abs(masks.mean(axis=0) - uniform), _tolerance(uniform, NUM_SAMPLES)
    )


@pytest.mark.parametrize("n", [2, 3])
def test_suppression_sets_law_and_independent_probes(n):
    probes = 3
    draw = jax.jit(jax.vmap(lambda key: suppression_sets(key, SCORES, n, probes)))
    sets = np.asarray(draw(_keys(30 + n)))  # [N, K, L]
    assert sets.shape == (NUM_SAMPLES, probes, len(SCORES)) and sets.dtype == bool
    weights = _sigmoid(SCORES)  # high score = suppressing helps = probed more often
    for k in range(probes):
        _assert_law(sets[:, k], weights, n)
    # Probes are independent: two coincide with probability sum over sets of P(set)^2.
    _, _, exact = exact_successive(weights, n)
    same = sum(q * q for q in exact.values())
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        f = np.mean((sets[:, a] == sets[:, b]).all(axis=1))
        assert abs(f - same) < _tolerance(same, NUM_SAMPLES), (a, b, f, same)


def reference_update(scores, suppressed, losses, score_lr):
    """The spec, transcribed: p once; R = exp(-loss); r = R - mean(R); s_i += r_k p_i (1-p_i) lr."""
    s = np.array(scores, np.float64)
    p = [1 / (1 + math.exp(-float(x))) for x in s]  # computed once, before any update
    rewards = [math.exp(-float(loss)) for loss in losses]
    mean = sum(rewards) / len(rewards)
    for k in range(len(losses)):
        r_k = rewards[k] - mean
        for i in range(len(s)):
            if suppressed[k][i]:
                s[i] += r_k * p[i] * (1 - p[i]) * score_lr
    return s


def _sets(num_layers, *members):
    return np.array([[i in m for i in range(num_layers)] for m in members], bool)


UPDATE_CASES = [
    # (scores, suppression sets, losses, score_lr); layers 6 and 7 are never suppressed.
    (
        np.array([0.0, 0.5, -1.2, 2.0, -0.3, 1.1, -2.2, 0.7], np.float32),
        _sets(8, {0, 1, 2, 3}, {1, 3, 4, 5}, {0, 2, 4, 5}),
        np.array([0.71, 1.34, 0.95], np.float32),
        10.0,
    ),
    (
        np.zeros(8, np.float32),  # the first refresh: p = 1/2 everywhere
        _sets(8, {0, 1, 2, 3}, {2, 3, 4, 5}, {0, 1, 4, 5}),
        np.array([2.1, 1.9, 2.05], np.float32),
        10.0,
    ),
    (
        np.array([3.0, -3.0, 0.25, -0.75, 1.5, 0.0, 4.0, -4.0], np.float32),
        _sets(8, {0, 1}, {1, 2}, {2, 3}, {3, 4, 5}),
        np.array([0.2, 0.9, 0.4, 0.6], np.float32),
        2.5,
    ),
]


@pytest.mark.parametrize("case", range(len(UPDATE_CASES)))
def test_update_scores_matches_spec_transcription(case):
    scores, suppressed, losses, score_lr = UPDATE_CASES[case]
    expected = reference_update(scores, suppressed, losses, score_lr)
    got = update_scores(jnp.asarray(scores), jnp.asarray(suppressed), jnp.asarray(losses), score_lr)
    assert got.dtype == jnp.float32 and got.shape == scores.shape
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)
    assert np.abs(expected - scores).max() > 1e-2  # the case moves the scores
    jitted = jax.jit(update_scores)(scores, suppressed, losses, jnp.float32(score_lr))
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=0, atol=1e-6)

    never = ~suppressed.any(axis=0)
    assert never.any()
    np.testing.assert_array_equal(np.asarray(got)[never], scores[never])  # bit for bit
    equal = np.full(len(losses), 1.2345, np.float32)
    same = update_scores(jnp.asarray(scores), jnp.asarray(suppressed), jnp.asarray(equal), 10.0)
    np.testing.assert_array_equal(np.asarray(same), scores)


def test_update_scores_shape_errors():
    scores = jnp.zeros(8)
    with pytest.raises(ValueError, match=r"suppressed.*\[K, L=8\]"):
        update_scores(scores, jnp.zeros((3, 7), bool), jnp.zeros(3), 10.0)
    with pytest.raises(ValueError, match=r"losses.*\[K=3\]"):
        update_scores(scores, jnp.zeros((3, 8), bool), jnp.zeros(4), 10.0)


def test_samplers_compile_once_for_any_scores_and_rng():
    traces = {"active": 0, "suppress": 0}

    def active(rng, scores):
        traces["active"] += 1
        return active_layers(rng, scores, 3, "ist")

    def suppress(rng, scores):
        traces["suppress"] += 1
        return suppression_sets(rng, scores, 5, 3)

    active_jit, suppress_jit = jax.jit(active), jax.jit(suppress)
    seen_active, seen_suppress = set(), set()
    for seed in range(6):
        scores = jax.random.normal(jax.random.PRNGKey(100 + seed), (12,), jnp.float32) * seed
        rng = jax.random.PRNGKey(seed)
        mask = np.asarray(active_jit(rng, scores))
        sets = np.asarray(suppress_jit(rng, scores))
        assert mask.sum() == 3 and (sets.sum(axis=1) == 5).all()
        seen_active.add(mask.tobytes())
        seen_suppress.add(sets.tobytes())
    assert traces == {"active": 1, "suppress": 1}
    assert len(seen_active) > 1 and len(seen_suppress) > 1  # the traced rng does change the draw


def _write_metrics(path, steps, scores, torn=True):
    lines = [json.dumps({"step": 0, "train/loss": 2.0})]
    for step, row in zip(steps, scores, strict=True):
        lines.append(json.dumps({"step": step - 1, "train/loss": 1.0, "lr": 1e-4}))
        record = {"step": step, "train/loss": 0.9, "ist/score_lr": 10.0}
        record.update({f"ist/score/{i}": float(v) for i, v in enumerate(row)})
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 99999, "ist/score/0": 0.1'  # killed mid-write
    path.write_text(text, encoding="utf-8")


def test_scores_from_metrics_round_trip_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    steps = list(range(10, 410, 10))  # T = 40 refreshes
    scores = np.cumsum(rng.normal(0, 0.3, (40, 30)), axis=0)  # [T, L = 30], drifting scores
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, steps, scores)
    got_steps, got_scores = scores_from_metrics(metrics)
    np.testing.assert_array_equal(got_steps, steps)
    np.testing.assert_array_equal(got_scores, scores)  # JSON floats round-trip exactly

    png = plot_scores(got_steps, got_scores, tmp_path / "plots" / "scores.png", title="tiny")
    data = png.read_bytes()
    assert png == tmp_path / "plots" / "scores.png"
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_scores_from_metrics_errors(tmp_path):
    empty = tmp_path / "none.jsonl"
    empty.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "ist/sc', encoding="utf-8")
    with pytest.raises(ValueError, match="no layer scores"):
        scores_from_metrics(empty)

    middle = tmp_path / "middle.jsonl"
    _write_metrics(middle, [10, 20], np.zeros((2, 3)), torn=False)
    lines = middle.read_text(encoding="utf-8").splitlines()
    lines.insert(2, '{"step": 5, "ist/sc')  # corruption before the end is not a torn last line
    middle.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON"):
        scores_from_metrics(middle)

    mixed = tmp_path / "mixed.jsonl"
    rows = [{"step": 10, "ist/score/0": 0.0, "ist/score/1": 0.1}, {"step": 20, "ist/score/0": 0.2}]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match="1 layer scores, earlier lines had 2"):
        scores_from_metrics(mixed)


def test_plot_scores_refuses_bad_input(tmp_path):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="steps must have shape"):
        plot_scores(range(39), np.zeros((40, 30)), path)
    with pytest.raises(ValueError, match=r"shape \[T, L\]"):
        plot_scores(range(30), np.zeros(30), path)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_scores([], np.zeros((0, 30)), path)
    with pytest.raises(ValueError, match="strictly increasing"):
        plot_scores([10, 30, 20], np.zeros((3, 4)), path)
    assert not path.exists()
