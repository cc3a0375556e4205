"""save_pretrained of PEFT models: LoRA, DoRA and IA3 are merged into weights that transformers
loads with the PEFT model's logits; BitFit's leaves are plain weights; bottleneck adapters and
prefix / prompt tuning are refused before anything is written, naming what to do instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import pifi_jax
from pifi_jax import partition, peft
from tests.conftest import write_tiny_decoder, write_tiny_encoder


def _quiet(*_):
    pass


def _perturbed(params):
    """PEFT leaves moved off their identity start (LoRA B = 0, IA3 = 1, ...), so that a save
    that dropped them would change the logits."""
    rng = np.random.default_rng(0)
    flat = partition.flatten(params)
    for path, value in flat.items():
        if any(k in path for k in ("lora_", "ia3_", "bias", "adapter_", "prefix", "prompt")):
            flat[path] = np.asarray(value) + 0.2 * rng.standard_normal(value.shape).astype(
                np.float32
            )
    return partition.unflatten(flat)


IDS = np.array([[2, 5, 9, 7, 11, 6], [2, 8, 4, 10, 0, 0]])
MASK = (IDS != 0).astype(np.int64)
MASK[:, 0] = 1

MERGED = {
    "lora-bert": ("bert", peft.LoraConfig(r=2, lora_alpha=4)),
    "ia3-bert": ("bert", peft.IA3Config()),
    "dora-llama": ("llama", peft.DoraConfig(r=2, lora_alpha=4)),
    "lora-llama": (
        "llama",
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "down_proj")),
    ),
    "bitfit-bert": ("bert", peft.BitFitConfig()),
}


def _load(tmp_path, family, config):
    if family == "bert":
        path = write_tiny_encoder(tmp_path / "base", family)
        module, params = pifi_jax.from_pretrained(
            path, task="classification", num_labels=3, peft=config, log=_quiet
        )
        torch_class = transformers.AutoModelForSequenceClassification
    else:
        path = write_tiny_decoder(tmp_path / "base", family)
        module, params = pifi_jax.from_pretrained(path, task="causal_lm", peft=config, log=_quiet)
        torch_class = transformers.AutoModelForCausalLM
    return module, params, torch_class


@pytest.mark.parametrize("case", list(MERGED))
def test_merged_peft_model_reloads_in_transformers_with_the_same_logits(tmp_path, case):
    family, config = MERGED[case]
    module, start, torch_class = _load(tmp_path, family, config)
    params = _perturbed(start)
    ours = np.asarray(module.apply({"params": params}, IDS, attention_mask=MASK))
    # the perturbed PEFT leaves matter: the model at their start gives other logits
    at_start = np.asarray(module.apply({"params": start}, IDS, attention_mask=MASK))
    assert np.abs(at_start - ours).max() > 1e-3
    out = pifi_jax.save_pretrained(module, params, tmp_path / "out")
    reloaded = torch_class.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        result = reloaded(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    theirs = result.logits.numpy()
    if family != "bert":  # a causal LM's padded positions are not compared
        ours, theirs = ours[MASK.astype(bool)], theirs[MASK.astype(bool)]
    np.testing.assert_allclose(theirs, ours, atol=2e-5)


@pytest.mark.parametrize(
    "config",
    [
        peft.AdapterConfig(kind="houlsby", bottleneck_size=4),
        peft.PrefixTuningConfig(num_virtual_tokens=2),
        peft.PromptTuningConfig(num_virtual_tokens=2),
    ],
    ids=["adapter", "prefix", "prompt"],
)
def test_peft_models_without_a_plain_form_are_refused_before_writing(tmp_path, config):
    module, params, _ = _load(tmp_path, "bert", config)
    with pytest.raises(ValueError, match=r"save_adapter.*") as error:
        pifi_jax.save_pretrained(module, params, tmp_path / "out")
    assert repr(config.method) in str(error.value)
    assert not (tmp_path / "out").exists()
