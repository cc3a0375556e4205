"""Bottleneck adapters (Houlsby, Pfeiffer): the hook's arithmetic, where adapters sit in each family,
identity at initialisation, counts from the PyTorch model's own parameter names, the native file.

The BERT/RoBERTa/ELECTRA x {houlsby, pfeiffer} training matrix is in tests/test_peft.py.
"""

from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.layers.linear import AdapterPlan, Bottleneck, adapter_scope
from pifi_jax.layers.peft_hooks import bottleneck_adapter
from pifi_jax.train import partition
from tests import hf_reference as ref

torch = pytest.importorskip("torch")

from tests.test_models_albert import batch_of as albert_batch  # noqa: E402
from tests.test_models_albert import tiny_albert  # noqa: E402
from tests.test_models_deberta import batch_of as deberta_batch  # noqa: E402
from tests.test_models_deberta import tiny_deberta  # noqa: E402

LABELS, M = 3, 4


class _Host(nn.Module):
    """The smallest module that hosts an adapter (its path is "" at the top level)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        return bottleneck_adapter(self, h)


def test_bottleneck_hook_computes_h_plus_up_act_down_h():
    host = _Host()
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    # Outside a PEFT scope (or not named by the plan) the hook is the identity and adds nothing.
    assert host.init(jax.random.PRNGKey(1), h) == {}
    plan = AdapterPlan(bottlenecks=(("", Bottleneck(3, "gelu")),))
    with adapter_scope(plan, True):
        params = host.init(jax.random.PRNGKey(1), h)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "adapter_down": {"kernel": (8, 3), "bias": (3,)},
        "adapter_up": {"kernel": (3, 8), "bias": (8,)},
    }
    assert not np.any(params["adapter_up"]["kernel"])  # up starts at zero: identity
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    with adapter_scope(plan, True):
        out = host.apply({"params": params}, h)
    down, up = params["adapter_down"], params["adapter_up"]
    inner = jax.nn.gelu(h @ down["kernel"] + down["bias"], approximate=False)
    np.testing.assert_allclose(out, h + inner @ up["kernel"] + up["bias"], atol=1e-5)


def _torch_bert():
    return ref.tiny_encoder("bert", num_labels=LABELS)


# name: (torch model factory, batch factory, kind, {module hosting an adapter in layer 0: the
# projection it follows}, adapter sites in all (None: per layer, 2 houlsby / 1 pfeiffer))
CASES = {
    "bert-houlsby": (
        _torch_bert,
        lambda: ref.random_batch("bert", pair=True),
        "houlsby",
        {
            "bert/encoder/layer_0/attention/output": "dense",
            "bert/encoder/layer_0/output": "dense",
        },
        4,
    ),
    "albert-houlsby": (
        lambda: tiny_albert("shared"),
        lambda: albert_batch(pair=True),
        "houlsby",
        {
            "albert/encoder/albert_layer_groups_0/albert_layers_0/attention": "dense",
            "albert/encoder/albert_layer_groups_0/albert_layers_0": "ffn_output",
        },
        2,  # one layer, shared across depth: one adapter per site, shared too
    ),
    "albert-pfeiffer": (
        lambda: tiny_albert("shared"),
        lambda: albert_batch(pair=True),
        "pfeiffer",
        {"albert/encoder/albert_layer_groups_0/albert_layers_0": "ffn_output"},
        1,
    ),
    "deberta-houlsby": (
        lambda: tiny_deberta("v1-c2p-p2c"),
        lambda: deberta_batch(pair=True),
        "houlsby",
        {
            "deberta/encoder/layer_0/attention/output": "dense",
            "deberta/encoder/layer_0/output": "dense",
        },
        None,  # 2 per layer
    ),
    "deberta-v3-pfeiffer": (
        lambda: tiny_deberta("v3"),
        lambda: deberta_batch(pair=True),
        "pfeiffer",
        {"deberta/encoder/layer_0/output": "dense"},
        None,  # 1 per layer
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapters_sit_after_the_output_projections(tmp_path, case):
    """Identity at init; trainable count from the PyTorch model's names; and placement: an adapter
    whose up projection is only a bias c adds c right after its projection, which is exactly the
    base model with c added to that projection's bias."""
    make_model, make_batch, kind, hosts, sites = CASES[case]
    torch_model = make_model()
    torch_model.save_pretrained(tmp_path / "base")
    config = peft.AdapterConfig(kind=kind, bottleneck_size=M)
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", num_labels=LABELS, peft=config, log=lambda *_: None
    )
    batch = make_batch()

    def apply(p):
        return np.asarray(module.apply({"params": p}, **batch))

    start = apply(params)
    np.testing.assert_allclose(start, ref.torch_logits(torch_model, batch), atol=1e-5)

    flat = partition.flatten(params)
    added = {p for p in flat if "/adapter_" in p}
    hidden = torch_model.config.hidden_size
    layers = torch_model.config.num_hidden_layers
    if sites is None:
        sites = layers * (2 if kind == "houlsby" else 1)
    assert len(added) == 4 * sites
    for host in hosts:
        assert flat[f"{host}/adapter_down/kernel"].shape == (hidden, M)
        assert flat[f"{host}/adapter_up/kernel"].shape == (M, hidden)

    named = dict(torch_model.named_parameters())
    head = sum(p.numel() for n, p in named.items() if n.startswith("classifier."))
    norms = sum(p.numel() for n, p in named.items() if "LayerNorm" in n or "layer_norm" in n)
    expected = head + sites * (hidden * M + M + M * hidden + hidden)
    expected += norms if kind == "houlsby" else 0
    trainable, _ = partition.split_params(params, peft.trainable_rules(module, params))
    assert sum(x.size for x in jax.tree.leaves(trainable)) == expected

    rng = np.random.default_rng(0)
    for host, projection in hosts.items():
        shift = rng.standard_normal(hidden).astype(np.float32)
        via_adapter = dict(flat)
        via_adapter[f"{host}/adapter_up/bias"] = shift
        via_bias = dict(flat)
        via_bias[f"{host}/{projection}/bias"] = flat[f"{host}/{projection}/bias"] + shift
        moved = apply(partition.unflatten(via_adapter))
        assert np.abs(moved - start).max() > 1e-3, host
        np.testing.assert_allclose(moved, apply(partition.unflatten(via_bias)), atol=1e-5)


def test_native_adapter_file_format(tmp_path):
    """The documented native layout: our paths and shapes as keys, the config in the JSON."""
    _torch_bert().save_pretrained(tmp_path / "base")
    config = peft.AdapterConfig(kind="pfeiffer", bottleneck_size=M, train_layernorms=True)
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", num_labels=LABELS, peft=config, log=lambda *_: None
    )
    params = partition.unflatten(
        {
            p: (v + 0.5 if "/adapter_" in p else v)  # not the initial values
            for p, v in partition.flatten(params).items()
        }
    )
    with pytest.raises(ValueError, match="Hugging Face PEFT has no format for 'adapter'"):
        peft.save_adapter(module, params, tmp_path / "hf", format="peft")
    peft.save_adapter(module, params, tmp_path / "native", format="native")
    meta = json.loads((tmp_path / "native" / "pifi_adapter.json").read_text())
    assert meta["method"] == "adapter" and meta["model_type"] == "bert"
    assert meta["config"]["kind"] == "pfeiffer" and meta["config"]["bottleneck_size"] == M
    assert peft.read_adapter_config(tmp_path / "native") == config

    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "native" / "adapter.safetensors"))
    trainable = partition.flatten(peft.adapter_params(module, params))
    assert set(stored) == set(trainable)
    assert stored["bert/encoder/layer_1/output/adapter_down/kernel"].shape == (32, M)
    assert "bert/encoder/layer_1/attention/output/LayerNorm/scale" in stored
    assert "bert/encoder/layer_1/attention/output/adapter_down/kernel" not in stored  # pfeiffer
    fresh_module, fresh = pifi_jax.from_pretrained(
        tmp_path / "base", num_labels=LABELS, peft=config, log=lambda *_: None
    )
    loaded = partition.flatten(peft.load_adapter(fresh_module, fresh, tmp_path / "native"))
    for path, value in partition.flatten(params).items():
        np.testing.assert_array_equal(loaded[path], value)


def test_adapter_errors(tiny_bert_dir):
    with pytest.raises(ValueError, match="adapter kind"):
        peft.AdapterConfig(kind="lora")
    with pytest.raises(ValueError, match="bottleneck_size"):
        peft.AdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="unsupported activation"):
        peft.AdapterConfig(non_linearity="swiglu")
    # Only a sub-layer's output projection has an adapter site.
    with pytest.raises(ValueError, match="no adapter site"):
        pifi_jax.from_pretrained(
            tiny_bert_dir,
            num_labels=2,
            peft=peft.AdapterConfig(target_modules=("query",)),
            log=lambda *_: None,
        )
    with pytest.raises(ValueError, match="no default target_modules for model_type 'opt'"):
        peft.adapters.plan(peft.AdapterConfig(), "opt", ["decoder/layers_0/fc2"])
    module, params = pifi_jax.from_pretrained(
        tiny_bert_dir, num_labels=2, peft=peft.AdapterConfig(bottleneck_size=2), log=lambda *_: None
    )
    with pytest.raises(ValueError, match="'adapter' cannot be folded"):
        peft.merge(module, params)
