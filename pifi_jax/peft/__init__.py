"""Parameter-efficient fine-tuning as leaves of the parameter tree.

    cfg = pifi_jax.peft.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value"))
    module, params = pifi_jax.from_pretrained("asset:minilm", num_labels=2, peft=cfg)
    print(pifi_jax.peft.summary(module, params))               # trainable vs total
    ... train with pifi_jax.peft.trainable_rules(module, params) ...
    pifi_jax.peft.save_adapter(module, params, "adapter/")       # loads in Hugging Face PEFT
    pifi_jax.peft.hf_refusal(module)   # why not, where PEFT has no format (then format="native")
    base_module, merged, undo = pifi_jax.peft.merge(module, params)

Methods: full fine-tuning, top-k layers, BitFit, LoRA (rsLoRA, dropout, bias), DoRA, IA3,
bottleneck adapters (Houlsby, Pfeiffer: adapters.py), prefix tuning (prefix.py), prompt tuning
(prompt.py), on every family: the encoders (classification) and the decoders (causal LM), with
Hugging Face PEFT's default targets per architecture (targets.py). Not on a scanned layer stack
(scan_layers=True): adapters address layers one by one.
"""

from pifi_jax.peft.config import (
    METHODS,
    AdapterConfig,
    BitFitConfig,
    DoraConfig,
    FullConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TopKConfig,
)
from pifi_jax.peft.core import (
    PeftModel,
    adapter_params,
    make_plan,
    merge,
    summary,
    trainable_mask,
    trainable_rules,
    unmerge,
    wrap,
)
from pifi_jax.peft.files import hf_refusal, load_adapter, read_adapter_config, save_adapter

__all__ = [
    "METHODS",
    "AdapterConfig",
    "BitFitConfig",
    "DoraConfig",
    "FullConfig",
    "IA3Config",
    "LoraConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TopKConfig",
    "adapter_params",
    "hf_refusal",
    "load_adapter",
    "make_plan",
    "merge",
    "read_adapter_config",
    "save_adapter",
    "summary",
    "trainable_mask",
    "trainable_rules",
    "unmerge",
    "wrap",
]
