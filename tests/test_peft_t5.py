"""PEFT on T5 against Hugging Face PEFT (PyTorch), in both directions.

LoRA with PEFT's default T5 targets (q, v: the encoder's and the decoder's self-attention and the
decoder's cross-attention) and IA3 with its defaults (k, v and wo, wo as a feed-forward module that
scales its input), on the tiny v1.1 model of test_models_t5.py (gated-gelu, untied lm_head) with
padded sources and targets, and on the tiny mT5 with PEFT's mT5 defaults (IA3: k, v and wi_1, no
feed-forward module). Our export loaded by `peft.PeftModel.from_pretrained` and a PEFT-saved
adapter loaded by us give the same logits within 1e-5, and the trainable-parameter count equals
PEFT's. Adapters are moved off their initialisation first (LoRA B != 0, IA3 != 1), so nothing
passes by identity.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.peft.targets import hf_module_name
from pifi_jax.train import partition

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

from tests.test_models_t5 import padded_pairs, tiny_t5, torch_outputs  # noqa: E402

CASE = "t5_v1_1"
METHODS = {
    # name: (ours, Hugging Face PEFT's config class and fields, targeted module names)
    "lora": (
        peft.LoraConfig(r=4, lora_alpha=8),
        ("LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False)),
        r".*\.(SelfAttention|EncDecAttention)\.(q|v)",
    ),
    "ia3": (
        peft.IA3Config(),
        ("IA3Config", dict(init_ia3_weights=False)),
        r".*\.((SelfAttention|EncDecAttention)\.(k|v)|DenseReluDense\.wo)",
    ),
}


def _perturbed(params, seed=1):
    """PEFT leaves moved off their initialisation (a trained-looking adapter)."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path.rsplit("/", 1)[-1] in peft.core.ADAPTER_LEAVES:
            noise = 0.1 * rng.standard_normal(value.shape).astype(np.float32)
            flat[path] = np.asarray(value) + noise
    return partition.unflatten(flat)


def _trainable(module, params) -> int:
    trainable, _ = partition.split_params(params, peft.trainable_rules(module, params))
    return sum(x.size for x in jax.tree.leaves(trainable))


# mT5's IA3 defaults in PEFT differ from T5's: wi_1 instead of wo, and no feed-forward module.
MT5_TARGETED = {"ia3": r".*\.((SelfAttention|EncDecAttention)\.(k|v)|DenseReluDense\.wi_1)"}


@pytest.mark.parametrize("case", [CASE, "mt5"])
@pytest.mark.parametrize("method", list(METHODS))
def test_same_logits_as_hf_peft_both_ways(tmp_path, method, case):
    import re

    ours_config, (hf_class, hf_fields), targeted = METHODS[method]
    if case == "mt5":
        targeted = MT5_TARGETED.get(method, targeted)
    tiny_t5(case).save_pretrained(tmp_path / "base")
    batch = padded_pairs()
    quiet = dict(task="seq2seq", log=lambda *_: None)

    # Ours -> PEFT.
    module, params = pifi_jax.from_pretrained(tmp_path / "base", peft=ours_config, **quiet)
    assert module.is_encoder_decoder and module.task == "seq2seq"
    names = [hf_module_name(p) for p, _ in module.plan.adapters]
    assert names and all(re.fullmatch(targeted, n) for n in names)
    assert any(n.startswith("encoder.") for n in names) and any(
        "EncDecAttention" in n for n in names
    )
    params = _perturbed(params)
    peft.save_adapter(module, params, tmp_path / "ours", format="peft")
    loaded = hf_peft.PeftModel.from_pretrained(tiny_t5(case), tmp_path / "ours").eval()
    ours = np.asarray(module.apply({"params": params}, *batch))
    assert np.abs(ours - torch_outputs(tiny_t5(case), *batch)[0]).max() > 1e-2
    np.testing.assert_allclose(ours, torch_outputs(loaded, *batch)[0], atol=1e-5, rtol=1e-5)

    # PEFT -> ours, with the trainable-parameter count PEFT reports for the same method.
    hf_config = getattr(hf_peft, hf_class)(task_type="SEQ_2_SEQ_LM", **hf_fields)
    torch_model = hf_peft.get_peft_model(tiny_t5(case), hf_config).eval()
    assert _trainable(module, params) == torch_model.get_nb_trainable_parameters()[0]
    torch_model.save_pretrained(tmp_path / "theirs")
    config = peft.read_adapter_config(tmp_path / "theirs")
    module, params = pifi_jax.from_pretrained(tmp_path / "base", peft=config, **quiet)
    params = peft.load_adapter(module, params, tmp_path / "theirs")
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": params}, *batch)),
        torch_outputs(torch_model, *batch)[0],
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.slow
def test_generation_with_lora_matches_hf_peft(tmp_path):
    """pifi_jax.generate on a PeftModel (it forwards is_encoder_decoder): the greedy tokens of
    Hugging Face PEFT's generate on the same adapter."""
    from tests.test_models_t5 import NEW, PAD, hf_generate

    tiny_t5(CASE).save_pretrained(tmp_path / "base")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", task="seq2seq", peft=METHODS["lora"][0], log=lambda *_: None
    )
    params = _perturbed(params)
    peft.save_adapter(module, params, tmp_path / "ours", format="peft")
    loaded = hf_peft.PeftModel.from_pretrained(tiny_t5(CASE), tmp_path / "ours").eval()
    ids, mask, _, _ = padded_pairs()
    theirs = hf_generate(loaded, ids, mask, eos_token_id=None, pad_token_id=PAD)
    ours = pifi_jax.generate(
        module, params, ids, mask, max_new_tokens=NEW, eos_token_id=(), pad_token_id=PAD
    )
    np.testing.assert_array_equal(np.asarray(ours), theirs)


# HF module names of the sub-layer outputs each adapter kind follows in T5.
ADAPTER_SITES = {
    "houlsby": r".*\.block\.\d+\.layer\.\d+\.((SelfAttention|EncDecAttention)\.o|DenseReluDense\.wo)",
    "pfeiffer": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
}


@pytest.mark.parametrize("kind", list(ADAPTER_SITES))
def test_bottleneck_adapters_equal_hooks_on_transformers_t5(tmp_path, kind):
    """Hugging Face PEFT has no bottleneck adapters, so the reference is transformers' T5 with a
    forward hook on each site's projection adding up(relu(down(out))): same logits within 1e-5
    for random adapter weights; identity at init; Houlsby also trains every layer_norm."""
    import re

    torch_model = tiny_t5(CASE).eval()
    torch_model.save_pretrained(tmp_path / "base")
    batch = padded_pairs()
    config = peft.AdapterConfig(kind=kind, bottleneck_size=3)
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", task="seq2seq", peft=config, log=lambda *_: None
    )
    start = np.asarray(module.apply({"params": params}, *batch))
    np.testing.assert_allclose(start, torch_outputs(torch_model, *batch)[0], atol=1e-5)

    flat = partition.flatten(params)
    rng = np.random.default_rng(3)
    for path in [p for p in flat if "/adapter_" in p]:
        flat[path] = 0.3 * rng.standard_normal(flat[path].shape).astype(np.float32)
    hosts = sorted({p.rsplit("/adapter_", 1)[0] for p in flat if "/adapter_" in p})
    projection = {"SelfAttention": "o", "EncDecAttention": "o", "DenseReluDense": "wo"}
    modules = dict(torch_model.named_modules())
    hooked = []
    for host in hosts:
        name = f"{hf_module_name(host)}.{projection[host.rsplit('/', 1)[-1]]}"
        assert re.fullmatch(ADAPTER_SITES[kind], name), name
        hooked.append(name)
        w = {k: torch.as_tensor(np.asarray(flat[f"{host}/adapter_{k}"])) for k in (
            "down/kernel", "down/bias", "up/kernel", "up/bias")}  # fmt: skip

        def add(_, __, out, w=w):
            h = torch.relu(out @ w["down/kernel"] + w["down/bias"])
            return out + h @ w["up/kernel"] + w["up/bias"]

        modules[name].register_forward_hook(add)
    blocks = torch_model.config.num_layers + torch_model.config.num_decoder_layers
    assert len(hooked) == (
        blocks if kind == "pfeiffer" else 2 * blocks + torch_model.config.num_decoder_layers
    )
    moved = np.asarray(module.apply({"params": partition.unflatten(flat)}, *batch))
    assert np.abs(moved - start).max() > 1e-2
    np.testing.assert_allclose(moved, torch_outputs(torch_model, *batch)[0], atol=1e-5, rtol=1e-5)

    named = dict(torch_model.named_parameters())
    d, m = torch_model.config.d_model, 3
    expected = len(hooked) * (d * m + m + m * d + d)
    if kind == "houlsby":
        expected += sum(p.numel() for n, p in named.items() if "layer_norm" in n)
    assert _trainable(module, params) == expected
