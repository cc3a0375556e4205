"""DeBERTa (v1) and DeBERTa-v2/v3 parity with transformers (PyTorch) on tiny random models."""

import json

import numpy as np
import pytest

import pifi_jax
from pifi_jax.models import deberta
from tests import hf_reference as ref

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
LENGTH = 14
# Each variant switches on a different part of the computation. Lengths (14) exceed the relative
# spans below, so clipping and (for v2) log buckets are exercised.
VARIANTS = {
    "v1-c2p-p2c": (
        "deberta",
        dict(relative_attention=True, pos_att_type="c2p|p2c", max_relative_positions=6),
    ),
    # Without relative attention pos_att_type still enters the logit scale, as in transformers.
    "v1-absolute-only": (
        "deberta",
        dict(relative_attention=False, pos_att_type="c2p|p2c", type_vocab_size=2),
    ),
    "v1-c2p-talking-heads": (
        "deberta",
        dict(
            relative_attention=True,
            pos_att_type="c2p",
            talking_head=True,
            position_biased_input=False,
            type_vocab_size=2,
        ),
    ),
    "v1-p2c-embed-proj": (
        "deberta",
        dict(relative_attention=True, pos_att_type=["p2c"], embedding_size=16, cls_dropout=0.2),
    ),
    # The deberta-v3 layout.
    "v3": (
        "deberta-v2",
        dict(
            relative_attention=True,
            pos_att_type="p2c|c2p",
            position_buckets=8,
            max_relative_positions=16,
            share_att_key=True,
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
        ),
    ),
    # The deberta-v2-xlarge layout (convolution branch), without buckets.
    "v2-conv": (
        "deberta-v2",
        dict(
            relative_attention=True,
            pos_att_type="c2p|p2c",
            max_relative_positions=5,
            conv_kernel_size=3,
            conv_act="gelu",
            type_vocab_size=2,
            pooler_hidden_act="tanh",
        ),
    ),
    "v2-grouped-conv-c2p": (
        "deberta-v2",
        dict(
            relative_attention=True,
            pos_att_type="c2p",
            position_buckets=4,
            conv_kernel_size=5,
            conv_groups=2,
            embedding_size=16,
            position_biased_input=False,
        ),
    ),
    "v2-absolute-only": (
        "deberta-v2",
        dict(relative_attention=False, pos_att_type="p2c", type_vocab_size=2),
    ),
}
ROUND_TRIP = ["v1-c2p-talking-heads", "v3", "v2-grouped-conv-c2p"]


def tiny_deberta(variant, task="classification", num_labels=3, seed=0):
    model_type, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **TINY, **extra, num_labels=num_labels)
    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "classification"
        else transformers.AutoModel
    )
    model = auto.from_config(config)
    return ref.scale_up(model)


def batch_of(pair=False, batch=3, length=LENGTH, seed=0):
    """Right-padded inputs of different lengths (see tests/hf_reference.py)."""
    return ref.padded_batch(batch, length, pair, seed, step=4)


def torch_output(model, batch):
    return ref.torch_logits(model, batch)


def run(module, params, batch):
    return np.asarray(module.apply({"params": params}, **batch))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pair", [False, True])
def test_classification_logits_match_transformers(variant, pair, tmp_path):
    model = tiny_deberta(variant)
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, num_labels=3)
    batch = batch_of(pair)
    np.testing.assert_allclose(run(module, params, batch), torch_output(model, batch), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_hidden_states_match_on_real_tokens(variant, tmp_path):
    model = tiny_deberta(variant, task="encoder")
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="encoder")
    batch = batch_of(pair=True)
    real = batch["attention_mask"].astype(bool)
    ours, theirs = run(module, params, batch), torch_output(model, batch)
    assert ours.shape == (3, LENGTH, 32)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5)


@pytest.mark.parametrize("variant", ROUND_TRIP)
@pytest.mark.parametrize("task", ["classification", "encoder"])
def test_save_pretrained_round_trip_through_transformers(variant, task, tmp_path):
    model = tiny_deberta(variant, task=task, num_labels=2)
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
    batch = batch_of(pair=True)
    ours, theirs = run(module, params, batch), torch_output(reloaded, batch)
    if task == "encoder":
        real = batch["attention_mask"].astype(bool)
        ours, theirs = ours[real], theirs[real]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_base_checkpoint_loads_under_a_new_head_and_ignores_stray_position_embeddings(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = tiny_deberta("v3", task="encoder")
    model.save_pretrained(tmp_path)
    # Some released checkpoints carry absolute position embeddings that position_biased_input=false
    # leaves unused; they load without complaint, as in transformers.
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["embeddings.position_embeddings.weight"] = np.zeros((64, 32), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    module, params = pifi_jax.from_pretrained(tmp_path, num_labels=1, log=lambda _: None)
    assert "position_embeddings" not in params["deberta"]["embeddings"]
    assert sorted(params) == ["classifier", "deberta", "pooler"]
    assert run(module, params, batch_of()).shape == (3, 1)


def test_log_buckets_match_transformers():
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    config = deberta.DebertaConfig(model_type="deberta-v2", position_buckets=256)
    ours = deberta.relative_positions(config, 700)
    layer = torch.zeros(1, 700, 1)
    theirs = hf.build_relative_position(layer, layer, bucket_size=256, max_position=512)[0]
    np.testing.assert_array_equal(ours, theirs.numpy())


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_config_strictness(tmp_path):
    tiny_deberta("v1-c2p-p2c").save_pretrained(tmp_path)
    for change, match in [
        (dict(pos_att_type="c2p|p2p"), "pos_att_type"),
        (dict(share_att_key=True), "share_att_key"),  # a v2 field in a v1 config
        (dict(pooler_hidden_size=16), "pooler_hidden_size"),
        (dict(model_type="deberta-v2", attention_head_size=4), "attention_head_size"),
        (dict(model_type="deberta-v2", talking_head=True), "talking_head"),
        (dict(model_type="deberta-v2", conv_kernel_size=4), "conv_kernel_size"),
        (dict(model_type="deberta-v2", norm_rel_ebd="batch_norm"), "norm_rel_ebd"),
    ]:
        original = json.loads((tmp_path / "config.json").read_text())
        _edit_config(tmp_path, **change)
        with pytest.raises(ValueError, match=match):
            pifi_jax.from_pretrained(tmp_path, num_labels=3)
        (tmp_path / "config.json").write_text(json.dumps(original))


def test_v3_tokenizer_from_tokenizer_json_needs_no_sentencepiece(tmp_path):
    """AutoTokenizer builds a fast DeBERTa-v2/v3 tokenizer offline from tokenizer.json alone."""
    pieces = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", "▁the", "▁film", "▁was", "▁good", "▁"]
    vocab = [(p, 0.0 if p.startswith("[") else -float(i)) for i, p in enumerate(pieces)]
    transformers.DebertaV2Tokenizer(vocab=vocab).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.is_fast
    encoded = tokenizer("the film", "was good")
    assert encoded["input_ids"] == [1, 5, 6, 2, 7, 8, 2]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
