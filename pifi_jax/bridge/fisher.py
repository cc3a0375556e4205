"""Empirical Fisher importance of a large decoder's weights on task data, one layer at a time.

For every weight tensor W of the LLM, H = mean over examples e of (d log p(y_e | x_e) / dW)^2,
with log p(y | x) the log-likelihood of the example's target tokens (the causal-LM batch's
`loss_mask`, position t predicting token t + 1, as train/objectives.CausalLM). The gradient is
taken per example, squared, and only then averaged: the empirical Fisher, not the square of the
batch gradient.

Bounded memory. The model is never held whole:
  1. forward: the embedding, then layer by layer (each read from the checkpoint alone, as
     `load_layer` reads it, then dropped): the residual stream at every layer boundary is kept on
     the host, (L + 1) x examples x length x hidden floats;
  2. the head (final norm + LM head): per-example gradients of its weights and of its input;
  3. backward, from the last layer down: the layer is read again, each example's vector-Jacobian
     product recomputes its forward and gives that example's weight gradient (squared into an
     accumulator) and the cotangent of the layer's input; the layer is dropped.
So memory holds, besides the boundary states, the largest of: the embedding and one layer (the
forward; an untied embedding is dropped after the lookup, so there one layer); the output
matrix (LM head, or the tied embedding) and an example's logits-sized buffers (the head: the
squared gradient of the output matrix is summed over the vocabulary as normed' (delta delta')
normed, never formed as a [d, vocab] matrix); one layer's weights, one
example's gradient of them and their squared-gradient accumulator (the backward). Every layer is
read twice (forward, backward). Measured on Qwen2.5-Coder-1.5B (docs/results.md): 1.69 GiB at
the peak, 0.26x its weights, during the head's per-example gradients: 0.19 GiB above that bound
(1.50 GiB there), about what compiling the head's program takes beside its buffers.

What pruning needs is reduced from H at once (`reduce_layer`), so nothing of H's size stays:
  hidden [d]      per residual-stream dimension: the embedding's columns (and the learned
                  positions', GPT-2), every norm's weights (and LayerNorm biases), the input
                  rows of q, k, v, gate and up, the output columns (and biases) of o and down,
                  the LM head's input rows;
  q_heads [L, n_q]    per query head: its block of q's columns (and bias) and of o's rows;
  kv_groups [L, n_kv] per key/value head: its blocks of k's and v's columns (and biases);
  ffn [L, f]      per MLP unit: its gate and up columns (and biases) and its down row.
Which axis of which tensor is which comes from arch.py (GPT-2's fused c_attn is q | k | v).
Tied embeddings count once with the sum of their two uses in each example's gradient.

Families: the Llama architecture (llama, mistral, qwen2) and GPT-2 (arch.py); others are
refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.bridge import arch as arch_lib
from pifi_jax.bridge.arch import FFN, HIDDEN, KV, Q
from pifi_jax.hub import convert
from pifi_jax.hub.layer import LayerView
from pifi_jax.hub.pretrained import (
    _flatten,
    _unflatten,
    abstract_params,
    base_model_prefix,
    in_out_kernels,
    open_checkpoint,
)
from pifi_jax.layers import RMSNorm, positions_from_mask
from pifi_jax.models import registry

SUPPORTED = arch_lib.SUPPORTED


@dataclasses.dataclass
class FisherScores:
    """Fisher importance of an LLM's prunable dimensions (see the module docstring)."""

    model_type: str
    hidden: np.ndarray  # [d]
    q_heads: np.ndarray  # [layers, n_q]
    kv_groups: np.ndarray  # [layers, n_kv]
    ffn: np.ndarray  # [layers, intermediate]
    examples: int
    full: dict[str, np.ndarray] | None = None  # flax path -> H (keep_full=True; tiny models)

    def save(self, path: str | Path) -> Path:
        arrays = {k: getattr(self, k) for k in ("hidden", "q_heads", "kv_groups", "ffn")}
        return save_scores(path, self.model_type, self.examples, arrays)

    @classmethod
    def load(cls, path: str | Path) -> FisherScores:
        model_type, examples, arrays = load_scores(
            path, ("hidden", "q_heads", "kv_groups", "ffn"), "a Fisher score file"
        )
        return cls(model_type=model_type, examples=examples, **arrays)


def save_scores(path, model_type: str, examples: int, arrays: dict[str, np.ndarray]) -> Path:
    """Writes score arrays to an .npz under a temporary name, then renames it (no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, model_type=np.array(model_type), examples=np.array(examples), **arrays)
    tmp.replace(path)
    return path


def load_scores(path, names, what: str) -> tuple[str, int, dict[str, np.ndarray]]:
    """(model_type, examples, {name: array}) of a `save_scores` file; anything else refused."""
    try:
        with np.load(path) as z:
            return str(z["model_type"]), int(z["examples"]), {k: z[k] for k in names}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not {what} ({e})") from None


def check_family(config) -> arch_lib.Arch:
    """The family's tensor layout (arch.py), or a refusal naming the model type."""
    return arch_lib.arch_for(config)


def _blocks(h: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Sums of h over blocks of `width` along `axis` (and over every other axis): [n_blocks]."""
    h = np.moveaxis(h, axis, 0)
    return h.reshape(h.shape[0] // width, -1).sum(axis=1)


def reduce_layer(fisher: dict[str, np.ndarray], config) -> tuple[np.ndarray, ...]:
    """(hidden [d], q_heads [n_q], kv_groups [n_kv], ffn [f]) of one decoder layer's H, given as
    flax paths inside the layer (`self_attn/q_proj/kernel`, ...) in the [in, out] layout."""
    arch = check_family(config)
    dims = arch.dims(config)
    scores = {k: np.zeros(dims.units(k), np.float64) for k in (HIDDEN, Q, KV, FFN)}
    for path, h in fisher.items():
        h = np.asarray(h, np.float64)
        rule = arch.rule(path)
        if rule is None:  # a norm's weight
            scores[HIDDEN] += h
            continue
        rows, columns = rule
        kernel = path.endswith("/kernel")
        if kernel:
            scores[rows] += _blocks(h, dims.block(rows), 0)
        axis = 1 if kernel else 0
        for kind, start, stop in arch.segments(dims, columns):
            part = h[:, start:stop] if kernel else h[start:stop]
            scores[kind] += _blocks(part, dims.block(kind), axis)
    return scores[HIDDEN], scores[Q], scores[KV], scores[FFN]


def non_layer_abstract(family, config) -> dict:
    """The causal LM's non-layer leaves (embedding, final norm, LM head): path -> shape."""
    arch = check_family(config)
    model = family.build(config, "causal_lm", 0, jnp.float32, jnp.float32)
    return {p: s for p, s in abstract_params(model).items() if not arch.is_layer_path(p)}


def read_non_layer(reader, family, config, abstract: dict, log=print):
    """Those non-layer tensors of a checkpoint, reading no layer (a checkpoint tensor the
    abstract lacks, the LM head of an untied model, is not read: it is read after the forward
    pass, fisher_scores)."""
    layer_keys = re.compile(family.LAYER_KEYS)
    return convert.load_params(
        reader,
        abstract,
        prefix=base_model_prefix(family, config),
        ignored=family.IGNORED_SOURCE_KEYS,
        optional=family.OPTIONAL_SOURCE_KEYS,
        key_filter=lambda k: layer_keys.fullmatch(k) is None,
        in_out_kernels=in_out_kernels(family),
        log=log,
    )


def read_layer(reader, family, config, index: int):
    """(layer module, flat float32 params) of layer `index`, reading only its tensors."""
    module = family.decoder_layer(config, index, jnp.float32, jnp.float32)
    x = jnp.zeros((1, 2, config.hidden_size), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]
    flat = convert.load_params(
        LayerView(reader, family.LAYER_KEYS, index),
        _flatten(shapes),
        prefix="",
        ignored=family.IGNORED_SOURCE_KEYS,
        in_out_kernels=in_out_kernels(family),
    )
    return module, flat


class _LayerFns:
    """Jitted forward and per-example backward of one decoder layer, one compilation per
    distinct layer module (layers differ only by their sliding window)."""

    def __init__(self):
        self._fns: dict[Any, tuple] = {}

    def get(self, module: nn.Module, window):
        if window not in self._fns:

            def forward(params, x, mask, positions):
                return module.apply({"params": params}, x, mask, positions, True)

            def backward(params, acc, x, mask, positions, cot):
                def one(acc, inputs):
                    x_e, m_e, p_e, c_e = inputs

                    def f(p, x1):
                        return module.apply({"params": p}, x1[None], m_e[None], p_e[None], True)[0]

                    _, vjp = jax.vjp(f, params, x_e)
                    g_p, g_x = vjp(c_e)
                    return jax.tree.map(lambda a, g: a + g * g, acc, g_p), g_x

                return jax.lax.scan(one, acc, (x, mask, positions, cot))

            self._fns[window] = (jax.jit(forward), jax.jit(backward, donate_argnums=1))
        return self._fns[window]


def _final_norm(arch: arch_lib.Arch, eps: float) -> nn.Module:
    return RMSNorm(eps) if arch.rms_norm else nn.LayerNorm(eps)


def output_rows(reader, key: str) -> jax.Array:
    """An output matrix as checkpoints store it, [vocab, d] float32, placed without a second
    copy when the reader's array allows it (convert.load_params's note): read transposed, as a
    kernel, it would be held twice while it loads."""
    return jax.device_put(np.asarray(reader.get(key), np.float32))


def _example_head(norm, norm_params, w, h, ids, loss_mask, full: bool, rows_ids=None):
    """One example through the final norm and the output matrix w [vocab, d] (the tied
    embedding, or the LM head in its checkpoint layout): the squared gradient of -log p(targets)
    with respect to the norm's weights ({leaf: [d]}) and to w, and the cotangent of h [length, d].

    The gradient of w is normed' delta (delta = dloss/dlogits [length, vocab]); what pruning needs
    is its squared sum over the vocabulary, sum_v (normed' delta)[k, v]^2 = normed[:, k]'
    (delta delta') normed[:, k], computed without the [d, vocab] matrix (`full`: also that
    matrix squared, for tests). The rows of the tied embedding's gradient that the example's
    own tokens index are returned too (delta[:, ids]' normed; at `rows_ids` when given: an
    encoder-decoder's lookups are not its targets), for the cross term with its input use.
    """
    normed, norm_vjp = jax.vjp(lambda p, x: norm.apply({"params": p}, x), norm_params, h)

    def nll(logits):
        logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, ids[1:, None], axis=-1)[:, 0]
        return -jnp.sum(picked * loss_mask[1:])

    # w is [vocab, d] either way (the tied embedding, or the LM head as checkpoints store it)
    logits = normed @ w.T
    delta = jax.grad(nll)(logits)  # [length, vocab]
    g_norm, g_h = norm_vjp(delta @ w)
    gram = delta @ delta.T  # [length, length]
    w_rows = jnp.einsum("tk,ts,sk->k", normed, gram, normed)  # [d]
    looked_up = ids if rows_ids is None else rows_ids
    token_rows = delta[:, looked_up].T @ normed  # [lookups, d]: the tied embedding's rows
    w_full = jnp.zeros((0,), jnp.float32)
    if full:  # [vocab, d], as w
        w_full = jnp.square(delta.T @ normed)
    return jax.tree.map(jnp.square, g_norm), w_rows, w_full, g_h, token_rows


def _scatter_square(indices: np.ndarray, cot: np.ndarray, width: int, extra=None):
    """(unique indices, squared per-row gradient [len(unique), width]) of a lookup table whose
    rows `indices` [length] received the cotangents `cot` [length, width]; `extra` (rows of
    another use of the same table at `indices`, [length, width]) enters the square as a cross
    term: (g_extra + g)^2 - g_extra^2."""
    uniq, inverse = np.unique(indices, return_inverse=True)
    g = np.zeros((len(uniq), width), np.float64)
    np.add.at(g, inverse, cot)
    if extra is None:
        return uniq, g * g
    g_extra = np.zeros_like(g)
    g_extra[inverse] = extra
    return uniq, 2 * g_extra * g + g * g


def fisher_scores(
    checkpoint: str,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    keep_full: bool = False,
    log=print,
) -> FisherScores:
    """Fisher importance of `checkpoint`'s dimensions on causal-LM `batches`.

    batches: dicts of numpy input_ids, attention_mask and loss_mask [batch, length] (right
    padded; rows without a counted token add nothing). keep_full: also return every tensor's
    H (flax paths of the causal LM) in `.full`, for tests on tiny models.
    """
    reader, hf_config = open_checkpoint(checkpoint)
    config = registry.config_from_hf(hf_config)
    arch = check_family(config)
    dims = arch.dims(config)
    family = registry.family_for(config.model_type)
    tied = bool(config.tie_word_embeddings)
    head_abstract = non_layer_abstract(family, config)

    without_head = {p: v for p, v in head_abstract.items() if p != "lm_head/kernel"}
    flat = read_non_layer(reader, family, config, without_head, log)
    embed = flat.pop(arch.embed)
    pos_embed = flat.pop(arch.position_embed) if arch.position_embed else None
    norm_prefix = arch.final_norm + "/"
    norm_params = {p[len(norm_prefix) :]: v for p, v in flat.items() if p.startswith(norm_prefix)}
    rest = [p for p in flat if not p.startswith(norm_prefix)]
    if rest or not norm_params:
        raise ValueError(f"fisher_scores: unexpected non-layer tensors {rest} of {checkpoint}")
    del flat

    data = [
        {k: np.asarray(b[k]) for k in ("input_ids", "attention_mask", "loss_mask")} for b in batches
    ]
    if not data:
        raise ValueError("fisher_scores: no batches")
    examples = sum(int((b["loss_mask"][:, 1:] > 0).any(axis=1).sum()) for b in data)
    if examples == 0:
        raise ValueError("fisher_scores: no example has a target token (loss_mask is all zero)")
    positions = [np.asarray(positions_from_mask(jnp.asarray(b["attention_mask"]))) for b in data]
    n_layers = config.num_layers

    # 1. forward, keeping every layer boundary on the host
    if pos_embed is None:
        states = [[np.asarray(jax.jit(lambda e, ids: e[ids])(embed, b["input_ids"])) for b in data]]
    else:  # learned positions, added once at the embeddings (GPT-2)
        add = jax.jit(lambda e, p, ids, pos: e[ids] + p[pos])
        states = [
            [
                np.asarray(add(embed, pos_embed, b["input_ids"], positions[k]))
                for k, b in enumerate(data)
            ]
        ]
    if not tied:  # the embedding's Fisher comes from the input cotangents alone: drop it now
        del embed
    fns = _LayerFns()
    for i in range(n_layers):
        module, flat = read_layer(reader, family, config, i)
        forward, _ = fns.get(module, arch_lib.layer_window(config, i))
        params = _unflatten(flat)
        states.append(
            [
                np.asarray(forward(params, states[-1][k], b["attention_mask"], positions[k]))
                for k, b in enumerate(data)
            ]
        )
        del params, flat
        log(f"fisher: forward through layer {i + 1}/{n_layers}")

    # 2. the head: squared per-example gradients of its weights, cotangents of its input
    w = embed if tied else output_rows(reader, "lm_head.weight")
    log(f"fisher: output matrix {tuple(w.shape)} {'tied' if tied else 'read'}")
    norm = _final_norm(arch, dims.eps)

    def head_backward(norm_params, w, acc, h, ids, loss_mask):
        def one(acc, inputs):
            sq_norm, w_rows, w_full, g_h, rows = _example_head(
                norm, norm_params, w, *inputs, keep_full
            )
            acc = (jax.tree.map(jnp.add, acc[0], sq_norm), acc[1] + w_rows, acc[2] + w_full)
            return acc, (g_h, rows)

        return jax.lax.scan(one, acc, (h, ids, loss_mask))

    head_backward = jax.jit(head_backward, donate_argnums=2)
    d = dims.hidden
    full_shape = w.shape if keep_full else (0,)
    head_acc = (jax.tree.map(jnp.zeros_like, norm_params), jnp.zeros(d), jnp.zeros(full_shape))
    cots, head_rows = [], []
    for k, b in enumerate(data):
        head_acc, (g_h, rows) = head_backward(
            norm_params,
            w,
            head_acc,
            states[-1][k],
            b["input_ids"],
            b["loss_mask"].astype(np.float32),
        )
        cots.append(np.asarray(g_h))
        head_rows.append(np.asarray(rows))
    del w, norm_params
    states.pop()
    log("fisher: head gradients done")
    norm_sq = {leaf: np.asarray(v, np.float64) for leaf, v in head_acc[0].items()}
    w_rows, w_full = (np.asarray(a, np.float64) for a in head_acc[1:])
    del head_acc

    # 3. backward through the layers, last first
    q_heads = np.zeros((n_layers, dims.heads))
    kv_groups = np.zeros((n_layers, dims.kv_heads))
    ffn = np.zeros((n_layers, dims.ffn))
    hidden = np.zeros(d)
    full: dict[str, np.ndarray] = {}
    for i in reversed(range(n_layers)):
        module, flat = read_layer(reader, family, config, i)
        _, backward = fns.get(module, arch_lib.layer_window(config, i))
        params = _unflatten(flat)
        acc = jax.tree.map(jnp.zeros_like, params)
        inputs = states.pop()
        for k, b in enumerate(data):
            acc, g_x = backward(params, acc, inputs[k], b["attention_mask"], positions[k], cots[k])
            cots[k] = np.asarray(g_x)
        layer_h = {p: np.asarray(v) / examples for p, v in _flatten(acc).items()}
        h_d, q_heads[i], kv_groups[i], ffn[i] = reduce_layer(layer_h, config)
        hidden += h_d
        if keep_full:
            full.update({f"{arch.layer_path(i)}/{p}": v for p, v in layer_h.items()})
        del params, flat, acc, inputs
        log(f"fisher: backward through layer {i + 1}/{n_layers}")

    # 4. the embeddings: each example's gradient is the scatter of its input cotangents over its
    # token ids (plus, when tied, the head's use of the same rows), and over its positions
    column_sq = np.zeros(d, np.float64)
    embed_full = pos_full = None
    if tied:  # the head's part, every row
        column_sq += w_rows
        if keep_full:
            embed_full = w_full.copy()
    elif keep_full:
        embed_full = np.zeros((config.vocab_size, d), np.float64)
    if keep_full and pos_embed is not None:
        pos_full = np.zeros(pos_embed.shape, np.float64)
    for k, b in enumerate(data):
        for e in range(b["input_ids"].shape[0]):
            extra = head_rows[k][e] if tied else None
            uniq, sq = _scatter_square(b["input_ids"][e], cots[k][e], d, extra)
            column_sq += sq.sum(axis=0)
            if keep_full:
                embed_full[uniq] += sq
            if pos_embed is not None:
                uniq, sq = _scatter_square(positions[k][e], cots[k][e], d)
                column_sq += sq.sum(axis=0)
                if keep_full:
                    pos_full[uniq] += sq
    if keep_full:
        full[arch.embed] = embed_full / examples
        if pos_full is not None:
            full[arch.position_embed] = pos_full / examples
    hidden += column_sq / examples
    for leaf, sq in norm_sq.items():
        hidden += sq / examples
        if keep_full:
            full[f"{arch.final_norm}/{leaf}"] = sq / examples
    if not tied:
        hidden += w_rows / examples
        if keep_full:
            full["lm_head/kernel"] = w_full.T / examples  # the kernel's [d, vocab]
    return FisherScores(
        model_type=config.model_type,
        hidden=hidden,
        q_heads=q_heads,
        kv_groups=kv_groups,
        ffn=ffn,
        examples=examples,
        full=full or None,
    )
