"""The train state and the pure train / eval steps of any objective (train/objectives.py).

`train_step(state, batch, rng) -> (state, metrics)` differentiates only with respect to the
trainable tree (`state.params`); the frozen tree (`state.frozen`) rides along unchanged, so it gets
no gradient buffers and no optimizer state. Gradient accumulation runs inside the step over
micro-batches (`lax.scan`), so one call is one optimizer update whatever the accumulation.

A step whose loss or gradient norm (of the whole batch, after accumulation) is NaN or infinite
reports it in its metrics ("nonfinite": 1.0). With `nonfinite="skip"` it also discards its
update on device: the parameters and the whole optimizer state (moments, counts, a plugin
optimizer's own state) come out as they went in, and only `state.step` moves on. What to do about
such a step is the loop's business (train.nonfinite: stop or skip, pifi_jax.train.loop).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from pifi_jax.train.partition import merge_params

# fold_in tag of a plugin's randomness, apart from the dropout stream of the same step.
PLUGIN_RNG_TAG = 0x1575
# What a step with a non-finite loss or gradient norm does: "stop" leaves the update in (the
# loop stops before using it), "skip" discards it.
NONFINITE_MODES = ("stop", "skip")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # trainable tree (fp32 master weights)
    frozen: Any  # frozen tree (never updated, not checkpointed)
    opt_state: Any
    extra: Any = None  # a step plugin's state (train.plugins), checkpointed; None without one

    @classmethod
    def create(
        cls, params, frozen, optimizer: optax.GradientTransformation, extra=None
    ) -> TrainState:
        return cls(jnp.zeros((), jnp.int32), params, frozen, optimizer.init(params), extra)


def make_train_step(
    objective,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    plugin=None,
    nonfinite: str = "stop",
):
    """Returns train_step(state, batch, rng) -> (state, metrics); jit it with shardings.

    plugin: a train.plugins.StepPlugin whose `update_args(state.extra, rng, step)` gives the
    optimizer's extra update arguments (and metrics) of this step, and whose `make_grad`, when
    set, differentiates instead of jax.value_and_grad (given the same arguments); None: a plain
    update.

    objective: anything with `loss_fn(trainable, frozen, batch, rng) -> (mean loss, aux)`, aux a
    dict of batch sums holding "weight" (pifi_jax.train.objectives). metrics: "loss" (the mean
    over the whole batch's weight), "grad_norm", every other aux sum divided by the weight
    (e.g. "accuracy"), "nonfinite" (1.0 when the loss or the gradient norm is NaN or infinite,
    else 0.0), and "lr" when a schedule is given.

    nonfinite: "stop" (the update is applied as computed) or "skip" (a non-finite step leaves
    params and opt_state unchanged); see NONFINITE_MODES.
    """
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    plain_grad = jax.value_and_grad(objective.loss_fn, has_aux=True)
    make_grad = None if plugin is None else plugin.make_grad
    plugin_grad = None if make_grad is None else make_grad(objective.loss_fn)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        update_args, plugin_metrics = {}, {}
        if plugin is not None and plugin.update_args is not None:
            plugin_rng = jax.random.fold_in(rng, PLUGIN_RNG_TAG)
            update_args, plugin_metrics = plugin.update_args(state.extra, plugin_rng, state.step)
        if plugin_grad is None:
            grad_fn = plain_grad
        else:
            grad_fn = functools.partial(plugin_grad, **update_args)
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, state.frozen, batch, rng)
        else:
            # [accum * micro, ...] -> [accum, micro, ...]; each micro-batch loss is a mean over
            # its weight, so re-weight by that weight to get the mean over the whole batch.
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

            def body(carry, xs):
                mb, i = xs
                (mb_loss, mb_aux), g = grad_fn(
                    state.params, state.frozen, mb, jax.random.fold_in(rng, i)
                )
                w = mb_aux["weight"]
                acc_g, acc_l, acc_aux = carry
                acc_g = jax.tree.map(lambda a, b: a + b * w, acc_g, g)
                acc_aux = jax.tree.map(jnp.add, acc_aux, mb_aux)
                return (acc_g, acc_l + mb_loss * w, acc_aux), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            _, aux_shape = jax.eval_shape(grad_fn, state.params, state.frozen, batch, rng)[0]
            aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
            init = (zeros, jnp.zeros(()), aux_zeros)
            (grads, loss, aux), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum_steps)))
            denom = jnp.maximum(aux["weight"], 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = loss / denom
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **update_args)
        params = optax.apply_updates(state.params, updates)
        if nonfinite == "skip":

            def unless_finite(new, old):
                return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

            params = unless_finite(params, state.params)
            opt_state = unless_finite(opt_state, state.opt_state)
        weight = jnp.maximum(aux["weight"], 1.0)
        metrics = {"loss": loss, "grad_norm": grad_norm, **plugin_metrics}
        metrics["nonfinite"] = jnp.where(finite, 0.0, 1.0)
        metrics.update({k: v / weight for k, v in aux.items() if k != "weight"})
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(objective):
    """Returns eval_step(state, batch) -> the objective's per-row outputs (class ids, scores or
    generated tokens, with what scoring needs beside them); jit it with shardings."""

    def eval_step(state: TrainState, batch: dict):
        return objective.predict(merge_params(state.params, state.frozen), batch)

    return eval_step
