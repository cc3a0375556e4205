"""The bridge of an encoder-decoder (T5) LLM: its Fisher-pruned miniature, a T5 checkpoint.

The rules of prune.py, with what T5 adds:

- Heads. A stack's block 0 owns the relative-attention table whose position bias every block of
  the stack adds, per head: so a stack's self-attention keeps one set of heads for all its
  blocks (the best by their Fisher summed over the blocks, the table's columns included), and
  the table keeps those heads' columns. Cross-attention has no position bias: each decoder block
  keeps its own best cross-attention heads. T5 has one head count for every attention, so each
  keeps round(n / sqrt(r)) heads of the unchanged d_kv; attention is unscaled, so nothing else
  changes.
- Width. One set of residual dimensions for the embedding, both stacks and the head; T5's norm
  is an RMSNorm, so its weights are scaled by sqrt(d / d_b) and its epsilon by d / d_b, and the
  bridge computes exactly the LLM with the dropped dimensions, heads and units zeroed (tested).
  A tied T5 scales the decoder's output by d^-0.5 before the tied head; the bridge's d_b^-0.5
  is undone by leaving the decoder's final norm weights unscaled (sqrt(d / d_b) * sqrt(d_b / d)).
- MLP units (wi, or the gated wi_0 and wi_1, with wo's rows) per block, as a decoder's.

`prune_seq2seq` reads the LLM one block at a time; `save_bridge` (prune.py) writes the result.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from pifi_jax.bridge.fisher_seq2seq import STACKS, Seq2SeqFisherScores, check_family, read_block
from pifi_jax.bridge.prune import Selection, _top
from pifi_jax.hub.pretrained import _unflatten, abstract_params, open_checkpoint
from pifi_jax.models import registry


@dataclasses.dataclass
class Seq2SeqSelection:
    """Kept indices (sorted): hidden [d_b]; per stack its self-attention heads (one set);
    per decoder block its cross-attention heads; per block its MLP units."""

    hidden: np.ndarray
    encoder_heads: np.ndarray
    decoder_heads: np.ndarray
    cross_heads: list[np.ndarray]
    encoder_ffn: list[np.ndarray]
    decoder_ffn: list[np.ndarray]

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                value.tolist() if isinstance(value, np.ndarray) else [v.tolist() for v in value]
            )
        return out

    @classmethod
    def from_json(cls, record: dict) -> Seq2SeqSelection:
        kw = {}
        for f in dataclasses.fields(cls):
            value = record[f.name]
            if value and isinstance(value[0], list):
                kw[f.name] = [np.asarray(v, np.int64) for v in value]
            else:
                kw[f.name] = np.asarray(value, np.int64)
        return cls(**kw)


def selection_from_json(record: dict):
    """A bridge.json's kept indices: a T5 bridge's Seq2SeqSelection or a decoder's Selection."""
    if "encoder_heads" in record:
        return Seq2SeqSelection.from_json(record)
    return Selection.from_json(record)


def seq2seq_sizes(config, reduction: float) -> tuple[int, int, int]:
    """(d_b, heads, d_ff_b): each dimension of the LLM divided by sqrt(reduction)."""
    if not reduction >= 1:
        raise ValueError(f"bridge reduction must be >= 1 (1 = the LLM itself), got {reduction}")
    f = math.sqrt(reduction)
    return (
        max(1, round(config.d_model / f)),
        max(1, round(config.num_heads / f)),
        max(1, round(config.d_ff / f)),
    )


def select_seq2seq(scores: Seq2SeqFisherScores, config, reduction: float) -> Seq2SeqSelection:
    """The kept indices of a bridge of `reduction` (module docstring)."""
    check_family(config)
    d_b, heads, f_b = seq2seq_sizes(config, reduction)
    return Seq2SeqSelection(
        hidden=_top(scores.hidden, d_b),
        encoder_heads=_top(scores.encoder_heads.sum(axis=0), heads),
        decoder_heads=_top(scores.decoder_heads.sum(axis=0), heads),
        cross_heads=[_top(row, heads) for row in scores.cross_heads],
        encoder_ffn=[_top(row, f_b) for row in scores.encoder_ffn],
        decoder_ffn=[_top(row, f_b) for row in scores.decoder_ffn],
    )


def seq2seq_bridge_config(config, selection: Seq2SeqSelection):
    d, d_b = config.d_model, len(selection.hidden)
    return dataclasses.replace(
        config,
        d_model=d_b,
        d_ff=len(selection.encoder_ffn[0]),
        num_heads=len(selection.encoder_heads),
        layer_norm_epsilon=config.layer_norm_epsilon * d / d_b,
    )


def head_columns(heads: np.ndarray, d_kv: int) -> np.ndarray:
    """The projection columns of `heads` (each d_kv wide)."""
    return (np.asarray(heads)[:, None] * d_kv + np.arange(d_kv)[None]).reshape(-1)


def prune_block(flat: dict, config, selection: Seq2SeqSelection, stack: str, i: int) -> dict:
    """One block's tensors (flax paths inside the block, [in, out]) sliced for the bridge."""
    hid = selection.hidden
    norm = math.sqrt(config.d_model / len(hid))
    self_heads = selection.encoder_heads if stack == "encoder" else selection.decoder_heads
    units = (selection.encoder_ffn if stack == "encoder" else selection.decoder_ffn)[i]
    out = {}
    for path, value in flat.items():
        value = np.asarray(value)
        parts = path.split("/")
        if parts[-2:] == ["layer_norm", "scale"]:
            out[path] = value[hid] * norm
        elif parts[-2] == "relative_attention_bias":  # [buckets, heads]
            out[path] = value[:, self_heads]
        elif parts[1] in ("SelfAttention", "EncDecAttention"):
            heads = self_heads if parts[1] == "SelfAttention" else selection.cross_heads[i]
            cols = head_columns(heads, config.d_kv)
            out[path] = value[np.ix_(cols, hid)] if parts[2] == "o" else value[np.ix_(hid, cols)]
        elif parts[1] == "DenseReluDense":
            out[path] = value[np.ix_(units, hid)] if parts[2] == "wo" else value[np.ix_(hid, units)]
        else:
            raise ValueError(f"prune_block: no rule for the {stack} block tensor {path!r}")
    return out


def prune_seq2seq(checkpoint: str, selection: Seq2SeqSelection, *, log=print):
    """(bridge module, params): the T5 model of `checkpoint` pruned to `selection`, read one
    block at a time."""
    reader, hf_config = open_checkpoint(checkpoint)
    config = registry.config_from_hf(hf_config)
    check_family(config)
    family = registry.family_for(config.model_type)
    config = family.config_for_checkpoint(config, reader)
    new_config = seq2seq_bridge_config(config, selection)
    hid = selection.hidden
    norm = math.sqrt(config.d_model / len(hid))
    # the tied head's d^-0.5: the bridge's own d_b^-0.5 is undone in the decoder's final norm
    head = math.sqrt(len(hid) / config.d_model) if config.scale_decoder_outputs else 1.0
    flat = {
        "shared/embedding": np.asarray(reader.get("shared.weight"), np.float32)[:, hid],
        "encoder/final_layer_norm/scale": np.asarray(
            reader.get("encoder.final_layer_norm.weight"), np.float32
        )[hid]
        * norm,
        "decoder/final_layer_norm/scale": np.asarray(
            reader.get("decoder.final_layer_norm.weight"), np.float32
        )[hid]
        * norm
        * head,
    }
    if not config.tie_word_embeddings:
        flat["lm_head/kernel"] = np.asarray(reader.get("lm_head.weight"), np.float32)[:, hid].T
    for stack in STACKS:
        depth = config.num_decoder_layers if stack == "decoder" else config.num_encoder_layers
        for i in range(depth):
            _, block = read_block(reader, config, stack, i)
            for path, value in prune_block(block, config, selection, stack, i).items():
                flat[f"{stack}/block_{i}/{path}"] = value
            log(f"bridge: pruned {stack} block {i + 1}/{depth}")
    bridge = family.build(new_config, "seq2seq", 0, jnp.float32, jnp.float32)
    want = abstract_params(bridge)
    if set(want) != set(flat):
        raise AssertionError(f"bridge tensors differ: {sorted(set(want) ^ set(flat))[:6]}")
    for path, shape in want.items():
        if tuple(flat[path].shape) != tuple(shape.shape):
            raise AssertionError(f"bridge tensor {path}: {flat[path].shape} != {shape.shape}")
    return bridge, _unflatten({p: jnp.asarray(v) for p, v in flat.items()})
