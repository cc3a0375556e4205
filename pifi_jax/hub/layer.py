"""`load_layer`: one decoder layer of a large checkpoint, reading only that layer's tensors.

PiFi plugs a single frozen LLM layer into a small model, so loading must not touch the rest of the
checkpoint: only the tensors named like `model.layers.{i}.*` (Falcon and GPT-2: `transformer.h.{i}.*`,
with or without the base prefix) are read, and only from the safetensors shard(s) that the index
file says hold them (`CheckpointReader.opened_files` records what was opened). From the hub, only
config.json, the index and those shards are downloaded. A GGUF file is memory-mapped and only the
layer's tensors are dequantized.

    layer, params = pifi_jax.load_layer("meta-llama/Llama-3.1-8B", -1, dtype=jnp.bfloat16)
    y = layer.apply({"params": params}, x, attention_mask=mask, positions=pos, causal=False)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax import assets, parallel
from pifi_jax.hub import convert, gguf
from pifi_jax.hub.files import CheckpointReader, read_config, resolve_checkpoint
from pifi_jax.hub.pretrained import _flatten, _unflatten, in_out_kernels
from pifi_jax.models import registry

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class LayerView:
    """The tensors of layer `index` of a checkpoint, named as inside the layer
    (`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj.weight`)."""

    def __init__(self, reader, layer_keys: str, index: int):
        self.reader = reader
        self.directory = reader.directory
        self._source = {}
        for key in reader.keys():
            match = re.fullmatch(layer_keys, key)
            if match and int(match.group(1)) == index:
                self._source[match.group(2)] = key
        if not self._source:
            raise ValueError(f"no tensors of layer {index} in {reader.directory}")

    def keys(self) -> list[str]:
        return list(self._source)

    def get(self, key: str) -> np.ndarray:
        return self.reader.get(self._source[key])


def load_layer(
    path_or_hub_id: str | os.PathLike,
    index: int = -1,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    logical_axis_rules=parallel.DEFAULT_RULES,
    revision: str | None = None,
) -> tuple[nn.Module, dict]:
    """Decoder layer `index` of a checkpoint, as (module, params), reading nothing else.

    Args:
      path_or_hub_id: a checkpoint directory, hub id, `asset:` name or GGUF file of a decoder
        family (llama, mistral, qwen2, gemma2, falcon, gpt2).
      index: the layer; negative counts from the end (-1 = the last layer, PiFi's default).
      dtype: computation dtype; param_dtype: storage dtype of the weights (default: dtype, as a
        frozen layer is usually kept in its compute dtype).
      mesh: when given, each tensor is placed straight into its sharding (the family's PARAM_AXES).
    Returns:
      (layer, params): `layer.apply({"params": params}, x [batch, length, hidden],
      attention_mask=None, positions=None, causal=True)` -> [batch, length, hidden]; `layer.config`
      is the model's config.
    Raises:
      IndexError: index outside [-num_layers, num_layers), naming the range.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    gguf_file = gguf.find_gguf(path_or_hub_id)
    hub_id = None
    if gguf_file is not None:
        reader = gguf.GGUFCheckpoint(gguf_file)
        hf_config = reader.hf_config
    else:
        directory, hub_id = _config_directory(path_or_hub_id, revision)
        hf_config = read_config(directory)
    config = registry.config_from_hf(hf_config)
    family = registry.family_for(config.model_type)
    if not hasattr(family, "decoder_layer"):
        raise ValueError(f"{config.model_type} is not a decoder family: it has no layer to plug in")
    count = config.num_layers
    if not -count <= index < count:
        raise IndexError(
            f"layer index {index} is out of range: the model has {count} layers, so valid indices "
            f"are {-count}..{count - 1}"
        )
    index %= count
    if gguf_file is None:
        if hub_id is not None:
            _download_layer_files(hub_id, revision, directory, family.LAYER_KEYS, index)
        reader = CheckpointReader(directory)
    module = family.decoder_layer(config, index, dtype, param_dtype)
    x = jnp.zeros((1, 2, config.hidden_size), dtype)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]
    abstract = _flatten(shapes)
    shardings = None
    if mesh is not None:
        shardings = parallel.param_shardings(abstract, family.PARAM_AXES, mesh, logical_axis_rules)
    flat = convert.load_params(
        LayerView(reader, family.LAYER_KEYS, index),
        abstract,
        prefix="",
        ignored=family.IGNORED_SOURCE_KEYS,
        shardings=shardings,
        in_out_kernels=in_out_kernels(family),
    )
    return module, _unflatten(flat)


def _config_directory(path_or_hub_id, revision) -> tuple[Path, str | None]:
    """(directory holding config.json, hub id or None). A hub checkpoint gets only its config
    and weight index downloaded here; the layer's shard follows once the layer is known."""
    name = str(path_or_hub_id)
    looks_local = name.startswith((".", "/", "~", assets.PREFIX)) or name.count("/") > 1
    if looks_local or Path(name).expanduser().exists():
        return resolve_checkpoint(name, revision), None  # raises if it does not exist
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(name, "config.json", revision=revision)
    except Exception as err:  # network errors come in many types; the message names the cause
        raise FileNotFoundError(
            f"{name!r} is not a local directory and its config could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {err})"
        ) from err
    return Path(config_file).parent, name


def _download_layer_files(hub_id, revision, directory: Path, layer_keys: str, index: int) -> None:
    """Downloads the index and just the shard(s) holding layer `index` (or the single file)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index_file = hf_hub_download(hub_id, _INDEX, revision=revision)
    except EntryNotFoundError:
        hf_hub_download(hub_id, _SINGLE, revision=revision)
        return
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    shards = set()
    for key, shard in weight_map.items():
        match = re.fullmatch(layer_keys, key)
        if match and int(match.group(1)) == index:
            shards.add(shard)
    for shard in sorted(shards):
        hf_hub_download(hub_id, shard, revision=revision)
    if Path(index_file).parent != directory:
        raise RuntimeError(f"hub files of {hub_id} landed in different snapshots")
