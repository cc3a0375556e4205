"""Strict, mechanical renaming between Hugging Face tensor names and pifi_jax parameter paths.

`bert.encoder.layer.3.attention.self.query.weight` <-> `bert/encoder/layer_3/attention/self/query/kernel`
- a list index folds into the name before it (`layer.3` <-> `layer_3`);
- `weight` of a Linear is our `kernel`, transposed ([out, in] -> [in, out]); of a LayerNorm our
  `scale`; of an Embedding our `embedding`. Which one is decided by the target tree, so no table of
  names is kept per architecture; a family only lists what to ignore and which head is new.
- a family whose linear weights are already stored [in, out] (GPT-2's Conv1D) names them in
  `in_out_kernels`, and those are not transposed, either way; module names that end in `_<digits>`
  without being list indices (GPT-2's `ln_1`) are named in `literal_names`.
- a scanned layer stack keeps one leaf per tensor name with a leading layers axis
  (`model/layers/mlp/up_proj/kernel` [layers, in, out]); `stack_layers` / `unstack_layers` convert
  between that and the per-layer paths above, on load and on save.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

_INDEX_DOT = re.compile(r"\.(\d+)(?=\.|$)")
_INDEX_UNDERSCORE = re.compile(r"_(\d+)(?=/|$)")
# HF leaf name -> candidate (our leaf, transpose) in order of preference.
_LEAF_CANDIDATES = {
    "weight": (("kernel", True), ("scale", False), ("embedding", False)),
    "bias": (("bias", False),),
    "gamma": (("scale", False),),  # LayerNorm names of TF-converted checkpoints
    "beta": (("bias", False),),
}
_HF_LEAF = {"kernel": ("weight", True), "scale": ("weight", False), "embedding": ("weight", False)}


class TensorSource(Protocol):
    """What load_params reads: files.CheckpointReader, gguf.GGUFCheckpoint, layer.LayerView."""

    directory: Any

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> np.ndarray: ...


def hf_key_to_path(key: str, target: dict[str, Any]) -> tuple[str, bool] | None:
    """Our path for an HF tensor name and whether to transpose, or None if the target lacks it."""
    module, _, leaf = key.rpartition(".")
    module_path = _INDEX_DOT.sub(r"_\1", module).replace(".", "/")
    # A leaf with no HF convention (DeBERTa's `q_bias`) keeps its name.
    for ours, transpose in _LEAF_CANDIDATES.get(leaf, ((leaf, False),)):
        path = f"{module_path}/{ours}" if module_path else ours  # a top-level leaf (a buffer)
        if path in target:
            return path, transpose
    return None


def path_to_hf_key(
    path: str, in_out_kernels: Sequence[str] = (), literal_names: Sequence[str] = ()
) -> tuple[str, bool]:
    """The HF tensor name for one of our paths, and whether the tensor must be transposed.

    `literal_names`: module names that end in `_<digits>` without being a list index (GPT-2's
    `ln_1`), kept as they are.
    """
    module, _, leaf = path.rpartition("/")
    hf_leaf, transpose = _HF_LEAF.get(leaf, (leaf, False))
    key = hf_module_path(module, literal_names) + "." + hf_leaf if module else hf_leaf
    return key, transpose and not _matches(in_out_kernels, key)


def hf_module_path(module: str, literal_names: Sequence[str] = ()) -> str:
    """`encoder/layer_0/attention` -> `encoder.layer.0.attention`; a part in `literal_names`
    (T5's `wi_1`, GPT-2's `ln_1`) keeps its underscore."""
    return ".".join(
        p if p in literal_names else _INDEX_UNDERSCORE.sub(r".\1", p) for p in module.split("/")
    )


def _matches(patterns: Sequence[str], name: str) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _fresh_leaf(path: str, shape, dtype, rng) -> jax.Array:
    """Initialisation of a new head leaf, as transformers does (normal(0.02) weights, zero bias)."""
    leaf = path.rpartition("/")[2]
    if leaf == "bias":
        return jnp.zeros(shape, dtype)
    if leaf == "scale":
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)


def load_params(
    reader: TensorSource,
    abstract: dict[str, jax.ShapeDtypeStruct],
    *,
    prefix: str,
    ignored: Sequence[str] = (),
    optional: Sequence[str] = (),
    new: Sequence[str] = (),
    shardings: dict[str, jax.sharding.Sharding] | None = None,
    rng: jax.Array | None = None,
    key_filter: Callable[[str], bool] | None = None,
    in_out_kernels: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, jax.Array]:
    """Reads a checkpoint into the flat target `abstract` (path -> ShapeDtypeStruct), strictly.

    Every source tensor must map to a target leaf of the same shape, or match `ignored` (dropped on
    purpose) or `optional` (used only if the target has it). Every target leaf must be loaded or match
    `new` (initialised fresh). Each tensor is cast and placed on its sharding as soon as it is read.
    Keys without the `prefix.` that a base-model checkpoint omits are prefixed; an empty prefix
    takes the keys as they are. Source keys matching `in_out_kernels` hold linear weights already
    stored [in, out] and are not transposed.
    """
    keys = [k for k in reader.keys() if key_filter is None or key_filter(k)]
    has_prefix = not prefix or any(k.startswith(prefix + ".") for k in keys)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    params: dict[str, jax.Array] = {}
    unused: list[str] = []
    for key in keys:
        if _matches(ignored, key):
            continue
        name = key if has_prefix or _matches(optional, key) else f"{prefix}.{key}"
        found = hf_key_to_path(name, abstract)
        if found is None:
            if not _matches(optional, name):
                unused.append(key)
            continue
        path, transpose = found
        array = reader.get(key)
        if transpose and not _matches(in_out_kernels, key):
            array = array.T
        want = abstract[path]
        if tuple(array.shape) != tuple(want.shape):
            raise ValueError(
                f"checkpoint tensor {key} of {getattr(reader, 'directory', 'the checkpoint')} "
                f"has shape {tuple(array.shape)} but {path} needs {tuple(want.shape)} (a "
                "different num_labels or model size? the config.json and the weights must be "
                "one checkpoint's)"
            )
        array = np.asarray(array, dtype=want.dtype)  # no copy when it has the dtype already
        # device_put, not jnp.asarray: on the CPU it takes an aligned, contiguous array without
        # a copy (the GGUF reader's, a safetensors page), so a tensor is not held twice while
        # it loads; nothing writes into the numpy array afterwards.
        params[path] = jax.device_put(array, shardings[path] if shardings else None)
    if unused:
        raise ValueError(
            f"{len(unused)} checkpoint tensor(s) in {reader.directory} have no place in the model and "
            f"are not known to be ignorable: {unused[:8]}"
        )
    missing = [p for p in abstract if p not in params]
    not_new = [p for p in missing if not _matches(new, p)]
    if not_new:
        raise ValueError(
            f"{len(not_new)} parameter(s) are missing from the checkpoint in {reader.directory}: "
            f"{not_new[:8]}"
        )
    for i, path in enumerate(missing):
        leaf = _fresh_leaf(
            path, abstract[path].shape, abstract[path].dtype, jax.random.fold_in(rng, i)
        )
        params[path] = jax.device_put(leaf, shardings[path]) if shardings else leaf
    if missing:
        log(f"newly initialised (not in the checkpoint): {', '.join(missing)}")
    return params


def _stack_pattern(stack: str) -> re.Pattern:
    """`<prefix>/{stack}_{i}/<rest>`: group 1 the prefix (with its slash), 2 the index, 3 the rest."""
    return re.compile(rf"((?:.*/)?){re.escape(stack)}_(\d+)/(.+)")


def stack_layers(
    flat: dict[str, Any],
    stack: str,
    shardings: dict[str, jax.sharding.Sharding] | None = None,
) -> dict[str, Any]:
    """Per-layer leaves `model/{stack}_3/<rest>` -> one leaf `model/{stack}/<rest>` [layers, ...],
    the layout of a scanned stack (models/stack.py `scan_layers`). Other leaves pass through.

    Consumes `flat` (its per-layer entries are removed as each stacked leaf is built), so device
    memory holds one leaf's layers twice at most, not the whole model. `shardings`: of the
    stacked paths; each stacked leaf is built directly in its sharding.
    """
    pattern = _stack_pattern(stack)
    groups: dict[str, dict[int, str]] = {}
    for path in flat:
        match = pattern.fullmatch(path)
        if match:
            stacked = f"{match.group(1)}{stack}/{match.group(3)}"
            groups.setdefault(stacked, {})[int(match.group(2))] = path
    out = {p: v for p, v in flat.items() if not pattern.fullmatch(p)}
    for stacked, by_index in groups.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{stacked}: layers {sorted(by_index)} are not 0..n-1")
        pieces = [flat.pop(by_index[i]) for i in range(len(by_index))]
        if shardings is None:
            out[stacked] = jnp.stack(pieces)
        else:
            out[stacked] = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=shardings[stacked])(
                *pieces
            )
        del pieces
    return out


def unstack_layers(flat: dict[str, Any], stack: str) -> dict[str, Any]:
    """The inverse of stack_layers: `model/{stack}/<rest>` [layers, ...] -> `model/{stack}_i/<rest>`.
    Paths without a `{stack}` segment (an unrolled model) pass through unchanged."""
    pattern = re.compile(rf"((?:.*/)?){re.escape(stack)}/(.+)")
    out = {}
    for path, value in flat.items():
        match = pattern.fullmatch(path)
        if match is None:
            out[path] = value
            continue
        for i in range(value.shape[0]):
            out[f"{match.group(1)}{stack}_{i}/{match.group(2)}"] = value[i]
    return out
