"""Parity of the decoder families with transformers (PyTorch) on tiny random models, and round trips.

Every case is a random model built from a transformers config (no download). The PyTorch side runs
eager attention, the reference for sliding windows and soft-capping.
"""

import json

import numpy as np
import pytest

import pifi_jax
from tests.hf_reference import TINY_DECODER

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
_DECODER = TINY_DECODER
# name -> (config class, config kwargs). Heads 4, kv heads 2 (GQA) unless the family differs.
CASES = {
    "llama": (
        "LlamaConfig",
        dict(
            _DECODER, rope_scaling=LLAMA3_ROPE, rope_theta=500.0, attention_bias=True, mlp_bias=True
        ),
    ),
    # Tied embeddings and dynamic NTK scaling, active because the batch is longer than 8.
    "llama_tied_dynamic": (
        "LlamaConfig",
        dict(
            _DECODER,
            tie_word_embeddings=True,
            max_position_embeddings=8,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
    ),
    "llama_linear": ("LlamaConfig", dict(_DECODER, rope_scaling={"type": "linear", "factor": 3.0})),
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=4)),
    # Layer 1 slides (max_window_layers=1), layer 0 is global.
    "qwen2": (
        "Qwen2Config",
        dict(_DECODER, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
    "gemma2": (
        "Gemma2Config",
        dict(
            _DECODER,
            head_dim=16,
            query_pre_attn_scalar=12,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "falcon": (  # Falcon-7B style
        "FalconConfig",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            alibi=False,
            bias=False,
            initializer_range=0.1,
        ),
    ),
    "falcon_sequential": (
        "FalconConfig",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=False,
            parallel_attn=False,
            bias=True,
            tie_word_embeddings=False,
            initializer_range=0.1,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.1,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
}


def tiny_decoder(case: str, seed: int = 0, **overrides):
    """A random transformers causal LM for `case` (eager attention), norms and biases perturbed."""
    torch.manual_seed(seed)
    cfg_name, kwargs = CASES[case]
    config = getattr(transformers, cfg_name)(**{**kwargs, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms and biases: away from their 0 / 1 initialisation
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def padded_batch(batch: int = 3, length: int = 10, left: bool = False, seed: int = 0):
    """input_ids / attention_mask with rows 2 * b shorter (padding on the right or the left)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 99, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(batch):
        pad = 2 * b
        if left:
            mask[b, :pad] = 0
        else:
            mask[b, length - pad :] = 0
    return ids, mask


def torch_forward(model, ids, mask, position_ids=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=None if position_ids is None else torch.as_tensor(position_ids),
        )
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def ours(module, params, ids, mask):
    return np.asarray(module.apply({"params": params}, ids, mask))


def base_model(model):
    return model.transformer if hasattr(model, "transformer") else model.model


@pytest.mark.parametrize("case", list(CASES))
def test_causal_lm_logits_match_transformers_with_right_padding(case, tmp_path):
    model = tiny_decoder(case)
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    ids, mask = padded_batch()
    theirs = torch_forward(model, ids, mask)
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero numbers
    # Padding slots too: with right padding both sides give them positions 0..length-1.
    np.testing.assert_allclose(ours(module, params, ids, mask), theirs, atol=1e-5)
    assert ("lm_head" in params) != model.config.tie_word_embeddings  # no duplicate leaf


def test_left_padding_uses_positions_from_the_mask(tmp_path):
    model = tiny_decoder("llama")
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    ids, mask = padded_batch(left=True)
    logits = ours(module, params, ids, mask)
    # transformers' generate() numbering for left padding: cumsum(mask) - 1, padding set to 1.
    position_ids = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 1)
    theirs = torch_forward(model, ids, mask, position_ids)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], theirs[real], atol=1e-5)
    # The same sequences padded on the right (where causal logits of real tokens are those of the
    # unpadded sequence) give the same logits: each row is read as if it stood alone.
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        right_ids[row, :n], right_mask[row, :n] = ids[row, real[row]], 1
    right = ours(module, params, right_ids, right_mask)
    np.testing.assert_allclose(logits[real], right[right_mask.astype(bool)], atol=1e-5)


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "gemma2", "falcon", "gpt2"])
def test_bare_decoder_hidden_states_match(case, tmp_path):
    model = tiny_decoder(case)
    model.save_pretrained(tmp_path / "lm")
    base_model(model).save_pretrained(tmp_path / "base")  # keys without the base prefix
    ids, mask = padded_batch()
    theirs = torch_forward(base_model(model), ids, mask)
    for sub in ["lm", "base"]:
        module, params = pifi_jax.from_pretrained(tmp_path / sub, task="decoder")
        assert set(params) == {"transformer" if case in ("falcon", "gpt2") else "model"}
        np.testing.assert_allclose(ours(module, params, ids, mask), theirs, atol=1e-5)


def test_gpt2_hub_layout_with_buffers_and_conv1d(tmp_path):
    """Original GPT-2 checkpoints: no `transformer.` prefix, attention-mask buffers, [in, out]."""
    from safetensors.numpy import load_file, save_file

    model = tiny_decoder("gpt2")
    model.transformer.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    tensors["h.0.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
    tensors["h.0.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    kernel = params["transformer"]["h_0"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_array_equal(kernel, tensors["h.0.attn.c_attn.weight"])
    ids, mask = padded_batch()
    np.testing.assert_allclose(
        ours(module, params, ids, mask), torch_forward(model, ids, mask), atol=1e-5
    )


@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_round_trip_through_transformers(case, tmp_path):
    model = tiny_decoder(case)
    model.save_pretrained(tmp_path / "src")
    module, params = pifi_jax.from_pretrained(tmp_path / "src", task="causal_lm")
    pifi_jax.save_pretrained(module, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    ids, mask = padded_batch(seed=1)
    np.testing.assert_allclose(
        torch_forward(reloaded, ids, mask), torch_forward(model, ids, mask), atol=1e-5
    )


def test_bare_decoder_round_trip(tmp_path):
    model = tiny_decoder("qwen2")
    model.save_pretrained(tmp_path / "src")
    module, params = pifi_jax.from_pretrained(tmp_path / "src", task="decoder")
    pifi_jax.save_pretrained(module, params, tmp_path / "out")
    reloaded = transformers.AutoModel.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model.model)
    ids, mask = padded_batch()
    np.testing.assert_allclose(
        torch_forward(reloaded, ids, mask), ours(module, params, ids, mask), atol=1e-5
    )


def _edit_config(path, drop=(), **changes):
    config = json.loads((path / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_legacy_rope_fields_are_read(tmp_path):
    """Configs written by transformers 4.x: rope_theta at the top and rope_scaling."""
    model = tiny_decoder("llama")
    model.save_pretrained(tmp_path)
    rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    _edit_config(
        tmp_path,
        drop=["rope_parameters"],
        rope_theta=500.0,
        rope_scaling={"type": "llama3", **rope},
    )
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    assert module.config.rope.rope_type == "llama3" and module.config.rope.theta == 500.0
    ids, mask = padded_batch()
    np.testing.assert_allclose(
        ours(module, params, ids, mask), torch_forward(model, ids, mask), atol=1e-5
    )


@pytest.mark.parametrize(
    "case, changes, message",
    [
        ("llama", {"some_new_switch": True}, "some_new_switch"),
        ("llama", {"sliding_window": 4}, "sliding_window"),  # Llama has none; not silently used
        ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta": 1}}, "beta"),
        ("falcon", {"alibi": True}, "alibi"),
        ("falcon", {"new_decoder_architecture": True}, "new_decoder_architecture"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ],
)
def test_unsupported_config_values_are_refused(case, changes, message, tmp_path):
    tiny_decoder(case).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        pifi_jax.from_pretrained(tmp_path, task="causal_lm")


def test_decoder_sharding_axes_cover_the_projections(tmp_path):
    from pifi_jax import parallel
    from pifi_jax.hub.pretrained import _flatten
    from pifi_jax.models import registry

    tiny_decoder("falcon").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="task 'encoder' is not supported"):
        pifi_jax.from_pretrained(tmp_path, task="encoder")
    for case in ["llama", "gemma2", "falcon", "gpt2"]:
        model = tiny_decoder(case)
        model.save_pretrained(tmp_path / case)
        module, params = pifi_jax.from_pretrained(tmp_path / case, task="causal_lm")
        flat = {"/".join(k): v for k, v in _flatten(params).items()}
        family = registry.family_for(module.config.model_type)
        axes = parallel.param_logical_axes(flat, family.PARAM_AXES)
        for path, leaf_axes in axes.items():
            if path.endswith(("kernel", "embedding")):
                assert any(a is not None for a in leaf_axes), path


def test_bfloat16_compute_is_close_to_fp32(tmp_path):
    import jax.numpy as jnp

    tiny_decoder("gemma2").save_pretrained(tmp_path)
    ids, mask = padded_batch()
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    module16, params16 = pifi_jax.from_pretrained(
        tmp_path, task="causal_lm", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )
    assert params16["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        ours(module16, params16, ids, mask), ours(module, params, ids, mask), atol=0.1
    )


# The config.json files of the checkpoints PiFi uses, as published (written by transformers 4.x).
HUB_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "meta-llama/Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    },
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "Qwen/Qwen2-7B": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    },
    "google/gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "sliding_window_size": 4096,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 256000,
    },
    "tiiuae/falcon-7b": {
        "alibi": False,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0,
        "bias": False,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_dropout": 0.0,
        "hidden_size": 4544,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "falcon",
        "multi_query": True,
        "new_decoder_architecture": False,
        "num_attention_heads": 71,
        "num_hidden_layers": 32,
        "parallel_attn": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 65024,
    },
    "openai-community/gpt2": {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 50256,
        "embd_pdrop": 0.1,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": 50257,
    },
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_published_configs_parse_and_agree_with_transformers(name):
    from pifi_jax.models import registry

    hf = HUB_CONFIGS[name]
    config = registry.config_from_hf(hf)
    theirs = transformers.AutoConfig.for_model(**hf)
    ours = transformers.AutoConfig.for_model(**config.to_hf_config())
    for field in ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]:
        assert getattr(ours, field) == getattr(theirs, field), field
    for field in ["num_key_value_heads", "sliding_window", "layer_types", "rope_parameters"]:
        assert getattr(ours, field, None) == getattr(theirs, field, None), field
    if name.endswith("Llama-3.1-8B"):
        assert config.rope.rope_type == "llama3" and config.rope.theta == 500000.0
    if name.endswith("gemma-2-9b"):
        assert [config.layer_window(i) for i in (40, 41)] == [4096, None]


def test_dropout_is_active_only_when_not_deterministic(tmp_path):
    import jax

    tiny_decoder("gpt2").save_pretrained(tmp_path)  # resid/embd/attn dropout 0.1
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm")
    ids, mask = padded_batch()
    train = module.apply(
        {"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    assert np.abs(np.asarray(train) - ours(module, params, ids, mask)).max() > 1e-3
