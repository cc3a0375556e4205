"""What the decoder families (llama.py, gemma2.py, falcon.py, gpt2.py) share around their layers.

Layer stacks, unrolled or scanned, with optional rematerialisation:
  scan_layers=True   one layer module under `nn.scan`: its parameters are stacked along a leading
                     "layers" axis (`model/layers/self_attn/q_proj/kernel` [layers, in, out]), so
                     compile time no longer grows with depth. Layers that differ (sliding vs global
                     attention) get their index as a traced argument and look their window up.
                     Loading stacks the per-layer checkpoint tensors, saving unstacks them
                     (hub/convert.py); `stacked_param_axes` gives the stacked leaves a leading
                     "layers" axis.
  remat_policy       "none" | "full" | "dots" | "dots_no_batch": gradient checkpointing of each layer
                     (nn.remat) with jax.checkpoint_policies (REMAT_POLICIES), scanned or not.
PEFT (pifi_jax.peft) builds on unrolled stacks only: its adapters, prefix blocks and layer choices
address layers one by one, so `peft.wrap` refuses scan_layers=True (remat_policy is fine).

The input of a stack under PEFT's virtual tokens (`decoder_inputs`): prompt tuning puts P soft
tokens in front of the sequence; prefix tuning puts P keys/values in front of every attention's
(layers.attention.self_attention_inputs), so the sequence's positions start at P, as transformers
numbers tokens that follow a cache of P entries (which is how Hugging Face PEFT passes a prefix).

The task modules around a family's base model: `CausalLM` (lm_head or the tied embedding),
`SequenceClassifier` (a `score` head on the last real token of each row) and `BareDecoder` (the
stack under the base prefix). A family subclasses them naming its base model class and Hugging
Face's attribute name for it (`model`, `transformer`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.layers import Linear, positions_from_mask
from pifi_jax.layers.peft_hooks import prepend_prompt, virtual_tokens


def default_positions(x: jax.Array, attention_mask, positions, cache=None) -> jax.Array:
    """`positions` if given, else counted on from the cache, else from the padding mask, else
    0..length-1: [batch, length]."""
    if positions is not None:
        return positions
    if cache is not None:
        return cache.positions(attention_mask, x.shape[1])
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return positions_from_mask(attention_mask)


# Our task -> the suffix of the transformers class name of a decoder family
# (`LlamaForSequenceClassification`; GPT-2's causal LM is the exception, `GPT2LMHeadModel`).
HF_TASK_SUFFIXES = {
    "causal_lm": "ForCausalLM",
    "classification": "ForSequenceClassification",
    "decoder": "Model",
}
# remat_policy -> what a layer keeps for the backward pass (None: everything is recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# A window no query-key distance reaches: layers without one, in a scanned stack's window table.
NO_WINDOW = np.iinfo(np.int32).max


def make_layers(layer_cls, config, *, scan: bool, remat_policy: str, **kw):
    """The layers of a stack, built in a parent's setup(): a list of `num_layers` modules, or
    (scan) one module whose parameters `run_layers` stacks. remat_policy wraps the layer class
    in nn.remat (causal and deterministic, positional arguments 4 and 5, stay static)."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    if remat_policy != "none":
        layer_cls = nn.remat(
            layer_cls,
            static_argnums=(4, 5),
            policy=REMAT_POLICIES[remat_policy],
            prevent_cse=not scan,  # scan already keeps XLA from merging the recomputation away
        )
    if scan:
        return layer_cls(config, 0, **kw)
    return [layer_cls(config, i, **kw) for i in range(config.num_layers)]


def run_layers(layers, x, attention_mask, positions, *, deterministic: bool, cache, num_layers):
    """Runs a stack from `make_layers` over x [batch, length, hidden]; returns (x, cache).

    Unrolled: layer i reads and writes `cache.layer(i)`, its view of the stack's cache (it
    writes its new keys/values into the stack in place). Scanned: the same, with i a traced
    index and the whole cache in the scan carry (so the scan does not build a second cache as
    its output), and the layer's parameters sliced from the stacked leaves by nn.scan.
    """

    def call(layer, x, cache, i):
        layer_cache = None if cache is None else cache.layer(i)
        layer_index = None if isinstance(layers, (list, tuple)) else i
        out = layer(
            x,
            attention_mask,
            positions,
            True,
            deterministic,
            cache=layer_cache,
            layer_index=layer_index,
        )
        if cache is not None:
            out, layer_cache = out
            cache = cache.set_layer(i, layer_cache)
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), cache

    if isinstance(layers, (list, tuple)):
        for i, layer in enumerate(layers):
            x, cache = call(layer, x, cache, i)
    else:

        def body(layer, carry, i):
            return call(layer, *carry, i), None

        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=num_layers,
        )
        (x, cache), _ = scan(layers, (x, cache), jnp.arange(num_layers, dtype=jnp.int32))
    if cache is not None:
        cache = cache.advance(attention_mask, x.shape[1])
    return x, cache


def window_of(config, layer_index: int, traced_index=None):
    """Layer `layer_index`'s sliding window; in a scanned stack (`traced_index` given) looked up
    in a per-layer table, or a constant when every layer has the same one."""
    if traced_index is None:
        return config.layer_window(layer_index)
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    if len(set(windows)) == 1:
        return windows[0]
    table = np.array([NO_WINDOW if w is None else w for w in windows], np.int32)
    return jnp.asarray(table)[traced_index]


def stacked_param_axes(stack: str, layer_axes) -> tuple:
    """PARAM_AXES rules for a scanned stack's leaves (`.../{stack}/<leaf>`, one leading "layers"
    axis) and for unrolled layers (`.../{stack}_3/<leaf>`, or a layer loaded alone), from rules
    written relative to one layer."""
    scanned = tuple((rf"(.*/)?{stack}/{p}", ("layers", *axes)) for p, axes in layer_axes)
    return scanned + tuple((rf"(.*/)?{p}", axes) for p, axes in layer_axes)


def decoder_inputs(x: jax.Array, attention_mask, positions, cache=None):
    """(x, attention_mask, positions) a stack runs on, PEFT's virtual tokens included.

    x: the embedded sequence [batch, length, hidden]. Prompt tuning: x becomes [prompt; x]
    ([batch, P + length, hidden]), the mask gets -1 on the prompt (real, and shared by every
    segment of a packed row), and the positions (given, or from the mask) move behind the
    prompt's 0..P-1. Prefix tuning: positions
    start at P (given ones are shifted by P, as Hugging Face PEFT shifts position_ids). Otherwise
    the positions of `default_positions`.
    """
    n_prompt, n_prefix = virtual_tokens()
    if n_prompt:
        if cache is not None:
            raise ValueError(
                "prompt tuning with a KV cache (generation) is not supported: the soft prompt would "
                "need P cache slots of its own; run the model on whole sequences"
            )
        if positions is None:  # numbered over the real sequence, each packed segment apart
            positions = default_positions(x, attention_mask, None)
        front = jnp.arange(n_prompt, dtype=positions.dtype)
        front = jnp.broadcast_to(front, (x.shape[0], n_prompt))
        positions = jnp.concatenate([front, positions + n_prompt], axis=1)
        x = prepend_prompt(x)
        if attention_mask is not None:
            # -1: the prompt's slots, which every segment of a packed row sees (layers.attention).
            attention_mask = jnp.pad(attention_mask, ((0, 0), (n_prompt, 0)), constant_values=-1)
    positions = default_positions(x, attention_mask, positions, cache)
    return x, attention_mask, positions + n_prefix


class CausalLM(nn.Module):
    """A family's base model (`base_class`, named `base_name`) + lm_head, or the tied embedding
    (the base model's `attend`); float32 logits [batch, length, vocab], soft-capped when the config
    sets `final_logit_softcapping` (Gemma-2).

    Call: `module.apply({"params": params}, input_ids, attention_mask=None, positions=None)`; with
    `cache=` (a KVCache) it returns (logits, updated cache); `last_logits_only=True` computes the
    logits of the last slot only ([batch, 1, vocab]: a prompt's next token, without the
    [batch, length, vocab] tensor). Under prompt tuning the P prompt slots have logits too
    ([batch, P + length, vocab]), as in Hugging Face PEFT.

    The two halves apart, for a module that acts between them (PiFi's plugged layer):
    `output_hidden=True` returns the base model's last hidden state [batch, length, hidden]
    instead of the logits (with the cache when one is given), and `hidden=h` skips the base
    model and returns the logits of h (input_ids and the rest unused).
    """

    task: ClassVar[str] = "causal_lm"
    base_class: ClassVar[type]
    base_name: ClassVar[str]
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        *,
        deterministic=True,
        cache=None,
        last_logits_only=False,
        output_hidden=False,
        hidden=None,
    ):
        cfg = self.config
        base = self.base_class(
            cfg,
            self.dtype,
            self.param_dtype,
            self.scan_layers,
            self.remat_policy,
            name=self.base_name,
        )
        if hidden is None:
            h = base(input_ids, attention_mask, positions, deterministic=deterministic, cache=cache)
            if output_hidden:
                return h
            if cache is not None:
                h, cache = h
        else:
            h = hidden
        if last_logits_only:
            h = h[:, -1:]
        if cfg.tie_word_embeddings:
            logits = base.attend(h)
        else:
            kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
            logits = Linear(cfg.vocab_size, **kw, name="lm_head")(h)
        logits = logits.astype(jnp.float32)  # [batch, length, vocab]
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits if cache is None else (logits, cache)


def last_token_index(attention_mask, length: int) -> jax.Array:
    """The index of each row's last real token [batch]: the rightmost slot the mask marks (0 for a
    row with no real token), whichever side the row is padded on; length - 1 without a mask."""
    if attention_mask is None:
        return jnp.full((1,), length - 1, jnp.int32)
    slots = jnp.arange(length, dtype=jnp.int32)  # [length]
    return jnp.max(jnp.where(attention_mask > 0, slots, 0), axis=-1)  # [batch]


class SequenceClassifier(nn.Module):
    """A family's base model + a bias-free linear `score` head on the hidden state of each row's
    last real token; float32 logits [batch, num_labels] (num_labels == 1: one regression score).

    As transformers' `<Family>ForSequenceClassification` (`score`, no dropout, no soft-capping),
    with one difference in where the last token is found: transformers takes the rightmost token
    that is not `pad_token_id`, here it is the rightmost slot `attention_mask` marks, which agrees
    for right- and left-padded rows and needs no pad token in the config. Positions come from the
    mask as everywhere in pifi_jax (a left-padded row scores as if unpadded; transformers, given no
    position_ids, numbers it from the first slot, padding included).

    Call: `module.apply({"params": params}, input_ids=..., attention_mask=..., deterministic=True)`
    with input_ids / attention_mask [batch, length]; `token_type_ids` is accepted and ignored (the
    decoders have no segment embedding; the trainer's batches carry it). Under prompt tuning the
    P soft tokens stand in front, so the last real token is P slots further on; Hugging Face PEFT
    scores the last slot there, which is the same token unless a row is right-padded.
    """

    task: ClassVar[str] = "classification"
    base_class: ClassVar[type]
    base_name: ClassVar[str]
    config: Any
    num_labels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        positions=None,
        deterministic=True,
    ):
        del token_type_ids  # no segment embedding in a decoder
        base = self.base_class(
            self.config,
            self.dtype,
            self.param_dtype,
            self.scan_layers,
            self.remat_policy,
            name=self.base_name,
        )
        h = base(input_ids, attention_mask, positions, deterministic=deterministic)
        # [batch, n_prompt + length, hidden]: a soft prompt, if any, stands in front.
        n_prompt = h.shape[1] - input_ids.shape[1]
        last = last_token_index(attention_mask, input_ids.shape[1]) + n_prompt
        last = jnp.broadcast_to(last, h.shape[:1])  # [batch]
        pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [batch, hidden]
        score = Linear(
            self.num_labels,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="score",
        )
        return score(pooled).astype(jnp.float32)  # [batch, num_labels]


class BareDecoder(nn.Module):
    """The bare stack under the family's base prefix; returns the last hidden state
    [batch, length, hidden] (and the updated cache when one is given)."""

    task: ClassVar[str] = "decoder"
    base_class: ClassVar[type]
    base_name: ClassVar[str]
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, positions=None, *, deterministic=True, cache=None
    ):
        base = self.base_class(
            self.config,
            self.dtype,
            self.param_dtype,
            self.scan_layers,
            self.remat_policy,
            name=self.base_name,
        )
        return base(input_ids, attention_mask, positions, deterministic=deterministic, cache=cache)
