"""What Fisher pruning needs to know of a decoder family: which axis of each weight runs along
the residual stream, the attention heads or the MLP units.

Every tensor of a layer is described by the kinds of its two axes (flax [in, out] layout):

    HIDDEN  the residual stream (d), kept with one index set for the whole model
    Q       query heads (n_q blocks of head_dim): the attention output's rows, q's columns
    KV      key/value heads (n_kv blocks of head_dim)
    FFN     MLP units (f)

A fused projection lists one kind per column segment: GPT-2's c_attn is (HIDDEN, (Q, KV, KV)),
the q | k | v thirds side by side. A bias follows its kernel's columns. Norm weights (scale, and
a LayerNorm's bias) run along HIDDEN. With this one table per family, fisher.py reduces H and
prune.py slices tensors without knowing any module's name.

Families:
  llama   llama, mistral, qwen2: RMSNorm, separate q/k/v/o, gated MLP, GQA, untied or tied head
  gpt2    gpt2: LayerNorm, fused c_attn, learned positions (their columns run along HIDDEN),
          n_kv = n_q (no GQA) and head_dim = n_embd / n_head, so a bridge's width is its number
          of kept heads times head_dim (`tied_head_dim`)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

HIDDEN, Q, KV, FFN = "hidden", "q", "kv", "ffn"


@dataclasses.dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    eps: float

    def width(self, kind: str) -> int:
        """Size of an axis of `kind`."""
        return {
            HIDDEN: self.hidden,
            Q: self.heads * self.head_dim,
            KV: self.kv_heads * self.head_dim,
            FFN: self.ffn,
        }[kind]

    def block(self, kind: str) -> int:
        """Width of one scored unit of `kind` (a head is head_dim wide)."""
        return self.head_dim if kind in (Q, KV) else 1

    def units(self, kind: str) -> int:
        return self.width(kind) // self.block(kind)


@dataclasses.dataclass(frozen=True)
class Sites:
    """Where a family's PEFT modules sit, for W_plug (plug.py); module paths inside a layer.

    lora: target -> (its projection, the norm whose output is the projection's input);
    adapter: site -> (the projection the adapter follows, the module holding its leaves);
    prefix: (site, projection, column segment) of a layer's prefix keys, then of its values;
    adapter_defaults: adapter kind (houlsby, pfeiffer) -> its sites."""

    lora: Mapping[str, tuple[str, str]]
    adapter: Mapping[str, tuple[str, str]]
    prefix: tuple[tuple[str, str, int], tuple[str, str, int]]
    adapter_defaults: Mapping[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    stack: str  # flax path prefix of layer i: f"{stack}{i}"
    embed: str  # token embedding [vocab, d]
    position_embed: str | None  # learned positions [n_positions, d]
    final_norm: str  # module path of the norm before the LM head
    rms_norm: bool  # RMSNorm (scale only); else LayerNorm (scale, bias, mean-centred)
    linears: Mapping[str, tuple[str, tuple[str, ...]]]  # module in a layer -> (rows, columns)
    dims: Callable[[Any], Dims]
    shrunk: Callable[..., Any]  # (config, hidden, heads, kv_heads, ffn) -> the bridge's config
    sites: Sites
    tied_head_dim: bool = False

    def layer_path(self, i: int) -> str:
        return f"{self.stack}{i}"

    def is_layer_path(self, path: str) -> bool:
        return re.match(rf"{re.escape(self.stack)}\d+/", path) is not None

    def rule(self, path: str) -> tuple[str, tuple[str, ...]] | None:
        """(row kind, column kinds) of a layer tensor `module/leaf` (flax path inside the layer),
        None for a norm weight; unknown tensors are refused by name."""
        module, leaf = path.rsplit("/", 1)
        if module in self.linears and leaf in ("kernel", "bias"):
            return self.linears[module]
        if leaf == "scale" or (leaf == "bias" and not self.rms_norm):
            return None
        raise ValueError(f"bridge ({self.name}): no rule for the layer tensor {path!r}")

    def segments(self, dims: Dims, kinds: tuple[str, ...]) -> list[tuple[str, int, int]]:
        """(kind, start, stop) of each column segment of a (fused) projection."""
        out, start = [], 0
        for kind in kinds:
            out.append((kind, start, start + dims.width(kind)))
            start += dims.width(kind)
        return out


def _llama_dims(c) -> Dims:
    return Dims(
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.rms_norm_eps,
    )


def _llama_shrunk(c, hidden, heads, kv_heads, ffn):
    return dataclasses.replace(
        c,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=c.head_dim,
        # prune.py scales the norm weights by sqrt(d / d_b); epsilon follows (d / d_b)
        rms_norm_eps=c.rms_norm_eps * c.hidden_size / hidden,
    )


def _gpt2_dims(c) -> Dims:
    return Dims(
        c.n_embd, c.n_head, c.n_head, c.head_dim, c.n_inner or 4 * c.n_embd, c.layer_norm_epsilon
    )


def _gpt2_shrunk(c, hidden, heads, kv_heads, ffn):
    if hidden != heads * c.head_dim or kv_heads != heads:
        raise ValueError(
            f"a GPT-2 bridge keeps whole heads of head_dim {c.head_dim} and no GQA: "
            f"{hidden} wide with {heads} heads / {kv_heads} kv heads is not one"
        )
    return dataclasses.replace(c, n_embd=hidden, n_head=heads, n_inner=ffn)


LLAMA = Arch(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    stack="model/layers_",
    embed="model/embed_tokens/embedding",
    position_embed=None,
    final_norm="model/norm",
    rms_norm=True,
    linears={
        "self_attn/q_proj": (HIDDEN, (Q,)),
        "self_attn/k_proj": (HIDDEN, (KV,)),
        "self_attn/v_proj": (HIDDEN, (KV,)),
        "self_attn/o_proj": (Q, (HIDDEN,)),
        "mlp/gate_proj": (HIDDEN, (FFN,)),
        "mlp/up_proj": (HIDDEN, (FFN,)),
        "mlp/down_proj": (FFN, (HIDDEN,)),
    },
    dims=_llama_dims,
    shrunk=_llama_shrunk,
    sites=Sites(
        lora={
            "q_proj": ("self_attn/q_proj", "input_layernorm"),
            "k_proj": ("self_attn/k_proj", "input_layernorm"),
            "v_proj": ("self_attn/v_proj", "input_layernorm"),
            "gate_proj": ("mlp/gate_proj", "post_attention_layernorm"),
            "up_proj": ("mlp/up_proj", "post_attention_layernorm"),
        },
        adapter={
            "o_proj": ("self_attn/o_proj", "self_attn"),
            "down_proj": ("mlp/down_proj", "mlp"),
        },
        prefix=(("k_proj", "self_attn/k_proj", 0), ("v_proj", "self_attn/v_proj", 0)),
        adapter_defaults={"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)},
    ),
)

GPT2 = Arch(
    name="gpt2",
    model_types=("gpt2",),
    stack="transformer/h_",
    embed="transformer/wte/embedding",
    position_embed="transformer/wpe/embedding",
    final_norm="transformer/ln_f",
    rms_norm=False,
    linears={
        "attn/c_attn": (HIDDEN, (Q, KV, KV)),
        "attn/c_proj": (Q, (HIDDEN,)),
        "mlp/c_fc": (HIDDEN, (FFN,)),
        "mlp/c_proj": (FFN, (HIDDEN,)),
    },
    dims=_gpt2_dims,
    shrunk=_gpt2_shrunk,
    # c_attn's keys and values are its second and third column segments
    sites=Sites(
        lora={"c_attn": ("attn/c_attn", "ln_1"), "c_fc": ("mlp/c_fc", "ln_2")},
        adapter={"attn.c_proj": ("attn/c_proj", "attn"), "mlp.c_proj": ("mlp/c_proj", "mlp")},
        prefix=(("c_attn.key", "attn/c_attn", 1), ("c_attn.value", "attn/c_attn", 2)),
        adapter_defaults={"houlsby": ("attn.c_proj", "mlp.c_proj"), "pfeiffer": ("mlp.c_proj",)},
    ),
    tied_head_dim=True,
)

ARCHS = (LLAMA, GPT2)
SUPPORTED = tuple(t for a in ARCHS for t in a.model_types)


def arch_for(config) -> Arch:
    for arch in ARCHS:
        if config.model_type in arch.model_types:
            return arch
    raise ValueError(
        f"bridge pruning supports the model types {SUPPORTED} (the Llama architecture and "
        f"GPT-2); the checkpoint is {config.model_type!r}"
    )


def layer_of(arch: Arch, name: str) -> int | None:
    """The layer index of a flax module name of the stack (`layers_3`, `h_3`), else None."""
    prefix = arch.stack.rsplit("/", 1)[-1]
    tail = name[len(prefix) :]
    return int(tail) if name.startswith(prefix) and tail.isdigit() else None


def layer_window(config, i: int):
    """The sliding window of layer i (None: full attention, or a family without one)."""
    fn = getattr(config, "layer_window", None)
    return fn(i) if fn is not None else None


def kept_indices(selection, dims: Dims, kind: str, layer: int) -> np.ndarray:
    """Indices along an axis of `kind` that the bridge keeps in `layer`."""
    if kind == HIDDEN:
        return np.asarray(selection.hidden)
    if kind == FFN:
        return np.asarray(selection.ffn[layer])
    heads = selection.q_heads[layer] if kind == Q else selection.kv_groups[layer]
    heads = np.asarray(heads)
    return (heads[:, None] * dims.head_dim + np.arange(dims.head_dim)[None]).reshape(-1)


def kept_columns(arch: Arch, selection, dims: Dims, kinds: tuple[str, ...], layer: int):
    """Kept indices of a (fused) projection's columns: each segment's, offset to its place."""
    return np.concatenate(
        [
            start + kept_indices(selection, dims, kind, layer)
            for kind, start, _ in arch.segments(dims, kinds)
        ]
    )
