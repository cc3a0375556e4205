"""ALBERT parity with transformers (PyTorch) on tiny random models, shared leaves, round trips."""

import json

import jax
import numpy as np
import pytest

import pifi_jax
from tests import hf_reference as ref

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=99,
    embedding_size=16,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    # Non-zero rates: inference must ignore them as transformers' eval mode does.
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)
VARIANTS = {
    # The released layout: one layer, applied at all three depths.
    "shared": {},
    # Two groups of two layers over three steps: step i runs group int(i / 1.5) = 0, 0, 1.
    "groups": dict(num_hidden_groups=2, inner_group_num=2, hidden_act="gelu"),
}
LAYER_LEAVES = 16  # query/key/value/dense/ffn/ffn_output kernels+biases, two LayerNorms


def tiny_albert(variant="shared", task="classification", num_labels=3, seed=0):
    torch.manual_seed(seed)
    config = transformers.AlbertConfig(
        **TINY, **VARIANTS[variant], num_labels=num_labels, attn_implementation="eager"
    )
    cls = (
        transformers.AlbertForSequenceClassification
        if task == "classification"
        else transformers.AlbertModel
    )
    model = cls(config)
    return ref.scale_up(model)


def batch_of(pair=False, batch=3, length=11, seed=0):
    """Right-padded inputs of different lengths (see tests/hf_reference.py)."""
    return ref.padded_batch(batch, length, pair, seed, step=3)


def torch_output(model, batch):
    return ref.torch_logits(model, batch)


def run(module, params, batch):
    return np.asarray(module.apply({"params": params}, **batch))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pair", [False, True])
def test_classification_logits_match_transformers(variant, pair, tmp_path):
    model = tiny_albert(variant)
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, num_labels=3)
    batch = batch_of(pair)
    np.testing.assert_allclose(run(module, params, batch), torch_output(model, batch), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_hidden_states_match_on_real_tokens(variant, tmp_path):
    model = tiny_albert(variant, task="encoder")
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="encoder")
    batch = batch_of(pair=True)
    real = batch["attention_mask"].astype(bool)
    ours, theirs = run(module, params, batch), torch_output(model, batch)
    assert ours.shape == (3, 11, 32)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5)
    # The base checkpoint (with AlbertModel's pooler) loads under a fresh regression head.
    module, params = pifi_jax.from_pretrained(tmp_path, num_labels=1)
    assert run(module, params, batch).shape == (3, 1)


def test_shared_layer_is_one_set_of_leaves(tmp_path):
    tiny_albert("shared").save_pretrained(tmp_path)
    _, params = pifi_jax.from_pretrained(tmp_path, num_labels=3)
    encoder = params["albert"]["encoder"]
    assert sorted(encoder) == ["albert_layer_groups_0", "embedding_hidden_mapping_in"]
    assert sorted(encoder["albert_layer_groups_0"]) == ["albert_layers_0"]
    assert len(jax.tree.leaves(encoder["albert_layer_groups_0"])) == LAYER_LEAVES
    # Every leaf is one checkpoint tensor: 5 embedding, 2 mapping, 16 layer, 2 pooler, 2 classifier.
    assert len(jax.tree.leaves(params)) == 5 + 2 + LAYER_LEAVES + 2 + 2

    tiny_albert("groups").save_pretrained(tmp_path / "groups")
    _, params = pifi_jax.from_pretrained(tmp_path / "groups", num_labels=3)
    groups = {k: v for k, v in params["albert"]["encoder"].items() if k.startswith("albert_")}
    assert len(jax.tree.leaves(groups)) == 2 * 2 * LAYER_LEAVES


@pytest.mark.parametrize("task", ["classification", "encoder"])
def test_save_pretrained_round_trip_through_transformers(task, tmp_path):
    model = tiny_albert("groups", task=task, num_labels=2)
    model.save_pretrained(tmp_path / "src")
    module, params = pifi_jax.from_pretrained(tmp_path / "src", task=task, num_labels=2)
    pifi_jax.save_pretrained(module, params, tmp_path / "out")
    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "classification"
        else transformers.AutoModel
    )
    reloaded = auto.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    batch = batch_of(pair=True)
    ours, theirs = run(module, params, batch), torch_output(reloaded, batch)
    if task == "encoder":
        real = batch["attention_mask"].astype(bool)
        ours, theirs = ours[real], theirs[real]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_config_strictness(tmp_path):
    tiny_albert("shared").save_pretrained(tmp_path)
    # Fields of the released configs that transformers never reads are accepted at their values.
    _edit_config(
        tmp_path, down_scale_factor=1, gap_size=0, net_structure_type=0, num_memory_blocks=0
    )
    pifi_jax.from_pretrained(tmp_path, num_labels=3, log=lambda _: None)
    _edit_config(tmp_path, net_structure_type=1)
    with pytest.raises(ValueError, match="net_structure_type"):
        pifi_jax.from_pretrained(tmp_path, num_labels=3)
    _edit_config(tmp_path, net_structure_type=0, num_hidden_groups=4)
    with pytest.raises(ValueError, match="num_hidden_groups"):
        pifi_jax.from_pretrained(tmp_path, num_labels=3)
