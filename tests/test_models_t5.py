"""T5 / mT5 against transformers (PyTorch) on tiny random models: logits, encoder output, round
trips, strict configs, and greedy / beam generation token for token.

Three cases: the original T5 (ReLU feed-forward, lm head tied to `shared`, decoder output scaled
by d_model**-0.5), v1.1 / flan-t5 (gated-gelu, a separate lm_head, no scale) and mT5 (gated-gelu,
tied and, as transformers 5's MT5 does, never scaled). The encoder is one block deeper than the
decoder (transformers' generate sizes its cache by the encoder's depth), and 8 relative-position buckets with max distance 20 make the short test sequences reach
the log-spaced buckets. Weights are scaled up (hf_reference.scale_up) so that attention is far
from uniform and the logits are well above the tolerance.
"""

import json

import numpy as np
import pytest
from flax import traverse_util

import pifi_jax
from pifi_jax.models.t5 import T5Config
from tests.hf_reference import scale_up

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_T5 = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=3,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    decoder_start_token_id=0,
)
CASES = {
    "t5": ("T5Config", dict(feed_forward_proj="relu")),
    "t5_v1_1": ("T5Config", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": ("MT5Config", dict()),
}
NEW, PAD = 8, 0


def tiny_t5(case: str, seed: int = 0, weight_std: float = 0.15):
    """A random transformers seq2seq model for `case` (eager attention), weights scaled up.

    transformers 5 ties lm_head to `shared` in every freshly built T5, so the untied case gets a
    separate lm_head here (saved, it is the `lm_head.weight` that unties it again on load)."""
    torch.manual_seed(seed)
    cfg_name, kwargs = CASES[case]
    config = getattr(transformers, cfg_name)(**TINY_T5, **kwargs)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager")
    if kwargs.get("tie_word_embeddings") is False:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    return scale_up(model, weight_std)


def padded_pairs(seed: int = 0):
    """Sources [3, 9] and targets [3, 7], right-padded to different lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 99, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    targets = rng.integers(2, 99, size=(3, 7)).astype(np.int32)
    target_mask = np.ones_like(targets)
    for row, (source_pad, target_pad) in enumerate([(0, 0), (3, 2), (6, 5)]):
        mask[row, ids.shape[1] - source_pad :] = 0
        target_mask[row, targets.shape[1] - target_pad :] = 0
    ids[mask == 0] = PAD
    targets[target_mask == 0] = PAD
    return ids, mask, targets, target_mask


def torch_outputs(model, ids, mask, targets, target_mask):
    """(logits, encoder output) of the transformers model."""
    as_long = lambda x: torch.as_tensor(x, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        out = model(
            input_ids=as_long(ids),
            attention_mask=as_long(mask),
            decoder_input_ids=as_long(targets),
            decoder_attention_mask=as_long(target_mask),
        )
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (transformers model, its directory, pifi_jax module, params), built on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            model = tiny_t5(case)
            directory = tmp_path_factory.mktemp(case)
            model.save_pretrained(directory)
            module, params = pifi_jax.from_pretrained(directory, task="seq2seq", log=print)
            cache[case] = model, directory, module, params
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_encoder_output_match_transformers_with_padding(checkpoints, case):
    model, _, module, params = checkpoints(case)
    batch = padded_pairs()
    theirs, their_encoder = torch_outputs(model, *batch)
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero numbers
    ours = np.asarray(module.apply({"params": params}, *batch))
    assert ours.dtype == np.float32 and ours.shape == (3, 7, 99)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    encoder = np.asarray(module.apply({"params": params}, *batch[:2]))
    np.testing.assert_allclose(encoder, their_encoder, atol=1e-5, rtol=1e-5)
    # Untied iff a separate lm_head leaf; the stacks' embed_tokens copies are not leaves.
    assert ("lm_head" in params) == (case == "t5_v1_1")
    assert set(params) - {"lm_head"} == {"shared", "encoder", "decoder"}
    # One relative-position table per stack, in block 0's self-attention.
    tables = [p for p in traverse_util.flatten_dict(params, sep="/") if "relative" in p]
    assert sorted(tables) == [
        f"{stack}/block_0/layer_0/SelfAttention/relative_attention_bias/embedding"
        for stack in ("decoder", "encoder")
    ]


def test_dropout_is_active_only_when_not_deterministic(checkpoints):
    import jax

    _, _, module, params = checkpoints("t5_v1_1")
    batch = padded_pairs()
    eval_logits = np.asarray(module.apply({"params": params}, *batch))
    # Jitted (one compilation instead of a small one per random draw), at XLA's CPU optimisation
    # level 0, which compiles several times faster.
    train = jax.jit(
        lambda rng: module.apply(
            {"params": params}, *batch, deterministic=False, rngs={"dropout": rng}
        ),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    first = np.asarray(train(jax.random.key(0)))
    assert np.abs(first - eval_logits).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(train(jax.random.key(0))), first)


@pytest.mark.parametrize("case", ["t5", "t5_v1_1"])
def test_save_pretrained_round_trip(checkpoints, case, tmp_path):
    model, _, module, params = checkpoints(case)
    batch = padded_pairs(seed=1)
    ours = np.asarray(module.apply({"params": params}, *batch))
    pifi_jax.save_pretrained(module, params, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["T5ForConditionalGeneration"]
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(torch_outputs(reloaded, *batch)[0], ours, atol=1e-5, rtol=1e-5)
    module_again, params_again = pifi_jax.from_pretrained(tmp_path, task="seq2seq", log=print)
    assert module_again.config == module.config
    np.testing.assert_array_equal(
        np.asarray(module_again.apply({"params": params_again}, *batch)), ours
    )


def test_config_is_strict():
    hf = transformers.T5Config(**TINY_T5).to_dict()
    assert T5Config.from_hf_config(hf).num_layers == 2  # the decoder's depth
    with pytest.raises(ValueError, match="relative_attention_flavour"):
        T5Config.from_hf_config({**hf, "relative_attention_flavour": "other"})
    with pytest.raises(ValueError, match="is_decoder"):
        T5Config.from_hf_config({**hf, "is_decoder": True})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_hf_config({**hf, "feed_forward_proj": "gelu-gated"})
    mt5 = transformers.MT5Config(**TINY_T5).to_dict()
    with pytest.raises(ValueError, match="scale_decoder_outputs"):
        T5Config.from_hf_config({**mt5, "scale_decoder_outputs": True})
    # Older configs: tie_word_embeddings alone decides the scale (v1.1: untied, unscaled).
    old = {k: v for k, v in hf.items() if k != "scale_decoder_outputs"}
    v1_1 = T5Config.from_hf_config({**old, "tie_word_embeddings": False})
    assert not v1_1.tie_word_embeddings and not v1_1.scale_decoder_outputs
    assert T5Config.from_hf_config(old).scale_decoder_outputs


# ---------------------------------------------------------------------------------------------
# Generation: a right-padded source batch (9, 6 and 3 real tokens).


def hf_generate(model, ids, mask, **kw) -> np.ndarray:
    """transformers' new tokens (start token dropped), padded to NEW with PAD."""
    with torch.no_grad():
        out = model.generate(  # keywords only: PEFT's seq2seq model takes no positional input
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            **kw,
        ).numpy()[:, 1:]
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generation_matches_transformers(checkpoints, method):
    from tests.test_generate import assert_pad_after_eos, up_to_eos

    model, _, module, params = checkpoints("t5_v1_1")
    ids, mask, _, _ = padded_pairs()
    # As eos a token transformers' greedy run emits in row 0, so one row stops early.
    eos = int(hf_generate(model, ids, mask, eos_token_id=None)[0, 3])
    beams = {"num_beams": 3} if method == "beam" else {}
    theirs = hf_generate(model, ids, mask, eos_token_id=eos, pad_token_id=PAD, **beams)
    ours = np.asarray(
        pifi_jax.generate(
            module,
            params,
            ids,
            mask,
            max_new_tokens=NEW,
            method=method,
            num_beams=3,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    )
    assert ours.shape == (3, NEW)
    if method == "greedy":
        assert eos in ours[0]
    # After eos transformers' beam search fills with eos (pad is 0), pifi_jax with pad.
    np.testing.assert_array_equal(up_to_eos(ours, eos), up_to_eos(theirs, eos))
    assert_pad_after_eos(ours, eos)
