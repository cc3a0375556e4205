"""W_plug: carrying per-layer PEFT modules learnt on the SLM into the LLM's dimensions and depth.

Two kinds of module carry over (`method`):

lora     a LoRA module of SLM layer i on target t adds x_s A B to the projection's output (x_s
         the projection's input, [d_in_s]; A [d_in_s, r], B [r, d_out_s]). Sites: the targets
         whose input is a norm's output (q_proj, k_proj, v_proj, gate_proj, up_proj).
adapter  a bottleneck adapter after a sub-layer's output projection (Houlsby: o_proj and
         down_proj; Pfeiffer: down_proj) maps that output h_s [d_s] to
         h_s + act(h_s D + d) U + u (D [d_s, m], d [m], U [m, d_s], u [d_s]). Sites: the
         projections it follows, so its input and output are the same space (a sub-layer's
         contribution to the residual stream).
prefix   prefix tuning's keys and values, P per layer (the table prefix_encoder/embedding
         [P, layers * 2 * W], W = kv_heads * head_dim; without prefix_projection). Sites: k_proj
         (the keys) and v_proj (the values); a prefix has an output side only, and its keys are
         mapped like k_proj's outputs (before the rotary embedding: prefix keys have no position,
         and a linear map fitted across positions is the simplest that holds for all of them).

To act in LLM layer j (served by i = depth_map(j)), a module needs an LLM input mapped into the
SLM's input space and its output mapped into the LLM's output space:

    x_l P_in ~ x_s        P_in[site]  [d_in_l, d_in_s]
    y_s P_out ~ y_l       P_out[site] [d_out_s, d_out_l]

so every leaf whose first axis is the input space is multiplied by P_in on the left (LoRA's A,
the adapter's D), every leaf whose last axis is the output space by P_out on the right (B; U and
u; a prefix block), and the rest is copied (d): x_l (P_in A) (B P_out) ~ (x_s A B) carried to
the LLM, and likewise act(h_l P_in D + d) (U P_out) + u P_out for the adapter (`carry`,
`LEAF_SIDES`).

Where the paper is silent (how W_plug is initialised), the choice here: P_in and P_out are fitted
without any gradient by ridge regression between the two models' activations on the same task
tokens (the pair shares its tokenizer, so positions correspond): for every LLM layer j and its
SLM layer i, the site's input (for LoRA the RMSNorm output before it, for an adapter the
projection's output) and the site's output, pooled over the layers and the real tokens. One
P_in / P_out per site, shared by every layer: a projection space is the same kind of space at
every depth, and sharing keeps W_plug small (5 targets of a 1.5B model: ~20M numbers) and fitted
on 28x more pairs. The ridge term is `ridge` times the mean eigenvalue of the regressor's Gram
matrix. These maps are then trained with the modules through the bridge (stage 4) starting from
this fit. An adapter's maps are a pair of ridge fits between the same two spaces, one each way;
they are not constrained to be inverses.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax.bridge import arch
from pifi_jax.bridge.mapping import depth_map

# The families whose module names the sites below are.
FAMILIES = arch.LLAMA.model_types
METHODS = ("lora", "adapter", "prefix")
PREFIX_SITES = ("k_proj", "v_proj")  # a layer's prefix keys, then its values
PREFIX_TABLE = "prefix_encoder/embedding"
TARGET_INPUTS = {
    "q_proj": "input_layernorm",
    "k_proj": "input_layernorm",
    "v_proj": "input_layernorm",
    "gate_proj": "post_attention_layernorm",
    "up_proj": "post_attention_layernorm",
}
# An adapter site: the projection it follows -> the module that hosts the adapter's leaves.
ADAPTER_HOSTS = {"o_proj": "self_attn", "down_proj": "mlp"}
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
_BLOCK.update({"gate_proj": "mlp", "up_proj": "mlp"})
# Per method: each leaf of a module and the space of its axis that W_plug maps ("in": the first
# axis is the site's input space, "out": the last axis is its output space, None: neither).
LEAF_SIDES = {
    "lora": {"a": "in", "b": "out"},
    "adapter": {"down": "in", "down_bias": None, "up": "out", "up_bias": "out"},
    "prefix": {"prefix": "out"},
}


def check_sites(method: str, sites: Iterable[str]) -> tuple[str, ...]:
    """The sites of `method`'s modules, refused where W_plug cannot be fitted."""
    if method not in METHODS:
        raise ValueError(f"bridge transfer carries {METHODS} modules, got method {method!r}")
    sites = tuple(sites)
    allowed = {"lora": TARGET_INPUTS, "adapter": ADAPTER_HOSTS, "prefix": PREFIX_SITES}[method]
    bad = [t for t in sites if t not in allowed]
    if method == "prefix" and sorted(sites) != sorted(PREFIX_SITES):
        bad = bad or list(sites)
    if bad or not sites:
        what = {
            "lora": "LoRA supports the targets {} (their input is a norm's output, which W_plug "
            "is fitted on)",
            "adapter": "adapters supports the sites {} (the sub-layers' output projections)",
            "prefix": "a prefix has the sites {} (its keys and values), both",
        }[method]
        raise ValueError(f"bridge transfer of {what.format(sorted(allowed))}; got {list(sites)}")
    return sites


def site_io(method: str, site: str) -> tuple[str, str]:
    """(module whose output is the site's input, module whose output is the site's output)."""
    if method == "lora":
        return TARGET_INPUTS[site], site
    return site, site  # adapter, prefix: a projection's output, into the same space


def activations(module, params, batch, names: Iterable[str]) -> dict:
    """{(layer, name): [tokens, width]} of the real tokens: the outputs of the modules called
    `names` in every layer, from one forward of a plain causal LM."""
    wanted = set(names)

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
    sites: Iterable[str],
    *,
    method: str = "lora",
    ridge: float = 1e-3,
) -> dict[str, dict[str, np.ndarray]]:
    """{site: {"in": P_in [d_in_l, d_in_s], "out": P_out [d_out_s, d_out_l]}} (float32; no
    "in" for a prefix).

    slm, llm: (module, params) of the two plain causal LMs; batches: dicts of input_ids and
    attention_mask (the same tokens go to both models); sites: LoRA targets, or the projections
    adapters follow (method "adapter").
    """
    sites = check_sites(method, sites)
    io = {t: site_io(method, t) for t in sites}
    names = {n for pair in io.values() for n in pair}
    (slm_module, slm_params), (llm_module, llm_params) = slm, llm
    mapping = depth_map(slm_module.config.num_layers, llm_module.config.num_layers)
    # Each module's outputs pooled once, in the same (batch, LLM layer) order for both models,
    # however many sites read them (q, k, v share a norm; an adapter's input is its output).
    pooled = {(side, n): [] for side in ("s", "l") for n in names}
    for batch in batches:
        a_s = activations(slm_module, slm_params, batch, names)
        a_l = activations(llm_module, llm_params, batch, names)
        for j, i in enumerate(mapping):
            for n in names:
                pooled[("s", n)].append(a_s[(i, n)])
                pooled[("l", n)].append(a_l[(j, n)])
    if not pooled[("s", next(iter(names)))]:
        raise ValueError("fit_plug: no batches")
    pooled = {k: np.concatenate(v) for k, v in pooled.items()}
    has_in = "in" in LEAF_SIDES[method].values()  # a prefix has no input side
    plug = {}
    for t, (x, y) in io.items():
        plug[t] = {"out": _ridge(pooled[("s", y)], pooled[("l", y)], ridge).astype(np.float32)}
        if has_in:
            plug[t]["in"] = _ridge(pooled[("l", x)], pooled[("s", x)], ridge).astype(np.float32)
    return plug


def leaf_paths(method: str, layer: int, site: str) -> dict[str, str]:
    """{leaf: flat parameter path} of the module of `site` in decoder layer `layer`."""
    if method == "lora":
        base = f"model/layers_{layer}/{_BLOCK[site]}/{site}"
        return {"a": f"{base}/lora_a", "b": f"{base}/lora_b"}
    base = f"model/layers_{layer}/{ADAPTER_HOSTS[site]}"
    return {
        "down": f"{base}/adapter_down/kernel",
        "down_bias": f"{base}/adapter_down/bias",
        "up": f"{base}/adapter_up/kernel",
        "up_bias": f"{base}/adapter_up/bias",
    }


def slm_modules(flat: dict, method: str, sites: Iterable[str], layers: int) -> dict[str, dict]:
    """{site: {leaf: [layers, ...]}}: a PEFT model's per-layer modules (flat params), stacked
    over depth (LEAF_SIDES names the leaves)."""
    if method == "prefix":
        return _prefix_modules(flat, check_sites(method, sites), layers)
    out = {}
    for t in check_sites(method, sites):
        stacked = {leaf: [] for leaf in LEAF_SIDES[method]}
        for i in range(layers):
            for leaf, path in leaf_paths(method, i, t).items():
                if path not in flat:
                    raise ValueError(
                        f"the SLM's {method} modules lack {path} (sites {list(sites)}): are "
                        "they the modules of this method and model?"
                    )
                stacked[leaf].append(np.asarray(flat[path], np.float32))
        out[t] = {leaf: np.stack(rows) for leaf, rows in stacked.items()}
    return out


def _prefix_modules(flat: dict, sites: tuple[str, ...], layers: int) -> dict[str, dict]:
    if PREFIX_TABLE not in flat:
        raise ValueError(
            f"the SLM's prefix lacks {PREFIX_TABLE} (a prefix_projection MLP does not carry over: "
            "train the SLM's prefix with peft.prefix_projection=False)"
        )
    table = np.asarray(flat[PREFIX_TABLE], np.float32)  # [P, layers * 2 * W]
    if table.shape[1] % (2 * layers):
        raise ValueError(f"{PREFIX_TABLE} {table.shape} is not {layers} layers of keys + values")
    blocks = table.reshape(table.shape[0], layers, 2, -1).transpose(1, 2, 0, 3)  # [L, 2, P, W]
    return {site: {"prefix": blocks[:, k]} for k, site in enumerate(PREFIX_SITES)}


def prefix_table(blocks: dict[str, list]) -> jax.Array:
    """The prefix table [P, layers * 2 * W] from per-layer keys and values {site: [[P, W]]}."""
    rows = []
    for key, value in zip(blocks["k_proj"], blocks["v_proj"], strict=True):
        rows += [key, value]
    return jnp.concatenate(rows, axis=1)


def method_of(modules: dict) -> str:
    """The method of stacked modules (`slm_modules`), from their leaf names."""
    leaves = set(next(iter(modules.values())))
    for method, sides in LEAF_SIDES.items():
        if leaves == set(sides):
            return method
    raise ValueError(f"modules with leaves {sorted(leaves)} are of no known method")


def carry(value, side, p_in, p_out):
    """One module leaf carried into the LLM's dimensions (`side` from LEAF_SIDES)."""
    if side == "in":
        return p_in @ value
    if side == "out":
        return value @ p_out
    return value


def carried(modules: dict, plug: dict, llm_layers: int) -> dict[tuple[str, int, str], jax.Array]:
    """{(site, LLM layer, leaf): value}: each LLM layer's module, its SLM layer's (depth_map)
    carried through W_plug. Works on traced arrays too (stage 4 differentiates it)."""
    method = method_of(modules)
    out = {}
    for t, stacked in modules.items():
        p_in = jnp.asarray(plug[t]["in"]) if "in" in plug[t] else None  # none for a prefix
        p_out = jnp.asarray(plug[t]["out"])
        slm_layers = next(iter(stacked.values())).shape[0]
        for j, i in enumerate(depth_map(slm_layers, llm_layers)):
            for leaf, side in LEAF_SIDES[method].items():
                out[(t, j, leaf)] = carry(jnp.asarray(stacked[leaf][i]), side, p_in, p_out)
    return out


def assemble(method: str, values: dict[tuple[str, int, str], jax.Array]) -> dict[str, jax.Array]:
    """Flat PEFT leaves of a model from per-layer module values (`carried`'s keys)."""
    if method == "prefix":
        layers = 1 + max(j for _, j, _ in values)
        blocks = {t: [values[(t, j, "prefix")] for j in range(layers)] for t in PREFIX_SITES}
        return {PREFIX_TABLE: prefix_table(blocks)}
    return {leaf_paths(method, j, t)[leaf]: v for (t, j, leaf), v in values.items()}


def plug_modules(modules: dict, plug: dict, llm_layers: int) -> dict[str, jax.Array]:
    """The LLM's PEFT leaves (flat paths), each LLM layer taking its SLM layer's module
    (depth_map) carried through W_plug. Works on traced arrays too (stage 4 differentiates it)."""
    return assemble(method_of(modules), carried(modules, plug, llm_layers))
