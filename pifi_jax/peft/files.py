"""Adapter files: the trainable leaves alone, natively or in Hugging Face PEFT's format.

native ("pifi_adapter.json" + "adapter.safetensors"): every method (LoRA, DoRA, IA3, BitFit, top-k,
  bottleneck adapters, prefix and prompt tuning). The safetensors file maps our parameter paths to
  the trainable leaves exactly as they are in the tree (kernels [in, out]; bfloat16 written as
  float32), e.g. for Houlsby adapters on BERT
    bert/encoder/layer_0/attention/output/adapter_down/kernel  [d, m]
    bert/encoder/layer_0/attention/output/adapter_down/bias    [m]
    bert/encoder/layer_0/attention/output/adapter_up/kernel    [m, d]
    bert/encoder/layer_0/attention/output/adapter_up/bias      [d]
    bert/encoder/layer_0/attention/output/LayerNorm/scale      [d]   (train_layernorms)
    classifier/kernel, classifier/bias                               (the head)
  and for prefix tuning with prefix_projection the MLP itself (prefix_encoder/transform_0/...), so
  training can resume. The JSON is {"method": config.method, "config": the config's fields,
  "model_type": the base model's}; `read_adapter_config` rebuilds the config from it, and
  `load_adapter` requires the file's keys and shapes to be exactly the model's trainable leaves.
peft (adapter_config.json + adapter_model.safetensors): what `peft.PeftModel.from_pretrained`
  reads. Keys are `base_model.model.<HF module name>.<leaf>` with PEFT's layouts:
    lora_a [in, r]  <-> lora_A.weight [r, in]        lora_b [r, out] <-> lora_B.weight [out, r]
    lora_magnitude  <-> lora_magnitude_vector [out]
    ia3_l [out]     <-> ia3_l [out, 1]               ia3_l [in] (feed-forward) <-> ia3_l [1, in]
  modules_to_save (the head) are written under their HF names (`base_model.model.classifier.weight`).
  Prefix and prompt tuning (PEFT's prompt learning) store one tensor, `prompt_embeddings`: the
  prefix table [P, layers * 2 * token_dim] (token_dim: the hidden size, or kv_heads * head_dim
  under grouped-query attention, as PEFT sizes it; with prefix_projection, the MLP's output: PEFT
  keeps no MLP in a saved adapter) or the prompt [P, width]; the head is `base_model.<HF name>`.
  GPT-2's projections are Conv1D modules (weights [in, out]); PEFT marks LoRA on them
  `fan_in_fan_out`, which an export sets, but its lora_A / lora_B keep the layouts above.
  Hugging Face PEFT has no bottleneck adapters, BitFit or top-k, and cannot prefix ALBERT or DeBERTa
  (their transformers models take no past_key_values): those are native only (`hf_refusal`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.hub.pretrained import hf_key
from pifi_jax.models import registry
from pifi_jax.peft import config as peft_config
from pifi_jax.peft import prefix
from pifi_jax.peft.core import PeftModel, _flat, _unflat, adapter_params
from pifi_jax.peft.targets import hf_module_name

NATIVE_CONFIG, NATIVE_WEIGHTS = "pifi_adapter.json", "adapter.safetensors"
HF_CONFIG, HF_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Prompt learning in PEFT: one tensor for the prefix / prompt, and the head one level up.
_VIRTUAL_KEY, _VIRTUAL_PREFIX = "prompt_embeddings", "base_model."
_VIRTUAL_LEAVES = {"prefix": "prefix_encoder/embedding", "prompt": "prompt_encoder/embedding"}
_TASK_TYPES = {
    "classification": "SEQ_CLS",
    "question_answering": "QUESTION_ANS",
    "encoder": "FEATURE_EXTRACTION",
    "causal_lm": "CAUSAL_LM",
    "seq2seq": "SEQ_2_SEQ_LM",
}


def _numpy(x) -> np.ndarray:
    array = np.asarray(jax.device_get(x))
    return array.astype(np.float32) if array.dtype == jnp.bfloat16 else array


def _hf_key(module: PeftModel, path: str) -> tuple[str, bool]:
    """PEFT key and whether to transpose, for one of our adapter or head leaves."""
    method = module.peft_config.method
    if method in _VIRTUAL_LEAVES:
        if path == _VIRTUAL_LEAVES[method]:
            return _VIRTUAL_KEY, False
        key, transpose = hf_key(registry.family_for(module.config.model_type), path)
        return _VIRTUAL_PREFIX + key, transpose
    owner, _, leaf = path.rpartition("/")
    name = hf_module_name(owner)
    if leaf == "lora_a":
        return f"{_PREFIX}{name}.lora_A.weight", True
    if leaf == "lora_b":
        return f"{_PREFIX}{name}.lora_B.weight", True
    if leaf == "lora_magnitude":
        return f"{_PREFIX}{name}.lora_magnitude_vector", False
    if leaf == "ia3_l":
        return f"{_PREFIX}{name}.ia3_l", False
    key, transpose = hf_key(registry.family_for(module.config.model_type), path)
    return _PREFIX + key, transpose


def hf_refusal(module: PeftModel) -> str | None:
    """Why this model's adapter has no Hugging Face PEFT format; None when it has one."""
    method = module.peft_config.method
    if method in ("lora", "ia3", "prompt"):
        return None
    if method == "prefix":
        return prefix.hf_refusal(module.config.model_type)
    return f"Hugging Face PEFT has no format for {method!r}"


def _in_out_kernel(module: PeftModel, path: str) -> bool:
    """Whether the Linear at `path` is stored [in, out] by Hugging Face (GPT-2's Conv1D)."""
    family = registry.family_for(module.config.model_type)
    return not hf_key(family, f"{path}/kernel")[1]


def _ia3_kind(module: PeftModel, path: str) -> str | None:
    adapter = module.plan.get(path.rpartition("/")[0])
    return adapter.ia3 if adapter else None


def save_adapter(
    module: PeftModel, params: dict, directory: str | os.PathLike, format: str = "peft"
) -> Path:
    """Writes the trainable leaves of `params` (adapters + modules_to_save) to `directory`."""
    from safetensors.numpy import save_file

    if format not in ("peft", "native"):
        raise ValueError(f"format must be 'peft' or 'native', got {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = module.peft_config
    leaves = _flat(adapter_params(module, params))
    if format == "native":
        save_file({p: _numpy(v) for p, v in leaves.items()}, str(directory / NATIVE_WEIGHTS))
        meta = {
            "method": config.method,
            "config": dataclasses.asdict(config),
            "model_type": module.config.model_type,
        }
        (directory / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2))
        return directory
    refusal = hf_refusal(module)
    if refusal:
        raise ValueError(f"{refusal}; use format='native'")
    if config.method in _VIRTUAL_LEAVES:
        return _save_virtual(module, params, leaves, directory)
    tensors = {}
    for path, value in leaves.items():
        key, transpose = _hf_key(module, path)
        array = _numpy(value)
        if path.endswith("/ia3_l"):
            array = array[:, None] if _ia3_kind(module, path) == "output" else array[None, :]
        tensors[key] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, str(directory / HF_WEIGHTS), metadata={"format": "pt"})
    fan_in_fan_out = any(_in_out_kernel(module, p) for p, _ in module.plan.adapters)
    hf = peft_config.to_hf_dict(config, _TASK_TYPES.get(module.task), fan_in_fan_out)
    # The exact module names chosen, so PEFT selects the same modules whatever its defaults.
    hf["target_modules"] = sorted(hf_module_name(p) for p, _ in module.plan.adapters)
    if config.method == "ia3":
        hf["feedforward_modules"] = sorted(
            hf_module_name(p) for p, a in module.plan.adapters if a.ia3 == "input"
        )
    if config.modules_to_save is None:
        hf["modules_to_save"] = None  # PEFT adds the task head itself
    (directory / HF_CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True))
    return directory


def _prefix_table(module: PeftModel, params: dict) -> np.ndarray:
    """The prefix table [P, layers * 2 * hidden] the model computes (through its MLP, if any)."""
    encoder = prefix.encoder_for(
        module.peft_config, module.config, len(module.plan.prefix_layers), jnp.float32
    )
    return _numpy(encoder.apply({"params": params["prefix_encoder"]}))


def _save_virtual(module: PeftModel, params: dict, leaves: dict, directory: Path) -> Path:
    """Prefix / prompt tuning in PEFT's prompt-learning layout."""
    from safetensors.numpy import save_file

    config, model_config = module.peft_config, module.config
    tensors = {}
    for path, value in leaves.items():
        if path.startswith(("prefix_encoder/", "prompt_encoder/")):
            continue
        key, transpose = _hf_key(module, path)
        array = _numpy(value)
        tensors[key] = np.ascontiguousarray(array.T if transpose else array)
    if config.method == "prefix":
        tensors[_VIRTUAL_KEY] = _prefix_table(module, params)
        # Decoders with grouped-query attention: the prefix has the key/value heads (as PEFT).
        num_attention_heads, head_dim = prefix.kv_heads_and_dim(model_config)
        token_dim = num_attention_heads * head_dim
        num_layers = len(module.plan.prefix_layers)
    else:
        tensors[_VIRTUAL_KEY] = _numpy(leaves[_VIRTUAL_LEAVES["prompt"]])
        token_dim = tensors[_VIRTUAL_KEY].shape[1]
        num_layers = model_config.num_hidden_layers
        num_attention_heads = model_config.num_attention_heads
    save_file(tensors, str(directory / HF_WEIGHTS), metadata={"format": "pt"})
    hf = peft_config.virtual_to_hf_dict(
        config,
        _TASK_TYPES.get(module.task),
        token_dim=token_dim,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        encoder_hidden_size=getattr(config, "encoder_hidden_size", None) or token_dim,
    )
    (directory / HF_CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True))
    return directory


def read_adapter_config(directory: str | os.PathLike):
    """The method config stored in an adapter directory (either format)."""
    directory = Path(directory)
    if (directory / NATIVE_CONFIG).is_file():
        meta = json.loads((directory / NATIVE_CONFIG).read_text())
        return peft_config.CONFIG_CLASSES[meta["method"]](**meta["config"])
    if (directory / HF_CONFIG).is_file():
        return peft_config.from_hf_dict(json.loads((directory / HF_CONFIG).read_text()))
    raise FileNotFoundError(f"{directory} has neither {NATIVE_CONFIG} nor {HF_CONFIG}")


def load_adapter(module: PeftModel, params: dict, directory: str | os.PathLike) -> dict:
    """`params` with its adapter (and head) leaves replaced by those saved in `directory`.

    Strict: every stored tensor must land on a leaf of the same shape, and every trainable leaf of
    the model must be in the file.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    flat = _flat(params)
    wanted = _flat(adapter_params(module, params))
    if (directory / NATIVE_WEIGHTS).is_file():
        stored = dict(load_file(str(directory / NATIVE_WEIGHTS)))
        by_key = {p: (p, False) for p in wanted}
    elif (directory / HF_WEIGHTS).is_file():
        if getattr(module.peft_config, "prefix_projection", False):
            raise ValueError(
                "a Hugging Face PEFT prefix file holds the prefix itself, not an MLP: build the "
                "model with prefix_projection=False (read_adapter_config does)"
            )
        stored = dict(load_file(str(directory / HF_WEIGHTS)))
        by_key = {}
        for path in wanted:
            key, transpose = _hf_key(module, path)
            by_key[key] = (path, transpose)
    else:
        raise FileNotFoundError(f"no adapter weights in {directory}")
    unknown = sorted(set(stored) - set(by_key))
    if unknown:
        raise ValueError(
            f"adapter tensors in {directory} with no place in the model: {unknown[:8]}"
        )
    missing = sorted(by_key[k][0] for k in set(by_key) - set(stored))
    if missing:
        raise ValueError(
            f"adapter in {directory} lacks {len(missing)} leaves of the model: {missing[:8]}"
        )
    for key, array in stored.items():
        path, transpose = by_key[key]
        in_file = tuple(array.shape)
        if path.endswith("/ia3_l"):
            array = array.reshape(-1)
        if transpose:
            array = array.T
        target = flat[path]
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"adapter tensor {key} in {directory} has shape {in_file} (read as "
                f"{tuple(array.shape)}); the model's {path} needs {tuple(target.shape)}: the "
                "adapter was made for another base model or another configuration (rank, size)"
            )
        flat[path] = jax.device_put(
            jnp.asarray(array, dtype=target.dtype), getattr(target, "sharding", None)
        )
    return _unflat(flat)
