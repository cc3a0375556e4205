"""W_plug: carrying per-layer PEFT modules learnt on the SLM into the LLM's dimensions and depth.

Two kinds of module carry over (`method`):

lora     a LoRA module of SLM layer i on target t adds x_s A B to the projection's output (x_s
         the projection's input, [d_in_s]; A [d_in_s, r], B [r, d_out_s]). Sites: the targets
         whose input is a norm's output (q_proj, k_proj, v_proj, gate_proj, up_proj; GPT-2's
         c_attn, whose output is q | k | v, and c_fc).
adapter  a bottleneck adapter after a sub-layer's output projection (Houlsby: o_proj and
         down_proj, GPT-2's attn.c_proj and mlp.c_proj; Pfeiffer: the MLP's only) maps that
         output h_s [d_s] to
         h_s + act(h_s D + d) U + u (D [d_s, m], d [m], U [m, d_s], u [d_s]). Sites: the
         projections it follows, so its input and output are the same space (a sub-layer's
         contribution to the residual stream).
prefix   prefix tuning's keys and values, P per layer (the table prefix_encoder/embedding
         [P, layers * 2 * W], W = kv_heads * head_dim; without prefix_projection). Sites: k_proj
         (the keys) and v_proj (the values), GPT-2's c_attn.key and c_attn.value (the middle and
         last thirds of c_attn's output); a prefix has an output side only, and its keys are
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
matrix. Which module is a site's input and output in each family: arch.py (`Sites`); a site's
name tells its family, so modules carry their family with them. These maps are then trained with the modules through the bridge (stage 4) starting from
this fit. An adapter's maps are a pair of ridge fits between the same two spaces, one each way;
they are not constrained to be inverses.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax.bridge import arch as arch_lib
from pifi_jax.bridge.mapping import depth_map

# The families whose modules carry over (arch.py's site tables).
FAMILIES = arch_lib.SUPPORTED
METHODS = ("lora", "adapter", "prefix")
PREFIX_TABLE = "prefix_encoder/embedding"
# Per method: each leaf of a module and the space of its axis that W_plug maps ("in": the first
# axis is the site's input space, "out": the last axis is its output space, None: neither).
LEAF_SIDES = {
    "lora": {"a": "in", "b": "out"},
    "adapter": {"down": "in", "down_bias": None, "up": "out", "up_bias": "out"},
    "prefix": {"prefix": "out"},
}
_WHAT = {
    "lora": "LoRA supports the targets {} (their input is a norm's output, which W_plug is fitted on)",
    "adapter": "adapters supports the sites {} (the sub-layers' output projections)",
    "prefix": "a prefix has the sites {} (its keys and values), both",
}


def _allowed(arch: arch_lib.Arch, method: str) -> tuple[str, ...]:
    if method == "prefix":
        return tuple(name for name, _, _ in arch.sites.prefix)
    return tuple(getattr(arch.sites, method))


def prefix_sites(arch: arch_lib.Arch) -> tuple[str, str]:
    """A family's prefix sites: its keys', then its values'."""
    return _allowed(arch, "prefix")


def site_arch(method: str, sites: Iterable[str]) -> arch_lib.Arch:
    """The family whose `method` modules sit at `sites`, refused where W_plug cannot be fitted."""
    if method not in METHODS:
        raise ValueError(f"bridge transfer carries {METHODS} modules, got method {method!r}")
    sites = tuple(sites)
    for arch in arch_lib.ARCHS:
        allowed = _allowed(arch, method)
        if method == "prefix" and sorted(sites) == sorted(allowed):
            return arch
        if method != "prefix" and sites and all(t in allowed for t in sites):
            return arch
    every = sorted({t for arch in arch_lib.ARCHS for t in _allowed(arch, method)})
    raise ValueError(f"bridge transfer of {_WHAT[method].format(every)}; got {list(sites)}")


def check_sites(method: str, sites: Iterable[str]) -> tuple[str, ...]:
    """The sites of `method`'s modules, refused where W_plug cannot be fitted."""
    site_arch(method, sites)
    return tuple(sites)


def site_io(arch: arch_lib.Arch, method: str, site: str):
    """((input module, None) or None, (output module, column segment or None)): the modules
    inside a layer whose outputs are the site's input and output spaces."""
    if method == "lora":
        projection, norm = arch.sites.lora[site]
        return (norm, None), (projection, None)
    if method == "adapter":
        projection = arch.sites.adapter[site][0]
        return (projection, None), (projection, None)  # a projection's output, into itself
    _, projection, segment = next(p for p in arch.sites.prefix if p[0] == site)
    return None, (projection, segment)


def activations(module, params, batch, paths: Iterable[str]) -> dict:
    """{(layer, path): [tokens, width]} of the real tokens: the outputs of the modules at
    `paths` inside every layer (`self_attn/q_proj`, `ln_1`), from one forward of a plain
    causal LM."""
    arch = arch_lib.arch_for(module.config)
    paths = set(paths)
    names = {p.rsplit("/", 1)[-1] for p in paths}

    def keep(mdl, method_name):
        return method_name == "__call__" and mdl.name in names

    _, state = module.apply(
        {"params": params},
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        capture_intermediates=keep,
    )
    real = np.asarray(batch["attention_mask"]) > 0
    out = {}
    for key, value in traverse_util.flatten_dict(state["intermediates"]).items():
        at = next(k for k, p in enumerate(key) if arch_lib.layer_of(arch, p) is not None)
        inside = "/".join(key[at + 1 : -1])  # the last element is "__call__"
        if inside in paths:
            out[(arch_lib.layer_of(arch, key[at]), inside)] = np.asarray(value[0], np.float64)[real]
    return out


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |x W - y|^2 + lam |W|^2, lam = ridge * trace(x'x) / width."""
    gram = x.T @ x
    lam = ridge * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y)


def _segment(arch, config, projection: str, segment: int | None):
    """The column slice of a (fused) projection's output that is a site's space."""
    if segment is None:
        return slice(None)
    _, start, stop = arch.segments(arch.dims(config), arch.linears[projection][1])[segment]
    return slice(start, stop)


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

    slm, llm: (module, params) of the two plain causal LMs, of the sites' family; batches: dicts
    of input_ids and attention_mask (the same tokens go to both models); sites: LoRA targets,
    the projections adapters follow (method "adapter"), or a prefix's sites.
    """
    arch = site_arch(method, sites)
    (slm_module, slm_params), (llm_module, llm_params) = slm, llm
    for role, m in (("SLM", slm_module), ("LLM", llm_module)):
        if arch_lib.arch_for(m.config) is not arch:
            raise ValueError(
                f"fit_plug: the sites {list(sites)} are {arch.name}'s; the {role} is "
                f"{m.config.model_type!r}"
            )
    io = {t: site_io(arch, method, t) for t in sites}
    paths = {side[0] for pair in io.values() for side in pair if side is not None}
    mapping = depth_map(slm_module.config.num_layers, llm_module.config.num_layers)
    # Each module's outputs pooled once, in the same (batch, LLM layer) order for both models,
    # however many sites read them (q, k, v share a norm; an adapter's input is its output).
    pooled = {(side, p): [] for side in ("s", "l") for p in paths}
    for batch in batches:
        a_s = activations(slm_module, slm_params, batch, paths)
        a_l = activations(llm_module, llm_params, batch, paths)
        for j, i in enumerate(mapping):
            for p in paths:
                pooled[("s", p)].append(a_s[(i, p)])
                pooled[("l", p)].append(a_l[(j, p)])
    if not pooled[("s", next(iter(paths)))]:
        raise ValueError("fit_plug: no batches")
    pooled = {k: np.concatenate(v) for k, v in pooled.items()}

    def space(side, where):
        config = (slm_module if side == "s" else llm_module).config
        return pooled[(side, where[0])][:, _segment(arch, config, *where)]

    plug = {}
    for t, (x, y) in io.items():
        plug[t] = {"out": ridge_fit(space("s", y), space("l", y), ridge).astype(np.float32)}
        if x is not None:  # a prefix has no input side
            plug[t]["in"] = ridge_fit(space("l", x), space("s", x), ridge).astype(np.float32)
    return plug


def leaf_paths(method: str, layer: int, site: str) -> dict[str, str]:
    """{leaf: flat parameter path} of the module of `site` in decoder layer `layer`."""
    arch = site_arch(method, [site])
    base = arch.layer_path(layer)
    if method == "lora":
        base = f"{base}/{arch.sites.lora[site][0]}"
        return {"a": f"{base}/lora_a", "b": f"{base}/lora_b"}
    base = f"{base}/{arch.sites.adapter[site][1]}"
    return {
        "down": f"{base}/adapter_down/kernel",
        "down_bias": f"{base}/adapter_down/bias",
        "up": f"{base}/adapter_up/kernel",
        "up_bias": f"{base}/adapter_up/bias",
    }


def slm_modules(flat: dict, method: str, sites: Iterable[str], layers: int) -> dict[str, dict]:
    """{site: {leaf: [layers, ...]}}: a PEFT model's per-layer modules (flat params), stacked
    over depth (LEAF_SIDES names the leaves)."""
    arch = site_arch(method, sites)
    if method == "prefix":
        return _prefix_modules(flat, prefix_sites(arch), layers)
    out = {}
    for t in sites:
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


def _prefix_modules(flat: dict, sites: tuple[str, str], layers: int) -> dict[str, dict]:
    if PREFIX_TABLE not in flat:
        raise ValueError(
            f"the SLM's prefix lacks {PREFIX_TABLE} (a prefix_projection MLP does not carry over: "
            "train the SLM's prefix with peft.prefix_projection=False)"
        )
    table = np.asarray(flat[PREFIX_TABLE], np.float32)  # [P, layers * 2 * W]
    if table.shape[1] % (2 * layers):
        raise ValueError(f"{PREFIX_TABLE} {table.shape} is not {layers} layers of keys + values")
    blocks = table.reshape(table.shape[0], layers, 2, -1).transpose(1, 2, 0, 3)  # [L, 2, P, W]
    return {site: {"prefix": blocks[:, k]} for k, site in enumerate(sites)}


def prefix_table(keys: list, values: list) -> jax.Array:
    """The prefix table [P, layers * 2 * W] from per-layer keys and values ([P, W] each)."""
    rows = []
    for key, value in zip(keys, values, strict=True):
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
        keys, vals = prefix_sites(site_arch(method, {t for t, _, _ in values}))
        layers = 1 + max(j for _, j, _ in values)
        column = lambda t: [values[(t, j, "prefix")] for j in range(layers)]  # noqa: E731
        return {PREFIX_TABLE: prefix_table(column(keys), column(vals))}
    return {leaf_paths(method, j, t)[leaf]: v for (t, j, leaf), v in values.items()}


def plug_modules(modules: dict, plug: dict, llm_layers: int) -> dict[str, jax.Array]:
    """The LLM's PEFT leaves (flat paths), each LLM layer taking its SLM layer's module
    (depth_map) carried through W_plug. Works on traced arrays too (stage 4 differentiates it)."""
    return assemble(method_of(modules), carried(modules, plug, llm_layers))
