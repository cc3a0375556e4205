"""Learning-rate schedules and the optimizer, built from the ``train`` part of a run config.

The optimizer only ever sees the trainable tree (see :mod:`pifi_jax.train.partition`), so it needs
no freezing logic of its own. Weight decay is decoupled (AdamW, Loshchilov & Hutter) and skipped on
leaves whose path matches one of ``cfg.no_decay`` (``re.search``), as is usual for biases and
LayerNorm parameters. Schedules follow the Hugging Face ``get_*_schedule_with_warmup`` shapes: a
linear warm-up from 0 to ``lr`` over ``warmup_steps`` steps, then constant, linear decay to 0 at
``total_steps``, or half a cosine down to 0 at ``total_steps``.

Config fields read by :func:`make_optimizer` (any object with these attributes)::

    name          "adam" | "adamw" | "sgd"
    lr            peak learning rate
    schedule      "constant" | "linear" | "cosine"
    warmup_steps  warm-up length in steps; when 0, warmup_ratio * total_steps is used
    warmup_ratio  warm-up length as a fraction of total_steps
    weight_decay  decoupled decay for adamw, L2 decay for sgd (the same thing for plain SGD);
                  adam has none and ignores it
    no_decay      regexes (re.search on "/"-joined paths) of leaves that get no weight decay
    clip_norm     global gradient-norm clipping threshold; 0 turns clipping off
    b1, b2, eps   Adam moments and epsilon (unused by sgd)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import optax

from pifi_jax.train.partition import flatten, unflatten

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")


def make_schedule(kind: str, lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """A step -> learning-rate function: linear warm-up from 0, then ``kind``."""
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; choose one of {SCHEDULES}.")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}."
        )

    # At least one decay step, so that warmup_steps == total_steps still ends at 0 for the
    # decaying schedules instead of dividing by zero.
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "constant":
        after_warmup = optax.constant_schedule(lr)
    elif kind == "linear":
        after_warmup = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after_warmup = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.0)
    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def schedule_from_config(cfg, total_steps: int) -> optax.Schedule:
    """The schedule :func:`make_optimizer` uses, for logging the current learning rate."""
    warmup_steps = cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)
    return make_schedule(cfg.schedule, cfg.lr, total_steps, warmup_steps)


def learning_rate_at(cfg, total_steps: int, step) -> float:
    """The learning rate :func:`make_optimizer` applies at ``step``."""
    return float(schedule_from_config(cfg, total_steps)(step))


def decay_mask(params, no_decay: Sequence[str]) -> dict:
    """A tree of bools like ``params``: True where weight decay applies."""
    patterns = [re.compile(p) for p in no_decay]
    return unflatten({path: not any(p.search(path) for p in patterns) for path in flatten(params)})


def make_optimizer(cfg, params, total_steps: int) -> optax.GradientTransformation:
    """Optimizer for the trainable tree ``params``: clipping, then adam/adamw/sgd on a schedule."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}.")
    schedule = schedule_from_config(cfg, total_steps)
    mask = decay_mask(params, cfg.no_decay)

    if cfg.name == "adam":
        optimizer = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adamw":
        optimizer = optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    elif cfg.weight_decay > 0:
        optimizer = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=mask), optax.sgd(schedule)
        )
    else:
        optimizer = optax.sgd(schedule)

    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optimizer)
    return optimizer
