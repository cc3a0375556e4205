"""Hooks for the PEFT methods that act around projections: bottleneck adapters, prefix and prompt
tuning. (LoRA, DoRA and IA3 act on projections and live in `layers.linear.Linear`.)

A family module calls one hook at the place a method acts; outside a PEFT scope
(`layers.linear.adapter_scope`), or when the active plan does not name the module, every hook
returns its input unchanged and adds no leaves:

    bottleneck_adapter(self, h)         Houlsby / Pfeiffer: h + up(act(down(h))) when the plan names
                                        this module (leaves `adapter_down/*`, `adapter_up/*` here)
    prefix_block(self, key, n)          prefix tuning: this attention's P prefix keys and values
                                        (its n-th application's, for a module shared across depth)
    attention_prefix(self, k, v, b, n)  the same, put in front of an encoder's keys/values and bias
    prepend_prompt(x), prompt_inputs    prompt tuning: P soft tokens in front of the sequence
    virtual_tokens()                    (prompt tokens, prefix tokens), for position numbering

Decoders take the prefix through `layers.attention.self_attention_inputs(prefix=...)`, which treats
it as P cached tokens before the sequence (the mask rules see it so), and DeBERTa through its
content-to-content scores only (models/deberta.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pifi_jax.layers.activations import activation
from pifi_jax.layers.linear import Linear, active_scope, branch_scale


def virtual_tokens() -> tuple[int, int]:
    """(prompt tokens, prefix tokens) the active PEFT method adds in front; (0, 0) without one."""
    active = active_scope()
    if active is None:
        return 0, 0
    prompt = 0 if active.prompt is None else active.prompt.shape[0]
    prefix = 0 if active.prefix is None else active.prefix.shape[0]
    return prompt, prefix


def prompt_inputs(attention_mask: jax.Array | None, token_type_ids: jax.Array | None = None):
    """Prompt tuning: mask [batch, P + length] (1 on the prompt) and token types (0 on it).

    None stays None (no padding / no token types)."""
    n = virtual_tokens()[0]
    if not n:
        return attention_mask, token_type_ids
    front = ((0, 0), (n, 0))
    return tuple(
        None if x is None else jnp.pad(x, front, constant_values=fill)
        for x, fill in ((attention_mask, 1), (token_type_ids, 0))
    )


def prepend_prompt(embedded: jax.Array) -> jax.Array:
    """Prompt tuning: [batch, length, width] word embeddings -> [batch, P + length, width]."""
    active = active_scope()
    if active is None or active.prompt is None:
        return embedded
    prompt = active.prompt.astype(embedded.dtype)  # [P, width]
    prompt = jnp.broadcast_to(prompt, (embedded.shape[0], *prompt.shape))
    return jnp.concatenate([prompt, embedded], axis=1)


def prefix_block(
    module: nn.Module, key: jax.Array, application: int = 0
) -> tuple[jax.Array, jax.Array] | None:
    """Prefix tuning: this attention's prefix (keys, values), each [batch, P, heads, head_dim].

    key: the module's own keys [batch, length, heads, head_dim] (heads: key/value heads), which give
    the shapes and dtype. application: which application of a module that runs at several depths
    (ALBERT's shared layer) this is. None when the plan gives this module no prefix.
    """
    active = active_scope()
    path = "/".join(module.path)
    if active is None or active.prefix is None or path not in active.plan.prefix_layers:
        return None
    layers = active.plan.prefix_layers
    block_index = [i for i, p in enumerate(layers) if p == path][application]
    batch, _, heads, head_dim = key.shape
    n = active.prefix.shape[0]
    table = active.prefix.reshape(n, len(layers), 2, heads, head_dim)  # [P, blocks, k|v, h, d]
    block = table[:, block_index].astype(key.dtype)  # [P, 2, heads, head_dim]
    block = jnp.broadcast_to(block, (batch, *block.shape))
    return block[:, :, 0], block[:, :, 1]


def attention_prefix(
    module: nn.Module,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    application: int = 0,
):
    """Prefix tuning on an encoder: P trained keys/values in front of its own, visible to all.

    key, value: [batch, length, heads, head_dim] -> [batch, P + length, heads, head_dim];
    bias: [..., length] additive padding bias -> [..., P + length] (0 = attend on the prefix).
    """
    block = prefix_block(module, key, application)
    if block is None:
        return key, value, bias
    key = jnp.concatenate([block[0], key], axis=1)
    value = jnp.concatenate([block[1], value], axis=1)
    if bias is not None:
        bias = jnp.pad(bias, ((0, 0),) * (bias.ndim - 1) + ((block[0].shape[1], 0),))
    return key, value, bias


def bottleneck_adapter(module: nn.Module, h: jax.Array) -> jax.Array:
    """h + up(act(down(h))) when the plan puts a bottleneck on `module` (call from its __call__).

    Leaves created under `module`: adapter_down/{kernel [d, m], bias [m]},
    adapter_up/{kernel [m, d], bias [d]}; up starts at zero, so the module starts unchanged.
    """
    active = active_scope()
    spec = active.plan.bottleneck("/".join(module.path)) if active else None
    if spec is None:
        return h
    kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    down = Linear(spec.size, name="adapter_down", **kw)(h)  # [..., m]
    zeros = nn.initializers.zeros
    up = Linear(h.shape[-1], kernel_init=zeros, name="adapter_up", **kw)
    branch = up(activation(spec.non_linearity)(down))  # [..., d]
    factor = branch_scale("/".join(module.path))  # a probe's per-layer factor (branch_scales)
    return h + (branch if factor is None else factor.astype(branch.dtype) * branch)
