"""Empirical Fisher importance of an encoder-decoder (T5) LLM on task data, one block at a time.

The same quantity as fisher.py, H = mean over examples of (d log p(target | source) / dW)^2,
for a T5 model (the paper's t5-base -> t5-3b, t5-large -> t5-11b pairs), where the loss is that
of train/objectives.Seq2Seq: every real target token, the decoder fed the target shifted right
behind decoder_start_token_id.

What differs from a decoder, and how the pass keeps to one block at a time:
  - Two stacks. Forward: the encoder's blocks, its final norm (the memory), then the decoder's
    blocks, each read alone from the checkpoint and dropped; the states at every block boundary
    of both stacks stay on the host. Backward: the head, the decoder's blocks from the top (each
    read again), the encoder's final norm, the encoder's blocks from the top.
  - Cross-attention. Every decoder block reads the memory: each example's cotangent of the
    memory is summed over the decoder blocks before the encoder's backward starts.
  - The position bias. A stack's block 0 owns the relative-attention table and computes the
    position bias [heads, q, kv] that every later block of the stack adds; each example's
    cotangent of the bias is summed over the later blocks (top down) and given to block 0's
    backward with its output's, so the table's gradient holds every block's use.
  - The shared embedding has up to three uses in an example's gradient (the source tokens, the
    decoder's input tokens, the tied head): the two lookups are scattered into one sparse row
    gradient and the head's dense gradient enters its square as in fisher.py, without forming
    the [vocab, d] gradient.

Reduced at once (`reduce_block`), as the bridge needs it (what seq2seq_bridge.py keeps):
  hidden [d]                the residual stream of both stacks (one index set for the model):
                            the embedding's columns, every norm's weights, the input rows of q,
                            k, v and wi, the output columns of o and wo, the LM head's rows;
  encoder_heads [L_e, n]    a self-attention head of an encoder block: its q, k, v columns, its
                            o rows and (block 0) its column of the relative-attention table;
  decoder_heads [L_d, n]    the same for the decoder's self-attention;
  cross_heads [L_d, n]      a cross-attention head: its q, k, v columns and o rows;
  encoder_ffn [L_e, f], decoder_ffn [L_d, f]    an MLP unit: its wi (wi_0, wi_1) column, wo row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.bridge.fisher import (
    _blocks,
    _example_head,
    _scatter_square,
    load_scores,
    output_rows,
    save_scores,
)
from pifi_jax.hub import convert
from pifi_jax.hub.layer import LayerView
from pifi_jax.hub.pretrained import _flatten, _unflatten, open_checkpoint
from pifi_jax.layers import RMSNorm
from pifi_jax.models import registry, t5

STACKS = ("encoder", "decoder")
SCORES = ("hidden", "encoder_heads", "decoder_heads", "cross_heads", "encoder_ffn", "decoder_ffn")
# Tensors inside a block (flax paths) that no rule covers are refused (reduce_block).
_ATTENTION = re.compile(r"layer_\d/(SelfAttention|EncDecAttention)/(q|k|v|o)/kernel")
_TABLE = "layer_0/SelfAttention/relative_attention_bias/embedding"
_FFN = re.compile(r"layer_\d/DenseReluDense/(wi|wi_0|wi_1|wo)/kernel")
_NORM = re.compile(r"layer_\d/layer_norm/scale")


@dataclasses.dataclass
class Seq2SeqFisherScores:
    """Fisher importance of an encoder-decoder's prunable dimensions (module docstring)."""

    model_type: str
    scores: dict[str, np.ndarray]  # SCORES -> array
    examples: int
    full: dict[str, np.ndarray] | None = None  # flax path -> H (keep_full=True; tiny models)

    def __getattr__(self, name):
        if name in SCORES:
            return self.scores[name]
        raise AttributeError(name)

    def save(self, path: str | Path) -> Path:
        return save_scores(path, self.model_type, self.examples, self.scores)

    @classmethod
    def load(cls, path: str | Path) -> Seq2SeqFisherScores:
        model_type, examples, scores = load_scores(
            path, SCORES, "an encoder-decoder Fisher score file"
        )
        return cls(model_type, scores, examples)


def check_family(config) -> None:
    if config.model_type not in t5.MODEL_TYPES:
        raise ValueError(
            f"encoder-decoder bridge pruning supports {t5.MODEL_TYPES}; the checkpoint is "
            f"{config.model_type!r}"
        )


def reduce_block(fisher: dict[str, np.ndarray], config, is_decoder: bool) -> dict:
    """{score name: [units]} of one block's H (flax paths inside the block, [in, out])."""
    stack = "decoder" if is_decoder else "encoder"
    n, hd = config.num_heads, config.d_kv
    out = {
        "hidden": np.zeros(config.d_model),
        f"{stack}_heads": np.zeros(n),
        f"{stack}_ffn": np.zeros(config.d_ff),
    }
    if is_decoder:
        out["cross_heads"] = np.zeros(n)
    for path, h in fisher.items():
        h = np.asarray(h, np.float64)
        if _NORM.fullmatch(path):
            out["hidden"] += h
        elif path == _TABLE:  # [buckets, heads]
            out[f"{stack}_heads"] += h.sum(axis=0)
        elif match := _ATTENTION.fullmatch(path):
            heads = "cross_heads" if match.group(1) == "EncDecAttention" else f"{stack}_heads"
            if match.group(2) == "o":  # [heads x d_kv, d]
                out[heads] += _blocks(h, hd, 0)
                out["hidden"] += h.sum(axis=0)
            else:  # [d, heads x d_kv]
                out[heads] += _blocks(h, hd, 1)
                out["hidden"] += h.sum(axis=1)
        elif match := _FFN.fullmatch(path):
            if match.group(1) == "wo":  # [f, d]
                out[f"{stack}_ffn"] += h.sum(axis=1)
                out["hidden"] += h.sum(axis=0)
            else:  # [d, f]
                out[f"{stack}_ffn"] += h.sum(axis=0)
                out["hidden"] += h.sum(axis=1)
        else:
            raise ValueError(f"reduce_block: no rule for the {stack} block tensor {path!r}")
    return out


def _block_module(config, is_decoder: bool, first: bool):
    return t5.T5Block(config, is_decoder, first, jnp.float32, jnp.float32)


def read_block(reader, config, stack: str, index: int):
    """(block module, flat float32 params) of `stack` block `index`, reading only its tensors."""
    is_decoder = stack == "decoder"
    module = _block_module(config, is_decoder, index == 0)
    x = jnp.zeros((1, 2, config.d_model), jnp.float32)
    mask = jnp.ones((1, 2), jnp.int32)
    bias = None if index == 0 else jnp.zeros((1, config.num_heads, 2, 2), jnp.float32)
    kwargs = dict(memory=x, source_mask=mask) if is_decoder else {}
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), x, mask, bias, True, **kwargs)
    )["params"]
    # the unused table old checkpoints carry for decoder block 0's cross-attention
    ignored = (r"layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
    flat = convert.load_params(
        LayerView(reader, rf"{stack}\.block\.(\d+)\.(.+)", index),
        _flatten(shapes),
        prefix="",
        ignored=ignored,
        log=lambda s: None,
    )
    return module, flat


def _apply(module, params, x, mask, bias, memory=None, source_mask=None):
    """A block's (output, position bias) for a batch; block 0 computes the bias (bias=None)."""
    kwargs = {} if memory is None else dict(memory=memory, source_mask=source_mask)
    out, position_bias, _, _ = module.apply({"params": params}, x, mask, bias, True, **kwargs)
    return out, position_bias


class _BlockFns:
    """Jitted forward and per-example backward of a block kind (encoder / decoder, first / not)."""

    def __init__(self):
        self._fns = {}

    def get(self, module, is_decoder: bool, first: bool):
        key = (is_decoder, first)
        if key in self._fns:
            return self._fns[key]

        def forward(params, x, mask, bias, memory, source_mask):
            return _apply(module, params, x, mask, bias, memory, source_mask)

        def backward(params, acc, x, mask, bias, memory, source_mask, cot, bias_cot):
            """Per example: squared weight gradients into acc, and the cotangents of the
            block's input, of the position bias it was given (later blocks) and of the memory
            (decoder). bias_cot: the cotangent of the bias block 0 outputs."""

            def one(acc, inputs):
                x_e, m_e, mem_e, sm_e, c_e, bc_e = inputs

                def f(p, x1, b1, mem1):
                    out, pb = _apply(
                        module,
                        p,
                        x1[None],
                        m_e[None],
                        None if first else b1,
                        None if mem1 is None else mem1[None],
                        None if mem1 is None else sm_e[None],
                    )
                    return out[0], pb

                _, vjp = jax.vjp(f, params, x_e, bias, mem_e)
                g_p, g_x, g_b, g_mem = vjp((c_e, bc_e))
                acc = jax.tree.map(lambda a, g: a + g * g, acc, g_p)
                return acc, (g_x, g_b, g_mem)

            return jax.lax.scan(one, acc, (x, mask, memory, source_mask, cot, bias_cot))

        self._fns[key] = (jax.jit(forward), jax.jit(backward, donate_argnums=1))
        return self._fns[key]


def decoder_inputs(config, target_ids):
    """The decoder's inputs [batch, target]: the targets shifted right behind the start token
    (NumPy in, NumPy out; a jax array, traced or not, gives a jax array)."""
    xp = np if isinstance(target_ids, np.ndarray) else jnp
    start = xp.full((target_ids.shape[0], 1), config.decoder_start_token_id, target_ids.dtype)
    return xp.concatenate([start, target_ids[:, :-1]], axis=1)


def seq2seq_fisher_scores(
    checkpoint: str,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    keep_full: bool = False,
    log=print,
) -> Seq2SeqFisherScores:
    """Fisher importance of an encoder-decoder `checkpoint` on seq2seq `batches` (dicts of numpy
    input_ids / attention_mask [batch, source] and target_ids / target_mask [batch, target], the
    Seq2Seq objective's layout). keep_full: also every tensor's H in `.full` (tiny models)."""
    reader, hf_config = open_checkpoint(checkpoint)
    config = registry.config_from_hf(hf_config)
    check_family(config)
    family = registry.family_for(config.model_type)
    config = family.config_for_checkpoint(config, reader)
    tied = bool(config.tie_word_embeddings)
    d = config.d_model

    def read(key):
        return output_rows(reader, key)

    shared = read("shared.weight")  # [vocab, d]
    norm_e = {"scale": read("encoder.final_layer_norm.weight")}
    norm_d = {"scale": read("decoder.final_layer_norm.weight")}

    data = []
    for b in batches:
        item = {k: np.asarray(b[k]) for k in ("input_ids", "attention_mask", "target_ids")}
        item["target_mask"] = np.asarray(b["target_mask"])
        item["decoder_ids"] = decoder_inputs(config, item["target_ids"])
        data.append(item)
    if not data:
        raise ValueError("seq2seq_fisher_scores: no batches")
    examples = sum(int((b["target_mask"] > 0).any(axis=1).sum()) for b in data)
    if examples == 0:
        raise ValueError("seq2seq_fisher_scores: no example has a target token")
    layers = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    fns = _BlockFns()
    norm = RMSNorm(config.layer_norm_epsilon)
    final = jax.jit(lambda p, x: norm.apply({"params": p}, x))
    embed = jax.jit(lambda e, ids: e[ids])

    # 1. forward through both stacks, keeping every block boundary (and each batch's bias)
    memory_of: list[np.ndarray] = []  # the encoder's output per batch, the decoder's memory
    states = {s: [] for s in STACKS}
    biases = {s: [None] * len(data) for s in STACKS}
    for stack in STACKS:
        is_decoder = stack == "decoder"
        ids_key = "decoder_ids" if is_decoder else "input_ids"
        mask_key = "target_mask" if is_decoder else "attention_mask"
        current = [np.asarray(embed(shared, b[ids_key])) for b in data]
        states[stack].append(current)
        for i in range(layers[stack]):
            module, flat = read_block(reader, config, stack, i)
            forward, _ = fns.get(module, is_decoder, i == 0)
            params = _unflatten(flat)
            nxt = []
            for k, b in enumerate(data):
                memory = memory_of[k] if is_decoder else None
                out, bias = forward(
                    params,
                    current[k],
                    b[mask_key],
                    biases[stack][k],
                    memory,
                    b["attention_mask"] if is_decoder else None,
                )
                if i == 0:
                    biases[stack][k] = np.asarray(bias)
                nxt.append(np.asarray(out))
            current = nxt
            states[stack].append(current)
            del params, flat
            log(f"fisher: forward through {stack} block {i + 1}/{layers[stack]}")
        if not is_decoder:
            memory_of = [np.asarray(final(norm_e, x)) for x in current]

    # 2. the head: decoder final norm (x d^-0.5 when tied) and the output matrix
    w = shared if tied else read("lm_head.weight")  # [vocab, d] either way
    factor = d**-0.5 if config.scale_decoder_outputs else 1.0
    head_norm = RMSNorm(config.layer_norm_epsilon)

    class _ScaledNorm:  # the norm and the output scaling as one "norm" for _example_head
        @staticmethod
        def apply(variables, x):
            return head_norm.apply(variables, x) * factor

    def head_backward(norm_params, w, acc, h, ids, rows_ids, loss_mask):
        def one(acc, inputs):
            h_e, ids_e, rows_e, m_e = inputs
            # _example_head scores position t against token t + 1: put the targets behind a
            # dummy first slot so that logits t predict target t
            padded_ids = jnp.concatenate([ids_e[:1], ids_e])
            padded_mask = jnp.concatenate([m_e[:1] * 0, m_e])
            h_pad = jnp.concatenate([h_e, h_e[:1]])
            # rows: the tied head's gradient at the rows the example's two lookups touch
            sq, w_rows, w_full, g_h, rows = _example_head(
                _ScaledNorm, norm_params, w, h_pad, padded_ids, padded_mask, keep_full, rows_e
            )
            acc = (jax.tree.map(jnp.add, acc[0], sq), acc[1] + w_rows, acc[2] + w_full)
            return acc, (g_h[:-1], rows)

        return jax.lax.scan(one, acc, (h, ids, rows_ids, loss_mask))

    head_backward = jax.jit(head_backward, donate_argnums=2)
    full_shape = w.shape if keep_full else (0,)
    acc = (jax.tree.map(jnp.zeros_like, norm_d), jnp.zeros(d), jnp.zeros(full_shape))
    cots, head_rows = [], []
    for k, b in enumerate(data):
        rows_ids = np.concatenate([b["input_ids"], b["decoder_ids"]], axis=1)
        acc, (g_h, rows) = head_backward(
            norm_d,
            w,
            acc,
            states["decoder"][-1][k],
            b["target_ids"],
            rows_ids,
            b["target_mask"].astype(np.float32),
        )
        cots.append(np.asarray(g_h))
        head_rows.append(np.asarray(rows))
    norm_d_sq = {leaf: np.asarray(v, np.float64) for leaf, v in acc[0].items()}
    w_rows, w_full = (np.asarray(a, np.float64) for a in acc[1:])
    del w, acc
    states["decoder"].pop()

    # 3. backward: decoder blocks, the encoder's final norm, encoder blocks
    scores = {
        "hidden": np.zeros(d),
        "encoder_heads": np.zeros((layers["encoder"], config.num_heads)),
        "decoder_heads": np.zeros((layers["decoder"], config.num_heads)),
        "cross_heads": np.zeros((layers["decoder"], config.num_heads)),
        "encoder_ffn": np.zeros((layers["encoder"], config.d_ff)),
        "decoder_ffn": np.zeros((layers["decoder"], config.d_ff)),
    }
    full: dict[str, np.ndarray] = {}
    input_cots = {}
    # per example: the encoder's final norm's weight gradient and its input's cotangent
    norm_backward = jax.jit(
        jax.vmap(lambda p, x1, c1: jax.vjp(final, p, x1)[1](c1), in_axes=(None, 0, 0))
    )
    memory_cots = [np.zeros_like(m) for m in memory_of]
    for stack in reversed(STACKS):
        is_decoder = stack == "decoder"
        mask_key = "target_mask" if is_decoder else "attention_mask"
        # per example [batch, 1, heads, q, kv]: what later blocks send back to block 0's bias
        bias_cots = [
            np.zeros((len(x),) + b.shape, np.float32)
            for x, b in zip(states[stack][0], biases[stack], strict=True)
        ]
        if not is_decoder:  # the memory's cotangent through the encoder's final norm
            norm_sq = jax.tree.map(jnp.zeros_like, norm_e)
            for k in range(len(data)):
                x = states["encoder"][-1][k]
                g_p, g_x = norm_backward(norm_e, x, memory_cots[k])
                norm_sq = jax.tree.map(lambda a, g: a + (g * g).sum(axis=0), norm_sq, g_p)
                cots[k] = np.asarray(g_x)
            for leaf, v in norm_sq.items():
                scores["hidden"] += np.asarray(v, np.float64) / examples
                if keep_full:
                    full[f"encoder/final_layer_norm/{leaf}"] = np.asarray(v) / examples
            states["encoder"].pop()
        for i in reversed(range(layers[stack])):
            module, flat = read_block(reader, config, stack, i)
            _, backward = fns.get(module, is_decoder, i == 0)
            params = _unflatten(flat)
            acc = jax.tree.map(jnp.zeros_like, params)
            inputs = states[stack].pop()
            for k, b in enumerate(data):
                bias = jnp.zeros((1, 1, 1, 1)) if i == 0 else biases[stack][k]
                acc, (g_x, g_b, g_mem) = backward(
                    params,
                    acc,
                    inputs[k],
                    b[mask_key],
                    bias,
                    memory_of[k] if is_decoder else None,
                    b["attention_mask"] if is_decoder else None,
                    cots[k],
                    bias_cots[k] if i == 0 else np.zeros_like(bias_cots[k]),
                )
                cots[k] = np.asarray(g_x)
                if i > 0:
                    bias_cots[k] += np.asarray(g_b)
                if is_decoder:
                    memory_cots[k] += np.asarray(g_mem)
            block_h = {p: np.asarray(v) / examples for p, v in _flatten(acc).items()}
            for name, value in reduce_block(block_h, config, is_decoder).items():
                if name == "hidden":
                    scores["hidden"] += value
                else:
                    scores[name][i] += value
            if keep_full:
                full.update({f"{stack}/block_{i}/{p}": v for p, v in block_h.items()})
            del params, flat, acc, inputs
            log(f"fisher: backward through {stack} block {i + 1}/{layers[stack]}")
        input_cots[stack] = cots
        if is_decoder:
            cots = [None] * len(data)

    # 4. the shared embedding: source and decoder lookups (and the tied head)
    column_sq = w_rows.copy() if tied else np.zeros(d)
    embed_full = None
    if keep_full:
        embed_full = w_full.copy() if tied else np.zeros((config.vocab_size, d))
    for k, b in enumerate(data):
        for e in range(b["input_ids"].shape[0]):
            ids = np.concatenate([b["input_ids"][e], b["decoder_ids"][e]])
            cot = np.concatenate([input_cots["encoder"][k][e], input_cots["decoder"][k][e]])
            extra = head_rows[k][e] if tied else None
            uniq, sq = _scatter_square(ids, cot, d, extra)
            column_sq += sq.sum(axis=0)
            if keep_full:
                embed_full[uniq] += sq
    scores["hidden"] += column_sq / examples
    for leaf, sq in norm_d_sq.items():
        scores["hidden"] += sq / examples
        if keep_full:
            full[f"decoder/final_layer_norm/{leaf}"] = sq / examples
    if keep_full:
        full["shared/embedding"] = embed_full / examples
    if not tied:
        scores["hidden"] += w_rows / examples
        if keep_full:
            full["lm_head/kernel"] = w_full.T / examples  # the kernel's [d, vocab]
    return Seq2SeqFisherScores(config.model_type, scores, examples, full or None)
