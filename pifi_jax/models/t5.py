"""T5 and mT5 encoder-decoders: the original T5, v1.1 / flan-t5 and mT5, from one code path.

    encoder: x = shared(ids) -> [x + SelfAttn(norm(x)); x + FF(norm(x))] x layers -> norm
    decoder: y = shared(ids) -> [y + causal SelfAttn(norm(y)); y + CrossAttn(norm(y), encoder);
                                 y + FF(norm(y))] x layers -> norm -> lm_head (or shared^T)
    FF: wo(relu(wi(x)))  (original T5)   or   wo(gelu_new(wi_0(x)) * wi_1(x))  ("gated-gelu")

What T5 does differently from the other families:
  - no absolute positions: block 0's self-attention learns one bias per head for each bucket of
    relative distance (key slot - query slot), bidirectional in the encoder (32 buckets: 16 per
    side) and causal in the decoder; every later block reuses block 0's bias. Cross-attention
    has none. Buckets are exact below num_buckets // 2 (per side) and log-spaced up to
    relative_attention_max_distance.
  - no 1/sqrt(head_dim) logit scale (the initialisation absorbs it), no biases anywhere, and
    RMS layer norms (layers.RMSNorm: scale only).
  - the lm head: the original T5 ties it to `shared` and scales the decoder output by
    d_model**-0.5 first; v1.1 / flan-t5 / mT5 have a separate `lm_head` and no scale. In a config
    these are `tie_word_embeddings` (default True) and `scale_decoder_outputs`, which
    transformers 5 writes for t5 and which defaults to `tie_word_embeddings` there (as older
    configs imply); its mT5 never scales. transformers 5 writes tie_word_embeddings=True even
    for an untied model and leaves the choice to the checkpoint (a separate `lm_head.weight`
    that differs from `shared.weight` unties them): `config_for_checkpoint` applies the same rule
    when loading.
  - dropout (`dropout_rate`) on the embeddings, every sublayer output, the attention
    probabilities, inside the feed-forward and after the final norms; off when deterministic.

Config fields keep Hugging Face names except one: HF's `num_layers` (the encoder's depth) is
`num_encoder_layers` here, so that `config.num_layers` can be the decoder's depth, which is what
decoding (pifi_jax.generate, layers.Seq2SeqCache) reads, as for every family.

Parameter paths mirror Hugging Face names: `encoder.block.0.layer.0.SelfAttention.q.weight` is
`encoder/block_0/layer_0/SelfAttention/q/kernel`; a decoder block has layer_0 (self-attention),
layer_1 (EncDecAttention) and layer_2 (DenseReluDense), an encoder block layer_0 and layer_1. The
stacks' `embed_tokens.weight` are copies of `shared.weight` in HF checkpoints: ignored on load.

Calls (the encoder-decoder contract, shared with bart.py):
    logits = module.apply({"params": p}, input_ids, attention_mask, decoder_input_ids,
                          decoder_attention_mask)                    # float32 [batch, target, vocab]
    hidden = module.apply({"params": p}, input_ids, attention_mask)  # [batch, source, d_model]
    logits, cache = module.apply({"params": p}, None, None, decoder_ids, encoder_hidden=hidden,
                                 cache=cache)                        # decoding, a Seq2SeqCache
The decoding call that gets `encoder_hidden` projects every layer's cross-attention keys and
values into the cache; later calls pass `encoder_hidden=None` and read them from there. Decoder
slots are positions: the targets of a batch are padded on the right.

PEFT: every projection (q, k, v, o, wi, wi_0, wi_1, wo, lm_head) is a layers.Linear, so LoRA, DoRA
and IA3 apply as Hugging Face PEFT applies them (its T5 defaults: LoRA on q, v; IA3 on k, v, wo).
Bottleneck adapters follow o (self- and cross-attention, Houlsby) and wo (Houlsby and Pfeiffer),
on the sub-layer's branch before the residual sum (`bottleneck_adapter` in SelfAttention,
CrossAttention and DenseReluDense); Houlsby trains every layer_norm too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.layers import (
    Linear,
    RMSNorm,
    Seq2SeqCache,
    activation,
    dot_product_attention,
    padding_bias,
    self_attention_inputs,
)
from pifi_jax.layers.peft_hooks import bottleneck_adapter
from pifi_jax.models import config_utils

MODEL_TYPES = ("t5", "mt5")

# Initialisation, training and generation switches, and heads this module does not build.
_IGNORED_FIELDS = frozenset(
    {
        "initializer_factor",
        "use_cache",
        "gradient_checkpointing",
        "classifier_dropout",  # T5ForSequenceClassification's head
        "n_positions",  # old configs; T5 has no absolute positions
        "output_past",
        "bos_token_id",
    }
)
_REQUIRED_VALUES = {"is_decoder": False, "add_cross_attention": False, "tie_encoder_decoder": False}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of a T5 / mT5 model (Hugging Face names; see the module docstring)."""

    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_encoder_layers: int = 6  # HF `num_layers`
    num_decoder_layers: int | None = None  # None = num_encoder_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu", "gated-gelu", "gated-silu", ...
    dense_act_fn: str | None = None  # None: from feed_forward_proj ("gated-gelu": gelu_new)
    is_gated_act: bool | None = None  # None: from feed_forward_proj
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings (t5), False (mt5)
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    decoder_start_token_id: int | None = None  # None = pad_token_id, as T5 starts

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not 'gated-<act>' or '<act>'"
            )
        derived = {
            "num_decoder_layers": self.num_encoder_layers,
            "is_gated_act": len(parts) == 2,
            "dense_act_fn": "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1],
            "scale_decoder_outputs": self.tie_word_embeddings and self.model_type == "t5",
            "decoder_start_token_id": self.pad_token_id,
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        activation(self.dense_act_fn)  # refuses an unknown activation now, not at the first call

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> T5Config:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a T5-family type {MODEL_TYPES}")
        hf = dict(hf)
        encoder_layers = hf.pop("num_layers", None)
        required = dict(_REQUIRED_VALUES)
        if model_type == "mt5":  # transformers' MT5 never scales (its config has no such field)
            required["scale_decoder_outputs"] = False
        kwargs = config_utils.select_fields(
            hf, _hf_fields(), _IGNORED_FIELDS, required, family=model_type
        )
        if encoder_layers is not None:
            kwargs["num_encoder_layers"] = encoder_layers
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in sorted(_hf_fields())}
        out["num_layers"] = self.num_encoder_layers
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out["is_encoder_decoder"] = True
        return out

    # What decoding (pifi_jax.generate, layers.Seq2SeqCache) reads: the decoder's sizes.
    @property
    def num_layers(self) -> int:
        return self.num_decoder_layers

    @property
    def cache_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_kv


def _hf_fields() -> set[str]:
    """The config fields that a Hugging Face config spells the same way."""
    return {f.name for f in dataclasses.fields(T5Config)} - {"num_encoder_layers"}


def relative_position_bucket(
    relative: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket [same shape, int32] of each relative position (key slot - query slot).

    Bidirectional: half the buckets for keys after the query, half for keys at or before it;
    causal: only keys at or before the query (later ones share bucket 0, and are masked anyway).
    Within a side, distances below half the buckets are exact, longer ones log-spaced up to
    max_distance; the arithmetic is float32 in transformers' order, so the buckets agree.
    """
    relative = relative.astype(jnp.int32)
    bucket = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = jnp.where(relative > 0, num_buckets, 0)
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    exact = num_buckets // 2
    ratio = jnp.maximum(distance, 1).astype(jnp.float32) / exact  # max(., 1): no log(0)
    scaled = jnp.log(ratio) / jnp.float32(math.log(max_distance / exact))
    large = exact + (scaled * (num_buckets - exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < exact, distance, large)


def _heads(config: T5Config, x: jax.Array, name: str, kw) -> jax.Array:
    """A bias-free projection of x [batch, length, d_model] to [batch, length, heads, d_kv]."""
    y = Linear(config.num_heads * config.d_kv, use_bias=False, **kw, name=name)(x)
    return y.reshape(*x.shape[:2], config.num_heads, config.d_kv)


def _attend(config: T5Config, query, key, value, bias, deterministic: bool, kw) -> jax.Array:
    """Unscaled attention and the `o` projection: [batch, q, heads, d_kv] -> [batch, q, d_model]."""
    out = dot_product_attention(
        query,
        key,
        value,
        bias,
        dropout_rate=config.dropout_rate,
        deterministic=deterministic,
        dropout_module=nn.Dropout(config.dropout_rate),
        scale=1.0,
    )  # [batch, q, heads, d_kv]
    out = out.reshape(*out.shape[:2], config.num_heads * config.d_kv)
    return Linear(config.d_model, use_bias=False, **kw, name="o")(out)


class SelfAttention(nn.Module):
    """HF's T5Attention as self-attention. Block 0's (`relative_bias`) owns the
    `relative_attention_bias` table [buckets, heads] and computes the position bias
    [1, heads, q, kv] that it returns for the later blocks to reuse."""

    config: T5Config
    causal: bool
    relative_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, position_bias, deterministic: bool, cache=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query, key, value = (_heads(cfg, x, name, kw) for name in ("q", "k", "v"))
        first_slot = 0 if cache is None else cache.index  # of this call's queries
        key, value, mask_bias, cache = self_attention_inputs(
            key, value, attention_mask, causal=self.causal, cache=cache, dtype=self.dtype
        )  # keys/values [batch, kv, heads, d_kv]; mask bias [batch | 1, 1, q, kv] or None
        if self.relative_bias:
            table = nn.Embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                embedding_init=nn.initializers.normal(cfg.d_model**-0.5),
                **kw,
                name="relative_attention_bias",
            )
            query_slots = first_slot + jnp.arange(x.shape[1], dtype=jnp.int32)  # [q]
            relative = jnp.arange(key.shape[1], dtype=jnp.int32)[None, :] - query_slots[:, None]
            buckets = relative_position_bucket(
                relative,
                bidirectional=not self.causal,
                num_buckets=cfg.relative_attention_num_buckets,
                max_distance=cfg.relative_attention_max_distance,
            )  # [q, kv]
            position_bias = jnp.transpose(table(buckets), (2, 0, 1))[None]  # [1, heads, q, kv]
        bias = position_bias if mask_bias is None else position_bias + mask_bias
        out = _attend(cfg, query, key, value, bias, deterministic, kw)
        out = bottleneck_adapter(self, out)  # Houlsby adapters, where planned
        return out, position_bias, cache


class CrossAttention(nn.Module):
    """HF's T5Attention over the encoder output (`EncDecAttention`): no position bias.

    Keys and values are projected from `memory` [batch, source, d_model] when it is given, else
    taken from `memory_kv` (a cache's); either way they are returned, for the cache to keep.
    """

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, memory, memory_kv, source_mask, deterministic: bool):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        query = _heads(cfg, x, "q", kw)
        if memory is not None:
            memory_kv = (_heads(cfg, memory, "k", kw), _heads(cfg, memory, "v", kw))
        key, value = (t.astype(self.dtype) for t in memory_kv)  # [batch, source, heads, d_kv]
        bias = padding_bias(source_mask, self.dtype)  # [batch, 1, 1, source]
        out = _attend(cfg, query, key, value, bias, deterministic, kw)
        return bottleneck_adapter(self, out), memory_kv  # Houlsby adapters, where planned


class DenseReluDense(nn.Module):
    """The feed-forward: wo(act(wi(x))), or gated wo(act(wi_0(x)) * wi_1(x))."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(cfg.dense_act_fn)
        if cfg.is_gated_act:
            h = act(Linear(cfg.d_ff, **kw, name="wi_0")(x)) * Linear(cfg.d_ff, **kw, name="wi_1")(x)
        else:
            h = act(Linear(cfg.d_ff, **kw, name="wi")(x))  # [batch, length, d_ff]
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = Linear(cfg.d_model, **kw, name="wo")(h)
        return bottleneck_adapter(self, h)  # Houlsby / Pfeiffer adapters, where planned


class Sublayer(nn.Module):
    """One of a block's `layer_i`: x + dropout(inner(layer_norm(x), ...)), HF's T5LayerSelfAttention,
    T5LayerCrossAttention and T5LayerFF. `inner` is built here under its HF name; its first
    output is the residual branch, any further outputs are returned after the new x."""

    config: T5Config
    inner: str  # "SelfAttention", "EncDecAttention" or "DenseReluDense"
    causal: bool = False
    relative_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *args, deterministic: bool, **kwargs):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.layer_norm_epsilon, **kw, name="layer_norm")(x)
        if self.inner == "SelfAttention":
            module = SelfAttention(cfg, self.causal, self.relative_bias, **kw, name=self.inner)
        elif self.inner == "EncDecAttention":
            module = CrossAttention(cfg, **kw, name=self.inner)
        else:
            module = DenseReluDense(cfg, **kw, name=self.inner)
        out = module(h, *args, deterministic=deterministic, **kwargs)
        branch, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        x = x + nn.Dropout(cfg.dropout_rate)(branch, deterministic=deterministic)
        return (x, *rest) if rest else x


class T5Block(nn.Module):
    """`block_i`: layer_0 self-attention, (decoder) layer_1 cross-attention, then the feed-forward.

    Returns (x, position_bias, this layer's KVCache or None, cross keys/values or None).
    """

    config: T5Config
    is_decoder: bool
    relative_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        attention_mask,
        position_bias,
        deterministic: bool,
        *,
        memory=None,
        memory_kv=None,
        source_mask=None,
        cache=None,
    ):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        attn = Sublayer(
            **kw,
            inner="SelfAttention",
            causal=self.is_decoder,
            relative_bias=self.relative_bias,
            name="layer_0",
        )
        x, position_bias, cache = attn(
            x, attention_mask, position_bias, deterministic=deterministic, cache=cache
        )
        cross_kv = None
        if self.is_decoder:
            cross = Sublayer(**kw, inner="EncDecAttention", name="layer_1")
            x, cross_kv = cross(x, memory, memory_kv, source_mask, deterministic=deterministic)
        ff = Sublayer(**kw, inner="DenseReluDense", name=f"layer_{2 if self.is_decoder else 1}")
        return ff(x, deterministic=deterministic), position_bias, cache, cross_kv


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) under
    `encoder/` or `decoder/`: blocks, then `final_layer_norm` and dropout.

    x: embedded tokens [batch, length, d_model]; attention_mask: [batch, length] 0/1 or None.
    Decoder: `memory` (the encoder output [batch, source, d_model]) or a `cache` that holds its
    projections, and the source mask [batch, source]; with a cache (a Seq2SeqCache) the result
    is (x, updated cache).
    """

    config: T5Config
    is_decoder: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x, attention_mask, deterministic: bool, *, memory=None, source_mask=None, cache=None
    ):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        depth = cfg.num_decoder_layers if self.is_decoder else cfg.num_encoder_layers
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        position_bias = None  # block 0 computes it, the others reuse it
        for i in range(depth):
            block = T5Block(cfg, self.is_decoder, i == 0, **kw, name=f"block_{i}")
            layer_cache = memory_kv = None
            if cache is not None:
                layer_cache = cache.self_attn.layer(i)
                if memory is None:
                    memory_kv = (cache.cross_key[i], cache.cross_value[i])
            x, position_bias, layer_cache, cross_kv = block(
                x,
                attention_mask,
                position_bias,
                deterministic,
                memory=memory,
                memory_kv=memory_kv,
                source_mask=source_mask,
                cache=layer_cache,
            )
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
            if cache is not None:
                cache = cache.replace(self_attn=cache.self_attn.set_layer(i, layer_cache))
                if memory is not None:  # the first decoding call keeps the projections
                    k, v = (t.astype(cache.cross_key.dtype) for t in cross_kv)
                    cache = cache.replace(
                        cross_key=cache.cross_key.at[i].set(k),
                        cross_value=cache.cross_value.at[i].set(v),
                    )
        x = RMSNorm(cfg.layer_norm_epsilon, **kw, name="final_layer_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cache is None:
            return x
        return x, cache.replace(self_attn=cache.self_attn.advance(attention_mask, x.shape[1]))


class T5ForConditionalGeneration(nn.Module):
    """`shared` embedding, encoder, decoder and the lm head: float32 logits [batch, target, vocab].

    Call (see the module docstring): `module.apply({"params": params}, input_ids, attention_mask,
    decoder_input_ids, decoder_attention_mask, deterministic=True)`. Without decoder inputs it
    returns the encoder output [batch, source, d_model]. With `encoder_hidden` the encoder is not
    run; with `cache` (a layers.Seq2SeqCache) the result is (logits, updated cache) and the
    source mask is the cache's.
    """

    task: ClassVar[str] = "seq2seq"
    is_encoder_decoder: ClassVar[bool] = True
    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        *,
        encoder_hidden=None,
        cache: Seq2SeqCache | None = None,
        deterministic: bool = True,
    ):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.initializers.normal(1.0),
            **kw,
            name="shared",
        )
        if input_ids is not None and attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if encoder_hidden is None and input_ids is not None:
            encoder = T5Stack(cfg, is_decoder=False, **kw, name="encoder")
            encoder_hidden = encoder(shared(input_ids), attention_mask, deterministic)
        if decoder_input_ids is None:
            if encoder_hidden is None:
                raise ValueError("give input_ids (the source) or decoder_input_ids")
            return encoder_hidden  # [batch, source, d_model]
        if encoder_hidden is None and cache is None:
            raise ValueError("the decoder needs input_ids, encoder_hidden or a cache")
        if cache is not None:
            source_mask = cache.cross_mask
        elif attention_mask is not None:
            source_mask = attention_mask
        else:
            source_mask = jnp.ones(encoder_hidden.shape[:2], jnp.int32)
        decoder = T5Stack(cfg, is_decoder=True, **kw, name="decoder")
        h = decoder(
            shared(decoder_input_ids),
            decoder_attention_mask,
            deterministic,
            memory=encoder_hidden,
            source_mask=source_mask,
            cache=cache,
        )
        if cache is not None:
            h, cache = h
        if cfg.scale_decoder_outputs:
            h = h * cfg.d_model**-0.5
        if cfg.tie_word_embeddings:
            logits = shared.attend(h)
        else:
            logits = Linear(cfg.vocab_size, use_bias=False, **kw, name="lm_head")(h)
        logits = logits.astype(jnp.float32)  # [batch, target, vocab]
        return logits if cache is None else (logits, cache)


# ---------------------------------------------------------------------------------------------
# Hugging Face names (hub/convert.py does the generic renaming; see bert.py).

# The checkpoint's top-level names are ours (`shared`, `encoder`, `decoder`, `lm_head`).
BASE_MODEL_PREFIX = ""
# Copies of `shared.weight` (tied in transformers), and a table old checkpoints carry that no
# cross-attention uses (transformers ignores it too).
IGNORED_SOURCE_KEYS = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)
# A tied model's checkpoint may still hold lm_head.weight, equal to shared.weight
# (config_for_checkpoint unties the model when it differs).
OPTIONAL_SOURCE_KEYS = (r"lm_head\.weight",)
# An encoder-decoder family (its encoder states are its decoder's cross-attention memory).
ENCODER_DECODER = True
NEW_HEAD_PATHS = ()
# The gated feed-forward's two input projections: names, not list indices (`wi_0`, not `wi.0`).
LITERAL_NAMES = ("wi_0", "wi_1")
PARAM_AXES = (
    (r"shared/embedding", ("vocab", "embed")),
    (r".*/(SelfAttention|EncDecAttention)/(q|k|v)/kernel", ("embed", "heads")),
    (r".*/(SelfAttention|EncDecAttention)/o/kernel", ("heads", "embed")),
    (r".*/relative_attention_bias/embedding", (None, "heads")),
    (r".*/DenseReluDense/wi(_0|_1)?/kernel", ("embed", "mlp")),
    (r".*/DenseReluDense/wo/kernel", ("mlp", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
)
_HF_NAMES = {"t5": "T5", "mt5": "MT5"}


def config_for_checkpoint(config: T5Config, reader) -> T5Config:
    """The config with the lm head untied when the checkpoint holds an `lm_head.weight` that
    differs from `shared.weight`, as transformers 5 decides (see the module docstring)."""
    keys = set(reader.keys())
    if not config.tie_word_embeddings or not {"lm_head.weight", "shared.weight"} <= keys:
        return config
    if np.array_equal(reader.get("lm_head.weight"), reader.get("shared.weight")):
        return config
    return dataclasses.replace(config, tie_word_embeddings=False)


def build(config: T5Config, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    del num_labels  # no classification head
    if task == "seq2seq":
        return T5ForConditionalGeneration(config, dtype, param_dtype)
    raise ValueError(f"task {task!r} is not supported by {config.model_type}; use seq2seq")


def hf_architecture(config: T5Config, task: str) -> str:
    del task  # seq2seq only
    return f"{_HF_NAMES[config.model_type]}ForConditionalGeneration"


CONFIG = T5Config
