"""Llama (2, 3, 3.1), Mistral (v0.1, v0.3) and Qwen2 decoders: one architecture, three configs.

    x -> embed_tokens -> [ x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)) ] x layers -> RMSNorm -> lm_head
    Attn: q/k/v projections, RoPE on q and k, grouped-query attention, o projection
    MLP:  down(silu(gate(x)) * up(x))

What differs by config:
  llama    `attention_bias` (q, k, v and o), `mlp_bias`, rope scaling (llama3 for 3.1)
  mistral  `sliding_window` on every layer (v0.1: 4096; v0.3: none)
  qwen2    bias on q, k and v (not o); sliding window on the layers `layer_types` marks, and only
           when `use_sliding_window` is set

Parameter paths mirror Hugging Face names: `model.layers.3.self_attn.q_proj.weight` is
`model/layers_3/self_attn/q_proj/kernel`. With `tie_word_embeddings` the logits use
`model/embed_tokens/embedding` transposed and there is no `lm_head` leaf.

A decoder layer is usable on its own (PiFi plugs one into a small encoder):
`LlamaDecoderLayer(config, index).apply({"params": p}, x, attention_mask=None, positions=None,
causal=True)` with x [batch, length, hidden]. `Attention` and `GatedMLP` are shared with gemma2.py.

Decoding: every model and layer also takes `cache=` (a layers.KVCache) and then returns
`(output, updated_cache)`; pifi_jax.generate drives it.

Big models: `scan_layers=True` (one scanned layer module, parameters stacked along a leading
"layers" axis) and `remat_policy` (gradient checkpointing per layer), the same in every decoder
family: models/stack.py.

PEFT: every projection is a layers.Linear (LoRA, DoRA, IA3); bottleneck adapters follow o_proj
and down_proj (`bottleneck_adapter` in Attention and GatedMLP); a prefix enters each attention as
P cached tokens (`prefix_block` + `self_attention_inputs`); a soft prompt enters before the stack
(stack.decoder_inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pifi_jax.layers import (
    KVCache,
    Linear,
    RMSNorm,
    Rope,
    dot_product_attention,
    gated_activation,
    self_attention_inputs,
)
from pifi_jax.layers.peft_hooks import bottleneck_adapter, prefix_block
from pifi_jax.models import config_utils
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

MODEL_TYPES = ("llama", "mistral", "qwen2")

_COMMON_FIELDS = frozenset(
    {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "attention_dropout",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    }
)
# Fields only some model types have; elsewhere they are refused as unknown.
_TYPE_FIELDS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset(
        {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"}
    ),
}
# Training-time switches and bookkeeping. pretraining_tp only split matmuls in old transformers.
_IGNORED_FIELDS = frozenset(
    {"initializer_range", "use_cache", "pretraining_tp", "auto_map", "gradient_checkpointing"}
)
LAYER_TYPES = ("full_attention", "sliding_attention")


def read_rope(hf: dict[str, Any], max_position_embeddings: int) -> Rope:
    """Pops the rope fields from a config dict, in either transformers spelling, into a Rope.

    Older configs keep `rope_theta` at the top and scaling in `rope_scaling`; transformers 5 keeps
    both in `rope_parameters`. Shared by every RoPE family.
    """
    theta = hf.pop("rope_theta", None)
    params = dict(hf.pop("rope_parameters", None) or {})
    params.update(hf.pop("rope_scaling", None) or {})
    theta = params.pop("rope_theta", theta)
    return Rope.from_hf(
        params,
        theta=10000.0 if theta is None else float(theta),
        max_position_embeddings=max_position_embeddings,
    )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama / Mistral / Qwen2 decoder (field names as in Hugging Face)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: Rope = Rope()
    attention_bias: bool = False  # llama: bias on q, k, v and o
    mlp_bias: bool = False  # llama
    sliding_window: int | None = None  # mistral: every layer; qwen2: "sliding_attention" layers
    use_sliding_window: bool = False  # qwen2
    max_window_layers: int | None = None  # qwen2: layers from this index on slide (no layer_types)
    layer_types: tuple[str, ...] | None = None  # qwen2
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError("layer_types needs one entry per layer")
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown:
                raise ValueError(
                    f"layer_types {sorted(unknown)} not supported; known: {LAYER_TYPES}"
                )

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a Llama-family type {MODEL_TYPES}")
        hf = dict(hf)
        rope = read_rope(hf, hf.get("max_position_embeddings", cls.max_position_embeddings))
        fields = _COMMON_FIELDS | _TYPE_FIELDS[model_type]
        kwargs = config_utils.select_fields(hf, fields, _IGNORED_FIELDS, {}, family=model_type)
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if model_type == "qwen2":
            # As transformers' Qwen2Config: the window exists only with use_sliding_window, and
            # without explicit layer_types it covers the layers from max_window_layers on.
            if not kwargs.get("use_sliding_window", False):
                kwargs["sliding_window"] = None
            kwargs.setdefault("sliding_window", 4096)
            if kwargs.get("layer_types") is None:
                start = kwargs.get("max_window_layers", 28)
                window = kwargs["sliding_window"]
                kwargs["layer_types"] = [
                    "sliding_attention" if window is not None and i >= start else "full_attention"
                    for i in range(kwargs.get("num_hidden_layers", cls.num_hidden_layers))
                ]
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return cls(rope=rope, **kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = {
            f: getattr(self, f)
            for f in sorted(_COMMON_FIELDS | _TYPE_FIELDS[self.model_type])
            if getattr(self, f) is not None
        }
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        if self.model_type in ("mistral", "qwen2"):
            out["sliding_window"] = self.sliding_window
        out["rope_parameters"] = self.rope.to_hf()
        return out

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def cache_kv_heads(self) -> int:
        """Key/value heads per layer, as a KVCache stores them."""
        return self.num_key_value_heads

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index` (None = full attention)."""
        if self.model_type == "qwen2":
            # Without layer_types (a config built directly) every layer attends fully.
            if self.layer_types is None or self.layer_types[index] != "sliding_attention":
                return None
        return self.sliding_window


class Attention(nn.Module):
    """Self-attention with q/k/v/o projections, RoPE and grouped-query attention.

    Attributes:
      num_heads, num_kv_heads, head_dim: query heads, key/value heads, width of one head.
      rope: how positions rotate q and k.
      qkv_bias / out_bias: bias leaves on q, k, v / on o.
      scale: logit scale (default head_dim^-0.5); logit_softcap: Gemma-2's tanh cap.
    Call: sliding_window masks keys further back than this (None = all; an array in a scanned
    stack); with `cache` the result is (output, updated cache).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: Rope
    qkv_bias: bool = False
    out_bias: bool = False
    scale: float | None = None
    logit_softcap: float | None = None
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x,
        attention_mask,
        positions,
        *,
        causal: bool,
        deterministic: bool,
        sliding_window=None,
        cache: KVCache | None = None,
    ):
        batch, length, hidden = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name: str, heads: int) -> jax.Array:
            y = Linear(heads * self.head_dim, use_bias=self.qkv_bias, **kw, name=name)(x)
            # [batch, length, heads, head_dim]
            return y.reshape(batch, length, heads, self.head_dim)

        query = self.rope.apply(project("q_proj", self.num_heads), positions)
        key = self.rope.apply(project("k_proj", self.num_kv_heads), positions)
        value = project("v_proj", self.num_kv_heads)  # [batch, length, kv_heads, head_dim]
        key, value, bias, cache = self_attention_inputs(
            key,
            value,
            attention_mask,
            causal=causal,
            sliding_window=sliding_window,
            cache=cache,
            prefix=prefix_block(self, key),  # prefix tuning: P keys/values in front
            dtype=self.dtype,
        )  # keys/values: [batch, kv, kv_heads, head_dim]
        out = dot_product_attention(
            query,
            key,
            value,
            bias,
            dropout_rate=self.dropout_rate,
            deterministic=deterministic,
            dropout_module=nn.Dropout(self.dropout_rate),
            scale=self.scale,
            logit_softcap=self.logit_softcap,
        )  # [batch, length, heads, head_dim]
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        out = Linear(hidden, use_bias=self.out_bias, **kw, name="o_proj")(out)
        out = bottleneck_adapter(self, out)  # Houlsby adapters, where planned
        return out if cache is None else (out, cache)


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x))."""

    intermediate_size: int
    hidden_act: str = "silu"
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Linear(self.intermediate_size, **kw, name="gate_proj")(x)  # [batch, length, inter]
        up = Linear(self.intermediate_size, **kw, name="up_proj")(x)
        h = Linear(x.shape[-1], **kw, name="down_proj")(gated_activation(self.hidden_act)(gate, up))
        return bottleneck_adapter(self, h)  # Houlsby / Pfeiffer adapters, where planned


class LlamaDecoderLayer(nn.Module):
    """x + Attn(RMSNorm(x)), then + MLP(RMSNorm(.)). x: [batch, length, hidden] -> same.

    attention_mask: [batch, length] 0/1 (None = no padding); positions: [batch, length] (None =
    from the mask, see layers.positions_from_mask); causal=False attends both ways (PiFi).
    cache: this layer's KVCache; then the result is (x, updated cache). layer_index: a traced
    index that replaces the `layer_index` attribute (a scanned stack).
    """

    config: LlamaConfig
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
        attn = Attention(
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rope,
            qkv_bias=cfg.attention_bias or cfg.model_type == "qwen2",
            out_bias=cfg.attention_bias,
            dropout_rate=cfg.attention_dropout,
            **kw,
            name="self_attn",
        )
        h = RMSNorm(cfg.rms_norm_eps, **kw, name="input_layernorm")(x)
        h = attn(
            h,
            attention_mask,
            positions,
            causal=causal,
            deterministic=deterministic,
            sliding_window=window_of(cfg, self.layer_index, layer_index),
            cache=cache,
        )
        if cache is not None:
            h, cache = h
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, **kw, name="post_attention_layernorm")(x)
        mlp = GatedMLP(cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias, **kw, name="mlp")
        x = x + mlp(h)  # [batch, length, hidden]
        return x if cache is None else (x, cache)


class LlamaModel(nn.Module):
    """HF's LlamaModel: embed_tokens -> layers -> norm. Returns the last hidden state (and the
    updated cache when one is given)."""

    config: LlamaConfig
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
            LlamaDecoderLayer, cfg, scan=self.scan_layers, remat_policy=self.remat_policy, **kw
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, **kw)

    def __call__(
        self, input_ids, attention_mask=None, positions=None, *, deterministic=True, cache=None
    ):
        x = self.embed_tokens(input_ids)  # [batch, length, hidden]
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
        """Logits through the (tied) input embedding."""
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(CausalLM):
    """Decoder + lm_head (or the tied embedding): float32 logits [batch, length, vocab]. Call and
    options as stack.CausalLM."""

    base_class = LlamaModel
    base_name = "model"


class LlamaForSequenceClassification(SequenceClassifier):
    """Decoder + a bias-free `score` head on each row's last real token: float32 logits
    [batch, num_labels]. Call as stack.SequenceClassifier."""

    base_class = LlamaModel
    base_name = "model"


class LlamaDecoder(BareDecoder):
    """The bare stack under `model/`; returns the last hidden state [batch, length, hidden]."""

    base_class = LlamaModel
    base_name = "model"


# ---------------------------------------------------------------------------------------------
# Hugging Face names (hub/convert.py does the generic renaming; see bert.py).

BASE_MODEL_PREFIX = "model"
# A layer's tensors, with and without the base prefix: group 1 = index, group 2 = name inside.
LAYER_KEYS = r"(?:model\.)?layers\.(\d+)\.(.+)"
# The name of the layer list in the base model (`model/layers_3/...`; scanned: `model/layers/...`).
LAYER_STACK = "layers"
# Old checkpoints stored the rotary table as a buffer.
IGNORED_SOURCE_KEYS = (r".*rotary_emb\.inv_freq",)
# Tied models, the bare stack and the classifier have no lm_head, and only the classifier has a
# score head; a checkpoint may still carry either (a causal LM's lm_head is dropped on purpose when
# it is loaded as a classifier).
OPTIONAL_SOURCE_KEYS = (r"lm_head\.weight", r"score\.weight")
# The classifier's head, created fresh from a causal-LM or base checkpoint.
NEW_HEAD_PATHS = (r"score/.*",)
# Key/value projections use "kv" (replicated by default: they are few heads under GQA).
LAYER_PARAM_AXES = (
    (r"self_attn/q_proj/kernel", ("embed", "heads")),
    (r"self_attn/q_proj/bias", ("heads",)),
    (r"self_attn/(k|v)_proj/kernel", ("embed", "kv")),
    (r"self_attn/(k|v)_proj/bias", ("kv",)),
    (r"self_attn/o_proj/kernel", ("heads", "embed")),
    (r"mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
    (r"mlp/(gate|up)_proj/bias", ("mlp",)),
    (r"mlp/down_proj/kernel", ("mlp", "embed")),
)
PARAM_AXES = (
    (r"(.*/)?embed_tokens/embedding", ("vocab", "embed")),
    *stacked_param_axes(LAYER_STACK, LAYER_PARAM_AXES),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", None)),
)
_HF_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def build(config: LlamaConfig, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "causal_lm":
        return LlamaForCausalLM(config, dtype, param_dtype)
    if task == "classification":
        return LlamaForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "decoder":
        return LlamaDecoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by {config.model_type}; "
        "use causal_lm, classification or decoder"
    )


def decoder_layer(config: LlamaConfig, index: int, dtype, param_dtype) -> nn.Module:
    return LlamaDecoderLayer(config, index, dtype, param_dtype)


def hf_architecture(config: LlamaConfig, task: str) -> str:
    return _HF_NAMES[config.model_type] + HF_TASK_SUFFIXES[task]


CONFIG = LlamaConfig
