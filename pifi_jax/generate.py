"""Text generation with the decoders and encoder-decoders: greedy, sampling and beam search, jitted,
with a cache.

    tokens = generate(module, params, input_ids, attention_mask, max_new_tokens=20)  # greedy
    tokens = generate(..., method="sample", temperature=0.7, top_p=0.9, rng=jax.random.key(0))
    tokens = generate(..., method="beam", num_beams=4)

`module, params` come from `from_pretrained(..., task="causal_lm")` (any decoder family, scanned or
not, with or without PEFT leaves; prompt tuning excepted: its soft tokens would need cache slots
of their own, so it is refused) or `task="seq2seq"` (T5, BART: a module whose
`is_encoder_decoder` is True, with or without PEFT leaves).
  decoders: a batch of prompts of different lengths is padded on the LEFT (attention_mask 0 on
    the padding), so every row's next token goes to the same cache slot and each row's
    positions count its own real tokens (as transformers numbers left-padded rows).
  encoder-decoders: the sources may be padded on either side (the encoder reads the mask); the
    decoder starts from `config.decoder_start_token_id`, and the result holds the new tokens
    only (not the start token), as the decoders' does.

How it runs: one call prefills the prompts into a `layers.KVCache` of prompt + max_new_tokens
slots (encoder-decoders: the encoder runs once, then the decoder's first call on the start token
fills a `layers.Seq2SeqCache`: its self-attention KVCache of 1 + max_new_tokens slots and every
layer's cross-attention keys and values of the encoder output); then `jax.lax.while_loop` feeds
one token per step, through the same loop and beam search for both. The whole of it is one
jitted function,
compiled once per input shape and static option (method, max_new_tokens, top_k, num_beams, eos and
pad ids); temperature, top_p, length_penalty and the rng are traced, so changing them does not
recompile. The loop stops at max_new_tokens or once every row has produced eos; a finished row
emits pad_token_id from then on. The result is the new tokens [batch, max_new_tokens] (with
`include_prompt=True`, the prompt in front: [batch, prompt + max_new_tokens]).

What matches transformers' `generate` (tests/test_generate.py compares tiny random models):
  greedy  the argmax at each step: the same tokens as do_sample=False, num_beams=1.
  sample  temperature, then top-k, then top-p, in transformers' order and with its rules (top-k
          keeps ties with the k-th logit; top-p keeps the most probable tokens until their mass
          reaches top_p, at least one). Random numbers are JAX's, so only the distribution matches.
  beam    transformers' beam search with its defaults, length_penalty=1.0 and
          early_stopping=False. Each step takes the best max(2, 1 + number of eos ids) * num_beams
          continuations of all beams by summed log-probability. Of these, the ones ending in eos
          that rank among the first num_beams become finished hypotheses scored
          sum_logprobs / new_length ** length_penalty, where new_length counts the eos; the best
          num_beams not ending in eos continue. A row stops accepting hypotheses once its best
          running score / new_length ** length_penalty cannot beat its worst finished one
          (transformers' heuristic for early_stopping=False, not the exact bound), and at
          max_new_tokens every continuation counts as finished. The best finished hypothesis is
          returned. Not implemented: early_stopping=True / "never", beam sampling, several
          returned sequences.
The cache keeps keys as they were rotated when written, as transformers' cache does; with
"dynamic" RoPE scaling (frequencies that depend on the longest position) a cached run therefore
differs from re-running the whole sequence once positions pass the trained length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.layers import KVCache, Seq2SeqCache

METHODS = ("greedy", "sample", "beam")
# transformers' "impossible" score for beams that must not be chosen (added, not assigned).
_NEG = -1.0e9


def generate(
    module,
    params,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
    include_prompt: bool = False,
    cache_dtype: Any = None,
) -> jax.Array:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      module, params: a causal LM (`from_pretrained(..., task="causal_lm")`) or an encoder-decoder
        (`task="seq2seq"`).
      input_ids: [batch, prompt_length] int, padded on the left (an encoder-decoder's source:
        padded on either side).
      attention_mask: [batch, prompt_length] 1 for real tokens, 0 for padding; None = none.
      method: "greedy", "sample" (needs `rng`) or "beam" (num_beams, length_penalty).
      temperature, top_k, top_p: sampling filters (top_k None / top_p None or 1.0 = off).
      eos_token_id: one id or several; None = the config's eos_token_id; () = never stop.
      pad_token_id: emitted after eos; None = the config's pad id, else the first eos id, else 0.
      include_prompt: return the prompt in front of the new tokens (decoders only).
      cache_dtype: of the keys/values kept (default: the model's compute dtype).
    Returns:
      int32 [batch, max_new_tokens] (or [batch, prompt_length + max_new_tokens]).
    """
    config = module.config
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if method == "sample":
        if rng is None:
            raise ValueError('method="sample" needs an rng (e.g. jax.random.key(0))')
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if method == "beam" and num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    encoder_decoder = getattr(module, "is_encoder_decoder", False)
    if encoder_decoder and include_prompt:
        raise ValueError("include_prompt: an encoder-decoder's output does not continue its input")
    traced = isinstance(attention_mask, jax.core.Tracer)  # inside a jit: checked by the caller
    if not encoder_decoder and not traced and not np.all(np.asarray(attention_mask)[:, -1]):
        raise ValueError("prompts must be padded on the left (attention_mask[:, -1] must be 1)")
    limit = getattr(config, "n_positions", None)  # learned positions (GPT-2) cannot go further
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt + max_new_tokens exceeds the model's {limit} positions")
    eos = _token_ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    use_top_p = method == "sample" and top_p is not None and top_p < 1.0
    new = _generate(
        module,
        params,
        input_ids,
        attention_mask,
        jax.random.key(0) if rng is None else rng,
        jnp.float32(temperature),
        jnp.float32(top_p if use_top_p else 1.0),
        jnp.float32(length_penalty),
        max_new_tokens=max_new_tokens,
        method=method,
        top_k=top_k if method == "sample" else None,
        use_top_p=use_top_p,
        num_beams=num_beams if method == "beam" else 1,
        eos=eos,
        pad=int(pad_token_id),
        cache_dtype=jnp.dtype(cache_dtype or _compute_dtype(module)),
    )
    return jnp.concatenate([input_ids, new], axis=1) if include_prompt else new


def filter_logits(
    logits: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """Sampling logits [..., vocab] after temperature, top-k and top-p; removed tokens get -inf.

    top-k keeps every token whose logit is at least the k-th largest; top-p keeps, from the most
    probable down, the tokens whose preceding mass is below top_p (so at least one).
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
        cutoff = jnp.min(jnp.where(before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _token_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (int, np.integer)):
        return (int(ids),)
    return tuple(int(i) for i in ids)


def _compute_dtype(module):
    """The compute dtype of a family module, or of the one a PeftModel wraps."""
    while not hasattr(module, "dtype") and hasattr(module, "base"):
        module = module.base
    return getattr(module, "dtype", jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=(
        "module",
        "max_new_tokens",
        "method",
        "top_k",
        "use_top_p",
        "num_beams",
        "eos",
        "pad",
        "cache_dtype",
    ),
)
def _generate(
    module,
    params,
    input_ids,
    attention_mask,
    rng,
    temperature,
    top_p,
    length_penalty,
    *,
    max_new_tokens,
    method,
    top_k,
    use_top_p,
    num_beams,
    eos,
    pad,
    cache_dtype,
):
    start = _seq2seq_start if getattr(module, "is_encoder_decoder", False) else _decoder_start
    logits, cache, step = start(
        module, params, input_ids, attention_mask, max_new_tokens, cache_dtype
    )  # logits [batch, vocab] of the first new token; step(tokens [rows], cache) feeds one more
    batch = input_ids.shape[0]

    eos_ids = jnp.asarray(eos, jnp.int32)
    if method == "beam":
        # Slots every beam of a row shares: the prompt's (an encoder-decoder's: the start token).
        shared = 1 if getattr(module, "is_encoder_decoder", False) else input_ids.shape[1]
        return _beam_search(
            step, logits, cache, num_beams, max_new_tokens, eos_ids, pad, length_penalty, shared
        )

    def choose(logits, index):
        if method == "greedy":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, temperature, top_k, top_p if use_top_p else None)
        key = jax.random.fold_in(rng, index)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    def not_done(state):
        index, _, finished, _, _ = state
        return (index < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        index, tokens, finished, logits, cache = state
        token = jnp.where(finished, pad, choose(logits, index))  # [batch]
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
        finished = finished | jnp.isin(token, eos_ids)
        logits, cache = step(token, cache)
        return index + 1, tokens, finished, logits, cache

    tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    finished = jnp.zeros((batch,), bool)
    state = (jnp.int32(0), tokens, finished, logits, cache)
    return jax.lax.while_loop(not_done, body, state)[1]


def _decoder_start(module, params, input_ids, attention_mask, max_new_tokens, cache_dtype):
    """A decoder: the prompts prefilled into a KVCache of prompt + max_new_tokens slots."""
    config = module.config
    batch, prompt_length = input_ids.shape
    if hasattr(module, "init_cache"):  # a module with more than its stack to cache (PiFi)
        cache = module.init_cache(batch, prompt_length + max_new_tokens, cache_dtype)
    else:
        cache = KVCache.create(
            batch,
            prompt_length + max_new_tokens,
            config.cache_kv_heads,
            config.head_dim,
            layers=config.num_layers,
            dtype=cache_dtype,
        )
    logits, cache = module.apply(
        {"params": params}, input_ids, attention_mask, cache=cache, last_logits_only=True
    )

    def step(tokens, cache):
        out, cache = module.apply({"params": params}, tokens[:, None], None, cache=cache)
        return out[:, -1], cache

    return logits[:, -1], cache, step


def _seq2seq_start(module, params, input_ids, attention_mask, max_new_tokens, cache_dtype):
    """An encoder-decoder: the encoder once, then the decoder on the start token, which fills a
    Seq2SeqCache (1 + max_new_tokens decoder slots, every layer's cross keys/values)."""
    config = module.config
    batch = input_ids.shape[0]
    variables = {"params": params}
    encoder_hidden = module.apply(variables, input_ids, attention_mask)  # [batch, source, d]
    cache = Seq2SeqCache.create(
        batch,
        1 + max_new_tokens,
        attention_mask,
        layers=config.num_layers,
        kv_heads=config.cache_kv_heads,
        heads=config.num_heads,
        head_dim=config.head_dim,
        dtype=cache_dtype,
    )
    start = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32)
    logits, cache = module.apply(
        variables, None, None, start, encoder_hidden=encoder_hidden, cache=cache
    )

    def step(tokens, cache):
        out, cache = module.apply(variables, None, None, tokens[:, None], cache=cache)
        return out[:, -1], cache

    return logits[:, -1], cache, step


def _gather(x, indices):
    """x [batch, beams, ...] at beam `indices` [batch, k] -> [batch, k, ...]."""
    indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, indices, axis=1)


def _beam_search(
    step, logits, cache, num_beams, max_new_tokens, eos_ids, pad, length_penalty, shared_slots
):
    """transformers' beam search (see the module docstring); logits [batch, vocab] of the prompts
    and their cache (a KVCache, Seq2SeqCache or PifiCache), whose first `shared_slots` slots are
    the same for all beams of a row (not moved when beams are reordered). Returns the best
    finished hypothesis per row [batch, max_new_tokens]."""
    batch, vocab = logits.shape
    beams = num_beams
    keep = max(2, 1 + int(eos_ids.shape[0])) * beams  # candidates per step
    # Every beam starts as a copy of its prompt; only beam 0 is live at first (others at _NEG).
    logits = jnp.repeat(logits, beams, axis=0)  # [batch * beams, vocab]
    cache = cache.take_rows(jnp.repeat(jnp.arange(batch), beams))
    shape = (batch, beams, max_new_tokens)
    running = jnp.full(shape, pad, jnp.int32)
    running_scores = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, _NEG), (batch, 1))
    done_seqs = jnp.full(shape, pad, jnp.int32)
    done_scores = jnp.full((batch, beams), _NEG, jnp.float32)
    done_flags = jnp.zeros((batch, beams), bool)
    improvable = jnp.ones((batch,), bool)  # transformers' is_early_stop_heuristic_unsatisfied
    first_k = jnp.arange(keep) < beams

    def not_done(state):
        return ~state[-1]

    def body(state):
        index, running, running_scores, done_seqs, done_scores, done_flags, improvable = state[:7]
        logits, cache = state[7:9]
        new_length = (index + 1).astype(jnp.float32)  # generated tokens, this one included
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        scores = log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]
        top_scores, top = jax.lax.top_k(scores.reshape(batch, beams * vocab), keep)  # [b, keep]
        origin, token = top // vocab, (top % vocab).astype(jnp.int32)
        candidates = _gather(running, origin)  # [batch, keep, new]
        candidates = jax.lax.dynamic_update_slice(candidates, token[:, :, None], (0, 0, index))
        ends = jnp.isin(token, eos_ids) | (index + 1 >= max_new_tokens)  # [batch, keep]

        # The best `beams` candidates that go on.
        live_scores = top_scores + ends * _NEG
        running_scores, pick = jax.lax.top_k(live_scores, beams)
        running = _gather(candidates, pick)
        parent = _gather(origin, pick)  # [batch, beams]: whose cache each continues

        # Finished hypotheses: merged with the ones kept so far, the best `beams` stay.
        finishing = ends & first_k[None, :]
        finished_scores = top_scores / new_length**length_penalty
        finished_scores = finished_scores + (~improvable)[:, None] * _NEG + (~finishing) * _NEG
        merged_scores = jnp.concatenate([done_scores, finished_scores], axis=1)
        done_scores, pick = jax.lax.top_k(merged_scores, beams)
        done_seqs = _gather(jnp.concatenate([done_seqs, candidates], axis=1), pick)
        done_flags = _gather(jnp.concatenate([done_flags, finishing], axis=1), pick)

        best_possible = running_scores[:, :1] / new_length**length_penalty  # [batch, 1]
        worst_done = jnp.where(done_flags, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
        improvable = improvable & jnp.any(best_possible > worst_done, axis=1)
        stop = ~jnp.any(improvable) | jnp.all(ends)

        rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)  # [batch * beams]
        cache = cache.reorder_beams(rows, shared_slots)
        next_tokens = jax.lax.dynamic_index_in_dim(running, index, axis=2, keepdims=False)
        logits, cache = step(next_tokens.reshape(-1), cache)
        return (
            index + 1,
            running,
            running_scores,
            done_seqs,
            done_scores,
            done_flags,
            improvable,
            logits,
            cache,
            stop,
        )

    state = (
        jnp.int32(0),
        running,
        running_scores.astype(jnp.float32),
        done_seqs,
        done_scores,
        done_flags,
        improvable,
        logits,
        cache,
        jnp.bool_(False),
    )
    done_seqs = jax.lax.while_loop(not_done, body, state)[3]
    return done_seqs[:, 0]
