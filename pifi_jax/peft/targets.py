"""Which modules a PEFT method attaches to, by Hugging Face PEFT's rules, so adapters interoperate.

Module names are Hugging Face's dotted names (`bert.encoder.layer.0.attention.self.query`), derived
mechanically from our parameter paths (`bert/encoder/layer_0/attention/self/query`).
- target_modules as a string: regex full match on the name;
- as a list: a name equal to an entry, or ending with "." + entry;
- exclude_modules: the same rules, removing matches;
- layers_to_transform: keep names whose layer index (after `layers_pattern`, default one of
  layer/layers/h/block/blocks) is listed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

DEFAULT_LAYER_PATTERNS = ("layer", "layers", "h", "block", "blocks")

# Defaults per Hugging Face model_type, as Hugging Face PEFT defines them. Where PEFT has none
# (LoRA: albert; IA3: electra, albert) these are pifi_jax's choice, by analogy with BERT; an
# export always names its targets explicitly, so PEFT loads it all the same.
LORA_TARGETS = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "electra": ("query", "value"),
    "albert": ("query", "value"),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "falcon": ("query_key_value",),
    "gpt2": ("c_attn",),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
}
IA3_TARGETS = {
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "electra": (("key", "value", "output.dense"), ("output.dense",)),
    "albert": (("key", "value", "ffn_output"), ("ffn_output",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    # Hugging Face PEFT's mT5 defaults: wi_1 scaled at its output, no feed-forward module.
    "mt5": (("k", "v", "wi_1"), ()),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
}
# Bottleneck adapters: the projections whose output passes through one (regexes on HF names), per
# kind. Hugging Face PEFT has no adapters of this kind; these are the sites of the papers:
# Houlsby after the attention-output and the FFN-output projections, Pfeiffer after the FFN one.
_BERT_LIKE_ADAPTERS = {
    "houlsby": r".*\.layer\.\d+\.(attention\.)?output\.dense",
    "pfeiffer": r".*\.layer\.\d+\.output\.dense",
}
_LLAMA_LIKE_ADAPTERS = {
    "houlsby": r".*\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
    "pfeiffer": r".*\.layers\.\d+\.mlp\.down_proj",
}
ADAPTER_TARGETS = {
    "bert": _BERT_LIKE_ADAPTERS,
    "roberta": _BERT_LIKE_ADAPTERS,
    "electra": _BERT_LIKE_ADAPTERS,
    "deberta": _BERT_LIKE_ADAPTERS,
    "deberta-v2": _BERT_LIKE_ADAPTERS,
    # One set of layer weights serves every depth, and so does its adapter.
    "albert": {
        "houlsby": r".*\.albert_layers\.\d+\.(attention\.dense|ffn_output)",
        "pfeiffer": r".*\.albert_layers\.\d+\.ffn_output",
    },
    # Decoders: after the attention-output and the MLP-output projections, before the residual.
    "llama": _LLAMA_LIKE_ADAPTERS,
    "mistral": _LLAMA_LIKE_ADAPTERS,
    "qwen2": _LLAMA_LIKE_ADAPTERS,
    "gemma2": _LLAMA_LIKE_ADAPTERS,
    "falcon": {
        "houlsby": r".*\.h\.\d+\.(self_attention\.dense|mlp\.dense_4h_to_h)",
        "pfeiffer": r".*\.h\.\d+\.mlp\.dense_4h_to_h",
    },
    "gpt2": {
        "houlsby": r".*\.h\.\d+\.(attn|mlp)\.c_proj",
        "pfeiffer": r".*\.h\.\d+\.mlp\.c_proj",
    },
    # Encoder-decoder: after every sub-layer's output projection (cross-attention included).
    "bart": {
        "houlsby": r".*\.layers\.\d+\.((self|encoder)_attn\.out_proj|fc2)",
        "pfeiffer": r".*\.layers\.\d+\.fc2",
    },
    "t5": {
        "houlsby": r".*\.block\.\d+\.layer\.\d+\.((SelfAttention|EncDecAttention)\.o|DenseReluDense\.wo)",
        "pfeiffer": r".*\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
    },
}
ADAPTER_TARGETS["mt5"] = ADAPTER_TARGETS["t5"]  # the same block layout
# Families whose self-attention takes prefix keys/values (`layers.peft_hooks.prefix_block`), by
# the path suffix of that module. BERT, RoBERTa, ELECTRA and the decoders as Hugging Face PEFT
# does it (a cache of P entries in front; the decoders' masks see it as P earlier tokens).
# ALBERT and DeBERTa are pifi_jax's own definition (transformers' ALBERT and DeBERTa take no
# past_key_values, so PEFT cannot prefix them): see peft/prefix.py.
PREFIX_ATTENTION = {
    "bert": "attention/self",
    "roberta": "attention/self",
    "electra": "attention/self",
    "albert": "attention",
    "deberta": "attention/self",
    "deberta-v2": "attention/self",
    "llama": "self_attn",
    "mistral": "self_attn",
    "qwen2": "self_attn",
    "gemma2": "self_attn",
    "falcon": "self_attention",
    "gpt2": "attn",
}
NATIVE_ONLY_PREFIX = ("albert", "deberta", "deberta-v2")
# Families whose embeddings take a soft prompt (`layers.peft_hooks.prepend_prompt`).
PROMPT_FAMILIES = (
    "bert",
    "roberta",
    "electra",
    "albert",
    "deberta",
    "deberta-v2",
    "llama",
    "mistral",
    "qwen2",
    "gemma2",
    "falcon",
    "gpt2",
)
# The task heads Hugging Face PEFT trains fully: sequence classification (`classifier`, decoders'
# `score`) and extractive question answering (`qa_outputs`, PeftModelForQuestionAnswering).
HEAD_MODULES = ("classifier", "score", "qa_outputs")


@functools.cache
def _literal_names() -> frozenset[str]:
    """Module names ending in `_<digits>` that are not list indices (T5's wi_0, GPT-2's ln_1)."""
    from pifi_jax.models import registry

    families = {registry.family_for(t) for t in registry.supported_model_types()}
    return frozenset(n for f in families for n in getattr(f, "LITERAL_NAMES", ()))


def hf_module_name(path: str) -> str:
    """`bert/encoder/layer_0/attention/self/query` -> `bert.encoder.layer.0.attention.self.query`
    (T5's `DenseReluDense/wi_1` stays `DenseReluDense.wi_1`)."""
    from pifi_jax.hub.convert import hf_module_path

    return hf_module_path(path, _literal_names())


def name_matches(name: str, spec) -> bool:
    """Hugging Face PEFT's module-name test for one spec (str regex or list of names/suffixes)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, patterns: Iterable[str] | None) -> int | None:
    for pattern in patterns or DEFAULT_LAYER_PATTERNS:
        match = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def select_targets(
    linear_paths: Iterable[str], config, model_type: str, defaults: dict
) -> tuple[str, ...]:
    """The paths (ours) of the Linear modules `config` targets; error if none."""
    targets = config.target_modules
    if targets is None:
        if model_type not in defaults:
            raise ValueError(
                f"no default target_modules for model_type {model_type!r}; set target_modules"
            )
        targets = defaults[model_type]
        if isinstance(targets[0], tuple):  # IA3 entries are (targets, feedforward)
            targets = targets[0]
    layers_pattern = config.layers_pattern
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    chosen = []
    for path in linear_paths:
        name = hf_module_name(path)
        if not name_matches(name, targets) or name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            if layer_index(name, layers_pattern) not in config.layers_to_transform:
                continue
        chosen.append(path)
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no module of this {model_type} model; module names "
            f"look like {hf_module_name(next(iter(linear_paths), ''))!r}"
        )
    return tuple(chosen)
