"""PEFT on the decoder families against Hugging Face PEFT (PyTorch), in both directions.

Our export loaded by `peft.PeftModel.from_pretrained` and a PEFT-saved adapter loaded by us give
the same logits (tolerance 1e-4; measured below 4e-6) on tiny random causal LMs with right padding
of different lengths, for LoRA, DoRA, IA3, prefix and prompt tuning; the trainable-parameter count
equals PEFT's. Adapters are moved off their initialisation first (LoRA B != 0, IA3 != 1, DoRA
m != |W|, prefix / prompt random), so nothing passes by identity. llama (grouped-query attention,
biases) and gpt2 (Conv1D projections, learned positions) run by default, the others with -m slow.
The method x architecture training matrix is in test_peft_families.py.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.train import partition

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

from tests.test_models_decoders import padded_batch, tiny_decoder, torch_forward  # noqa: E402

P, ATOL = 3, 1e-4
METHODS = {
    # name: (ours, Hugging Face PEFT's config kwargs (class, fields))
    "lora": (peft.LoraConfig(r=4, lora_alpha=8), ("LoraConfig", dict(r=4, lora_alpha=8))),
    "dora": (
        peft.DoraConfig(r=4, lora_alpha=8),
        ("LoraConfig", dict(r=4, lora_alpha=8, use_dora=True)),
    ),
    "ia3": (peft.IA3Config(), ("IA3Config", {})),
    "prefix": (peft.PrefixTuningConfig(num_virtual_tokens=P), ("PrefixTuningConfig", {})),
    "prompt": (peft.PromptTuningConfig(num_virtual_tokens=P), ("PromptTuningConfig", {})),
}
_NOT_IDENTITY = {"lora": dict(init_lora_weights=False), "dora": dict(init_lora_weights=False)}
_NOT_IDENTITY["ia3"] = dict(init_ia3_weights=False)
DEFAULT_ARCHS = ("llama", "gpt2")


def _cases():
    for arch in ("llama", "gpt2", "mistral", "qwen2", "gemma2", "falcon_sequential", "falcon"):
        for method in METHODS:
            marks = [] if arch in DEFAULT_ARCHS else [pytest.mark.slow]
            yield pytest.param(arch, method, marks=marks, id=f"{method}-{arch}")


def _perturbed(params, seed=1):
    """PEFT leaves moved off their initialisation (a trained-looking adapter)."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf in peft.core.ADAPTER_LEAVES or path.startswith(("prefix_", "prompt_")):
            flat[path] = np.asarray(value) + 0.3 * rng.standard_normal(value.shape).astype(
                np.float32
            )
    return partition.unflatten(flat)


def _ours(module, params, ids, mask):
    logits = np.asarray(module.apply({"params": params}, ids, mask))
    return logits[:, -ids.shape[1] :]  # prompt tuning: the prompt's slots dropped


def _theirs(model, ids, mask):
    return torch_forward(model, ids, mask)[:, -ids.shape[1] :]


def _trainable(module, params) -> int:
    trainable, _ = partition.split_params(params, peft.trainable_rules(module, params))
    return sum(x.size for x in jax.tree.leaves(trainable))


@pytest.mark.parametrize("arch, method", list(_cases()))
def test_same_logits_as_hf_peft_both_ways(tmp_path, arch, method):
    ours_config, (hf_class, hf_fields) = METHODS[method]
    tiny_decoder(arch).save_pretrained(tmp_path / "base")
    ids, mask = padded_batch()
    real = mask.astype(bool)  # padding slots' logits mean nothing (and differ under a prompt)

    # Ours -> PEFT.
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", task="causal_lm", peft=ours_config, log=lambda *_: None
    )
    params = _perturbed(params)
    peft.save_adapter(module, params, tmp_path / "ours", format="peft")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    if method in ("lora", "dora", "ia3"):  # GPT-2's Conv1D layers are marked as PEFT marks them
        assert saved["fan_in_fan_out"] == (arch == "gpt2")
    loaded = hf_peft.PeftModel.from_pretrained(tiny_decoder(arch), tmp_path / "ours").eval()
    ours = _ours(module, params, ids, mask)
    assert np.abs(ours - _theirs(tiny_decoder(arch), ids, mask))[real].max() > 1e-3
    np.testing.assert_allclose(ours[real], _theirs(loaded, ids, mask)[real], atol=ATOL)

    # PEFT -> ours, with the trainable-parameter count PEFT reports for the same method.
    if arch == "falcon" and method == "prefix":
        return  # PEFT's own defaults cannot prefix Falcon-7B's multi-query attention
    hf_config = getattr(hf_peft, hf_class)(
        task_type="CAUSAL_LM",
        **({"num_virtual_tokens": P} if method in ("prefix", "prompt") else {}),
        **hf_fields,
        **_NOT_IDENTITY.get(method, {}),
    )
    torch_model = hf_peft.get_peft_model(tiny_decoder(arch), hf_config)
    assert _trainable(module, params) == torch_model.get_nb_trainable_parameters()[0]
    if method in ("prefix", "prompt"):
        with torch.no_grad():
            for _, p in torch_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "theirs")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base",
        task="causal_lm",
        peft=peft.read_adapter_config(tmp_path / "theirs"),
        log=lambda *_: None,
    )
    params = peft.load_adapter(module, params, tmp_path / "theirs")
    np.testing.assert_allclose(
        _ours(module, params, ids, mask)[real], _theirs(torch_model, ids, mask)[real], atol=ATOL
    )


@pytest.mark.parametrize(
    "arch", ["llama", *(pytest.param(a, marks=pytest.mark.slow) for a in ("gpt2", "mistral"))]
)
def test_generation_with_a_prefix_matches_hf_peft(tmp_path, arch):
    """Decoding keeps the prefix in front of the KV cache, positions shifted by P (and, for
    mistral's sliding window of 4, the prefix masked as P earlier tokens): greedy tokens on
    left-padded prompts equal Hugging Face PEFT's generate."""
    from tests.test_generate import left_padded_prompts

    tiny_decoder(arch).save_pretrained(tmp_path / "base")
    torch_model = hf_peft.get_peft_model(
        tiny_decoder(arch), hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    with torch.no_grad():
        for _, p in torch_model.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    torch_model.eval().save_pretrained(tmp_path / "adapter")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base",
        task="causal_lm",
        peft=peft.read_adapter_config(tmp_path / "adapter"),
        log=lambda *_: None,
    )
    params = peft.load_adapter(module, params, tmp_path / "adapter")
    ids, mask = left_padded_prompts()
    ours = pifi_jax.generate(module, params, ids, mask, max_new_tokens=6, eos_token_id=())
    with torch.no_grad():
        theirs = torch_model.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    np.testing.assert_array_equal(np.asarray(ours), theirs[:, ids.shape[1] :].numpy())


def test_lora_on_gpt2_conv1d_merges_into_a_transformers_checkpoint(tmp_path):
    """Merged into GPT-2's [in, out] Conv1D kernels, LoRA gives the same logits, and the merged
    model saves as a plain transformers GPT-2 with them."""
    import transformers

    tiny_decoder("gpt2").save_pretrained(tmp_path / "base")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", task="causal_lm", peft=METHODS["dora"][0], log=lambda *_: None
    )
    params = _perturbed(params)
    base_module, merged, _ = peft.merge(module, params)
    ids, mask = padded_batch()
    expected = _ours(module, params, ids, mask)
    np.testing.assert_allclose(_ours(base_module, merged, ids, mask), expected, atol=1e-5)
    pifi_jax.save_pretrained(base_module, merged, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(_theirs(reloaded, ids, mask), expected, atol=1e-5)


def test_refused_uses_name_the_problem(tmp_path):
    tiny_decoder("mistral").save_pretrained(tmp_path / "mistral")  # no bias anywhere
    with pytest.raises(ValueError, match="BitFit: this mistral model has no bias parameters"):
        pifi_jax.from_pretrained(
            tmp_path / "mistral", task="causal_lm", peft=peft.BitFitConfig(), log=lambda *_: None
        )
    tiny_decoder("llama").save_pretrained(tmp_path / "llama")
    # A scanned stack holds every layer in one stacked leaf: PEFT needs the layers apart.
    with pytest.raises(ValueError, match="scan_layers"):
        pifi_jax.from_pretrained(
            tmp_path / "llama",
            task="causal_lm",
            peft=peft.LoraConfig(),
            scan_layers=True,
            log=lambda *_: None,
        )
    scanned, params = pifi_jax.from_pretrained(
        tmp_path / "llama", task="causal_lm", scan_layers=True, log=lambda *_: None
    )
    with pytest.raises(ValueError, match=r"scanned layer stack \(scan_layers=True\)"):
        peft.wrap(scanned, params, peft.LoraConfig())
    # A soft prompt has no cache slots of its own: generation refuses it.
    module, params = pifi_jax.from_pretrained(
        tmp_path / "llama", task="causal_lm", peft=METHODS["prompt"][0], log=lambda *_: None
    )
    ids, mask = padded_batch(left=True)
    with pytest.raises(ValueError, match="prompt tuning with a KV cache"):
        pifi_jax.generate(module, params, ids, mask, max_new_tokens=2)
