"""DeBERTa (v1, `deberta`) and DeBERTa-v2/v3 (`deberta-v2`) encoders, classification / QA heads.

Both replace BERT's attention by disentangled attention: besides content-to-content scores,
each head scores content against relative-position embeddings shared by all layers
(`encoder/rel_embeddings`, 2 * span rows):
  c2p[i, j] = q_i . Pk[idx(i, j)]      Pk = positions projected like keys   (pos_att_type "c2p")
  p2c[i, j] = k_j . Pq[idx'(i, j)]     Pq = positions projected like queries (pos_att_type "p2c")
with idx(i, j) = clip(r(i, j) + span, 0, 2 span - 1) and idx'(i, j) = clip(-r(j, i) + span, ...),
r = i - j (v2 with `position_buckets`: log buckets beyond bucket/2). Logits are divided by
sqrt(head_dim * (1 + number of relative terms)). The mask is the pair mask m_i * m_j (a fully masked
row softmaxes uniformly, as in Hugging Face), and embeddings are zeroed at padding.

v1 and v2 share this file because they share the structure; the differences, as transformers 5
computes them:
- projections: v1 `in_proj` (no bias; per head [q | k | v] blocks) + `q_bias`, `v_bias`;
  positions through `pos_proj` (no bias, c2p) and `pos_q_proj` (p2c). v2 `query_proj`, `key_proj`,
  `value_proj`; positions through `pos_key_proj` / `pos_query_proj`, or the content projections
  themselves with `share_att_key`.
- span: v1 uses min(length, max_relative_positions) rows centred in the table; v2 the first
  2 * (position_buckets or max_relative_positions) rows, optionally LayerNorm-ed (`norm_rel_ebd`).
- v1 may have talking heads (`talking_head`: head-mixing `head_logits_proj` before the softmax,
  `head_weights_proj` after). v2 may add a convolution branch after the first layer
  (`conv_kernel_size`, `conv_groups`, `conv_act`).
StableDropout is plain dropout here (identical at inference, which is what parity covers).
Prefix tuning (pifi_jax's own definition, see peft/prefix.py): prefix keys enter the
content-to-content scores only, scaled like them; prefix values are attended like the others.

Head (both): pooler (dropout(pooler_dropout) -> dense -> pooler_hidden_act on the first token) ->
dropout(cls_dropout or hidden_dropout_prob) -> classifier. Question answering: `qa_outputs`
(hidden -> 2) on every token, no pooler: (start_logits, end_logits). Parameter paths mirror Hugging
Face names; the base model is `deberta/` for both model types (HF's base_model_prefix).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.layers import Linear, activation, softmax
from pifi_jax.layers.peft_hooks import (
    bottleneck_adapter,
    prefix_block,
    prepend_prompt,
    prompt_inputs,
)
from pifi_jax.models import config_utils

MODEL_TYPES = ("deberta", "deberta-v2")
# Both model types nest the base model under `deberta.` in task checkpoints.
BASE_MODEL_PREFIX = "deberta"

_IGNORED_FIELDS = frozenset(
    {
        "initializer_range",
        "gradient_checkpointing",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "use_cache",
        "legacy",  # chooses the masked-LM head class only
    }
)
_REQUIRED_VALUES = {"chunk_size_feed_forward": 0, "is_decoder": False, "add_cross_attention": False}
# Fields that only one version reads; the other version refuses them.
_V1_ONLY = frozenset({"talking_head"})
_V2_ONLY = frozenset(
    {
        "position_buckets",
        "share_att_key",
        "norm_rel_ebd",
        "conv_kernel_size",
        "conv_groups",
        "conv_act",
    }
)
_RELATIVE_TERMS = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaConfig:
    """Hyperparameters of a DeBERTa (v1 or v2/v3) encoder, with Hugging Face names and defaults."""

    model_type: str = "deberta"
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    # Embedding width before `embeddings/embed_proj` (None = hidden_size, no projection).
    embedding_size: int | None = None
    # Whether absolute position embeddings are added to the token embeddings.
    position_biased_input: bool = True
    relative_attention: bool = False
    # Relative distances covered by rel_embeddings; < 1 means max_position_embeddings.
    max_relative_positions: int = -1
    # Which relative terms are added to the attention logits, a subset of ("c2p", "p2c").
    pos_att_type: tuple[str, ...] = ()
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    # Dropout before the classifier (None = hidden_dropout_prob).
    cls_dropout: float | None = None
    # v1 only: mix attention heads before and after the softmax.
    talking_head: bool = False
    # v2 only: log-bucket relative positions into 2 * position_buckets embeddings (<= 0: off).
    position_buckets: int = -1
    # v2 only: project positions with the content query/key projections.
    share_att_key: bool = False
    # v2 only: "layer_norm" normalises rel_embeddings with `encoder/LayerNorm`; "none" does not.
    norm_rel_ebd: str = "none"
    # v2 only: a convolution branch after the first layer when conv_kernel_size > 0.
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> DebertaConfig:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a DeBERTa type {MODEL_TYPES}")
        hf = dict(hf)
        hidden, heads = (
            hf.get("hidden_size", cls.hidden_size),
            hf.get("num_attention_heads", cls.num_attention_heads),
        )
        if hidden % heads:
            raise ValueError(
                f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )
        # Hugging Face builds these from hidden_size; any other value cannot run there either.
        for key, want in (("pooler_hidden_size", hidden), ("attention_head_size", hidden // heads)):
            if key in hf and hf.pop(key) != want:
                raise ValueError(f"config field {key} must equal {want} for {model_type}")
        fields = {f.name for f in dataclasses.fields(cls)}
        fields -= _V2_ONLY if model_type == "deberta" else _V1_ONLY
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family=model_type
        )
        kwargs["pos_att_type"] = _parse_pos_att_type(kwargs.get("pos_att_type"))
        if "norm_rel_ebd" in kwargs:
            kwargs["norm_rel_ebd"] = _parse_norm_rel_ebd(kwargs["norm_rel_ebd"])
        if kwargs.get("embedding_size") == hidden:
            kwargs["embedding_size"] = None
        for key in ("pad_token_id", "cls_dropout"):
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]
        config = cls(**kwargs)
        if config.conv_kernel_size > 0 and config.conv_kernel_size % 2 == 0:
            raise ValueError(
                f"conv_kernel_size={config.conv_kernel_size} is not supported: transformers pads "
                "(k - 1) // 2 on both sides, which only keeps the length for odd kernels"
            )
        if config.conv_kernel_size > 0 and config.hidden_size % config.conv_groups:
            raise ValueError(f"conv_groups={config.conv_groups} does not divide hidden_size")
        return config

    def to_hf_config(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in _V2_ONLY if self.is_v1 else _V1_ONLY:
            del out[key]
        if self.is_v1 and not self.talking_head:
            del out["talking_head"]
        out = {k: v for k, v in out.items() if v is not None}
        out["pos_att_type"] = list(self.pos_att_type)
        out["pooler_hidden_size"] = self.hidden_size
        return out

    @property
    def is_v1(self) -> bool:
        return self.model_type == "deberta"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def relative_span(self) -> int:
        """max_relative_positions with Hugging Face's default applied."""
        if self.max_relative_positions < 1:
            return self.max_position_embeddings
        return self.max_relative_positions

    @property
    def rel_embedding_rows(self) -> int:
        if not self.is_v1 and self.position_buckets > 0:
            return 2 * self.position_buckets
        return 2 * self.relative_span


def _parse_pos_att_type(value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split("|") if isinstance(value, str) else list(value)
    items = tuple(str(x).strip().lower() for x in items)
    if any(x not in _RELATIVE_TERMS for x in items) or len(set(items)) != len(items):
        raise ValueError(
            f"pos_att_type={value!r} is not supported: use distinct entries from {_RELATIVE_TERMS}"
        )
    return items


def _parse_norm_rel_ebd(value: str) -> str:
    items = {x.strip() for x in str(value).lower().split("|")}
    if not items <= {"none", "layer_norm"}:
        raise ValueError(f"norm_rel_ebd={value!r} is not supported: use 'none' or 'layer_norm'")
    return "layer_norm" if "layer_norm" in items else "none"


# ---------------------------------------------------------------------------------------------
# Relative positions. They depend only on the (static) length, so they are numpy constants.


def _log_buckets(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """Exact distances below bucket_size // 2, logarithmic buckets beyond (float32 like torch)."""
    sign = np.sign(relative)
    mid = bucket_size // 2
    near = (relative < mid) & (relative > -mid)
    distance = np.where(near, mid - 1, np.abs(relative)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) only where `near` wins below
        ratio = np.log(distance / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
        log_position = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(distance <= mid, relative, log_position * sign).astype(np.int64)


def relative_positions(config: DebertaConfig, length: int) -> np.ndarray:
    """r[i, j] = i - j, log-bucketed for v2 with position_buckets > 0: [length, length] int."""
    positions = np.arange(length, dtype=np.int64)
    relative = positions[:, None] - positions[None, :]
    if not config.is_v1 and config.position_buckets > 0:
        relative = _log_buckets(relative, config.position_buckets, config.relative_span)
    return relative


# ---------------------------------------------------------------------------------------------
# Modules


def _layer_norm(config: DebertaConfig, module: nn.Module, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        config.layer_norm_eps, dtype=module.dtype, param_dtype=module.param_dtype, name=name
    )


class DebertaEmbeddings(nn.Module):
    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool):
        cfg = self.config
        width = cfg.embedding_size or cfg.hidden_size

        def embed(rows, name):
            return nn.Embed(
                rows,
                width,
                embedding_init=nn.initializers.normal(stddev=0.02),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)  # [batch, length, width]
        x = prepend_prompt(x)  # prompt tuning: [batch, P + length, width]
        if cfg.position_biased_input:
            positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]  # [1, length]
            x = x + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
        if cfg.type_vocab_size > 0:
            x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        if cfg.embedding_size is not None:
            x = Linear(
                cfg.hidden_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="embed_proj",
            )(x)  # [batch, length, hidden]
        x = _layer_norm(cfg, self, "LayerNorm")(x)
        x = x * attention_mask[..., None].astype(x.dtype)  # padding positions become zero
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def _gather_relative(scores: jax.Array, rows: np.ndarray, index: np.ndarray) -> jax.Array:
    """out[b, h, i, j] = scores[b, h, rows[i, j], index[i, j]] for scores [b, h, n, 2 span]."""
    return scores[:, :, rows, index]  # [batch, heads, length, length]


class DisentangledSelfAttention(nn.Module):
    """Content + relative-position attention; returns the context [batch, length, hidden]."""

    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pair_mask, relative, rel_embeddings, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        linear = functools.partial(
            Linear, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
        )

        def split_heads(y):
            return y.reshape(*y.shape[:-1], heads, head_dim)  # [..., heads, head_dim]

        if cfg.is_v1:
            fused = Linear(
                3 * cfg.hidden_size,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="in_proj",
            )(x).reshape(batch, length, heads, 3, head_dim)  # per head: [q | k | v]
            zeros = nn.initializers.zeros
            q_bias = self.param("q_bias", zeros, (cfg.hidden_size,), self.param_dtype)
            v_bias = self.param("v_bias", zeros, (cfg.hidden_size,), self.param_dtype)
            query = fused[..., 0, :] + split_heads(q_bias.astype(self.dtype))  # [b, s, h, d]
            key = fused[..., 1, :]
            value = fused[..., 2, :] + split_heads(v_bias.astype(self.dtype))
        else:
            query_proj, key_proj = linear(name="query_proj"), linear(name="key_proj")
            query, key = split_heads(query_proj(x)), split_heads(key_proj(x))  # [b, s, h, d]
            value = split_heads(linear(name="value_proj")(x))

        scale = np.float32(np.sqrt(head_dim * (1 + len(cfg.pos_att_type))))
        if cfg.is_v1:  # v1 scales the query, v2 the key: same value, kept for bitwise closeness
            query = query / scale.astype(self.dtype)
            scores = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [batch, heads, q, k]
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", query, key / scale.astype(self.dtype))

        if cfg.relative_attention:
            table = nn.Dropout(cfg.hidden_dropout_prob)(rel_embeddings, deterministic=deterministic)
            if cfg.is_v1:
                span = min(length, cfg.relative_span)
                table = table[cfg.relative_span - span : cfg.relative_span + span]
            else:
                span = cfg.rel_embedding_rows // 2
                table = table[: 2 * span]  # [2 span, hidden]
            c2p_index = np.clip(relative + span, 0, 2 * span - 1)  # [q, k]
            p2c_index = np.clip(-relative.T + span, 0, 2 * span - 1)  # [q, k]
            q_rows = np.broadcast_to(np.arange(length)[:, None], (length, length))
            k_rows = q_rows.T
            divisor = 1.0 if cfg.is_v1 else scale.astype(self.dtype)
            if not cfg.is_v1 and cfg.share_att_key:
                pos_key, pos_query = key_proj(table), query_proj(table)
            elif cfg.is_v1:
                if "c2p" in cfg.pos_att_type:
                    pos_key = linear(use_bias=False, name="pos_proj")(table)
                if "p2c" in cfg.pos_att_type:
                    pos_query = linear(name="pos_q_proj")(table) / scale.astype(self.dtype)
            else:
                if "c2p" in cfg.pos_att_type:
                    pos_key = linear(name="pos_key_proj")(table)
                if "p2c" in cfg.pos_att_type:
                    pos_query = linear(name="pos_query_proj")(table)
            if "c2p" in cfg.pos_att_type:
                c2p = jnp.einsum("bqhd,rhd->bhqr", query, split_heads(pos_key))  # [b, h, q, 2span]
                scores = scores + _gather_relative(c2p, q_rows, c2p_index) / divisor
            if "p2c" in cfg.pos_att_type:
                p2c = jnp.einsum("bkhd,rhd->bhkr", key, split_heads(pos_query))  # [b, h, k, 2span]
                scores = scores + _gather_relative(p2c, k_rows, p2c_index) / divisor

        prefix = prefix_block(self, key)  # prefix tuning: P keys, values [b, P, h, d]
        if prefix is not None:  # content-to-content scores only (no position), scaled alike
            prefix_key = prefix[0] if cfg.is_v1 else prefix[0] / scale.astype(self.dtype)
            prefix_scores = jnp.einsum("bqhd,bkhd->bhqk", query, prefix_key)  # [b, h, q, P]
            scores = jnp.concatenate([prefix_scores, scores], axis=-1)  # [b, h, q, P + k]
            value = jnp.concatenate([prefix[1], value], axis=1)
            query_mask = jnp.any(pair_mask, axis=-1, keepdims=True)  # [batch, q, 1]
            query_mask = jnp.broadcast_to(query_mask, (*pair_mask.shape[:2], prefix[0].shape[1]))
            pair_mask = jnp.concatenate([query_mask, pair_mask], axis=-1)
        mix = functools.partial(
            Linear, heads, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
        )
        if cfg.talking_head:  # mixes the heads: [b, h, q, k] -> [b, q, k, h] -> Linear -> back
            scores = jnp.moveaxis(mix(name="head_logits_proj")(jnp.moveaxis(scores, 1, -1)), -1, 1)
        scores = scores.astype(jnp.float32)
        scores = jnp.where(pair_mask[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = softmax(scores, -1).astype(self.dtype)  # [batch, heads, q, k]
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        if cfg.talking_head:
            probs = jnp.moveaxis(mix(name="head_weights_proj")(jnp.moveaxis(probs, 1, -1)), -1, 1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, value)  # [batch, q, heads, head_dim]
        return out.reshape(batch, length, cfg.hidden_size)


class AddAndNorm(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .), HF's DebertaSelfOutput / DebertaOutput."""

    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        cfg = self.config
        x = Linear(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        x = bottleneck_adapter(self, x)  # Houlsby / Pfeiffer adapters, where planned
        return _layer_norm(cfg, self, "LayerNorm")(x + residual)


class Attention(nn.Module):
    """`attention/self` then `attention/output`."""

    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pair_mask, relative, rel_embeddings, deterministic: bool):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        a = DisentangledSelfAttention(**kw, name="self")(
            x, pair_mask, relative, rel_embeddings, deterministic
        )
        return AddAndNorm(**kw, name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = Linear(
            cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense"
        )(x)
        return activation(cfg.hidden_act)(h)


class Layer(nn.Module):
    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, pair_mask, relative, rel_embeddings, deterministic: bool):
        cfg = self.config
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Attention(**kw, name="attention")(x, pair_mask, relative, rel_embeddings, deterministic)
        h = Intermediate(**kw, name="intermediate")(x)  # [batch, length, intermediate]
        return AddAndNorm(**kw, name="output")(h, x, deterministic)


class ConvLayer(nn.Module):
    """v2's convolution branch: LayerNorm(layer output + act(conv(embeddings))), zero at padding."""

    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embedded, layer_output, attention_mask, deterministic: bool):
        cfg = self.config
        pad = (cfg.conv_kernel_size - 1) // 2
        # Flax's kernel [width, in / groups, out] is torch's Conv1d weight [out, in / groups, width]
        # transposed, which is what the generic weight <-> kernel conversion does.
        out = nn.Conv(
            cfg.hidden_size,
            (cfg.conv_kernel_size,),
            padding=[(pad, pad)],
            feature_group_count=cfg.conv_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(embedded)  # [batch, length, hidden]
        keep = attention_mask[..., None].astype(bool)
        out = jnp.where(keep, out, jnp.zeros((), out.dtype))
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        out = activation(cfg.conv_act)(out)
        out = _layer_norm(cfg, self, "LayerNorm")(layer_output + out)
        return out * keep.astype(out.dtype)


class RelativeEmbeddings(nn.Module):
    """The table of relative-position embeddings, [rows, hidden], shared by every layer."""

    rows: int
    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(stddev=0.02)
        return self.param("embedding", init, (self.rows, self.features), self.param_dtype)


class Encoder(nn.Module):
    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        length = x.shape[1]
        keep = attention_mask.astype(bool)
        pair_mask = keep[:, :, None] & keep[:, None, :]  # [batch, q, k]
        relative, rel_embeddings = None, None
        if cfg.relative_attention:
            relative = relative_positions(cfg, length)  # [q, k]
            rel_embeddings = RelativeEmbeddings(
                cfg.rel_embedding_rows, cfg.hidden_size, self.param_dtype, name="rel_embeddings"
            )().astype(self.dtype)  # [rows, hidden]
            if not cfg.is_v1 and cfg.norm_rel_ebd == "layer_norm":
                rel_embeddings = _layer_norm(cfg, self, "LayerNorm")(rel_embeddings)
        embedded, h = x, x
        for i in range(cfg.num_hidden_layers):
            layer = Layer(cfg, self.dtype, self.param_dtype, name=f"layer_{i}")
            h = layer(h, pair_mask, relative, rel_embeddings, deterministic)
            if i == 0 and not cfg.is_v1 and cfg.conv_kernel_size > 0:
                conv = ConvLayer(cfg, self.dtype, self.param_dtype, name="conv")
                h = conv(embedded, h, attention_mask, deterministic)
            h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        return h


class DebertaModel(nn.Module):
    """The bare encoder; returns last_hidden_state [batch, length, hidden]."""

    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        attention_mask, token_type_ids = prompt_inputs(attention_mask, token_type_ids)
        x = DebertaEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(
            input_ids, token_type_ids, attention_mask, deterministic
        )
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return Encoder(cfg, self.dtype, self.param_dtype, name="encoder")(
            x, attention_mask, deterministic
        )


class ContextPooler(nn.Module):
    """dropout -> dense -> pooler_hidden_act on the first token."""

    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic: bool):
        cfg = self.config
        x = nn.Dropout(cfg.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
        x = Linear(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        return activation(cfg.pooler_hidden_act)(x)  # [batch, hidden]


class DebertaForSequenceClassification(nn.Module):
    """Encoder + ContextPooler + dropout + classifier. num_labels == 1 is regression (one score).

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., token_type_ids=...,
    deterministic=True)` -> logits [batch, num_labels] in float32.
    """

    task: ClassVar[str] = "classification"
    config: DebertaConfig
    num_labels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = DebertaModel(cfg, **kw, name=BASE_MODEL_PREFIX)(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic
        )
        x = ContextPooler(cfg, **kw, name="pooler")(hidden, deterministic)
        rate = cfg.hidden_dropout_prob if cfg.cls_dropout is None else cfg.cls_dropout
        x = nn.Dropout(rate)(x, deterministic=deterministic)
        logits = Linear(self.num_labels, **kw, name="classifier")(x)
        return logits.astype(jnp.float32)  # [batch, num_labels]


class DebertaForQuestionAnswering(nn.Module):
    """Encoder + `qa_outputs` (hidden -> 2) on every token: extractive QA (span start / end).

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., token_type_ids=...,
    deterministic=True)` -> (start_logits, end_logits), each [batch, length] in float32. Padding
    positions get logits too (as in transformers); mask them before taking a span.
    """

    task: ClassVar[str] = "question_answering"
    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = DebertaModel(self.config, **kw, name=BASE_MODEL_PREFIX)(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic
        )
        logits = Linear(2, **kw, name="qa_outputs")(hidden).astype(jnp.float32)  # [b, s, 2]
        return logits[..., 0], logits[..., 1]  # HF: logits.split(1, -1) -> start, end


class DebertaEncoder(nn.Module):
    """The bare encoder under `deberta/`; returns last_hidden_state [batch, length, hidden]."""

    task: ClassVar[str] = "encoder"
    config: DebertaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        base = DebertaModel(
            self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=BASE_MODEL_PREFIX
        )
        return base(input_ids, attention_mask, token_type_ids, deterministic=deterministic)


# ---------------------------------------------------------------------------------------------
# Hugging Face names. hub/convert.py does the generic renaming (`layer.3` <-> `layer_3`,
# weight <-> kernel/scale/embedding with transposes, other leaf names such as q_bias kept).

# Source tensors dropped on purpose: buffers and pretraining heads (legacy and current MLM heads,
# the replaced-token-detection head of v3 checkpoints).
IGNORED_SOURCE_KEYS = (
    r".*position_ids",
    r"cls\..*",
    r"lm_predictions\..*",
    r"mask_predictions\..*",
)
# Our leaves that a checkpoint may lack (a new task head), initialised fresh.
NEW_HEAD_PATHS = (r"classifier/.*", r"qa_outputs/.*", r"pooler/.*")
# Source tensors used only when the model has them: the head, and absolute position embeddings
# that some checkpoints carry although position_biased_input is false (transformers skips them).
OPTIONAL_SOURCE_KEYS = (
    r"pooler\..*",
    r"classifier\..*",
    r"qa_outputs\..*",
    r"deberta\.embeddings\.position_embeddings\.weight",
)

# Logical axes of each parameter (first match wins), used to shard over the mesh. `in_proj`'s
# output axis is head-major ([heads, 3, head_dim]), so sharding it over heads keeps heads whole.
PARAM_AXES = (
    (r".*/word_embeddings/embedding", ("vocab", "embed")),
    (r".*/(position|token_type|rel)_embeddings/embedding", (None, "embed")),
    (r".*/embed_proj/kernel", (None, "embed")),
    (r".*/self/(in_proj|query_proj|key_proj|value_proj)/kernel", ("embed", "heads")),
    (r".*/self/(pos_proj|pos_q_proj|pos_key_proj|pos_query_proj)/kernel", ("embed", "heads")),
    (r".*/self/[a-z_]*proj/bias", ("heads",)),
    (r".*/self/(q_bias|v_bias)", ("heads",)),
    (r".*/attention/output/dense/kernel", ("heads", "embed")),
    (r".*/intermediate/dense/kernel", ("embed", "mlp")),
    (r".*/intermediate/dense/bias", ("mlp",)),
    (r".*/output/dense/kernel", ("mlp", "embed")),
    (r".*/conv/conv/kernel", (None, None, "embed")),
)


def build(config: DebertaConfig, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "classification":
        return DebertaForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "question_answering":
        return DebertaForQuestionAnswering(config, dtype, param_dtype)
    if task == "encoder":
        return DebertaEncoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by DeBERTa; "
        "choose classification, question_answering or encoder"
    )


# Our task -> the suffix of the transformers class name (`DebertaV2ForQuestionAnswering`).
HF_TASK_SUFFIXES = {
    "classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering",
    "encoder": "Model",
}


def hf_architecture(config: DebertaConfig, task: str) -> str:
    name = "Deberta" if config.is_v1 else "DebertaV2"
    return name + HF_TASK_SUFFIXES[task]


CONFIG = DebertaConfig
