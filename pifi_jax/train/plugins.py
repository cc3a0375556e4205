"""Step plugins: methods that change how the trainer steps, without the trainer naming them.

A method that trains the same model differently (IST samples which layers update at every step
and refreshes layer scores every few steps, pifi_jax.ist) registers a factory here. At set-up the
trainer asks every registered factory for a plugin; a factory returns None when its config
section leaves it off, and at most one may return one. What a plugin may do:

    extra            its own state (a pytree of arrays): lives in TrainState.extra, is checkpointed
                     with the optimizer state, so a resumed run continues it exactly
    make_optimizer   (optim config, trainable tree, total_steps) -> the optimizer, an optax
                     GradientTransformationExtraArgs (instead of train.optim.make_optimizer)
    update_args      (extra, rng, step) -> (keyword arguments of the optimizer's update, metrics),
                     inside the jitted train step (e.g. this step's active layers, drawn on device)
    make_grad        (loss_fn) -> grad_fn(trainable, frozen, batch, rng, **update_args) ->
                     ((loss, aux), grads), instead of jax.value_and_grad(loss_fn, has_aux=True)
                     (e.g. gradients of this step's active layers only)
    periodic         (state, batch, rng) -> (extra, metrics), jitted on its own, run before the
                     train step of every step t > 0 with t % interval == 0, on batches of its own
                     stream (`periodic_batch_size` rows, shuffled with a seed of its own; the
                     stream's position is checkpointed)
    finish           (workdir) -> None, after training (e.g. plots of what it logged)

    register_plugin(factory)     factory(config, objective, trainable, log) -> StepPlugin | None
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_FACTORIES: dict[str, Callable] = {}


@dataclasses.dataclass
class StepPlugin:
    name: str
    extra: Any = None
    make_optimizer: Callable | None = None
    update_args: Callable | None = None
    make_grad: Callable | None = None
    periodic: Callable | None = None
    interval: int = 0
    periodic_batch_size: int = 0
    finish: Callable | None = None

    def __post_init__(self):
        if self.periodic is not None and (self.interval < 1 or self.periodic_batch_size < 1):
            raise ValueError(
                f"step plugin {self.name!r}: a periodic step needs interval >= 1 and "
                f"periodic_batch_size >= 1, got {self.interval} and {self.periodic_batch_size}"
            )


def register_plugin(name: str, factory: Callable) -> None:
    """Adds `factory(config, objective, trainable, log) -> StepPlugin | None` under `name`."""
    _FACTORIES[name] = factory


def make_plugin(config, objective, trainable, log) -> StepPlugin | None:
    """The one plugin the config turns on, or None; two at once are refused."""
    plugins = []
    for factory in _FACTORIES.values():
        plugin = factory(config, objective, trainable, log)
        if plugin is not None:
            plugins.append(plugin)
    if len(plugins) > 1:
        raise ValueError(
            "the config turns on several step plugins at once: "
            + ", ".join(p.name for p in plugins)
            + "; turn all but one off"
        )
    return plugins[0] if plugins else None
