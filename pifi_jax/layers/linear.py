"""The projection every architecture uses: `y = x @ kernel + bias`, kernel stored [in, out].

Hugging Face stores `nn.Linear.weight` as [out, in]; conversion transposes it. Every projection of
every architecture is this one module, so parameter-efficient methods that act on projections
(LoRA, DoRA, IA3) are implemented once, here. When a model runs inside `adapter_scope(plan)` (which
`pifi_jax.peft` does for a model built with a PEFT config), each Linear looks its own path up in the
plan and, if targeted, creates and applies its extra leaves:

    lora_a [in, r], lora_b [r, out]      y += scaling * dropout(x) @ lora_a @ lora_b
    lora_magnitude [out]                 DoRA: y = m * (W + s A B) x / ||W + s A B||_col + b
    ia3_l [out] (or [in] for FFN-out)    y *= l   (or x *= l before the projection)

A Linear that is not targeted has no extra leaves and does no extra work.

The same scope carries the methods that act around projections rather than on them (bottleneck
adapters, prefix and prompt tuning): their hooks, which family modules call at the place the method
acts, are in `layers.peft_hooks`. The prompt and prefix values themselves are computed once per call
by `pifi_jax.peft.PeftModel` (which owns their leaves) and handed to the scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

default_kernel_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class LinearAdapter:
    """What a targeted Linear adds. lora_r == 0: no LoRA; ia3 None: no IA3."""

    lora_r: int = 0
    lora_scaling: float = 1.0
    lora_dropout: float = 0.0
    lora_init: str = "kaiming"  # A's init; "gaussian": N(0, 1/r); "random": B random too
    dora: bool = False
    ia3: str | None = None  # "output" (scale y) or "input" (scale x: feed-forward modules)


@dataclasses.dataclass(frozen=True)
class Bottleneck:
    """A bottleneck adapter on a module's output: h + up(act(down(h))), up starting at zero."""

    size: int
    non_linearity: str = "relu"


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """Where PEFT leaves attach, by module path ("/"-joined, as in the parameter tree). Hashable.

    adapters: Linear path -> LinearAdapter (LoRA, DoRA, IA3).
    bottlenecks: path of a module that calls `bottleneck_adapter` -> Bottleneck.
    prefix_layers: paths of the self-attention modules that take prefix keys/values, one entry per
      block of the prefix table, in its order (prefix tuning). A module applied at several depths
      (ALBERT's shared layer) appears once per application, and its n-th application takes the
      block of its n-th entry.
    """

    adapters: tuple[tuple[str, LinearAdapter], ...] = ()
    bottlenecks: tuple[tuple[str, Bottleneck], ...] = ()
    prefix_layers: tuple[str, ...] = ()

    def get(self, path: str) -> LinearAdapter | None:
        return dict(self.adapters).get(path)

    def bottleneck(self, path: str) -> Bottleneck | None:
        return dict(self.bottlenecks).get(path)


@dataclasses.dataclass(frozen=True)
class Scope:
    """What a model call inside `adapter_scope` sees (`active_scope()`)."""

    plan: AdapterPlan
    deterministic: bool
    prompt: jax.Array | None  # [P, width] soft token embeddings
    prefix: jax.Array | None  # [P, blocks * 2 * width]: per block, keys then values


_SCOPE: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "pifi_jax_adapter_scope", default=None
)


@contextlib.contextmanager
def adapter_scope(
    plan: AdapterPlan,
    deterministic: bool,
    *,
    prompt: jax.Array | None = None,
    prefix: jax.Array | None = None,
):
    """Modules called inside this context attach the plan's adapters (and prompt / prefix)."""
    token = _SCOPE.set(Scope(plan, deterministic, prompt, prefix))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def active_scope() -> Scope | None:
    """The PEFT scope the current call runs in; None outside one."""
    return _SCOPE.get()


@dataclasses.dataclass(frozen=True)
class BranchScales:
    """Per-layer factors on the PEFT branches (LoRA / DoRA deltas, bottleneck adapters).

    scales: [groups] float, traced; group_of: module path -> group index, or None for a module
    outside every group (its branch is left as it is).
    """

    scales: jax.Array
    group_of: Any  # Callable[[str], int | None]

    def of(self, path: str) -> jax.Array | None:
        group = self.group_of(path)
        return None if group is None else self.scales[group]


_BRANCH_SCALES: contextvars.ContextVar[BranchScales | None] = contextvars.ContextVar(
    "pifi_jax_branch_scales", default=None
)


@contextlib.contextmanager
def branch_scales(scales: jax.Array, group_of):
    """Inside this context (while a model is traced), the PEFT branch of every module that
    `group_of(path)` puts in group g is multiplied by `scales[g]`: LoRA's and DoRA's delta (as if
    its alpha / r scaling were scaled) and a bottleneck adapter's output. One traced vector, so
    every choice of factors runs the same compiled function (IST's probe, pifi_jax.ist)."""
    token = _BRANCH_SCALES.set(BranchScales(scales, group_of))
    try:
        yield
    finally:
        _BRANCH_SCALES.reset(token)


def branch_scale(path: str) -> jax.Array | None:
    """The factor on the PEFT branch of the module at `path`; None: unscaled."""
    active = _BRANCH_SCALES.get()
    return None if active is None else active.of(path)


class InputTaps:
    """Weight gradients of selected layers only, from inputs kept for those layers only.

    Reverse-mode differentiation of `y = x @ W` keeps x for W's gradient, in every layer, even
    when only a few layers' W are trained at this step (IST, pifi_jax.ist). Inside
    `input_taps(taps)`, a product with a weight that `group_of(weight path)` puts in a group is
    computed as

        y = x @ stop_gradient(W) + tap[weight path]

    with `tap` a zero array [..., out] that the caller differentiates: d loss / d tap is
    d loss / d y, and the caller forms dW = x^T (d loss / d y) for the selected groups. x is
    written (not differentiated) into slot `slots[group]` of one buffer [n_slots, *x.shape] per
    input site; a slot >= n_slots is dropped, so the other groups' inputs live only as long as the
    forward pass needs them. Products in one group that read the same input (q, k and v of a
    layer) share one site, named `kind_of(weight path)` of the first of them (a name without the
    layer, so that every layer writes the same buffer).

    With `tapping=False` (discovery: the caller's first, abstract pass) products are computed
    plainly and only their shapes are recorded, so the caller can make the taps.
    """

    def __init__(self, group_of, kind_of=None, slots=None, n_slots: int = 0, taps=None):
        self.group_of = group_of
        self.kind_of = kind_of
        self.slots = slots
        self.n_slots = n_slots
        self.taps = taps
        self.tap_specs: dict[str, jax.ShapeDtypeStruct] = {}  # weight path -> its tap's shape
        self.sites: dict[str, str] = {}  # weight path -> its input's buffer
        self.groups: dict[str, int] = {}  # weight path -> group
        self.buffers: dict[str, jax.Array] = {}  # site -> [n_slots, *x.shape]
        self._seen: dict[int, list] = {}  # group -> [(x, site)], to share one input's buffer

    def matmul(self, path: str, x: jax.Array, weight: jax.Array, spec: str) -> jax.Array | None:
        """`einsum(spec, x, weight)` if the weight at `path` is tapped (else None)."""
        group = self.group_of(path)
        if group is None:
            return None
        y = jnp.einsum(spec, x, jax.lax.stop_gradient(weight))
        self.groups[path] = group
        if self.taps is None:
            self.tap_specs[path] = jax.ShapeDtypeStruct(y.shape, y.dtype)
            return y
        self.sites[path] = self._keep(group, path, x)
        return y + self.taps[path].astype(y.dtype)

    def _keep(self, group: int, path: str, x: jax.Array) -> str:
        seen = self._seen.setdefault(group, [])
        for earlier, site in seen:
            if earlier is x:
                return site
        site = self.kind_of(path)
        if site in self.buffers and self.buffers[site].shape[1:] != x.shape:
            site = path  # an input of another shape under the same name: a buffer of its own
        buffer = self.buffers.get(site)
        if buffer is None:
            buffer = jnp.zeros((self.n_slots, *x.shape), x.dtype)
        self.buffers[site] = buffer.at[self.slots[group]].set(
            jax.lax.stop_gradient(x).astype(buffer.dtype), mode="drop"
        )
        seen.append((x, site))
        return site


_INPUT_TAPS: contextvars.ContextVar[InputTaps | None] = contextvars.ContextVar(
    "pifi_jax_input_taps", default=None
)


@contextlib.contextmanager
def input_taps(taps: InputTaps):
    """Products with tapped weights, while a model is traced in this context, go through `taps`
    (InputTaps)."""
    token = _INPUT_TAPS.set(taps)
    try:
        yield taps
    finally:
        _INPUT_TAPS.reset(token)


def _product(path: str, spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """einsum(spec, x, weight), through the active InputTaps when it taps `path`."""
    taps = _INPUT_TAPS.get()
    y = None if taps is None else taps.matmul(path, x, weight, spec)
    return jnp.einsum(spec, x, weight) if y is None else y


def _kaiming_uniform_a(key, shape, dtype):
    # PyTorch's default nn.Linear init with a=sqrt(5), which HF PEFT uses for lora_A:
    # bound = 1 / sqrt(fan_in); our lora_a is [in, r], fan_in = in.
    bound = 1.0 / (shape[0] ** 0.5)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """A dense projection over the last axis.

    Attributes:
      features: output size.
      use_bias: whether a bias leaf exists.
      dtype: computation dtype (inputs and kernel are cast to it).
      param_dtype: storage dtype of new parameters.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        active = _SCOPE.get()
        adapter = active.plan.get("/".join(self.path)) if active else None
        if adapter is None:
            return self._project(x, kernel)
        deterministic = active.deterministic
        if adapter.ia3 == "input":
            scale = self.param("ia3_l", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
            x = x * scale.astype(self.dtype)
        if adapter.lora_r and adapter.dora:
            y = self._dora(x, kernel, adapter, deterministic)
        else:
            y = self._project(x, kernel)
            if adapter.lora_r:
                y = y + self._lora(x, adapter, deterministic)
        if adapter.ia3 == "output":
            scale = self.param("ia3_l", nn.initializers.ones, (self.features,), self.param_dtype)
            y = y * scale.astype(self.dtype)
        return y

    def _weight_path(self, name: str) -> str:
        return "/".join((*self.path, name))

    def _project(self, x, kernel, add_bias: bool = True):
        y = _product(
            self._weight_path("kernel"),
            "...i,io->...o",
            x.astype(self.dtype),
            kernel.astype(self.dtype),
        )
        return y + self._bias() if add_bias else y

    def _lora_factors(self, in_features: int, adapter: LinearAdapter):
        r = adapter.lora_r
        if adapter.lora_init == "gaussian":
            a_init = nn.initializers.normal(stddev=1.0 / r)
        else:
            a_init = _kaiming_uniform_a
        lora_a = self.param("lora_a", a_init, (in_features, r), self.param_dtype)
        b_init = _kaiming_uniform_a if adapter.lora_init == "random" else nn.initializers.zeros
        lora_b = self.param("lora_b", b_init, (r, self.features), self.param_dtype)
        return lora_a, lora_b

    def _dropout(self, x, adapter: LinearAdapter, deterministic: bool):
        if adapter.lora_dropout > 0.0 and not deterministic:
            return nn.Dropout(adapter.lora_dropout)(x, deterministic=False)
        return x

    def _scaling(self, adapter: LinearAdapter):
        """alpha / r, times the branch factor when one is set (`branch_scales`)."""
        factor = branch_scale("/".join(self.path))
        if factor is None:
            return adapter.lora_scaling
        return adapter.lora_scaling * factor.astype(self.dtype)

    def _lora_delta(self, x, lora_a, lora_b, adapter: LinearAdapter):
        h = _product(  # [..., r]
            self._weight_path("lora_a"),
            "...i,ir->...r",
            x.astype(self.dtype),
            lora_a.astype(self.dtype),
        )
        return self._scaling(adapter) * jnp.einsum("...r,ro->...o", h, lora_b.astype(self.dtype))

    def _lora(self, x, adapter: LinearAdapter, deterministic: bool):
        lora_a, lora_b = self._lora_factors(x.shape[-1], adapter)
        return self._lora_delta(self._dropout(x, adapter, deterministic), lora_a, lora_b, adapter)

    def _dora(self, x, kernel, adapter: LinearAdapter, deterministic: bool):
        lora_a, lora_b = self._lora_factors(x.shape[-1], adapter)
        # m starts as the column norms of W ([in, out] layout: the norm runs over axis 0).
        magnitude = self.param(
            "lora_magnitude",
            lambda *_: jnp.linalg.norm(kernel.astype(jnp.float32), axis=0).astype(self.param_dtype),
        )
        scaling = self._scaling(adapter)
        delta = scaling * (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32))
        # The norm is a constant in the backward pass (DoRA paper, section 4.3), as in HF PEFT.
        norm = jax.lax.stop_gradient(jnp.linalg.norm(kernel.astype(jnp.float32) + delta, axis=0))
        ratio = (magnitude.astype(jnp.float32) / norm).astype(self.dtype)  # [out]
        base = self._project(x, kernel, add_bias=False)
        y = base + self._bias()
        dropped = self._dropout(x, adapter, deterministic)
        if dropped is not x:
            base = self._project(dropped, kernel, add_bias=False)
        # Written as HF PEFT does, so that training with dropout matches too:
        # y = W x + b + (ratio - 1) W dropout(x) + ratio * s B A dropout(x).
        return y + (ratio - 1) * base + ratio * self._lora_delta(dropped, lora_a, lora_b, adapter)

    def _bias(self):
        if not self.use_bias:
            return 0.0
        return self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
            self.dtype
        )
