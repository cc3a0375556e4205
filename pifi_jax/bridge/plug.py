"""W_plug: carrying LoRA modules learnt on the SLM into the LLM's dimensions and depth.

A LoRA module of SLM layer i on target t adds x_s A B to the projection's output (x_s the
projection's input, [d_in_s]; A [d_in_s, r], B [r, d_out_s]). To act in LLM layer j (served by
i = depth_map(j)), it needs an LLM input mapped into the SLM's input space and its output mapped
into the LLM's output space:

    x_l P_in ~ x_s        P_in[t]  [d_in_l, d_in_s]
    y_s P_out ~ y_l       P_out[t] [d_out_s, d_out_l]
    A_l = P_in A,  B_l = B P_out:   x_l A_l B_l ~ (x_s A B) carried to the LLM.

Where the paper is silent (how W_plug is initialised), the choice here: P_in and P_out are fitted
without any gradient by ridge regression between the two models' activations on the same task
tokens (the pair shares its tokenizer, so positions correspond): for every LLM layer j and its
SLM layer i, the input of t (the RMSNorm output before it) and the output of t, pooled over the
layers and the real tokens. One P_in / P_out per target name, shared by every layer: a projection
space is the same kind of space at every depth, and sharing keeps W_plug small (5 targets of a
1.5B model: ~20M numbers) and fitted on 28x more pairs. The ridge term is `ridge` times the mean
eigenvalue of the regressor's Gram matrix. These maps are then trained with the modules through the
bridge (stage 4) starting from this fit.

Targets: those whose input is a norm's output (q_proj, k_proj, v_proj, gate_proj, up_proj).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax.bridge.mapping import depth_map

TARGET_INPUTS = {
    "q_proj": "input_layernorm",
    "k_proj": "input_layernorm",
    "v_proj": "input_layernorm",
    "gate_proj": "post_attention_layernorm",
    "up_proj": "post_attention_layernorm",
}
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
_BLOCK.update({"gate_proj": "mlp", "up_proj": "mlp"})


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGET_INPUTS]
    if bad or not targets:
        raise ValueError(
            f"bridge transfer of LoRA supports the targets {sorted(TARGET_INPUTS)} (their input "
            f"is a norm's output, which W_plug is fitted on); got {list(targets)}"
        )
    return targets


def activations(module, params, batch, targets: tuple[str, ...]) -> dict:
    """{(layer, name): [tokens, width]} of the real tokens: each target's output and the norms
    feeding them, from one forward of a plain causal LM."""
    wanted = set(targets) | {TARGET_INPUTS[t] for t in targets}

    def keep(mdl, method_name):
        return method_name == "__call__" and mdl.name in wanted

    _, state = module.apply(
        {"params": params},
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        capture_intermediates=keep,
    )
    real = np.asarray(batch["attention_mask"]) > 0
    out = {}
    for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
        layer = next(int(p.rsplit("_", 1)[1]) for p in path if p.startswith("layers_"))
        name = path[-2]
        out[(layer, name)] = np.asarray(value[0], np.float64)[real]
    return out


def _ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |x W - y|^2 + lam |W|^2, lam = ridge * trace(x'x) / width."""
    gram = x.T @ x
    lam = ridge * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y)


def fit_plug(
    slm,
    llm,
    batches: Iterable[dict],
    targets: Iterable[str],
    *,
    ridge: float = 1e-3,
) -> dict[str, dict[str, np.ndarray]]:
    """{target: {"in": P_in [d_in_l, d_in_s], "out": P_out [d_out_s, d_out_l]}} (float32).

    slm, llm: (module, params) of the two plain causal LMs; batches: dicts of input_ids and
    attention_mask (the same tokens go to both models).
    """
    targets = check_targets(targets)
    (slm_module, slm_params), (llm_module, llm_params) = slm, llm
    mapping = depth_map(slm_module.config.num_layers, llm_module.config.num_layers)
    pairs = {t: {"xs": [], "xl": [], "ys": [], "yl": []} for t in targets}
    for batch in batches:
        a_s = activations(slm_module, slm_params, batch, targets)
        a_l = activations(llm_module, llm_params, batch, targets)
        for j, i in enumerate(mapping):
            for t in targets:
                pairs[t]["xs"].append(a_s[(i, TARGET_INPUTS[t])])
                pairs[t]["xl"].append(a_l[(j, TARGET_INPUTS[t])])
                pairs[t]["ys"].append(a_s[(i, t)])
                pairs[t]["yl"].append(a_l[(j, t)])
    if not pairs[targets[0]]["xs"]:
        raise ValueError("fit_plug: no batches")
    plug = {}
    for t, p in pairs.items():
        xs, xl, ys, yl = (np.concatenate(p[k]) for k in ("xs", "xl", "ys", "yl"))
        plug[t] = {
            "in": _ridge(xl, xs, ridge).astype(np.float32),
            "out": _ridge(ys, yl, ridge).astype(np.float32),
        }
    return plug


def _lora_path(layer: int, target: str, leaf: str) -> str:
    return f"model/layers_{layer}/{_BLOCK[target]}/{target}/{leaf}"


def slm_modules(flat: dict, targets: Iterable[str], layers: int) -> dict[str, list]:
    """{target: [(A [in, r], B [r, out]) per SLM layer]} from a LoRA model's flat params."""
    out = {}
    for t in check_targets(targets):
        rows = []
        for i in range(layers):
            a, b = _lora_path(i, t, "lora_a"), _lora_path(i, t, "lora_b")
            if a not in flat or b not in flat:
                raise ValueError(f"the SLM's LoRA modules lack {a} / {b} (targets {targets})")
            rows.append((flat[a], flat[b]))
        out[t] = rows
    return out


def plug_lora(modules: dict[str, list], plug: dict, llm_layers: int) -> dict[str, jax.Array]:
    """The LLM's LoRA leaves (flat paths): A_l = P_in A, B_l = B P_out, each LLM layer taking
    its SLM layer's module (depth_map). Works on traced arrays too (stage 4 differentiates it)."""
    slm_layers = len(next(iter(modules.values())))
    mapping = depth_map(slm_layers, llm_layers)
    leaves = {}
    for t, rows in modules.items():
        p_in, p_out = plug[t]["in"], plug[t]["out"]
        for j, i in enumerate(mapping):
            a, b = rows[i]
            leaves[_lora_path(j, t, "lora_a")] = jnp.asarray(p_in) @ jnp.asarray(a)
            leaves[_lora_path(j, t, "lora_b")] = jnp.asarray(b) @ jnp.asarray(p_out)
    return leaves
