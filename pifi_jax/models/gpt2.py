"""GPT-2: learned positions, pre-LayerNorm blocks, fused c_attn, tied lm_head.

    x -> wte(ids) + wpe(positions) -> dropout -> h_0 .. h_{n-1} -> ln_f -> wte^T
    block: x + c_proj(Attn(ln_1(x)));  x + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(x))))

GPT-2's projections are `Conv1D` modules whose weights are stored [in, out], already our kernel
layout: `IN_OUT_KERNELS` tells hub/convert.py not to transpose them. `c_attn` packs q, k, v side by
side ([hidden, 3 * hidden]). Positions of left-padded rows come from the padding mask
(layers.positions_from_mask), so they index `wpe` from 0 at each row's first real token.

Paths mirror Hugging Face names: `transformer.h.3.attn.c_attn.weight` is
`transformer/h_3/attn/c_attn/kernel`. Hub checkpoints of the original GPT-2 omit `transformer.`.
Decoding with a KVCache, scan_layers and remat_policy (models/stack.py) and PEFT work as in
llama.py; bottleneck adapters follow `attn.c_proj` and `mlp.c_proj`. Hugging Face PEFT marks LoRA
on these Conv1D layers `fan_in_fan_out` (their weights are [in, out]); its lora_A / lora_B are
[r, in] / [out, r] all the same, which is what an export writes (peft/files.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pifi_jax.layers import (
    KVCache,
    Linear,
    activation,
    dot_product_attention,
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
    make_layers,
    run_layers,
    stacked_param_axes,
)

MODEL_TYPES = ("gpt2",)

_IGNORED_FIELDS = frozenset(
    {
        "initializer_range",
        "use_cache",
        "gradient_checkpointing",
        "n_ctx",  # an old duplicate of n_positions
        # Only changes fp16/bf16 rounding of the logits; softmax here is always float32.
        "reorder_and_upcast_attn",
        # The sequence-summary head of GPT2DoubleHeadsModel.
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "summary_last_dropout",
    }
)
_REQUIRED_VALUES = {"add_cross_attention": False}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyperparameters of GPT-2 (Hugging Face's n_* field names)."""

    model_type: str = "gpt2"
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None = 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> GPT2Config:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        if hf.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {hf.get('model_type')!r} is not gpt2")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family="gpt2"
        )
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        return out

    # transformers' GPT2Config.attribute_map: the common names of the n_* fields.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def cache_kv_heads(self) -> int:
        return self.n_head


class GPT2Attention(nn.Module):
    """c_attn (q|k|v) -> causal attention -> c_proj -> dropout. [b, s, hidden] -> same.
    layer_index (call): a traced index replacing the attribute (scanned stack)."""

    config: GPT2Config
    layer_index: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x, attention_mask, *, causal: bool, deterministic: bool, cache=None, layer_index=None
    ):
        cfg = self.config
        batch, length, hidden = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Linear(3 * hidden, **kw, name="c_attn")(x)  # [batch, length, 3 * hidden]
        query, key, value = (
            t.reshape(batch, length, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1)
        )
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= (self.layer_index if layer_index is None else layer_index) + 1
        key, value, bias, cache = self_attention_inputs(
            key,
            value,
            attention_mask,
            causal=causal,
            cache=cache,
            prefix=prefix_block(self, key),  # prefix tuning: P keys/values in front
            dtype=self.dtype,
        )  # keys/values: [batch, kv, heads, head_dim]
        out = dot_product_attention(
            query,
            key,
            value,
            bias,
            dropout_rate=cfg.attn_pdrop,
            deterministic=deterministic,
            dropout_module=nn.Dropout(cfg.attn_pdrop),
            scale=scale,
        )  # [batch, length, heads, head_dim]
        out = Linear(hidden, **kw, name="c_proj")(out.reshape(batch, length, hidden))
        out = nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)
        out = bottleneck_adapter(self, out)  # Houlsby adapters, where planned
        return out if cache is None else (out, cache)


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear(cfg.n_inner or 4 * cfg.n_embd, **kw, name="c_fc")(x)  # [b, s, inner]
        h = Linear(cfg.n_embd, **kw, name="c_proj")(activation(cfg.activation_function)(h))
        h = nn.Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)
        return bottleneck_adapter(self, h)  # Houlsby / Pfeiffer adapters, where planned


class GPT2Block(nn.Module):
    """One GPT-2 block; x [batch, length, hidden] -> same (arguments as LlamaDecoderLayer; the
    positions are unused: GPT-2 adds them once, at the embeddings)."""

    config: GPT2Config
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
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln_1 = nn.LayerNorm(cfg.layer_norm_epsilon, **kw, name="ln_1")
        attn = GPT2Attention(cfg, self.layer_index, **kw, name="attn")
        h = attn(
            ln_1(x),
            attention_mask,
            causal=causal,
            deterministic=deterministic,
            cache=cache,
            layer_index=layer_index,
        )
        if cache is not None:
            h, cache = h
        x = x + h
        ln_2 = nn.LayerNorm(cfg.layer_norm_epsilon, **kw, name="ln_2")
        x = x + GPT2MLP(cfg, **kw, name="mlp")(ln_2(x), deterministic)
        return x if cache is None else (x, cache)


class GPT2Model(nn.Module):
    """wte + wpe -> h_i -> ln_f; returns the last hidden state (and the updated cache when one is
    given)."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, **kw)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, **kw)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = make_layers(
            GPT2Block, cfg, scan=self.scan_layers, remat_policy=self.remat_policy, **kw
        )
        self.ln_f = nn.LayerNorm(cfg.layer_norm_epsilon, **kw)

    def __call__(
        self, input_ids, attention_mask=None, positions=None, *, deterministic=True, cache=None
    ):
        x = self.wte(input_ids)  # [batch, length, hidden]
        x, attention_mask, positions = decoder_inputs(x, attention_mask, positions, cache)
        x = x + self.wpe(positions)
        x = self.drop(x, deterministic=deterministic)
        x, cache = run_layers(
            self.h,
            x,
            attention_mask,
            None,
            deterministic=deterministic,
            cache=cache,
            num_layers=self.config.n_layer,
        )
        x = self.ln_f(x)
        return x if cache is None else (x, cache)

    def attend(self, h):
        """Logits through the tied input embedding."""
        return self.wte.attend(h)


class GPT2LMHeadModel(CausalLM):
    """Decoder + lm_head (tied to wte by default); float32 logits [batch, length, vocab]. Call and
    options as stack.CausalLM."""

    base_class = GPT2Model
    base_name = "transformer"


class GPT2ForSequenceClassification(SequenceClassifier):
    """Decoder + a bias-free `score` head on each row's last real token: float32 logits
    [batch, num_labels]. Call as stack.SequenceClassifier."""

    base_class = GPT2Model
    base_name = "transformer"


class GPT2Decoder(BareDecoder):
    """The bare stack under `transformer/`; returns the last hidden state."""

    base_class = GPT2Model
    base_name = "transformer"


# ---------------------------------------------------------------------------------------------
# Hugging Face names.

BASE_MODEL_PREFIX = "transformer"
LAYER_KEYS = r"(?:transformer\.)?h\.(\d+)\.(.+)"
LAYER_STACK = "h"
# Conv1D weights are stored [in, out]: no transpose, in either direction.
IN_OUT_KERNELS = (r"(.+\.)?(c_attn|c_proj|c_fc)\.weight",)
# Module names ending in _<digits> that are not list indices (our `h_3` is HF's `h.3`).
LITERAL_NAMES = ("ln_1", "ln_2")
# The causal-mask buffers old checkpoints stored as `attn.bias` / `attn.masked_bias`.
IGNORED_SOURCE_KEYS = (r"(.+\.)?attn\.(masked_)?bias",)
# As in llama.py: the lm_head or the score head a task lacks; the classifier's new head.
OPTIONAL_SOURCE_KEYS = (r"lm_head\.weight", r"score\.weight")
NEW_HEAD_PATHS = (r"score/.*",)
LAYER_PARAM_AXES = (
    (r"attn/c_attn/kernel", ("embed", "heads")),
    (r"attn/c_attn/bias", ("heads",)),
    (r"attn/c_proj/kernel", ("heads", "embed")),
    (r"mlp/c_fc/kernel", ("embed", "mlp")),
    (r"mlp/c_fc/bias", ("mlp",)),
    (r"mlp/c_proj/kernel", ("mlp", "embed")),
)
PARAM_AXES = (
    (r"(.*/)?wte/embedding", ("vocab", "embed")),
    (r"(.*/)?wpe/embedding", (None, "embed")),
    *stacked_param_axes(LAYER_STACK, LAYER_PARAM_AXES),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"score/kernel", ("embed", None)),
)


def build(config: GPT2Config, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "causal_lm":
        return GPT2LMHeadModel(config, dtype, param_dtype)
    if task == "classification":
        return GPT2ForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "decoder":
        return GPT2Decoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by gpt2; use causal_lm, classification or decoder"
    )


def decoder_layer(config: GPT2Config, index: int, dtype, param_dtype) -> nn.Module:
    return GPT2Block(config, index, dtype, param_dtype)


def hf_architecture(config: GPT2Config, task: str) -> str:
    return "GPT2LMHeadModel" if task == "causal_lm" else "GPT2" + HF_TASK_SUFFIXES[task]


CONFIG = GPT2Config
