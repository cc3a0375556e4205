"""Building a model with PEFT leaves, choosing what trains, and merging adapters into the weights.

    module, params = pifi_jax.from_pretrained(path, num_labels=2, peft=LoraConfig(r=8))
    rules = trainable_rules(module, params)          # what the trainer freezes
    base_module, merged, undo = merge(module, params) # plain model for inference
    params_again = unmerge(module, merged, undo)      # bitwise the PEFT tree again

`PeftModel` wraps a family module without changing its parameter paths (the two share one scope)
and runs it inside `adapter_scope`, where each targeted `Linear` creates and applies its leaves, and
each module named by the plan its bottleneck adapter (adapters.py). For prefix and prompt tuning
(prefix.py, prompt.py) PeftModel owns the leaves itself, at the root of the tree
(`prefix_encoder/...`, `prompt_encoder/...`), computes the prefix table or the soft prompt once per
call and hands it to the scope, where the family's attention and embedding hooks take it.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pifi_jax.layers.linear import AdapterPlan, LinearAdapter, adapter_scope
from pifi_jax.partition import label_leaves, partition_table
from pifi_jax.peft import adapters, prefix, prompt
from pifi_jax.peft import config as peft_config
from pifi_jax.peft.targets import (
    HEAD_MODULES,
    IA3_TARGETS,
    LORA_TARGETS,
    hf_module_name,
    name_matches,
    select_targets,
)

ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude", "ia3_l")
# Bias leaves: `bias`, and named ones such as DeBERTa's attention `q_bias` / `v_bias`.
_BIAS = r".*/([a-z]+_)?bias"
_STACK = re.compile(r"(?:^|/)(layer|layers|h|block|blocks|albert_layer_groups)_(\d+)/")


class PeftModel(nn.Module):
    """A family module plus PEFT leaves; parameter paths stay those of the family module."""

    base: nn.Module
    plan: AdapterPlan
    peft_config: Any

    def setup(self):
        nn.share_scope(self, self.base)
        method, model_config = self.peft_config.method, self.base.config
        if method == "prefix":
            self.prefix_encoder = prefix.encoder_for(
                self.peft_config, model_config, len(self.plan.prefix_layers), self.base.param_dtype
            )
        elif method == "prompt":
            self.prompt_encoder = prompt.encoder_for(
                self.peft_config, model_config, self.base.param_dtype
            )

    def __call__(self, *args, deterministic: bool = True, **kwargs):
        virtual = {}
        if self.peft_config.method == "prefix":
            virtual["prefix"] = self.prefix_encoder()  # [P, layers * 2 * hidden]
        elif self.peft_config.method == "prompt":
            virtual["prompt"] = self.prompt_encoder()  # [P, width]
        with adapter_scope(self.plan, deterministic, **virtual):
            return self.base(*args, deterministic=deterministic, **kwargs)

    @property
    def config(self):
        return self.base.config

    @property
    def task(self) -> str:
        return self.base.task

    @property
    def is_encoder_decoder(self) -> bool:
        return getattr(self.base, "is_encoder_decoder", False)

    @property
    def num_labels(self) -> int:
        return self.base.num_labels


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def linear_paths(flat_params) -> list[str]:
    """Module paths of every Linear (2-D `kernel` leaves), in tree order."""
    return [
        p[: -len("/kernel")]
        for p, v in flat_params.items()
        if p.endswith("/kernel") and len(v.shape) == 2
    ]


def make_plan(config, model_config, flat_params) -> AdapterPlan:
    """The adapters `config` asks for on a model with this config and these (base) parameters."""
    model_type = model_config.model_type
    if isinstance(config, peft_config.LoraConfig):
        targets = select_targets(linear_paths(flat_params), config, model_type, LORA_TARGETS)
        adapter = LinearAdapter(
            lora_r=config.r,
            lora_scaling=config.scaling,
            lora_dropout=config.lora_dropout,
            lora_init={True: "kaiming", False: "random", "gaussian": "gaussian"}[
                config.init_lora_weights
            ],
            dora=config.use_dora,
        )
        return AdapterPlan(tuple((t, adapter) for t in targets))
    if isinstance(config, peft_config.IA3Config):
        targets = select_targets(linear_paths(flat_params), config, model_type, IA3_TARGETS)
        feedforward = config.feedforward_modules
        if feedforward is None and config.target_modules is None:
            feedforward = IA3_TARGETS[model_type][1]
        plan = []
        for t in targets:
            kind = "input" if name_matches(hf_module_name(t), feedforward) else "output"
            plan.append((t, LinearAdapter(ia3=kind)))
        return AdapterPlan(tuple(plan))
    if isinstance(config, peft_config.AdapterConfig):
        return adapters.plan(config, model_type, linear_paths(flat_params))
    if isinstance(config, peft_config.PrefixTuningConfig):
        return AdapterPlan(
            prefix_layers=prefix.attention_layers(model_config, linear_paths(flat_params))
        )
    return AdapterPlan()


def wrap(module: nn.Module, params: dict, config, *, seed: int = 0) -> tuple[PeftModel, dict]:
    """Wraps a loaded family module with `config`'s adapters and initialises the new leaves.

    New leaves are created by running the model once with the base parameters in a mutable
    collection, so initialisers that depend on the loaded weights (DoRA's magnitude) see them.
    Only the new leaves leave the (jitted) initialiser, so the base weights are not copied.
    """
    if getattr(module, "scan_layers", False):
        raise ValueError(
            "PEFT on a scanned layer stack (scan_layers=True) is not supported: adapters, prefixes "
            "and layer choices (layers_to_transform, top-k) address individual layers; load the "
            "model with scan_layers=False (remat_policy still applies)"
        )
    if config.method == "bitfit" and not any(re.fullmatch(_BIAS, p) for p in _flat(params)):
        raise ValueError(
            f"BitFit: this {module.config.model_type} model has no bias parameters to train"
        )
    plan = make_plan(config, module.config, _flat(params))
    peft_module = PeftModel(module, plan, config)
    if not (plan.adapters or plan.bottlenecks or config.method in ("prefix", "prompt")):
        return peft_module, params
    ids = jnp.zeros((1, 4), jnp.int32)
    # An encoder-decoder reaches its decoder's Linears only when it is given decoder inputs.
    inputs = (ids, None, ids) if peft_module.is_encoder_decoder else (ids,)

    def new_leaves(p):
        _, state = peft_module.apply(
            {"params": p},
            *inputs,
            deterministic=True,
            mutable=["params"],
            rngs={"params": jax.random.PRNGKey(seed)},
        )
        return {k: v for k, v in _flat(state["params"]).items() if k not in base}

    base = _flat(params)
    # One forward on a [1, 4] input: worth no optimisation, and XLA's CPU backend compiles it
    # several times faster without.
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    flat = {**base, **jax.jit(new_leaves, compiler_options=fast)(params)}
    if config.method == "adapter":
        adapters.check_created(plan, flat)
    if config.method == "prompt":
        flat = prompt.initialise_from_vocabulary(config, module.config, flat, seed)
    return peft_module, _unflat(flat)


def _module_rule(name: str) -> str:
    """Regex on our paths for every leaf under a module named `name` (HF dotted, as a suffix)."""
    path = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")
    return rf"(.*/)?{re.escape(path)}/.*"


def _top_layers(flat_params, k: int) -> list[str]:
    """Regexes for the k highest-numbered layers of the (first) layer stack."""
    found = {}
    for path in flat_params:
        match = _STACK.search(path)
        if match:
            stack = path[: match.end(1)]
            found.setdefault(stack, set()).add(int(match.group(2)))
    if not found:
        raise ValueError("top-k: no layer stack (layer_N / layers_N / h_N) in the parameters")
    stack, indices = next(iter(found.items()))
    top = sorted(indices)[-k:] if k else []
    return [rf"{re.escape(stack)}_{i}/.*" for i in top]


def trainable_rules(module: nn.Module, params: dict) -> list[tuple[str, str]]:
    """Partition rules (first match wins) for the model's PEFT method; everything else frozen."""
    config = getattr(module, "peft_config", None) or peft_config.FullConfig()
    flat = _flat(params)
    saved = config.modules_to_save if config.modules_to_save is not None else HEAD_MODULES
    rules = [(_module_rule(name), "trainable") for name in saved]
    method = config.method
    if method == "full":
        return [(".*", "trainable")]
    if method == "lora":
        rules.append((r".*/(lora_a|lora_b|lora_magnitude)", "trainable"))
        if config.bias == "all":
            rules.append((_BIAS, "trainable"))
        elif config.bias == "lora_only":
            rules += [(re.escape(path) + "/bias", "trainable") for path, _ in module.plan.adapters]
    elif method == "ia3":
        rules.append((r".*/ia3_l", "trainable"))
    elif method == "adapter":
        rules += adapters.trainable_rules(config)
    elif method == "prefix":
        rules.append((r"prefix_encoder/.*", "trainable"))
    elif method == "prompt":
        rules.append((r"prompt_encoder/.*", "trainable"))
    elif method == "bitfit":
        rules.append((_BIAS, "trainable"))
    elif method == "topk":
        rules += [(rule, "trainable") for rule in _top_layers(flat, config.k)]
    else:
        raise ValueError(f"unknown PEFT method {method!r}")
    rules.append((".*", "frozen"))
    return rules


def trainable_mask(module: nn.Module, params: dict) -> dict:
    """A tree like `params` with True where the leaf trains under the model's method."""
    labels = label_leaves(params, trainable_rules(module, params))
    return _unflat({p: label == "trainable" for p, label in labels.items()})


def summary(module: nn.Module, params: dict) -> str:
    """The printed table of trainable vs frozen parameters under the model's method."""
    return partition_table(params, trainable_rules(module, params))


def _merged_leaves(flat: dict, path: str, adapter: LinearAdapter):
    """New kernel and bias of one targeted Linear, computed in float32."""
    kernel = flat[f"{path}/kernel"].astype(jnp.float32)
    bias = flat.get(f"{path}/bias")
    bias = None if bias is None else bias.astype(jnp.float32)
    if adapter.lora_r:
        delta = adapter.lora_scaling * (
            flat[f"{path}/lora_a"].astype(jnp.float32) @ flat[f"{path}/lora_b"].astype(jnp.float32)
        )
        kernel = kernel + delta
        if adapter.dora:
            magnitude = flat[f"{path}/lora_magnitude"].astype(jnp.float32)
            kernel = kernel * (magnitude / jnp.linalg.norm(kernel, axis=0))
    if adapter.ia3 == "output":
        scale = flat[f"{path}/ia3_l"].astype(jnp.float32)
        kernel = kernel * scale
        bias = None if bias is None else bias * scale
    elif adapter.ia3 == "input":
        kernel = kernel * flat[f"{path}/ia3_l"].astype(jnp.float32)[:, None]
    return kernel, bias


def merge(module: PeftModel, params: dict) -> tuple[nn.Module, dict, dict]:
    """Folds LoRA/DoRA/IA3 leaves into the weights (float32 arithmetic).

    Returns (base_module, merged_params, undo): the plain family module and parameters with no PEFT
    leaves and no extra cost, plus `undo`, the leaves merge replaced or removed, for `unmerge`.
    Bottleneck adapters and prefix / prompt tuning have no merged form: an error.
    """
    method = module.peft_config.method
    if method in ("adapter", "prefix", "prompt"):
        why = {
            "adapter": "a bottleneck adapter is a nonlinear function of its input",
            "prefix": "a prefix adds attention slots",
            "prompt": "a soft prompt adds tokens",
        }[method]
        raise ValueError(
            f"merge is defined for LoRA, DoRA and IA3; {method!r} cannot be folded into the "
            f"weights ({why}): keep the PEFT model for inference"
        )
    flat = _flat(params)
    merged = dict(flat)
    undo = {}
    for path, adapter in module.plan.adapters:
        kernel, bias = _merged_leaves(flat, path, adapter)
        for leaf in ("kernel", "bias", *ADAPTER_LEAVES):
            key = f"{path}/{leaf}"
            if key in flat:
                undo[key] = flat[key]
                merged.pop(key)
        merged[f"{path}/kernel"] = kernel.astype(flat[f"{path}/kernel"].dtype)
        if bias is not None:
            merged[f"{path}/bias"] = bias.astype(flat[f"{path}/bias"].dtype)
    return module.base, _unflat(merged), _unflat(undo)


def unmerge(module: PeftModel, merged_params: dict, undo: dict) -> dict:
    """The PEFT parameters again, bitwise: merged leaves replaced by what `merge` recorded."""
    del module  # the record says everything; kept for a symmetric call
    flat = _flat(merged_params)
    flat.update(_flat(undo))
    return _unflat(flat)


def adapter_params(module: nn.Module, params: dict) -> dict:
    """The trainable leaves only (what an adapter file holds)."""
    mask = _flat(trainable_mask(module, params))
    return _unflat({p: v for p, v in _flat(params).items() if mask[p]})
