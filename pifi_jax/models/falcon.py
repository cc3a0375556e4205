"""Falcon decoders in the Falcon-7B style: rotary positions, LayerNorm, fused query_key_value.

    x -> word_embeddings -> h_0 .. h_{n-1} -> ln_f -> lm_head (tied to word_embeddings by default)
    parallel_attn (7B):  y = input_layernorm(x);  x + (MLP(y) + Attn(y))
    sequential:          x = x + Attn(input_layernorm(x));  x + MLP(post_attention_layernorm(x))
    MLP: dense_4h_to_h(gelu(dense_h_to_4h(x)))

`query_key_value` holds q, k and v in one projection:
  multi_query (7B): [heads + 2, head_dim] -> heads query heads, then ONE key and ONE value head
  otherwise:        [heads, 3, head_dim]  -> q, k, v interleaved per head
Not implemented, and refused when a config asks for them: ALiBi (`alibi`), the 40B/180B layout
(`new_decoder_architecture`), residuals after the norm (`apply_residual_connection_post_layernorm`).

Paths mirror Hugging Face names: `transformer.h.3.self_attention.query_key_value.weight` is
`transformer/h_3/self_attention/query_key_value/kernel`. Decoding with a KVCache (one key/value
head per layer under multi_query), scan_layers and remat_policy (models/stack.py) and PEFT work as
in llama.py; bottleneck adapters follow `self_attention.dense` and `mlp.dense_4h_to_h`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pifi_jax.layers import (
    KVCache,
    Linear,
    Rope,
    activation,
    dot_product_attention,
    self_attention_inputs,
)
from pifi_jax.layers.peft_hooks import bottleneck_adapter, prefix_block
from pifi_jax.models import config_utils
from pifi_jax.models.llama import read_rope
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
)

MODEL_TYPES = ("falcon",)

_IGNORED_FIELDS = frozenset({"initializer_range", "use_cache", "auto_map"})
_REQUIRED_VALUES = {
    "alibi": False,
    "new_decoder_architecture": False,
    "apply_residual_connection_post_layernorm": False,
}


@dataclasses.dataclass(frozen=True)
class FalconConfig:
    """Hyperparameters of a Falcon decoder (field names as in Hugging Face)."""

    model_type: str = "falcon"
    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    # Only the 40B layout reads num_kv_heads; kept so the config round-trips.
    num_kv_heads: int | None = None
    layer_norm_epsilon: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    max_position_embeddings: int = 2048
    rope: Rope = Rope()
    ffn_hidden_size: int | None = None  # None = 4 * hidden_size
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 11
    eos_token_id: int | tuple[int, ...] | None = 11
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> FalconConfig:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        if hf.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {hf.get('model_type')!r} is not falcon")
        hf = dict(hf)
        # One norm per parallel block is what the 7B layout has; 2 only exists in the 40B layout.
        if hf.pop("num_ln_in_parallel_attn", None) not in (None, 1):
            raise ValueError("config field num_ln_in_parallel_attn=2 is not supported for falcon")
        rope = read_rope(hf, hf.get("max_position_embeddings", cls.max_position_embeddings))
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope"}
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family="falcon"
        )
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        return cls(rope=rope, **kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "rope" and v is not None}
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out.update(alibi=False, new_decoder_architecture=False, rope_parameters=self.rope.to_hf())
        return out

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def cache_kv_heads(self) -> int:
        return 1 if self.multi_query else self.num_attention_heads


class FalconAttention(nn.Module):
    """Fused query_key_value, RoPE, (multi-query) attention, dense. [b, s, hidden] -> same."""

    config: FalconConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, positions, *, causal: bool, cache=None):
        cfg = self.config
        batch, length, hidden = x.shape
        heads, dim = cfg.num_attention_heads, cfg.head_dim
        kw = dict(use_bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.multi_query:
            fused = Linear(hidden + 2 * dim, **kw, name="query_key_value")(x)
            fused = fused.reshape(batch, length, heads + 2, dim)  # [b, s, heads + 2, head_dim]
            query, key, value = fused[:, :, :heads], fused[:, :, -2:-1], fused[:, :, -1:]
        else:
            fused = Linear(3 * hidden, **kw, name="query_key_value")(x)
            fused = fused.reshape(batch, length, heads, 3, dim)  # [b, s, heads, 3, head_dim]
            query, key, value = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]
        query, key = cfg.rope.apply(query, positions), cfg.rope.apply(key, positions)
        key, value, bias, cache = self_attention_inputs(
            key,
            value,
            attention_mask,
            causal=causal,
            cache=cache,
            prefix=prefix_block(self, key),  # prefix tuning: P keys/values in front
            dtype=self.dtype,
        )  # keys/values: [batch, kv, kv_heads, head_dim]
        out = dot_product_attention(query, key, value, bias)  # [batch, length, heads, head_dim]
        out = Linear(hidden, **kw, name="dense")(out.reshape(batch, length, hidden))
        out = bottleneck_adapter(self, out)  # Houlsby adapters, where planned
        return out if cache is None else (out, cache)


class FalconMLP(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(use_bias=cfg.bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear(cfg.ffn_hidden_size, **kw, name="dense_h_to_4h")(x)  # [b, s, ffn]
        h = Linear(cfg.hidden_size, **kw, name="dense_4h_to_h")(activation(cfg.activation)(h))
        return bottleneck_adapter(self, h)  # Houlsby / Pfeiffer adapters, where planned


class FalconDecoderLayer(nn.Module):
    """One Falcon block; x [batch, length, hidden] -> same (arguments as LlamaDecoderLayer)."""

    config: FalconConfig
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
        layer_index=None,  # every Falcon layer is the same: unused
    ):
        cfg = self.config
        positions = default_positions(x, attention_mask, positions, cache)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            return nn.LayerNorm(cfg.layer_norm_epsilon, **kw, name=name)

        y = norm("input_layernorm")(x)
        attn = FalconAttention(cfg, **kw, name="self_attention")(
            y, attention_mask, positions, causal=causal, cache=cache
        )
        if cache is not None:
            attn, cache = attn
        mlp = FalconMLP(cfg, **kw, name="mlp")
        if cfg.parallel_attn:
            out = mlp(y) + attn
        else:
            x = x + nn.Dropout(cfg.attention_dropout)(attn, deterministic=deterministic)
            out = mlp(norm("post_attention_layernorm")(x))
        x = x + nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
        return x if cache is None else (x, cache)


class FalconModel(nn.Module):
    """word_embeddings -> h_i -> ln_f; returns the last hidden state (and the updated cache when
    one is given)."""

    config: FalconConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), **kw
        )
        self.h = make_layers(
            FalconDecoderLayer, cfg, scan=self.scan_layers, remat_policy=self.remat_policy, **kw
        )
        self.ln_f = nn.LayerNorm(cfg.layer_norm_epsilon, **kw)

    def __call__(
        self, input_ids, attention_mask=None, positions=None, *, deterministic=True, cache=None
    ):
        x = self.word_embeddings(input_ids)  # [batch, length, hidden]
        x, attention_mask, positions = decoder_inputs(x, attention_mask, positions, cache)
        x, cache = run_layers(
            self.h,
            x,
            attention_mask,
            positions,
            deterministic=deterministic,
            cache=cache,
            num_layers=self.config.num_hidden_layers,
        )
        x = self.ln_f(x)
        return x if cache is None else (x, cache)

    def attend(self, h):
        """Logits through the tied input embedding."""
        return self.word_embeddings.attend(h)


class FalconForCausalLM(CausalLM):
    """Decoder + lm_head (tied by default); float32 logits [batch, length, vocab]. Call and options
    as stack.CausalLM."""

    base_class = FalconModel
    base_name = "transformer"


class FalconForSequenceClassification(SequenceClassifier):
    """Decoder + a bias-free `score` head on each row's last real token: float32 logits
    [batch, num_labels]. Call as stack.SequenceClassifier."""

    base_class = FalconModel
    base_name = "transformer"


class FalconDecoder(BareDecoder):
    """The bare stack under `transformer/`; returns the last hidden state."""

    base_class = FalconModel
    base_name = "transformer"


# ---------------------------------------------------------------------------------------------
# Hugging Face names.

BASE_MODEL_PREFIX = "transformer"
LAYER_KEYS = r"(?:transformer\.)?h\.(\d+)\.(.+)"
LAYER_STACK = "h"
IGNORED_SOURCE_KEYS = (r".*rotary_emb\.inv_freq",)
# As in llama.py: the lm_head or the score head a task lacks; the classifier's new head.
OPTIONAL_SOURCE_KEYS = (r"lm_head\.weight", r"score\.weight")
NEW_HEAD_PATHS = (r"score/.*",)
LAYER_PARAM_AXES = (
    (r"self_attention/query_key_value/kernel", ("embed", "heads")),
    (r"self_attention/query_key_value/bias", ("heads",)),
    (r"self_attention/dense/kernel", ("heads", "embed")),
    (r"mlp/dense_h_to_4h/kernel", ("embed", "mlp")),
    (r"mlp/dense_h_to_4h/bias", ("mlp",)),
    (r"mlp/dense_4h_to_h/kernel", ("mlp", "embed")),
)
PARAM_AXES = (
    (r"(.*/)?word_embeddings/embedding", ("vocab", "embed")),
    *stacked_param_axes(LAYER_STACK, LAYER_PARAM_AXES),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", None)),
)


def build(config: FalconConfig, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "causal_lm":
        return FalconForCausalLM(config, dtype, param_dtype)
    if task == "classification":
        return FalconForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "decoder":
        return FalconDecoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by falcon; use causal_lm, classification or decoder"
    )


def decoder_layer(config: FalconConfig, index: int, dtype, param_dtype) -> nn.Module:
    return FalconDecoderLayer(config, index, dtype, param_dtype)


def hf_architecture(config: FalconConfig, task: str) -> str:
    return "Falcon" + HF_TASK_SUFFIXES[task]


CONFIG = FalconConfig
