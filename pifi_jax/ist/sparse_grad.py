"""Gradients of the active layers only, without keeping the inactive layers' inputs.

An IST step trains n of L layers. Plain reverse-mode differentiation keeps, in every layer, the
inputs of the PEFT products (LoRA's A: the normed input of q, k, v, of up and the input of down;
a bottleneck adapter's down projection) only to form those weights' gradients, then the step
throws the inactive layers' gradients away. Here (`sparse_value_and_grad`):

1. A first, abstract pass (`jax.eval_shape`, at trace time only) finds the tapped products: every
   trainable weight [in, out] of a layer with in > out that the model multiplies through
   `layers.linear` (lora_a, adapter_down/kernel).
2. The loss is differentiated with respect to the trainable tree and one zero "tap" per product
   ([..., out], added to the product's output), inside `layers.linear.input_taps`: each product
   uses stop_gradient(W), so differentiation keeps no x for W, and x is copied into slot
   `slot(layer)` of a buffer [n, *x.shape] when the layer is active (dropped otherwise).
3. d loss / d tap is d loss / d y of the product; for each slot, dW = x_slot^T dy of its layer,
   scattered back to the layers' leaves (zero for inactive layers). Everything else in the
   gradient is the plain one.

The result equals `jax.value_and_grad`'s on the active layers (tested to float rounding) and is
zero on the tapped weights of inactive layers (which IST's optimizer skips anyway). Memory: the
inputs of the n active layers (one buffer slot each) instead of all L. Time: the weight products
of the n active layers instead of all L. Under remat the layers keep no inputs anyway, so the plugin
differentiates plainly there.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pifi_jax import partition
from pifi_jax.layers.linear import InputTaps, input_taps


def active_slots(active: jax.Array, n_slots: int) -> tuple[jax.Array, jax.Array]:
    """(slot of each group: its rank among the active groups, n_slots when inactive [L] int32;
    group of each slot [n_slots] int32, in group order). `active` holds n_slots True values."""
    active = active.astype(bool)
    rank = jnp.cumsum(active.astype(jnp.int32)) - 1
    slots = jnp.where(active, rank, n_slots).astype(jnp.int32)
    (group_of_slot,) = jnp.nonzero(active, size=n_slots, fill_value=active.shape[0])
    return slots, group_of_slot.astype(jnp.int32)


def sparse_value_and_grad(
    loss_fn: Callable,
    group_of_weight: Callable[[str], int | None],
    kind_of: Callable[[str], str],
    n_slots: int,
):
    """value_and_grad(loss_fn, has_aux=True) w.r.t. its first argument, with the gradients of
    tapped weights formed for the active groups only.

    group_of_weight: weight path -> group (layer) index, or None for a weight not tapped.
    kind_of: weight path -> a name without its layer (the buffer an input site shares).
    Returns grad_fn(trainable, *args, active=[groups] bool) -> ((loss, aux), grads).
    """

    def grad_fn(trainable, *args, active):
        slots, group_of_slot = active_slots(active, n_slots)
        flat_params = partition.flatten(trainable)

        found = InputTaps(group_of_weight)  # shapes only: an abstract pass, at trace time

        def discover(params):
            with input_taps(found):
                loss_fn(params, *args)
            return 0

        jax.eval_shape(discover, trainable)
        missing = sorted(set(found.tap_specs) - set(flat_params))
        if missing:
            raise ValueError(
                f"sparse gradients: tapped weights {missing[:3]} are not leaves of the trainable "
                "tree (a module path that differs from its parameter path)"
            )
        taps = {path: jnp.zeros(spec.shape, spec.dtype) for path, spec in found.tap_specs.items()}

        sites: dict[str, str] = {}  # weight path -> buffer (names only, read after tracing)

        def tapped_loss(params, taps):
            context = InputTaps(group_of_weight, kind_of, slots, n_slots, taps)
            with input_taps(context):
                loss, aux = loss_fn(params, *args)
            sites.update(context.sites)
            return loss, (aux, context.buffers)

        (loss, (aux, buffers)), (grads, tap_grads) = jax.value_and_grad(
            tapped_loss, argnums=(0, 1), has_aux=True
        )(trainable, taps)
        flat_grads = partition.flatten(grads)
        for (_, site), paths in _batches(found.groups, sites, kind_of).items():
            groups = jnp.array([found.groups[p] for p in paths], jnp.int32)
            weight_grads = _slot_products(
                buffers[site], [tap_grads[p] for p in paths], groups, group_of_slot
            )  # [members, in, out]
            for i, path in enumerate(paths):
                flat_grads[path] = flat_grads[path] + weight_grads[i].astype(flat_grads[path].dtype)
        return (loss, aux), partition.unflatten(flat_grads)

    return grad_fn


def _batches(groups: dict, sites: dict, kind_of) -> dict:
    """Tapped weights that can be formed together: {(kind, site): [paths in group order]}."""
    batches: dict = {}
    for path in sorted(groups, key=lambda p: groups[p]):
        batches.setdefault((kind_of(path), sites[path]), []).append(path)
    return batches


def _slot_products(buffer, tap_grads, groups, group_of_slot):
    """dW of each member (a weight of one layer) from the kept inputs: member m's layer, when it
    holds slot s, gets buffer[s]^T tap_grads[m]; other members get zeros."""
    stacked = jnp.stack(tap_grads)  # [members, ..., out]
    members = stacked.shape[0]
    # member of each slot's layer in this batch, or `members` when the layer has none here
    match = group_of_slot[:, None] == groups[None, :]  # [slots, members]
    member_of_slot = jnp.where(match.any(axis=1), jnp.argmax(match, axis=1), members)
    picked = stacked[jnp.minimum(member_of_slot, members - 1)]  # [slots, ..., out]
    lead = "".join(chr(ord("a") + i) for i in range(buffer.ndim - 2))
    per_slot = jnp.einsum(f"s{lead}i,s{lead}o->sio", buffer, picked.astype(buffer.dtype))
    out = jnp.zeros((members, *per_slot.shape[1:]), per_slot.dtype)
    return out.at[member_of_slot].add(per_slot, mode="drop")
