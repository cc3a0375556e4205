"""IST layer importance scores: sampling of the active and suppressed layers, and the score update
(../shared/spec/ist.md).

Sign convention of the reference: one score per decoder layer, zeros at start; a HIGH score means
suppressing the layer helps, i.e. the layer is LESS important. So layers are trained with
probability proportional to sigmoid(-s) and probed (suppressed) with probability proportional to
sigmoid(s).

Everything here is pure JAX and jit-friendly: the counts (n, n_update, n_suppress, probes) and the
mode are static Python values; the scores, losses and rng keys may be traced. All floats are float32.
Shapes: L = number of layers, K = number of probes.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

MODES = ("ist", "rst")


def _check_count(n: int, num_layers: int, what: str) -> int:
    """n as a Python int, refused unless 0 <= n <= num_layers (both static)."""
    if isinstance(n, bool):
        raise TypeError(f"{what} must be a static int, got a bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"{what} must be a static int, got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    if n > num_layers:
        raise ValueError(
            f"cannot draw {what}={n} distinct indices without replacement from only L={num_layers}"
        )
    return n


def _scores_vector(scores) -> jax.Array:
    scores = jnp.asarray(scores, jnp.float32)  # [L]
    if scores.ndim != 1:
        raise ValueError(f"scores must be one per layer, shape [L]; got shape {scores.shape}")
    return scores


def _gumbel_top_k(rng: jax.Array, log_weights: jax.Array, n: int) -> jax.Array:
    """int32 [n]: the n largest of log_weights [L] + iid standard Gumbel noise, largest first."""
    num_layers = log_weights.shape[0]
    n = _check_count(n, num_layers, "n")
    if n == 0:
        return jnp.zeros((0,), jnp.int32)
    keys = log_weights + jax.random.gumbel(rng, (num_layers,), jnp.float32)  # [L]
    _, indices = jax.lax.top_k(keys, n)  # [n], in decreasing key order
    return indices.astype(jnp.int32)


def sample_without_replacement(rng: jax.Array, weights, n: int) -> jax.Array:
    """int32 [n]: n distinct indices into `weights` [L] (positive, need not sum to 1), drawn with
    exactly the distribution of successive sampling, i.e. numpy's
    `np.random.choice(L, n, replace=False, p=weights / weights.sum())`: the first index with
    probability w_i / W, the next one from the remaining indices renormalised, and so on.

    Gumbel-top-k: with G_i iid standard Gumbel, the key X_i = log w_i + G_i is Gumbel with location
    log w_i, and the index of the largest key is i with probability w_i / sum_j w_j (Gumbel-max).
    Conditioned on which index wins and on the winning value, the other keys are still independent
    Gumbels with their own locations, each conditioned only to lie below that value; the arg max among
    them, which is the second largest key overall, is thus again distributed as w_j / (sum of the
    remaining weights). Repeating, the indices of the n largest keys in decreasing order have the
    Plackett-Luce law of the ordered successive draws, so the returned sequence (and therefore the
    drawn set) has the same distribution as the numpy draw. The indices come largest key first, i.e.
    in draw order.

    `n` is static; n > L raises a ValueError. Weights must be positive (not checked: they may be
    traced); a zero weight is never drawn unless fewer than n weights are positive.
    """
    weights = jnp.asarray(weights, jnp.float32)  # [L]
    if weights.ndim != 1:
        raise ValueError(f"weights must have shape [L]; got shape {weights.shape}")
    return _gumbel_top_k(rng, jnp.log(weights), n)


def indices_to_mask(indices, num_layers: int) -> jax.Array:
    """bool [L]: True at each of `indices` (int [n]), False elsewhere."""
    indices = jnp.asarray(indices, jnp.int32)  # [n]
    return jnp.zeros((num_layers,), jnp.bool_).at[indices].set(True)


def active_layers(rng: jax.Array, scores, n_update: int, mode: str = "ist") -> jax.Array:
    """bool [L]: the n_update layers whose PEFT parameters are trained this step.

    mode "ist": drawn without replacement with probability proportional to sigmoid(-scores), so a
    low score (important layer) is trained more often; "rst": uniform, the scores are ignored.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sparse tuning mode {mode!r}; expected one of {MODES}")
    scores = _scores_vector(scores)  # [L]
    num_layers = scores.shape[0]
    n_update = _check_count(n_update, num_layers, "n_update")
    if mode == "ist":
        # log sigmoid(-s), computed stably (weights sigmoid(-s) themselves may underflow).
        log_weights = jax.nn.log_sigmoid(-scores)  # [L]
    else:
        log_weights = jnp.zeros((num_layers,), jnp.float32)  # [L]
    return indices_to_mask(_gumbel_top_k(rng, log_weights, n_update), num_layers)


def suppression_sets(rng: jax.Array, scores, n_suppress: int, probes: int) -> jax.Array:
    """bool [probes, L]: `probes` independent draws of n_suppress layers each, without replacement
    with probability proportional to p = sigmoid(scores) (high score = suppressing helps)."""
    if isinstance(probes, bool) or not hasattr(probes, "__index__") or operator.index(probes) < 1:
        raise ValueError(f"probes must be a static int >= 1, got {probes!r}")
    probes = operator.index(probes)
    scores = _scores_vector(scores)  # [L]
    num_layers = scores.shape[0]
    n_suppress = _check_count(n_suppress, num_layers, "n_suppress")
    log_weights = jax.nn.log_sigmoid(scores)  # [L], log p
    rngs = jax.random.split(rng, probes)  # [K] keys, one per probe
    draw = lambda key: indices_to_mask(_gumbel_top_k(key, log_weights, n_suppress), num_layers)
    return jax.vmap(draw)(rngs)  # [K, L]


def update_scores(scores, suppressed, losses, score_lr) -> jax.Array:
    """float32 [L]: the scores after one probe round.

    scores [L]; suppressed bool [K, L] (row k = the suppression set S_k); losses [K] (loss_k with
    the layers of S_k suppressed). With p = sigmoid(scores) taken before the update, R_k =
    exp(-loss_k) and r_k = R_k - mean(R): for every i in S_k, s_i += r_k * p_i * (1 - p_i) * score_lr.
    Layers in no S_k keep their score exactly; equal losses leave every score unchanged exactly.
    """
    scores = _scores_vector(scores)  # [L]
    suppressed = jnp.asarray(suppressed, jnp.bool_)  # [K, L]
    losses = jnp.asarray(losses, jnp.float32)  # [K]
    num_layers = scores.shape[0]
    if suppressed.ndim != 2 or suppressed.shape[1] != num_layers:
        raise ValueError(
            f"suppressed must have shape [K, L={num_layers}]; got shape {suppressed.shape}"
        )
    if losses.shape != (suppressed.shape[0],):
        raise ValueError(
            f"losses must have shape [K={suppressed.shape[0]}] (one per suppression set); "
            f"got shape {losses.shape}"
        )
    p = jax.nn.sigmoid(scores)  # [L], once, before the update
    rewards = jnp.exp(-losses)  # [K]
    # r_k = R_k - mean(R), computed relative to R_0: the same value, but exactly 0 for equal losses
    # (a plain float mean of equal values need not round back to that value).
    shifted = rewards - rewards[0]  # [K]
    centred = shifted - jnp.mean(shifted)  # [K]
    per_layer = jnp.sum(
        jnp.where(suppressed, centred[:, None], 0.0), axis=0
    )  # [L]: sum_{k: i in S_k} r_k
    step = jnp.asarray(score_lr, jnp.float32) * p * (1.0 - p)  # [L]
    return scores + per_layer * step
