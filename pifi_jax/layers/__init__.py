"""Building blocks shared by every architecture. Imports nothing else from the package."""

from pifi_jax.layers import cpu_rng
from pifi_jax.layers.activations import activation, gated_activation, softmax
from pifi_jax.layers.attention import (
    ATTENTION_IMPLEMENTATIONS,
    KVCache,
    Seq2SeqCache,
    attention_bias,
    attention_implementation,
    dot_product_attention,
    get_attention_implementation,
    padding_bias,
    positions_from_mask,
    self_attention_inputs,
    set_attention_implementation,
)
from pifi_jax.layers.linear import Linear
from pifi_jax.layers.norms import RMSNorm
from pifi_jax.layers.rotary import SUPPORTED_ROPE_TYPES, Rope

cpu_rng.install()  # dropout masks: Threefry unrolled on the CPU (same bits, fused; cpu_rng.py)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "SUPPORTED_ROPE_TYPES",
    "KVCache",
    "Seq2SeqCache",
    "Linear",
    "RMSNorm",
    "Rope",
    "activation",
    "gated_activation",
    "softmax",
    "attention_bias",
    "attention_implementation",
    "dot_product_attention",
    "get_attention_implementation",
    "padding_bias",
    "positions_from_mask",
    "self_attention_inputs",
    "set_attention_implementation",
]
