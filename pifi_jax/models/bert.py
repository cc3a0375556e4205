"""BERT, RoBERTa and ELECTRA (discriminator) encoders, with sequence-classification and
extractive question-answering heads.

The three families share one transformer encoder and differ only in the embeddings (RoBERTa
numbers positions after the padding id; ELECTRA may project a smaller embedding to the hidden size)
and in the classification head:
  bert:    pooler (dense + tanh on [CLS]) -> dropout -> classifier
  roberta: dropout -> classifier.dense -> tanh -> dropout -> classifier.out_proj   (on <s>)
  electra: dropout -> classifier.dense -> gelu -> dropout -> classifier.out_proj   (on [CLS])
The question-answering head is the same for all three: `qa_outputs` (hidden -> 2) on every token,
column 0 the span-start logits and column 1 the span-end logits (no pooler, no dropout).

Parameter paths mirror Hugging Face module names, with list indices folded into the name:
`bert.encoder.layer.3.attention.self.query.weight` is `bert/encoder/layer_3/attention/self/query/kernel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pifi_jax.layers import Linear, activation, dot_product_attention, padding_bias
from pifi_jax.layers.peft_hooks import (
    attention_prefix,
    bottleneck_adapter,
    prepend_prompt,
    prompt_inputs,
    virtual_tokens,
)
from pifi_jax.models import config_utils

MODEL_TYPES = ("bert", "roberta", "electra")

# Config fields that change nothing in the forward pass (training-time or generation switches).
_IGNORED_FIELDS = frozenset(
    {
        "initializer_range",
        "gradient_checkpointing",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_last_dropout",
        "classifier_activation",
        "output_past",
        "sep_token_id",
    }
)
# Fields accepted only with the value that the implementation computes.
_REQUIRED_VALUES = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "chunk_size_feed_forward": 0,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT-family encoder (field names as in Hugging Face configs)."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # ELECTRA only: embedding width before the projection to hidden_size (None = hidden_size).
    embedding_size: int | None = None
    # Dropout of the classification head (None = hidden_dropout_prob).
    classifier_dropout: float | None = None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> BertConfig:
        """Builds the config from a Hugging Face config dict, refusing what is not supported."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a BERT-family type {MODEL_TYPES}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = config_utils.select_fields(
            hf, fields, _IGNORED_FIELDS, _REQUIRED_VALUES, family=model_type
        )
        if model_type == "electra" and kwargs.get("embedding_size") == kwargs.get("hidden_size"):
            kwargs["embedding_size"] = None
        if model_type != "electra" and kwargs.get("embedding_size") is not None:
            raise ValueError(f"config field 'embedding_size' is not supported for {model_type}")
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.model_type == "electra":
            out["embedding_size"] = self.embedding_size or self.hidden_size
        if self.model_type == "roberta":
            out.update(bos_token_id=0, eos_token_id=2)
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Embeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool):
        cfg = self.config
        width = cfg.embedding_size or cfg.hidden_size
        init = nn.initializers.normal(stddev=0.02)

        def embed(num, name):
            return nn.Embed(
                num,
                width,
                embedding_init=init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        x = embed(cfg.vocab_size, "word_embeddings")(input_ids)  # [batch, length, width]
        x = prepend_prompt(x)  # prompt tuning: [batch, P + length, width]
        x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
        x = nn.LayerNorm(
            cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm"
        )(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape

        def project(name):
            y = Linear(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(
                x
            )
            return y.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)  # [b, s, h, d]

        query = project("query")
        key, value, bias = attention_prefix(self, project("key"), project("value"), bias)
        out = dot_product_attention(
            query,
            key,
            value,
            bias,
            dropout_rate=cfg.attention_probs_dropout_prob,
            deterministic=deterministic,
            dropout_module=nn.Dropout(cfg.attention_probs_dropout_prob),
        )
        return out.reshape(batch, length, cfg.hidden_size)


class AddAndNorm(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .), HF's BertSelfOutput / BertOutput."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        cfg = self.config
        x = Linear(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        x = bottleneck_adapter(self, x)  # Houlsby / Pfeiffer adapters, where planned
        norm = nn.LayerNorm(
            cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm"
        )
        return norm(x + residual)


class Attention(nn.Module):
    """HF's BertAttention: `attention/self` then `attention/output`."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        a = SelfAttention(**kw, name="self")(x, bias, deterministic)
        return AddAndNorm(**kw, name="output")(a, x, deterministic)


class Intermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = Linear(
            cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense"
        )(x)
        return activation(cfg.hidden_act)(h)  # [batch, length, intermediate]


class Layer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Attention(**kw, name="attention")(x, bias, deterministic)
        h = Intermediate(**kw, name="intermediate")(x)
        return AddAndNorm(**kw, name="output")(h, x, deterministic)


class Encoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        for i in range(self.config.num_hidden_layers):
            layer = Layer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")
            x = nn.with_logical_constraint(
                layer(x, bias, deterministic), ("batch", "length", "embed")
            )
        return x


def position_ids_for(
    config: BertConfig, input_ids: jax.Array, prompt: int = 0, prefix: int = 0
) -> jax.Array:
    """Absolute positions; RoBERTa counts from pad_token_id + 1 and gives padding pad_token_id.

    PEFT, as Hugging Face numbers it: `prompt` soft tokens in front count as tokens; with a
    `prefix` of P cached keys, the tokens are numbered from P on.
    """
    if config.model_type == "roberta":
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        not_pad = jnp.pad(not_pad, ((0, 0), (prompt, 0)), constant_values=1)
        return (jnp.cumsum(not_pad, axis=1) + prefix) * not_pad + config.pad_token_id
    shape = (input_ids.shape[0], prompt + input_ids.shape[1])
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32) + prefix, shape)


class BertModel(nn.Module):
    """The bare encoder; returns (last_hidden_state [batch, length, hidden], pooled or None)."""

    config: BertConfig
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
        positions = position_ids_for(cfg, input_ids, *virtual_tokens())
        attention_mask, token_type_ids = prompt_inputs(attention_mask, token_type_ids)
        x = Embeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(
            input_ids, token_type_ids, positions, deterministic
        )
        if cfg.embedding_size is not None:
            x = Linear(
                cfg.hidden_size,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="embeddings_project",
            )(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        bias = padding_bias(attention_mask, self.dtype)  # [batch, 1, 1, length]
        x = Encoder(cfg, self.dtype, self.param_dtype, name="encoder")(x, bias, deterministic)
        pooled = None
        if self.add_pooler:
            pooled = Pooler(cfg, self.dtype, self.param_dtype, name="pooler")(x)
        return x, pooled


class Pooler(nn.Module):
    """dense + tanh on the first token (HF's BertPooler)."""

    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = Linear(
            self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="dense"
        )
        return jnp.tanh(dense(x[:, 0]))  # [batch, hidden]


class ClassificationHead(nn.Module):
    """RoBERTa/ELECTRA head on the first token: dropout, dense, tanh|gelu, dropout, out_proj."""

    config: BertConfig
    num_labels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dropout(rate)(x[:, 0], deterministic=deterministic)
        x = Linear(cfg.hidden_size, **kw, name="dense")(x)
        x = jnp.tanh(x) if cfg.model_type == "roberta" else activation("gelu")(x)
        x = nn.Dropout(rate)(x, deterministic=deterministic)
        return Linear(self.num_labels, **kw, name="out_proj")(x)  # [batch, num_labels]


class BertForSequenceClassification(nn.Module):
    """Encoder + the family's classification head. num_labels == 1 is regression (one score).

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., token_type_ids=...,
    deterministic=True)` -> logits [batch, num_labels] in float32.
    """

    task: ClassVar[str] = "classification"
    config: BertConfig
    num_labels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        cfg = self.config
        is_bert = cfg.model_type == "bert"
        base = BertModel(
            cfg,
            add_pooler=is_bert,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=cfg.model_type,
        )
        hidden, pooled = base(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic
        )
        if is_bert:
            rate = (
                cfg.hidden_dropout_prob
                if cfg.classifier_dropout is None
                else cfg.classifier_dropout
            )
            x = nn.Dropout(rate)(pooled, deterministic=deterministic)
            logits = Linear(
                self.num_labels, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier"
            )(x)
        else:
            head = ClassificationHead(
                cfg, self.num_labels, self.dtype, self.param_dtype, name="classifier"
            )
            logits = head(hidden, deterministic)
        return logits.astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
    """Encoder + `qa_outputs` (hidden -> 2) on every token: extractive QA (span start / end).

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., token_type_ids=...,
    deterministic=True)` -> (start_logits, end_logits), each [batch, length] in float32. Padding
    positions get logits too (as in transformers); mask them before taking a span.
    """

    task: ClassVar[str] = "question_answering"
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        base = BertModel(self.config, **kw, name=self.config.model_type)
        hidden, _ = base(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        logits = Linear(2, **kw, name="qa_outputs")(hidden).astype(jnp.float32)  # [b, s, 2]
        return logits[..., 0], logits[..., 1]  # HF: logits.split(1, -1) -> start, end


class BertEncoder(nn.Module):
    """The bare encoder under the family prefix; returns last_hidden_state [batch, length, hidden]."""

    task: ClassVar[str] = "encoder"
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        base = BertModel(
            self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=self.config.model_type
        )
        hidden, _ = base(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        return hidden


# ---------------------------------------------------------------------------------------------
# Hugging Face names. Paths here are ours; hub/convert.py does the generic renaming
# (`layer.3` <-> `layer_3`, weight <-> kernel/scale/embedding, transposes).

# Source tensors that have no counterpart and are dropped on purpose: buffers and pretraining heads.
IGNORED_SOURCE_KEYS = (
    r".*position_ids",
    r".*embeddings\.token_type_ids",
    r"cls\..*",  # BERT MLM / NSP heads
    r"lm_head\..*",  # RoBERTa MLM head
    r"discriminator_predictions\..*",  # ELECTRA replaced-token-detection head
    r"generator_predictions\..*",
    r"generator_lm_head\..*",
)
# Our leaves that a checkpoint may lack (a new task head), initialised fresh.
NEW_HEAD_PATHS = (r"classifier/.*", r"qa_outputs/.*", r"[a-z]+/pooler/.*")
# Source tensors used only when the model has them (a pooler or head the chosen task lacks).
OPTIONAL_SOURCE_KEYS = (r"[a-z]+\.pooler\..*", r"classifier\..*", r"qa_outputs\..*")

# Logical axes of each parameter (first match wins), used to shard over the mesh.
PARAM_AXES = (
    (r".*/word_embeddings/embedding", ("vocab", "embed")),
    (r".*_embeddings/embedding", (None, "embed")),
    (r".*/attention/self/(query|key|value)/kernel", ("embed", "heads")),
    (r".*/attention/self/(query|key|value)/bias", ("heads",)),
    (r".*/attention/output/dense/kernel", ("heads", "embed")),
    (r".*/intermediate/dense/kernel", ("embed", "mlp")),
    (r".*/intermediate/dense/bias", ("mlp",)),
    (r".*/output/dense/kernel", ("mlp", "embed")),
    (r".*/embeddings_project/kernel", (None, "embed")),
)


def build(config: BertConfig, task: str, num_labels: int, dtype, param_dtype) -> nn.Module:
    if task == "classification":
        return BertForSequenceClassification(config, num_labels, dtype, param_dtype)
    if task == "question_answering":
        return BertForQuestionAnswering(config, dtype, param_dtype)
    if task == "encoder":
        return BertEncoder(config, dtype, param_dtype)
    raise ValueError(
        f"task {task!r} is not supported by the BERT family; "
        "choose classification, question_answering or encoder"
    )


# Our task -> the suffix of the transformers class name (`BertForQuestionAnswering`).
HF_TASK_SUFFIXES = {
    "classification": "ForSequenceClassification",
    "question_answering": "ForQuestionAnswering",
    "encoder": "Model",
}


def hf_architecture(config: BertConfig, task: str) -> str:
    name = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}[config.model_type]
    return name + HF_TASK_SUFFIXES[task]


CONFIG = BertConfig
