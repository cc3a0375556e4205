"""ALBERT: a BERT-style encoder with factorised embeddings and layer weights shared across depth.

What differs from BERT (models/bert.py):
- the embeddings are `embedding_size` wide (128 in the released models) and
  `encoder/embedding_hidden_mapping_in` projects them up to `hidden_size`;
- the encoder owns `num_hidden_groups` groups of `inner_group_num` layers and runs
  `num_hidden_layers` steps; step i applies group `int(i / (num_hidden_layers / num_hidden_groups))`
  (Hugging Face's formula, Python float arithmetic included). The released models have one group of
  one layer, so ONE set of leaves, `albert/encoder/albert_layer_groups_0/albert_layers_0/...`, is
  applied at every depth and its gradient is the sum over depths;
- a layer is attention (query/key/value/dense + LayerNorm) then ffn -> activation -> ffn_output ->
  full_layer_layer_norm(. + attention output), with no dropout on the feed-forward output;
- the pooler is a bare Linear `albert/pooler` + tanh on the first token, and the classification head
  is dropout(classifier_dropout_prob) -> classifier. Question answering has no pooler:
  `qa_outputs` (hidden -> 2) on every token gives (start_logits, end_logits).

Parameter paths mirror Hugging Face names with list indices folded in:
`albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight` is
`albert/encoder/albert_layer_groups_0/albert_layers_0/ffn/kernel`.

PEFT: prefix tuning gives every application of the shared layer its own prefix (the attention is
told which application it runs: peft/prefix.py explains the choice); adapters, like the weights,
are shared across depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from pifi_jax.layers import Linear, activation, dot_product_attention, padding_bias
from pifi_jax.layers.peft_hooks import (
    attention_prefix,
    bottleneck_adapter,
    prepend_prompt,
    prompt_inputs,
)
from pifi_jax.models import config_utils

MODEL_TYPES = ("albert",)

# Config fields that change nothing in the forward pass.
_IGNORED_FIELDS = frozenset(
    {
        "initializer_range",
        "gradient_checkpointing",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "use_cache",
    }
)
# Fields accepted only with the value the implementation computes. The four ALBERT-specific ones
# appear in the released configs (albert-base-v2 ...) with these values; transformers never reads
# them, so another value would mean an architecture nobody implements.
_REQUIRED_VALUES = {
    "position_embedding_type": "absolute",
    "chunk_size_feed_forward": 0,
    "is_decoder": False,
    "add_cross_attention": False,
    "down_scale_factor": 1,
    "gap_size": 0,
    "net_structure_type": 0,
    "num_memory_blocks": 0,
}


@dataclasses.dataclass(frozen=True)
class AlbertConfig:
    """Hyperparameters of an ALBERT encoder (field names and defaults as in Hugging Face)."""

    model_type: str = "albert"
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 4096
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    classifier_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> AlbertConfig:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        if hf.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {hf.get('model_type')!r} is not ALBERT {MODEL_TYPES}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family="albert"
        )
        config = cls(**kwargs)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}"
            )
        if not 1 <= config.num_hidden_groups <= config.num_hidden_layers:
            # More groups than layers leaves groups that no step runs: their checkpoint tensors
            # would have no place in the computation.
            raise ValueError(
                f"num_hidden_groups={config.num_hidden_groups} is not supported: it must lie in "
                f"[1, num_hidden_layers={config.num_hidden_layers}]"
            )
        if config.inner_group_num < 1:
            raise ValueError(f"inner_group_num must be >= 1, got {config.inner_group_num}")
        return config

    def to_hf_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def group_at_depth(self, depth: int) -> int:
        """Index of the layer group that step `depth` applies (Hugging Face's AlbertTransformer)."""
        return int(depth / (self.num_hidden_layers / self.num_hidden_groups))


def _layer_norm(config: AlbertConfig, module: nn.Module, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        config.layer_norm_eps, dtype=module.dtype, param_dtype=module.param_dtype, name=name
    )


class AlbertEmbeddings(nn.Module):
    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        cfg = self.config

        def embed(rows, name):
            return nn.Embed(
                rows,
                cfg.embedding_size,
                embedding_init=nn.initializers.normal(stddev=0.02),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)  # [batch, length, embedding_size]
        x = prepend_prompt(x)  # prompt tuning: [batch, P + length, embedding_size]
        positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]  # [1, length]
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
        x = _layer_norm(cfg, self, "LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class AlbertAttention(nn.Module):
    """query/key/value -> attention -> dense -> dropout -> LayerNorm(x + .), HF's AlbertAttention.

    application: how many times this (shared) module ran before in this call; prefix tuning gives
    each application its own prefix (peft/prefix.py)."""

    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool, application: int = 0):
        cfg = self.config
        batch, length, _ = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name):
            y = Linear(cfg.hidden_size, **kw, name=name)(x)
            return y.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)  # [b, s, h, d]

        query = project("query")
        key, value, bias = attention_prefix(
            self, project("key"), project("value"), bias, application
        )  # prefix tuning: this application's P keys/values in front
        out = dot_product_attention(
            query,
            key,
            value,
            bias,
            dropout_rate=cfg.attention_probs_dropout_prob,
            deterministic=deterministic,
            dropout_module=nn.Dropout(cfg.attention_probs_dropout_prob),
        )
        out = out.reshape(batch, length, cfg.hidden_size)  # [batch, length, hidden]
        out = Linear(cfg.hidden_size, **kw, name="dense")(out)
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        out = bottleneck_adapter(self, out)  # Houlsby adapters, where planned
        return _layer_norm(cfg, self, "LayerNorm")(x + out)


class AlbertLayer(nn.Module):
    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool, application: int = 0):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a = AlbertAttention(cfg, **kw, name="attention")(x, bias, deterministic, application)
        h = Linear(cfg.intermediate_size, **kw, name="ffn")(a)  # [batch, length, intermediate]
        h = activation(cfg.hidden_act)(h)
        h = Linear(cfg.hidden_size, **kw, name="ffn_output")(h)  # [batch, length, hidden]
        h = bottleneck_adapter(self, h)  # Houlsby / Pfeiffer adapters, where planned
        return _layer_norm(cfg, self, "full_layer_layer_norm")(h + a)


class AlbertLayerGroup(nn.Module):
    """`inner_group_num` distinct layers applied in sequence (one step of the encoder); this is the
    group's application-th step."""

    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool, application: int = 0):
        for i in range(self.config.inner_group_num):
            layer = AlbertLayer(
                self.config, self.dtype, self.param_dtype, name=f"albert_layers_{i}"
            )
            x = layer(x, bias, deterministic, application)
        return x


class AlbertTransformer(nn.Module):
    """Projection to hidden_size, then num_hidden_layers steps over the shared layer groups."""

    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        cfg = self.config
        x = Linear(
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embedding_hidden_mapping_in",
        )(x)  # [batch, length, hidden]
        # Each group is constructed once, so calling it at several depths reuses its parameters.
        groups = [
            AlbertLayerGroup(cfg, self.dtype, self.param_dtype, name=f"albert_layer_groups_{g}")
            for g in range(cfg.num_hidden_groups)
        ]
        runs = [0] * cfg.num_hidden_groups  # steps each group has run so far
        for depth in range(cfg.num_hidden_layers):
            group = cfg.group_at_depth(depth)
            x = groups[group](x, bias, deterministic, runs[group])
            runs[group] += 1
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x


class AlbertModel(nn.Module):
    """The bare encoder; returns (last_hidden_state [batch, length, hidden], pooled or None)."""

    config: AlbertConfig
    add_pooler: bool = False
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
        x = AlbertEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(
            input_ids, token_type_ids, deterministic
        )
        bias = padding_bias(attention_mask, self.dtype)  # [batch, 1, 1, length]
        x = AlbertTransformer(cfg, self.dtype, self.param_dtype, name="encoder")(
            x, bias, deterministic
        )
        pooled = None
        if self.add_pooler:
            pooler = Linear(
                cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="pooler"
            )
            pooled = jnp.tanh(pooler(x[:, 0]))  # [batch, hidden]
        return x, pooled


class AlbertForSequenceClassification(nn.Module):
    """Encoder + pooler + dropout + classifier. num_labels == 1 is regression (one score).

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., token_type_ids=...,
    deterministic=True)` -> logits [batch, num_labels] in float32.
    """

    task: ClassVar[str] = "classification"
    config: AlbertConfig
    num_labels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        cfg = self.config
        base = AlbertModel(
            cfg, add_pooler=True, dtype=self.dtype, param_dtype=self.param_dtype, name="albert"
        )
        _, pooled = base(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        x = nn.Dropout(cfg.classifier_dropout_prob)(pooled, deterministic=deterministic)
        logits = Linear(
            self.num_labels, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier"
        )(x)
        return logits.astype(jnp.float32)  # [batch, num_labels]


class AlbertForQuestionAnswering(nn.Module):
    """Encoder (no pooler) + `qa_outputs` (hidden -> 2) on every token: extractive QA.

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., token_type_ids=...,
    deterministic=True)` -> (start_logits, end_logits), each [batch, length] in float32. Padding
    positions get logits too (as in transformers); mask them before taking a span.
    """

    task: ClassVar[str] = "question_answering"
    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        base = AlbertModel(self.config, **kw, name="albert")
        hidden, _ = base(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        logits = Linear(2, **kw, name="qa_outputs")(hidden).astype(jnp.float32)  # [b, s, 2]
        return logits[..., 0], logits[..., 1]  # HF: logits.split(1, -1) -> start, end


class AlbertEncoder(nn.Module):
    """The bare encoder under `albert/`; returns last_hidden_state [batch, length, hidden]."""

    task: ClassVar[str] = "encoder"
    config: AlbertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        base = AlbertModel(
            self.config, dtype=self.dtype, param_dtype=self.param_dtype, name="albert"
        )
        hidden, _ = base(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        return hidden


# ---------------------------------------------------------------------------------------------
# Hugging Face names. hub/convert.py does the generic renaming (`albert_layers.0` <-> `albert_layers_0`,
# weight <-> kernel/scale/embedding, transposes).

# Source tensors dropped on purpose: buffers and the pretraining heads (MLM, sentence order).
IGNORED_SOURCE_KEYS = (
    r".*position_ids",
    r".*embeddings\.token_type_ids",
    r"predictions\..*",
    r"sop_classifier\..*",
)
# Our leaves that a checkpoint may lack (a new task head), initialised fresh.
NEW_HEAD_PATHS = (r"classifier/.*", r"qa_outputs/.*", r"albert/pooler/.*")
# Source tensors used only when the model has them (the pooler of a base checkpoint, a head).
OPTIONAL_SOURCE_KEYS = (r"albert\.pooler\..*", r"classifier\..*", r"qa_outputs\..*")

# Logical axes of each parameter (first match wins), used to shard over the mesh. The embedding
# tables are embedding_size wide, not hidden, so only their vocabulary axis is sharded.
PARAM_AXES = (
    (r".*/word_embeddings/embedding", ("vocab", None)),
    (r".*/embedding_hidden_mapping_in/kernel", (None, "embed")),
    (r".*/attention/(query|key|value)/kernel", ("embed", "heads")),
    (r".*/attention/(query|key|value)/bias", ("heads",)),
    (r".*/attention/dense/kernel", ("heads", "embed")),
    (r".*/ffn/kernel", ("embed", "mlp")),
    (r".*/ffn/bias", ("mlp",)),
    (r".*/ffn_output/kernel", ("mlp", "embed")),
)


def build(config: AlbertConfig, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "classification":
        return AlbertForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "question_answering":
        return AlbertForQuestionAnswering(config, dtype, param_dtype)
    if task == "encoder":
        return AlbertEncoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by ALBERT; "
        "choose classification, question_answering or encoder"
    )


# Our task -> the suffix of the transformers class name (`AlbertForQuestionAnswering`).
HF_TASK_SUFFIXES = {
    "classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering",
    "encoder": "Model",
}


def hf_architecture(config: AlbertConfig, task: str) -> str:
    return "Albert" + HF_TASK_SUFFIXES[task]


CONFIG = AlbertConfig
