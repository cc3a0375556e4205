"""Gemma-2 decoders: Llama's attention and gated MLP with Gemma's additions.

    x -> embed_tokens * sqrt(hidden) -> layers -> RMSNorm -> tied lm_head -> cap * tanh(logits / cap)
    layer: x + post_attention_layernorm(Attn(input_layernorm(x)))
           x + post_feedforward_layernorm(MLP(pre_feedforward_layernorm(x)))

- every RMSNorm stores w and scales by (1 + w) (layers.RMSNorm(unit_offset=True));
- attention logits scaled by query_pre_attn_scalar^-0.5 (not head_dim^-0.5) and soft-capped:
  cap * tanh(logits / cap) with attn_logit_softcapping, before the mask;
- layers alternate local and global attention: `layer_types[i] == "sliding_attention"` (by
  default the even layers) masks keys `sliding_window` or more slots back;
- the MLP activation is `hidden_activation` (gelu with the tanh approximation).

Paths mirror Hugging Face names, as in llama.py: `model/layers_3/pre_feedforward_layernorm/scale`.
Decoding with a KVCache, scan_layers and remat_policy (models/stack.py) and PEFT work as in llama.py
(a scanned stack looks up each layer's window, local or global, by its traced index).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pifi_jax.layers import KVCache, RMSNorm, Rope
from pifi_jax.models import config_utils
from pifi_jax.models.llama import LAYER_TYPES, Attention, GatedMLP, read_rope
from pifi_jax.models.stack import (
    HF_TASK_SUFFIXES,
    BareDecoder,
    CausalLM,
    SequenceClassifier,
    decoder_inputs,
    default_positions,
    make_layers,
    run_layers,
    stacked_param_axes,
    window_of,
)

MODEL_TYPES = ("gemma2",)

_IGNORED_FIELDS = frozenset(
    {
        "initializer_range",
        "use_cache",
        "auto_map",
        "cache_implementation",
        # Superseded by hidden_activation (transformers reads only that one for Gemma-2).
        "hidden_act",
        # An old duplicate of sliding_window.
        "sliding_window_size",
    }
)
_REQUIRED_VALUES = {"use_bidirectional_attention": False}


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Hyperparameters of a Gemma-2 decoder (field names as in Hugging Face)."""

    model_type: str = "gemma2"
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope: Rope = Rope()
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None  # None = sliding on even layers, global on odd
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.layer_types is None:
            default = tuple(
                "sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", default)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types needs one entry per layer")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} not supported; known: {LAYER_TYPES}")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Gemma2Config:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        if hf.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {hf.get('model_type')!r} is not gemma2")
        hf = dict(hf)
        rope = read_rope(hf, hf.get("max_position_embeddings", cls.max_position_embeddings))
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope"}
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family="gemma2"
        )
        for key in ("layer_types", "eos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        return cls(rope=rope, **kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "rope"}
        for key in ("layer_types", "eos_token_id"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        out["rope_parameters"] = self.rope.to_hf()
        return out

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def cache_kv_heads(self) -> int:
        return self.num_key_value_heads

    def layer_window(self, index: int) -> int | None:
        return self.sliding_window if self.layer_types[index] == "sliding_attention" else None

    @property
    def embed_scale(self) -> float:
        """The factor on the token embeddings (transformers' Gemma2TextScaledWordEmbedding)."""
        return math.sqrt(self.hidden_size)


class Gemma2DecoderLayer(nn.Module):
    """One Gemma-2 layer; x [batch, length, hidden] -> same (arguments as LlamaDecoderLayer)."""

    config: Gemma2Config
    layer_index: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        attention_mask=None,
        positions=None,
        causal=True,
        deterministic=True,
        *,
        cache: KVCache | None = None,
        layer_index=None,
    ):
        cfg = self.config
        positions = default_positions(x, attention_mask, positions, cache)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, unit_offset=True, **kw, name=name)

        attn = Attention(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rope,
            qkv_bias=cfg.attention_bias,
            out_bias=cfg.attention_bias,
            scale=cfg.query_pre_attn_scalar**-0.5,
            logit_softcap=cfg.attn_logit_softcapping,
            dropout_rate=cfg.attention_dropout,
            **kw,
            name="self_attn",
        )
        h = attn(
            norm("input_layernorm")(x),
            attention_mask,
            positions,
            causal=causal,
            deterministic=deterministic,
            sliding_window=window_of(cfg, self.layer_index, layer_index),
            cache=cache,
        )
        if cache is not None:
            h, cache = h
        x = x + norm("post_attention_layernorm")(h)
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_activation, **kw, name="mlp")
        h = mlp(norm("pre_feedforward_layernorm")(x))
        x = x + norm("post_feedforward_layernorm")(h)  # [batch, length, hidden]
        return x if cache is None else (x, cache)


class Gemma2Model(nn.Module):
    """embed_tokens (scaled by sqrt(hidden)) -> layers -> norm; returns the last hidden state (and
    the updated cache when one is given)."""

    config: Gemma2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), **kw
        )
        self.layers = make_layers(
            Gemma2DecoderLayer, cfg, scan=self.scan_layers, remat_policy=self.remat_policy, **kw
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, unit_offset=True, **kw)

    def __call__(
        self, input_ids, attention_mask=None, positions=None, *, deterministic=True, cache=None
    ):
        # transformers rounds the multiplier to the weights' dtype (sqrt(3584) is 60.0 in bf16).
        # It scales inside its embedding module, so a soft prompt, which Hugging Face PEFT passes
        # as embeddings, is not scaled.
        normalizer = jnp.asarray(self.config.embed_scale, self.param_dtype)
        x = self.embed_tokens(input_ids) * normalizer.astype(self.dtype)  # [batch, length, hidden]
        x, attention_mask, positions = decoder_inputs(x, attention_mask, positions, cache)
        x, cache = run_layers(
            self.layers,
            x,
            attention_mask,
            positions,
            deterministic=deterministic,
            cache=cache,
            num_layers=self.config.num_hidden_layers,
        )
        x = self.norm(x)
        return x if cache is None else (x, cache)

    def attend(self, h):
        """Logits through the tied input embedding."""
        return self.embed_tokens.attend(h)


class Gemma2ForCausalLM(CausalLM):
    """Decoder + (tied) lm_head + final soft-capping; float32 logits [batch, length, vocab]. Call
    and options as stack.CausalLM."""

    base_class = Gemma2Model
    base_name = "model"


class Gemma2ForSequenceClassification(SequenceClassifier):
    """Decoder + a bias-free `score` head on each row's last real token: float32 logits
    [batch, num_labels]. Call as stack.SequenceClassifier."""

    base_class = Gemma2Model
    base_name = "model"


class Gemma2Decoder(BareDecoder):
    """The bare stack under `model/`; returns the last hidden state [batch, length, hidden]."""

    base_class = Gemma2Model
    base_name = "model"


# ---------------------------------------------------------------------------------------------
# Hugging Face names (same module names as Llama, plus the two feed-forward norms).

BASE_MODEL_PREFIX = "model"
LAYER_KEYS = r"(?:model\.)?layers\.(\d+)\.(.+)"
LAYER_STACK = "layers"
IGNORED_SOURCE_KEYS = (r".*rotary_emb\.inv_freq",)
# As in llama.py: the lm_head or the score head a task lacks; the classifier's new head.
OPTIONAL_SOURCE_KEYS = (r"lm_head\.weight", r"score\.weight")
NEW_HEAD_PATHS = (r"score/.*",)
LAYER_PARAM_AXES = (
    (r"self_attn/q_proj/kernel", ("embed", "heads")),
    (r"self_attn/q_proj/bias", ("heads",)),
    (r"self_attn/(k|v)_proj/kernel", ("embed", "kv")),
    (r"self_attn/(k|v)_proj/bias", ("kv",)),
    (r"self_attn/o_proj/kernel", ("heads", "embed")),
    (r"mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
    (r"mlp/down_proj/kernel", ("mlp", "embed")),
)
PARAM_AXES = (
    (r"(.*/)?embed_tokens/embedding", ("vocab", "embed")),
    *stacked_param_axes(LAYER_STACK, LAYER_PARAM_AXES),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", None)),
)


def build(config: Gemma2Config, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "causal_lm":
        return Gemma2ForCausalLM(config, dtype, param_dtype)
    if task == "classification":
        return Gemma2ForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "decoder":
        return Gemma2Decoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by gemma2; use causal_lm, classification or decoder"
    )


def decoder_layer(config: Gemma2Config, index: int, dtype, param_dtype) -> nn.Module:
    return Gemma2DecoderLayer(config, index, dtype, param_dtype)


def hf_architecture(config: Gemma2Config, task: str) -> str:
    return "Gemma2" + HF_TASK_SUFFIXES[task]


CONFIG = Gemma2Config
