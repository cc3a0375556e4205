"""W_plug, depth and the bridge's leaves for an encoder-decoder (T5) pair: LoRA modules and
bottleneck adapters.

plug.py's rules, for a model with two stacks. A LoRA module of SLM block i adds x_s A B to a
projection's output; in LLM block j of the same stack (served by i = depth_map(L_slm, L_llm) of
that stack: the encoder's and the decoder's maps are separate) it becomes x_l (P_in A) (B P_out),
and in bridge block j (W_down A_l) (B_l[:, kept]), as adapt.py describes.

Sites: a projection and the attention (or feed-forward) it belongs to, because each is its own
pair of spaces:

    encoder.q|k|v     an encoder block's self-attention     input: its layer_norm's output
    decoder.q|k|v     a decoder block's self-attention      input: its layer_norm's output
    cross.q           a decoder block's cross-attention     input: its layer_norm's output
    cross.k|v         the same cross-attention's keys and values, projected from the memory:
                      input: the encoder's output (its final_layer_norm's), the same for every
                      decoder block
    encoder.wi, decoder.wi (wi_0, wi_1 when the MLP is gated)     input: the MLP's layer_norm

so every site's input is a norm's output on the residual stream (W_down applies to it in the
bridge) and its output a head space (the kept heads: the stack's self-attention set, or the
block's cross-attention set) or the MLP's units. The o and wo projections read heads and units,
not the stream, and are refused. A user names LoRA targets as Hugging Face PEFT does (`q,v`, T5's
default); each expands to every site of that projection (`sites_for`).

W_plug (`fit_plug`): one P_in / P_out per site, fitted without gradients by ridge regression
between the two models' activations at the same tokens (the pair shares its tokenizer): the
encoder's states at the real source tokens, the decoder's at the real target tokens (teacher
forced, the target shifted right behind decoder_start_token_id, as the loss has it), pooled over
the LLM blocks of the site's stack and their SLM blocks.

Bottleneck adapters (`ADAPTER_SITES`) follow a sub-layer's output projection, so their input and
output are that projection's output, a contribution to the residual stream:

    encoder.o, decoder.o    a block's self-attention output (Houlsby)
    cross.o                 a decoder block's cross-attention output (Houlsby)
    encoder.wo, decoder.wo  a block's feed-forward output (Houlsby and Pfeiffer)

As for a decoder pair (plug.py), an adapter's P_in and P_out are two ridge fits between the same
two spaces, the projection's outputs in the LLM and the SLM, one each way; in the bridge its down
projection takes W_down on the left and its up projection and bias keep the kept residual
dimensions. Prefix tuning has no T5 implementation in pifi_jax.peft and is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax.bridge import plug as plug_lib
from pifi_jax.bridge.fisher_seq2seq import STACKS, decoder_inputs
from pifi_jax.bridge.mapping import depth_map
from pifi_jax.bridge.seq2seq_bridge import head_columns
from pifi_jax.models import t5
from pifi_jax.peft.targets import ADAPTER_TARGETS, hf_module_name, name_matches

FAMILY = "t5"
ATTENTION = ("q", "k", "v")
FEED_FORWARD = ("wi", "wi_0", "wi_1")
OUTPUTS = ("o", "wo")  # the projections bottleneck adapters follow


@dataclasses.dataclass(frozen=True)
class Site:
    stack: str  # the stack whose blocks hold the projection
    sublayer: int  # the block's layer_<k> holding it
    inner: str  # SelfAttention | EncDecAttention | DenseReluDense
    projection: str  # q, k, v, wi, wi_0, wi_1; o, wo (adapters)
    # What its output columns are: "self" heads, "cross" heads, "ffn" units, or the residual
    # stream ("hidden": an adapter's site).
    columns: str

    @property
    def method(self) -> str:
        return "adapter" if self.columns == "hidden" else "lora"

    def host(self, block: int) -> str:
        """The module that holds the projection (and an adapter's leaves)."""
        return f"{self.stack}/block_{block}/layer_{self.sublayer}/{self.inner}"

    def path(self, block: int) -> str:
        """The projection's flax module path in `block`."""
        return f"{self.host(block)}/{self.projection}"

    def input_path(self, block: int) -> str:
        """The module whose output is the module's input (an adapter's: its projection)."""
        if self.method == "adapter":
            return self.path(block)
        if self.inner == "EncDecAttention" and self.projection in ("k", "v"):
            return "encoder/final_layer_norm"  # the memory, the same for every decoder block
        return f"{self.stack}/block_{block}/layer_{self.sublayer}/layer_norm"


def _site_table() -> dict[str, Site]:
    out = {}
    for p in ATTENTION:
        out[f"encoder.{p}"] = Site("encoder", 0, "SelfAttention", p, "self")
        out[f"decoder.{p}"] = Site("decoder", 0, "SelfAttention", p, "self")
        out[f"cross.{p}"] = Site("decoder", 1, "EncDecAttention", p, "cross")
    for w in FEED_FORWARD:
        out[f"encoder.{w}"] = Site("encoder", 1, "DenseReluDense", w, "ffn")
        out[f"decoder.{w}"] = Site("decoder", 2, "DenseReluDense", w, "ffn")
    return out


SITES = _site_table()
ADAPTER_SITES = {
    "encoder.o": Site("encoder", 0, "SelfAttention", "o", "hidden"),
    "decoder.o": Site("decoder", 0, "SelfAttention", "o", "hidden"),
    "cross.o": Site("decoder", 1, "EncDecAttention", "o", "hidden"),
    "encoder.wo": Site("encoder", 1, "DenseReluDense", "wo", "hidden"),
    "decoder.wo": Site("decoder", 2, "DenseReluDense", "wo", "hidden"),
}

# The sites of each adapter kind: those PEFT's default T5 targets of the kind match (in block 0).
ADAPTER_KINDS = {
    kind: tuple(
        s for s, site in ADAPTER_SITES.items() if name_matches(hf_module_name(site.path(0)), rx)
    )
    for kind, rx in ADAPTER_TARGETS["t5"].items()
}
_ALL_SITES = {**SITES, **ADAPTER_SITES}


def is_seq2seq(config) -> bool:
    """Whether a model config (pifi_jax's) is of the encoder-decoder family carried here."""
    return getattr(config, "model_type", None) in t5.MODEL_TYPES


def sites_for(targets: Iterable[str], config) -> tuple[str, ...]:
    """The sites of LoRA `targets` (Hugging Face PEFT module names: q, k, v, wi / wi_0, wi_1) in
    a T5 model of `config`; o and wo, and names T5 lacks, are refused by name."""
    ffn = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
    out = []
    for t in targets:
        if t in ATTENTION:
            out += [f"encoder.{t}", f"decoder.{t}", f"cross.{t}"]
        elif t in ffn:
            out += [f"encoder.{t}", f"decoder.{t}"]
        else:
            raise ValueError(
                f"bridge transfer of T5 LoRA supports the targets {[*ATTENTION, *ffn]} (their "
                f"input is a norm's output, which W_plug is fitted on); got {t!r}"
            )
    return tuple(out)


def adapter_sites_for(kind: str, targets: Iterable[str] = ()) -> tuple[str, ...]:
    """The sites of `kind` (houlsby | pfeiffer) adapters on a T5 model: the kind's, or those of
    the projections `targets` names (o: every attention's output, wo: every feed-forward's)."""
    targets = tuple(targets)
    if not targets:
        return ADAPTER_KINDS[kind]
    bad = [t for t in targets if t not in OUTPUTS]
    if bad:
        raise ValueError(
            f"bridge transfer of T5 adapters supports the projections {list(OUTPUTS)} (the "
            f"sub-layers' outputs); got {bad}"
        )
    return tuple(s for s in ADAPTER_SITES if ADAPTER_SITES[s].projection in targets)


def check_sites(method: str, sites: Iterable[str]) -> tuple[str, ...]:
    """The sites of a T5 pair's modules, refused unless LoRA or adapters at known sites."""
    sites = tuple(sites)
    tables = {"lora": SITES, "adapter": ADAPTER_SITES}
    if method not in tables:
        raise ValueError(
            f"transfer.method={method!r}: a T5 pair carries LoRA or bottleneck adapters (pifi_jax "
            "has no prefix tuning for T5); use transfer.method=lora or adapter"
        )
    unknown = [s for s in sites if s not in tables[method]]
    if unknown or not sites:
        raise ValueError(f"T5 {method} sites are {sorted(tables[method])}; got {list(sites)}")
    return sites


def method_of_sites(sites: Iterable[str]) -> str:
    """lora or adapter: the method whose sites `sites` are (refused when they mix or are unknown)."""
    sites = tuple(sites)
    methods = {_ALL_SITES[s].method for s in sites if s in _ALL_SITES}
    if len(methods) != 1 or any(s not in _ALL_SITES for s in sites):
        raise ValueError(f"T5 sites of one method (LoRA: {sorted(SITES)}, adapters: "
                         f"{sorted(ADAPTER_SITES)}); got {list(sites)}")  # fmt: skip
    return methods.pop()


def depth(config, stack: str) -> int:
    return config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers


def _source_side(path: str) -> bool:
    """Whether a captured module's rows are source tokens (else target tokens)."""
    return path.startswith("encoder/") or path.endswith(("EncDecAttention/k", "EncDecAttention/v"))


def activations(module, params, batch, paths: Iterable[str]) -> dict[str, np.ndarray]:
    """{module path: [real tokens, width]}: the outputs of the modules at `paths` (full flax
    paths, e.g. `decoder/block_1/layer_1/EncDecAttention/q`), from one teacher-forced forward of
    a plain T5 model on a seq2seq batch."""
    paths = set(paths)
    names = {p.rsplit("/", 1)[-1] for p in paths}

    def keep(mdl, method_name):
        return method_name == "__call__" and mdl.name in names

    targets = np.asarray(batch["target_ids"])
    _, state = module.apply(
        {"params": params},
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(decoder_inputs(module.config, targets)),
        jnp.asarray(batch["target_mask"]),
        capture_intermediates=keep,
    )
    source = np.asarray(batch["attention_mask"]) > 0
    target = np.asarray(batch["target_mask"]) > 0
    out = {}
    for key, value in traverse_util.flatten_dict(state["intermediates"]).items():
        path = "/".join(key[:-1])  # the last element is "__call__"
        if path in paths:
            real = source if _source_side(path) else target
            out[path] = np.asarray(value[0], np.float64)[real]
    return out


def fit_plug(
    slm, llm, batches: Iterable[dict], sites: Iterable[str], *, ridge: float = 1e-3
) -> dict[str, dict[str, np.ndarray]]:
    """{site: {"in": P_in [d_l, d_s], "out": P_out [out_s, out_l]}} (float32), fitted as the
    module docstring says. slm, llm: (module, params) of the two plain T5 models; batches: seq2seq
    dicts (input_ids, attention_mask, target_ids, target_mask)."""
    sites = check_sites(method_of_sites(sites), sites)
    (slm_module, slm_params), (llm_module, llm_params) = slm, llm
    for role, m in (("SLM", slm_module), ("LLM", llm_module)):
        if not is_seq2seq(m.config):
            raise ValueError(f"fit_plug: the {role} is {m.config.model_type!r}, not a T5 model")
    maps = {s: depth_map(depth(slm_module.config, s), depth(llm_module.config, s)) for s in STACKS}
    pairs = {}  # (site, "x" | "y") -> [(SLM path, LLM path)] over the LLM's blocks
    for name in sites:
        site = _ALL_SITES[name]
        mapping = maps[site.stack]
        pairs[(name, "x")] = [
            (site.input_path(i), site.input_path(j)) for j, i in enumerate(mapping)
        ]
        pairs[(name, "y")] = [(site.path(i), site.path(j)) for j, i in enumerate(mapping)]
    slm_paths = {s for v in pairs.values() for s, _ in v}
    llm_paths = {lp for v in pairs.values() for _, lp in v}
    pooled = {key: ([], []) for key in pairs}
    for batch in batches:
        a_s = activations(slm_module, slm_params, batch, slm_paths)
        a_l = activations(llm_module, llm_params, batch, llm_paths)
        for key, rows in pairs.items():
            for s, lp in rows:
                pooled[key][0].append(a_s[s])
                pooled[key][1].append(a_l[lp])
    if not pooled[(sites[0], "x")][0]:
        raise ValueError("fit_plug: no batches")
    plug = {}
    for name in sites:
        xs, xl = (np.concatenate(v) for v in pooled[(name, "x")])
        ys, yl = (np.concatenate(v) for v in pooled[(name, "y")])
        plug[name] = {
            "in": plug_lib.ridge_fit(xl, xs, ridge).astype(np.float32),
            "out": plug_lib.ridge_fit(ys, yl, ridge).astype(np.float32),
        }
    return plug


def leaf_paths(site: str, block: int) -> dict[str, str]:
    """{leaf: flat parameter path} of the module of `site` in `block` (plug.LEAF_SIDES' names)."""
    s = _ALL_SITES[site]
    if s.method == "lora":
        base = s.path(block)
        return {"a": f"{base}/lora_a", "b": f"{base}/lora_b"}
    base = s.host(block)
    return {
        "down": f"{base}/adapter_down/kernel",
        "down_bias": f"{base}/adapter_down/bias",
        "up": f"{base}/adapter_up/kernel",
        "up_bias": f"{base}/adapter_up/bias",
    }


def slm_modules(flat: dict, sites: Iterable[str], config) -> dict[str, dict]:
    """{site: {leaf: [blocks, ...]}} (LoRA: a [d_s, r], b [r, out_s]; adapters: down, down_bias,
    up, up_bias): a T5 PeftModel's modules (flat params) stacked over the blocks of each site's
    stack."""
    out = {}
    method = method_of_sites(sites)
    for name in check_sites(method, sites):
        rows = {leaf: [] for leaf in plug_lib.LEAF_SIDES[method]}
        for i in range(depth(config, _ALL_SITES[name].stack)):
            for leaf, path in leaf_paths(name, i).items():
                if path not in flat:
                    raise ValueError(
                        f"the SLM's {method} modules lack {path} (sites {list(sites)}): are "
                        "they modules of this method and model, at these sites?"
                    )
                rows[leaf].append(np.asarray(flat[path], np.float32))
        out[name] = {leaf: np.stack(v) for leaf, v in rows.items()}
    return out


def carried(modules: dict, plug: dict, llm_config) -> dict[tuple[str, int, str], jax.Array]:
    """{(site, LLM block, leaf): value}: every LLM block's module, its SLM block's (the stack's
    depth map) carried through W_plug. Works on traced arrays."""
    out = {}
    for name, stacked in modules.items():
        p_in, p_out = jnp.asarray(plug[name]["in"]), jnp.asarray(plug[name]["out"])
        site = _ALL_SITES[name]
        slm_blocks = next(iter(stacked.values())).shape[0]
        for j, i in enumerate(depth_map(slm_blocks, depth(llm_config, site.stack))):
            for leaf, side in plug_lib.LEAF_SIDES[site.method].items():
                value = jnp.asarray(stacked[leaf][i])
                out[(name, j, leaf)] = plug_lib.carry(value, side, p_in, p_out)
    return out


def assemble(values: dict[tuple[str, int, str], jax.Array]) -> dict[str, jax.Array]:
    """Flat PEFT leaves of a T5 PeftModel from per-block values (`carried`'s keys)."""
    return {leaf_paths(name, j)[leaf]: v for (name, j, leaf), v in values.items()}


def kept_columns(selection, llm_config, site: str, block: int) -> np.ndarray:
    """The output columns of `site` that bridge block `block` keeps (seq2seq_bridge.py)."""
    s = _ALL_SITES[site]
    if s.columns == "hidden":  # an adapter's output: the residual stream
        return np.asarray(selection.hidden)
    if s.columns == "ffn":
        units = selection.encoder_ffn if s.stack == "encoder" else selection.decoder_ffn
        return np.asarray(units[block])
    if s.columns == "cross":
        heads = selection.cross_heads[block]
    else:
        heads = selection.encoder_heads if s.stack == "encoder" else selection.decoder_heads
    return head_columns(heads, llm_config.d_kv)
