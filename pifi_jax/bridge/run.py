"""Bridge transfer in the trainer: the model builder "bridge" (`config.builder`, set by
launch.transfer for stages 4 and 5; see pifi_jax.train.builders).

`config.bridge.stage`:
  adapt  model.path is the bridge checkpoint; the model is `TransferModel`: the bridge as a
         PeftModel of the SLM's method (LoRA, bottleneck adapters or a prefix; frozen, its own PEFT leaves
         unused) whose PEFT leaves are computed from the
         trainable tree (adapt.py: the SLM's modules, W_plug, W_down), read at the start from
         `bridge.init` (transfer_init.npz). Only `transfer/...` trains. The run's adapter
         directory gets `transfer.npz`, the trained tree.
  llm    model.path is the LLM; the model is its PeftModel with the modules of
         `bridge.trained` (transfer.npz) plugged in (adapt.llm_leaves); nothing trains, the run
         evaluates (train.epochs 0), and its adapter directory is a Hugging Face PEFT adapter of
         the LLM (LoRA, prefix; adapters in pifi_jax's native format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pifi_jax import peft
from pifi_jax.bridge import adapt, plug
from pifi_jax.bridge.seq2seq_bridge import selection_from_json
from pifi_jax.hub import from_pretrained
from pifi_jax.hub.pretrained import _flatten, _unflatten
from pifi_jax.models import registry
from pifi_jax.train.builders import BuiltModel, dtype_of, peft_method, register_builder

STAGES = ("adapt", "llm")


def save_tree(tree: dict, path: str | Path) -> Path:
    """A nested dict of arrays as one .npz (flat keys joined by '/'), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = _flatten(tree)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    tmp.replace(path)
    return path


def load_tree(path: str | Path) -> dict:
    try:
        with np.load(path) as z:
            flat = {k: jnp.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a transfer file ({e})") from None
    return _unflatten(flat)


class TransferModel(nn.Module):
    """The bridge (a PeftModel, `bridge/...` frozen) with PEFT leaves computed from the
    trainable `transfer/...` tree; called as the bridge's causal LM (cache and all)."""

    peft_bridge: Any  # the bridge's PeftModel (unbound)
    selection: Any  # the bridge's Selection, in a hashable _Frozen holder

    @property
    def config(self):
        return self.peft_bridge.config

    @property
    def peft_config(self):
        return self.peft_bridge.peft_config

    @property
    def is_encoder_decoder(self) -> bool:
        return self.peft_bridge.is_encoder_decoder

    @nn.compact
    def __call__(self, *args, deterministic=True, **kwargs):
        # the two subtrees as given (nested dicts of params are scopes to flax, not variables)
        variables = self.variables.get("params", {})
        if "bridge" not in variables or "transfer" not in variables:
            _given(None)
        frozen, trainable = variables["bridge"], variables["transfer"]
        flat = _flatten(frozen)
        leaves = adapt.bridge_leaves(trainable, self.selection.value, self.peft_bridge.config)
        params = adapt.with_leaves(flat, leaves)
        rngs = {} if deterministic else {"dropout": self.make_rng("dropout")}
        return self.peft_bridge.apply(
            {"params": params}, *args, deterministic=deterministic, rngs=rngs, **kwargs
        )


def _given(rng):
    raise ValueError("TransferModel has no initialiser: its params come from the builder")


class _Frozen:
    """A hashable holder (flax module fields must hash): compared by identity."""

    def __init__(self, value):
        self.value = value


def _selection(bridge_dir: Path):
    record = bridge_dir / "bridge.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record}: not a bridge directory (run the bridge stage first)")
    return selection_from_json(json.loads(record.read_text(encoding="utf-8"))["selection"])


class BridgeBuilder:
    def build(self, config, model_dir, model_task, task, workdir, *, mesh, logical_axis_rules, log):
        bc = config.bridge
        if bc.stage not in STAGES:
            raise ValueError(f"bridge.stage must be one of {STAGES}, got {bc.stage!r}")
        method = peft_method(config)
        if method is None or method.method not in plug.METHODS:
            raise ValueError(
                f"bridge transfer trains {plug.METHODS} modules: set peft.method to "
                f"lora, adapter_houlsby, adapter_pfeiffer or prefix, got {config.peft.method!r}"
            )
        module, params = from_pretrained(
            model_dir,
            task=model_task,
            dtype=dtype_of(config.model.dtype),
            mesh=mesh,
            logical_axis_rules=logical_axis_rules,
            seed=config.seed,
            peft=method,
            log=log,
        )
        axes = registry.family_for(module.config.model_type).PARAM_AXES
        if bc.stage == "adapt":
            initial = load_tree(bc.init)
            model = TransferModel(module, _Frozen(_selection(Path(model_dir))))
            tree = {"bridge": params, "transfer": initial}

            def save(p, directory, fmt):
                save_tree(p["transfer"], Path(directory) / "transfer.npz")

            return BuiltModel(
                model,
                tree,
                axes,  # the family's rules match under bridge/; transfer/ is replicated
                trainable_rules=[(r"transfer/.*", "trainable"), (r".*", "frozen")],
                peft_module=module,
                save_adapter=save,
            )
        trained = load_tree(bc.trained)
        flat = _flatten(params)
        plugged = adapt.with_leaves(flat, adapt.llm_leaves(trained, module.config))
        return BuiltModel(
            module,
            plugged,
            axes,
            trainable_rules=[(r".*", "frozen")],
            peft_module=module,
            save_adapter=lambda p, d, fmt: peft.save_adapter(module, p, d, format=fmt),
        )

    def run_name(self, config) -> str:
        return f"{config.task}_bridge_{config.bridge.stage}"


register_builder("bridge", BridgeBuilder())
