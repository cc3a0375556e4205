"""pifi_jax.generate against transformers' generate() on tiny random models, and the sampling filters.

Prompts are a left-padded batch of different lengths (7, 5 and 3 real tokens). Each case picks as
eos a token that transformers' own greedy run emits in row 0, so at least one row stops early
and the others may run to max_new_tokens: stopping and padding after eos are exercised.
After a row's eos transformers' beam search fills with eos when pad_token_id is 0 (its
`pad or eos` fill), greedy with pad; pifi_jax always fills with pad, so outputs are compared
up to and including each row's first eos.
"""

import numpy as np
import pytest

import pifi_jax
from pifi_jax.generate import _generate, filter_logits
from tests.test_models_decoders import tiny_decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW = 8
PAD = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (transformers model, pifi_jax module, params), built on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            model = tiny_decoder(case)
            directory = tmp_path_factory.mktemp(case)
            model.save_pretrained(directory)
            module, params = pifi_jax.from_pretrained(directory, task="causal_lm", log=print)
            cache[case] = model, module, params
        return cache[case]

    return get


def left_padded_prompts(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 99, size=(3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, pad in enumerate([0, 2, 4]):
        mask[row, :pad] = 0
        ids[row, :pad] = PAD
    return ids, mask


def hf_generate(model, ids, mask, **kw) -> np.ndarray:
    """transformers' new tokens, padded to NEW with PAD (it stops once every row is done)."""
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=PAD,
            **kw,
        ).numpy()[:, ids.shape[1] :]
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)


def up_to_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Each row with everything after its first eos replaced by PAD."""
    tokens = np.array(tokens)
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1 :] = PAD
    return tokens


def eos_from_greedy(model, ids, mask) -> int:
    """A token transformers' greedy decoding emits in row 0 (so row 0 stops on it)."""
    return int(hf_generate(model, ids, mask, eos_token_id=None)[0, 3])


def assert_pad_after_eos(tokens, eos):
    np.testing.assert_array_equal(tokens, up_to_eos(tokens, eos))


def slow(*cases):
    return [pytest.param(case, marks=pytest.mark.slow) for case in cases]


# Each case compiles a generation loop (seconds on a busy CPU): one per family file by default;
# mistral (a sliding window on every layer) and qwen2 (on some layers) with -m slow.
@pytest.mark.parametrize("case", ["llama", "gemma2", "falcon", "gpt2", *slow("mistral", "qwen2")])
def test_greedy_matches_transformers_on_left_padded_prompts(checkpoints, case):
    model, module, params = checkpoints(case)
    ids, mask = left_padded_prompts()
    eos = eos_from_greedy(model, ids, mask)
    theirs = hf_generate(model, ids, mask, eos_token_id=eos)
    ours = np.asarray(
        pifi_jax.generate(
            module, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD
        )
    )
    assert ours.shape == (3, NEW) and eos in ours[0]
    np.testing.assert_array_equal(up_to_eos(ours, eos), up_to_eos(theirs, eos))
    assert_pad_after_eos(ours, eos)


# The search does not depend on the family (the greedy cases cover each family's cache).
@pytest.mark.parametrize("case", ["llama", *slow("gemma2", "falcon", "gpt2")])
def test_beam_search_matches_transformers(checkpoints, case):
    model, module, params = checkpoints(case)
    ids, mask = left_padded_prompts(seed=1)
    eos = eos_from_greedy(model, ids, mask)
    theirs = hf_generate(model, ids, mask, eos_token_id=eos, num_beams=3)
    ours = np.asarray(
        pifi_jax.generate(
            module,
            params,
            ids,
            mask,
            max_new_tokens=NEW,
            method="beam",
            num_beams=3,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    )
    np.testing.assert_array_equal(up_to_eos(ours, eos), up_to_eos(theirs, eos))
    assert_pad_after_eos(ours, eos)


def test_sampling_is_deterministic_per_rng_and_compiles_once(checkpoints):
    import jax

    _, module, params = checkpoints("llama")
    ids, mask = left_padded_prompts()

    def sample(seed, temperature):
        return np.asarray(
            pifi_jax.generate(
                module,
                params,
                ids,
                mask,
                max_new_tokens=NEW,
                method="sample",
                temperature=temperature,
                top_k=50,
                top_p=0.95,
                eos_token_id=(),
                rng=jax.random.key(seed),
            )
        )

    first = sample(0, 2.0)
    compiled = _generate._cache_size()
    np.testing.assert_array_equal(sample(0, 2.0), first)
    assert (sample(1, 2.0) != first).any()
    sample(0, 0.5)  # temperature, top_p and the rng are traced: no new compilation
    assert _generate._cache_size() == compiled


def test_top_k_1_sampling_equals_greedy(checkpoints):
    import jax

    model, module, params = checkpoints("gpt2")
    ids, mask = left_padded_prompts()
    # The greedy test's arguments, so its compiled function is reused.
    eos = eos_from_greedy(model, ids, mask)
    common = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    greedy = pifi_jax.generate(module, params, ids, mask, **common)
    sampled = pifi_jax.generate(
        module,
        params,
        ids,
        mask,
        method="sample",
        top_k=1,
        temperature=3.0,
        rng=jax.random.key(7),
        **common,
    )
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))
    with_prompt = pifi_jax.generate(module, params, ids, mask, include_prompt=True, **common)
    np.testing.assert_array_equal(np.asarray(with_prompt), np.concatenate([ids, greedy], 1))


PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [(3, None, [0, 1, 2]), (None, 0.6, [0, 1]), (None, 0.7, [0, 1, 2]), (4, 0.6, [0, 1])],
)
def test_filters_keep_what_transformers_keeps(top_k, top_p, kept):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.log(PROBS)[None]
    ours = np.asarray(filter_logits(logits, 1.0, top_k, top_p))
    theirs = torch.as_tensor(logits)
    if top_k is not None:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert np.flatnonzero(np.isfinite(ours[0])).tolist() == kept
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs.numpy()))
    np.testing.assert_allclose(ours[np.isfinite(ours)], logits[np.isfinite(ours)], rtol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    import jax

    draws = 20000
    # Model logits that temperature 0.5 turns into log(PROBS). top-4 keeps 0.9 of the mass;
    # renormalised, tokens 0-2 precede token 3 with 0.89 >= top_p = 0.8, so top-p drops it.
    logits = np.tile(0.5 * np.log(PROBS), (draws, 1))
    filtered = filter_logits(logits, 0.5, 4, 0.8)
    tokens = np.asarray(jax.random.categorical(jax.random.key(0), filtered))
    frequencies = np.bincount(tokens, minlength=len(PROBS)) / draws
    expected = np.where(np.arange(len(PROBS)) < 3, PROBS, 0.0)
    expected /= expected.sum()
    assert frequencies[3:].sum() == 0  # filtered out: never drawn
    # 4 standard deviations of a frequency near 0.45 from 20000 draws is 0.014.
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_bad_arguments_are_refused(checkpoints):
    _, module, params = checkpoints("gpt2")
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="padded on the left"):
        pifi_jax.generate(module, params, ids, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs an rng"):
        pifi_jax.generate(module, params, ids, mask, max_new_tokens=2, method="sample")
    with pytest.raises(ValueError, match="method"):
        pifi_jax.generate(module, params, ids, mask, max_new_tokens=2, method="nucleus")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_decode_step_writes_the_stack_cache_in_place(tmp_path, scan_layers):
    """One decode step's compiled scratch memory is a small part of the key/value cache it
    updates: each layer writes its new keys/values into the stack's cache in place, and
    grouped-query attention reads the kv heads without repeating them. Slicing a layer out and
    writing it back made XLA copy the whole cache once per layer (scratch of twice the cache),
    and repeating kv heads materialised heads / kv_heads times each layer's keys and values.
    (SmolLM2-135M at batch 8: a decode step went from 352 to 56 ms on the 2-core CPU.)"""
    import jax
    import jax.numpy as jnp

    from pifi_jax.layers import KVCache

    tiny_decoder("llama", num_hidden_layers=8, num_attention_heads=8).save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(
        tmp_path, task="causal_lm", scan_layers=scan_layers, log=print
    )
    config = module.config
    assert config.num_attention_heads > config.cache_kv_heads  # grouped-query attention
    cache = KVCache.create(
        8, 1024, config.cache_kv_heads, config.head_dim, layers=config.num_layers
    )
    cache_bytes = cache.key.nbytes + cache.value.nbytes

    def step(params, tokens, cache):
        return module.apply({"params": params}, tokens[:, None], None, cache=cache)

    tokens = jnp.zeros((8,), jnp.int32)
    compiled = jax.jit(step, donate_argnums=(2,)).lower(params, tokens, cache).compile()
    scratch = compiled.memory_analysis().temp_size_in_bytes
    # What stays: a layer's slice of keys and values for the attention einsums, two layers' at a
    # time at most (1 / 8 of the cache each here). Before: 2.5x the cache unrolled, 0.58x scanned.
    assert scratch < 0.35 * cache_bytes, (scratch, cache_bytes)


def test_the_prefill_attends_over_the_prompt_only(checkpoints):
    """The prefill's compiled FLOPs do not grow with max_new_tokens: on an empty cache the
    prompt attends over its own keys, not over every (unwritten, masked) slot of the cache."""
    import jax
    import jax.numpy as jnp

    from pifi_jax.generate import _decoder_start

    _, module, params = checkpoints("llama")
    ids, mask = left_padded_prompts()

    def flops(max_new_tokens):
        def prefill(params, ids, mask):
            return _decoder_start(module, params, ids, mask, max_new_tokens, jnp.float32)[:2]

        analysis = jax.jit(prefill).lower(params, ids, mask).compile().cost_analysis()
        return analysis["flops"]

    short, long = flops(4), flops(2048)
    assert long < 1.02 * short, (short, long)
