"""The attention implementation switch: jax.nn.dot_product_attention ("xla" here; "cudnn" on a GPU)
gives the native path's outputs, and the cases fused kernels cannot express stay native."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax.layers import attention as attention_lib
from pifi_jax.layers import (
    attention_bias,
    attention_implementation,
    dot_product_attention,
    get_attention_implementation,
    set_attention_implementation,
)
from tests.hf_reference import TINY_DECODER


def _qkv(heads=4, kv_heads=2, batch=2, q_len=5, kv_len=7, head_dim=8, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    query = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    key = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    value = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    return query, key, value


def _both(fn, monkeypatch, fused_calls=1):
    """fn's outputs on the native path and on the fused one, with a spy on
    jax.nn.dot_product_attention: the native path must not call it, and the fused path must call
    it `fused_calls` times (once per attention layer), with implementation="xla"."""
    calls = []
    fused_attention = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        return fused_attention(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    with attention_implementation("native"):
        native = np.asarray(fn())
    assert calls == [], "the native path called jax.nn.dot_product_attention"
    with attention_implementation("xla"):
        fused = np.asarray(fn())
    assert calls == ["xla"] * fused_calls, "the fused path did not run (or not for every layer)"
    return native, fused


@pytest.mark.parametrize("causal", [False, True])
def test_xla_matches_native_with_gqa_and_masks(causal, monkeypatch):
    query, key, value = _qkv()
    # Row 1 has two padded keys; with causal masking and a cache offset the queries sit at 2..6.
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
    bias = attention_bias(mask, 5, causal=causal, q_offset=2 if causal else 0, kv_length=7)
    native, fused = _both(
        lambda: dot_product_attention(query, key, value, bias, scale=0.3), monkeypatch
    )
    np.testing.assert_allclose(fused, native, atol=1e-5, rtol=1e-5)


def test_bias_min_stays_finite_in_low_precision():
    # float32's min would overflow to -inf in float16: fully masked rows must not turn into NaN.
    query, key, value = _qkv(dtype=jnp.float16)
    mask = jnp.array([[0] * 7, [1] * 7])
    bias = attention_bias(mask, 5, causal=False, dtype=jnp.float32)
    with attention_implementation("xla"):
        out = np.asarray(dot_product_attention(query, key, value, bias), np.float32)
    assert np.isfinite(out).all()


def test_dropout_and_softcap_keep_the_native_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused path was taken")

    monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
    query, key, value = _qkv()
    import flax.linen as nn

    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, deterministic):
            return dot_product_attention(
                query,
                key,
                value,
                None,
                dropout_rate=0.5,
                deterministic=deterministic,
                dropout_module=nn.Dropout(0.5),
            )

    with attention_implementation("xla"):
        WithDropout().apply({}, False, rngs={"dropout": jax.random.PRNGKey(1)})
        dot_product_attention(query, key, value, None, logit_softcap=5.0)
        with pytest.raises(AssertionError, match="fused path"):
            WithDropout().apply({}, True)  # deterministic: no dropout, so the fused path


def test_auto_picks_cudnn_only_where_it_applies(monkeypatch):
    with attention_implementation("auto"):
        query, _, _ = _qkv(dtype=jnp.bfloat16)
        assert attention_lib._fused_backend(query, None) is None  # this machine has no GPU
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        assert attention_lib._fused_backend(query, None) == "cudnn"
        assert attention_lib._fused_backend(query.astype(jnp.float32), None) is None
        odd, _, _ = _qkv(head_dim=12, dtype=jnp.bfloat16)
        assert attention_lib._fused_backend(odd, None) is None


def test_setting_is_validated_and_restored():
    assert get_attention_implementation() == "native"
    with pytest.raises(ValueError, match="'flash'"):
        set_attention_implementation("flash")
    with attention_implementation("xla"):
        assert get_attention_implementation() == "xla"
    assert get_attention_implementation() == "native"


def test_whole_encoder_matches_native(tiny_bert_dir, monkeypatch):
    module, params = pifi_jax.from_pretrained(tiny_bert_dir, task="classification", num_labels=2)
    ids = jnp.array([[2, 7, 8, 9, 3, 0], [2, 10, 11, 3, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    native, fused = _both(
        lambda: module.apply({"params": params}, ids, mask), monkeypatch, fused_calls=2
    )
    np.testing.assert_allclose(fused, native, atol=1e-5, rtol=1e-5)


def test_whole_decoder_with_sliding_window_matches_native(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.MistralConfig(**TINY_DECODER, sliding_window=3)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    ids = jnp.array([[0, 0, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9, 10]])
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding, as in generation
    layers = TINY_DECODER["num_hidden_layers"]
    native, fused = _both(
        lambda: module.apply({"params": params}, ids, mask), monkeypatch, fused_calls=layers
    )
    # Left-padding rows attend to nothing; compare the real tokens.
    keep = np.asarray(mask, bool)
    np.testing.assert_allclose(fused[keep], native[keep], atol=1e-5, rtol=1e-5)


def test_reorder_beams_moves_only_the_slots_after_the_prompt():
    """KVCache.reorder_beams equals take_rows when each row's beams share the prompt's slots,
    and gathers only the later slots (no gather reads the prompt's)."""
    import jax
    import jax.numpy as jnp

    from pifi_jax.layers import KVCache

    batch, beams, prompt, slots = 2, 3, 5, 9
    rng = np.random.default_rng(0)
    cache = KVCache.create(batch * beams, slots, 2, 4, layers=3)
    keys = rng.standard_normal(cache.key.shape).astype(np.float32)
    # Every beam of a row holds its row's prompt keys; the later slots differ per beam.
    keys[:, :, :prompt] = np.repeat(keys[:, ::beams, :prompt], beams, axis=1)
    mask = rng.integers(0, 2, cache.mask.shape).astype(np.int32)
    cache = cache.replace(key=jnp.asarray(keys), value=jnp.asarray(-keys), mask=jnp.asarray(mask))
    rows = jnp.asarray([2, 2, 0, 4, 3, 3])  # within each row's beams
    ours, theirs = cache.reorder_beams(rows, prompt), cache.take_rows(rows)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def gather_operands(jaxpr):  # sub-jaxprs (jnp.take's pjit) included
        for e in jaxpr.eqns:
            if e.primitive.name == "gather":
                yield e.invars[0].aval.shape
            for sub in jax.core.jaxprs_in_params(e.params):
                yield from gather_operands(sub)

    jaxpr = jax.make_jaxpr(lambda c: c.reorder_beams(rows, prompt))(cache).jaxpr
    gathered = list(gather_operands(jaxpr))
    key_gathers = [s for s in gathered if len(s) == 5]
    assert key_gathers and all(s[2] == slots - prompt for s in key_gathers), gathered
