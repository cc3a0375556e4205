"""Hugging Face `model_type` -> the pifi_jax family module that implements it.

A family module provides: `MODEL_TYPES`, a config dataclass `CONFIG` with `from_hf_config` /
`to_hf_config`, `build(config, task, num_labels, dtype, param_dtype)`, `hf_architecture(config, task)`,
`IGNORED_SOURCE_KEYS`, `OPTIONAL_SOURCE_KEYS`, `NEW_HEAD_PATHS` and `PARAM_AXES` (see models/bert.py).
Optional: `BASE_MODEL_PREFIX` (HF's base_model_prefix when it is not the model type: `model`,
`transformer`), `IN_OUT_KERNELS` (HF keys of linear weights stored [in, out], GPT-2's Conv1D) and
`LITERAL_NAMES` (module names ending in `_<digits>` that are not list indices: GPT-2's `ln_1`).
Decoder families also give `decoder_layer(config, index, dtype, param_dtype)`, `LAYER_KEYS` (regex
of one layer's tensor names: group 1 the index, group 2 the name inside the layer) and
`config.num_layers`, which `pifi_jax.load_layer` uses (see models/llama.py).
`ENCODER_DECODER = True` marks the encoder-decoder families (T5, BART).
`config_for_checkpoint(config, reader)`, optional: the config refined by the checkpoint's tensors,
for what a config leaves to them (T5's lm-head tying under transformers 5, models/t5.py).
Adding a family = one file in models/ and one entry in `_FAMILY_MODULES`.
"""

from types import ModuleType

from pifi_jax.models import albert, bart, bert, deberta, falcon, gemma2, gpt2, llama, t5

_FAMILY_MODULES: tuple[ModuleType, ...] = (
    bert,
    albert,
    deberta,
    llama,
    gemma2,
    falcon,
    gpt2,
    bart,
    t5,
)
_FAMILIES: dict[str, ModuleType] = {t: m for m in _FAMILY_MODULES for t in m.MODEL_TYPES}


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_for(model_type: str | None) -> ModuleType:
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {supported_model_types()}"
        ) from None


def config_from_hf(hf_config: dict):
    """The family config dataclass for a Hugging Face config dict (strict)."""
    return family_for(hf_config.get("model_type")).CONFIG.from_hf_config(hf_config)
