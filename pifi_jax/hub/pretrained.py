"""`from_pretrained` and `save_pretrained`: Hugging Face checkpoints in, Hugging Face checkpoints out."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax import parallel
from pifi_jax.hub import convert, gguf
from pifi_jax.hub.files import CheckpointReader, read_config, resolve_checkpoint
from pifi_jax.models import registry

TASKS = ("classification", "question_answering", "encoder", "causal_lm", "decoder", "seq2seq")
# Tasks whose module is the bare base model, saved without the base-model prefix.
_BARE_TASKS = ("encoder", "decoder")


def abstract_params(module: nn.Module, length: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of a module's parameters, without allocating them."""
    ids = jnp.zeros((1, length), jnp.int32)
    # An encoder-decoder creates its decoder's parameters only when it is given decoder inputs.
    inputs = (ids, None, ids) if getattr(module, "is_encoder_decoder", False) else (ids,)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs, deterministic=True))
    return _flatten(shapes["params"])


def _flatten(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def base_model_prefix(family, config) -> str:
    """Where task checkpoints nest the base model (HF's `base_model_prefix`): the model_type unless
    the family module names it in `BASE_MODEL_PREFIX` (both DeBERTa types use `deberta`)."""
    return getattr(family, "BASE_MODEL_PREFIX", config.model_type)


def in_out_kernels(family) -> tuple[str, ...]:
    """HF keys of the family's linear weights stored [in, out], kept untransposed (GPT-2's Conv1D)."""
    return tuple(getattr(family, "IN_OUT_KERNELS", ()))


def hf_key(family, path: str) -> tuple[str, bool]:
    """The HF tensor name of one of our parameter paths, and whether to transpose it."""
    literal = getattr(family, "LITERAL_NAMES", ())
    return convert.path_to_hf_key(path, in_out_kernels(family), literal)


def open_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None):
    """(tensor reader, Hugging Face config dict) for a checkpoint directory, hub id, `asset:` name,
    or llama.cpp GGUF file (or a directory holding one GGUF file and no config.json)."""
    gguf_file = gguf.find_gguf(path_or_hub_id)
    if gguf_file is not None:
        reader = gguf.GGUFCheckpoint(gguf_file)
        return reader, reader.hf_config
    directory = resolve_checkpoint(path_or_hub_id, revision)
    hf_config = read_config(directory)
    model_type = hf_config.get("model_type")
    if model_type not in registry.supported_model_types():
        raise ValueError(
            f"{directory / 'config.json'}: model_type {model_type!r} is not supported; "
            f"supported: {registry.supported_model_types()}"
        )
    return CheckpointReader(directory), hf_config


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    task: str = "classification",
    num_labels: int = 2,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    logical_axis_rules=parallel.DEFAULT_RULES,
    seed: int = 0,
    revision: str | None = None,
    peft=None,
    scan_layers: bool = False,
    remat_policy: str = "none",
    frozen_dtype: Any = None,
    trainable_rules=None,
    log=print,
) -> tuple[nn.Module, dict]:
    """Builds the model for `task` and loads its weights from a Hugging Face checkpoint.

    Args:
      path_or_hub_id: a local checkpoint directory (config.json + safetensors / index / .bin), a
        hub id (needs the network), an `asset:` name, or a llama.cpp GGUF file (dequantized).
      task: "classification" (logits [batch, num_labels]; num_labels == 1 is regression),
        "question_answering" (encoders: extractive QA, a tuple (start_logits, end_logits), each
        float32 [batch, length]; num_labels is not used), "encoder" (last hidden state),
        "causal_lm" (decoders: float32 logits [batch, length, vocab]), "decoder" (a decoder's bare
        stack: last hidden state) or "seq2seq" (encoder-decoders such as T5: float32 logits
        [batch, target, vocab], see models/t5.py).
      dtype: computation dtype (e.g. jnp.bfloat16); param_dtype: storage dtype of the weights.
      mesh: when given, each tensor is placed straight into its sharding as it is read.
      seed: initialises a head the checkpoint lacks (and PEFT leaves).
      peft: a pifi_jax.peft config (LoraConfig, IA3Config, ...): the model is built with its
        leaves, initialised as the method prescribes (a PeftModel).
      scan_layers: decoders only: one scanned layer module, its parameters stacked along a
        leading layers axis (the checkpoint's per-layer tensors are stacked as they load).
      remat_policy: decoders only: gradient checkpointing of each layer ("none", "full", "dots",
        "dots_no_batch"; models/stack.py REMAT_POLICIES).
      frozen_dtype: storage dtype (e.g. jnp.bfloat16) of the weights that will not train, each
        converted as it is read, so the model never exists in float32 first. What trains:
        `trainable_rules` (partition rules, first match wins, e.g. [(".*/bias", "trainable"),
        (".*", "frozen")]), by default the PEFT method's (peft.trainable_rules: its new leaves
        and the heads it trains stay in param_dtype); with neither, everything trains and
        frozen_dtype changes nothing.
    Returns:
      (module, params): `module.apply({"params": params}, input_ids=..., attention_mask=...,
      token_type_ids=...)`.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; choose one of {TASKS}")
    if task == "classification" and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
    reader, hf_config = open_checkpoint(path_or_hub_id, revision)
    config = registry.config_from_hf(hf_config)
    family = registry.family_for(config.model_type)
    if hasattr(family, "config_for_checkpoint"):  # what a config leaves to the tensors (T5)
        config = family.config_for_checkpoint(config, reader)
    module = family.build(config, task, num_labels, dtype, param_dtype)
    if scan_layers or remat_policy != "none":
        if not hasattr(module, "scan_layers"):
            raise ValueError(f"scan_layers / remat_policy: {config.model_type} is not a decoder")
        if peft is not None and scan_layers:
            raise ValueError("PEFT adapters target unrolled layers; load with scan_layers=False")
        module = module.clone(scan_layers=scan_layers, remat_policy=remat_policy)
    # A scanned stack loads layer by layer into the unrolled layout, then stacks (see convert.py).
    abstract = abstract_params(module.clone(scan_layers=False) if scan_layers else module)
    if frozen_dtype is not None:
        abstract = _frozen_storage(module, abstract, peft, trainable_rules, frozen_dtype)
    shardings = stacked_shardings = None
    if mesh is not None:
        shardings = parallel.param_shardings(abstract, family.PARAM_AXES, mesh, logical_axis_rules)
        if scan_layers:
            stacked_shardings = parallel.param_shardings(
                abstract_params(module), family.PARAM_AXES, mesh, logical_axis_rules
            )
    flat = convert.load_params(
        reader,
        abstract,
        prefix=base_model_prefix(family, config),
        ignored=family.IGNORED_SOURCE_KEYS,
        optional=family.OPTIONAL_SOURCE_KEYS,
        new=family.NEW_HEAD_PATHS,
        shardings=shardings,
        rng=jax.random.PRNGKey(seed),
        in_out_kernels=in_out_kernels(family),
        log=log,
    )
    if scan_layers:
        flat = convert.stack_layers(flat, family.LAYER_STACK, stacked_shardings)
    params = _unflatten(flat)
    if peft is not None:
        from pifi_jax.peft import wrap

        return wrap(module, params, peft, seed=seed)
    return module, params


def _frozen_storage(module, abstract: dict, peft_config, rules, frozen_dtype) -> dict:
    """`abstract` with every tensor that `rules` (or the PEFT method's rules) leave frozen in
    `frozen_dtype`. The PEFT rules are read off the PEFT model's plan, which needs only the
    tensors' paths and shapes, so nothing is loaded for them."""
    from pifi_jax import partition  # noqa: PLC0415

    if rules is None and peft_config is not None:
        from pifi_jax import peft  # noqa: PLC0415 (peft builds on hub: imported when needed)

        plan = peft.make_plan(peft_config, module.config, abstract)
        peft_module = peft.PeftModel(module, plan, peft_config)
        rules = peft.trainable_rules(peft_module, _unflatten(abstract))
    if rules is None:
        return abstract
    labels = partition.label_leaves(_unflatten(abstract), [tuple(r) for r in rules])
    return {
        path: jax.ShapeDtypeStruct(a.shape, frozen_dtype) if labels[path] == "frozen" else a
        for path, a in abstract.items()
    }


def _plain_model(module: nn.Module, params: dict) -> tuple[nn.Module, dict]:
    """(family module, its params) of a PEFT model, merged where the method has extra leaves."""
    peft_config = getattr(module, "peft_config", None)
    if peft_config is None:
        return module, params
    from pifi_jax import peft  # noqa: PLC0415 (peft builds on hub: imported when needed)

    method = peft_config.method
    if method in ("adapter", "prefix", "prompt"):
        raise ValueError(
            f"save_pretrained: a {method!r} PEFT model has no plain form that transformers can "
            "load (its extra leaves are not weights of the base architecture). Save the adapter "
            "with pifi_jax.peft.save_adapter(module, params, directory) (Hugging Face PEFT files, "
            "loaded by peft.PeftModel.from_pretrained on the base model), or save the base with "
            "save_pretrained(module.base, base_params)"
        )
    if method in ("lora", "ia3"):  # DoRA is LoRA with use_dora
        base, merged, _ = peft.merge(module, params)
        return base, merged
    return module.base, params


def save_pretrained(
    module: nn.Module,
    params: dict,
    directory: str | os.PathLike,
    *,
    label_names=None,
    problem_type: str | None = None,
) -> Path:
    """Writes config.json + model.safetensors that transformers loads into the matching class.

    A classification model becomes `<Family>ForSequenceClassification`, a question-answering model
    `<Family>ForQuestionAnswering`, an encoder `<Family>Model`, a seq2seq model
    `<Family>ForConditionalGeneration`.

    A PEFT model (pifi_jax.peft) is saved as the plain model it computes: LoRA, DoRA and IA3 are
    merged into the weights first (peft.merge), and methods whose leaves are plain weights (BitFit,
    top-k layers, full fine-tuning) are saved as they are. Bottleneck adapters and prefix / prompt
    tuning have no plain form: refused, with what to do instead.

    label_names: a classification model's class names in id order (config.json's id2label /
    label2id; e.g. labels.json of a training run); None: LABEL_0, LABEL_1, ...
    problem_type: "multi_label" writes transformers' "multi_label_classification" (sigmoid +
    BCE); a one-output model is always "regression"; otherwise left to transformers.
    """
    from safetensors.numpy import save_file

    module, params = _plain_model(module, params)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = module.config
    family = registry.family_for(config.model_type)
    hf_config = dict(config.to_hf_config())
    hf_config["architectures"] = [family.hf_architecture(config, module.task)]
    if module.task == "classification":
        names = [f"LABEL_{i}" for i in range(module.num_labels)]
        if label_names is not None:
            names = [str(name) for name in label_names]
            if len(names) != module.num_labels or len(set(names)) != len(names):
                raise ValueError(
                    f"save_pretrained: label_names must be {module.num_labels} distinct names "
                    f"(the model's outputs), got {names}"
                )
        hf_config["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}
        if module.num_labels == 1:
            hf_config["problem_type"] = "regression"
        elif problem_type == "multi_label":
            hf_config["problem_type"] = "multi_label_classification"
    elif module.task == "question_answering":
        # transformers sizes `qa_outputs` by num_labels and splits it into start / end: two.
        hf_config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
        hf_config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    tensors = {}
    strip = base_model_prefix(family, config) + "." if module.task in _BARE_TASKS else None
    flat = _flatten(params)
    if hasattr(family, "LAYER_STACK"):  # a scanned stack is saved layer by layer
        flat = convert.unstack_layers(flat, family.LAYER_STACK)
    for path, value in flat.items():
        key, transpose = hf_key(family, path)
        if strip and key.startswith(strip):
            key = key[len(strip) :]
        array = np.asarray(jax.device_get(value))
        if array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)  # safetensors' numpy writer has no bfloat16
        tensors[key] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return directory
