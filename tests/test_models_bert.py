"""Parity of the BERT family with transformers (PyTorch) on tiny random models, and round trips."""

import json

import numpy as np
import pytest

import pifi_jax
from tests import hf_reference as ref

torch = pytest.importorskip("torch")

FAMILIES = ["bert", "roberta", "electra"]


def _run(module, params, batch):
    return np.asarray(module.apply({"params": params}, **batch))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("pair", [False, True])
def test_classification_logits_match_transformers(model_type, pair, tmp_path):
    model = ref.tiny_encoder(model_type, num_labels=3)
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="classification", num_labels=3)
    batch = ref.random_batch(model_type, pair=pair)
    np.testing.assert_allclose(
        _run(module, params, batch), ref.torch_logits(model, batch), atol=1e-5
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_encoder_hidden_states_match_and_regression_head(model_type, tmp_path):
    model = ref.tiny_encoder(model_type, task="encoder")
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="encoder")
    batch = ref.random_batch(model_type)
    mask = batch["attention_mask"][..., None]
    ours, theirs = _run(module, params, batch) * mask, ref.torch_logits(model, batch) * mask
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # A base checkpoint loads under a new regression head (num_labels=1) with one output.
    module, params = pifi_jax.from_pretrained(tmp_path, task="classification", num_labels=1)
    assert _run(module, params, batch).shape == (3, 1)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("task", ["classification", "encoder"])
def test_save_pretrained_round_trip_through_transformers(model_type, task, tmp_path):
    import transformers

    model = ref.tiny_encoder(model_type, task=task, num_labels=2)
    model.save_pretrained(tmp_path / "src")
    module, params = pifi_jax.from_pretrained(tmp_path / "src", task=task, num_labels=2)
    pifi_jax.save_pretrained(module, params, tmp_path / "out")
    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "classification"
        else transformers.AutoModel
    )
    reloaded = auto.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(model)
    batch = ref.random_batch(model_type, pair=True)
    theirs = ref.torch_logits(reloaded, batch)
    if task == "encoder":
        theirs = theirs * batch["attention_mask"][..., None]
        ours = _run(module, params, batch) * batch["attention_mask"][..., None]
    else:
        ours = _run(module, params, batch)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_pytorch_bin_and_sharded_index_load(tmp_path):
    model = ref.tiny_encoder("bert")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    batch = ref.random_batch("bert")
    expected = ref.torch_logits(model, batch)
    for sub in ["bin", "sharded"]:
        module, params = pifi_jax.from_pretrained(tmp_path / sub, num_labels=3)
        np.testing.assert_allclose(_run(module, params, batch), expected, atol=1e-5)


def _write_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_strictness_errors_name_the_problem(tmp_path):
    ref.tiny_encoder("bert").save_pretrained(tmp_path)
    _write_config(tmp_path, position_embedding_type="relative_key")
    with pytest.raises(ValueError, match="position_embedding_type"):
        pifi_jax.from_pretrained(tmp_path, num_labels=3)
    _write_config(tmp_path, position_embedding_type="absolute", some_new_switch=True)
    with pytest.raises(ValueError, match="some_new_switch"):
        pifi_jax.from_pretrained(tmp_path, num_labels=3)
    _write_config(tmp_path, model_type="gpt_neox")
    with pytest.raises(ValueError, match="gpt_neox"):
        pifi_jax.from_pretrained(tmp_path, num_labels=3)


def test_wrong_shapes_and_unknown_tensors_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    ref.tiny_encoder("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias).*needs"):
        pifi_jax.from_pretrained(tmp_path, num_labels=5)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["bert.encoder.extra_block.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="extra_block"):
        pifi_jax.from_pretrained(tmp_path, num_labels=3)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pifi_jax.from_pretrained(tmp_path / "nope")


def test_bfloat16_compute_is_close_to_fp32(tmp_path):
    import jax.numpy as jnp

    ref.tiny_encoder("bert").save_pretrained(tmp_path)
    batch = ref.random_batch("bert")
    module, params = pifi_jax.from_pretrained(tmp_path, num_labels=3)
    module16, params16 = pifi_jax.from_pretrained(tmp_path, num_labels=3, dtype=jnp.bfloat16)
    assert params16["bert"]["encoder"]["layer_0"]["output"]["dense"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(
        _run(module16, params16, batch), _run(module, params, batch), atol=5e-2
    )
