"""Activation functions by their Hugging Face config names (`hidden_act`), and a softmax, whose
backward passes keep only what they need.

Differentiated as written, `jax.nn.silu(x)` keeps three [.., inter] arrays for its backward pass
(x, sigmoid(x) and a product) and `jax.nn.softmax` two [batch, heads, q, k] ones (its exp and its
quotient). Here every activation keeps only its input and recomputes the rest in the backward
pass (elementwise, cheap), a gated product `act(gate) * up` keeps only gate and up, and the
softmax keeps only its output (d x = p * (d p - sum(d p * p))). The values and gradients are the
same as plain differentiation's (to rounding); the saved activations of a decoder layer shrink
by about a third (docs/benchmarks.md, "IST step memory").
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp


def keep_inputs_only(fn: Callable) -> Callable:
    """`fn` (elementwise, any number of array arguments) whose backward pass keeps only the
    inputs and recomputes fn's intermediates from them."""

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, cotangent):
        return jax.vjp(fn, *args)[1](cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """jax.nn.softmax over one axis, keeping only its output for the backward pass."""
    return _softmax(x, axis)


def _softmax(x, axis):
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    unnormalized = jnp.exp(shifted)
    return unnormalized / jnp.sum(unnormalized, axis=axis, keepdims=True)


def _softmax_forward(x, axis):
    probs = _softmax(x, axis)
    return probs, probs


def _softmax_backward(axis, probs, cotangent):
    return (probs * (cotangent - jnp.sum(cotangent * probs, axis=axis, keepdims=True)),)


softmax.defvjp(_softmax_forward, _softmax_backward)


_PLAIN: dict[str, Callable[[jax.Array], jax.Array]] = {
    # transformers' "gelu" is the exact erf form; the tanh approximation has its own names.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


_ACTIVATIONS = {name: keep_inputs_only(fn) for name, fn in _PLAIN.items()}
_GATED = {
    name: keep_inputs_only(lambda gate, up, fn=fn: fn(gate) * up) for name, fn in _PLAIN.items()
}


def _lookup(table: dict, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}") from None


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation called `name` in Hugging Face configs."""
    return _lookup(_ACTIVATIONS, name)


def gated_activation(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(gate, up) -> activation(gate) * up, keeping only gate and up for the backward pass."""
    return _lookup(_GATED, name)
