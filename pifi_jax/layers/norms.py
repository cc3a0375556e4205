"""RMSNorm, as Llama and Gemma use it (LayerNorm without centring and without a bias).

`y = x / sqrt(mean(x^2) + eps) * scale`, the statistics always in float32.
Llama multiplies by `scale` after casting back to the compute dtype; Gemma stores `w` and multiplies
by `(1 + w)` in float32 before casting (`unit_offset=True`). Both orders are kept so that bfloat16
runs round the same way as the reference implementations.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last axis; one leaf `scale` [features].

    Attributes:
      eps: added to the mean square.
      unit_offset: Gemma's variant, the stored scale is an offset from one (initialised to zeros).
      dtype: output dtype; param_dtype: storage dtype of `scale`.
    """

    eps: float = 1e-6
    unit_offset: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)
