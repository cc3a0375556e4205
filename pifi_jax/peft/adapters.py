"""Bottleneck adapters: Houlsby et al. 2019 (Parameter-Efficient Transfer Learning for NLP) and
Pfeiffer et al. 2020 (AdapterFusion).

An adapter is a small residual MLP on a sub-layer's output, before the residual sum and norm:

    h = dropout(dense(x))            # the sub-layer's output projection, frozen   [..., d]
    h = h + up(act(down(h)))         # down [d, m], up [m, d], m << d; up starts at 0
    y = LayerNorm(h + residual)

Houlsby puts one after the attention-output projection and one after the FFN-output projection of
every layer and trains every LayerNorm too; Pfeiffer puts one after the FFN output only. Since up
starts at zero, the adapted model starts as the base model exactly.

Tree of a BERT layer under Houlsby (`+` added; all that trains is marked *):

      bert/encoder/layer_0/attention/output/dense/{kernel, bias}
    + bert/encoder/layer_0/attention/output/adapter_down/{kernel [d, m], bias [m]}    *
    + bert/encoder/layer_0/attention/output/adapter_up/{kernel [m, d], bias [d]}      *
      bert/encoder/layer_0/attention/output/LayerNorm/{scale, bias}                    * (Houlsby)
      bert/encoder/layer_0/output/dense/{kernel, bias}
    + bert/encoder/layer_0/output/adapter_down/..., adapter_up/...                   *
      bert/encoder/layer_0/output/LayerNorm/{scale, bias}                              * (Houlsby)
  plus the embeddings' LayerNorm (Houlsby) and the task head (both).

    cfg = pifi_jax.peft.AdapterConfig(kind="houlsby", bottleneck_size=64)
    module, params = pifi_jax.from_pretrained("asset:minilm", num_labels=2, peft=cfg)
    print(pifi_jax.peft.summary(module, params))
    pifi_jax.peft.save_adapter(module, params, "adapter/", format="native")

How it attaches: the plan names each module that hosts an adapter, the parent of the projection the
adapter follows (`.../attention/output` for `.../attention/output/dense`). That module calls
`layers.linear.bottleneck_adapter(self, h)` at the right point, which creates and applies the leaves
when the active plan names it. ALBERT shares one layer across depth, and so shares its adapters. Decoders: after the
attention-output projection (o_proj, self_attention.dense, attn.c_proj) and the MLP-output one
(down_proj, dense_4h_to_h, mlp.c_proj), before the residual sum (targets.ADAPTER_TARGETS); Houlsby
trains their RMSNorms / LayerNorms.
Merging is not defined (the adapter is nonlinear), and Hugging Face PEFT has no such adapters: they
are saved in the native format only.
"""

from __future__ import annotations

from collections.abc import Iterable

from pifi_jax.layers.linear import AdapterPlan, Bottleneck
from pifi_jax.peft.config import AdapterConfig
from pifi_jax.peft.targets import ADAPTER_TARGETS, hf_module_name, select_targets

# Every norm (BERT/DeBERTa `LayerNorm`, ALBERT `full_layer_layer_norm`, the decoders'
# `input_layernorm`, `norm`, GPT-2's `ln_1`, `ln_f`, ...): what Houlsby trains besides the adapters.
LAYER_NORMS = r".*([Nn]orm|ln_\d+|ln_f)/(scale|bias)"
ADAPTER_RULE = r".*/adapter_(down|up)/(kernel|bias)"


def plan(config: AdapterConfig, model_type: str, linear_paths: Iterable[str]) -> AdapterPlan:
    """One Bottleneck per module that hosts the output of a targeted projection."""
    defaults = {}
    if model_type in ADAPTER_TARGETS:
        defaults[model_type] = ADAPTER_TARGETS[model_type][config.kind]
    targets = select_targets(list(linear_paths), config, model_type, defaults)
    spec = Bottleneck(config.bottleneck_size, config.non_linearity)
    hosts = dict.fromkeys(path.rpartition("/")[0] for path in targets)
    return AdapterPlan(bottlenecks=tuple((host, spec) for host in hosts))


def check_created(adapter_plan: AdapterPlan, flat_params: dict) -> None:
    """Every planned host must have made its leaves; a module that never calls the hook has not."""
    missing = [
        host
        for host, _ in adapter_plan.bottlenecks
        if f"{host}/adapter_down/kernel" not in flat_params
    ]
    if missing:
        raise ValueError(
            "bottleneck adapters can only follow a sub-layer's output projection (e.g. "
            "attention.output.dense, output.dense); these targets have no adapter site: "
            f"{[hf_module_name(h) for h in missing][:6]}"
        )


def trainable_rules(config: AdapterConfig) -> list[tuple[str, str]]:
    rules = [(ADAPTER_RULE, "trainable")]
    if config.train_layernorms:
        rules.append((LAYER_NORMS, "trainable"))
    return rules
