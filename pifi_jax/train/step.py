"""The train state and the pure train / eval steps.

`train_step(state, batch, rng) -> (state, metrics)` differentiates only with respect to the
trainable tree (`state.params`); the frozen tree (`state.frozen`) rides along unchanged, so it gets
no gradient buffers and no optimizer state. Gradient accumulation runs inside the step over
micro-batches (`lax.scan`), so one call is one optimizer update whatever the accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from pifi_jax.train.metrics import cross_entropy_loss, mse_loss
from pifi_jax.train.partition import merge_params

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # trainable tree (fp32 master weights)
    frozen: Any  # frozen tree (never updated, not checkpointed)
    opt_state: Any

    @classmethod
    def create(cls, params, frozen, optimizer: optax.GradientTransformation) -> TrainState:
        return cls(jnp.zeros((), jnp.int32), params, frozen, optimizer.init(params))


def _loss(module: nn.Module, num_labels: int, label_smoothing: float):
    def loss_fn(params, frozen, batch, rng):
        variables = {"params": merge_params(params, frozen)}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        logits = module.apply(variables, **inputs, deterministic=False, rngs={"dropout": rng})
        weights = batch["weights"]
        if num_labels == 1:
            loss = mse_loss(logits[:, 0], batch["labels"], weights)
            correct = jnp.zeros(())
        else:
            labels = batch["labels"].astype(jnp.int32)
            loss = cross_entropy_loss(logits, labels, weights, label_smoothing, num_labels)
            correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
        return loss, correct

    return loss_fn


def make_train_step(
    module: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    num_labels: int,
    label_smoothing: float = 0.0,
    accum_steps: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
):
    """Returns train_step(state, batch, rng) -> (state, metrics); jit it with shardings."""
    grad_fn = jax.value_and_grad(_loss(module, num_labels, label_smoothing), has_aux=True)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            (loss, correct), grads = grad_fn(state.params, state.frozen, batch, rng)
            weight = jnp.sum(batch["weights"])
        else:
            # [accum * micro, ...] -> [accum, micro, ...]; each micro-batch loss is a weighted mean,
            # so re-weight by its weight sum to get the mean over the whole batch.
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

            def body(carry, xs):
                mb, i = xs
                (mb_loss, c), g = grad_fn(
                    state.params, state.frozen, mb, jax.random.fold_in(rng, i)
                )
                w = jnp.sum(mb["weights"])
                acc_g, acc_l, acc_c, acc_w = carry
                acc_g = jax.tree.map(lambda a, b: a + b * w, acc_g, g)
                return (acc_g, acc_l + mb_loss * w, acc_c + c, acc_w + w), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
            (grads, loss, correct, weight), _ = jax.lax.scan(
                body, init, (micro, jnp.arange(accum_steps))
            )
            denom = jnp.maximum(weight, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = loss / denom
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "accuracy": correct / jnp.maximum(weight, 1.0),
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(module: nn.Module, num_labels: int):
    """Returns eval_step(state, batch) -> predictions (class ids, or scores for regression)."""

    def eval_step(state: TrainState, batch: dict):
        variables = {"params": merge_params(state.params, state.frozen)}
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        logits = module.apply(variables, **inputs, deterministic=True)
        return logits[:, 0] if num_labels == 1 else jnp.argmax(logits, -1)

    return eval_step
