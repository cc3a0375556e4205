"""AdamW whose per-layer parameters can sit a step out: the optimizer of IST/RST (spec: ist.md).

At every step IST updates only the PEFT parameters of a sampled set of layers. The reference runs
``torch.optim.AdamW`` with the inactive layers' gradients left at ``None``, and torch then skips
those parameters entirely for that step: no weight decay, no update, no moment update, and their
per-parameter step counter (``state[p]["step"]``, which drives the bias correction) stays put.
The learning rate comes from a global scheduler (HF Trainer + ``LambdaLR``) that advances every
optimizer step whatever the mask.

:func:`layer_masked_adam` reproduces that as an optax transformation. Each leaf of the trainable
tree belongs to a layer (a group ``0 .. L-1``) or to no layer (group ``-1``: trained every step,
e.g. a task head), and ``update`` takes the step's mask as a traced extra argument ``active``
(bools, one per layer), so one compiled step serves every mask. It composes with
``optax.chain``, which forwards extra keyword arguments to every member that accepts them::

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        layer_masked_adam(schedule, weight_decay=0.01, decay_mask=mask, groups=groups,
                          num_groups=L),
    )
    updates, opt_state = tx.update(grads, opt_state, params, active=active)

Clipping in such a chain sees whatever gradients it is given. torch's ``clip_grad_norm_`` skips
``grad is None`` parameters, so to match it the inactive layers' gradients must be zero (or never
computed) before the chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pifi_jax.train.partition import flatten, unflatten

_INT32_MAX = np.iinfo(np.int32).max


class LayerMaskedAdamState(NamedTuple):
    """State of :func:`layer_masked_adam`; a plain pytree of arrays.

    count:  int32 scalar, optimizer steps taken (every call); the schedule's argument, and the
            step count of the leaves trained every step (group -1).
    counts: int32 [num_groups], steps in which each layer was live: torch's per-parameter
            ``state["step"]`` of every leaf of that layer; the bias correction's argument.
    mu:     tree like params, first moments (torch's ``exp_avg``).
    nu:     tree like params, second moments (torch's ``exp_avg_sq``).
    mu and nu are the only parameter-shaped parts (``optax.tree_map_params`` finds them).
    """

    count: jax.Array
    counts: jax.Array
    mu: Any
    nu: Any


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_paths(tree) -> list[str]:
    """The "/"-joined path of every leaf of ``tree``, in leaf order."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key_name(k) for k in path) for path, _ in with_path]


def _structure_mismatch(what: str, tree, reference, reference_name: str) -> str:
    paths, ref_paths = _leaf_paths(tree), _leaf_paths(reference)
    path_set, ref_set = set(paths), set(ref_paths)
    missing = [p for p in ref_paths if p not in path_set]
    extra = [p for p in paths if p not in ref_set]
    detail = []
    if missing:
        detail.append(f"missing leaves {missing[:5]}")
    if extra:
        detail.append(f"unexpected leaves {extra[:5]}")
    if not detail:
        detail.append(
            f"{jax.tree.structure(tree)} vs {jax.tree.structure(reference)}"
            if len(paths) == len(ref_paths)
            else f"{len(paths)} leaves vs {len(ref_paths)}"
        )
    return f"{what} does not have the structure of {reference_name}: " + "; ".join(detail) + "."


def _check_groups(groups, num_groups: int) -> list[int]:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}.")
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}.")
    values = []
    for path, g in zip(_leaf_paths(groups), jax.tree.leaves(groups), strict=True):
        if isinstance(g, (bool, np.bool_)) or not isinstance(g, (int, np.integer)):
            raise TypeError(
                f"groups leaf {path!r} is {g!r}; each leaf must be a Python int "
                f"(a layer index in 0..{num_groups - 1}, or -1 for leaves trained every step)."
            )
        if not -1 <= g < num_groups:
            raise ValueError(
                f"groups leaf {path!r} has layer index {g}; expected -1 or 0..{num_groups - 1} "
                f"(num_groups={num_groups})."
            )
        values.append(int(g))
    return values


def _check_decay_mask(decay_mask, groups) -> list[bool]:
    n = len(jax.tree.leaves(groups))
    if decay_mask is None:
        return [True] * n
    if jax.tree.structure(decay_mask) != jax.tree.structure(groups):
        raise ValueError(_structure_mismatch("decay_mask", decay_mask, groups, "params (groups)"))
    flags = []
    for path, m in zip(_leaf_paths(decay_mask), jax.tree.leaves(decay_mask), strict=True):
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(f"decay_mask leaf {path!r} is {m!r}; each leaf must be a Python bool.")
        flags.append(bool(m))
    return flags


def _increment(count: jax.Array) -> jax.Array:
    """count + 1, saturating at the int32 maximum instead of wrapping."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def layer_masked_adam(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask=None,
    groups,
    num_groups: int,
) -> optax.GradientTransformationExtraArgs:
    """``torch.optim.AdamW`` with a per-step layer mask; inactive layers behave as ``grad=None``.

    Args:
      learning_rate: a float, or a schedule ``step -> lr`` evaluated at the global step count
        (0 at the first update, +1 every update, masked or not), like a torch ``LambdaLR`` that
        steps after every ``optimizer.step()``.
      b1, b2, eps: Adam constants, as torch's ``betas=(b1, b2)`` and ``eps``.
      weight_decay: decoupled decay, as torch's AdamW ``weight_decay``; 0 gives plain Adam.
      decay_mask: None (every leaf decays) or a tree like params of bools, True where the leaf
        decays (torch: the leaf's param group has the weight decay, else 0).
      groups: a tree like params of ints: each leaf's layer index in ``0 .. num_groups - 1``, or
        -1 for a leaf that is live every step.
      num_groups: the number of layers L.

    ``update(updates, state, params, *, active)`` takes ``active``, a bool (or 0/1) array of
    shape ``[num_groups]`` that may be traced. A leaf is live iff its group is -1 or
    ``active[group]``. For a live leaf, with ``t`` its own count after the increment and
    ``lr = learning_rate(global count)``, it does torch's arithmetic::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        denom = sqrt(v) / sqrt(1 - b2^t) + eps
        update = -lr * weight_decay * p  -  lr / (1 - b1^t) * m / denom

    (the decay term only where ``decay_mask`` is True). A leaf that is not live gets an update of
    exactly 0 and keeps its count, ``m`` and ``v`` bitwise; its gradient is never read, so it may
    be anything, NaN included. Other extra keyword arguments are accepted and ignored, since
    ``optax.chain`` passes every extra argument to every member.
    """
    group_of = _check_groups(groups, num_groups)
    decays = _check_decay_mask(decay_mask, groups)
    treedef = jax.tree.structure(groups)
    log_b1 = math.log(b1) if b1 > 0 else -math.inf
    log_b2 = math.log(b2) if b2 > 0 else -math.inf

    def _leaves(tree, name: str) -> list:
        if jax.tree.structure(tree) != treedef:
            raise ValueError(_structure_mismatch(name, tree, groups, "groups"))
        return jax.tree.leaves(tree)

    def init_fn(params) -> LayerMaskedAdamState:
        # A tree without leaves is optax.tree_map_params' placeholder: mapped, not checked.
        if jax.tree.leaves(params) and jax.tree.structure(params) != treedef:
            raise ValueError(_structure_mismatch("params", params, groups, "groups"))
        return LayerMaskedAdamState(
            count=jnp.zeros([], jnp.int32),
            counts=jnp.zeros([num_groups], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state: LayerMaskedAdamState, params=None, *, active=None, **extra):
        del extra
        if active is None:
            raise TypeError(
                "layer_masked_adam's update needs the step's layer mask: "
                f"update(updates, state, params, active=<bool array of shape ({num_groups},)>)."
            )
        active = jnp.asarray(active)
        if active.shape != (num_groups,):
            raise ValueError(
                f"active must have shape ({num_groups},) (one flag per layer, num_groups="
                f"{num_groups}); got shape {active.shape}."
            )
        active = active.astype(bool)
        if weight_decay != 0 and any(decays) and params is None:
            raise ValueError("layer_masked_adam with weight_decay needs params in update.")

        grads = _leaves(updates, "updates")
        # This step's count of every layer, and of the leaves trained every step.
        layer_counts = jnp.where(active, _increment(state.counts), state.counts)  # [groups]
        always = _increment(state.count)
        mus = _leaves(state.mu, "state.mu")
        nus = _leaves(state.nu, "state.nu")
        ps = _leaves(params, "params") if params is not None else [None] * len(grads)

        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        new_updates, new_mus, new_nus = [], [], []
        for g, mu, nu, p, group, decays_here in zip(
            grads, mus, nus, ps, group_of, decays, strict=True
        ):
            g32 = g.astype(mu.dtype)
            t = always if group == -1 else layer_counts[group]
            m = b1 * mu + (1 - b1) * g32
            v = b2 * nu + (1 - b2) * g32 * g32
            # 1 - b**t as -expm1(t log b): float32 1 - 0.999**t loses ~4 digits to cancellation
            # for small t, while torch computes the bias corrections in float64.
            tf = t.astype(jnp.float32)
            bias1 = -jnp.expm1(tf * log_b1)
            bias2 = -jnp.expm1(tf * log_b2)
            denom = jnp.sqrt(v) / jnp.sqrt(bias2) + eps
            step = -(lr / bias1) * (m / denom)
            if weight_decay != 0 and decays_here:
                step = step - (lr * weight_decay) * p.astype(mu.dtype)
            step = step.astype(g.dtype)
            if group == -1:
                new_updates.append(step)
                new_mus.append(m)
                new_nus.append(v)
            else:
                live = active[group]
                new_updates.append(jnp.where(live, step, jnp.zeros_like(step)))
                new_mus.append(jnp.where(live, m, mu))
                new_nus.append(jnp.where(live, v, nu))

        new_state = LayerMaskedAdamState(
            count=always,
            counts=layer_counts,
            mu=treedef.unflatten(new_mus),
            nu=treedef.unflatten(new_nus),
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def groups_from_paths(params, layer_of: Callable[[str], int | None]) -> dict:
    """The ``groups`` tree for :func:`layer_masked_adam`: ``layer_of(path)`` for each leaf's
    "/"-joined path, or -1 (trained every step) where it returns None."""
    groups = {}
    for path in flatten(params):
        layer = layer_of(path)
        groups[path] = -1 if layer is None else int(layer)
    return unflatten(groups)
