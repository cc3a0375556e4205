"""Stage 4: the SLM's modules, W_plug and W_down trained through the bridge; the LLM is never
touched. A decoder pair's modules are plug.py's; a T5 pair's (LoRA or adapters) are
seq2seq_plug.py's (its sites, per-stack depth maps and kept columns), chosen from the LLM's config.

Trainable tree (`init_transfer`), per site (plug.py: a LoRA target, or the projection an adapter
follows):
    modules/<site>/<leaf> [L_slm, ...]                           the SLM's modules (LoRA: a, b;
                                                                 adapter: down, down_bias, up, up_bias;
                                                                 prefix: prefix [L_slm, P, W_s])
    plug/<site>/in [d_in_l, d_in_s], out [d_out_s, d_out_l]      W_plug (plug.py; no "in" for
                                                                 a prefix)
    down [d_b, d_l]                                              W_down, residual-stream side
                                                                 (LoRA, adapters)

The modules in the LLM (stage 5, `llm_leaves`): plug.plug_modules, e.g. A_l = P_in A,
B_l = B P_out per LLM layer (depth_map). In bridge layer j (the bridge keeps the LLM's depth),
every leaf on the input side is mapped by W_down and every leaf on the output side keeps the
bridge's columns:
    A_b = W_down A_l            LoRA's inputs are residual-stream vectors (norm outputs), and
    D_b = W_down D_l            so are an adapter's (a sub-layer's output projection)
    B_b = B_l[:, kept_j]        the columns of the heads / MLP units layer j of the bridge kept;
    U_b = U_l[:, hidden], u_b = u_l[hidden]    for an adapter, the kept residual dimensions
    K_b = K_l[:, kept_j]        a prefix's keys and values: the bridge's kept key/value groups
                                (a prefix enters attention in head space, after the projections,
                                where the bridge keeps whole heads: it has no W_down)

How W_down enters (the paper is silent), and why: the bridge's normalised inputs equal the LLM's
at the kept dimensions (prune.py's norm scaling), so with W_down the selection matrix
(row k = one-hot of kept dimension k) the bridge applies exactly the LLM's modules restricted to
what the bridge has. That is W_down's initial value; it then trains with the rest, a learnt
residual-stream map where the fixed selection would be the bridge's own limitation. The output
side stays a fixed gather: heads and MLP units are kept whole, so a learnt map there would mix
units the LLM keeps apart, and the LLM's modules (what is kept at the end) never see W_down. An
adapter's input (an attention or MLP output in the bridge) is not exactly the LLM's restricted,
since the dropped heads and units contribute to the LLM's: the bridge is an approximation there
as everywhere else, which is what training W_down is for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.bridge import arch as arch_lib
from pifi_jax.bridge import plug as plug_lib
from pifi_jax.bridge import seq2seq_plug as s2s
from pifi_jax.bridge.fisher_seq2seq import decoder_inputs
from pifi_jax.hub.pretrained import _flatten, _unflatten
from pifi_jax.train.metrics import mean_next_token_loss, token_cross_entropy


def init_transfer(modules: dict, plug: dict, selection, llm_config) -> dict:
    """The trainable tree from the SLM's modules (plug.slm_modules, seq2seq_plug.slm_modules),
    a fitted W_plug and the bridge's selection (W_down starts as the selection matrix)."""
    method = plug_lib.method_of(modules)
    if s2s.is_seq2seq(llm_config):
        s2s.check_sites(method, modules)
        width = llm_config.d_model
    else:
        plug_lib.check_sites(method, modules)
        width = llm_config.hidden_size
    missing = [t for t in modules if t not in plug]
    if missing:
        raise ValueError(f"W_plug has no maps for the sites {missing}")
    tree = {
        "modules": {
            t: {leaf: jnp.asarray(v, jnp.float32) for leaf, v in m.items()}
            for t, m in modules.items()
        },
        "plug": {
            t: {k: jnp.asarray(v) for k, v in p.items()} for t, p in plug.items() if t in modules
        },
    }
    if "in" in plug_lib.LEAF_SIDES[method].values():  # a prefix has nothing on the residual stream
        down = np.zeros((len(selection.hidden), width), np.float32)
        down[np.arange(len(selection.hidden)), selection.hidden] = 1.0
        tree["down"] = jnp.asarray(down)
    return tree


def method_of(trainable: dict) -> str:
    return plug_lib.method_of(trainable["modules"])


def kept_columns(selection, llm_config, site: str, layer: int) -> np.ndarray:
    """The output columns of `site` that bridge layer `layer` keeps."""
    if s2s.is_seq2seq(llm_config):
        return s2s.kept_columns(selection, llm_config, site, layer)
    arch = arch_lib.arch_for(llm_config)
    dims = arch.dims(llm_config)
    if site in arch.sites.lora:  # a projection's columns: its heads or units (fused: each part)
        kinds = arch.linears[arch.sites.lora[site][0]][1]
        return arch_lib.kept_columns(arch, selection, dims, kinds, layer)
    if site in arch.sites.adapter:  # a sub-layer's output: the residual stream
        return np.asarray(selection.hidden)
    return arch_lib.kept_indices(selection, dims, arch_lib.KV, layer)  # a prefix's keys, values


def _carried(trainable: dict, llm_config) -> dict:
    modules, plug = trainable["modules"], trainable["plug"]
    if s2s.is_seq2seq(llm_config):
        return s2s.carried(modules, plug, llm_config)
    return plug_lib.carried(modules, plug, llm_config.num_layers)


def _assemble(method: str, values: dict, llm_config) -> dict[str, jax.Array]:
    if s2s.is_seq2seq(llm_config):
        return s2s.assemble(values)
    return plug_lib.assemble(method, values)


def llm_leaves(trainable: dict, llm_config) -> dict[str, jax.Array]:
    """The LLM's PEFT leaves (flat paths of its PeftModel), e.g. A_l = P_in A, B_l = B P_out."""
    return _assemble(method_of(trainable), _carried(trainable, llm_config), llm_config)


def bridge_leaves(trainable: dict, selection, llm_config) -> dict[str, jax.Array]:
    """The bridge's PEFT leaves: input sides W_down @ (LLM leaf), output sides the kept columns."""
    method = method_of(trainable)
    sides = plug_lib.LEAF_SIDES[method]
    out = {}
    for (t, j, leaf), value in _carried(trainable, llm_config).items():
        if sides[leaf] == "in":
            value = trainable["down"] @ value
        elif sides[leaf] == "out":
            value = value[..., kept_columns(selection, llm_config, t, j)]
        out[(t, j, leaf)] = value
    return _assemble(method, out, llm_config)


def with_leaves(frozen_flat: dict, leaves: dict) -> dict:
    """A PeftModel's params (nested) from its frozen flat leaves and computed LoRA leaves."""
    missing = [p for p in leaves if p not in frozen_flat]
    if missing:
        raise ValueError(
            f"PEFT leaves {missing[:4]} are not in the model (targets or method differ?)"
        )
    merged = dict(frozen_flat)
    merged.update(leaves)
    return _unflatten(merged)


def adapt_loss(trainable, frozen_flat, batch, *, module, selection, llm_config):
    """The bridge's training loss (a PeftModel) with the leaves of `trainable`: the mean
    next-token loss of a decoder, or a T5's mean target-token loss (seq2seq batch: the target
    shifted right behind decoder_start_token_id, as train/objectives.Seq2Seq computes it)."""
    params = with_leaves(frozen_flat, bridge_leaves(trainable, selection, llm_config))
    if not s2s.is_seq2seq(llm_config):
        logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return mean_next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
    targets, mask = batch["target_ids"], batch["target_mask"]
    logits = module.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        decoder_inputs(llm_config, targets),
        mask,
    )
    total, count = token_cross_entropy(logits, targets, mask)
    return total / jnp.maximum(count, 1.0)


def plugged_llm(llm, peft_config, trainable: dict, *, seed: int = 0):
    """Stage 5: (PeftModel of the LLM, its params) with the transferred modules plugged in.

    llm: (module, params) of the plain causal LM; peft_config: the SLM's PEFT config (LoRA with
    the same r, alpha and targets, or adapters of the same kind and size)."""
    from pifi_jax import peft

    module, params = peft.wrap(*llm, peft_config, seed=seed)
    flat = _flatten(params)
    return module, with_leaves(flat, llm_leaves(trainable, module.config))


def export_llm_adapter(module, params, directory) -> str:
    """Writes the plugged modules as a Hugging Face PEFT adapter of the LLM
    (`peft.PeftModel.from_pretrained(llm, directory)` loads it); bottleneck adapters, which
    Hugging Face PEFT does not have, in pifi_jax's native format (`peft.load_adapter`)."""
    from pifi_jax import peft

    fmt = "native" if peft.hf_refusal(module) else "peft"
    return str(peft.save_adapter(module, params, directory, format=fmt))
