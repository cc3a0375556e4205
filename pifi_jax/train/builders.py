"""Model builders: how a run config becomes (module, params), looked up by name.

The trainer never asks which method it trains. A builder, named by `config.builder` ("pretrained"
unless a method's config says otherwise), returns a `BuiltModel`: the module and its parameters,
their sharding rules, what trains, and how the trainable part is exported. Methods register their
builder on import (`pifi_jax.pifi` registers "pifi"); `register_builder` is open to users too.

    builder = get_builder(config.get("builder", "pretrained"))
    built = builder.build(config, model_dir, model_task, task, workdir, mesh=..., logical_axis_rules=..., log=...)
    builder.run_name(config)   # the default run directory's name
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp

from pifi_jax import peft
from pifi_jax.hub import from_pretrained
from pifi_jax.models import registry


@dataclasses.dataclass
class BuiltModel:
    """What a builder hands the trainer.

    trainable_rules: path rules of what trains; None = the config's `train.trainable_rules`
      (full fine-tuning, or the user's own freezing).
    peft_module: the module whose PEFT leaves `save_adapter` exports (None: no adapter to write).
    save_adapter: (params, directory, format) -> writes the trained adapter; format "peft" or
      "native" (see pifi_jax.peft.save_adapter).
    """

    module: Any
    params: dict
    param_axes: tuple
    trainable_rules: list | None = None
    peft_module: Any = None
    save_adapter: Callable[[dict, Path, str], Any] | None = None


class ModelBuilder(Protocol):
    def build(
        self,
        config,
        model_dir,
        model_task: str,
        task,
        workdir: Path,
        *,
        mesh,
        logical_axis_rules,
        log,
    ) -> BuiltModel: ...

    def run_name(self, config) -> str: ...


def peft_method(config):
    """The config's PEFT method (a pifi_jax.peft config), or None for full fine-tuning."""
    method = peft.config.from_flat_config(config.peft)
    return None if method.method == "full" else method


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class Pretrained:
    """A Hugging Face checkpoint (or GGUF file / asset) under the objective's head, with the
    config's PEFT method if any."""

    def build(self, config, model_dir, model_task, task, workdir, *, mesh, logical_axis_rules, log):
        method = peft_method(config)
        module, params = from_pretrained(
            model_dir,
            task=model_task,
            num_labels=getattr(task, "num_labels", 2),
            dtype=dtype_of(config.model.dtype),
            mesh=mesh,
            logical_axis_rules=logical_axis_rules,
            seed=config.seed,
            peft=method,
            scan_layers=config.model.get("scan_layers", False),
            remat_policy=config.model.get("remat_policy", "none"),
            # frozen weights read straight into their storage dtype (no float32 copy first)
            frozen_dtype=dtype_of(config.model.frozen_dtype) if config.model.frozen_dtype else None,
            trainable_rules=None if method is not None else config.train.trainable_rules,
            log=log,
        )
        built = BuiltModel(module, params, registry.family_for(module.config.model_type).PARAM_AXES)
        if method is not None:
            log(f"PEFT method: {method}")
            built.trainable_rules = peft.trainable_rules(module, params)
            built.peft_module = module
            built.save_adapter = lambda p, d, fmt: peft.save_adapter(module, p, d, format=fmt)
        return built

    def run_name(self, config) -> str:
        """<task>_<model name>: the same command always finds (and resumes) the same run."""
        model = Path(str(config.model.path).rstrip("/")).name.replace("asset:", "")
        return f"{config.task}_{model}"


_BUILDERS: dict[str, ModelBuilder] = {"pretrained": Pretrained()}


def register_builder(name: str, builder: ModelBuilder) -> None:
    _BUILDERS[name] = builder


def get_builder(name: str) -> ModelBuilder:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown builder {name!r}; registered: {sorted(_BUILDERS)}") from None
