"""BART against transformers (PyTorch) on tiny random models: logits, encoder output, cached
decoding, save/load round trips, strict configs, and LoRA / IA3 files shared with Hugging Face PEFT.

The reference has encoder and decoder of different depths, heads and widths, so a mix-up between
the two sides cannot pass; weights are scaled up (hf_reference.scale_up) so attention is far from
uniform, and final_logits_bias is random so that a lost buffer shows. Generation runs greedy and
3-beam search against transformers' generate on right-padded sources.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.layers import Seq2SeqCache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.hf_reference import scale_up  # noqa: E402

PAD, START, ATOL = 1, 2, 1e-5
TINY_BART = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=2,
    encoder_ffn_dim=37,
    decoder_ffn_dim=41,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=START,
)
# scale_embedding on and off; the second case also takes another activation.
CASES = {
    "scaled": dict(scale_embedding=True),
    "unscaled": dict(scale_embedding=False, activation_function="gelu_new"),
}


def tiny_bart(case: str = "scaled", seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BartConfig(**TINY_BART, **CASES[case])
    model = scale_up(transformers.BartForConditionalGeneration(config))
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (transformers model, its save_pretrained directory)."""
    out = {}
    for case in CASES:
        directory = tmp_path_factory.mktemp(f"bart_{case}")
        model = tiny_bart(case)
        model.save_pretrained(directory)
        out[case] = (model, directory)
    return out


def batch(seed: int = 0, source: int = 10, target: int = 6):
    """Right-padded sources (row b has 3 * b pads) and targets (row 1 has 2), ids >= 3."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, size=(3, source)).astype(np.int32)
    mask = np.ones_like(ids)
    for b in range(3):
        mask[b, source - 3 * b :] = 0
    ids[mask == 0] = PAD
    decoder_ids = rng.integers(3, 99, size=(3, target)).astype(np.int32)
    decoder_ids[:, 0] = START
    decoder_mask = np.ones_like(decoder_ids)
    decoder_mask[1, target - 2 :] = 0
    decoder_ids[decoder_mask == 0] = PAD
    return ids, mask, decoder_ids, decoder_mask


def torch_logits(model, ids, mask, decoder_ids, decoder_mask=None) -> np.ndarray:
    def t(x):
        return None if x is None else torch.as_tensor(x, dtype=torch.long)

    with torch.no_grad():
        out = model(
            input_ids=t(ids),
            attention_mask=t(mask),
            decoder_input_ids=t(decoder_ids),
            decoder_attention_mask=t(decoder_mask),
        )
    return out.logits.numpy()


def load(directory, **kw):
    return pifi_jax.from_pretrained(directory, task="seq2seq", log=lambda *_: None, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_encoder_output_match_transformers(case, checkpoints):
    model, directory = checkpoints[case]
    module, params = load(directory)
    assert module.is_encoder_decoder and module.task == "seq2seq"
    ids, mask, decoder_ids, decoder_mask = batch()
    theirs = torch_logits(model, ids, mask, decoder_ids, decoder_mask)
    assert np.abs(theirs).max() > 1.0
    ours = module.apply({"params": params}, ids, mask, decoder_ids, decoder_mask)
    assert ours.dtype == jnp.float32 and ours.shape == (3, 6, 99)
    # Padding slots too: both sides compute them the same way.
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL)

    hidden = module.apply({"params": params}, ids, mask)  # encoder only
    with torch.no_grad():
        expected = model.model.encoder(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=ATOL)


def test_cached_decoding_equals_the_full_forward(checkpoints):
    """First call given the encoder output (cross keys/values go to the cache), then one token per
    call reading them from the cache: the logits of the whole target, token by token."""
    _, directory = checkpoints["scaled"]
    module, params = load(directory)
    ids, mask, decoder_ids, _ = batch(seed=1)
    full = np.asarray(module.apply({"params": params}, ids, mask, decoder_ids))
    hidden = module.apply({"params": params}, ids, mask)
    cfg = module.config
    assert (cfg.num_layers, cfg.num_heads, cfg.cache_kv_heads, cfg.head_dim) == (3, 2, 2, 16)
    cache = Seq2SeqCache.create(
        3,
        8,
        jnp.asarray(mask),
        layers=cfg.num_layers,
        kv_heads=cfg.cache_kv_heads,
        heads=cfg.num_heads,
        head_dim=cfg.head_dim,
    )
    logits, cache = module.apply(
        {"params": params}, None, None, decoder_ids[:, :2], encoder_hidden=hidden, cache=cache
    )
    pieces = [np.asarray(logits)]
    for t in range(2, decoder_ids.shape[1]):
        logits, cache = module.apply(
            {"params": params}, None, None, decoder_ids[:, t : t + 1], cache=cache
        )
        pieces.append(np.asarray(logits))
    assert int(cache.self_attn.index) == decoder_ids.shape[1]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=ATOL)


def test_save_pretrained_round_trip_and_tied_copies(checkpoints, tmp_path):
    """transformers loads our directory with the same logits, and we load it back strictly; the
    tied copies of the shared embedding that checkpoints may carry are ignored on purpose."""
    from safetensors.numpy import load_file, save_file

    from pifi_jax import parallel
    from pifi_jax.hub.pretrained import _flatten
    from pifi_jax.models import bart

    model, directory = checkpoints["unscaled"]
    module, params = load(directory)
    pifi_jax.save_pretrained(module, params, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == ["BartForConditionalGeneration"]
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask, decoder_ids, decoder_mask = batch(seed=2)
    expected = torch_logits(model, ids, mask, decoder_ids, decoder_mask)
    np.testing.assert_allclose(
        torch_logits(reloaded, ids, mask, decoder_ids, decoder_mask), expected, atol=ATOL
    )

    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert "final_logits_bias" in tensors and "lm_head.weight" not in tensors
    shared = tensors["model.shared.weight"]
    for key in ["lm_head.weight", "model.encoder.embed_tokens.weight"]:
        tensors[key] = shared
    save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    module2, params2 = load(tmp_path / "out")
    ours = module2.apply({"params": params2}, ids, mask, decoder_ids, decoder_mask)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL)

    axes = parallel.param_logical_axes(_flatten(params), bart.PARAM_AXES)
    for path, leaf_axes in axes.items():
        if path.endswith(("kernel", "embedding")):
            assert any(a is not None for a in leaf_axes), path


# The config.json of facebook/bart-base (written by transformers 4.x), task_specific_params cut.
BART_BASE = {
    "_name_or_path": "bart-base",
    "activation_dropout": 0.1,
    "activation_function": "gelu",
    "add_bias_logits": False,
    "add_final_layer_norm": False,
    "architectures": ["BartModel"],
    "attention_dropout": 0.1,
    "bos_token_id": 0,
    "classif_dropout": 0.1,
    "classifier_dropout": 0.0,
    "d_model": 768,
    "decoder_attention_heads": 12,
    "decoder_ffn_dim": 3072,
    "decoder_layerdrop": 0.0,
    "decoder_layers": 6,
    "decoder_start_token_id": 2,
    "dropout": 0.1,
    "early_stopping": True,
    "encoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 6,
    "eos_token_id": 2,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
    "gradient_checkpointing": False,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"},
    "init_std": 0.02,
    "is_encoder_decoder": True,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
    "max_position_embeddings": 1024,
    "model_type": "bart",
    "no_repeat_ngram_size": 3,
    "normalize_before": False,
    "normalize_embedding": True,
    "num_beams": 4,
    "num_hidden_layers": 6,
    "pad_token_id": 1,
    "scale_embedding": False,
    "torch_dtype": "float32",
    "transformers_version": "4.12.0.dev0",
    "use_cache": True,
    "vocab_size": 50265,
}


def test_published_config_parses_and_round_trips():
    from pifi_jax.models import bart, registry

    config = registry.config_from_hf(BART_BASE)
    with pytest.raises(ValueError, match="use seq2seq"):
        bart.build(config, "causal_lm", 0, jnp.float32, jnp.float32)
    assert (config.d_model, config.encoder_layers, config.num_layers) == (768, 6, 6)
    theirs = transformers.BartConfig(**config.to_hf_config())
    for field in ["d_model", "encoder_layers", "decoder_ffn_dim", "activation_dropout"]:
        assert getattr(theirs, field) == BART_BASE[field], field


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"some_new_switch": True}, "some_new_switch"),
        ({"normalize_before": True}, "normalize_before"),  # mBART's pre-LN
        ({"add_final_layer_norm": True}, "add_final_layer_norm"),
        ({"encoder_layerdrop": 0.1}, "encoder_layerdrop"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_unsupported_config_fields_are_refused(changes, message, checkpoints, tmp_path):
    _, directory = checkpoints["scaled"]
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_dropout_is_active_only_when_not_deterministic(checkpoints):
    _, directory = checkpoints["scaled"]  # dropout 0.1 (transformers' default)
    module, params = load(directory)
    ids, mask, decoder_ids, _ = batch()
    eval_logits = module.apply({"params": params}, ids, mask, decoder_ids)
    train = module.apply(
        {"params": params},
        ids,
        mask,
        decoder_ids,
        deterministic=False,
        rngs={"dropout": jax.random.key(0)},
    )
    assert np.abs(np.asarray(train) - np.asarray(eval_logits)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Hugging Face PEFT interop.

HF_METHODS = {
    "lora": (
        peft.LoraConfig(r=4, lora_alpha=8),
        ("LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False)),
    ),
    "ia3": (peft.IA3Config(), ("IA3Config", dict(init_ia3_weights=False))),
}


def _perturbed(params, seed=1):
    """Adapter leaves moved off their initialisation, so nothing passes by identity."""
    from pifi_jax.train import partition

    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path.rsplit("/", 1)[-1] in peft.core.ADAPTER_LEAVES:
            flat[path] = np.asarray(value) + 0.1 * rng.standard_normal(value.shape).astype(
                np.float32
            )
    return partition.unflatten(flat)


@pytest.mark.parametrize("method", list(HF_METHODS))
def test_adapters_are_shared_with_hf_peft_both_ways(method, checkpoints, tmp_path):
    import peft as hf_peft

    from pifi_jax.train import partition

    ours_config, (hf_class, hf_fields) = HF_METHODS[method]
    _, directory = checkpoints["scaled"]

    def base():
        return transformers.BartForConditionalGeneration.from_pretrained(directory).eval()

    ids, mask, decoder_ids, decoder_mask = batch(seed=3)

    # Ours -> PEFT, with Hugging Face PEFT's default targets (every q_proj / v_proj: encoder
    # self-attention, decoder self- and cross-attention; IA3 also fc2, scaling its input).
    module, params = load(directory, peft=ours_config)
    params = _perturbed(params)
    peft.save_adapter(module, params, tmp_path / "ours", format="peft")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "model.decoder.layers.2.encoder_attn.v_proj" in saved["target_modules"]
    ours = np.asarray(module.apply({"params": params}, ids, mask, decoder_ids, decoder_mask))
    assert np.abs(ours - torch_logits(base(), ids, mask, decoder_ids, decoder_mask)).max() > 1e-2
    loaded = hf_peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    np.testing.assert_allclose(
        ours, torch_logits(loaded, ids, mask, decoder_ids, decoder_mask), atol=ATOL
    )

    # PEFT -> ours, with the trainable-parameter count PEFT reports.
    hf_config = getattr(hf_peft, hf_class)(task_type="SEQ_2_SEQ_LM", **hf_fields)
    torch_model = hf_peft.get_peft_model(base(), hf_config).eval()
    trainable, _ = partition.split_params(params, peft.trainable_rules(module, params))
    assert (
        sum(x.size for x in jax.tree.leaves(trainable))
        == (torch_model.get_nb_trainable_parameters()[0])
    )
    torch_model.save_pretrained(tmp_path / "theirs")
    module, params = load(directory, peft=peft.read_adapter_config(tmp_path / "theirs"))
    params = peft.load_adapter(module, params, tmp_path / "theirs")
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": params}, ids, mask, decoder_ids, decoder_mask)),
        torch_logits(torch_model, ids, mask, decoder_ids, decoder_mask),
        atol=ATOL,
    )


def test_bottleneck_adapters_attach_and_virtual_tokens_are_refused(checkpoints):
    from pifi_jax.train import partition

    _, directory = checkpoints["scaled"]
    module, params = load(directory, peft=peft.AdapterConfig(kind="houlsby", bottleneck_size=4))
    hosts = {
        p.rsplit("/adapter_down/", 1)[0] for p in partition.flatten(params) if "adapter_down" in p
    }
    assert "model/decoder/layers_2/encoder_attn" in hosts and "model/encoder/layers_1" in hosts
    assert len(hosts) == 2 * 2 + 3 * 3  # encoder: self_attn, fc2; decoder: + encoder_attn
    base_module, base_params = load(directory)
    ids, mask, decoder_ids, _ = batch()
    np.testing.assert_allclose(  # up starts at zero: the adapted model starts as the base model
        np.asarray(module.apply({"params": params}, ids, mask, decoder_ids)),
        np.asarray(base_module.apply({"params": base_params}, ids, mask, decoder_ids)),
        atol=1e-6,
    )
    for config in [peft.PrefixTuningConfig(num_virtual_tokens=2), peft.PromptTuningConfig()]:
        with pytest.raises(ValueError, match="not supported for 'bart'"):
            load(directory, peft=config)


# ---------------------------------------------------------------------------------------------
# Generation on a right-padded source batch (10, 7 and 4 real tokens).

NEW = 8
# transformers' BART generation defaults that would change plain greedy / beam search.
PLAIN = dict(
    forced_bos_token_id=None,
    forced_eos_token_id=None,
    no_repeat_ngram_size=0,
    min_length=0,
    length_penalty=1.0,
    early_stopping=False,
)


def hf_generate(model, ids, mask, **kw) -> np.ndarray:
    """transformers' new tokens (the start token dropped), padded to NEW with PAD."""
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            **PLAIN,
            **kw,
        ).numpy()[:, 1:]
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)


def up_to_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Each row with everything after its first eos replaced by PAD."""
    tokens = np.array(tokens)
    for row in tokens:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1 :] = PAD
    return tokens


# Each case compiles a whole generation loop (about 8 s here): beam search with -m slow.
@pytest.mark.parametrize("method", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_generation_matches_transformers(method, checkpoints):
    model, directory = checkpoints["scaled"]
    module, params = load(directory)
    ids, mask, _, _ = batch(seed=4)
    # As eos the token transformers' greedy run emits in row 1 at step 3, so that row stops early
    # (the tiny model repeats tokens a lot; row 1 varies most).
    eos = int(hf_generate(model, ids, mask, eos_token_id=None, num_beams=1)[1, 3])
    beams = 3 if method == "beam" else 1
    theirs = hf_generate(model, ids, mask, eos_token_id=eos, pad_token_id=PAD, num_beams=beams)
    ours = pifi_jax.generate(
        module,
        params,
        ids,
        mask,
        max_new_tokens=NEW,
        method=method,
        num_beams=beams,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    ours = np.asarray(ours)
    assert ours.shape == (3, NEW) and (method == "beam" or eos in ours[1])
    np.testing.assert_array_equal(up_to_eos(ours, eos), up_to_eos(theirs, eos))
    np.testing.assert_array_equal(ours, up_to_eos(ours, eos))  # pad after eos
