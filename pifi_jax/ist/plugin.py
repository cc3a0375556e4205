"""IST / RST as a trainer step plugin (pifi_jax.train.plugins), from a run config's `ist` section.

    ist.mode            off | ist | rst
    ist.n_update        layers trained per step (0: int(0.25 L))
    ist.n_suppress      layers suppressed per probe (0: int(0.5 L))
    ist.probes          suppression sets per refresh (K)
    ist.suppression     factor on a suppressed layer's PEFT branch
    ist.score_lr        step size of the score update
    ist.interval        refresh every this many steps (IST only)
    ist.probe_batch_size rows of a refresh's batch (its own shuffled stream of training batches)

The layers are those of the trainable tree: every trainable leaf whose path names a layer index
(`.../layers_3/...`, `.../layer_3/...`, `.../h_3/...`) belongs to that layer; L is the number of
distinct layers found, numbered in order; the other trainable leaves (task head,
modules_to_save) train every step. State in TrainState.extra: {"scores": [L] float32}.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from pifi_jax.ist import scores as ist_scores
from pifi_jax.ist.optim import groups_from_paths, layer_masked_adam
from pifi_jax.ist.sparse_grad import sparse_value_and_grad
from pifi_jax.layers.linear import branch_scales
from pifi_jax.train import optim, partition
from pifi_jax.train.plugins import StepPlugin, register_plugin

MODES = ("off", "ist", "rst")
# Per-layer PEFT methods IST applies to (peft.method), as the spec has it.
METHODS = ("lora", "dora", "adapter_houlsby", "adapter_pfeiffer")
_LAYER = re.compile(r"(?:^|/)(?:layers|layer|h|blocks|block)_(\d+)(?=/|$)")
SCORE_PLOT = "ist_scores.png"


def layer_index_of(path: str) -> int | None:
    """The layer index a parameter or module path names (`model/layers_3/...` -> 3), or None."""
    found = _LAYER.findall(path)
    return int(found[-1]) if found else None


def layer_free_path(path: str) -> str:
    """The path with its layer index replaced by `*` (`model/layers_3/mlp` -> `model/layers_*/mlp`)."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), "*"), path)


def layer_groups(trainable) -> tuple[dict, dict[int, int]]:
    """(groups tree: each trainable leaf's group or -1, {layer index: group}), groups numbered in
    layer order."""
    layers = sorted(
        {i for p in partition.flatten(trainable) if (i := layer_index_of(p)) is not None}
    )
    group_of_layer = {layer: g for g, layer in enumerate(layers)}
    return groups_from_paths(trainable, _group_finder(group_of_layer)), group_of_layer


def _group_finder(group_of_layer: dict[int, int]):
    """path -> the group of the layer it names, or None."""

    def group_of_path(path: str) -> int | None:
        layer = layer_index_of(path)
        return None if layer is None else group_of_layer.get(layer)

    return group_of_path


def _settings(config, num_layers: int) -> dict:
    cfg = config.ist
    n_update = cfg.n_update or max(1, int(0.25 * num_layers))
    n_suppress = cfg.n_suppress or max(1, int(0.5 * num_layers))
    for key, value in (("n_update", n_update), ("n_suppress", n_suppress)):
        if not 1 <= value <= num_layers:
            raise ValueError(
                f"ist.{key}={value} but the model has {num_layers} layers with trainable PEFT "
                f"parameters: choose 1..{num_layers}"
            )
    if cfg.mode == "ist":
        for key in ("probes", "interval", "probe_batch_size"):
            if cfg[key] < 1:
                raise ValueError(f"ist.{key} must be >= 1, got {cfg[key]}")
    return dict(n_update=n_update, n_suppress=n_suppress)


def make_ist_plugin(config, objective, trainable, log) -> StepPlugin | None:
    """The IST / RST plugin the config asks for (None for ist.mode=off or no ist section)."""
    cfg = config.get("ist")
    if cfg is None or cfg.mode == "off":
        return None
    if cfg.mode not in MODES:
        raise ValueError(f"ist.mode={cfg.mode!r} is not one of {MODES}")
    method = config.peft.method
    if method not in METHODS:
        raise ValueError(
            f"ist.mode={cfg.mode} needs a per-layer PEFT method (peft.method one of {METHODS}), "
            f"got peft.method={method!r}"
        )
    if config.optim.name not in ("adam", "adamw"):
        raise ValueError(
            f"ist.mode={cfg.mode} reproduces AdamW's per-layer step counts: set optim.name to "
            f"adam or adamw (got {config.optim.name!r})"
        )
    groups, group_of_layer = layer_groups(trainable)
    num_layers = len(group_of_layer)
    if num_layers == 0:
        raise ValueError(
            f"ist.mode={cfg.mode}: no trainable leaf belongs to a layer (paths like "
            f"'.../layers_3/...'); the trainable leaves are {sorted(partition.flatten(trainable))[:5]}"
        )
    settings = _settings(config, num_layers)
    n_update, n_suppress = settings["n_update"], settings["n_suppress"]
    mode = cfg.mode
    log(
        f"{mode}: {n_update} of {num_layers} layers trained per step"
        + (
            f"; scores refreshed every {cfg.interval} steps ({cfg.probes} probes of "
            f"{n_suppress} layers at x{cfg.suppression}, batch {cfg.probe_batch_size})"
            if mode == "ist"
            else " (uniform)"
        )
    )

    def make_optimizer(optim_cfg, params, total_steps):
        schedule = optim.schedule_from_config(optim_cfg, total_steps)
        adam = layer_masked_adam(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay if optim_cfg.name == "adamw" else 0.0,
            decay_mask=optim.decay_mask(params, optim_cfg.no_decay),
            groups=groups,
            num_groups=num_layers,
        )
        parts = [zero_inactive(groups)]  # clipping sees the live gradients only, as torch's
        if optim_cfg.clip_norm > 0:
            parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
        return optax.chain(*parts, adam)

    def update_args(extra, rng, step):
        active = ist_scores.active_layers(rng, extra["scores"], n_update, mode)
        return {"active": active}, {}

    group_of_module = _group_finder(group_of_layer)
    flat_trainable = partition.flatten(trainable)

    def group_of_weight(path: str) -> int | None:
        """The layer of a trainable weight [in, out] with in > out (lora_a, adapter_down), whose
        input only its own gradient needs: tapped (ist.sparse_grad); others None."""
        leaf = flat_trainable.get(path)
        if leaf is None or len(leaf.shape) != 2 or leaf.shape[0] <= leaf.shape[1]:
            return None
        return group_of_module(path)

    def make_grad(loss_fn):
        return sparse_value_and_grad(loss_fn, group_of_weight, layer_free_path, n_update)

    remat = config.get("model", {}).get("remat_policy", "none") not in (None, "none")

    def periodic(state, batch, rng):
        scores = state.extra["scores"]
        draw, loss_rng = jax.random.split(rng)
        suppressed = ist_scores.suppression_sets(draw, scores, n_suppress, cfg.probes)  # [K, L]

        def probe_loss(mask):
            factors = jnp.where(mask, jnp.float32(cfg.suppression), jnp.float32(1.0))  # [L]
            with branch_scales(factors, group_of_module):
                loss, _ = objective.loss_fn(
                    state.params, state.frozen, batch, loss_rng, deterministic=True
                )
            return loss

        losses = jax.lax.map(probe_loss, suppressed)  # [K]
        new = ist_scores.update_scores(scores, suppressed, losses, cfg.score_lr)
        metrics = {f"ist/score/{g}": new[g] for g in range(num_layers)}
        metrics["ist/probe_loss"] = jnp.mean(losses)
        return {**state.extra, "scores": new}, metrics

    def finish(workdir: Path):
        from pifi_jax.ist.plot import plot_scores, scores_from_metrics  # noqa: PLC0415

        try:
            steps, history = scores_from_metrics(Path(workdir) / "metrics.jsonl")
        except ValueError:
            return  # no refresh happened (a run shorter than the interval)
        plot_scores(steps, history, Path(workdir) / SCORE_PLOT, title=f"{mode} layer scores")
        log(f"{mode}: layer scores over the run plotted in {Path(workdir) / SCORE_PLOT}")

    ist_mode = mode == "ist"
    return StepPlugin(
        name="ist",
        extra={"scores": jnp.zeros((num_layers,), jnp.float32)},
        make_optimizer=make_optimizer,
        update_args=update_args,
        # Under remat the layers keep no inputs for the backward pass anyway.
        make_grad=None if remat or not cfg.sparse_grad else make_grad,
        periodic=periodic if ist_mode else None,
        interval=cfg.interval if ist_mode else 0,
        periodic_batch_size=cfg.probe_batch_size if ist_mode else 0,
        finish=finish if ist_mode else None,
    )


def zero_inactive(groups) -> optax.GradientTransformationExtraArgs:
    """Gradients of the layers not in `active` set to 0 (torch: their grad is None), so that
    clipping and the metrics see the live ones only."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, active, **extra):
        del params, extra

        def zero(g, group):
            if group < 0:
                return g
            return jnp.where(active[group], g, jnp.zeros_like(g))

        return jax.tree.map(zero, updates, groups), state

    return optax.GradientTransformationExtraArgs(init, update)


register_plugin("ist", make_ist_plugin)
