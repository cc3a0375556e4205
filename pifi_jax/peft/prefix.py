"""Prefix tuning (Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation).

Every layer's self-attention attends to P trained key/value pairs in front of the sequence's own:

    K' = [K_prefix; K], V' = [V_prefix; V]          # [batch, P + length, kv_heads, head_dim]
    mask [..., length] -> [..., P + length]           # every query sees the prefix

The sequence keeps its length (the head reads the same token as before). Token positions start at
P, because that is how transformers numbers tokens that follow a cache of P entries, which is how
Hugging Face PEFT hands the prefix to the model; matching it keeps adapters interchangeable.
Decoders (llama, mistral, qwen2, gemma2, falcon, gpt2) see the prefix as P earlier tokens in every
mask rule (causal; a sliding window, as transformers masks the cache: layers.attention.
self_attention_inputs), also when decoding with a KVCache (the prefix stays in front of the cache).
With grouped-query / multi-query attention the prefix has the key/value heads (PEFT's `token_dim`
= kv_heads * head_dim, `num_attention_heads` = kv_heads).

One table holds every layer, as in HF PEFT: [P, layers * 2 * width] (width = kv_heads * head_dim;
the hidden size for encoders), where layer l's keys are columns [2 l W, (2 l + 1) W) and its values
the next W, each head-major (heads * head_dim). With `prefix_projection` the table is instead the
output of an MLP, which is what trains: embedding [P, W] -> transform_0 (W -> encoder_hidden_size)
-> tanh -> transform_2 (-> layers * 2 * W). Initialisation as HF PEFT: N(0, 1) embeddings,
PyTorch's default Linear.

ALBERT and DeBERTa: transformers' ALBERT and DeBERTa take no past_key_values, so Hugging Face PEFT
cannot prefix them; pifi_jax defines it natively (saved in the native format only):
  ALBERT: one block per layer *application*, following PEFT's `num_layers` = num_hidden_layers:
    the shared layer runs num_hidden_layers times (x inner_group_num layers per group) and each
    run attends to its own prefix, so the table has num_hidden_layers * inner_group_num blocks in
    depth order. Sharing the prefix across depth would tie keys/values that meet different hidden
    states at each depth; per-application blocks cost little (P * 2 * hidden per depth) and make a
    prefix on ALBERT the same thing as on BERT.
  DeBERTa (v1, v2/v3): the prefix keys take part in content-to-content attention only. They have
    no position, so no relative-position term (c2p, p2c) exists for them; their content scores
    q . k_prefix are scaled like the real ones (1 / sqrt(head_dim * (1 + relative terms))), so a
    prefix key competes with a real key on the same footing. Talking heads (v1) mix the prefix
    columns like any other. A padding query (masked row) stays masked on the prefix too.

Tree (added at the root; the family's own tree is unchanged; all of it trains, with the head):

    + prefix_encoder/embedding                 [P, layers * 2 * W]
  or, with prefix_projection:
    + prefix_encoder/embedding                 [P, W]
    + prefix_encoder/transform_0/{kernel, bias} [W, e], [e]
    + prefix_encoder/transform_2/{kernel, bias} [e, layers * 2 * W], [layers * 2 * W]

    cfg = pifi_jax.peft.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True)
    module, params = pifi_jax.from_pretrained("asset:minilm", num_labels=2, peft=cfg)
    pifi_jax.peft.save_adapter(module, params, "adapter/")  # loads in Hugging Face PEFT

`pifi_jax.peft.PeftModel` computes the table once per call and hands it to the scope; each
self-attention takes its block through `layers.peft_hooks.prefix_block`. Not mergeable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pifi_jax.layers.linear import Linear
from pifi_jax.peft.config import PrefixTuningConfig
from pifi_jax.peft.targets import NATIVE_ONLY_PREFIX, PREFIX_ATTENTION

# PyTorch's default nn.Linear initialisation, U(-1/sqrt(in), 1/sqrt(in)), as HF PEFT's MLP has.
_TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class PrefixEncoder(nn.Module):
    """Returns the prefix table [P, num_layers * 2 * token_dim] (token_dim = kv_heads * head_dim)."""

    num_virtual_tokens: int
    num_layers: int
    token_dim: int
    projection: bool = False
    encoder_hidden_size: int = 0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        width = self.num_layers * 2 * self.token_dim
        init = nn.initializers.normal(stddev=1.0)  # torch.nn.Embedding's default
        if not self.projection:
            return self.param("embedding", init, (self.num_virtual_tokens, width), self.param_dtype)
        tokens = self.param(
            "embedding", init, (self.num_virtual_tokens, self.token_dim), self.param_dtype
        )  # [P, token_dim]
        kw = dict(param_dtype=self.param_dtype, kernel_init=_TORCH_LINEAR_INIT)
        h = Linear(self.encoder_hidden_size, **kw, name="transform_0")(tokens)  # [P, e]
        return Linear(width, **kw, name="transform_2")(jnp.tanh(h))  # [P, layers * 2 * token_dim]


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def attention_layers(model_config, linear_paths: Iterable[str]) -> tuple[str, ...]:
    """Paths of the self-attention modules that take a prefix, one per block, in depth order."""
    model_type = model_config.model_type
    if model_type not in PREFIX_ATTENTION:
        raise ValueError(
            f"prefix tuning is not supported for {model_type!r}; it is for "
            f"{sorted(PREFIX_ATTENTION)}"
        )
    suffix = "/" + PREFIX_ATTENTION[model_type]
    found = {p.rpartition("/")[0] for p in linear_paths}
    found = sorted((p for p in found if p.endswith(suffix)), key=_natural)
    if model_type == "albert":
        return _albert_applications(model_config, found)
    return tuple(found)


def _albert_applications(model_config, attentions: list[str]) -> tuple[str, ...]:
    """ALBERT: the attention of every layer application, in depth order (a shared module repeats)."""
    by_layer = {}
    for path in attentions:
        match = re.search(r"albert_layer_groups_(\d+)/albert_layers_(\d+)/attention$", path)
        by_layer[int(match.group(1)), int(match.group(2))] = path
    return tuple(
        by_layer[model_config.group_at_depth(depth), inner]
        for depth in range(model_config.num_hidden_layers)
        for inner in range(model_config.inner_group_num)
    )


def kv_heads_and_dim(model_config) -> tuple[int, int]:
    """(heads, head_dim) of one layer's keys and values: the key/value heads under GQA / MQA."""
    heads = getattr(model_config, "cache_kv_heads", None) or model_config.num_attention_heads
    return heads, model_config.head_dim


def hf_refusal(model_type: str) -> str | None:
    """Why a prefix on this family has no Hugging Face PEFT format (None: it has one)."""
    if model_type in NATIVE_ONLY_PREFIX:
        return (
            f"prefix tuning on {model_type} is pifi_jax's own (transformers' {model_type} takes no "
            "past_key_values, so Hugging Face PEFT cannot prefix it)"
        )
    return None


def encoder_for(
    config: PrefixTuningConfig, model_config, num_layers: int, param_dtype
) -> PrefixEncoder:
    """The prefix encoder for a model; refuses sizes an imported adapter was not made for."""
    heads, head_dim = kv_heads_and_dim(model_config)
    width = heads * head_dim
    for name, want in (
        ("token_dim", width),
        ("num_layers", num_layers),
        ("num_attention_heads", heads),
    ):
        got = getattr(config, name)
        if got is not None and got != want:
            raise ValueError(f"prefix adapter made for {name}={got}; this model has {want}")
    return PrefixEncoder(
        config.num_virtual_tokens,
        num_layers,
        width,
        projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size or width,
        param_dtype=param_dtype,
    )
