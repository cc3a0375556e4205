"""Prefix and prompt tuning: the same logits as Hugging Face PEFT (PyTorch) in both directions.

They are not the base model at initialisation, so every check is against `peft` itself: our export
loaded by `peft.PeftModel.from_pretrained`, and a PEFT-saved adapter loaded by us, on tiny random
transformers models with right padding of different lengths (so the extended masks matter).
Tolerance 1e-5 on logits of size ~0.1-1 (float32 on both sides; measured below 2e-6).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.train import partition
from tests import hf_reference as ref

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

from tests.test_models_albert import batch_of as albert_batch  # noqa: E402
from tests.test_models_albert import tiny_albert  # noqa: E402
from tests.test_models_deberta import batch_of as deberta_batch  # noqa: E402
from tests.test_models_deberta import tiny_deberta  # noqa: E402

LABELS, P, ATOL = 3, 5, 1e-5
CONFIGS = {
    # name: (ours, Hugging Face PEFT's)
    "prefix": (
        peft.PrefixTuningConfig(num_virtual_tokens=P),
        dict(cls="PrefixTuningConfig", num_virtual_tokens=P),
    ),
    "prefix_mlp": (
        peft.PrefixTuningConfig(
            num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8
        ),
        dict(
            cls="PrefixTuningConfig",
            num_virtual_tokens=P,
            prefix_projection=True,
            encoder_hidden_size=8,
        ),
    ),
    "prompt": (
        peft.PromptTuningConfig(num_virtual_tokens=P),
        dict(cls="PromptTuningConfig", num_virtual_tokens=P),
    ),
}


def _hf_config(spec: dict, token_dim: int | None = None):
    kwargs = dict(spec)
    cls = getattr(hf_peft, kwargs.pop("cls"))
    if token_dim is not None:
        kwargs["token_dim"] = token_dim
    return cls(task_type="SEQ_CLS", **kwargs)


def _perturbed(params, seed=1):
    """Prefix / prompt / head leaves moved off their initialisation (a trained-looking adapter)."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path.startswith(("prefix_encoder/", "prompt_encoder/", "classifier/")):
            noise = 0.3 * rng.standard_normal(value.shape)
            flat[path] = np.asarray(value) + noise.astype(np.float32)
    return partition.unflatten(flat)


def _logits(module, params, batch):
    return np.asarray(module.apply({"params": params}, **batch))


def _trainable(module, params) -> int:
    trainable, _ = partition.split_params(params, peft.trainable_rules(module, params))
    return sum(x.size for x in jax.tree.leaves(trainable))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """One saved tiny model per family, shared by the cases (and its factory)."""
    out = {}
    root = tmp_path_factory.mktemp("bases")
    for model_type in ("bert", "roberta", "electra"):
        ref.tiny_encoder(model_type, num_labels=LABELS).save_pretrained(root / model_type)
        out[model_type] = root / model_type
    return out


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_logits_as_hf_peft_both_ways(base_dirs, tmp_path, model_type, name):
    ours, theirs = CONFIGS[name]
    batch = ref.random_batch(model_type, pair=True)
    # ELECTRA embeds 16 wide before projecting to 32: that is the prompt's width (PEFT needs it
    # named; its default, hidden_size, cannot be concatenated with the word embeddings).
    token_dim = 16 if model_type == "electra" and name == "prompt" else None

    # Ours -> PEFT.
    module, params = pifi_jax.from_pretrained(
        base_dirs[model_type], num_labels=LABELS, peft=ours, log=lambda *_: None
    )
    params = _perturbed(params)
    peft.save_adapter(module, params, tmp_path / "ours", format="peft")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("PROMPT_TUNING" if name == "prompt" else "PREFIX_TUNING")
    loaded = hf_peft.PeftModel.from_pretrained(
        ref.tiny_encoder(model_type, num_labels=LABELS), tmp_path / "ours"
    ).eval()
    np.testing.assert_allclose(
        _logits(module, params, batch), ref.torch_logits(loaded, batch), atol=ATOL
    )

    # PEFT -> ours, with the trainable-parameter count PEFT reports for the same method.
    torch_model = hf_peft.get_peft_model(
        ref.tiny_encoder(model_type, num_labels=LABELS), _hf_config(theirs, token_dim)
    )
    assert _trainable(module, params) == torch_model.get_nb_trainable_parameters()[0]
    with torch.no_grad():
        for _, p in torch_model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "theirs")
    config = peft.read_adapter_config(tmp_path / "theirs")
    assert not getattr(config, "prefix_projection", False)  # the file holds the prefix itself
    module, params = pifi_jax.from_pretrained(
        base_dirs[model_type], num_labels=LABELS, peft=config, log=lambda *_: None
    )
    params = peft.load_adapter(module, params, tmp_path / "theirs")
    np.testing.assert_allclose(
        _logits(module, params, batch), ref.torch_logits(torch_model, batch), atol=ATOL
    )


@pytest.mark.parametrize(
    "arch, make_model, make_batch",
    [
        ("albert", lambda: tiny_albert("shared"), albert_batch),
        ("deberta", lambda: tiny_deberta("v1-c2p-p2c"), deberta_batch),
        ("deberta-v3", lambda: tiny_deberta("v3"), deberta_batch),
    ],
)
def test_prompt_tuning_on_albert_and_deberta_matches_hf_peft(
    tmp_path, arch, make_model, make_batch
):
    make_model().save_pretrained(tmp_path / "base")
    torch_model = make_model()
    width = getattr(torch_model.config, "embedding_size", None) or torch_model.config.hidden_size
    torch_model = hf_peft.get_peft_model(
        torch_model,
        hf_peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, token_dim=width),
    )
    with torch.no_grad():
        for _, p in torch_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "adapter")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base",
        num_labels=LABELS,
        peft=peft.read_adapter_config(tmp_path / "adapter"),
        log=lambda *_: None,
    )
    assert _trainable(module, params) == torch_model.get_nb_trainable_parameters()[0]
    params = peft.load_adapter(module, params, tmp_path / "adapter")
    batch = make_batch(pair=True)
    np.testing.assert_allclose(
        _logits(module, params, batch), ref.torch_logits(torch_model, batch), atol=ATOL
    )


def test_prompt_initialisation_from_vocabulary(tiny_bert_dir):
    """TEXT: the embeddings of the text's tokens (special tokens included), repeated to P, exactly
    as PEFT initialises them; from token ids likewise; SAMPLE_VOCAB: rows of the vocabulary."""
    text = "a good film"
    ours = peft.PromptTuningConfig(
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tiny_bert_dir),
    )
    module, params = pifi_jax.from_pretrained(
        tiny_bert_dir, num_labels=2, peft=ours, log=lambda *_: None
    )
    prompt = np.asarray(params["prompt_encoder"]["embedding"])
    table = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])

    import transformers

    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    theirs = hf_peft.get_peft_model(
        base,
        hf_peft.PromptTuningConfig(
            task_type="SEQ_CLS",
            num_virtual_tokens=7,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(tiny_bert_dir),
        ),
    )
    expected = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    np.testing.assert_array_equal(prompt, expected)

    ids = peft.PromptTuningConfig(
        num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_token_ids=[5, 9]
    )
    _, params = pifi_jax.from_pretrained(tiny_bert_dir, num_labels=2, peft=ids, log=lambda *_: None)
    np.testing.assert_array_equal(params["prompt_encoder"]["embedding"], table[[5, 9, 5, 9]])

    sampled = peft.PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    _, params = pifi_jax.from_pretrained(
        tiny_bert_dir, num_labels=2, peft=sampled, log=lambda *_: None
    )
    rows = np.asarray(params["prompt_encoder"]["embedding"])
    assert all((np.abs(table - row).max(axis=1) == 0).any() for row in rows)


def test_unsupported_uses_fail_clearly(tiny_bert_dir, tmp_path):
    module, params = pifi_jax.from_pretrained(
        tiny_bert_dir, num_labels=2, peft=CONFIGS["prefix_mlp"][0], log=lambda *_: None
    )
    with pytest.raises(ValueError, match="merge is defined for LoRA"):
        peft.merge(module, params)
    # A PEFT prefix file holds the prefix, not the MLP: a projection model refuses it.
    peft.save_adapter(module, params, tmp_path / "a")
    with pytest.raises(ValueError, match="prefix_projection=False"):
        peft.load_adapter(module, params, tmp_path / "a")
    # Sizes an imported adapter was made for are checked against the model.
    with pytest.raises(ValueError, match="num_attention_heads=8"):
        pifi_jax.from_pretrained(
            tiny_bert_dir,
            num_labels=2,
            peft=peft.PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=8),
            log=lambda *_: None,
        )
    with pytest.raises(ValueError, match="token_dim=16"):
        pifi_jax.from_pretrained(
            tiny_bert_dir,
            num_labels=2,
            peft=peft.PromptTuningConfig(num_virtual_tokens=2, token_dim=16),
            log=lambda *_: None,
        )
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peft.PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="num_transformer_submodules"):
        peft.config.from_hf_dict(
            {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "num_transformer_submodules": 2}
        )
    # DeBERTa / ALBERT attention has no place for a prefix (see peft/targets.py).
    from pifi_jax.peft import prefix

    with pytest.raises(ValueError, match="prefix tuning is not supported for 'deberta-v2'"):
        prefix.attention_layers("deberta-v2", ["deberta/encoder/layer_0/attention/self/key_proj"])


def test_prefix_reaches_every_layer_and_padding_sees_it(tiny_bert_dir):
    """Each layer's block of the table changes the output, and rows of any padding agree with
    the same rows run alone (the prefix extends every row's mask, padded or not)."""
    module, params = pifi_jax.from_pretrained(
        tiny_bert_dir, num_labels=2, peft=CONFIGS["prefix"][0], log=lambda *_: None
    )
    assert module.plan.prefix_layers == (
        "bert/encoder/layer_0/attention/self",
        "bert/encoder/layer_1/attention/self",
    )
    batch = ref.random_batch("bert", batch=3, length=10)
    batch["input_ids"] = np.minimum(batch["input_ids"], 28)  # the tiny vocabulary
    logits = _logits(module, params, batch)
    width = 2 * 32  # one layer's keys and values
    for layer in range(2):
        table = np.array(params["prefix_encoder"]["embedding"])
        table[:, layer * width : (layer + 1) * width] += 1.0
        changed = dict(params, prefix_encoder={"embedding": table})
        assert np.abs(_logits(module, changed, batch) - logits).max() > 1e-4, layer
    # Row 1 (two padding slots) alone, trimmed to its real length, gives the same logits.
    real = int(batch["attention_mask"][1].sum())
    alone = {k: v[1:2, :real] for k, v in batch.items()}
    alone_logits = _logits(module, params, alone)
    np.testing.assert_allclose(alone_logits[0], logits[1], atol=1e-5)
