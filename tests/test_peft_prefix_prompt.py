"""Prefix and prompt tuning on the encoders: the same logits as Hugging Face PEFT (PyTorch) in both
directions, and pifi_jax's own prefix on ALBERT and DeBERTa.

They are not the base model at initialisation, so every check is against `peft` itself: our export
loaded by `peft.PeftModel.from_pretrained`, and a PEFT-saved adapter loaded by us, on tiny random
transformers models with right padding of different lengths (so the extended masks matter).
Tolerance 1e-5 on logits of size ~0.1-1 (float32 on both sides; measured below 2e-6).
PEFT cannot prefix ALBERT or DeBERTa (their transformers models take no past_key_values); there
the checks are closed forms of the definition (peft/prefix.py) and the native format.
Decoders: test_peft_decoders.py.
"""

from __future__ import annotations

import json

import flax.linen as nn
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
    from types import SimpleNamespace

    from pifi_jax.peft import prefix

    with pytest.raises(ValueError, match="prefix tuning is not supported for 't5'"):
        prefix.attention_layers(SimpleNamespace(model_type="t5"), ["encoder/block_0/q"])


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


def _attention_inputs(seed=0, length=5, hidden=8, heads=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, length, hidden)).astype(np.float32)
    return x, rng


def _prefix_table(key, value):
    """A one-token, one-block prefix table [1, 2 * width] from key and value [heads, head_dim]."""
    return np.concatenate([key.reshape(-1), value.reshape(-1)])[None, :].astype(np.float32)


def _one_extra_slot(run, query, scale):
    """Checks attention output `run(table)` [q, heads, head_dim] against the closed form of one
    extra key/value slot (k, c) in the softmax: o' = (Z o + w c) / (Z + w), w = exp(q . k / scale),
    where o is the output without it and Z its softmax normaliser (relative to the extra slot).

    Z is unknown from outside, so it is measured first with k = 0 (w = 1 for every query):
    o'_0 - o = (c - o) / (Z + 1) must give the same Z on every dimension of a head."""
    heads, head_dim = query.shape[1:]
    base = run(None)
    value = np.full((heads, head_dim), 5.0, np.float32)
    zero_key = run(_prefix_table(np.zeros((heads, head_dim)), value))
    ratio = (zero_key - base) / (value - base)  # 1 / (Z + 1): [q, heads, head_dim]
    np.testing.assert_allclose(ratio, ratio[..., :1].repeat(head_dim, -1), rtol=1e-4, atol=1e-6)
    z = 1.0 / ratio[..., 0] - 1.0  # [q, heads]
    key = np.random.default_rng(3).standard_normal((heads, head_dim)).astype(np.float32)
    w = np.exp(np.einsum("qhd,hd->qh", query, key) / scale)  # [q, heads]
    expected = (z[..., None] * base + w[..., None] * value) / (z + w)[..., None]
    np.testing.assert_allclose(run(_prefix_table(key, value)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["deberta", "deberta-v2"])
def test_deberta_prefix_keys_meet_queries_by_content_only(model_type):
    """DeBERTa's disentangled attention with relative positions (c2p and p2c): a prefix key adds
    one slot whose score is q . k / sqrt(head_dim * 3), the real keys' scale, and no relative
    term (it has no position)."""
    from pifi_jax.layers.linear import AdapterPlan, adapter_scope
    from pifi_jax.models import deberta

    hidden, heads, length = 8, 2, 5
    config = deberta.DebertaConfig(
        model_type=model_type,
        hidden_size=hidden,
        num_attention_heads=heads,
        relative_attention=True,
        pos_att_type=("c2p", "p2c"),
        max_relative_positions=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    x, rng = _attention_inputs(length=length, hidden=hidden, heads=heads)
    relative = deberta.relative_positions(config, length)
    table = rng.standard_normal((config.rel_embedding_rows, hidden)).astype(np.float32)
    pair_mask = np.ones((1, length, length), bool)
    module = deberta.DisentangledSelfAttention(config)
    args = (x, pair_mask, relative, table, True)
    params = module.init(jax.random.PRNGKey(0), *args)["params"]
    params = jax.tree.map(
        lambda p: p + 0.5 * rng.standard_normal(p.shape).astype(np.float32), params
    )
    head_dim = hidden // heads
    if model_type == "deberta":  # per head [q | k | v] blocks, plus q_bias
        fused = (x[0] @ params["in_proj"]["kernel"]).reshape(length, heads, 3, head_dim)
        query = fused[:, :, 0] + params["q_bias"].reshape(heads, head_dim)
    else:
        q = params["query_proj"]
        query = (x[0] @ q["kernel"] + q["bias"]).reshape(length, heads, head_dim)

    def run(prefix):
        if prefix is None:
            out = module.apply({"params": params}, *args)
        else:
            with adapter_scope(AdapterPlan(prefix_layers=("",)), True, prefix=prefix):
                out = module.apply({"params": params}, *args)
        return np.asarray(out)[0].reshape(length, heads, head_dim)

    _one_extra_slot(run, query, np.sqrt(head_dim * 3))


def test_encoder_prefix_hook_is_one_more_softmax_slot():
    """The hook BERT-family and ALBERT attention share: the same closed form, scale 1/sqrt(d)."""
    from pifi_jax.layers import dot_product_attention
    from pifi_jax.layers.linear import AdapterPlan, adapter_scope
    from pifi_jax.layers.peft_hooks import attention_prefix

    class Host(nn.Module):
        @nn.compact
        def __call__(self, q, k, v, bias):
            k, v, bias = attention_prefix(self, k, v, bias)
            return dot_product_attention(q, k, v, bias)

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 5, 2, 4)).astype(np.float32) for _ in range(3))
    bias = np.zeros((1, 1, 1, 5), np.float32)

    def run(prefix):
        if prefix is None:
            return np.asarray(Host().apply({}, q, k, v, bias))[0]
        with adapter_scope(AdapterPlan(prefix_layers=("",)), True, prefix=prefix):
            return np.asarray(Host().apply({}, q, k, v, bias))[0]

    _one_extra_slot(run, q[0], np.sqrt(4))


def test_albert_prefix_has_a_block_per_layer_application(tmp_path):
    """ALBERT runs its shared layers at every depth; each run attends to its own prefix block,
    in depth order (two groups of two layers over three steps: groups 0, 0, 1). PEFT has no such
    prefix (nor on DeBERTa): the adapter is saved natively."""
    tiny_albert("groups").save_pretrained(tmp_path / "base")
    config = peft.PrefixTuningConfig(num_virtual_tokens=2)
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", num_labels=LABELS, peft=config, log=lambda *_: None
    )
    group = "albert/encoder/albert_layer_groups_{}/albert_layers_{}/attention"
    steps = [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)]
    assert module.plan.prefix_layers == tuple(group.format(*s) for s in steps)
    assert params["prefix_encoder"]["embedding"].shape == (2, 6 * 2 * 32)
    batch = albert_batch(pair=True)
    logits = _logits(module, params, batch)
    for block in range(6):
        table = np.array(params["prefix_encoder"]["embedding"])
        table[:, block * 64 : (block + 1) * 64] += 1.0
        changed = dict(params, prefix_encoder={"embedding": table})
        assert np.abs(_logits(module, changed, batch) - logits).max() > 1e-4, block
    from pifi_jax.peft import prefix

    for model_type in ("albert", "deberta", "deberta-v2"):
        assert "takes no past_key_values" in prefix.hf_refusal(model_type)
    assert prefix.hf_refusal("bert") is None and prefix.hf_refusal("llama") is None
    with pytest.raises(ValueError, match="Hugging Face PEFT cannot prefix it.*format='native'"):
        peft.save_adapter(module, params, tmp_path / "hf", format="peft")
    peft.save_adapter(module, params, tmp_path / "native", format="native")
    assert peft.read_adapter_config(tmp_path / "native") == config
