"""Stage 4: the SLM's LoRA modules, W_plug and W_down trained through the bridge; the LLM is
never touched.

Trainable tree (`init_transfer`):
    modules/<target>/a [L_slm, d_in_s, r], b [L_slm, r, d_out_s]   the SLM's LoRA factors
    plug/<target>/in [d_in_l, d_in_s], out [d_out_s, d_out_l]      W_plug (plug.py)
    down [d_b, d_l]                                                W_down, residual-stream side

The modules in the LLM (stage 5, `llm_leaves`): A_l = P_in A, B_l = B P_out per LLM layer
(depth_map). In bridge layer j (the bridge keeps the LLM's depth):
    A_b = W_down A_l            the targets' inputs are residual-stream vectors (norm outputs)
    B_b = B_l[:, kept_j]        the columns of the heads / MLP units layer j of the bridge kept

How W_down enters (the paper is silent), and why: the bridge's normalised inputs equal the LLM's
at the kept dimensions (prune.py's norm scaling), so with W_down the selection matrix
(row k = one-hot of kept dimension k) the bridge applies exactly the LLM's modules restricted to
what the bridge has. That is W_down's initial value; it then trains with the rest, a learnt
residual-stream map where the fixed selection would be the bridge's own limitation. The output
side stays a fixed gather: heads and MLP units are kept whole, so a learnt map there would mix
units the LLM keeps apart, and the LLM's modules (what is kept at the end) never see W_down.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.bridge.mapping import depth_map
from pifi_jax.bridge.plug import _lora_path, check_targets
from pifi_jax.bridge.prune import Selection, _head_columns
from pifi_jax.hub.pretrained import _flatten, _unflatten
from pifi_jax.train.metrics import mean_next_token_loss


def init_transfer(modules: dict[str, list], plug: dict, selection: Selection, llm_config) -> dict:
    """The trainable tree from the SLM's modules (plug.slm_modules), a fitted W_plug and the
    bridge's selection (W_down starts as the selection matrix)."""
    check_targets(modules)
    down = np.zeros((len(selection.hidden), llm_config.hidden_size), np.float32)
    down[np.arange(len(selection.hidden)), selection.hidden] = 1.0
    return {
        "modules": {
            t: {
                "a": jnp.stack([jnp.asarray(a, jnp.float32) for a, _ in rows]),
                "b": jnp.stack([jnp.asarray(b, jnp.float32) for _, b in rows]),
            }
            for t, rows in modules.items()
        },
        "plug": {
            t: {"in": jnp.asarray(p["in"]), "out": jnp.asarray(p["out"])}
            for t, p in plug.items()
            if t in modules
        },
        "down": jnp.asarray(down),
    }


def kept_columns(selection: Selection, llm_config, target: str, layer: int) -> np.ndarray:
    """The output columns of `target` that bridge layer `layer` keeps."""
    if target == "q_proj":
        return _head_columns(selection.q_heads[layer], llm_config.head_dim)
    if target in ("k_proj", "v_proj"):
        return _head_columns(selection.kv_groups[layer], llm_config.head_dim)
    return selection.ffn[layer]


def llm_leaves(trainable: dict, llm_layers: int) -> dict[str, jax.Array]:
    """The LLM's LoRA leaves (flat paths of its PeftModel): A_l = P_in A, B_l = B P_out."""
    out = {}
    for t, m in trainable["modules"].items():
        mapping = depth_map(m["a"].shape[0], llm_layers)
        p = trainable["plug"][t]
        for j, i in enumerate(mapping):
            out[_lora_path(j, t, "lora_a")] = p["in"] @ m["a"][i]
            out[_lora_path(j, t, "lora_b")] = m["b"][i] @ p["out"]
    return out


def bridge_leaves(trainable: dict, selection: Selection, llm_config) -> dict[str, jax.Array]:
    """The bridge's LoRA leaves: A_b = W_down A_l, B_b = B_l[:, kept columns of layer j]."""
    out = {}
    for path, value in llm_leaves(trainable, llm_config.num_layers).items():
        layer = int(path.split("/")[1].rsplit("_", 1)[1])
        target = path.split("/")[-2]
        if path.endswith("lora_a"):
            out[path] = trainable["down"] @ value
        else:
            out[path] = value[:, kept_columns(selection, llm_config, target, layer)]
    return out


def with_leaves(frozen_flat: dict, leaves: dict) -> dict:
    """A PeftModel's params (nested) from its frozen flat leaves and computed LoRA leaves."""
    missing = [p for p in leaves if p not in frozen_flat]
    if missing:
        raise ValueError(f"LoRA leaves {missing[:4]} are not in the model (targets differ?)")
    merged = dict(frozen_flat)
    merged.update(leaves)
    return _unflatten(merged)


def adapt_loss(trainable, frozen_flat, batch, *, module, selection, llm_config):
    """Mean next-token loss of the bridge (a LoRA PeftModel) with the leaves of `trainable`."""
    params = with_leaves(frozen_flat, bridge_leaves(trainable, selection, llm_config))
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    return mean_next_token_loss(logits, batch["input_ids"], batch["loss_mask"])


def plugged_llm(llm, lora_config, trainable: dict, *, seed: int = 0):
    """Stage 5: (LoRA PeftModel of the LLM, its params) with the transferred modules plugged in.

    llm: (module, params) of the plain causal LM; lora_config: the SLM's LoRA config (same r,
    alpha and targets)."""
    from pifi_jax import peft

    module, params = peft.wrap(*llm, lora_config, seed=seed)
    flat = _flatten(params)
    return module, with_leaves(flat, llm_leaves(trainable, module.config.num_layers))


def export_llm_adapter(module, params, directory) -> str:
    """Writes the plugged modules as a Hugging Face PEFT adapter of the LLM
    (`peft.PeftModel.from_pretrained(llm, directory)` loads it)."""
    from pifi_jax import peft

    return str(peft.save_adapter(module, params, directory))
