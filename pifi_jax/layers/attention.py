"""Scaled dot-product attention over [batch, length, heads, head_dim] tensors, and its masks.

Supports grouped-query attention (fewer key/value heads than query heads) so that encoder and
decoder families share one implementation, plus what decoders add: causal and sliding-window masks
and tanh soft-capping of the logits (Gemma-2).

Masks are additive biases built from booleans in one step (never two large negatives added), in
slot indices: query i sits at slot `q_offset + i` among the key slots, so a key/value cache passes
the cached length as `q_offset` without changing the mask code.

Where the attention is computed is a process-wide setting, like JAX's default matmul precision:
`set_attention_implementation("cudnn")` (or the `attention_implementation(...)` context manager)
routes every model's attention through `jax.nn.dot_product_attention` and cuDNN's fused flash
kernel on a GPU; the default "native" keeps the plain einsum-softmax-einsum below. It is read
when a function is traced, so set it before the first call of a jitted step.

`KVCache` is the decoders' key/value cache (see its docstring for why it is a plain pytree), and
`self_attention_inputs` what a decoder's attention reads from it (and from a PEFT prefix).
"""

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from pifi_jax.layers.activations import softmax


def padding_bias(attention_mask: jax.Array, dtype) -> jax.Array:
    """Turns a [batch, kv_length] 0/1 mask into an additive bias [batch, 1, 1, kv_length]."""
    big_negative = jnp.finfo(dtype).min
    keep = attention_mask[:, None, None, :].astype(bool)
    return jnp.where(keep, jnp.zeros((), dtype), big_negative).astype(dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids [batch, length] that work for right and left padding, and for packed rows.

    Real tokens (mask != 0) are numbered 0, 1, ... from the first token of their segment: a row of
    one segment (a 0/1 mask) counts from its first real token (`cumsum(mask) - 1`), so a
    left-padded row gets the positions of its unpadded sequence, as transformers' generate()
    passes them; in a packed row (segment ids 1, 2, ..., see `attention_bias`) each segment starts
    again at 0. Padding slots keep their slot index; their outputs mean nothing either way. Under
    right padding this equals `arange(length)`, transformers' default when no position_ids are
    given.
    """
    mask = attention_mask.astype(jnp.int32)
    real = mask != 0
    slots = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
    count = jnp.cumsum(real.astype(jnp.int32), axis=1)  # real tokens up to and including a slot
    before = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))  # the previous slot's segment (0 in front)
    starts = real & (mask != before)  # the first slot of each segment
    # Real tokens before the current segment: the count at its start, carried forward.
    offset = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)
    return jnp.where(real, count - 1 - offset, slots)


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
        Packed rows (several sequences in one row) give each sequence's tokens its segment id
        1, 2, ... instead of 1: a real query then attends only to keys of its own segment, and
        to keys marked negative (shared: a prefix or soft prompt every segment sees). A 0/1
        mask is the one-segment case. The query at slot s has the segment of key slot s.
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
        segments = attention_mask.astype(jnp.int32)  # [batch, kv]
        # Each query's own segment: that of its slot (0 for a padding query).
        if isinstance(q_offset, int):
            q_segment = segments[:, q_offset : q_offset + q_length]  # [batch, q]
        else:  # a cache's traced fill level
            q_segment = jax.lax.dynamic_slice_in_dim(segments, q_offset, q_length, axis=1)
        k_segment = segments[:, None, :]  # [batch, 1, kv]
        q_segment = q_segment[:, :, None]  # [batch, q, 1]
        # A padding query looks at every real key (its output is unused; no row fully masked).
        visible = (k_segment == q_segment) | (k_segment < 0) | (q_segment == 0)
        padding = (k_segment != 0) & visible  # [batch, q, kv]
        padding = padding[:, None]  # [batch, 1, q, kv]
        keep = padding if keep is None else keep & padding
    if keep is None:
        return None
    return jnp.where(keep, jnp.zeros((), dtype), jnp.finfo(dtype).min).astype(dtype)


ATTENTION_IMPLEMENTATIONS = ("native", "xla", "cudnn", "auto")
_implementation = "native"


def set_attention_implementation(name: str) -> None:
    """Chooses how `dot_product_attention` computes attention from now on (at trace time).

    native: einsum, fp32 softmax, einsum (the default; runs everywhere, supports everything).
    xla: `jax.nn.dot_product_attention(implementation="xla")`.
    cudnn: the same with cuDNN's fused flash-attention kernel (GPU only; bf16/fp16, head_dim a
      multiple of 8 up to 128; an unsupported call raises).
    auto: cudnn where it applies (GPU backend and the constraints above), native elsewhere.
    Calls with active attention dropout or logit soft-capping always take the native path: the
    fused kernels express neither.
    """
    global _implementation
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {name!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
        )
    _implementation = name


def get_attention_implementation() -> str:
    return _implementation


@contextlib.contextmanager
def attention_implementation(name: str) -> Iterator[None]:
    """`set_attention_implementation(name)` for the duration of a `with` block."""
    previous = _implementation
    set_attention_implementation(name)
    try:
        yield
    finally:
        set_attention_implementation(previous)


def _cudnn_applies(query: jax.Array, bias: jax.Array | None) -> bool:
    head_dim = query.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and (bias is None or bias.ndim == 4)
    )


def _fused_backend(query: jax.Array, bias: jax.Array | None) -> str | None:
    """The jax.nn.dot_product_attention implementation to use, or None for the native path."""
    if _implementation == "native":
        return None
    if _implementation == "auto":
        return "cudnn" if _cudnn_applies(query, bias) else None
    return _implementation


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
    dropout_active = dropout_module is not None and dropout_rate > 0.0 and not deterministic
    backend = None if (dropout_active or logit_softcap is not None) else _fused_backend(query, bias)
    if backend is not None:
        # Grouped-query attention is native to jax.nn.dot_product_attention (no repeat).
        if bias is not None:
            # The kernels want the bias in the compute dtype; clamp so fp32's "min" stays finite.
            bias = jnp.maximum(bias, jnp.finfo(query.dtype).min).astype(query.dtype)
        return jax.nn.dot_product_attention(
            query,
            key.astype(query.dtype),
            value.astype(query.dtype),
            bias=bias,
            scale=scale,
            implementation=backend,
        )
    batch, q_length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    if groups == 1:
        logits = jnp.einsum("bqhd,bkhd->bhqk", query * scale, key)  # [batch, heads, q, kv]
    else:
        # Grouped-query attention: kv head j serves query heads j * groups ... (j + 1) * groups - 1
        # (transformers' repeat_kv order). The query heads are grouped instead of the keys and
        # values repeated: repeating copies the whole key/value cache once per layer and step.
        grouped = (query * scale).reshape(batch, q_length, kv_heads, groups, head_dim)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, key)
        logits = logits.reshape(batch, heads, q_length, key.shape[1])  # the same order
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    if bias is not None:
        logits = logits + bias
    # Softmax in fp32 whatever the compute dtype, as the reference implementations do.
    probs = softmax(logits.astype(jnp.float32), -1).astype(query.dtype)
    if dropout_active:
        probs = dropout_module(probs, deterministic=deterministic)
    if groups == 1:
        return jnp.einsum("bhqk,bkhd->bqhd", probs, value)  # [batch, q, heads, head_dim]
    probs = probs.reshape(batch, kv_heads, groups, q_length, key.shape[1])
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, value)
    return out.reshape(batch, q_length, heads, head_dim)


# ---------------------------------------------------------------------------------------------
# Key/value cache for decoding.


@struct.dataclass
class KVCache:
    """Keys and values of past tokens, passed into a decoder call and returned updated (a pytree).

    Functional rather than Flax's mutable "cache" collection: the cache is an ordinary argument and
    result, so generation loops carry it through `jax.lax.while_loop` like any other state, beam
    search reorders its rows with a gather, a scanned layer stack reads and writes its slice by index,
    and the model's call stays pure (no `mutable=` plumbing, no init pass to create the collection).

    key, value: [batch, max_length, kv_heads, head_dim] for one layer; a whole stack holds them as
        [layers, batch, max_length, kv_heads, head_dim] and hands `layer(i)` to layer i.
    mask: [batch, max_length] int32, 1 where a real token was written (0: padding or not yet used).
    index: int32 scalar, the number of slots written so far (the same for every row: prompts are
        padded on the left, so every row's next token goes to slot `index`).
    at: None for a cache of its own; in layer i's view of a stack's cache (`layer(i)`), i (an
        int32 scalar, maybe traced). A view keeps the whole stack's arrays: `append` writes the
        new keys/values into the stack at [i, :, index] and `keys_values()` reads layer i's
        slice. Slicing layer i out, appending to the slice and writing the slice back would
        make XLA copy the whole stack's cache once per layer and step (the slice is read while
        the stack is updated), which cost a batch of 8 decoding SmolLM2 ~58 copies of 60 MB a
        token; one small in-place update per layer copies nothing.
    empty: True (static) for a cache from `create` until its first `advance`: a call on an
        empty cache (the prefill) attends over its own keys only, not over every slot of the
        cache (the rest are unwritten: masked, but read, and laid out for the einsums, at a
        cost that grows with max_new_tokens).
    """

    key: jax.Array
    value: jax.Array
    mask: jax.Array
    index: jax.Array
    at: jax.Array | None = None
    empty: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(
        cls,
        batch: int,
        max_length: int,
        kv_heads: int,
        head_dim: int,
        *,
        layers: int | None = None,
        dtype=jnp.float32,
    ) -> "KVCache":
        """An empty cache; `layers` given: one for a whole stack ([layers, ...] keys and values)."""
        shape = (batch, max_length, kv_heads, head_dim)
        if layers is not None:
            shape = (layers, *shape)
        return cls(
            key=jnp.zeros(shape, dtype),
            value=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, max_length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            empty=True,
        )

    @property
    def max_length(self) -> int:
        return self.mask.shape[1]

    def layer(self, i: int | jax.Array) -> "KVCache":
        """Layer i's view of a stack's cache (i may be traced: a scanned stack); see `at`."""
        if self.at is not None:
            raise ValueError("layer(): this cache is already one layer's view")
        return self.replace(at=jnp.asarray(i, jnp.int32))

    def set_layer(self, i: int | jax.Array, layer_cache: "KVCache") -> "KVCache":
        """The stack's cache after layer i's view `layer_cache` wrote to it (mask and index
        stay the stack's: `advance` moves them once for the whole stack)."""
        if layer_cache.at is None:  # a layer's own cache (not a view): its slice goes in
            return self.replace(
                key=self.key.at[i].set(layer_cache.key),
                value=self.value.at[i].set(layer_cache.value),
            )
        return self.replace(key=layer_cache.key, value=layer_cache.value)

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values [batch, max_length, kv_heads, head_dim]."""
        if self.at is None:
            return self.key, self.value
        return self.key[self.at], self.value[self.at]

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache of batch rows `rows` [n] (beam search repeats and reorders beams); one
        layer's or a whole stack's."""
        if self.at is not None:
            raise ValueError("take_rows(): reorder the stack's cache, not one layer's view")
        axis = self.key.ndim - 4  # 1 for a stack's [layers, batch, ...], else 0
        return self.replace(
            key=jnp.take(self.key, rows, axis=axis),
            value=jnp.take(self.value, rows, axis=axis),
            mask=jnp.take(self.mask, rows, axis=0),
        )

    def reorder_beams(self, rows: jax.Array, shared_slots: int) -> "KVCache":
        """`take_rows(rows)` for a reorder in which every row continues a row of the same
        prompt (beam search: rows [n] of n, each one of its own prompt's beams): the first
        `shared_slots` slots (the prompt's, static) hold the same keys in all of them and stay
        where they are; only the later slots and the mask are gathered. (Gathering every slot
        every step was most of beam search's cost on long prompts.)"""
        if shared_slots <= 0:
            return self.take_rows(rows)
        if self.at is not None:
            raise ValueError("reorder_beams(): reorder the stack's cache, not one layer's view")
        slots = self.key.ndim - 3  # the slot axis (2 for a stack's [layers, batch, ...], else 1)

        def gather(x):
            later = jax.lax.slice_in_dim(x, shared_slots, None, axis=slots)
            later = jnp.take(later, rows, axis=slots - 1)
            return jax.lax.dynamic_update_slice_in_dim(x, later, shared_slots, axis=slots)

        return self.replace(
            key=gather(self.key),
            value=gather(self.value),
            mask=jnp.take(self.mask, rows, axis=0),
        )

    def advance(self, attention_mask: jax.Array | None, length: int) -> "KVCache":
        """Marks `length` new slots as written, with their padding mask [batch, length] (None: all
        real tokens)."""
        if attention_mask is None:
            attention_mask = jnp.ones((self.mask.shape[0], length), jnp.int32)
        mask = jax.lax.dynamic_update_slice(
            self.mask, attention_mask.astype(jnp.int32), (jnp.int32(0), self.index)
        )
        return self.replace(mask=mask, index=self.index + length, empty=False)

    def append(self, key: jax.Array, value: jax.Array, attention_mask: jax.Array | None):
        """One layer's cache with the new key/value [batch, length, kv_heads, head_dim] written at
        `index`, and the slots advanced."""
        start = (jnp.int32(0), self.index, jnp.int32(0), jnp.int32(0))
        if self.at is not None:  # into the stack's arrays, at layer `at`
            start, key, value = (self.at, *start), key[None], value[None]
        return self.replace(
            key=jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), start),
            value=jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), start),
        ).advance(attention_mask, key.shape[-3])

    def positions(self, attention_mask: jax.Array | None, length: int) -> jax.Array:
        """Positions [batch, length] of `length` new tokens: each row counts its real tokens, the
        cached ones included (as `positions_from_mask` does over the whole sequence)."""
        if attention_mask is None:
            attention_mask = jnp.ones((self.mask.shape[0], length), jnp.int32)
        mask = attention_mask.astype(jnp.int32)
        before = jnp.sum(self.mask != 0, axis=1, keepdims=True, dtype=jnp.int32)  # [batch, 1]
        slots = self.index + jnp.arange(length, dtype=jnp.int32)[None, :]
        return jnp.where(mask > 0, before + jnp.cumsum(mask, axis=1) - 1, slots)


@struct.dataclass
class Seq2SeqCache:
    """What an encoder-decoder's decoder keeps between generation steps (a pytree).

    self_attn: the decoder stack's KVCache ([layers, batch, max_target, kv_heads, head_dim]).
    cross_key, cross_value: [layers, batch, source, heads, head_dim], the cross-attention keys and
        values of the encoder output, projected once (by the first decoder call that is given
        the encoder output) and read by every later step.
    cross_mask: [batch, source] int32, 1 on real source tokens.
    Beam search reorders every leaf's batch rows alike (`take_rows`).
    """

    self_attn: KVCache
    cross_key: jax.Array
    cross_value: jax.Array
    cross_mask: jax.Array

    @classmethod
    def create(
        cls,
        batch: int,
        max_target: int,
        source_mask: jax.Array,
        *,
        layers: int,
        kv_heads: int,
        heads: int,
        head_dim: int,
        dtype=jnp.float32,
    ) -> "Seq2SeqCache":
        """An empty cache for `max_target` decoder slots over a source with mask [batch, source]."""
        source = source_mask.shape[1]
        cross = jnp.zeros((layers, batch, source, heads, head_dim), dtype)
        return cls(
            self_attn=KVCache.create(
                batch, max_target, kv_heads, head_dim, layers=layers, dtype=dtype
            ),
            cross_key=cross,
            cross_value=cross,
            cross_mask=source_mask.astype(jnp.int32),
        )

    def take_rows(self, rows: jax.Array) -> "Seq2SeqCache":
        """The cache of batch rows `rows` [n] (beam search: repeat or reorder beams)."""
        return Seq2SeqCache(
            self_attn=self.self_attn.take_rows(rows),
            cross_key=jnp.take(self.cross_key, rows, axis=1),
            cross_value=jnp.take(self.cross_value, rows, axis=1),
            cross_mask=jnp.take(self.cross_mask, rows, axis=0),
        )

    def reorder_beams(self, rows: jax.Array, shared_slots: int) -> "Seq2SeqCache":
        """`take_rows(rows)` for beam search's reorder within each source's beams: the cross
        keys/values (one source's for all its beams) stay; the self-attention cache moves its
        slots after `shared_slots` (KVCache.reorder_beams)."""
        return self.replace(self_attn=self.self_attn.reorder_beams(rows, shared_slots))


def self_attention_inputs(
    key: jax.Array,
    value: jax.Array,
    attention_mask: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | jax.Array | None = None,
    cache: KVCache | None = None,
    prefix: tuple[jax.Array, jax.Array] | None = None,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array | None, KVCache | None]:
    """What a decoder's self-attention reads: (keys, values, additive bias, updated cache).

    key, value: this call's [batch, length, kv_heads, head_dim]; attention_mask: [batch, length]
      0/1 (None: no padding).
    cache: one layer's KVCache: the new keys/values are written at its index and attention reads
      all its slots ([batch, max_length, ...]; unwritten and padding slots masked); the queries
      sit at slots index .. index + length - 1. An empty cache's (the prefill): the new keys only.
    prefix: (keys, values) [batch, P, kv_heads, head_dim] in front of all of that (prefix tuning),
      as P earlier tokens in slots 0..P-1: every mask rule (causal, sliding window) sees them as
      such, which is how transformers treats the cache of P entries Hugging Face PEFT passes.
    Returns keys/values [batch, kv, kv_heads, head_dim] in `dtype`, the bias [batch | 1, 1, length,
    kv] (None when nothing is masked) and the cache (None without one).
    """
    length = key.shape[1]
    mask, q_offset = attention_mask, 0
    if cache is not None:
        empty = cache.empty
        cache = cache.append(key, value, attention_mask)
        if not empty:  # the queries attend over every slot (the unwritten ones masked)
            (key, value), mask = cache.keys_values(), cache.mask
            q_offset = cache.index - length
    if prefix is not None:
        n = prefix[0].shape[1]
        key = jnp.concatenate([prefix[0].astype(key.dtype), key], axis=1)
        value = jnp.concatenate([prefix[1].astype(value.dtype), value], axis=1)
        # -1: slots every segment of a packed row sees (for a 0/1 mask the same as 1).
        mask = None if mask is None else jnp.pad(mask, ((0, 0), (n, 0)), constant_values=-1)
        q_offset = q_offset + n
    bias = attention_bias(
        mask,
        length,
        causal=causal,
        sliding_window=sliding_window,
        q_offset=q_offset,
        kv_length=key.shape[1],
        dtype=dtype,
    )
    return key.astype(dtype), value.astype(dtype), bias, cache
