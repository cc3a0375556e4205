"""Schedules against hand-computed values; the weight-decay mask; gradient clipping."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pifi_jax.train.optim import (
    decay_mask,
    learning_rate_at,
    make_optimizer,
    make_schedule,
    schedule_from_config,
)


def _cfg(**overrides):
    fields = dict(
        name="adamw",
        lr=1e-3,
        schedule="constant",
        warmup_steps=0,
        warmup_ratio=0.0,
        weight_decay=0.0,
        no_decay=["bias$", "LayerNorm/"],
        clip_norm=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
    )
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def _params():
    return {
        "layer": {
            "dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
            "LayerNorm": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
        }
    }


@pytest.mark.parametrize(
    "kind, expected",
    [
        # lr=1.0, total=110, warm-up=10: values at steps 0, 5, 10, 60, 110, 200.
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]),
    ],
)
def test_schedules_with_warmup(kind, expected):
    schedule = make_schedule(kind, 1.0, total_steps=110, warmup_steps=10)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_decay_shapes_between_points():
    # A quarter of the way through a 100-step decay: linear 0.75, cosine (1 + cos(pi/4)) / 2.
    linear = make_schedule("linear", 2.0, total_steps=100)
    cosine = make_schedule("cosine", 2.0, total_steps=100)
    assert float(linear(25)) == pytest.approx(1.5)
    assert float(cosine(25)) == pytest.approx(1.0 + math.cos(math.pi / 4), rel=1e-6)
    assert float(make_schedule("constant", 2.0, total_steps=100)(0)) == 2.0


def test_schedule_errors():
    with pytest.raises(ValueError, match="'step'.*constant"):
        make_schedule("step", 1.0, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule("linear", 1.0, 10, warmup_steps=11)


def test_warmup_ratio_used_when_warmup_steps_is_zero():
    cfg = _cfg(schedule="linear", lr=1.0, warmup_ratio=0.1)
    assert learning_rate_at(cfg, 100, 5) == pytest.approx(0.5)
    assert learning_rate_at(cfg, 100, 10) == pytest.approx(1.0)
    cfg = _cfg(schedule="linear", lr=1.0, warmup_steps=20, warmup_ratio=0.1)
    assert float(schedule_from_config(cfg, 100)(10)) == pytest.approx(0.5)


def test_decay_mask_excludes_bias_and_layernorm():
    mask = decay_mask(_params(), ["bias$", "LayerNorm/"])
    assert mask == {
        "layer": {
            "dense": {"kernel": True, "bias": False},
            "LayerNorm": {"scale": False, "bias": False},
        }
    }


def _one_step(cfg, params, grads):
    tx = make_optimizer(cfg, params, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_adamw_decays_kernel_but_not_bias_or_layernorm():
    params = _params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    new = _one_step(_cfg(weight_decay=0.1, lr=0.1), params, zero_grads)
    assert jnp.all(new["layer"]["dense"]["kernel"] < 1.0)  # 1 - lr * wd = 0.99
    np.testing.assert_allclose(new["layer"]["dense"]["kernel"], 0.99, rtol=1e-6)
    for leaf in (new["layer"]["dense"]["bias"], *new["layer"]["LayerNorm"].values()):
        np.testing.assert_array_equal(leaf, 1.0)


def test_adam_has_no_weight_decay():
    params = _params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    new = _one_step(_cfg(name="adam", weight_decay=0.1, lr=0.1), params, zero_grads)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, params)


def test_sgd_step_and_masked_decay():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    new = _one_step(_cfg(name="sgd", lr=0.1, weight_decay=0.5), params, grads)
    np.testing.assert_allclose(new["layer"]["dense"]["kernel"], 1 - 0.1 * (1 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(new["layer"]["dense"]["bias"], 1 - 0.1, rtol=1e-6)


def test_clipping_bounds_the_update():
    params = _params()
    huge = jax.tree.map(lambda x: 1e3 * jnp.ones_like(x), params)
    new = _one_step(_cfg(name="sgd", lr=1.0, clip_norm=0.5), params, huge)
    step = jax.tree.map(lambda a, b: a - b, params, new)
    assert float(optax.global_norm(step)) == pytest.approx(0.5, rel=1e-5)
    unclipped = _one_step(_cfg(name="sgd", lr=1.0), params, huge)
    step = jax.tree.map(lambda a, b: a - b, params, unclipped)
    assert float(optax.global_norm(step)) > 1e3


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="'lion'"):
        make_optimizer(_cfg(name="lion"), _params(), 10)


def test_accepts_a_config_dict_and_runs_under_jit():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(vars(_cfg(schedule="cosine", warmup_ratio=0.1, clip_norm=1.0)))
    params = _params()
    tx = make_optimizer(cfg, params, total_steps=100)

    @jax.jit
    def step(params, opt_state):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = step(params, tx.init(params))
    assert jax.tree.structure(params) == jax.tree.structure(_params())
