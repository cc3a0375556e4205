"""BART: a post-LayerNorm encoder-decoder with learned positions and a tied LM head.

    encoder: x = LN_emb(shared(ids) * s + embed_positions(pos + 2)) -> layers
      layer: x = LN(x + SelfAttn(x)); x = LN(x + fc2(act(fc1(x))))
    decoder: y = LN_emb(shared(dec_ids) * s + embed_positions(pos + 2)) -> layers
      layer: y = LN(y + CausalSelfAttn(y)); y = LN(y + CrossAttn(y, x)); y = LN(y + FFN(y))
    logits = y @ shared^T + final_logits_bias

s is sqrt(d_model) with `scale_embedding`, else 1. The position table has two rows more than
`max_position_embeddings` (fairseq kept two for padding), so position p reads row p + 2; positions
are slot indices (padding does not shift them), as in transformers. Attention scales q.k by
head_dim^-0.5; every projection has a bias. Dropout: `dropout` after the embeddings and after each
sub-layer, `attention_dropout` on the probabilities, `activation_dropout` after the activation.

Parameter paths mirror Hugging Face names: `model.encoder.layers.0.self_attn.q_proj.weight` is
`model/encoder/layers_0/self_attn/q_proj/kernel`; the token embedding is `model/shared/embedding`,
used by both stacks and by the head, so the checkpoints' tied copies
(`model.{encoder,decoder}.embed_tokens.weight`, `lm_head.weight`) are ignored on purpose.
`final_logits_bias` [1, vocab] is a buffer in transformers: it is loaded and saved, and enters
the forward pass through stop_gradient, so training leaves it as it is, as in PyTorch.

Calls (`module.apply({"params": p}, ...)`, always through `__call__`, so PEFT wraps it as is):
  training   (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
             deterministic=True) -> float32 logits [batch, target, vocab]
  encoder    (input_ids, attention_mask) -> encoder hidden [batch, source, d_model]
  decoding   (None, None, decoder_ids, encoder_hidden=h, cache=c) -> (logits, cache), c a
             layers.Seq2SeqCache: the call given `encoder_hidden` projects every decoder layer's
             cross-attention keys/values into the cache; later calls pass encoder_hidden=None and
             read them there. Decoder positions count on from the cache's index.
Initialising needs decoder inputs (`module.init(rng, ids, None, ids)`), or the decoder's leaves
are not made: hub.pretrained and peft.wrap pass them to encoder-decoders.

PEFT: every projection is a layers.Linear (LoRA, DoRA, IA3; Hugging Face PEFT's defaults
target the q_proj / v_proj of all three kinds of attention); bottleneck adapters follow each
attention's out_proj and fc2 (Houlsby) or fc2 alone (Pfeiffer). Prefix and prompt tuning are not
supported (refused by peft.prefix / peft.prompt).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pifi_jax.layers import (
    KVCache,
    Linear,
    Seq2SeqCache,
    activation,
    dot_product_attention,
    padding_bias,
    self_attention_inputs,
)
from pifi_jax.layers.peft_hooks import bottleneck_adapter
from pifi_jax.models import config_utils

MODEL_TYPES = ("bart",)
# fairseq's two reserved rows at the top of the position table.
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which BART uses

# Bookkeeping, training-time switches, heads we do not build, and generation defaults (pass
# generation options to pifi_jax.generate instead).
_IGNORED_FIELDS = frozenset(
    {
        "init_std",
        "use_cache",
        "gradient_checkpointing",
        "output_past",
        "num_hidden_layers",  # older configs: a copy of encoder_layers
        "classifier_dropout",  # BartForSequenceClassification's head
        "classif_dropout",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "force_bos_token_to_be_generated",
        "num_beams",
        "no_repeat_ngram_size",
        "early_stopping",
        "length_penalty",
        "max_length",
        "min_length",
    }
)
# Fields accepted only with the value this implementation computes (the others are mBART's,
# Marian's or a variant's: pre-LN, a final LayerNorm, sinusoidal positions, LayerDrop, ...).
_REQUIRED_VALUES = {
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "normalize_before": False,
    "add_final_layer_norm": False,
    "normalize_embedding": True,
    "static_position_embeddings": False,
    "add_bias_logits": False,
    "extra_pos_embeddings": POSITION_OFFSET,
}


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Hyperparameters of a BART model (field names as in Hugging Face configs)."""

    model_type: str = "bart"
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2

    def __post_init__(self):
        for side in ("encoder", "decoder"):
            if self.d_model % getattr(self, f"{side}_attention_heads"):
                raise ValueError(f"d_model must be a multiple of {side}_attention_heads")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> BartConfig:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        if hf.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {hf.get('model_type')!r} is not {MODEL_TYPES}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family="bart"
        )
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["is_encoder_decoder"] = True
        return out

    # What decoding (pifi_jax.generate, layers.Seq2SeqCache) reads: the decoder's sizes.
    @property
    def num_layers(self) -> int:
        return self.decoder_layers

    @property
    def num_heads(self) -> int:
        return self.decoder_attention_heads

    @property
    def cache_kv_heads(self) -> int:
        return self.decoder_attention_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


class Attention(nn.Module):
    """BartAttention: q/k/v/out projections with biases, logits scaled by head_dim^-0.5.

    Call: x [batch, length, d] gives the queries; keys/values come from `states` [batch, kv, d]
    (cross-attention; default x), or are given already projected as `key_value` (a cache).
    causal=True is the decoder's self-attention: causal mask, `mask` on the keys, and with `cache`
    (one layer's KVCache) the keys/values written to and read from it. Otherwise `mask`
    [batch, kv] 0/1 masks padding keys (None: none).
    Returns (output [batch, length, d], the projected (key, value) [batch, kv, heads, head_dim],
    the updated cache or None).
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        mask,
        deterministic: bool,
        *,
        states=None,
        key_value=None,
        causal: bool = False,
        cache: KVCache | None = None,
    ):
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name, y):  # [batch, n, d] -> [batch, n, heads, head_dim]
            return Linear(width, **kw, name=name)(y).reshape(*y.shape[:2], self.num_heads, head_dim)

        query = project("q_proj", x)
        if key_value is None:
            states = x if states is None else states
            key_value = (project("k_proj", states), project("v_proj", states))
        key, value = key_value
        if causal:
            key, value, bias, cache = self_attention_inputs(
                key, value, mask, causal=True, cache=cache, dtype=self.dtype
            )  # keys/values: [batch, kv, heads, head_dim]; bias [batch | 1, 1, length, kv]
        else:
            key, value = key.astype(self.dtype), value.astype(self.dtype)
            bias = None if mask is None else padding_bias(mask, self.dtype)  # [batch, 1, 1, kv]
        out = dot_product_attention(
            query,
            key,
            value,
            bias,
            dropout_rate=self.dropout_rate,
            deterministic=deterministic,
            dropout_module=nn.Dropout(self.dropout_rate),
        )  # [batch, length, heads, head_dim]
        out = Linear(width, **kw, name="out_proj")(out.reshape(batch, length, width))
        out = bottleneck_adapter(self, out)  # Houlsby adapters, where planned
        return out, key_value, cache


class BartLayer(nn.Module):
    """One encoder layer (self_attn, fc1/fc2) or, with is_decoder, one decoder layer (causal
    self_attn, encoder_attn, fc1/fc2); post-LN, each sub-layer's LayerNorm after its residual.

    Call: x [batch, length, d]; mask: the padding mask of x [batch, length] (None: none).
    Decoder: `encoder_hidden` [batch, source, d] or `cross` (its projected keys/values, from a
    cache), `source_mask` [batch, source]; `cache`: this layer's self-attention KVCache.
    Returns (x, cache, cross keys/values); the encoder's last two are None.
    """

    config: BartConfig
    is_decoder: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        mask,
        deterministic: bool,
        *,
        encoder_hidden=None,
        source_mask=None,
        cross=None,
        cache: KVCache | None = None,
    ):
        cfg = self.config
        side = "decoder" if self.is_decoder else "encoder"
        heads = getattr(cfg, f"{side}_attention_heads")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            return nn.LayerNorm(LAYER_NORM_EPS, **kw, name=name)

        def dropout(h, rate=cfg.dropout):
            return nn.Dropout(rate)(h, deterministic=deterministic)

        def attention(name):
            return Attention(heads, cfg.attention_dropout, **kw, name=name)

        h, _, cache = attention("self_attn")(
            x, mask, deterministic, causal=self.is_decoder, cache=cache
        )
        x = norm("self_attn_layer_norm")(x + dropout(h))
        if self.is_decoder:
            h, cross, _ = attention("encoder_attn")(
                x, source_mask, deterministic, states=encoder_hidden, key_value=cross
            )
            x = norm("encoder_attn_layer_norm")(x + dropout(h))
        h = Linear(getattr(cfg, f"{side}_ffn_dim"), **kw, name="fc1")(x)  # [batch, length, ffn]
        h = dropout(activation(cfg.activation_function)(h), cfg.activation_dropout)
        h = Linear(cfg.d_model, **kw, name="fc2")(h)
        h = bottleneck_adapter(self, h)  # Houlsby / Pfeiffer adapters, where planned
        x = norm("final_layer_norm")(x + dropout(h))  # [batch, length, d]
        return x, cache, cross


class Stack(nn.Module):
    """HF's BartEncoder / BartDecoder: shared token embedding (scaled), learned positions from
    `start`, layernorm_embedding, dropout, layers. `embed_tokens` is the parent's `shared`."""

    config: BartConfig
    embed_tokens: nn.Module
    is_decoder: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_positions = nn.Embed(
            cfg.max_position_embeddings + POSITION_OFFSET,
            cfg.d_model,
            embedding_init=nn.initializers.normal(0.02),
            **kw,
        )
        self.layernorm_embedding = nn.LayerNorm(LAYER_NORM_EPS, **kw)
        n = cfg.decoder_layers if self.is_decoder else cfg.encoder_layers
        self.layers = [BartLayer(cfg, self.is_decoder, **kw) for _ in range(n)]
        self.dropout = nn.Dropout(cfg.dropout)

    def embed(self, ids, start, deterministic: bool):
        """Token + position embeddings, normalised: [batch, length, d]."""
        positions = start + jnp.arange(ids.shape[1], dtype=jnp.int32)  # [length]
        x = self.embed_tokens(ids) * self.config.embed_scale
        x = x + self.embed_positions(positions + POSITION_OFFSET)[None]
        x = self.layernorm_embedding(x)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, ids, mask, deterministic: bool):
        x = self.embed(ids, 0, deterministic)
        for layer in self.layers:
            x, _, _ = layer(x, mask, deterministic)
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x  # [batch, source, d]

    def decode(self, ids, mask, encoder_hidden, source_mask, deterministic: bool, cache=None):
        """Decoder hidden states [batch, target, d] (and the updated Seq2SeqCache, given one).

        With a cache, `encoder_hidden` given: each layer's cross keys/values are projected and
        written to it; None: read from it. The cache's source mask replaces `source_mask`.
        """
        start = 0 if cache is None else cache.self_attn.index
        x = self.embed(ids, start, deterministic)
        if cache is not None:
            source_mask = cache.cross_mask
            self_kv, cross_key, cross_value = cache.self_attn, cache.cross_key, cache.cross_value
        for i, layer in enumerate(self.layers):
            cross = None
            if cache is not None and encoder_hidden is None:
                cross = (cross_key[i], cross_value[i])  # [batch, source, heads, head_dim]
            x, layer_kv, projected = layer(
                x,
                mask,
                deterministic,
                encoder_hidden=encoder_hidden,
                source_mask=source_mask,
                cross=cross,
                cache=None if cache is None else self_kv.layer(i),
            )
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
            if cache is not None:
                self_kv = self_kv.set_layer(i, layer_kv)
                if encoder_hidden is not None:
                    cross_key = cross_key.at[i].set(projected[0].astype(cross_key.dtype))
                    cross_value = cross_value.at[i].set(projected[1].astype(cross_value.dtype))
        if cache is None:
            return x
        cache = cache.replace(
            self_attn=self_kv.advance(mask, ids.shape[1]),
            cross_key=cross_key,
            cross_value=cross_value,
        )
        return x, cache


class BartModel(nn.Module):
    """HF's BartModel: `shared`, `encoder`, `decoder` (the two stacks read `shared`)."""

    config: BartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.shared = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02), **kw
        )
        self.encoder = Stack(cfg, self.shared, is_decoder=False, **kw)
        self.decoder = Stack(cfg, self.shared, is_decoder=True, **kw)

    def encode(self, ids, mask, deterministic: bool):
        return self.encoder.encode(ids, mask, deterministic)

    def decode(self, ids, mask, encoder_hidden, source_mask, deterministic: bool, cache=None):
        return self.decoder.decode(ids, mask, encoder_hidden, source_mask, deterministic, cache)

    def attend(self, h):
        """Logits through the shared embedding: [batch, target, vocab]."""
        return self.shared.attend(h)


class BartForConditionalGeneration(nn.Module):
    """BartModel + the tied LM head and final_logits_bias. Calls: see the module docstring."""

    task: ClassVar[str] = "seq2seq"
    is_encoder_decoder: ClassVar[bool] = True
    config: BartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        *,
        encoder_hidden=None,
        cache: Seq2SeqCache | None = None,
        deterministic=True,
    ):
        cfg = self.config
        model = BartModel(cfg, self.dtype, self.param_dtype, name="model")
        logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (1, cfg.vocab_size), self.param_dtype
        )
        if decoder_input_ids is None:
            if encoder_hidden is not None or cache is not None:
                raise ValueError("decoding needs decoder_input_ids")
            return model.encode(input_ids, attention_mask, deterministic)  # [batch, source, d]
        if encoder_hidden is None and cache is None:
            encoder_hidden = model.encode(input_ids, attention_mask, deterministic)
        out = model.decode(
            decoder_input_ids,
            decoder_attention_mask,
            encoder_hidden,
            attention_mask,
            deterministic,
            cache,
        )
        h, cache = out if cache is not None else (out, None)
        # A buffer in transformers: a constant here too, so training does not move it.
        bias = jax.lax.stop_gradient(logits_bias).astype(jnp.float32)
        logits = model.attend(h).astype(jnp.float32) + bias  # [batch, target, vocab]
        return logits if cache is None else (logits, cache)


# ---------------------------------------------------------------------------------------------
# Hugging Face names (hub/convert.py does the generic renaming; see bert.py).

BASE_MODEL_PREFIX = "model"
# Tied copies of model.shared.weight that transformers may write.
IGNORED_SOURCE_KEYS = (r"model\.(encoder|decoder)\.embed_tokens\.weight", r"lm_head\.weight")
OPTIONAL_SOURCE_KEYS = ()
# An encoder-decoder family (its encoder states are its decoder's cross-attention memory).
ENCODER_DECODER = True
NEW_HEAD_PATHS = ()
PARAM_AXES = (
    (r"model/shared/embedding", ("vocab", "embed")),
    (r".*/embed_positions/embedding", (None, "embed")),
    (r".*_attn/(q|k|v)_proj/kernel", ("embed", "heads")),
    (r".*_attn/(q|k|v)_proj/bias", ("heads",)),
    (r".*_attn/out_proj/kernel", ("heads", "embed")),
    (r".*/fc1/kernel", ("embed", "mlp")),
    (r".*/fc1/bias", ("mlp",)),
    (r".*/fc2/kernel", ("mlp", "embed")),
    (r"final_logits_bias", (None, "vocab")),
)


def build(config: BartConfig, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    del num_labels
    if task == "seq2seq":
        return BartForConditionalGeneration(config, dtype, param_dtype)
    raise ValueError(f"task {task!r} is not supported by bart; use seq2seq")


def hf_architecture(config: BartConfig, task: str) -> str:
    del config, task
    return "BartForConditionalGeneration"


CONFIG = BartConfig
