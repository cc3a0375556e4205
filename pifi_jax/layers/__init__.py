"""Building blocks shared by every architecture. Imports nothing else from the package."""

from pifi_jax.layers.activations import activation
from pifi_jax.layers.attention import (
    KVCache,
    attention_bias,
    dot_product_attention,
    padding_bias,
    positions_from_mask,
    self_attention_inputs,
)
from pifi_jax.layers.linear import Linear
from pifi_jax.layers.norms import RMSNorm
from pifi_jax.layers.rotary import SUPPORTED_ROPE_TYPES, Rope

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "KVCache",
    "Linear",
    "RMSNorm",
    "Rope",
    "activation",
    "attention_bias",
    "dot_product_attention",
    "padding_bias",
    "positions_from_mask",
    "self_attention_inputs",
]
