"""Extractive question answering (`task="question_answering"`): parity with transformers'
`*ForQuestionAnswering` (PyTorch) on tiny random models of every encoder family, save_pretrained
round trips, plain-encoder checkpoints with a fresh head, and PEFT training the head."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import pifi_jax
from pifi_jax import peft
from pifi_jax.models import albert, bert, deberta, llama, registry
from tests import hf_reference as ref

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTH = 12
# model_type -> config fields on top of ref.TINY (type_vocab_size 2 everywhere, so token types
# matter), each switching on what sets the family apart.
FAMILIES = {
    "bert": {},
    "roberta": dict(pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "electra": dict(embedding_size=16),
    "albert": dict(embedding_size=16),
    "deberta": dict(relative_attention=True, pos_att_type="c2p|p2c", max_relative_positions=6),
    # the deberta-v3 layout (log buckets, shared attention keys, normalised relative embeddings)
    "deberta-v2": dict(
        relative_attention=True,
        pos_att_type="p2c|c2p",
        position_buckets=8,
        max_relative_positions=16,
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
    ),
}
ARCHITECTURES = {
    "bert": "BertForQuestionAnswering",
    "roberta": "RobertaForQuestionAnswering",
    "electra": "ElectraForQuestionAnswering",
    "albert": "AlbertForQuestionAnswering",
    "deberta": "DebertaForQuestionAnswering",
    "deberta-v2": "DebertaV2ForQuestionAnswering",
}
BASE_PREFIX = {"deberta-v2": "deberta"}  # HF's base_model_prefix where it is not the model type


def tiny_hf(model_type: str, task: str = "question_answering", seed: int = 0):
    """A random transformers model: `*ForQuestionAnswering`, or the bare `*Model` (task "encoder"),
    with weights scaled up so attention is far from uniform (ref.scale_up)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        model_type, **ref.TINY, **FAMILIES[model_type], attn_implementation="eager"
    )
    auto = (
        transformers.AutoModelForQuestionAnswering
        if task == "question_answering"
        else transformers.AutoModel
    )
    return ref.scale_up(auto.from_config(config))


def batch_of(model_type: str) -> dict[str, np.ndarray]:
    """Sentence pairs (token types 0 / 1), right-padded with the family's padding id."""
    return ref.random_batch(model_type, batch=3, length=LENGTH, pair=True)


def torch_qa(model, batch) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()})
    return out.start_logits.numpy(), out.end_logits.numpy()


def ours(module, params, batch) -> tuple[np.ndarray, np.ndarray]:
    start, end = module.apply({"params": params}, **batch, deterministic=True)
    return np.asarray(start), np.asarray(end)


def assert_real_close(actual, expected, mask, atol=1e-5):
    """Equal on the unpadded positions (padding logits are not defined by the reference's
    attention of a masked query, which differs between implementations only there)."""
    real = mask.astype(bool)
    np.testing.assert_allclose(actual[real], expected[real], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def qa_checkpoints(tmp_path_factory):
    """model_type -> (transformers QA model, its save_pretrained directory), built once."""
    made = {}

    def get(model_type):
        if model_type not in made:
            model = tiny_hf(model_type)
            directory = tmp_path_factory.mktemp(f"qa-{model_type}")
            model.save_pretrained(directory)
            made[model_type] = (model, directory)
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_qa_logits_match_transformers(model_type, qa_checkpoints):
    model, directory = qa_checkpoints(model_type)
    assert type(model).__name__ == ARCHITECTURES[model_type]
    logs = []
    module, params = pifi_jax.from_pretrained(directory, task="question_answering", log=logs.append)
    assert module.task == "question_answering"
    assert not logs  # strict: every tensor used, nothing initialised fresh
    flat = traverse_util.flatten_dict(params, sep="/")
    assert flat["qa_outputs/kernel"].shape == (ref.TINY["hidden_size"], 2)
    assert not any("pooler" in path or "classifier" in path for path in flat)

    batch = batch_of(model_type)
    start, end = ours(module, params, batch)
    assert start.shape == end.shape == (3, LENGTH)
    assert start.dtype == end.dtype == np.float32
    want_start, want_end = torch_qa(model, batch)
    mask = batch["attention_mask"]
    assert not mask.all()  # the batch is padded
    # start and end are far apart, so swapping them cannot pass the comparisons below
    assert np.abs(want_start - want_end)[mask.astype(bool)].min() > 1e-3
    assert_real_close(start, want_start, mask)
    assert_real_close(end, want_end, mask)
    # token types reach the model (every family here has type_vocab_size 2)
    flipped = dict(batch, token_type_ids=1 - batch["token_type_ids"])
    assert np.abs(ours(module, params, flipped)[0] - start).max() > 1e-3


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_save_pretrained_loads_in_transformers_with_equal_logits(
    model_type, qa_checkpoints, tmp_path
):
    model, directory = qa_checkpoints(model_type)
    module, params = pifi_jax.from_pretrained(directory, task="question_answering")
    pifi_jax.save_pretrained(module, params, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [ARCHITECTURES[model_type]]
    family = registry.family_for(model_type)
    assert family.hf_architecture(module.config, "question_answering") == saved["architectures"][0]

    reloaded, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert type(reloaded).__name__ == ARCHITECTURES[model_type]
    assert reloaded.config.num_labels == 2
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    reloaded.eval()
    batch = batch_of(model_type)
    got = torch_qa(reloaded, batch)
    want = torch_qa(model, batch)
    mine = ours(module, params, batch)
    for a, b, c in zip(got, want, mine, strict=True):
        np.testing.assert_array_equal(a, b)  # the same weights, bit for bit
        assert_real_close(c, a, batch["attention_mask"])


@pytest.mark.parametrize("model_type", ["bert", "albert", "deberta-v2"])
def test_plain_encoder_checkpoint_gets_a_fresh_qa_head(model_type, tmp_path):
    base = tiny_hf(model_type, task="encoder")
    assert type(base).__name__.endswith("Model")
    base.save_pretrained(tmp_path)
    logs = []
    module, params = pifi_jax.from_pretrained(
        tmp_path, task="question_answering", seed=3, log=logs.append
    )
    assert len(logs) == 1 and "newly initialised" in logs[0]
    assert "qa_outputs/kernel" in logs[0] and "qa_outputs/bias" in logs[0]
    flat = traverse_util.flatten_dict(params, sep="/")
    prefix = BASE_PREFIX.get(model_type, model_type)
    assert all(p.startswith(prefix + "/") for p in flat if not p.startswith("qa_outputs/"))
    assert not any("pooler" in p for p in flat)  # BertModel's pooler is dropped
    kernel, bias = np.asarray(flat["qa_outputs/kernel"]), np.asarray(flat["qa_outputs/bias"])
    assert kernel.shape == (ref.TINY["hidden_size"], 2)
    np.testing.assert_array_equal(bias, 0.0)
    assert 0.005 < kernel.std() < 0.05  # transformers' init: normal(0.02)

    # The logits are the head on the checkpoint's hidden states.
    batch = batch_of(model_type)
    with torch.no_grad():
        hidden = base(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state
    want = hidden.numpy() @ kernel + bias
    start, end = ours(module, params, batch)
    assert_real_close(start, want[..., 0], batch["attention_mask"])
    assert_real_close(end, want[..., 1], batch["attention_mask"])


def test_qa_checkpoint_loads_as_encoder_and_classification(qa_checkpoints):
    """A QA checkpoint's head is an optional tensor: other tasks drop it without complaint."""
    model, directory = qa_checkpoints("bert")
    batch = batch_of("bert")
    encoder, enc_params = pifi_jax.from_pretrained(directory, task="encoder", log=lambda _: None)
    hidden = np.asarray(encoder.apply({"params": enc_params}, **batch))
    with torch.no_grad():
        want = model.bert(**{k: torch.as_tensor(v) for k, v in batch.items()}).last_hidden_state
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], want.numpy()[real], atol=1e-5)

    logs = []
    clf, clf_params = pifi_jax.from_pretrained(directory, num_labels=3, log=logs.append)
    flat = traverse_util.flatten_dict(clf_params, sep="/")
    assert "qa_outputs/kernel" not in flat and flat["classifier/kernel"].shape == (32, 3)
    assert "classifier/kernel" in logs[0] and "bert/pooler/dense/kernel" in logs[0]
    assert clf.apply({"params": clf_params}, **batch).shape == (3, 3)


def test_unknown_task_errors_name_the_task(qa_checkpoints):
    _, directory = qa_checkpoints("bert")
    with pytest.raises(ValueError, match="'token_classification' is not supported"):
        pifi_jax.from_pretrained(directory, task="token_classification")
    for family, config in (
        (bert, bert.BertConfig()),
        (albert, albert.AlbertConfig()),
        (deberta, deberta.DebertaConfig()),
    ):
        with pytest.raises(ValueError, match="'bogus' is not supported.*question_answering"):
            family.build(config, "bogus", 2, jnp.float32, jnp.float32)
    # Decoders have no QA head: their build refuses the task by name.
    with pytest.raises(ValueError, match="'question_answering' is not supported"):
        llama.build(llama.LlamaConfig(), "question_answering", 2, jnp.float32, jnp.float32)


def test_lora_trains_the_qa_head_and_exports_to_hf_peft(qa_checkpoints, tmp_path):
    hf_peft = pytest.importorskip("peft")
    model, directory = qa_checkpoints("bert")
    config = peft.LoraConfig(r=4, lora_alpha=8)
    module, params = pifi_jax.from_pretrained(directory, task="question_answering", peft=config)
    trainable = traverse_util.flatten_dict(peft.core.adapter_params(module, params), sep="/")
    head = {p for p in trainable if not p.rsplit("/", 1)[-1].startswith("lora_")}
    assert head == {"qa_outputs/kernel", "qa_outputs/bias"}  # the head trains with the adapters

    # Move the adapters and the head off their initial values, export, load in HF PEFT.
    flat = traverse_util.flatten_dict(params, sep="/")
    rng = np.random.default_rng(1)
    for path in trainable:
        value = np.asarray(flat[path])
        flat[path] = jnp.asarray(value + 0.3 * rng.standard_normal(value.shape), value.dtype)
    params = traverse_util.unflatten_dict(flat, sep="/")
    peft.save_adapter(module, params, tmp_path / "adapter", format="peft")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "QUESTION_ANS"
    base = transformers.AutoModelForQuestionAnswering.from_pretrained(
        directory, attn_implementation="eager"
    )
    torch_model = hf_peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = batch_of("bert")
    mine = ours(module, params, batch)
    before = torch_qa(model, batch)
    # PEFT 0.21's PeftModelForQuestionAnswering.forward drops token_type_ids; the LoRA model under
    # it (adapters injected, head swapped for the saved one) takes them.
    after = torch_qa(torch_model.base_model, batch)
    for m, b, a in zip(mine, before, after, strict=True):
        assert np.abs(m - b).max() > 1e-3  # the adapter and the head matter
        assert_real_close(m, a, batch["attention_mask"])
