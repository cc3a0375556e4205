"""The bridge model: a Fisher-pruned miniature of the LLM, saved as a checkpoint of its family.

Choices where the paper (Jin et al., EMNLP 2023) is silent, and why:

- What the reduction factor r divides. The paper keeps "the top d/r rows and columns" of each
  matrix but reports bridges of about 1/16 of the LLM's parameters at r = 16 (GPT2-XL 1.5B ->
  96M, T5-3B -> 185M, T5-XXL 11B -> 688M). Both fit r dividing each matrix's SIZE, so each of
  its two dimensions shrinks by sqrt(r): that is what `bridge_sizes` does (r = 1: the LLM).
- One index set along the residual stream. The kept hidden dimensions are those with the largest
  summed Fisher over every tensor that reads or writes the stream (fisher.py `hidden`), the same
  for the embedding, every layer and the LM head, so residual additions line up.
- Heads and GQA groups whole. Per layer, the key/value groups with the largest Fisher (their k
  and v blocks plus their query heads') are kept, and in each kept group the same number of its
  query heads, the best by their q and o blocks; head_dim and RoPE are unchanged. MLP units are
  kept per layer by their gate, up and down Fisher. Kept indices stay in their original order.
- Norms. Kept dimensions of a pruned stream are the dense stream with the others at zero, except
  that RMSNorm's mean runs over d_b dimensions instead of d. Scaling every RMSNorm weight by
  sqrt(d / d_b) and its epsilon by d / d_b makes the two equal exactly, so the bridge computes
  the LLM with the dropped dimensions, heads and units zeroed (tested): it starts as a faithful
  sub-network of the LLM rather than a rescaled one.

The pruning reads the LLM one layer at a time (hub readers), so its memory is one layer plus the
bridge being built. `save_bridge` writes config.json + model.safetensors (+ the LLM's tokenizer
files when it has them) that `pifi_jax.from_pretrained` and transformers load like any checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from pifi_jax.bridge.fisher import (
    FisherScores,
    check_family,
    non_layer_abstract,
    read_layer,
    read_non_layer,
)
from pifi_jax.hub.pretrained import (
    _flatten,
    _unflatten,
    abstract_params,
    open_checkpoint,
    save_pretrained,
)
from pifi_jax.models import llama, registry

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class BridgeSizes:
    hidden: int
    intermediate: int
    kv_groups: int
    heads_per_group: int

    @property
    def heads(self) -> int:
        return self.kv_groups * self.heads_per_group


def bridge_sizes(config, reduction: float) -> BridgeSizes:
    """Each dimension of the LLM divided by sqrt(reduction), at least one of everything."""
    if not reduction >= 1:
        raise ValueError(f"bridge reduction must be >= 1 (1 = the LLM itself), got {reduction}")
    f = math.sqrt(reduction)
    group = config.num_attention_heads // config.num_key_value_heads
    kv = max(1, round(config.num_key_value_heads / f))
    per_group = max(1, round(config.num_attention_heads / f / kv))
    return BridgeSizes(
        hidden=max(1, round(config.hidden_size / f)),
        intermediate=max(1, round(config.intermediate_size / f)),
        kv_groups=kv,
        heads_per_group=min(group, per_group),
    )


@dataclasses.dataclass
class Selection:
    """Kept indices (sorted): hidden [d_b]; per layer: kv groups, query heads, MLP units."""

    hidden: np.ndarray
    kv_groups: list[np.ndarray]
    q_heads: list[np.ndarray]
    ffn: list[np.ndarray]

    def to_json(self) -> dict:
        return {
            "hidden": self.hidden.tolist(),
            "kv_groups": [g.tolist() for g in self.kv_groups],
            "q_heads": [h.tolist() for h in self.q_heads],
            "ffn": [u.tolist() for u in self.ffn],
        }

    @classmethod
    def from_json(cls, record: dict) -> Selection:
        arr = lambda xs: [np.asarray(x, np.int64) for x in xs]  # noqa: E731
        return cls(
            np.asarray(record["hidden"], np.int64),
            arr(record["kv_groups"]),
            arr(record["q_heads"]),
            arr(record["ffn"]),
        )


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties to the lower index, returned sorted."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return np.sort(order[:k])


def select(scores: FisherScores, config, reduction: float) -> Selection:
    """The kept indices for a bridge of `reduction` (see the module docstring)."""
    sizes = bridge_sizes(config, reduction)
    group = config.num_attention_heads // config.num_key_value_heads
    kv_kept, q_kept, ffn_kept = [], [], []
    for i in range(config.num_layers):
        q = scores.q_heads[i]
        per_group = scores.kv_groups[i] + q.reshape(-1, group).sum(axis=1)
        groups = _top(per_group, sizes.kv_groups)
        heads = [
            g * group + _top(q[g * group : (g + 1) * group], sizes.heads_per_group) for g in groups
        ]
        kv_kept.append(groups)
        q_kept.append(np.concatenate(heads))
        ffn_kept.append(_top(scores.ffn[i], sizes.intermediate))
    return Selection(_top(scores.hidden, sizes.hidden), kv_kept, q_kept, ffn_kept)


def bridge_config(config, selection: Selection):
    d, d_b = config.hidden_size, len(selection.hidden)
    return dataclasses.replace(
        config,
        hidden_size=d_b,
        intermediate_size=len(selection.ffn[0]),
        num_attention_heads=len(selection.q_heads[0]),
        num_key_value_heads=len(selection.kv_groups[0]),
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps * d / d_b,
    )


def _head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
    return (heads[:, None] * head_dim + np.arange(head_dim)[None]).reshape(-1)


def prune_layer(flat: dict[str, np.ndarray], config, selection: Selection, i: int) -> dict:
    """One layer's tensors (flax paths inside the layer, [in, out]) sliced for the bridge."""
    hid = selection.hidden
    q_cols = _head_columns(selection.q_heads[i], config.head_dim)
    kv_cols = _head_columns(selection.kv_groups[i], config.head_dim)
    units = selection.ffn[i]
    norm = math.sqrt(config.hidden_size / len(hid))
    out_cols = {"q_proj": q_cols, "k_proj": kv_cols, "v_proj": kv_cols, "gate_proj": units}
    out_cols["up_proj"] = units
    in_rows = {"o_proj": q_cols, "down_proj": units}
    pruned = {}
    for path, value in flat.items():
        value = np.asarray(value)
        module, leaf = path.rsplit("/", 1)
        name = module.rsplit("/", 1)[-1]
        if leaf == "scale":
            pruned[path] = value[hid] * norm
        elif name in out_cols:
            cols = out_cols[name]
            pruned[path] = value[np.ix_(hid, cols)] if leaf == "kernel" else value[cols]
        elif name in in_rows:
            pruned[path] = value[np.ix_(in_rows[name], hid)] if leaf == "kernel" else value[hid]
        else:
            raise ValueError(f"prune_layer: no rule for the layer tensor {path!r}")
    return pruned


def prune(checkpoint: str, selection: Selection, *, log=print):
    """(bridge module, params): the causal LM of `checkpoint` pruned to `selection`, built one
    layer at a time."""
    reader, hf_config = open_checkpoint(checkpoint)
    config = registry.config_from_hf(hf_config)
    check_family(config)
    family = registry.family_for(config.model_type)
    new_config = bridge_config(config, selection)
    stack = f"model/{llama.LAYER_STACK}_"
    head = read_non_layer(reader, family, config, non_layer_abstract(family, config), log=log)
    hid = selection.hidden
    norm = math.sqrt(config.hidden_size / len(hid))
    flat = {
        "model/embed_tokens/embedding": np.asarray(head["model/embed_tokens/embedding"])[:, hid],
        "model/norm/scale": np.asarray(head["model/norm/scale"])[hid] * norm,
    }
    if "lm_head/kernel" in head:
        flat["lm_head/kernel"] = np.asarray(head["lm_head/kernel"])[hid]
    del head
    for i in range(config.num_layers):
        _, layer = read_layer(reader, family, config, i)
        for path, value in prune_layer(layer, config, selection, i).items():
            flat[f"{stack}{i}/{path}"] = value
        log(f"bridge: pruned layer {i + 1}/{config.num_layers}")
    bridge = family.build(new_config, "causal_lm", 0, jnp.float32, jnp.float32)
    want = abstract_params(bridge)
    for path, shape in want.items():
        if tuple(flat[path].shape) != tuple(shape.shape):
            raise AssertionError(f"bridge tensor {path}: {flat[path].shape} != {shape.shape}")
    return bridge, _unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def _tokenizer_source(checkpoint: str) -> Path | None:
    from pifi_jax import assets

    name = str(checkpoint)
    if name.startswith(assets.PREFIX):
        name = str(assets.locate(name))
    path = Path(name).expanduser()
    return path if path.exists() else None


def save_bridge(
    bridge,
    params,
    directory: str | os.PathLike,
    *,
    llm: str,
    selection: Selection,
    reduction: float,
    scores: FisherScores | None = None,
) -> Path:
    """Writes the bridge as a checkpoint of the LLM's family, its tokenizer (copied from the LLM's
    directory, or exported from a GGUF file) and `bridge.json` (the LLM, r and the kept indices)."""
    directory = Path(directory)
    save_pretrained(bridge, params, directory)
    source = _tokenizer_source(llm)
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, directory / name)
    elif source is not None and source.suffix == ".gguf":
        from pifi_jax.data.tokenize import load_tokenizer

        load_tokenizer(str(source)).save_pretrained(str(directory))
    record = {
        "llm": str(llm),
        "reduction": reduction,
        "params": int(sum(np.prod(np.shape(v)) for v in _flatten(params).values())),
        "selection": selection.to_json(),
    }
    if scores is not None:
        record["fisher_examples"] = scores.examples
    (directory / "bridge.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return directory
