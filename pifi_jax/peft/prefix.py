"""Prefix tuning (Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation).

Every layer's self-attention attends to P trained key/value pairs in front of the sequence's own:

    K' = [K_prefix; K], V' = [V_prefix; V]          # [batch, P + length, heads, head_dim]
    padding bias [..., length] -> [..., P + length]  # 0 on the prefix: every query sees it

The sequence keeps its length (the head reads the same token as before). Token positions start at
P, because that is how transformers numbers tokens that follow a cache of P entries, which is how
Hugging Face PEFT hands the prefix to the model; matching it keeps adapters interchangeable.

One table holds every layer, as in HF PEFT: [P, layers * 2 * hidden], where layer l's keys are
columns [2 l H, (2 l + 1) H) and its values the next H, each head-major (heads * head_dim). With
`prefix_projection` the table is instead the output of an MLP, which is what trains:
embedding [P, hidden] -> transform_0 (hidden -> encoder_hidden_size) -> tanh -> transform_2
(-> layers * 2 * hidden). Initialisation as HF PEFT: N(0, 1) embeddings, PyTorch's default Linear.

Tree (added at the root; the family's own tree is unchanged; all of it trains, with the head):

    + prefix_encoder/embedding                 [P, layers * 2 * hidden]
  or, with prefix_projection:
    + prefix_encoder/embedding                 [P, hidden]
    + prefix_encoder/transform_0/{kernel, bias} [hidden, e], [e]
    + prefix_encoder/transform_2/{kernel, bias} [e, layers * 2 * hidden], [layers * 2 * hidden]

    cfg = pifi_jax.peft.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True)
    module, params = pifi_jax.from_pretrained("asset:minilm", num_labels=2, peft=cfg)
    pifi_jax.peft.save_adapter(module, params, "adapter/")  # loads in Hugging Face PEFT

`pifi_jax.peft.PeftModel` computes the table once per call and hands it to the scope; each
self-attention takes its block through `layers.linear.attention_prefix`. Families: BERT, RoBERTa,
ELECTRA (see targets.PREFIX_ATTENTION for why not ALBERT and DeBERTa). Not mergeable.
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
from pifi_jax.peft.targets import PREFIX_ATTENTION

# PyTorch's default nn.Linear initialisation, U(-1/sqrt(in), 1/sqrt(in)), as HF PEFT's MLP has.
_TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class PrefixEncoder(nn.Module):
    """Returns the prefix table [P, num_layers * 2 * hidden_size]."""

    num_virtual_tokens: int
    num_layers: int
    hidden_size: int
    projection: bool = False
    encoder_hidden_size: int = 0
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        width = self.num_layers * 2 * self.hidden_size
        init = nn.initializers.normal(stddev=1.0)  # torch.nn.Embedding's default
        if not self.projection:
            return self.param("embedding", init, (self.num_virtual_tokens, width), self.param_dtype)
        tokens = self.param(
            "embedding", init, (self.num_virtual_tokens, self.hidden_size), self.param_dtype
        )  # [P, hidden]
        kw = dict(param_dtype=self.param_dtype, kernel_init=_TORCH_LINEAR_INIT)
        h = Linear(self.encoder_hidden_size, **kw, name="transform_0")(tokens)  # [P, e]
        return Linear(width, **kw, name="transform_2")(jnp.tanh(h))  # [P, layers * 2 * hidden]


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def attention_layers(model_type: str, linear_paths: Iterable[str]) -> tuple[str, ...]:
    """Paths of the self-attention modules that take a prefix, in depth order."""
    if model_type not in PREFIX_ATTENTION:
        raise ValueError(
            f"prefix tuning is not supported for {model_type!r}; it is for "
            f"{sorted(PREFIX_ATTENTION)} (pifi_jax.peft.targets.PREFIX_ATTENTION says why)"
        )
    suffix = "/" + PREFIX_ATTENTION[model_type]
    found = {p.rpartition("/")[0] for p in linear_paths}
    return tuple(sorted((p for p in found if p.endswith(suffix)), key=_natural))


def encoder_for(
    config: PrefixTuningConfig, model_config, num_layers: int, param_dtype
) -> PrefixEncoder:
    """The prefix encoder for a model; refuses sizes an imported adapter was not made for."""
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    for name, want in (
        ("token_dim", hidden),
        ("num_layers", num_layers),
        ("num_attention_heads", heads),
    ):
        got = getattr(config, name)
        if got is not None and got != want:
            raise ValueError(f"prefix adapter made for {name}={got}; this model has {want}")
    return PrefixEncoder(
        config.num_virtual_tokens,
        num_layers,
        hidden,
        projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size or hidden,
        param_dtype=param_dtype,
    )
