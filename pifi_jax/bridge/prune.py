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
  sub-network of the LLM rather than a rescaled one. No such identity exists for LayerNorm
  (GPT-2): its mean is subtracted before the variance, and both run over the kept dimensions
  only, which no weight scaling undoes. Its weights and biases are sliced unchanged, so a GPT-2
  bridge is the LLM's sub-network exactly in its heads and MLP units (tested, the residual
  stream kept whole) and an approximation in the stream's width, re-normalised over what it
  keeps. GPT-2's head_dim is n_embd / n_head, so its bridge is (kept heads x head_dim) wide.
- Which tensor axis is the stream, a head or a unit: arch.py's table per family.

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

from pifi_jax.bridge import arch as arch_lib
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
from pifi_jax.models import registry

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
    """Each dimension of the LLM divided by sqrt(reduction), at least one of everything (a
    family whose head_dim is width / heads: the width follows the kept heads)."""
    if not reduction >= 1:
        raise ValueError(f"bridge reduction must be >= 1 (1 = the LLM itself), got {reduction}")
    arch = check_family(config)
    dims = arch.dims(config)
    f = math.sqrt(reduction)
    group = dims.heads // dims.kv_heads
    kv = max(1, round(dims.kv_heads / f))
    per_group = min(group, max(1, round(dims.heads / f / kv)))
    hidden = max(1, round(dims.hidden / f))
    if arch.tied_head_dim:
        hidden = kv * per_group * dims.head_dim
    return BridgeSizes(
        hidden=hidden,
        intermediate=max(1, round(dims.ffn / f)),
        kv_groups=kv,
        heads_per_group=per_group,
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
    dims = check_family(config).dims(config)
    group = dims.heads // dims.kv_heads
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
    return check_family(config).shrunk(
        config,
        len(selection.hidden),
        len(selection.q_heads[0]),
        len(selection.kv_groups[0]),
        len(selection.ffn[0]),
    )


def _norm_factor(arch, config, selection: Selection) -> float:
    """What RMSNorm weights are multiplied by (see the module docstring); 1 for LayerNorm."""
    return math.sqrt(arch.dims(config).hidden / len(selection.hidden)) if arch.rms_norm else 1.0


def prune_layer(flat: dict[str, np.ndarray], config, selection: Selection, i: int) -> dict:
    """One layer's tensors (flax paths inside the layer, [in, out]) sliced for the bridge."""
    arch = check_family(config)
    dims = arch.dims(config)
    hid = selection.hidden
    norm = _norm_factor(arch, config, selection)
    pruned = {}
    for path, value in flat.items():
        value = np.asarray(value)
        rule = arch.rule(path)
        if rule is None:  # a norm's weight (RMSNorm: rescaled) or a LayerNorm's bias
            pruned[path] = value[hid] * (norm if path.endswith("/scale") else 1.0)
            continue
        rows, columns = rule
        cols = arch_lib.kept_columns(arch, selection, dims, columns, i)
        if path.endswith("/kernel"):
            pruned[path] = value[np.ix_(arch_lib.kept_indices(selection, dims, rows, i), cols)]
        else:
            pruned[path] = value[cols]
    return pruned


def prune(checkpoint: str, selection: Selection, *, log=print):
    """(bridge module, params): the causal LM of `checkpoint` pruned to `selection`, built one
    layer at a time."""
    reader, hf_config = open_checkpoint(checkpoint)
    config = registry.config_from_hf(hf_config)
    arch = check_family(config)
    family = registry.family_for(config.model_type)
    new_config = bridge_config(config, selection)
    head = read_non_layer(reader, family, config, non_layer_abstract(family, config), log=log)
    hid = selection.hidden
    norm = _norm_factor(arch, config, selection)
    flat = {}
    for path, value in head.items():
        value = np.asarray(value)
        if path in (arch.embed, arch.position_embed):  # [rows, d]
            flat[path] = value[:, hid]
        elif path == "lm_head/kernel":  # [d, vocab]
            flat[path] = value[hid]
        elif path.startswith(arch.final_norm + "/"):
            flat[path] = value[hid] * (norm if path.endswith("/scale") else 1.0)
        else:
            raise ValueError(f"prune: no rule for the tensor {path!r}")
    del head
    for i in range(config.num_layers):
        _, layer = read_layer(reader, family, config, i)
        for path, value in prune_layer(layer, config, selection, i).items():
            flat[f"{arch.layer_path(i)}/{path}"] = value
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
