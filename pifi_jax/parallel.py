"""Meshes, logical axis rules and shardings.

Parameters and activations are described with a small vocabulary of logical axis names (batch,
length, embed, heads, kv, mlp, vocab, layers). Rules, kept in the config, map them to the mesh axes
(data, fsdp, tensor). A dimension that does not divide evenly over its mesh axes stays replicated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A Mesh over axes (data, fsdp, tensor); one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], rules, shape=None, mesh: Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for logical `axes`; a mesh axis is used once, and only where it divides the dim."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if shape is not None and shape[i] % size:
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def param_logical_axes(flat_shapes: Mapping[str, object], param_axes) -> dict[str, tuple]:
    """Logical axes per parameter path (first matching regex wins; unmatched = replicated).

    PEFT leaves of a Linear follow its kernel [in, out]: lora_a [in, r] takes the input axis,
    lora_b [r, out] and lora_magnitude [out] the output axis, the rank stays replicated; an IA3
    vector takes the axis of the dimension it scales. Bottleneck adapters shard their hidden-size
    side like the residual stream they sit on ("embed"); the bottleneck stays whole. Prefix and
    prompt tables (`prefix_encoder/*`, `prompt_encoder/*`, small) stay replicated.
    """
    rules = (*param_axes, *_BOTTLENECK_AXES)
    out = {}
    for path, leaf in flat_shapes.items():
        ndim = len(leaf.shape)
        axes = next((ax for pattern, ax in rules if re.fullmatch(pattern, path)), None)
        if axes is None or len(axes) != ndim:
            axes = (None,) * ndim
        out[path] = tuple(axes)
    for path, leaf in flat_shapes.items():
        module, _, name = path.rpartition("/")
        kernel = flat_shapes.get(f"{module}/kernel")
        if kernel is None or name not in _ADAPTER_AXES:
            continue
        k_in, k_out = out[f"{module}/kernel"]
        if name == "ia3_l":
            out[path] = (k_out,) if leaf.shape[0] == kernel.shape[1] else (k_in,)
        else:
            out[path] = _ADAPTER_AXES[name](k_in, k_out)
    return out


# pifi_jax.peft.adapters: down [d, m] and up [m, d] (+ bias [d]) around a [..., d] activation.
_BOTTLENECK_AXES = (
    (r".*/adapter_down/kernel", ("embed", None)),
    (r".*/adapter_up/kernel", (None, "embed")),
    (r".*/adapter_up/bias", ("embed",)),
)
_ADAPTER_AXES = {
    "lora_a": lambda k_in, k_out: (k_in, None),
    "lora_b": lambda k_in, k_out: (None, k_out),
    "lora_magnitude": lambda k_in, k_out: (k_out,),
    "ia3_l": None,  # by shape, above
}


def param_shardings(
    flat_shapes: Mapping[str, object], param_axes, mesh: Mesh, rules=DEFAULT_RULES
) -> dict:
    """NamedSharding per parameter path of a flat {path: array or ShapeDtypeStruct}."""
    axes = param_logical_axes(flat_shapes, param_axes)
    return {
        path: NamedSharding(mesh, logical_to_spec(axes[path], rules, leaf.shape, mesh))
        for path, leaf in flat_shapes.items()
    }


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of per-example arrays: the leading (batch) axis over the data-like mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules, None, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def initialize_distributed(cfg) -> None:
    """jax.distributed.initialize() from a config section (enabled, coordinator_address,
    num_processes, process_id); unset values are left to JAX's cluster auto-detection."""
    if not cfg.enabled:
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes >= 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    jax.distributed.initialize(**kwargs)
