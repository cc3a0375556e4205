"""Rotary position embeddings (RoPE) in Hugging Face's "rotate half" layout, with frequency scaling.

Dimension i of a head is rotated together with dimension i + head_dim/2 (the RoPE paper and
llama.cpp pair adjacent dimensions instead, which is why GGUF q/k weights are un-permuted on load).
For a position p and inverse frequency f_i:
    x_rot = x * cos(p f) + rotate_half(x) * sin(p f),   rotate_half([a, b]) = [-b, a]

Frequency scalings (`rope_type`, the names transformers uses):
  default   f_i = theta^(-2i/d)
  linear    f_i / factor                                  (position interpolation)
  dynamic   default with theta grown once the sequence exceeds the trained length (NTK-aware);
            computed from this call's largest position, i.e. transformers' behaviour on a fresh
            model (transformers also keeps a grown table between calls; this function is stateless)
  llama3    Llama 3.1: low frequencies / factor, high ones kept, a smooth ramp between
Frequencies are computed in float32 with the same operations as transformers, so positions match it
to the last bit that matters for fp32 parity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# rope_type -> keys its Hugging Face parameter dict may hold besides rope_type / rope_theta.
_KEYS = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
}
SUPPORTED_ROPE_TYPES = tuple(_KEYS)


@dataclasses.dataclass(frozen=True)
class Rope:
    """How positions rotate queries and keys. Hashable, so modules can hold it as an attribute.

    Attributes:
      theta: the base wavelength (`rope_theta`).
      rope_type: one of SUPPORTED_ROPE_TYPES.
      factor: scaling factor of linear / dynamic / llama3.
      low_freq_factor, high_freq_factor, original_max_position_embeddings: llama3's parameters.
      max_position_embeddings: the model's trained length, which dynamic scaling starts from.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf(
        cls, params: Mapping[str, Any] | None, *, theta: float, max_position_embeddings: int
    ) -> Rope:
        """From a Hugging Face `rope_parameters` / `rope_scaling` dict (either spelling of the type).

        Refuses rope types not implemented here and keys that the type does not use.
        """
        params = dict(params or {})
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        theta = float(params.pop("rope_theta", theta))
        if rope_type not in _KEYS:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
            )
        unknown = sorted(set(params) - _KEYS[rope_type])
        if unknown:
            raise ValueError(
                f"rope parameter(s) {unknown} are not supported for {rope_type!r} rope"
            )
        if rope_type == "llama3":
            params.setdefault("original_max_position_embeddings", max_position_embeddings)
        if rope_type != "default" and "factor" not in params:
            raise ValueError(f"{rope_type!r} rope needs a 'factor'")
        return cls(
            theta=theta,
            rope_type=rope_type,
            max_position_embeddings=max_position_embeddings,
            **params,
        )

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` dict transformers 5 reads."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        for key in sorted(_KEYS[self.rope_type]):
            out[key] = getattr(self, key)
        return out

    def inverse_frequencies(self, dim: int, positions: jax.Array | None = None) -> jax.Array:
        """[dim // 2] float32 inverse frequencies (dynamic scaling reads the largest position)."""
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        if self.rope_type == "dynamic":
            trained = self.max_position_embeddings
            length = jnp.maximum(jnp.max(positions) + 1, trained).astype(jnp.float32)
            base = self.theta * ((self.factor * length / trained) - (self.factor - 1)) ** (
                dim / (dim - 2)
            )
            return 1.0 / (base ** jnp.asarray(exponents))
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "linear":
            inv = inv / np.float32(self.factor)
        elif self.rope_type == "llama3":
            inv = _llama3_scaling(inv, self)
        return jnp.asarray(inv)

    def apply(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """Rotates x [batch, length, heads, head_dim] by positions [batch, length]."""
        dim = x.shape[-1]
        inv = self.inverse_frequencies(dim, positions)  # [dim/2]
        freqs = positions[..., None].astype(jnp.float32) * inv  # [batch, length, dim/2]
        angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [batch, length, 1, dim]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
        x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
        rotated = jnp.concatenate([-x2, x1], axis=-1)
        return x * cos + rotated * sin


def _llama3_scaling(inv: np.ndarray, rope: Rope) -> np.ndarray:
    """Llama 3.1: wavelengths longer than context/low_freq_factor are divided by factor, those
    shorter than context/high_freq_factor kept, and the band between interpolated smoothly."""
    context = rope.original_max_position_embeddings
    low, high, factor = rope.low_freq_factor, rope.high_freq_factor, rope.factor
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_freq_wavelen, inv / np.float32(factor), inv)
    smooth = (np.float32(context) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
