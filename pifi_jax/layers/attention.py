"""Scaled dot-product attention over [batch, length, heads, head_dim] tensors, and its masks.

Supports grouped-query attention (fewer key/value heads than query heads) so that encoder and
decoder families share one implementation, plus what decoders add: causal and sliding-window masks
and tanh soft-capping of the logits (Gemma-2).

Masks are additive biases built from booleans in one step (never two large negatives added), in
slot indices: query i sits at slot `q_offset + i` among the key slots, so a key/value cache can later
pass the cached length as `q_offset` without changing the mask code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def padding_bias(attention_mask: jax.Array, dtype) -> jax.Array:
    """Turns a [batch, kv_length] 0/1 mask into an additive bias [batch, 1, 1, kv_length]."""
    big_negative = jnp.finfo(dtype).min
    keep = attention_mask[:, None, None, :].astype(bool)
    return jnp.where(keep, jnp.zeros((), dtype), big_negative).astype(dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids [batch, length] that work for right and left padding.

    Real tokens are numbered 0, 1, ... from the row's first real token (`cumsum(mask) - 1`), so a
    left-padded row gets the positions of its unpadded sequence, as transformers' generate() passes
    them. Padding slots keep their slot index; their outputs mean nothing either way. Under right
    padding this equals `arange(length)`, transformers' default when no position_ids are given.
    """
    mask = attention_mask.astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=1) - 1, slots)


def attention_bias(
    attention_mask: jax.Array | None,
    q_length: int,
    *,
    causal: bool,
    sliding_window: int | None = None,
    q_offset: int | jax.Array = 0,
    kv_length: int | None = None,
    dtype=jnp.float32,
) -> jax.Array | None:
    """Additive bias [batch or 1, 1, q_length, kv_length]: 0 where a query may attend, min elsewhere.

    Args:
      attention_mask: [batch, kv_length] 1 for real tokens, 0 for padding; None = no padding.
      causal: query slot q sees key slots k <= q.
      sliding_window: also require q - k < window (causal), or |q - k| <= window (non-causal, as
        transformers' bidirectional sliding window does).
      q_offset: slot of the first query among the keys (a cache's filled length; 0 without one).
      kv_length: number of key slots; defaults to the mask's length, else q_length.
    Returns None when nothing is masked.
    """
    if kv_length is None:
        kv_length = q_length if attention_mask is None else attention_mask.shape[1]
    q_slot = q_offset + jnp.arange(q_length)[:, None]  # [q, 1]
    k_slot = jnp.arange(kv_length)[None, :]  # [1, kv]
    keep = None
    if causal:
        keep = k_slot <= q_slot
    if sliding_window is not None:
        near = (
            (q_slot - k_slot < sliding_window)
            if causal
            else (jnp.abs(q_slot - k_slot) <= sliding_window)
        )
        keep = near if keep is None else keep & near
    keep = None if keep is None else keep[None, None]  # [1, 1, q, kv]
    if attention_mask is not None:
        padding = attention_mask[:, None, None, :].astype(bool)  # [batch, 1, 1, kv]
        keep = padding if keep is None else keep & padding
    if keep is None:
        return None
    return jnp.where(keep, jnp.zeros((), dtype), jnp.finfo(dtype).min).astype(dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    *,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dropout_module: nn.Module | None = None,
    scale: float | None = None,
    logit_softcap: float | None = None,
) -> jax.Array:
    """softmax(softcap(q k^T * scale) + bias) v.

    Args:
      query: [batch, q_length, heads, head_dim]
      key, value: [batch, kv_length, kv_heads, head_dim]; heads must be a multiple of kv_heads.
      bias: broadcastable to [batch, heads, q_length, kv_length], added to the logits.
      dropout_module: the caller's nn.Dropout, applied to the probabilities when training.
      scale: logit scale, default 1/sqrt(head_dim).
      logit_softcap: when set, logits become cap * tanh(logits / cap) before the bias (Gemma-2).
    Returns:
      [batch, q_length, heads, head_dim]
    """
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads:
        # Grouped-query attention: each key/value head serves heads // kv_heads query heads.
        key = jnp.repeat(key, heads // kv_heads, axis=2)
        value = jnp.repeat(value, heads // kv_heads, axis=2)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key)  # [batch, heads, q, kv]
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    if bias is not None:
        logits = logits + bias
    # Softmax in fp32 whatever the compute dtype, as the reference implementations do.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(query.dtype)
    if dropout_module is not None and dropout_rate > 0.0 and not deterministic:
        probs = dropout_module(probs, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, value)  # [batch, q, heads, head_dim]
